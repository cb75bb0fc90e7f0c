//! CPU f64 reference of the Gibbs family: Philox-4x32-10, the chromatic Gibbs sampler on the
//! same random stream as the GPU, exact marginals by forward-backward (log space), an exact
//! forward-filter backward-sample sampler, logits sampling and the MH step. Written for
//! clarity, single-threaded.

use crate::error::{Error, Result};
use crate::kernels::gibbs::{
    chain_shape, check_tokens, logits_shape, mh_shape, ChainShape, GibbsOptions, MhOptions,
    SampleOptions,
};
use crate::tensor::checked_numel;

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// Philox-4x32-10 of `ctr` under `key`.
pub fn philox4x32_10(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = ctr;
    let mut k = key;
    for _ in 0..10 {
        let p0 = M0 as u64 * c[0] as u64;
        let p1 = M1 as u64 * c[2] as u64;
        c = [
            (p1 >> 32) as u32 ^ c[1] ^ k[0],
            p1 as u32,
            (p0 >> 32) as u32 ^ c[3] ^ k[1],
            p0 as u32,
        ];
        k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
    }
    c
}

/// The key of a 64-bit seed: (low word, high word).
pub fn seed_key(seed: u64) -> [u32; 2] {
    [seed as u32, (seed >> 32) as u32]
}

/// U = ((r >> 8) + 0.5) 2^-24, in (0, 1).
pub fn uniform(r: u32) -> f64 {
    ((r >> 8) as f64 + 0.5) * (1.0 / (1u64 << 24) as f64)
}

/// Gumbel draw -log(-log U).
pub fn gumbel(r: u32) -> f64 {
    -(-uniform(r).ln()).ln()
}

/// Pairwise potentials on the host.
#[derive(Clone, Debug)]
pub enum HostPairwise {
    /// W [V, V] row-major.
    Dense(Vec<f32>),
    /// W = A B^T with A, B [V, rank] row-major.
    Factored {
        /// A [V, rank].
        a: Vec<f32>,
        /// B [V, rank].
        b: Vec<f32>,
        /// r.
        rank: usize,
    },
}

/// A chain model on the host.
#[derive(Clone, Debug)]
pub struct HostModel {
    /// u, [L, V] or [b, L, V].
    pub unary: Vec<f32>,
    /// Shape of `unary`.
    pub unary_shape: Vec<usize>,
    /// W.
    pub pairwise: HostPairwise,
}

impl HostModel {
    fn vocab(&self) -> usize {
        *self.unary_shape.last().unwrap_or(&0)
    }

    /// Checks the model against tokens [b, L] and a clamp shape.
    pub fn shape(&self, tokens: &[usize], clamp: Option<&[usize]>) -> Result<ChainShape> {
        let v = self.vocab();
        let (pa, pb);
        let pairs: Vec<&[usize]> = match &self.pairwise {
            HostPairwise::Dense(w) => {
                pa = [w.len() / v.max(1), v];
                if w.len() != v * v {
                    return Err(Error::shape(format!(
                        "reference pairwise W has {} values, expected {v} x {v}",
                        w.len()
                    )));
                }
                vec![&pa]
            }
            HostPairwise::Factored { a, b, rank } => {
                pa = [a.len() / rank.max(&1), *rank];
                pb = [b.len() / rank.max(&1), *rank];
                if a.len() != v * rank || b.len() != v * rank {
                    return Err(Error::shape(format!(
                        "reference factors need {v} x {rank} values each, got {} and {}",
                        a.len(),
                        b.len()
                    )));
                }
                vec![&pa, &pb]
            }
        };
        let s = chain_shape(&self.unary_shape, &pairs, tokens, clamp)?;
        if checked_numel(&self.unary_shape) != Some(self.unary.len()) {
            return Err(Error::shape(
                "reference unary length does not match its shape",
            ));
        }
        Ok(s)
    }

