#!/usr/bin/env python3
"""PyTorch peers of `seqk bench`, timed on the same GPU with CUDA events.

Prints a table (or --json) with the same metrics as `seqk bench`, each case named as seqk's
with a "torch <peer>" prefix (e.g. `torch sdpa f32 b4 h32 n512 d64` beside seqk's
`f32 b4 h32 n512 d64`):
memory-bound rows as bytes read + written per call / time and the ratio to a plain device copy
(`dst.copy_(src)`) of 256 MiB measured in the same run; attention as TFLOP/s
(4 b h m n d, halved for causal) and its decode rows as GB/s of reading K and V once.

Peers: torch.softmax; torch.nn.functional.scaled_dot_product_attention (f32 and bf16, causal
and not, the shapes of `seqk bench attention`, and h12 d64 n 1K..64K beside `seqk bench flash`; decode f32 and f16 with enable_gqa); Hugging
Face's eager RoPE (`q * cos + rotate_half(q) * sin` on q and k, as
transformers' `apply_rotary_pos_emb`), on the fused case of `seqk bench rope`.

    python3 benches/peers/torch_peers.py [--json] [--quick] [softmax|attention|rope|flash ...]
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
    ap.add_argument("kernels", nargs="*", help="families to run (default: all), as `seqk bench`")
    args = ap.parse_args()
    families = ("softmax", "attention", "rope", "flash")
    unknown = [k for k in args.kernels if k not in families]
    if unknown:
        ap.error(f"no torch peers for {', '.join(unknown)}; known: {', '.join(families)}")
    want = lambda k: not args.kernels or k in args.kernels
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

    for r, n in [] if not want("softmax") else [(4096, 1024), (4096, 4096), (1024, 32768), (64, 1 << 20)]:
        r = max(r // 16, 4) if args.quick else r
        x = torch.empty(r, n, device=dev, dtype=torch.float32).uniform_(-4, 4)
        ms = time_ms(lambda: torch.softmax(x, dim=-1))
        gbps = 2 * x.numel() * 4 / ms / 1e6
        rows.append({"kernel": "softmax", "case": f"torch f32 {r}x{n}", "ms": ms, "gbps": gbps})

    for name, family in [("attention", attention_rows), ("rope", rope_rows), ("flash", flash_peer_rows)]:
        if want(name):
            rows += family(dev, args.quick)

    for row in rows:
        row.setdefault("gbps", None)
        row.setdefault("tflops", None)
        row["copy_ratio"] = None if row["gbps"] is None else row["gbps"] / copy_gbps
    if args.json:
        print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": rows}, indent=1))
    else:
        print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}")
        print(f"{'kernel':<10} {'case':<48} {'time ms':>10} {'GB/s':>9} {'x copy':>7} {'TFLOP/s':>9}  us/token")
        def opt(v, prec):
            return "-" if v is None else f"{v:.{prec}f}"

        for row in rows:
            print(
                f"{row['kernel']:<10} {row['case']:<48} {row['ms']:>10.4g} {opt(row['gbps'], 1):>9}"
                f" {opt(row['copy_ratio'], 3):>7} {opt(row['tflops'], 3):>9}"
                + ("" if "us_per_item" not in row else f"  {row['us_per_item']:.4g}")
            )


def attention_shapes(quick):
    """(b, h, n, d) of `seqk bench attention` (m = n), in the same order."""
    ns = [256, 512] if quick else [512, 1024, 2048, 4096, 8192]
    bh = {512: (4, 32), 1024: (4, 16), 2048: (2, 16), 4096: (1, 16), 8192: (1, 8)}
    return [((1, 2) if quick else bh[n]) + (n, d) for d in (64, 128) for n in ns]


def attention_rows(dev, quick):
    import torch.nn.functional as F

    rows = []
    for b, h, n, d in attention_shapes(quick):
        for dtype, name in [(torch.float32, "f32"), (torch.bfloat16, "bf16")]:
            q, k, v = (torch.empty(b, h, n, d, device=dev, dtype=dtype).uniform_(-1, 1) for _ in range(3))
            for causal in (False, True):
                # m = n, so PyTorch's top-left causal alignment equals seqk's bottom-right one.
                ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
                flops = 4 * b * h * n * n * d / (2 if causal else 1)
                case = f"torch sdpa {name} b{b} h{h} n{n} d{d}" + (" causal" if causal else "")
                rows.append({"kernel": "attention", "case": case, "ms": ms, "tflops": flops / ms / 1e9})
            del q, k, v
    # Decode: one query per head over many keys, GQA without repeating K and V
    # (enable_gqa, torch >= 2.5); GB/s of reading K and V once.
    bq, hq, hkv, d = 1, 32, 8, 128
    n = 1024 if quick else 32768
    for dtype, name in [(torch.float16, "f16"), (torch.float32, "f32")]:
        q = torch.empty(bq, hq, 1, d, device=dev, dtype=dtype).uniform_(-1, 1)
        k, v = (torch.empty(bq, hkv, n, d, device=dev, dtype=dtype).uniform_(-1, 1) for _ in range(2))
        try:
            ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        except TypeError:
            print(f"torch_peers: sdpa has no enable_gqa in torch {torch.__version__}; no decode row", file=sys.stderr)
            break
        nbytes = (k.numel() + v.numel()) * k.element_size()
        case = f"torch sdpa decode {name} b{bq} h{hq}/{hkv} m1 n{n} d{d}"
        rows.append({"kernel": "attention", "case": case, "ms": ms, "gbps": nbytes / ms / 1e6})
    # The ragged batch of `seqk bench attention` (kv_lens: 8 sequences in a cache of 4096
    # filled to 512 .. 4096; quick, 4 in a cache of 1024 filled to 640 .. 32) as SDPA takes it:
    # a key-padding mask over the whole cache. GB/s of the filled keys' K and V, as seqk counts.
    n = 1024 if quick else 4096
    lens = [640, 256, 96, 32] if quick else [512 * i for i in range(1, 9)]
    bq = len(lens)
    q = torch.empty(bq, hq, 1, d, device=dev, dtype=torch.float16).uniform_(-1, 1)
    k, v = (torch.empty(bq, hkv, n, d, device=dev, dtype=torch.float16).uniform_(-1, 1) for _ in range(2))
    keep = torch.arange(n, device=dev)[None, :] < torch.tensor(lens, device=dev)[:, None]
    keep = keep[:, None, None, :]
    try:
        ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True))
        nbytes = 2 * sum(lens) * hkv * d * k.element_size()
        case = f"torch sdpa decode f16 ragged b{bq} h{hq}/{hkv} m1 n{min(lens)}..{max(lens)} d{d} (key-padding mask)"
        rows.append({"kernel": "attention", "case": case, "ms": ms, "gbps": nbytes / ms / 1e6})
    except TypeError:
        pass  # no enable_gqa: said above
    return rows


def flash_peer_rows(dev, quick):
    """SDPA at the shapes `seqk bench flash` sets FLASH beside: a Transformer of the same width
    (b 1, 12 heads of 64, m = n), n 1K..64K, bf16 and f32, causal and not. Rows carry the time
    per token as us_per_item, as `seqk bench flash --json` does."""
    import torch.nn.functional as F

    rows = []
    h, d = 12, 64
    for n in [1024, 2048] if quick else [1024 << i for i in range(7)]:
        for dtype, name in [(torch.bfloat16, "bf16"), (torch.float32, "f32")]:
            q, k, v = (torch.empty(1, h, n, d, device=dev, dtype=dtype).uniform_(-1, 1) for _ in range(3))
            for causal in (False, True):
                ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), samples=5, iters=3)
                flops = 4 * h * n * n * d / (2 if causal else 1)
                case = f"torch sdpa {name} h12 d64 n{n}" + (" causal" if causal else "")
                rows.append({"kernel": "flash", "case": case, "ms": ms, "tflops": flops / ms / 1e9,
                             "us_per_item": ms * 1e3 / n})
            del q, k, v
        rows += flash_einsum_rows(dev, n)
    return rows


def flash_einsum(qq, kq, ql, kl, v, chunk, causal):
    """FLASH (relu2, quad_scale 1/C, lin_norm chunk) in PyTorch matrix products, n a multiple
    of the chunk: the same mathematics as `seqk run flash` with those options."""
    b, n, s = qq.shape
    g = n // chunk
    qq, kq, ql, kl = (x.view(b, g, chunk, s) for x in (qq, kq, ql, kl))
    v = v.view(b, g, chunk, -1)
    a = torch.relu(qq @ kq.transpose(-1, -2) / chunk) ** 2
    if causal:
        a = a.tril()
    kv = kl.transpose(-1, -2) @ v  # [b, g, s, e]
    kv = kv.cumsum(1) - kv if causal else kv.sum(1, keepdim=True)
    return (a @ v + ql @ kv / chunk).view(b, n, -1)


def flash_einsum_rows(dev, n, s=128, e=1536, chunk=256):
    """The FLASH shapes of `seqk bench flash` in PyTorch matrix products (cuBLAS), f32 and bf16."""
    rows = []
    for dtype, name in [(torch.bfloat16, "bf16"), (torch.float32, "f32")]:
        qq, kq, ql, kl = (torch.empty(1, n, s, device=dev, dtype=dtype).uniform_(-1, 1) for _ in range(4))
        v = torch.empty(1, n, e, device=dev, dtype=dtype).uniform_(-1, 1)
        for causal in (False, True):
            ms = time_ms(lambda: flash_einsum(qq, kq, ql, kl, v, chunk, causal), samples=5, iters=3)
            # As seqk's count: causal needs no last-chunk KV and no chunk-0 linear term.
            c = min(chunk, n)
            kv_tokens, ql_tokens = (((n + chunk - 1) // chunk - 1) * c, n - c) if causal else (n, n)
            flops = n * 2 * c * (s + e) / (2 if causal else 1) + 2 * s * e * (kv_tokens + ql_tokens)
            case = f"torch flash matmuls {name} n{n} s{s} e{e} C{chunk}" + (" causal" if causal else "")
            rows.append({"kernel": "flash", "case": case, "ms": ms, "tflops": flops / ms / 1e9,
                         "us_per_item": ms * 1e3 / n})
        del qq, kq, ql, kl, v
    return rows


def rotate_half(x):
    """Hugging Face transformers' rotate_half (GPT-NeoX / Llama `half` style)."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """Hugging Face transformers' eager apply_rotary_pos_emb."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


