//! CPU f64 reference of FLASH mixed-chunk attention, written chunk by chunk as the contract
//! reads (`kernels::flash`), plus the naive full GAU attention it reduces to when one chunk
//! covers the sequence. Fused RoPE goes through the RoPE family's reference.

use crate::error::{Error, Result};
use crate::kernels::flash::{flash_shape, FlashOptions, FlashShape, LinNorm};
use crate::reference::rope::rope;

/// Host inputs of a FLASH call (C order): qq, kq, ql, kl `[b, n, s]`, v `[b, n, e]`, optional
/// gate `[b, n, e]`, bias `[C, C]` and key mask `[b, n]` (true = keep).
#[derive(Clone, Copy, Debug)]
pub struct FlashHost<'a> {
    /// `[b, n, s]`.
    pub qq: &'a [f32],
    /// `[b, n, s]`.
    pub kq: &'a [f32],
    /// `[b, n, s]`.
    pub ql: &'a [f32],
    /// `[b, n, s]`.
    pub kl: &'a [f32],
    /// `[b, n, e]`.
    pub v: &'a [f32],
    /// `[b, n, e]`.
    pub gate: Option<&'a [f32]>,
    /// `[C, C]`.
    pub bias: Option<&'a [f32]>,
    /// `[b, n]`.
    pub key_mask: Option<&'a [bool]>,
    /// `[b, n, s, e]` as numbers.
    pub dims: [usize; 4],
}

impl FlashHost<'_> {
    /// Checks shapes and data lengths against `opts`.
    pub fn shape(&self, opts: &FlashOptions) -> Result<FlashShape> {
        let [b, n, s, e] = self.dims;
        let qk = [b, n, s];
        let ve = [b, n, e];
        let bias = [opts.chunk, opts.chunk];
        let mask = [b, n];
        let sh = flash_shape(
            [&qk; 4].map(|x| &x[..]),
            &ve,
            self.gate.map(|_| &ve[..]),
            self.bias.map(|_| &bias[..]),
            self.key_mask.map(|_| &mask[..]),
            opts,
        )?;
        let lens = [
            (self.qq.len(), b * n * s),
            (self.kq.len(), b * n * s),
            (self.ql.len(), b * n * s),
            (self.kl.len(), b * n * s),
            (self.v.len(), b * n * e),
            (self.gate.map_or(b * n * e, <[f32]>::len), b * n * e),
            (
                self.bias.map_or(opts.chunk.pow(2), <[f32]>::len),
                opts.chunk.pow(2),
            ),
            (self.key_mask.map_or(b * n, <[bool]>::len), b * n),
        ];
        if lens.iter().any(|(got, want)| got != want) {
            return Err(Error::shape(
                "flash reference: data length does not match its shape",
            ));
        }
        Ok(sh)
    }
}

fn widen(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&a| a as f64).collect()
}