    /// W[a, v] in f64.
    pub fn pair(&self, a: usize, v: usize) -> f64 {
        match &self.pairwise {
            HostPairwise::Dense(w) => w[a * self.vocab() + v] as f64,
            HostPairwise::Factored { a: fa, b: fb, rank } => (0..*rank)
                .map(|k| fa[a * rank + k] as f64 * fb[v * rank + k] as f64)
                .sum(),
        }
    }

    /// u[c, i, v] in f64 (c ignored for a shared unary).
    pub fn unary(&self, c: usize, i: usize, v: usize) -> f64 {
        let (l, vv) = (self.unary_shape[self.unary_shape.len() - 2], self.vocab());
        let c = if self.unary_shape.len() == 3 { c } else { 0 };
        self.unary[(c * l + i) * vv + v] as f64
    }

    /// Energy of token v at site i of chain c with neighbours from `row` (the chain's tokens).
    pub fn site_energy(&self, c: usize, row: &[u32], i: usize, v: usize) -> f64 {
        let mut e = self.unary(c, i, v);
        if i > 0 {
            e += self.pair(row[i - 1] as usize, v);
        }
        if i + 1 < row.len() {
            e += self.pair(v, row[i + 1] as usize);
        }
        e
    }

    /// score(x) = sum_i u[i, x_i] + sum_{i>=1} W[x_{i-1}, x_i] for chain c.
    pub fn score(&self, c: usize, row: &[u32]) -> f64 {
        (0..row.len())
            .map(|i| {
                let x = row[i] as usize;
                self.unary(c, i, x)
                    + if i > 0 {
                        self.pair(row[i - 1] as usize, x)
                    } else {
                        0.0
                    }
            })
            .sum()
    }
}

/// The new token of site i: argmax_v (e_v + T g_v), ties to the lowest v. The energies are
/// taken relative to their maximum first: where |e_v| is 2^53 T or more, adding T g_v in f64
/// would round the noise away.
fn draw_site(
    model: &HostModel,
    c: usize,
    row: &[u32],
    i: usize,
    t: f64,
    ctr: (u32, u32, u32),
    key: [u32; 2],
) -> u32 {
    let vocab = model.vocab();
    let energies: Vec<f64> = (0..vocab)
        .map(|v| model.site_energy(c, row, i, v))
        .collect();
    let top = finite_or_zero(energies.iter().copied().fold(f64::NEG_INFINITY, f64::max));
    let mut best = (f64::NEG_INFINITY, u32::MAX);
    let mut r = [0u32; 4];
    for (v, e) in energies.iter().enumerate() {
        if t > 0.0 && v % 4 == 0 {
            r = philox4x32_10([(v / 4) as u32, ctr.0, ctr.1, ctr.2], key);
        }
        let mut z = e - top;
        if t > 0.0 {
            z += t * gumbel(r[v % 4]);
        }
        if best.1 == u32::MAX || z > best.0 {
            best = (z, v as u32);
        }
    }
    best.1
}

/// The maximum the draws are taken relative to; an infinite one would make inf - inf = NaN of
/// the infinite value itself, so infinities are compared as they are.
fn finite_or_zero(top: f64) -> f64 {
    if top.is_finite() {
        top
    } else {
        0.0
    }
}

/// Best states and scores of a reference run.
#[derive(Clone, Debug, PartialEq)]
pub struct HostBest {
    /// [b, L].
    pub tokens: Vec<u32>,
    /// `[b]`.
    pub scores: Vec<f64>,
}

fn check_run(
    model: &HostModel,
    tokens: &[u32],
    shape: &[usize],
    clamp: Option<(&[bool], &[usize])>,
    opts: &GibbsOptions,
) -> Result<ChainShape> {
    opts.validate()?;
    let s = model.shape(shape, clamp.map(|c| c.1))?;
    if tokens.len() != s.chains * s.len {
        return Err(Error::shape(
            "reference tokens length does not match their shape",
        ));
    }
    if let Some((m, ms)) = clamp {
        if checked_numel(ms) != Some(m.len()) {
            return Err(Error::shape(
                "reference clamp length does not match its shape",
            ));
        }
    }
    check_tokens(tokens, s.vocab, "gibbs initial state")?;
    Ok(s)
}