def rope_rows(dev, quick):
    """The fused q+k case of `seqk bench rope` (bshd, half style, base 1e4), HF eager.

    cos/sin are computed once outside the timed call, as HF's rotary embedding module does
    once per forward for all layers. HF returns new tensors rather than rotating in place;
    the byte count is the one `seqk bench rope` uses (q and k read and written once plus an
    s x d/2 cos/sin table in f32), so the GB/s compare the same work.
    """
    b, s, hq, hkv, d = (1 if quick else 16), 1024, 32, 8, 128
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device=dev, dtype=torch.float32) / d))
    freqs = torch.outer(torch.arange(s, device=dev, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)  # [s, d]
    rows = []
    for dtype, name in [(torch.float16, "f16"), (torch.float32, "f32")]:
        q = torch.empty(b, s, hq, d, device=dev, dtype=dtype).uniform_(-1, 1)
        k = torch.empty(b, s, hkv, d, device=dev, dtype=dtype).uniform_(-1, 1)
        cos = emb.cos().to(dtype)[None].expand(b, s, d)
        sin = emb.sin().to(dtype)[None].expand(b, s, d)
        # bshd: cos/sin [b, s, d] broadcast over the heads axis 2.
        ms = time_ms(lambda: apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2))
        nbytes = 2 * (q.numel() + k.numel()) * q.element_size() + s * d // 2 * 8
        case = f"torch HF eager {name} q+k b={b} s={s} hq={hq} hkv={hkv} d={d}"
        rows.append({"kernel": "rope", "case": case, "ms": ms, "gbps": nbytes / ms / 1e6})
    return rows


if __name__ == "__main__":
    main()
