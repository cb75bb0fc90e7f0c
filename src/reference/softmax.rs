//! CPU f64 reference of the softmax family: the same contract as `kernels::softmax`,
//! written for clarity.

use crate::error::Result;
use crate::kernels::softmax::{row_shape, SoftmaxOptions};

/// Softmax (or log-softmax) of `x` with `shape` over the last axis, in f64.
///
/// Masked entries (and entries outside the causal band) give 0, or -inf for log-softmax;
/// a row with no valid entry gives zeros (all -inf for log-softmax).
pub fn softmax(
    x: &[f32],
    shape: &[usize],
    mask: Option<&[bool]>,
    opts: &SoftmaxOptions,
) -> Result<Vec<f64>> {
    let s = row_shape(shape, mask.map(|_| shape), opts)?;
    if x.len() != s.rows * s.n || mask.is_some_and(|m| m.len() != x.len()) {
        return Err(crate::Error::shape(format!(
            "softmax reference: data length does not match shape {shape:?}"
        )));
    }
    let alpha = opts.scale as f64 / opts.temperature as f64;
    let mut out = vec![0.0f64; x.len()];
    for r in 0..s.rows {
        let i = r % s.m;
        let valid = |j: usize| {
            mask.is_none_or(|m| m[r * s.n + j])
                && (!opts.causal || (j as i64) <= i as i64 + s.n as i64 - s.m as i64)
        };
        let row: Vec<Option<f64>> = (0..s.n)
            .map(|j| valid(j).then(|| x[r * s.n + j] as f64 * alpha))
            .collect();
        let count = row.iter().flatten().count();
        let f = if opts.softmax_plus {
            (count.max(16) as f64).ln() / 512f64.ln()
        } else {
            1.0
        };
        let max = row
            .iter()
            .flatten()
            .fold(f64::NEG_INFINITY, |a, &b| a.max(b));
        let sum: f64 = row.iter().flatten().map(|v| (f * (v - max)).exp()).sum();
        for (j, v) in row.iter().enumerate() {
            out[r * s.n + j] = match (v, opts.log) {
                (Some(v), false) => (f * (v - max)).exp() / sum,
                (Some(v), true) => f * (v - max) - sum.ln(),
                (None, false) => 0.0,
                (None, true) => f64::NEG_INFINITY,
            };
        }
    }
    Ok(out)
}
