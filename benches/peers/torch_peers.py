#!/usr/bin/env python3
"""PyTorch peers of `seqk bench`, timed on the same GPU with CUDA events.

Prints a table (or --json) with the same case names and the same bandwidth metric as
`seqk bench`: bytes read + written per call / time, and the ratio to a plain device copy
(`dst.copy_(src)`) of 256 MiB measured in the same run.

    python3 benches/peers/torch_peers.py [--json] [--quick]
"""
import argparse
import json
import sys

import torch


def time_ms(fn, warmup=3, samples=10, iters=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(samples):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end) / iters)
    out.sort()
    return out[len(out) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("torch_peers: no CUDA device")
    dev = torch.device("cuda")
    rows = []

    nbytes = (32 if args.quick else 256) << 20
    src = torch.empty(nbytes // 4, device=dev, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    copy_gbps = 2 * nbytes / ms / 1e6
    rows.append({"kernel": "copy", "case": f"torch copy_ {nbytes >> 20} MiB", "ms": ms, "gbps": copy_gbps})

    for r, n in [(4096, 1024), (4096, 4096), (1024, 32768), (64, 1 << 20)]:
        r = max(r // 16, 4) if args.quick else r
        x = torch.empty(r, n, device=dev, dtype=torch.float32).uniform_(-4, 4)
        ms = time_ms(lambda: torch.softmax(x, dim=-1))
        gbps = 2 * x.numel() * 4 / ms / 1e6
        rows.append({"kernel": "softmax", "case": f"torch f32 {r}x{n}", "ms": ms, "gbps": gbps})

    for row in rows:
        row["copy_ratio"] = row["gbps"] / copy_gbps
    if args.json:
        print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": rows}, indent=1))
    else:
        print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}")
        for row in rows:
            print(f"{row['kernel']:<10} {row['case']:<36} {row['ms']:>10.3f} {row['gbps']:>9.1f} {row['copy_ratio']:>7.2f}")


if __name__ == "__main__":
    main()
