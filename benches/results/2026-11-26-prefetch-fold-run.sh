#!/bin/bash
# Device script for benches/results/2026-11-26-prefetch-fold-experiment.patch (run from the
# repository root with .gl/ and .dev/ carried; .dev/ holds stripped builds of the patched tree:
# flash_probe and pipeline_stats (the examples), flash_tests (target/release/deps/flash-*)
# and seqk).
# Knobs: SEQK_X_GEMM = old (as committed) | bk32old (old, depth 32 a step) | prefetch (reads
# one step ahead; the patch's default; tried on 2026-11-25 together with other changes, 3-5%
# slower, never alone) | dbuf (prefetch + two workgroup buffers, one barrier a step) | bk32
# (prefetch, depth 32 a step); SEQK_X_FOLD = most KV parts whose scan the output pass folds
# in (0 = the scan pass always runs; 8 = the patch's default); SEQK_X_CHECKS = which of naga's
# runtime checks the shader modules drop (noloop: the loop-bounding counters naga adds to
# every loop; nobounds: those and the index clamps; none: also the integer-division guards;
# unset: all kept, as committed).
# 1. Every FLASH GPU test per variant, the fold forced on, and the driver's statistics of each
# shader variant (.dev/pipeline_stats: register count etc.). 2. Fresh-process timings, two
# rounds (the second only at 1K and 64K), of b = 1 calls at n 64 (fixed cost), 1K, 2K, 4K
# and 64K, causal and not; between the rounds `seqk bench --quick` of every kernel with all
# checks and with none.
for f in .gl/*.deb; do dpkg -x $f /; done >/dev/null 2>&1; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
mkdir -p target/release /work/main/target/release
cp .dev/seqk target/release/; cp .dev/seqk /work/main/target/release/
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv > $OUT/gpu.txt
for v in "old 100000 -" "old 100000 none" "bk32old 100000 -" "prefetch 100000 -" "dbuf 100000 -" "bk32 100000 -"; do
    set -- $v
    [ "$3" = "-" ] && unset SEQK_X_CHECKS || export SEQK_X_CHECKS=$3
    SEQK_REQUIRE_GPU=1 SEQK_X_GEMM=$1 SEQK_X_FOLD=$2 timeout 90 .dev/flash_tests \
        > $OUT/tests-$1-fold$2-checks$3.txt 2>&1
    echo "gemm $1 fold $2 checks $3: $(grep 'test result' $OUT/tests-$1-fold$2-checks$3.txt)"
done
unset SEQK_X_CHECKS
# What the driver's compiler made of each variant (register count etc.), for occupancy.
S=$OUT/pipeline-stats.jsonl
for gemm in old bk32old prefetch dbuf bk32; do for checks in - noloop none; do
    [ "$checks" = "-" ] && unset SEQK_X_CHECKS || export SEQK_X_CHECKS=$checks
    SEQK_X_GEMM=$gemm timeout 60 .dev/pipeline_stats flash >> $S 2>> $OUT/log.txt
done; done
for checks in - none; do
    [ "$checks" = "-" ] && unset SEQK_X_CHECKS || export SEQK_X_CHECKS=$checks
    SEQK_X_GEMM=old timeout 120 .dev/pipeline_stats softmax attention rope gibbs copy >> $S 2>> $OUT/log.txt
done
unset SEQK_X_CHECKS
python3 - $S <<'PY'
import json, sys
for l in open(sys.argv[1]):
    r = json.loads(l)
    keep = {k: v for k, v in r.items() if any(w in k.lower() for w in ("regist", "spill", "local", "shared", "stack"))}
    if r["shader"].startswith("flash"):
        print(r["shader"], r.get("gemm"), r.get("checks") or "-", r.get("subgroup"), keep)
PY
P=$OUT/probe.jsonl
# Per n, the (gemm fold kv checks) configurations worth timing there (kv "-" = the default
# target of 384 KV workgroups; the fold only applies with at most `fold` KV parts in the call;
# checks "-" = all kept). At 1K
# (4 chunks, 48 KV blocks each): kv 192 = no split, 4 parts to fold; default = 2 parts each,
# 8 to fold; kv 768 = 4 parts each, 16 to fold.
configs() {
    case $1 in
        64) echo "old,0,-,- old,8,-,- old,8,-,none bk32old,8,-,- prefetch,8,-,- dbuf,8,-,- bk32,8,-,-" ;;
        1024) echo "old,0,-,- old,8,-,- old,0,-,none old,8,-,noloop old,8,-,nobounds old,8,-,none prefetch,8,-,none old,8,192,- old,16,768,- bk32old,8,-,- prefetch,8,-,- dbuf,8,-,- bk32,8,-,-" ;;
        2048) echo "old,0,-,- old,8,-,- bk32old,8,-,-" ;;
        4096) echo "old,0,-,- old,8,-,- old,8,-,none old,16,-,- bk32old,8,-,- prefetch,8,-,- dbuf,8,-,- bk32,8,-,-" ;;
        65536) echo "old,0,-,- old,0,-,noloop old,0,-,none prefetch,0,-,none bk32old,0,-,- prefetch,0,-,- dbuf,0,-,- bk32,0,-,-" ;;
    esac
}
for round in 1 2; do
    ns="64 1024 2048 4096 65536"
    [ $round = 2 ] && ns="1024 65536"
    for n in $ns; do for causal in 0 1; do
        for c in $(configs $n); do
            IFS=, read gemm fold kv checks <<< "$c"
            [ "$kv" = "-" ] && unset SEQK_X_KV || export SEQK_X_KV=$kv
            [ "$checks" = "-" ] && unset SEQK_X_CHECKS || export SEQK_X_CHECKS=$checks
            SEQK_X_GEMM=$gemm SEQK_X_FOLD=$fold timeout 30 .dev/flash_probe 1 $n $causal >> $P 2>> $OUT/log.txt
        done
        unset SEQK_X_KV SEQK_X_CHECKS
    done; done
    if [ $round = 1 ]; then
        for checks in - none; do
            [ "$checks" = "-" ] && unset SEQK_X_CHECKS || export SEQK_X_CHECKS=$checks
            timeout 150 .dev/seqk bench --quick --json > $OUT/bench-quick-checks$checks.json 2>> $OUT/log.txt
            echo "bench --quick checks $checks: rc $?"
        done
        unset SEQK_X_CHECKS
    fi
done
python3 - $P <<'PY'
import json, sys, collections
rows = [json.loads(l) for l in open(sys.argv[1])]
t = collections.defaultdict(list)
for r in rows:
    t[(r["n"], r["causal"], r["gemm"], r["fold"], r["kv"] or "-", r.get("checks") or "-")].append(r["us_per_call"])
print("n causal gemm fold kv checks: us per call, each round")
for k in sorted(t):
    print(*k, " ".join(f"{x:9.2f}" for x in t[k]))
PY