fn clamped(s: &ChainShape, clamp: Option<(&[bool], &[usize])>, c: usize, i: usize) -> bool {
    match (clamp, s.clamp) {
        (Some((m, _)), Some(true)) => m[c * s.len + i],
        (Some((m, _)), _) => m[i],
        _ => false,
    }
}

/// Chromatic Gibbs sampling on the CPU, the same draws as the GPU kernel: `tokens` [b, L]
/// (shape `shape`) are updated in place; returns the best states with `opts.track_best`.
pub fn gibbs(
    model: &HostModel,
    tokens: &mut [u32],
    shape: &[usize],
    clamp: Option<(&[bool], &[usize])>,
    opts: &GibbsOptions,
) -> Result<Option<HostBest>> {
    let s = check_run(model, tokens, shape, clamp, opts)?;
    let key = seed_key(opts.seed);
    let (b, l) = (s.chains, s.len);
    let mut best = opts.track_best.then(|| HostBest {
        tokens: tokens.to_vec(),
        scores: (0..b)
            .map(|c| model.score(c, &tokens[c * l..(c + 1) * l]))
            .collect(),
    });
    for sweep in 0..opts.sweeps {
        let t = opts.temperature_at(sweep) as f64;
        let sw = opts.first_sweep + sweep;
        for parity in 0..2 {
            for c in 0..b {
                // Sites of one colour do not neighbour each other: updating them one after
                // another in place equals updating them all at once.
                for i in (parity..l).step_by(2) {
                    if clamped(&s, clamp, c, i) {
                        continue;
                    }
                    let row = &tokens[c * l..(c + 1) * l];
                    let x = draw_site(model, c, row, i, t, (i as u32, c as u32, sw), key);
                    tokens[c * l + i] = x;
                }
            }
        }
        if let Some(best) = &mut best {
            for c in 0..b {
                let row = &tokens[c * l..(c + 1) * l];
                let sc = model.score(c, row);
                // The GPU compares f32 scores; near-equal scores may pick differently.
                if sc > best.scores[c] {
                    best.scores[c] = sc;
                    best.tokens[c * l..(c + 1) * l].copy_from_slice(row);
                }
            }
        }
    }
    Ok(best)
}

/// WRONG on purpose, for the negative control of the statistical test only: updates every
/// site at once from the previous state (synchronous Gibbs), which does not sample p(x).
#[doc(hidden)]
pub fn gibbs_synchronous(
    model: &HostModel,
    tokens: &mut [u32],
    shape: &[usize],
    opts: &GibbsOptions,
) -> Result<()> {
    let s = check_run(model, tokens, shape, None, opts)?;
    let key = seed_key(opts.seed);
    let (b, l) = (s.chains, s.len);
    for sweep in 0..opts.sweeps {
        let t = opts.temperature_at(sweep) as f64;
        let old = tokens.to_vec();
        for c in 0..b {
            let row = &old[c * l..(c + 1) * l];
            for i in 0..l {
                tokens[c * l + i] = draw_site(
                    model,
                    c,
                    row,
                    i,
                    t,
                    (i as u32, c as u32, opts.first_sweep + sweep),
                    key,
                );
            }
        }
    }
    Ok(())
}

fn lse(v: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = v.collect();
    let m = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + v.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
}

/// Forward messages alpha [L][V] of chain c at temperature t > 0, and log Z.
fn forward(model: &HostModel, c: usize, l: usize, t: f64) -> (Vec<Vec<f64>>, f64) {
    let v = model.vocab();
    let mut alpha = vec![(0..v).map(|x| model.unary(c, 0, x) / t).collect::<Vec<_>>()];
    for i in 1..l {
        let prev = &alpha[i - 1];
        let a: Vec<f64> = (0..v)
            .map(|x| model.unary(c, i, x) / t + lse((0..v).map(|y| prev[y] + model.pair(y, x) / t)))
            .collect();
        alpha.push(a);
    }
    let log_z = lse(alpha[l - 1].iter().cloned());
    (alpha, log_z)
}

