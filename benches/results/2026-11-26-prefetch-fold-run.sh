#!/bin/bash
# Device script for benches/results/2026-11-26-prefetch-fold-experiment.patch (run from the
# repository root with .gl/ and .dev/ carried; .dev/ holds stripped builds of the patched tree:
# flash_probe (the example), flash_tests (target/release/deps/flash-*) and seqk).
# 1. Every FLASH GPU test with each knob setting. 2. Fresh-process timings, two rounds, of
# b = 1 calls at n 64 (fixed cost) to 64K, causal and not, for prefetch off/on x fold off/on.
for f in .gl/*.deb; do dpkg -x $f /; done >/dev/null 2>&1; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
mkdir -p target/release /work/main/target/release
cp .dev/seqk target/release/; cp .dev/seqk /work/main/target/release/
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv > $OUT/gpu.txt
for pf in 1 0; do for fold in 100000 0; do
    SEQK_REQUIRE_GPU=1 SEQK_X_PREFETCH=$pf SEQK_X_FOLD=$fold timeout 90 .dev/flash_tests \
        > $OUT/tests-prefetch$pf-fold$fold.txt 2>&1
    echo "prefetch $pf fold $fold: $(grep 'test result' $OUT/tests-prefetch$pf-fold$fold.txt)"
done; done
P=$OUT/probe.jsonl
for round in 1 2; do
    for n in 64 1024 2048 4096 65536; do for causal in 0 1; do
        for v in "0 0" "0 8" "1 0" "1 8"; do
            set -- $v
            SEQK_X_PREFETCH=$1 SEQK_X_FOLD=$2 timeout 30 .dev/flash_probe 1 $n $causal >> $P 2>> $OUT/log.txt
        done
    done; done
done
python3 - $P <<'PY'
import json, sys, collections
rows = [json.loads(l) for l in open(sys.argv[1])]
t = collections.defaultdict(list)
for r in rows:
    t[(r["n"], r["causal"], r["prefetch"], r["fold"])].append(r["us_per_call"])
for k in sorted(t):
    print(*k, " ".join(f"{x:9.2f}" for x in t[k]))
PY
