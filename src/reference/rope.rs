//! CPU f64 reference of the RoPE family: the same contract as `kernels::rope`, written for
//! clarity. Frequencies, positions and option checks are shared with the kernel
//! ([`RopeOptions::frequencies`], [`position_rows`]); the rotation itself is computed here in
//! f64 straight from `p * theta'_i`, with no table.

use crate::error::{Error, Result};
use crate::kernels::rope::{position_rows, Positions, RopeLayout, RopeOptions, RopeStyle};
use crate::tensor::shape_elements;

/// Rotates the dense tensor `x` of `shape` (`[b, s, h, d]` for bshd, `[b, h, s, d]` for bhsd)
/// in f64. Features past the rotary dim are copied unchanged.
pub fn rope(
    x: &[f64],
    shape: [usize; 4],
    positions: Option<&Positions>,
    opts: &RopeOptions,
) -> Result<Vec<f64>> {
    let [n0, n1, n2, d] = shape;
    if shape.contains(&0) || x.len() != shape_elements("rope reference", &shape)? {
        return Err(Error::shape(format!(
            "rope reference: {} values do not fill shape {shape:?}",
            x.len()
        )));
    }
    let r = opts.validate(d)?;
    let (b, s, h) = match opts.layout {
        RopeLayout::Bshd => (n0, n1, n2),
        RopeLayout::Bhsd => (n0, n2, n1),
    };
    let rows = position_rows(opts, b, s, positions)?;
    let current = rows.positions.iter().max().map_or(1, |&m| m as usize + 1);
    let (theta, mscale) = opts.frequencies(r, current)?;
    let sign = if opts.inverse { -1.0 } else { 1.0 };
    let mut out = x.to_vec();
    for bi in 0..b {
        for t in 0..s {
            let p = rows.get(bi, t, s) as f64;
            for hi in 0..h {
                let row = match opts.layout {
                    RopeLayout::Bshd => ((bi * s + t) * h + hi) * d,
                    RopeLayout::Bhsd => ((bi * h + hi) * s + t) * d,
                };
                for (i, th) in theta.iter().enumerate() {
                    let (ia, ib) = match opts.style {
                        RopeStyle::Half => (i, i + r / 2),
                        RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                    };
                    let angle = sign * p * th;
                    let (sn, cs) = angle.sin_cos();
                    let (a, bb) = (x[row + ia], x[row + ib]);
                    out[row + ia] = mscale * (a * cs - bb * sn);
                    out[row + ib] = mscale * (a * sn + bb * cs);
                }
            }
        }
    }
    Ok(out)
}