/// The checks of the exact computations on chain c's first `len` sites at temperature t:
/// `what` names the computation in errors.
fn check_exact(model: &HostModel, c: usize, len: usize, t: f64, what: &str) -> Result<()> {
    if !(t > 0.0 && t.is_finite()) {
        return Err(Error::option(format!(
            "{what} need a finite temperature > 0, got {t}"
        )));
    }
    // The model's own chains and length: a shared unary serves any chain c.
    let (chains, l) = match model.unary_shape[..] {
        [cb, l, _] => (cb, l),
        [l, _] => (c.saturating_add(1), l),
        _ => (1, 0),
    };
    model.shape(&[chains, l], None)?;
    if len == 0 || len > l || c >= chains {
        return Err(Error::shape(format!(
            "{what} of chain {c} over {len} sites: the model has {chains} chains of {l} sites \
             (len must be 1..={l})"
        )));
    }
    Ok(())
}

/// Exact marginals of the first `len` sites of chain c's model at temperature t > 0 by
/// forward-backward in log space: `(P(x_i = v) [len][V], P(x_i = a, x_{i+1} = b)
/// [len-1][V][V])`.
///
/// # Errors
///
/// [`Error::InvalidOption`] if `t` is not finite and > 0; [`Error::Shape`] if the model is
/// inconsistent ([`HostModel::shape`]), `len` is not in `1..=L`, or c is past the chains of
/// a per-chain unary.
#[allow(clippy::type_complexity)]
pub fn marginals(
    model: &HostModel,
    c: usize,
    len: usize,
    t: f64,
) -> Result<(Vec<Vec<f64>>, Vec<Vec<Vec<f64>>>)> {
    check_exact(model, c, len, t, "exact marginals")?;
    let v = model.vocab();
    let (alpha, log_z) = forward(model, c, len, t);
    let mut beta = vec![vec![0.0; v]; len];
    for i in (0..len.saturating_sub(1)).rev() {
        beta[i] = (0..v)
            .map(|x| {
                lse((0..v)
                    .map(|y| model.pair(x, y) / t + model.unary(c, i + 1, y) / t + beta[i + 1][y]))
            })
            .collect();
    }
    let single = (0..len)
        .map(|i| {
            (0..v)
                .map(|x| (alpha[i][x] + beta[i][x] - log_z).exp())
                .collect()
        })
        .collect();
    let pairs = (0..len.saturating_sub(1))
        .map(|i| {
            (0..v)
                .map(|a| {
                    (0..v)
                        .map(|b| {
                            (alpha[i][a]
                                + model.pair(a, b) / t
                                + model.unary(c, i + 1, b) / t
                                + beta[i + 1][b]
                                - log_z)
                                .exp()
                        })
                        .collect()
                })
                .collect()
        })
        .collect();
    Ok((single, pairs))
}

/// Draws v with probability exp(logp[v] - LSE) by inversion of one uniform.
fn draw_log(logp: &[f64], u: f64) -> u32 {
    let z = lse(logp.iter().cloned());
    let mut acc = 0.0;
    for (v, lp) in logp.iter().enumerate() {
        acc += (lp - z).exp();
        if u < acc {
            return v as u32;
        }
    }
    (logp.len() - 1) as u32
}

