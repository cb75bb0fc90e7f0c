#!/usr/bin/env python3
"""Plots time against n for FLASH and exact attention as an SVG (no dependencies).

Reads the JSON of `seqk bench flash --json` and, optionally, that of
`benches/peers/torch_peers.py --json flash` from the same run, and draws GPU time per call
against the sequence length on log-log axes.

    python3 benches/plot_flash.py BENCH.json [TORCH.json] --title "..." -o OUT.svg
"""
import argparse
import json
import math
import re

W, H = 760, 500
LEFT, RIGHT, TOP, BOTTOM = 70, 250, 40, 60
COLOURS = ["#1f77b4", "#1f77b4", "#d62728", "#d62728", "#2ca02c", "#2ca02c", "#9467bd", "#9467bd"]


def series(bench, torch):
    """(label, dashed, [(n, ms)]) for each curve."""
    out = {}

    def add(label, n, ms):
        out.setdefault(label, []).append((n, ms))

    for r in bench["results"]:
        m = re.search(r"n(\d+)", r["case"])
        # b > 1 rows (the batched series) are not curves against n at b = 1.
        if not m or r["kernel"] not in ("flash", "attention") or re.match(r"b\d+ ", r["case"]):
            continue
        # Of the attention rows, only the h12 d64 series run beside FLASH (a full
        # `seqk bench --json` also holds the attention family's own prefill and decode rows).
        if r["kernel"] == "attention" and not r["case"].startswith("h12 d64 n"):
            continue
        causal = " causal" if "causal" in r["case"] else ""
        name = "seqk FLASH f32" if r["kernel"] == "flash" else "seqk exact attention f32"
        # Without timestamps (`clock`: wall) there is no GPU time; the wall time stands in.
        ms = r["gpu_ms"] if r.get("gpu_ms") is not None else r["wall_ms"]
        add(name + causal, int(m.group(1)), ms)
    for r in (torch or {}).get("results", []):
        m = re.search(r" n(\d+)", r["case"])
        if r["kernel"] != "flash" or not m:
            continue
        causal = " causal" if "causal" in r["case"] else ""
        if r["case"].startswith("torch sdpa bf16"):
            add("torch SDPA bf16" + causal, int(m.group(1)), r["ms"])
        elif r["case"].startswith("torch flash matmuls f32"):
            add("torch FLASH matmuls f32" + causal, int(m.group(1)), r["ms"])
    order = [
        "seqk FLASH f32", "seqk FLASH f32 causal",
        "seqk exact attention f32", "seqk exact attention f32 causal",
        "torch SDPA bf16", "torch SDPA bf16 causal",
        "torch FLASH matmuls f32", "torch FLASH matmuls f32 causal",
    ]
    return [(k, k.endswith("causal"), sorted(out[k])) for k in order if k in out]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bench")
    ap.add_argument("torch", nargs="?")
    ap.add_argument("--title", default="FLASH vs exact attention")
    ap.add_argument("-o", "--out", required=True)
    args = ap.parse_args()
    bench = json.load(open(args.bench))
    torch = json.load(open(args.torch)) if args.torch else None
    curves = series(bench, torch)
    ns = [n for _, _, pts in curves for n, _ in pts]
    ts = [t for _, _, pts in curves for _, t in pts]
    x0, x1 = math.log2(min(ns)), math.log2(max(ns))
    y0, y1 = math.floor(math.log10(min(ts))), math.ceil(math.log10(max(ts)))
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def px(n):
        return LEFT + (math.log2(n) - x0) / max(x1 - x0, 1e-9) * pw

    def py(t):
        return TOP + (y1 - math.log10(t)) / max(y1 - y0, 1e-9) * ph

    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="14">{args.title}</text>',
    ]
    for e in range(y0, y1 + 1):
        y = py(10.0**e)
        svg.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + pw}" y2="{y:.1f}" stroke="#ddd"/>')
        label = f"{10.0**e:g}"
        svg.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
    for n in sorted(set(ns)):
        x = px(n)
        svg.append(f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{TOP + ph}" stroke="#eee"/>')
        svg.append(f'<text x="{x:.1f}" y="{TOP + ph + 18}" text-anchor="middle">{n // 1024}K</text>')
    svg.append(f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>')
    svg.append(f'<text x="{LEFT + pw / 2}" y="{H - 18}" text-anchor="middle">sequence length n (tokens)</text>')
    svg.append(
        f'<text x="18" y="{TOP + ph / 2}" text-anchor="middle" '
        f'transform="rotate(-90 18 {TOP + ph / 2})">GPU time per call (ms, log scale)</text>'
    )
    for i, (label, dashed, pts) in enumerate(curves):
        colour = COLOURS[i % len(COLOURS)]
        dash = ' stroke-dasharray="5,4"' if dashed else ""
        path = " ".join(f"{px(n):.1f},{py(t):.1f}" for n, t in pts)
        svg.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        for n, t in pts:
            svg.append(f'<circle cx="{px(n):.1f}" cy="{py(t):.1f}" r="3" fill="{colour}"/>')
        ly = TOP + 10 + 20 * i
        lx = LEFT + pw + 14
        svg.append(f'<line x1="{lx}" y1="{ly}" x2="{lx + 26}" y2="{ly}" stroke="{colour}" stroke-width="2"{dash}/>')
        svg.append(f'<text x="{lx + 32}" y="{ly + 4}">{label}</text>')
    svg.append("</svg>")
    with open(args.out, "w") as f:
        f.write("\n".join(svg) + "\n")


if __name__ == "__main__":
    main()
