#!/usr/bin/env bash
# Times FLASH variants of the crate against each other on a GPU machine lent for measurement,
# in one command there (that machine has no Rust toolchain, so the binaries are built here and
# copied along in .dev/, gzipped: only so do five variants of two binaries fit the 64 MiB that
# may be copied along).
#
#   benches/device/flash_variants.sh prepare [NAME=PATCH[,PATCH...] ...]   # here
#   benches/device/flash_variants.sh run                                  # there
#
# prepare: downloads the Vulkan/GL loader packages into .gl/ and builds, for HEAD (named
# "head") and for each NAME, HEAD with the patches applied in order (`git am -3`), a stripped
# release `seqk` and the FLASH test binary into .dev/NAME/. Without arguments the variants are
# the unmeasured FLASH patches kept in benches/results, each on top of the ones before it.
#
# run (on the GPU machine, with .gl and .dev copied along; about 560 s): for each variant,
# `seqk verify` and the FLASH GPU tests, then `seqk bench flash --json` twice, the variants
# interleaved (ABC ABC) and each run in a fresh process (a long-lived process was seen to drift
# after large allocations); then the torch peers once, and HEAD's `seqk bench attention` beside
# torch's attention peers. Everything lands in $OUT. ROUNDS=0 with OUT set makes a dry run of
# the rest on any machine.
set -euo pipefail
cd "$(dirname "$0")/../.."

prepare() {
    mkdir -p .gl .dev /tmp/amd64/partial
    if ! ls .gl/*.deb >/dev/null 2>&1; then
        local o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
        # shellcheck disable=SC2086
        apt-get $o update -qq
        # shellcheck disable=SC2086
        (cd .gl && apt-get $o download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
    fi
    local specs=("$@")
    if [ ${#specs[@]} -eq 0 ]; then
        local chain="" p
        for p in noloop fold constidx prefetch; do
            chain="${chain:+$chain,}benches/results/2026-11-26-land-$p.patch"
            specs+=("$p=$chain")
        done
    fi
    rm -rf .dev/* && build head ""
    local spec
    for spec in "${specs[@]}"; do
        build "${spec%%=*}" "${spec#*=}"
    done
    du -sh .dev .gl
}

# build NAME PATCHES: HEAD plus PATCHES (comma-separated) in a scratch worktree; one target
# directory for all variants, so only the crate itself rebuilds.
build() {
    local name=$1 patches=$2 tree=/tmp/seqk-variant-$1 root p list
    root=$(pwd)
    git worktree remove --force "$tree" 2>/dev/null || true
    git worktree prune && rm -rf "$tree"
    git worktree add -q --detach "$tree" HEAD
    if [ -n "$patches" ]; then
        IFS=, read -ra list <<<"$patches"
        for p in "${list[@]}"; do
            # Relative to the repository root, or absolute.
            case $p in /*) ;; *) p=$root/$p ;; esac
            (cd "$tree" && git -c user.name=variant -c user.email=variant@localhost am -q -3 "$p")
        done
    fi
    (
        cd "$tree"
        export CARGO_TARGET_DIR=/tmp/seqk-variant-target
        cargo build -q --release --bin seqk
        local test
        test=$(cargo test -q --release --test flash --no-run --message-format=json |
            python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "flash":
        print(m["executable"])')
        mkdir -p "$root/.dev/$name"
        cp "$CARGO_TARGET_DIR/release/seqk" "$test" "$root/.dev/$name/"
        mv "$root/.dev/$name/$(basename "$test")" "$root/.dev/$name/flash-tests"
        strip "$root/.dev/$name/seqk" "$root/.dev/$name/flash-tests"
        gzip -9 "$root/.dev/$name/seqk" "$root/.dev/$name/flash-tests"
        git log --oneline -1 >"$root/.dev/$name/commit.txt"
    )
    git worktree remove --force "$tree"
    echo "built $name: $(cat .dev/"$name"/commit.txt)"
}

run() {
    local out=${OUT:-/tmp/seqk-out} start=$SECONDS v
    mkdir -p "$out"
    # The GPU machine's driver lives under /usr/local/nvidia; elsewhere (a dry run) the
    # system's loader and devices serve.
    if [ -d /usr/local/nvidia ]; then
        for f in .gl/*.deb; do dpkg -x "$f" /; done
        ldconfig
        export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
    fi
    local log=$out/log.txt
    stamp() { echo "[$((SECONDS - start)) s] $*" | tee -a "$log"; }
    nvidia-smi --query-gpu=name,driver_version --format=csv >>"$log" 2>&1 || true
    # Unpacked outside .dev, which stays as carried (a dry run here must leave it small).
    local bin=/tmp/seqk-variant-bin variants=() f
    for v in .dev/*/; do variants+=("$(basename "$v")"); done
    for v in "${variants[@]}"; do
        mkdir -p "$bin/$v"
        cp ".dev/$v/commit.txt" "$bin/$v/"
        for f in seqk flash-tests; do
            gunzip -c ".dev/$v/$f.gz" >"$bin/$v/$f" && chmod +x "$bin/$v/$f"
        done
    done
    for v in "${variants[@]}"; do
        stamp "$v: $(cat "$bin/$v/commit.txt")"
        "$bin/$v/seqk" verify >"$out/$v-verify.txt" 2>&1 || stamp "$v: verify FAILED"
        # The CLI test runs seqk from the path it was built at.
        mkdir -p /tmp/seqk-variant-target/release && cp "$bin/$v/seqk" /tmp/seqk-variant-target/release/
        SEQK_REQUIRE_GPU=1 "$bin/$v/flash-tests" --test-threads 1 \
            >"$out/$v-tests.txt" 2>&1 || stamp "$v: tests FAILED"
    done
    local round
    for round in $(seq "${ROUNDS:-2}"); do
        for v in "${variants[@]}"; do
            stamp "bench $v round $round"
            "$bin/$v/seqk" bench flash --json >"$out/$v-bench_flash-$round.json" 2>>"$log" ||
                stamp "$v: bench FAILED"
        done
    done
    stamp torch
    python3 benches/peers/torch_peers.py --json flash >"$out/torch_flash.json" 2>>"$log" ||
        stamp "torch FAILED"
    # Exact attention (the register-blocked kernel, untimed on a GPU before) beside SDPA.
    stamp "attention"
    "$bin/head/seqk" bench attention --json >"$out/head-bench_attention.json" 2>>"$log" ||
        stamp "attention bench FAILED"
    python3 benches/peers/torch_peers.py --json attention >"$out/torch_attention.json" \
        2>>"$log" || stamp "torch attention FAILED"
    stamp done
}

case "${1:-}" in
prepare) shift && prepare "$@" ;;
run) run ;;
*) sed -n 2,17p "$0" && exit 2 ;;
esac
