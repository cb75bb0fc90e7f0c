//! CPU f64 reference of exact attention: the same contract as `kernels::attention`, written
//! naively (full score matrix per row, plain softmax).

use crate::error::{Error, Result};
use crate::kernels::attention::{attention_shape, AttentionOptions, AttnShape, HostMask};
use crate::tensor::checked_numel;

/// The result of the reference: the output in the layout of `q` (with `dv` as the last axis)
/// and the log-sum-exp of the scores (scaled, soft-capped, plus an additive mask's terms),
/// `[b, hq, m]`, `-inf` for rows without a valid key.
pub struct AttentionOutput {
    /// `[b, hq, m, dv]` (or `[b, m, hq, dv]` for the bshd layout).
    pub out: Vec<f64>,
    /// `[b, hq, m]`.
    pub lse: Vec<f64>,
}

/// Naive softmax attention in f64. `mask` is `(values, shape)`: booleans (true = keep) or
/// terms added to the soft-capped scores (-inf hides the key).
pub fn attention(
    q: (&[f32], &[usize]),
    k: (&[f32], &[usize]),
    v: (&[f32], &[usize]),
    mask: Option<(HostMask<'_>, &[usize])>,
    opts: &AttentionOptions,
) -> Result<AttentionOutput> {
    // Lengths first: a shape whose product overflows never reaches the index arithmetic.
    let fits = |len: usize, sh: &[usize]| checked_numel(sh) == Some(len);
    if !fits(q.0.len(), q.1)
        || !fits(k.0.len(), k.1)
        || !fits(v.0.len(), v.1)
        || mask.is_some_and(|(m, sh)| !fits(m.len(), sh))
    {
        return Err(Error::shape(
            "attention reference: data length does not match its shape",
        ));
    }
    let s = attention_shape(q.1, k.1, v.1, mask.map(|m| m.1), opts)?;
    let AttnShape {
        b, hq, m, d, dv, ..
    } = s;
    let scale = s.scale as f64;
    let cap = opts.softcap as f64;
    let mut out = vec![0.0f64; b * hq * m * dv];
    let mut lse = vec![f64::NEG_INFINITY; b * hq * m];
    for bi in 0..b {
        for h in 0..hq {
            let hk = h / s.group;
            for i in 0..m {
                // Scores of the keys row i may see: of its batch's keys (kv_lens), those the
                // mask and causality leave.
                let mut scores: Vec<(usize, f64)> = Vec::new();
                for j in 0..s.keys(bi) {
                    let Some(term) = s.mask_term(bi, h, i, j, mask.map(|m| m.0)) else {
                        continue;
                    };
                    let dot: f64 = (0..d)
                        .map(|c| {
                            q.0[s.q.index(bi, h, i, c)] as f64 * k.0[s.k.index(bi, hk, j, c)] as f64
                        })
                        .sum();
                    let mut x = scale * dot;
                    if cap > 0.0 {
                        x = cap * (x / cap).tanh();
                    }
                    scores.push((j, x + term));
                }
                if scores.is_empty() {
                    continue; // fully masked: zeros, lse = -inf
                }
                let max = scores.iter().fold(f64::NEG_INFINITY, |a, &(_, x)| a.max(x));
                let sum: f64 = scores.iter().map(|&(_, x)| (x - max).exp()).sum();
                lse[(bi * hq + h) * m + i] = max + sum.ln();
                for &(j, x) in &scores {
                    let p = (x - max).exp() / sum;
                    for c in 0..dv {
                        out[s.o.index(bi, h, i, c)] += p * v.0[s.v.index(bi, hk, j, c)] as f64;
                    }
                }
            }
        }
    }
    Ok(AttentionOutput { out, lse })
}
