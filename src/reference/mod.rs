//! CPU references of every kernel, in f64, written for clarity rather than speed. The GPU
//! kernels are tested against these.

pub mod attention;
pub mod copy;
pub mod flash;
pub mod gibbs;
pub mod rope;
pub mod softmax;

/// How far `got` is from the reference `want`, row by row: the largest absolute difference
/// divided by the row's largest finite reference magnitude (the "row scale" that the
/// tolerances of `seqk verify` and the tests are stated in). Infinite reference values must be
/// matched exactly; a mismatch, or a NaN on either side, gives `f64::INFINITY`.
pub fn row_error(got: &[f32], want: &[f64], row_len: usize) -> f64 {
    if got.len() != want.len() || row_len == 0 {
        return f64::INFINITY;
    }
    let mut worst = 0.0f64;
    for (g, w) in got.chunks(row_len).zip(want.chunks(row_len)) {
        let scale = w
            .iter()
            .filter(|v| v.is_finite())
            .fold(0.0f64, |a, v| a.max(v.abs()))
            .max(1e-30);
        for (&a, &b) in g.iter().zip(w) {
            let a = a as f64;
            // f64::max would skip a NaN difference: NaN on either side is a mismatch.
            if !b.is_finite() || !a.is_finite() {
                if a != b {
                    return f64::INFINITY;
                }
            } else {
                worst = worst.max((a - b).abs() / scale);
            }
        }
    }
    worst
}

/// Deterministic pseudo-random values in `[lo, hi)` (xorshift64), for tests, `seqk verify`
/// and benchmarks: the same seed gives the same data everywhere.
pub fn random_values(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            lo + (hi - lo) * ((s >> 40) as f32 / (1u64 << 24) as f32)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::row_error;

    #[test]
    fn row_error_counts_nan_on_either_side_and_matches_infinities() {
        assert_eq!(row_error(&[1.0, 2.0], &[1.0, 2.0], 2), 0.0);
        assert_eq!(row_error(&[1.0, f32::NAN], &[1.0, 2.0], 2), f64::INFINITY);
        assert_eq!(row_error(&[1.0, 2.0], &[1.0, f64::NAN], 2), f64::INFINITY);
        assert_eq!(
            row_error(&[1.0, f32::NAN], &[1.0, f64::NAN], 2),
            f64::INFINITY
        );
        assert_eq!(
            row_error(&[f32::NEG_INFINITY], &[f64::NEG_INFINITY], 1),
            0.0
        );
        assert_eq!(row_error(&[0.0], &[f64::NEG_INFINITY], 1), f64::INFINITY);
        assert!((row_error(&[1.5, 2.0], &[1.0, 2.0], 2) - 0.25).abs() < 1e-12);
    }
}
