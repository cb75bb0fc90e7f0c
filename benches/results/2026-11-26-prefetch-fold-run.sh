#!/bin/bash
# Device script for benches/results/2026-11-26-prefetch-fold-experiment.patch (run from the
# repository root with .gl/ and .dev/ carried; .dev/ holds stripped builds of the patched tree:
# flash_probe (the example), flash_tests (target/release/deps/flash-*) and seqk).
# Knobs: SEQK_X_GEMM = old (as committed) | bk32old (old, depth 32 a step) | prefetch (reads
# one step ahead; the patch's default; tried on 2026-11-25 together with other changes, 3-5%
# slower, never alone) | dbuf (prefetch + two workgroup buffers, one barrier a step) | bk32
# (prefetch, depth 32 a step); SEQK_X_FOLD = most KV parts whose scan the output pass folds
# in (0 = the scan pass always runs; 8 = the patch's default).
# 1. Every FLASH GPU test per variant, the fold forced on. 2. Fresh-process timings, two
# rounds, of b = 1 calls at n 64 (fixed cost), 1K, 2K, 4K and 64K, causal and not.
for f in .gl/*.deb; do dpkg -x $f /; done >/dev/null 2>&1; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
mkdir -p target/release /work/main/target/release
cp .dev/seqk target/release/; cp .dev/seqk /work/main/target/release/
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv > $OUT/gpu.txt
for v in "old 100000" "bk32old 100000" "prefetch 100000" "dbuf 100000" "bk32 100000"; do
    set -- $v
    SEQK_REQUIRE_GPU=1 SEQK_X_GEMM=$1 SEQK_X_FOLD=$2 timeout 90 .dev/flash_tests \
        > $OUT/tests-$1-fold$2.txt 2>&1
    echo "gemm $1 fold $2: $(grep 'test result' $OUT/tests-$1-fold$2.txt)"
done
P=$OUT/probe.jsonl
# Per n, the (gemm fold kv) configurations worth timing there (kv "-" = the default target of
# 384 KV workgroups; the fold only applies with at most `fold` KV parts in the call). At 1K
# (4 chunks, 48 KV blocks each): kv 192 = no split, 4 parts to fold; default = 2 parts each,
# 8 to fold; kv 768 = 4 parts each, 16 to fold.
configs() {
    case $1 in
        64) echo "old,0,- old,8,- bk32old,8,- prefetch,8,- dbuf,8,- bk32,8,-" ;;
        1024) echo "old,0,- old,8,- old,8,192 old,16,768 bk32old,8,- prefetch,8,- dbuf,8,- bk32,8,-" ;;
        2048) echo "old,0,- old,8,- bk32old,8,-" ;;
        4096) echo "old,0,- old,8,- old,16,- bk32old,8,- prefetch,8,- dbuf,8,- bk32,8,-" ;;
        65536) echo "old,0,- bk32old,0,- prefetch,0,- dbuf,0,- bk32,0,-" ;;
    esac
}
for round in 1 2; do
    for n in 64 1024 2048 4096 65536; do for causal in 0 1; do
        for c in $(configs $n); do
            IFS=, read gemm fold kv <<< "$c"
            [ "$kv" = "-" ] && unset SEQK_X_KV || export SEQK_X_KV=$kv
            SEQK_X_GEMM=$gemm SEQK_X_FOLD=$fold timeout 30 .dev/flash_probe 1 $n $causal >> $P 2>> $OUT/log.txt
        done
        unset SEQK_X_KV
    done; done
done
python3 - $P <<'PY'
import json, sys, collections
rows = [json.loads(l) for l in open(sys.argv[1])]
t = collections.defaultdict(list)
for r in rows:
    t[(r["n"], r["causal"], r["gemm"], r["fold"], r["kv"] or "-")].append(r["us_per_call"])
print("n causal gemm fold kv: us per call, each round")
for k in sorted(t):
    print(*k, " ".join(f"{x:9.2f}" for x in t[k]))
PY