/// FLASH mixed-chunk attention in f64: `[b, n, e]`.
pub fn flash(x: &FlashHost<'_>, opts: &FlashOptions) -> Result<Vec<f64>> {
    let FlashShape {
        b,
        n,
        s,
        e,
        chunk,
        groups,
    } = x.shape(opts)?;
    let rotate = |t: &[f32]| -> Result<Vec<f64>> {
        match &opts.rope {
            Some(r) => rope(&widen(t), [b, n, 1, s], None, &r.rope_options()),
            None => Ok(widen(t)),
        }
    };
    let (qq, kq, ql, kl) = (rotate(x.qq)?, rotate(x.kq)?, rotate(x.ql)?, rotate(x.kl)?);
    let v = widen(x.v);
    let kappa = opts.kappa() as f64;
    let valid = |bi: usize, j: usize| x.key_mask.is_none_or(|m| m[bi * n + j]);
    let dot = |a: &[f64], bb: &[f64]| a.iter().zip(bb).map(|(p, q)| p * q).sum::<f64>();
    let mut out = vec![0.0f64; b * n * e];
    for bi in 0..b {
        fn row(t: &[f64], at: usize, w: usize) -> &[f64] {
            &t[at * w..(at + 1) * w]
        }
        let base = bi * n;
        // Per chunk: KV_g = sum over valid keys of kl_j^T v_j, and the number of valid keys.
        let mut kv = vec![vec![0.0f64; s * e]; groups];
        let mut count = vec![0usize; groups];
        for j in 0..n {
            if !valid(bi, j) {
                continue;
            }
            let g = j / chunk;
            count[g] += 1;
            let (k, vv) = (row(&kl, base + j, s), row(&v, base + j, e));
            for a in 0..s {
                for c in 0..e {
                    kv[g][a * e + c] += k[a] * vv[c];
                }
            }
        }
        let total_count: usize = count.iter().sum();
        let mut total = vec![0.0f64; s * e];
        for h in &kv {
            total.iter_mut().zip(h).for_each(|(a, x)| *a += x);
        }
        // Running exclusive prefix of the chunks' KV and counts (the causal state).
        let mut prefix = vec![0.0f64; s * e];
        let mut prefix_count = 0usize;
        for g in 0..groups {
            let (sum, summed) = if opts.causal {
                (&prefix, prefix_count)
            } else {
                (&total, total_count)
            };
            let inv = |c: usize| if c > 0 { 1.0 / c as f64 } else { 0.0 };
            let z = match (opts.lin_scale, opts.lin_norm) {
                (Some(z), _) => z as f64,
                (None, LinNorm::Chunk) => 1.0 / chunk as f64,
                (None, LinNorm::Length) => inv(total_count),
                (None, LinNorm::Prefix) => inv(summed),
            };
            let c0 = g * chunk;
            let c1 = (c0 + chunk).min(n);
            for i in c0..c1 {
                let mut y = vec![0.0f64; e];
                let q = row(&qq, base + i, s);
                for j in c0..c1 {
                    if !valid(bi, j) || (opts.causal && j > i) {
                        continue;
                    }
                    let mut score = kappa * dot(q, row(&kq, base + j, s));
                    if let Some(bias) = x.bias {
                        score += bias[(i - c0) * chunk + (j - c0)] as f64;
                    }
                    let a = opts.attn_fn.apply(score);
                    let vv = row(&v, base + j, e);
                    y.iter_mut().zip(vv).for_each(|(o, x)| *o += a * x);
                }
                let q = row(&ql, base + i, s);
                for (c, o) in y.iter_mut().enumerate() {
                    let lin: f64 = (0..s).map(|a| q[a] * sum[a * e + c]).sum();
                    *o += z * lin;
                    if let Some(gate) = x.gate {
                        *o *= gate[(bi * n + i) * e + c] as f64;
                    }
                }
                out[(bi * n + i) * e..(bi * n + i + 1) * e].copy_from_slice(&y);
            }
            prefix.iter_mut().zip(&kv[g]).for_each(|(a, x)| *a += x);
            prefix_count += count[g];
        }
    }
    Ok(out)
}

/// Full (unchunked) GAU attention `relu2(q k^T / n) v` in f64, for `q`, `k` `[b, n, s]` and
/// `v` `[b, n, e]`: what FLASH equals with C >= n, kappa = 1/n and no linear branch.
pub fn gau(q: &[f32], k: &[f32], v: &[f32], dims: [usize; 4]) -> Vec<f64> {
    let [b, n, s, e] = dims;
    let mut out = vec![0.0f64; b * n * e];
    for bi in 0..b {
        for i in 0..n {
            for j in 0..n {
                let qk: f64 = (0..s)
                    .map(|a| q[(bi * n + i) * s + a] as f64 * k[(bi * n + j) * s + a] as f64)
                    .sum();
                let w = (qk / n as f64).max(0.0).powi(2);
                for c in 0..e {
                    out[(bi * n + i) * e + c] += w * v[(bi * n + j) * e + c] as f64;
                }
            }
        }
    }
    out
}