/// `n` exact joint samples [n, len] of the first `len` sites of chain c's model at
/// temperature t > 0 by forward filtering, backward sampling (uniforms from Philox: counter
/// (0, site, sample, 0xffffffff)).
///
/// # Errors
///
/// As [`marginals`], and [`Error::InvalidOption`] if `n` passes the 2^32 samples the
/// counter numbers.
pub fn ffbs(
    model: &HostModel,
    c: usize,
    len: usize,
    t: f64,
    n: usize,
    seed: u64,
) -> Result<Vec<u32>> {
    check_exact(model, c, len, t, "exact samples")?;
    if n as u64 > 1 << 32 {
        return Err(Error::option(format!(
            "exact samples number at most 2^32 samples (a u32 counter), got {n}"
        )));
    }
    let v = model.vocab();
    let (alpha, _) = forward(model, c, len, t);
    let key = seed_key(seed);
    let mut out = vec![0u32; n * len];
    for s in 0..n {
        let u = |i: usize| uniform(philox4x32_10([0, i as u32, s as u32, u32::MAX], key)[0]);
        let row = &mut out[s * len..(s + 1) * len];
        row[len - 1] = draw_log(&alpha[len - 1], u(len - 1));
        for i in (0..len - 1).rev() {
            let next = row[i + 1] as usize;
            let lp: Vec<f64> = (0..v)
                .map(|a| alpha[i][a] + model.pair(a, next) / t)
                .collect();
            row[i] = draw_log(&lp, u(i));
        }
    }
    Ok(out)
}

/// The kept set of one row of logits: temperature, then top-k (every tie of the k-th logit
/// kept, as Hugging Face's top-k), then top-p: the smallest set of the largest logits whose
/// probability reaches p (within `SampleOptions::top_p_goal`'s 2^-14), tokens of equal logit
/// taken lowest index first. -0.0 and +0.0 are
/// equal logits.
pub fn kept_tokens(row: &[f32], opts: &SampleOptions) -> Vec<bool> {
    let t = opts.temperature as f64;
    let v = row.len();
    if t == 0.0 {
        return vec![true; v];
    }
    // Logits as the shader orders them (order_key in shaders/gibbs.wgsl).
    let key = |z: f32| {
        let u = if z == 0.0 { 0 } else { z.to_bits() };
        if u & 0x8000_0000 != 0 {
            !u
        } else {
            u | 0x8000_0000
        }
    };
    let mut order: Vec<usize> = (0..v).collect();
    order.sort_by(|&a, &b| key(row[b]).cmp(&key(row[a])).then(a.cmp(&b)));
    let mut kept = vec![true; v];
    if opts.top_k > 0 && opts.top_k < v {
        let kth = key(row[order[opts.top_k - 1]]);
        for (x, k) in row.iter().zip(&mut kept) {
            *k = key(*x) >= kth;
        }
    }
    if opts.top_p < 1.0 {
        let zmax = row[order[0]] as f64;
        let w = |z: f32| ((z as f64 - zmax) / t).exp();
        let total: f64 = (0..v).filter(|&i| kept[i]).map(|i| w(row[i])).sum();
        let goal = opts.top_p_goal() as f64 * total;
        let mut acc = 0.0;
        let mut reached = false;
        for &i in &order {
            if reached {
                kept[i] = false;
            } else if kept[i] {
                acc += w(row[i]);
                reached = acc >= goal;
            }
        }
    }
    kept
}

/// One token per row of logits [b, V]: Gumbel-max over the kept set with counter
/// (v / 4, 0, row, step).
pub fn sample_logits(logits: &[f32], shape: &[usize], opts: &SampleOptions) -> Result<Vec<u32>> {
    opts.validate()?;
    let (b, v) = logits_shape(shape)?;
    if logits.len() != b * v {
        return Err(Error::shape(
            "reference logits length does not match their shape",
        ));
    }
    let key = seed_key(opts.seed);
    let t = opts.temperature as f64;
    Ok((0..b)
        .map(|r| {
            let row = &logits[r * v..(r + 1) * v];
            let kept = kept_tokens(row, opts);
            // Relative to the row's maximum, as in draw_site.
            let top = finite_or_zero(row.iter().fold(f32::MIN, |m, &z| m.max(z)) as f64);
            let mut best = (f64::NEG_INFINITY, u32::MAX);
            for x in 0..v {
                if !kept[x] {
                    continue;
                }
                let mut z = row[x] as f64 - top;
                if t > 0.0 {
                    let rr = philox4x32_10([(x / 4) as u32, 0, r as u32, opts.step], key);
                    z += t * gumbel(rr[x % 4]);
                }
                if best.1 == u32::MAX || z > best.0 {
                    best = (z, x as u32);
                }
            }
            best.1
        })
        .collect())
}

/// The batched MH step on the host; returns the accepted flags. `x` `[b, L]` and `score_x` `[b]`
/// are updated in place.
#[allow(clippy::too_many_arguments)]
pub fn mh_step(
    x: &mut [u32],
    y: &[u32],
    shape: &[usize],
    score_x: &mut [f32],
    score_y: &[f32],
    log_q_fwd: &[f32],
    log_q_back: &[f32],
    opts: &MhOptions,
) -> Result<Vec<bool>> {
    opts.validate()?;
    let b = score_x.len();
    let (b, l) = mh_shape(
        shape,
        shape,
        &[
            &[b],
            &[score_y.len()],
            &[log_q_fwd.len()],
            &[log_q_back.len()],
        ],
    )?;
    if x.len() != b * l || y.len() != b * l {
        return Err(Error::shape("reference MH states do not match their shape"));
    }
    let key = seed_key(opts.seed);
    let t = opts.temperature as f64;
    Ok((0..b)
        .map(|c| {
            let (sx, sy) = (score_x[c] as f64, score_y[c] as f64);
            let ok = if t > 0.0 {
                let delta = (sy - sx) / t + log_q_back[c] as f64 - log_q_fwd[c] as f64;
                let r = philox4x32_10([0, u32::MAX, c as u32, opts.step], key)[0];
                delta >= 0.0 || uniform(r).ln() < delta
            } else {
                sy >= sx
            };
            if ok {
                score_x[c] = score_y[c];
                x[c * l..(c + 1) * l].copy_from_slice(&y[c * l..(c + 1) * l]);
            }
            ok
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(l: usize, v: usize) -> HostModel {
        HostModel {
            unary: vec![0.0; l * v],
            unary_shape: vec![l, v],
            pairwise: HostPairwise::Dense(vec![0.0; v * v]),
        }
    }

    /// The chain length and chain index are the caller's: out of the model's range they are
    /// an error for marginals and ffbs (a length of 0 underflowed in the forward pass; past
    /// L, c past the chains of a per-chain unary, or an inconsistent model read out of
    /// bounds).
    #[test]
    fn exact_computations_refuse_lengths_and_chains_outside_the_model() {
        let m = model(3, 2);
        for (c, len) in [(0, 0), (0, 4)] {
            assert!(
                matches!(marginals(&m, c, len, 1.0), Err(Error::Shape(_))),
                "c {c}, len {len}"
            );
            assert!(
                matches!(ffbs(&m, c, len, 1.0, 2, 0), Err(Error::Shape(_))),
                "ffbs c {c}, len {len}"
            );
        }
        assert!(matches!(
            ffbs(&m, 0, 3, 0.0, 2, 0),
            Err(Error::InvalidOption(_))
        ));
        // Two samples of a uniform chain of 3 sites, each a token below V.
        let samples = ffbs(&m, 0, 3, 1.0, 2, 0).unwrap();
        assert_eq!(samples.len(), 6);
        assert!(samples.iter().all(|&x| x < 2));
        let per_chain = HostModel {
            unary: vec![0.0; 2 * 3 * 2],
            unary_shape: vec![2, 3, 2],
            ..m.clone()
        };
        assert!(matches!(
            marginals(&per_chain, 2, 3, 1.0),
            Err(Error::Shape(_))
        ));
        let short = HostModel {
            unary: vec![0.0; 5],
            ..m.clone()
        };
        assert!(matches!(marginals(&short, 0, 3, 1.0), Err(Error::Shape(_))));
        // Uniform potentials: every site uniform, every pair uniform.
        let (single, pairs) = marginals(&per_chain, 1, 3, 1.0).unwrap();
        assert!(single.iter().flatten().all(|p| (p - 0.5).abs() < 1e-12));
        assert!(pairs
            .iter()
            .flatten()
            .flatten()
            .all(|p| (p - 0.25).abs() < 1e-12));
        let (single, _) = marginals(&m, 0, 2, 1.0).unwrap();
        assert_eq!(single.len(), 2);
    }
}
