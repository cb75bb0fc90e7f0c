//! Gibbs family on the GPU against the f64 reference: Philox known answers, site-by-site
//! agreement of GPU and CPU chains, chi-square tests against exact marginals (with a negative
//! control), clamping, T = 0, annealing and best tracking, determinism, logits sampling, the
//! MH step and bad input.
#![allow(clippy::needless_range_loop)]

mod common;

use common::{gpu, in_oversized_buffer, random, small_bindings};
use seq_kernels::kernels::gibbs::{chain_shape, philox_gpu};
use seq_kernels::reference::gibbs::{self as reference, HostModel, HostPairwise};
use seq_kernels::{
    ChainModel, Context, Element, Error, Gibbs, GibbsOptions, GpuTensor, MhOptions, MhTensors,
    Pairwise, SampleOptions,
};

const KNOWN: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
    (
        [0; 4],
        [0; 2],
        [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8],
    ),
    (
        [u32::MAX; 4],
        [u32::MAX; 2],
        [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd],
    ),
    (
        [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
        [0xa4093822, 0x299f31d0],
        [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
    ),
];

/// Deterministic pseudo-random u32 (xorshift).
fn random_u32(n: usize, seed: u64) -> Vec<u32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 32) as u32
        })
        .collect()
}

fn random_tokens(n: usize, v: usize, seed: u64) -> Vec<u32> {
    random_u32(n, seed)
        .into_iter()
        .map(|r| r % v as u32)
        .collect()
}

/// A host model and its GPU twin.
struct Model {
    host: HostModel,
    unary: GpuTensor<f32>,
    pa: GpuTensor<f32>,
    pb: Option<GpuTensor<f32>>,
}

impl Model {
    /// Unary [L, V] (or [b, L, V] with `per_chain`), W dense (rank 0) or A B^T of `rank`.
    #[allow(clippy::too_many_arguments)]
    fn new(
        ctx: &Context,
        per_chain: Option<usize>,
        l: usize,
        v: usize,
        rank: usize,
        unary_scale: f32,
        pair_scale: f32,
        seed: u64,
    ) -> Self {
        let unary_shape: Vec<usize> = match per_chain {
            Some(b) => vec![b, l, v],
            None => vec![l, v],
        };
        let n: usize = unary_shape.iter().product();
        let unary = random(n, seed, -unary_scale, unary_scale);
        let pairwise = if rank == 0 {
            HostPairwise::Dense(random(v * v, seed + 1, -pair_scale, pair_scale))
        } else {
            HostPairwise::Factored {
                a: random(v * rank, seed + 2, -pair_scale, pair_scale),
                b: random(v * rank, seed + 3, -pair_scale, pair_scale),
                rank,
            }
        };
        let (pa, pb) = match &pairwise {
            HostPairwise::Dense(w) => (ctx.upload(w, [v, v]).unwrap(), None),
            HostPairwise::Factored { a, b, rank } => (
                ctx.upload(a, [v, *rank]).unwrap(),
                Some(ctx.upload(b, [v, *rank]).unwrap()),
            ),
        };
        Self {
            unary: ctx.upload(&unary, unary_shape.clone()).unwrap(),
            host: HostModel {
                unary,
                unary_shape,
                pairwise,
            },
            pa,
            pb,
        }
    }

    /// Given unary [L, V] and dense W [V, V].
    fn dense(ctx: &Context, unary: Vec<f32>, [l, v]: [usize; 2], w: Vec<f32>) -> Self {
        Self {
            unary: ctx.upload(&unary, [l, v]).unwrap(),
            pa: ctx.upload(&w, [v, v]).unwrap(),
            pb: None,
            host: HostModel {
                unary,
                unary_shape: vec![l, v],
                pairwise: HostPairwise::Dense(w),
            },
        }
    }

    fn gpu(&self) -> ChainModel<'_> {
        ChainModel {
            unary: &self.unary,
            pairwise: match &self.pb {
                None => Pairwise::Dense(&self.pa),
                Some(b) => Pairwise::Factored { a: &self.pa, b },
            },
        }
    }
}

type Best = Option<(Vec<u32>, Vec<f32>)>;

/// Runs the GPU sampler from `init` [b, L] and downloads states (and best states).
fn run_gpu<T: Element>(
    ctx: &Context,
    m: &Model,
    init: &[T],
    shape: [usize; 2],
    clamp: Option<(&[bool], &[usize])>,
    opts: &GibbsOptions,
) -> (Vec<u32>, Best) {
    let init = ctx.upload(init, shape).unwrap();
    let clamp = clamp.map(|(c, s)| ctx.upload_mask(c, s.to_vec()).unwrap());
    let out = ctx.gibbs(&m.gpu(), &init, clamp.as_ref(), opts).unwrap();
    let bits = |t: &GpuTensor<T>| bytemuck::cast_slice::<T, u32>(&t.download().unwrap()).to_vec();
    let best = out
        .best
        .as_ref()
        .map(|(t, s)| (bits(t), s.download().unwrap()));
    (bits(&out.tokens), best)
}

fn agreement(a: &[u32], b: &[u32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64
}

// ------------------------------------------------------------------------------- Philox

#[test]
fn philox_known_answers_on_the_cpu() {
    for (ctr, key, want) in KNOWN {
        assert_eq!(
            reference::philox4x32_10(ctr, key),
            want,
            "ctr {ctr:x?} key {key:x?}"
        );
    }
}

/// The reference's uniform and Gumbel draw from a 32-bit word, as the spec writes them:
/// U = ((r >> 8) + 0.5) 2^-24 (the low 8 bits unused), g = -log(-log U), so g spans
/// [-2.8524, 17.3287] (the spec's [-2.9, 17.4]).
#[test]
fn uniform_and_gumbel_of_a_word_follow_the_spec() {
    let two24 = (1u64 << 24) as f64;
    for (r, m) in [
        (0u32, 0u32),
        (0xff, 0),
        (0x100, 1),
        (0x8000_0000, 1 << 23),
        (u32::MAX, 0xff_ffff),
    ] {
        let u = (m as f64 + 0.5) / two24;
        assert_eq!(reference::uniform(r), u, "r = {r:#x}");
        let g = -(-u.ln()).ln();
        assert!(
            (reference::gumbel(r) - g).abs() <= 1e-15 * g.abs().max(1.0),
            "r = {r:#x}"
        );
    }
    assert!((reference::gumbel(0) + 2.852_36).abs() < 1e-5);
    assert!((reference::gumbel(u32::MAX) - 17.328_68).abs() < 1e-5);
}

#[test]
fn philox_known_answers_on_the_gpu() {
    let Some(ctx) = gpu() else { return };
    let mut cases: Vec<([u32; 4], [u32; 2])> = KNOWN.iter().map(|(c, k, _)| (*c, *k)).collect();
    // Random counters and keys too, against the CPU (exercises every carry of the 16-bit limbs).
    let r = random_u32(6 * 200, 17);
    cases.extend(
        r.chunks(6)
            .map(|w| ([w[0], w[1], w[2], w[3]], [w[4], w[5]])),
    );
    let got = philox_gpu(ctx, &cases).unwrap();
    for (i, (c, k)) in cases.iter().enumerate() {
        assert_eq!(
            got[i],
            reference::philox4x32_10(*c, *k),
            "case {i}: ctr {c:x?} key {k:x?}"
        );
    }
    for (i, (_, _, want)) in KNOWN.iter().enumerate() {
        assert_eq!(got[i], *want);
    }
}

// ----------------------------------------------------------------- GPU vs CPU, site by site

/// Runs GPU and CPU chains from the same start; f32 vs f64 energies may flip a near-tie, so at
/// least 99.9% of final sites must agree.
fn check_agreement(ctx: &Context, m: &Model, b: usize, opts: &GibbsOptions, seed: u64) {
    let s = &m.host.unary_shape;
    let (l, v) = (s[s.len() - 2], s[s.len() - 1]);
    let init = random_tokens(b * l, v, seed);
    let (got, _) = run_gpu(ctx, m, &init, [b, l], None, opts);
    let mut want = init.clone();
    reference::gibbs(&m.host, &mut want, &[b, l], None, opts).unwrap();
    let a = agreement(&got, &want);
    assert!(a >= 0.999, "b={b} L={l} V={v} {opts:?}: agreement {a}");
    // Something must have happened: the chains moved away from their start.
    assert!(agreement(&got, &init) < 1.0 || v == 1, "chains never moved");
}

#[test]
fn gpu_chains_follow_the_reference_dense() {
    let Some(ctx) = gpu() else { return };
    let opts = GibbsOptions {
        sweeps: 4,
        seed: 0x1234_5678_9abc,
        ..Default::default()
    };
    // One invocation per site (V <= 64): odd L, L = 1, V = 1..64.
    for &(b, l, v) in &[
        (37usize, 7usize, 5usize),
        (3, 1, 3),
        (5, 2, 1),
        (9, 10, 64),
        (4, 3, 2),
    ] {
        let m = Model::new(ctx, None, l, v, 0, 1.0, 1.0, (b * l * v) as u64);
        check_agreement(ctx, &m, b, &opts, 1);
    }
    // One workgroup per site (V > 64), every workgroup size.
    for &(b, l, v) in &[(3usize, 5usize, 65usize), (2, 4, 1000), (2, 3, 4099)] {
        let m = Model::new(ctx, None, l, v, 0, 2.0, 2.0, v as u64);
        check_agreement(ctx, &m, b, &opts, 2);
    }
    // Per-chain unary, annealing, a later first sweep.
    let m = Model::new(ctx, Some(11), 6, 7, 0, 1.0, 1.0, 99);
    let anneal = GibbsOptions {
        sweeps: 6,
        temperature: 3.0,
        anneal_to: Some(0.2),
        first_sweep: 40,
        seed: 7,
        ..Default::default()
    };
    check_agreement(ctx, &m, 11, &anneal, 3);
    let m = Model::new(ctx, Some(3), 5, 300, 0, 1.0, 1.0, 98);
    check_agreement(ctx, &m, 3, &anneal, 4);
}

#[test]
fn gpu_chains_follow_the_reference_factorised_and_i32() {
    let Some(ctx) = gpu() else { return };
    let opts = GibbsOptions {
        sweeps: 3,
        seed: 5,
        ..Default::default()
    };
    let m = Model::new(ctx, None, 6, 9, 3, 1.0, 1.0, 11);
    check_agreement(ctx, &m, 20, &opts, 5);
    // Large vocabulary through the factorised path.
    let m = Model::new(ctx, None, 4, 5000, 8, 1.0, 0.5, 12);
    check_agreement(ctx, &m, 2, &opts, 6);
    // i32 tokens give the same chains as u32 ones.
    let m = Model::new(ctx, None, 5, 6, 0, 1.0, 1.0, 13);
    let init = random_tokens(8 * 5, 6, 14);
    let init_i: Vec<i32> = init.iter().map(|&t| t as i32).collect();
    let (a, _) = run_gpu(ctx, &m, &init, [8, 5], None, &opts);
    let (b, _) = run_gpu(ctx, &m, &init_i, [8, 5], None, &opts);
    assert_eq!(a, b);
}

#[test]
fn more_chains_than_one_grid_dimension_holds() {
    let Some(ctx) = gpu() else { return };
    // 70000 chains x 1 site of one colour with V = 65: 70000 workgroups per half-sweep,
    // folded into y. Checked against the reference on every chain.
    let (b, l, v) = (70000usize, 2usize, 65usize);
    let m = Model::new(ctx, None, l, v, 0, 1.0, 1.0, 21);
    let opts = GibbsOptions {
        sweeps: 1,
        seed: 3,
        ..Default::default()
    };
    check_agreement(ctx, &m, b, &opts, 22);
}

#[test]
fn vocabulary_beyond_fifty_thousand() {
    let Some(ctx) = gpu() else { return };
    // V >= 50,000 through the factorised W (dense would be 10 GB): a few chains of a few sites
    // keep it quick on a software device, an odd V leaves a ragged last block of the workgroup
    // reduction. Per-chain unary covers the [b, L, V] indexing at this size.
    let opts = GibbsOptions {
        sweeps: 2,
        seed: 0xfeed,
        ..Default::default()
    };
    let v = 50_021;
    let m = Model::new(ctx, None, 5, v, 8, 2.0, 0.5, 61);
    check_agreement(ctx, &m, 3, &opts, 62);
    let m = Model::new(ctx, Some(2), 3, v, 4, 2.0, 0.5, 63);
    check_agreement(ctx, &m, 2, &opts, 64);
    // Logits sampling over the same vocabulary, plain and truncated.
    let logits = random(3 * v, 65, -4.0, 4.0);
    let t = ctx.upload(&logits, [3, v]).unwrap();
    for o in [
        SampleOptions::default(),
        SampleOptions {
            top_k: 40,
            top_p: 0.9,
            seed: 2,
            ..Default::default()
        },
    ] {
        let got = ctx.sample_logits(&t, &o).unwrap().download().unwrap();
        let want = reference::sample_logits(&logits, &[3, v], &o).unwrap();
        assert_eq!(got, want, "V = {v}, {o:?}");
    }
}

#[test]
fn sequences_of_four_thousand_sites() {
    let Some(ctx) = gpu() else { return };
    // L >= 4096: one invocation per site (V <= 64) at L = 4096 exactly, and one workgroup per
    // site (V > 64) at an odd L, where the two colours differ in size.
    let opts = GibbsOptions {
        sweeps: 3,
        seed: 41,
        ..Default::default()
    };
    let m = Model::new(ctx, None, 4096, 3, 0, 1.0, 1.0, 71);
    check_agreement(ctx, &m, 3, &opts, 72);
    let m = Model::new(ctx, None, 4097, 70, 0, 1.0, 1.0, 73);
    check_agreement(ctx, &m, 1, &opts, 74);
}

// ------------------------------------------------------------------------- statistics

/// Upper tail of the chi-square distribution with k degrees of freedom at x: Q(k/2, x/2),
/// the regularised upper incomplete gamma function (series below a + 1, continued fraction
/// above).
fn chi2_sf(x: f64, k: usize) -> f64 {
    let a = k as f64 / 2.0;
    let x = x / 2.0;
    if x <= 0.0 {
        return 1.0;
    }
    let ln_gamma_a = ln_gamma(a);
    if x < a + 1.0 {
        let (mut term, mut sum, mut n) = (1.0 / a, 1.0 / a, a);
        for _ in 0..1000 {
            n += 1.0;
            term *= x / n;
            sum += term;
            if term < sum * 1e-15 {
                break;
            }
        }
        1.0 - sum * (-x + a * x.ln() - ln_gamma_a).exp()
    } else {
        // Lentz's method for the continued fraction of Q.
        let tiny = 1e-300;
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / tiny;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..1000 {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = an * d + b;
            if d.abs() < tiny {
                d = tiny;
            }
            c = b + an / c;
            if c.abs() < tiny {
                c = tiny;
            }
            d = 1.0 / d;
            let del = d * c;
            h *= del;
            if (del - 1.0).abs() < 1e-15 {
                break;
            }
        }
        (-x + a * x.ln() - ln_gamma_a).exp() * h
    }
}

/// ln Γ(a) (Lanczos, g = 7).
fn ln_gamma(a: f64) -> f64 {
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    let x = a - 1.0;
    let mut s = C[0];
    for (i, c) in C.iter().enumerate().skip(1) {
        s += c / (x + i as f64);
    }
    let t = x + 7.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + s.ln()
}

/// Chi-square p-value of observed counts against probabilities (cells with an expected count
/// below 5 are pooled into one, the usual validity condition of the test).
fn chi2_pvalue(counts: &[usize], probs: &[f64]) -> f64 {
    let n: usize = counts.iter().sum();
    let (mut stat, mut cells) = (0.0, 0usize);
    let (mut pool_o, mut pool_e) = (0.0, 0.0);
    for (&o, &p) in counts.iter().zip(probs) {
        let e = p * n as f64;
        if e < 5.0 {
            pool_o += o as f64;
            pool_e += e;
        } else {
            stat += (o as f64 - e).powi(2) / e;
            cells += 1;
        }
    }
    if pool_e > 0.0 {
        if pool_e >= 1.0 {
            stat += (pool_o - pool_e).powi(2) / pool_e;
            cells += 1;
        } else {
            assert!(pool_o <= 3.0, "{pool_o} draws in cells expecting {pool_e}");
        }
    }
    chi2_sf(stat, cells.max(2) - 1)
}

/// The smallest p-value over every site and adjacent pair of final states [C, L] against the
/// exact marginals.
fn min_pvalue(
    states: &[u32],
    l: usize,
    v: usize,
    single: &[Vec<f64>],
    pairs: &[Vec<Vec<f64>>],
) -> f64 {
    let c = states.len() / l;
    let mut worst = 1.0f64;
    for i in 0..l {
        let mut counts = vec![0usize; v];
        for k in 0..c {
            counts[states[k * l + i] as usize] += 1;
        }
        worst = worst.min(chi2_pvalue(&counts, &single[i]));
    }
    for i in 0..l - 1 {
        let mut counts = vec![0usize; v * v];
        for k in 0..c {
            counts[states[k * l + i] as usize * v + states[k * l + i + 1] as usize] += 1;
        }
        let probs: Vec<f64> = pairs[i].iter().flatten().copied().collect();
        worst = worst.min(chi2_pvalue(&counts, &probs));
    }
    worst
}

#[test]
fn chi2_helper_is_sane() {
    // Known quantiles: chi2(1) at 3.841 -> 0.05; chi2(4) at 18.467 -> 0.001; chi2(8) at
    // 2.733 -> 0.95.
    assert!((chi2_sf(3.841_458_8, 1) - 0.05).abs() < 1e-6);
    assert!((chi2_sf(18.466_827, 4) - 0.001).abs() < 1e-7);
    assert!((chi2_sf(2.732_637, 8) - 0.95).abs() < 1e-5);
}

/// Final states of C independent chains (random starts, own Philox streams) pass per-site
/// and adjacent-pair chi-square tests against forward-backward marginals at p = 1e-4 (fixed
/// seeds: deterministic, not flaky); FFBS samples pass the same test; the synchronous sampler
/// (all sites at once) fails it.
#[test]
fn final_states_match_exact_marginals() {
    let Some(ctx) = gpu() else { return };
    let (c, l, v, t) = (4000usize, 5usize, 3usize, 1.0);
    // Strong couplings, so that a sampler of the wrong distribution is visibly wrong.
    let m = Model::new(ctx, None, l, v, 0, 1.0, 2.5, 31);
    let (single, pairs) = reference::marginals(&m.host, 0, l, t).unwrap();
    for row in &single {
        assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }
    let opts = GibbsOptions {
        sweeps: 60,
        temperature: t as f32,
        seed: 2024,
        ..Default::default()
    };
    let init = random_tokens(c * l, v, 32);
    let (gpu_states, _) = run_gpu(ctx, &m, &init, [c, l], None, &opts);
    let p_gpu = min_pvalue(&gpu_states, l, v, &single, &pairs);
    assert!(
        p_gpu > 1e-4,
        "chromatic GPU sampler rejected: p = {p_gpu:e}"
    );

    let exact = reference::ffbs(&m.host, 0, l, t, c, 77).unwrap();
    let p_ffbs = min_pvalue(&exact, l, v, &single, &pairs);
    assert!(p_ffbs > 1e-4, "FFBS rejected: p = {p_ffbs:e}");

    let mut sync = init.clone();
    reference::gibbs_synchronous(&m.host, &mut sync, &[c, l], &opts).unwrap();
    let p_sync = min_pvalue(&sync, l, v, &single, &pairs);
    assert!(
        p_sync < 1e-4,
        "synchronous sampler NOT rejected: p = {p_sync:e}"
    );
    eprintln!("chi-square min p: gpu {p_gpu:.3e}, ffbs {p_ffbs:.3e}, synchronous {p_sync:.3e}");
}

// -------------------------------------------------------------- clamp, T = 0, best, annealing

#[test]
fn clamped_sites_never_change() {
    let Some(ctx) = gpu() else { return };
    let (b, l, v) = (16usize, 9usize, 70usize);
    for (per_chain, vv) in [(false, 5usize), (true, 5), (false, v), (true, v)] {
        let m = Model::new(ctx, None, l, vv, 0, 1.0, 1.0, 41);
        let init = random_tokens(b * l, vv, 42);
        let (mask, shape): (Vec<bool>, Vec<usize>) = if per_chain {
            (common::random_mask(b * l, 43, 0.4), vec![b, l])
        } else {
            (common::random_mask(l, 44, 0.4), vec![l])
        };
        let opts = GibbsOptions {
            sweeps: 5,
            temperature: 5.0,
            seed: 9,
            ..Default::default()
        };
        let (got, _) = run_gpu(ctx, &m, &init, [b, l], Some((&mask, &shape)), &opts);
        let mut moved = 0;
        for k in 0..b * l {
            let fixed = if per_chain { mask[k] } else { mask[k % l] };
            if fixed {
                assert_eq!(got[k], init[k], "clamped site {k} changed (V={vv})");
            } else if got[k] != init[k] {
                moved += 1;
            }
        }
        assert!(moved > 0, "no free site moved");
        let mut want = init.clone();
        reference::gibbs(&m.host, &mut want, &[b, l], Some((&mask, &shape)), &opts).unwrap();
        assert!(agreement(&got, &want) >= 0.999);
    }
}

/// At T = 0 (ICM) the sweeps stop at a state where no single-site change raises the score.
/// Tolerance: the GPU compares f32 sums of O(1) terms, so an improvement below 1e-4 is
/// rounding, not a missed move.
#[test]
fn zero_temperature_reaches_a_local_maximum() {
    let Some(ctx) = gpu() else { return };
    for &(b, l, v) in &[(32usize, 12usize, 6usize), (4, 8, 200)] {
        let m = Model::new(ctx, None, l, v, 0, 1.0, 1.0, 51 + v as u64);
        let init = random_tokens(b * l, v, 52);
        let opts = GibbsOptions {
            sweeps: 30,
            temperature: 0.0,
            ..Default::default()
        };
        let (got, _) = run_gpu(ctx, &m, &init, [b, l], None, &opts);
        for c in 0..b {
            let row = &got[c * l..(c + 1) * l];
            let s = m.host.score(0, row);
            for i in 0..l {
                for x in 0..v as u32 {
                    let mut alt = row.to_vec();
                    alt[i] = x;
                    let gain = m.host.score(0, &alt) - s;
                    assert!(
                        gain <= 1e-4,
                        "chain {c} site {i} token {x} improves by {gain}"
                    );
                }
            }
        }
    }
}

/// Annealing with best tracking: the best state's score is its true score (f32 tolerance
/// 1e-4 on sums of O(1) terms), never below the final or the initial state's, and equals the
/// reference's best score on agreeing chains.
#[test]
fn annealing_tracks_the_best_state() {
    let Some(ctx) = gpu() else { return };
    let (b, l, v) = (64usize, 10usize, 8usize);
    let m = Model::new(ctx, None, l, v, 0, 1.0, 1.0, 61);
    let init = random_tokens(b * l, v, 62);
    let opts = GibbsOptions {
        sweeps: 25,
        temperature: 2.0,
        anneal_to: Some(0.05),
        seed: 63,
        track_best: true,
        ..Default::default()
    };
    let (got, best) = run_gpu(ctx, &m, &init, [b, l], None, &opts);
    let (bt, bs) = best.unwrap();
    let mut want = init.clone();
    let host_best = reference::gibbs(&m.host, &mut want, &[b, l], None, &opts)
        .unwrap()
        .unwrap();
    assert!(agreement(&got, &want) >= 0.999);
    let mut improved = 0;
    for c in 0..b {
        let r = c * l..(c + 1) * l;
        let true_score = m.host.score(0, &bt[r.clone()]);
        assert!(
            (bs[c] as f64 - true_score).abs() < 1e-4,
            "chain {c}: {} vs {true_score}",
            bs[c]
        );
        assert!(true_score >= m.host.score(0, &got[r.clone()]) - 1e-4);
        let s0 = m.host.score(0, &init[r.clone()]);
        assert!(true_score >= s0 - 1e-4);
        improved += (true_score > s0 + 1e-3) as usize;
        if got[r.clone()] == want[r.clone()] {
            assert!((host_best.scores[c] - true_score).abs() < 1e-4);
        }
    }
    assert!(
        improved > b / 2,
        "annealing improved only {improved} of {b} chains"
    );
}

/// Of states that score the same, the best state is the first one seen, as the reference's
/// strict comparison keeps it: on a model where every state scores 0 the chains move, but
/// the best state stays the initial one.
#[test]
fn best_state_keeps_the_first_of_equal_scores() {
    let Some(ctx) = gpu() else { return };
    let (b, l, v) = (16usize, 6usize, 5usize);
    let m = Model::dense(ctx, vec![0.0; l * v], [l, v], vec![0.0; v * v]);
    let init = random_tokens(b * l, v, 81);
    let opts = GibbsOptions {
        sweeps: 3,
        seed: 82,
        track_best: true,
        ..Default::default()
    };
    let (got, best) = run_gpu(ctx, &m, &init, [b, l], None, &opts);
    assert_ne!(got, init, "the chains did not move");
    let (bt, bs) = best.unwrap();
    assert!(bs.iter().all(|&s| s == 0.0), "scores {bs:?}");
    assert_eq!(bt, init, "a later state of equal score replaced the first");
    let mut want = init.clone();
    let host = reference::gibbs(&m.host, &mut want, &[b, l], None, &opts)
        .unwrap()
        .unwrap();
    assert_eq!(host.tokens, init, "reference");
}

/// The annealed temperature goes geometrically from `temperature` at the schedule's first
/// sweep to `anneal_to` at its last, checked against values worked out by hand: the GPU and
/// the reference take their temperatures from the same `temperature_at`, so comparing them
/// cannot see a wrong schedule.
#[test]
fn annealing_runs_geometrically_from_temperature_to_anneal_to() {
    let close = |got: f32, want: f32, what: &str| {
        assert!(
            (got - want).abs() <= 1e-6 * want,
            "{what}: temperature {got}, expected {want}"
        );
    };
    // 2 to 1/8 over 5 sweeps: the temperature halves each sweep.
    let run = GibbsOptions {
        sweeps: 5,
        temperature: 2.0,
        anneal_to: Some(0.125),
        ..Default::default()
    };
    for (s, want) in [2.0f32, 1.0, 0.5, 0.25, 0.125].into_iter().enumerate() {
        close(
            run.temperature_at(s as u32),
            want,
            &format!("sweep {s} of 5"),
        );
    }
    // Sweeps 3..6 of a 9-sweep schedule from 2 to 1/8: 2 * 2^(-i/2) at sweep i.
    let part = GibbsOptions {
        sweeps: 3,
        schedule: Some((3, 9)),
        ..run.clone()
    };
    for s in 0..3u32 {
        let want = 2.0 * 2f32.powf(-((3 + s) as f32) / 2.0);
        close(
            part.temperature_at(s),
            want,
            &format!("sweep {} of 9", 3 + s),
        );
    }
    // The schedule's last sweep is at anneal_to.
    let last = GibbsOptions {
        sweeps: 2,
        schedule: Some((7, 9)),
        ..run.clone()
    };
    close(last.temperature_at(1), 0.125, "sweep 8 of 9");
    // Without anneal_to the temperature stays.
    let flat = GibbsOptions {
        anneal_to: None,
        ..run
    };
    close(flat.temperature_at(4), 2.0, "constant");
}

/// Same seed, same output: two GPU runs are identical and equal the CPU reference exactly
/// (so the Vulkan and GL runs of this test produce the same tokens). The hash is printed
/// for comparison across backends.
#[test]
fn same_seed_same_output() {
    let Some(ctx) = gpu() else { return };
    let (b, l, v) = (24usize, 9usize, 7usize);
    let m = Model::new(ctx, None, l, v, 0, 1.0, 1.0, 71);
    let init = random_tokens(b * l, v, 72);
    let opts = GibbsOptions {
        sweeps: 8,
        seed: 0xdead_beef_0bad_cafe,
        ..Default::default()
    };
    let (a, _) = run_gpu(ctx, &m, &init, [b, l], None, &opts);
    let (a2, _) = run_gpu(ctx, &m, &init, [b, l], None, &opts);
    assert_eq!(a, a2, "two runs with the same seed differ");
    let mut want = init.clone();
    reference::gibbs(&m.host, &mut want, &[b, l], None, &opts).unwrap();
    assert_eq!(a, want, "GPU differs from the CPU reference");
    let hash = a.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &t| {
        (h ^ t as u64).wrapping_mul(0x100_0000_01b3)
    });
    eprintln!("gibbs determinism hash: {hash:016x}");
    // The value both the Vulkan and the GL runs produced (and the CPU reference): a change
    // here means the random stream or the sampler changed.
    assert_eq!(hash, 0xc795_bcce_0682_1828);
    let other = GibbsOptions { seed: 1, ..opts };
    let (c, _) = run_gpu(ctx, &m, &init, [b, l], None, &other);
    assert_ne!(a, c, "a different seed gave the same chains");
}

/// A run split into parts (`GibbsOptions::part`), run one after another on the same tokens,
/// makes exactly the run's chains: the same Philox sweep indices and temperatures.
#[test]
fn parts_continue_a_run() {
    let run = GibbsOptions {
        sweeps: 10,
        temperature: 2.0,
        anneal_to: Some(0.05),
        seed: 5,
        first_sweep: 7,
        ..Default::default()
    };
    let mut at = 0;
    for n in [3u32, 3, 3, 1] {
        let p = run.part(at, n).unwrap();
        assert_eq!((p.first_sweep, p.sweeps, p.seed), (7 + at, n, 5));
        // A part of a part is a part of the run.
        if n > 1 {
            let q = p.part(1, n - 1).unwrap();
            assert_eq!(q.temperature_at(0), run.temperature_at(at + 1));
        }
        for s in 0..n {
            assert_eq!(
                p.temperature_at(s),
                run.temperature_at(at + s),
                "sweep {}",
                at + s
            );
        }
        at += n;
    }
    for (start, n) in [(0, 0), (8, 3), (u32::MAX, 2)] {
        assert!(
            matches!(run.part(start, n), Err(Error::InvalidOption(_))),
            "part({start}, {n})"
        );
    }
    // A schedule the run's sweeps do not fit in is refused.
    let outside = GibbsOptions {
        schedule: Some((5, 12)),
        ..run.clone()
    };
    assert!(matches!(outside.validate(), Err(Error::InvalidOption(_))));
    let icm = GibbsOptions {
        temperature: 0.0,
        ..Default::default()
    };
    let p = icm.part(40, 20).unwrap();
    assert_eq!((p.temperature, p.anneal_to), (0.0, None));

    let Some(ctx) = gpu() else { return };
    let (b, l, v) = (64, 9, 6);
    let m = Model::new(ctx, None, l, v, 0, 1.0, 1.0, 77);
    let init = random_tokens(b * l, v, 78);
    let (whole, _) = run_gpu(ctx, &m, &init, [b, l], None, &run);
    let mut state = init.clone();
    for (start, n) in [(0, 4), (4, 6)] {
        state = run_gpu(ctx, &m, &state, [b, l], None, &run.part(start, n).unwrap()).0;
    }
    assert_eq!(state, whole, "parts vs the whole run");
    assert!(agreement(&whole, &init) < 1.0, "chains never moved");
}

// ------------------------------------------------------- edge values, buffers, binding limits

/// Unary energies below the shaders' old sentinel (-3.0e38) still give a token of the
/// vocabulary, the reference's: site 0 holds f32::MIN for every token, site 2 also but
/// -3.2e38 at token 3 (itself below -3.0e38, it must win at any T: Gumbel noise cannot bridge
/// 2e37). W of a few units is rounded away at this size, so site 0's energies tie: token 0 at
/// T = 0, a uniform draw at T > 0 (the noise, not rounded away, decides). The rest are
/// ordinary sites. One invocation per site (V <= 64) and one workgroup per site.
#[test]
fn energies_below_the_sentinel_give_the_reference_token() {
    let Some(ctx) = gpu() else { return };
    let (b, l) = (3usize, 4usize);
    for v in [5usize, 64, 65, 300] {
        let mut unary = random(l * v, 91, -1.0, 1.0);
        unary[..v].fill(f32::MIN);
        unary[2 * v..3 * v].fill(f32::MIN);
        unary[2 * v + 3] = -3.2e38;
        let w = random(v * v, 92, -1.0, 1.0);
        let m = Model::dense(ctx, unary, [l, v], w);
        let init = random_tokens(b * l, v, 93);
        for temperature in [0.0, 1.0] {
            let opts = GibbsOptions {
                sweeps: 2,
                temperature,
                seed: 94,
                ..Default::default()
            };
            let (got, _) = run_gpu(ctx, &m, &init, [b, l], None, &opts);
            let mut want = init.clone();
            reference::gibbs(&m.host, &mut want, &[b, l], None, &opts).unwrap();
            for c in 0..b {
                assert_eq!(want[c * l + 2], 3, "V={v} T={temperature}: the reference");
                if temperature == 0.0 {
                    assert_eq!(want[c * l], 0, "V={v}: the reference at T = 0");
                }
            }
            assert_eq!(got, want, "V={v} T={temperature}");
        }
    }
}

/// An initial state whose buffer is larger than the tensor (as `GpuTensor::from_buffer`
/// allows) runs like the same state uploaded on its own.
#[test]
fn initial_state_in_a_larger_buffer() {
    let Some(ctx) = gpu() else { return };
    let (b, l, v) = (2usize, 3usize, 4usize);
    let m = Model::new(ctx, None, l, v, 0, 1.0, 1.0, 95);
    let init = random_tokens(b * l, v, 96);
    let buffer = common::app_buffer(
        ctx,
        256,
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
    );
    let big = GpuTensor::<u32>::from_buffer(ctx, buffer, [b, l]).unwrap();
    big.write(&init).unwrap();
    let opts = GibbsOptions {
        sweeps: 3,
        seed: 97,
        ..Default::default()
    };
    let got = ctx
        .gibbs(&m.gpu(), &big, None, &opts)
        .unwrap()
        .tokens
        .download()
        .unwrap();
    let (plain, _) = run_gpu(ctx, &m, &init, [b, l], None, &opts);
    assert_eq!(got, plain);
    let mut want = init.clone();
    reference::gibbs(&m.host, &mut want, &[b, l], None, &opts).unwrap();
    assert_eq!(got, want);
}

/// Model, clamp, best-state and MH tensors in application buffers larger than a storage
/// binding may be: each is bound by its bytes (whole-buffer bindings were a device error).
#[test]
fn tensors_in_buffers_larger_than_a_binding() {
    let Some(_) = gpu() else { return };
    let small = small_bindings(1 << 20);
    let (b, l, v) = (2usize, 5usize, 6usize);
    let m = Model::new(&small, None, l, v, 0, 1.0, 1.0, 51);
    let big = |t: &GpuTensor<f32>| in_oversized_buffer(&small, &t.download().unwrap(), t.shape());
    let (unary, w) = (big(&m.unary), big(&m.pa));
    let keep = [true, false, false, true, false];
    let keep_bytes: Vec<u8> = keep.iter().map(|&k| k as u8).collect();
    let clamp = in_oversized_buffer(&small, &keep_bytes, [l]);
    let init_host = random_tokens(b * l, v, 52);
    let init = small.upload(&init_host, [b, l]).unwrap();
    let opts = GibbsOptions {
        sweeps: 3,
        seed: 53,
        track_best: true,
        ..Default::default()
    };
    let model = ChainModel {
        unary: &unary,
        pairwise: Pairwise::Dense(&w),
    };
    let out = small.gibbs(&model, &init, Some(&clamp), &opts).unwrap();
    let mut want = init_host.clone();
    let best = reference::gibbs(&m.host, &mut want, &[b, l], Some((&keep, &[l])), &opts).unwrap();
    assert_eq!(out.tokens.download().unwrap(), want);
    let (best_tokens, _) = out.best.as_ref().unwrap();
    assert_eq!(best_tokens.download().unwrap(), best.unwrap().tokens);

    // A Metropolis-Hastings step with every tensor oversized.
    let (x, y) = (random_tokens(b * l, v, 54), random_tokens(b * l, v, 55));
    let sx = [0.5f32, -1.0];
    let (sy, qf, qb) = ([0.25f32, 2.0], [0.0f32, 0.1], [-0.5f32, 0.0]);
    let xt = in_oversized_buffer(&small, &x, [b, l]);
    let f = |d: &[f32]| in_oversized_buffer(&small, d, [b]);
    let (sxt, acc) = (f(&sx), in_oversized_buffer(&small, &[7u32; 2], [b]));
    let tensors = MhTensors {
        x: &xt,
        y: &in_oversized_buffer(&small, &y, [b, l]),
        score_x: &sxt,
        score_y: &f(&sy),
        log_q_fwd: &f(&qf),
        log_q_back: &f(&qb),
        accepted: &acc,
    };
    let o = MhOptions {
        seed: 56,
        ..Default::default()
    };
    small.mh_step(&tensors, v, &o).unwrap();
    let (mut hx, mut hsx) = (x.clone(), sx.to_vec());
    let want = reference::mh_step(&mut hx, &y, &[b, l], &mut hsx, &sy, &qf, &qb, &o).unwrap();
    let got: Vec<bool> = acc.download().unwrap().iter().map(|&a| a == 1).collect();
    assert_eq!(got, want);
    assert_eq!(xt.download().unwrap(), hx);
    assert_eq!(sxt.download().unwrap(), hsx);
}

/// A written tensor (best scores) whose buffer is also an input (the unary energies) is
/// refused before recording, naming both; it was a device error at submit.
#[test]
fn written_tensors_sharing_an_input_buffer_are_refused() {
    let Some(ctx) = gpu() else { return };
    let (b, l, v) = (2usize, 4usize, 5usize);
    let m = Model::new(ctx, None, l, v, 0, 1.0, 1.0, 61);
    let init = ctx.upload(&random_tokens(b * l, v, 62), [b, l]).unwrap();
    let best_tokens = ctx.zeros::<u32>([b, l]).unwrap();
    let in_unary = GpuTensor::<f32>::from_buffer(ctx, m.unary.buffer().clone(), [b]).unwrap();
    let g = seq_kernels::Gibbs::new(
        ctx,
        &GibbsOptions {
            sweeps: 1,
            ..Default::default()
        },
    );
    let r = g
        .unwrap()
        .plan(&m.gpu(), &init, None, Some((&best_tokens, &in_unary)));
    match r {
        Err(Error::InvalidOption(msg)) => {
            assert!(
                msg.contains("`best_score` is written") && msg.contains("`unary`"),
                "{msg}"
            )
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("best scores sharing the unary buffer were accepted"),
    }
    // Two written tensors in one buffer: wgpu allows it, the chains' tokens would take f32
    // score bits.
    let in_tokens = GpuTensor::<f32>::from_buffer(ctx, init.buffer().clone(), [b]).unwrap();
    let in_best = GpuTensor::<f32>::from_buffer(ctx, best_tokens.buffer().clone(), [b]).unwrap();
    let g = seq_kernels::Gibbs::new(ctx, &GibbsOptions::default()).unwrap();
    for (score, want) in [
        (&in_tokens, "`tokens` and `best_score` are both written"),
        (&in_best, "`best_tokens` and `best_score` are both written"),
    ] {
        match g.plan(&m.gpu(), &init, None, Some((&best_tokens, score))) {
            Err(Error::InvalidOption(msg)) => assert!(msg.contains(want), "{msg}"),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("accepted: {want}"),
        }
    }
    // MH: a written score in the states' buffer; acceptances in the proposals'.
    let x = ctx.upload(&[0u32; 4], [2, 2]).unwrap();
    let y = ctx.upload(&[0u32; 4], [2, 2]).unwrap();
    let two = || ctx.zeros::<f32>([2]).unwrap();
    let (sx, sy, qf, qb) = (two(), two(), two(), two());
    let acc = ctx.zeros::<u32>([2]).unwrap();
    let sx_in_x = GpuTensor::<f32>::from_buffer(ctx, x.buffer().clone(), [2]).unwrap();
    let acc_in_y = GpuTensor::<u32>::from_buffer(ctx, y.buffer().clone(), [2]).unwrap();
    let mh = MhTensors {
        x: &x,
        y: &y,
        score_x: &sx,
        score_y: &sy,
        log_q_fwd: &qf,
        log_q_back: &qb,
        accepted: &acc,
    };
    for (t, want) in [
        (
            MhTensors {
                score_x: &sx_in_x,
                ..mh
            },
            "`x` and `score_x` are both written",
        ),
        (
            MhTensors {
                accepted: &acc_in_y,
                ..mh
            },
            "`accepted` is written but its buffer is also bound as `y`",
        ),
    ] {
        match ctx.mh_step(&t, 10, &MhOptions::default()) {
            Err(Error::InvalidOption(msg)) => assert!(msg.contains(want), "{msg}"),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("accepted: {want}"),
        }
    }
    ctx.mh_step(&mh, 10, &MhOptions::default()).unwrap();
    // Sampled tokens in the logits' buffer: named by the call's own words.
    let logits = ctx.upload(&[0.0f32; 6], [2, 3]).unwrap();
    let out = GpuTensor::<u32>::from_buffer(ctx, logits.buffer().clone(), [2]).unwrap();
    match seq_kernels::Sampler::new(ctx, &SampleOptions::default())
        .unwrap()
        .plan(&logits, &out)
    {
        Err(Error::InvalidOption(msg)) => assert!(
            msg.contains("`out` is written") && msg.contains("`logits`"),
            "{msg}"
        ),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("sampled tokens in the logits' buffer were accepted"),
    }
}

/// A dense W larger than one binding is `LimitExceeded` naming the limit itself (its remedy, a
/// factorised W, is the caller's to choose), before anything runs.
#[test]
fn dense_w_past_the_binding_limit() {
    let Some(_) = gpu() else { return };
    let v = 40usize;
    let small = small_bindings(4096);
    let unary = small.upload(&vec![0.0f32; 2 * v], [2, v]).unwrap();
    let w = small.upload(&vec![0.0f32; v * v], [v, v]).unwrap();
    let tokens = small.zeros::<u32>([1, 2]).unwrap();
    let model = ChainModel {
        unary: &unary,
        pairwise: Pairwise::Dense(&w),
    };
    let r = small.gibbs(&model, &tokens, None, &GibbsOptions::default());
    match r {
        Err(Error::LimitExceeded {
            limit,
            needed,
            what,
            ..
        }) => {
            assert_eq!(limit, "max_storage_buffer_binding_size");
            assert_eq!(what, "bytes of the pairwise W [V, V]");
            assert_eq!(needed, (v * v * 4) as u64);
        }
        other => panic!("{:?}", other.err()),
    }
}

/// Per-chain unary, clamp masks and best states that fit a binding only a few chains at a
/// time run in chunks of chains. L is the offset alignment, so every per-chain row is a
/// whole multiple of it and a chunk may start at any chain; the binding holds 3 chains, fewer
/// than the alignment counts bytes, which the chunking once required. Both sweep paths.
#[test]
fn chains_split_past_the_binding_limit() {
    let Some(gpu_ctx) = gpu() else { return };
    let l = gpu_ctx.limits().min_storage_buffer_offset_alignment as usize;
    let b = 7;
    for v in [16usize, 80] {
        let chain_bytes = (l * v * 4) as u64;
        let ctx = &small_bindings(3 * chain_bytes + 256);
        assert_eq!(ctx.limits().min_storage_buffer_offset_alignment as usize, l);
        let m = Model::new(ctx, Some(b), l, v, 0, 1.0, 1.0, 98);
        let init = random_tokens(b * l, v, 99);
        let mask = common::random_mask(b * l, 100, 0.3);
        let opts = GibbsOptions {
            sweeps: 3,
            temperature: 1.5,
            seed: 101,
            track_best: true,
            ..Default::default()
        };
        let mask_shape = [b, l];
        let clamp = Some((&mask[..], &mask_shape[..]));
        let (got, best) = run_gpu(ctx, &m, &init, [b, l], clamp, &opts);
        let (bt, bs) = best.unwrap();
        let mut want = init.clone();
        let host_best = reference::gibbs(&m.host, &mut want, &[b, l], clamp, &opts)
            .unwrap()
            .unwrap();
        let a = agreement(&got, &want);
        assert!(a >= 0.999, "V={v}: agreement {a}");
        let a = agreement(&bt, &host_best.tokens);
        assert!(a >= 0.999, "V={v}: best-state agreement {a}");
        // Every chain's score lands in its own slot (f32 sums of O(1) terms: 1e-4).
        for c in 0..b {
            let true_score = m.host.score(c, &bt[c * l..(c + 1) * l]);
            assert!(
                (bs[c] as f64 - true_score).abs() < 1e-4,
                "V={v} chain {c}: {} vs {true_score}",
                bs[c]
            );
        }
    }
}

// ------------------------------------------------------------------------ logits sampling

#[test]
fn sampling_follows_the_reference() {
    let Some(ctx) = gpu() else { return };
    let opts = [
        SampleOptions::default(),
        SampleOptions {
            temperature: 0.0,
            ..Default::default()
        },
        SampleOptions {
            top_k: 5,
            seed: 3,
            ..Default::default()
        },
        SampleOptions {
            top_p: 0.8,
            temperature: 0.7,
            step: 9,
            ..Default::default()
        },
        SampleOptions {
            top_k: 20,
            top_p: 0.5,
            temperature: 1.5,
            seed: 11,
            ..Default::default()
        },
    ];
    // Logits rounded to quarters as well: many ties at the top-k threshold and in the kept
    // sets (the top-p slack itself is pinned by top_k_and_top_p_at_tied_thresholds).
    for &(b, v, quantised) in &[
        (300usize, 37usize, false),
        (6, 5000, false),
        (2000, 1, false),
        (300, 37, true),
        (40, 2000, true),
    ] {
        let mut logits = random(b * v, v as u64, -4.0, 4.0);
        if quantised {
            logits
                .iter_mut()
                .for_each(|z| *z = (*z * 4.0).round() / 4.0);
        }
        let t = ctx.upload(&logits, [b, v]).unwrap();
        for o in &opts {
            let got = ctx.sample_logits(&t, o).unwrap().download().unwrap();
            let want = reference::sample_logits(&logits, &[b, v], o).unwrap();
            let a = agreement(&got, &want);
            assert!(a >= 0.999, "b={b} V={v} {o:?}: agreement {a}");
            for (r, &x) in got.iter().enumerate() {
                assert!(reference::kept_tokens(&logits[r * v..(r + 1) * v], o)[x as usize]);
            }
        }
    }
}

/// f16 logits draw what the same values in f32 draw (they are widened exactly), on every
/// row chunking; other element types are refused.
#[test]
fn f16_logits_draw_as_their_f32_values() {
    let Some(gpu_ctx) = gpu() else { return };
    let (b, v) = (37, 301);
    let logits: Vec<f32> = random(b * v, 61, -6.0, 6.0)
        .into_iter()
        .map(|x| half::f16::from_f32(x).to_f32())
        .collect();
    let halves: Vec<half::f16> = logits.iter().map(|&x| half::f16::from_f32(x)).collect();
    // Whole bindings, and bindings of 4 KiB: 3 rows a chunk, the f16 words widened in pieces.
    for ctx in [gpu_ctx.clone(), small_bindings(4096)] {
        let (l32, l16) = (
            ctx.upload(&logits, [b, v]).unwrap(),
            ctx.upload(&halves, [b, v]).unwrap(),
        );
        for opts in [
            SampleOptions::default(),
            SampleOptions {
                temperature: 0.7,
                top_k: 20,
                top_p: 0.8,
                seed: 3,
                ..Default::default()
            },
            SampleOptions {
                temperature: 0.0,
                ..Default::default()
            },
        ] {
            let want = reference::sample_logits(&logits, &[b, v], &opts).unwrap();
            let from32 = ctx.sample_logits(&l32, &opts).unwrap().download().unwrap();
            let from16 = ctx.sample_logits(&l16, &opts).unwrap().download().unwrap();
            assert_eq!(from16, from32, "{opts:?}");
            assert!(agreement(&from16, &want) >= 0.999, "{opts:?}");
        }
        let ints = ctx.zeros::<u32>([b, v]).unwrap();
        let r = ctx.sample_logits(&ints, &SampleOptions::default());
        assert!(matches!(r, Err(Error::Dtype(_))), "{:?}", r.err());
    }
}

/// Many rows holding the same logits (independent draws: the row is in the counter) follow
/// the truncated, renormalised softmax: chi-square at p = 1e-4, fixed seed.
#[test]
fn sampling_frequencies_match_the_truncated_softmax() {
    let Some(ctx) = gpu() else { return };
    let v = 12;
    let row = random(v, 81, -2.0, 2.0);
    let b = 20000;
    let logits: Vec<f32> = (0..b).flat_map(|_| row.iter().copied()).collect();
    let t = ctx.upload(&logits, [b, v]).unwrap();
    for o in [
        SampleOptions {
            temperature: 0.8,
            seed: 5,
            ..Default::default()
        },
        SampleOptions {
            top_k: 6,
            top_p: 0.7,
            seed: 6,
            ..Default::default()
        },
    ] {
        let kept = reference::kept_tokens(&row, &o);
        let w: Vec<f64> = row
            .iter()
            .zip(&kept)
            .map(|(&z, &k)| {
                if k {
                    (z as f64 / o.temperature as f64).exp()
                } else {
                    0.0
                }
            })
            .collect();
        let total: f64 = w.iter().sum();
        let probs: Vec<f64> = w.iter().map(|x| x / total).collect();
        let got = ctx.sample_logits(&t, &o).unwrap().download().unwrap();
        let mut counts = vec![0usize; v];
        for x in got {
            counts[x as usize] += 1;
        }
        let p = chi2_pvalue(&counts, &probs);
        assert!(
            p > 1e-4,
            "{o:?}: p = {p:e}, counts {counts:?}, probs {probs:?}"
        );
    }
}

/// Logits below the shaders' old sentinel (-3.0e38), such as f32::MIN used as a mask value,
/// still give a token of the vocabulary, the reference's: where a whole row ties, token 0 at
/// T = 0 (ties go to the lowest v) and a uniform draw at T > 0; the largest where one entry
/// stands above f32::MIN (-3.2e38, itself below -3.0e38), at any T, as Gumbel noise (|T g|
/// of a few units) cannot bridge 2e37. V below and above the workgroup size.
#[test]
fn logits_below_the_sentinel_give_the_reference_token() {
    let Some(ctx) = gpu() else { return };
    let opts = [
        SampleOptions {
            temperature: 0.0,
            ..Default::default()
        },
        SampleOptions::default(),
        SampleOptions {
            top_k: 2,
            seed: 2,
            ..Default::default()
        },
        SampleOptions {
            top_p: 0.5,
            temperature: 0.7,
            seed: 3,
            ..Default::default()
        },
    ];
    for v in [5usize, 300] {
        // Row 0: all f32::MIN; row r > 0: f32::MIN but -3.2e38 at token (7 r) % V.
        let b = 4;
        let mut logits = vec![f32::MIN; b * v];
        for r in 1..b {
            logits[r * v + (7 * r) % v] = -3.2e38;
        }
        let x = ctx.upload(&logits, [b, v]).unwrap();
        for o in &opts {
            let got = ctx.sample_logits(&x, o).unwrap().download().unwrap();
            let want = reference::sample_logits(&logits, &[b, v], o).unwrap();
            // Row 0 ties throughout: token 0 at T = 0, else a uniform draw.
            let expect: Vec<u32> = (0..b).map(|r| ((7 * r) % v) as u32).collect();
            let from = usize::from(o.temperature > 0.0);
            assert_eq!(want[from..], expect[from..], "V={v} {o:?}: the reference");
            assert_eq!(got, want, "V={v} {o:?}");
        }
        // -inf lies outside WGSL's finite math, so only the firm promise is checked: a token
        // inside the vocabulary.
        let inf = vec![f32::NEG_INFINITY; b * v];
        let x = ctx.upload(&inf, [b, v]).unwrap();
        for o in &opts[..3] {
            let got = ctx.sample_logits(&x, o).unwrap().download().unwrap();
            assert!(
                got.iter().all(|&t| (t as usize) < v),
                "V={v} {o:?}: {got:?}"
            );
        }
    }
}

/// Gumbel-max draws depend on differences of logits (energies), so shifting them all, or
/// scaling them and T by a power of two, must not change a single token while the
/// differences stay exact in f32: integers k in [-4, 4] as they are, plus 4e6, plus
/// 16777200 (near 2^24), and 8192 + k / 512 at T = 1 / 512. Adding the noise to the large
/// value first rounded it away: 1-5% of draws moved, and all of them towards the top token.
/// Logits sampling (one invocation per token, V below and above the workgroup) and Gibbs
/// chains with integer W (one invocation per site, V <= 64, and one workgroup per site).
#[test]
fn draws_depend_on_differences_only() {
    let Some(ctx) = gpu() else { return };
    let variants = [
        (0.0f32, 1.0f32, 1.0f32),
        (4e6, 1.0, 1.0),
        (16777200.0, 1.0, 1.0),
        (8192.0, 1.0 / 512.0, 1.0 / 512.0),
    ];
    let integers = |n: usize, seed: u64| -> Vec<f32> {
        random_tokens(n, 9, seed)
            .into_iter()
            .map(|k| k as f32 - 4.0)
            .collect()
    };
    for v in [5usize, 300] {
        let b = 2000;
        let k = integers(b * v, v as u64);
        let mut first: Option<Vec<u32>> = None;
        for &(shift, scale, temperature) in &variants {
            let logits: Vec<f32> = k.iter().map(|&z| shift + z * scale).collect();
            let opts = SampleOptions {
                temperature,
                top_k: 4,
                seed: 5,
                ..Default::default()
            };
            let x = ctx.upload(&logits, [b, v]).unwrap();
            let got = ctx.sample_logits(&x, &opts).unwrap().download().unwrap();
            let want = reference::sample_logits(&logits, &[b, v], &opts).unwrap();
            let a = agreement(&got, &want);
            assert!(
                a >= 0.999,
                "V={v} shift {shift}: agreement {a} with the reference"
            );
            match &first {
                None => first = Some(got),
                Some(f) => assert_eq!(agreement(&got, f), 1.0, "V={v} shift {shift} scale {scale}"),
            }
        }
    }
    let (b, l) = (500usize, 3usize);
    for v in [5usize, 300] {
        let k = integers(l * v, 7 + v as u64);
        let w = integers(v * v, 8);
        let init = random_tokens(b * l, v, 9);
        let mut first: Option<Vec<u32>> = None;
        for &(shift, scale, temperature) in &variants {
            let unary: Vec<f32> = k.iter().map(|&z| shift + z * scale).collect();
            let w: Vec<f32> = w.iter().map(|&z| z * scale).collect();
            let m = Model::dense(ctx, unary, [l, v], w);
            let opts = GibbsOptions {
                sweeps: 3,
                temperature,
                seed: 10,
                ..Default::default()
            };
            let (got, _) = run_gpu(ctx, &m, &init, [b, l], None, &opts);
            let mut want = init.clone();
            reference::gibbs(&m.host, &mut want, &[b, l], None, &opts).unwrap();
            let a = agreement(&got, &want);
            assert!(
                a >= 0.999,
                "Gibbs V={v} shift {shift}: agreement {a} with the reference"
            );
            match &first {
                None => first = Some(got),
                Some(f) => assert_eq!(
                    agreement(&got, f),
                    1.0,
                    "Gibbs V={v} shift {shift} scale {scale}"
                ),
            }
        }
    }
}

/// At T = 0 the workgroup argmax compares values as they are: the smallest normal and its
/// neighbour (which halving would merge) in lanes of one workgroup still give the larger,
/// for logits sampling and Gibbs sites (L = 1, W = 0) alike. The reference compares an
/// infinite logit as it is, not relative to itself (inf - inf).
#[test]
fn zero_temperature_separates_the_smallest_normals() {
    let Some(ctx) = gpu() else { return };
    let v = 300;
    let mut row = vec![-1.0f32; v];
    row[0] = f32::MIN_POSITIVE;
    row[4] = f32::from_bits(0x0080_0001);
    let greedy = SampleOptions {
        temperature: 0.0,
        ..Default::default()
    };
    let x = ctx.upload(&row, [1, v]).unwrap();
    let got = ctx.sample_logits(&x, &greedy).unwrap().download().unwrap();
    assert_eq!(got, [4]);
    assert_eq!(
        reference::sample_logits(&row, &[1, v], &greedy).unwrap(),
        [4]
    );
    let m = Model::dense(ctx, row, [1, v], vec![0.0; v * v]);
    let opts = GibbsOptions {
        sweeps: 1,
        temperature: 0.0,
        ..Default::default()
    };
    let (got, _) = run_gpu(ctx, &m, &[0u32], [1, 1], None, &opts);
    assert_eq!(got, [4]);
    let inf = [0.0, f32::INFINITY, 1.0];
    for o in [SampleOptions::default(), greedy] {
        assert_eq!(
            reference::sample_logits(&inf, &[1, 3], &o).unwrap(),
            [1],
            "{o:?}"
        );
    }
}

/// -0.0 and +0.0 are equal logits (the GPU orders logits by an integer key, which once put
/// -0.0 below +0.0): top_k = 1 keeps both, drawn about equally often; a top_p that one zero
/// reaches keeps the lower index only, as the smallest set does, whichever sign it has.
#[test]
fn signed_zeros_tie_at_the_top_k_and_top_p_threshold() {
    let Some(ctx) = gpu() else { return };
    let b = 400;
    for row in [[-0.0f32, 0.0, -5.0], [0.0, -0.0, -5.0]] {
        let logits: Vec<f32> = (0..b).flat_map(|_| row).collect();
        let x = ctx.upload(&logits, [b, 3]).unwrap();
        for (o, kept) in [
            (
                SampleOptions {
                    top_k: 1,
                    seed: 1,
                    ..Default::default()
                },
                [true, true, false],
            ),
            (
                SampleOptions {
                    top_p: 0.3,
                    seed: 1,
                    ..Default::default()
                },
                [true, false, false],
            ),
        ] {
            assert_eq!(reference::kept_tokens(&row, &o), kept);
            let got = ctx.sample_logits(&x, &o).unwrap().download().unwrap();
            let want = reference::sample_logits(&logits, &[b, 3], &o).unwrap();
            let a = agreement(&got, &want);
            assert!(a >= 0.999, "{row:?} {o:?}: agreement {a}");
            for t in [0, 1] {
                let n = got.iter().filter(|&&x| x == t).count();
                let expect = if kept[t as usize] { n > b / 4 } else { n == 0 };
                assert!(expect, "{row:?} {o:?}: token {t} drawn {n} of {b} times");
            }
        }
    }
}

/// Top-p's masses are workgroup sums over every lane: here all the probability sits on the
/// tokens of the workgroup's last lanes (v % 256 >= 248, the last subgroup wherever subgroups
/// have 8 lanes or more; V = 4096 takes 256 lanes), with distinct logits -0.05 j, so p = 0.5
/// keeps their top 14 of 128. Every draw must lie in the kept set and equal the reference.
#[test]
fn top_p_mass_held_by_the_last_lanes() {
    let Some(ctx) = gpu() else { return };
    let (b, v) = (64usize, 4096usize);
    let mut row = vec![-30.0f32; v];
    let hot: Vec<usize> = (0..v).filter(|t| t % 256 >= 248).collect();
    for (j, &t) in hot.iter().enumerate() {
        row[t] = -0.05 * j as f32;
    }
    let logits: Vec<f32> = (0..b).flat_map(|_| row.iter().copied()).collect();
    let o = SampleOptions {
        top_p: 0.5,
        seed: 21,
        ..Default::default()
    };
    let kept = reference::kept_tokens(&row, &o);
    assert_eq!(kept.iter().filter(|&&k| k).count(), 14);
    let got = ctx
        .sample_logits(&ctx.upload(&logits, [b, v]).unwrap(), &o)
        .unwrap()
        .download()
        .unwrap();
    let want = reference::sample_logits(&logits, &[b, v], &o).unwrap();
    for r in 0..b {
        assert!(
            kept[got[r] as usize],
            "row {r}: token {} is not kept",
            got[r]
        );
    }
    assert_eq!(got, want);
}

/// Top-p keeps the smallest set reaching p (as Hugging Face's samplers;
/// within the 2^-14 of `SampleOptions::top_p_goal`): of logits tied at its threshold,
/// only as many as the goal needs, lowest indices first; top-k keeps every tie of its k-th
/// logit. Every token of the kept set expected at least 20 times among the draws is drawn,
/// none outside it, and the draws follow the truncated softmax (chi-square at p = 1e-4,
/// fixed seeds). V below and above the workgroup size; top-k kept sets that fit the
/// sampler's 1024 gathered candidates and one that does not (1500 ties: the whole-row path);
/// ties whose shares land exactly on p (10 ties and p = 0.1 or 0.5), where f32 sums once
/// kept one token fewer than the reference.
#[test]
fn top_k_and_top_p_at_tied_thresholds() {
    let Some(ctx) = gpu() else { return };
    let base = [2.0f32, 1.0, 0.5, 0.0, -1.0, 1.0, 3.0, -0.3];
    let ties = [1.0f32, 3.0, 0.0, 3.0, 3.0, -1.0];
    let ten = [0.5f32; 10];
    // Ten ties at 2.0 above 888 logits at -19.0 (a tail of 6.7e-8 of the mass).
    let ten_tail: Vec<f32> = (0..898).map(|i| if i < 10 { 2.0 } else { -19.0 }).collect();
    // 234 tokens tied at 1.0 and 466 at -9.0 (4.5e-5 of a tied token's weight each).
    let wide: Vec<f32> = (0..700)
        .map(|i| if i % 3 == 0 { 1.0 } else { -9.0 })
        .collect();
    // 1500 tokens tied at 1.0 and 1500 at -9.0.
    let wider: Vec<f32> = (0..3000)
        .map(|i| if i % 2 == 0 { 1.0 } else { -9.0 })
        .collect();
    let every = |step: usize, n: usize| -> Vec<usize> { (0..).step_by(step).take(n).collect() };
    let cases: [(&[f32], usize, f32, Vec<usize>); 12] = [
        // Probabilities 0.548 (token 6), 0.2015 (0), 0.0741 (1 and 5, tied): 0.8 needs one of
        // the tied pair, token 1.
        (&base, 0, 0.8, vec![0, 1, 6]),
        (&ties, 0, 1e-6, vec![1]),
        (&ties, 2, 1.0, vec![1, 3, 4]),
        (&ten, 0, 0.1, vec![0]),
        (&ten, 0, 0.5, every(1, 5)),
        (&ten_tail, 0, 0.5, every(1, 5)),
        (&ten_tail, 9, 0.5, every(1, 5)),
        (&ten_tail, 9, 0.1, vec![0]),
        // Half the mass (117.01 tied weights, less the slack) needs 117 of the tied tokens.
        (&wide, 0, 0.5, every(3, 117)),
        (&wide, 3, 0.5, every(3, 117)),
        (&wider, 10, 1.0, every(2, 1500)),
        (&wider, 10, 0.1, every(2, 150)),
    ];
    // The slack is absolute: near p = 1 it cuts no more than 2^-14 of probability (a relative
    // slack once dropped this 3e-4 token at p = 0.9999).
    let tail = [0.0f32, (3e-4f32 / 0.9997).ln()];
    let near_one = SampleOptions {
        top_p: 0.9999,
        ..Default::default()
    };
    assert_eq!(reference::kept_tokens(&tail, &near_one), [true, true]);
    let b = 4000;
    for (row, top_k, top_p, want_kept) in cases {
        let v = row.len();
        let o = SampleOptions {
            top_k,
            top_p,
            seed: 21,
            ..Default::default()
        };
        let kept = reference::kept_tokens(row, &o);
        let kept_idx: Vec<usize> = (0..v).filter(|&i| kept[i]).collect();
        assert_eq!(kept_idx, want_kept, "reference kept set, V {v} {o:?}");
        let logits: Vec<f32> = (0..b).flat_map(|_| row.iter().copied()).collect();
        let x = ctx.upload(&logits, [b, v]).unwrap();
        let got = ctx.sample_logits(&x, &o).unwrap().download().unwrap();
        let mut counts = vec![0usize; v];
        for t in got {
            assert!(
                kept[t as usize],
                "V {v} {o:?}: token {t} is outside the kept set"
            );
            counts[t as usize] += 1;
        }
        let w: Vec<f64> = (0..v)
            .map(|i| if kept[i] { (row[i] as f64).exp() } else { 0.0 })
            .collect();
        let total: f64 = w.iter().sum();
        let probs: Vec<f64> = w.iter().map(|x| x / total).collect();
        for i in 0..v {
            if probs[i] * b as f64 >= 20.0 {
                assert!(counts[i] > 0, "V {v} {o:?}: kept token {i} never drawn");
            }
        }
        let p = chi2_pvalue(&counts, &probs);
        assert!(p > 1e-4, "V {v} {o:?}: p = {p:e}");
    }
}

/// Logits rows that fit a binding only a few at a time run in chunks of rows, each chunk
/// starting at any row (the shader adds the row's offset inside the binding): rows of a whole
/// multiple of the offset alignment, and rows of an odd number of logits.
#[test]
fn sampling_splits_rows_past_the_binding_limit() {
    let Some(_) = gpu() else { return };
    let align = small_bindings(8192)
        .limits()
        .min_storage_buffer_offset_alignment as usize;
    // A row of 16 x align bytes; the 8 KiB binding holds fewer rows than the alignment counts
    // bytes, which the chunking once required.
    assert!(8192 / (16 * align) < align && 70 * 16 * align > 8192);
    sample_in_small_bindings(8192, 70, 4 * align);
    // Rows of 4004 bytes in 64 KiB bindings: refused while chunks had to start aligned (then
    // 64 rows, 256 KB, a chunk).
    sample_in_small_bindings(65536, 70, 1001);
}

fn sample_in_small_bindings(binding: u64, b: usize, v: usize) {
    let ctx = &small_bindings(binding);
    let logits = random(b * v, 17, -3.0, 3.0);
    let x = ctx.upload(&logits, [b, v]).unwrap();
    for o in [
        SampleOptions::default(),
        SampleOptions {
            top_k: 9,
            top_p: 0.8,
            seed: 4,
            step: 2,
            ..Default::default()
        },
    ] {
        let got = ctx.sample_logits(&x, &o).unwrap().download().unwrap();
        let want = reference::sample_logits(&logits, &[b, v], &o).unwrap();
        let a = agreement(&got, &want);
        assert!(a >= 0.999, "{o:?}: agreement {a}");
    }
}

// ------------------------------------------------------------------------------- MH step

#[test]
fn mh_step_follows_the_reference_and_accepts_at_the_right_rate() {
    let Some(ctx) = gpu() else { return };
    let (b, l) = (20000usize, 3usize);
    let x = random_tokens(b * l, 50, 91);
    let y = random_tokens(b * l, 50, 92);
    // Half the chains: delta = -1 (accept with prob e^-1); the rest random.
    let sx = random(b, 93, -3.0, 3.0);
    let sy: Vec<f32> = (0..b)
        .map(|c| {
            if c % 2 == 0 {
                sx[c] - 0.5
            } else {
                sx[c] + random(1, c as u64, -2.0, 2.0)[0]
            }
        })
        .collect();
    let qf: Vec<f32> = (0..b)
        .map(|c| if c % 2 == 0 { 0.25 } else { 0.1 })
        .collect();
    let qb: Vec<f32> = (0..b)
        .map(|c| if c % 2 == 0 { -0.25 } else { -0.3 })
        .collect();
    let o = MhOptions {
        seed: 12,
        step: 3,
        ..Default::default()
    };
    let xt = ctx.upload(&x, [b, l]).unwrap();
    let yt = ctx.upload(&y, [b, l]).unwrap();
    let sxt = ctx.upload(&sx, [b]).unwrap();
    let acc = ctx.zeros::<u32>([b]).unwrap();
    let tensors = MhTensors {
        x: &xt,
        y: &yt,
        score_x: &sxt,
        score_y: &ctx.upload(&sy, [b]).unwrap(),
        log_q_fwd: &ctx.upload(&qf, [b]).unwrap(),
        log_q_back: &ctx.upload(&qb, [b]).unwrap(),
        accepted: &acc,
    };
    ctx.mh_step(&tensors, 50, &o).unwrap();
    let mut hx = x.clone();
    let mut hsx = sx.clone();
    let want = reference::mh_step(&mut hx, &y, &[b, l], &mut hsx, &sy, &qf, &qb, &o).unwrap();
    let got: Vec<bool> = acc.download().unwrap().iter().map(|&a| a == 1).collect();
    let same = got.iter().zip(&want).filter(|(a, b)| a == b).count();
    assert!(same as f64 >= 0.999 * b as f64, "{same} of {b} agree");
    let gx = xt.download().unwrap();
    let gsx = sxt.download().unwrap();
    for c in 0..b {
        let r = c * l..(c + 1) * l;
        let expect: &[u32] = if got[c] { &y[r.clone()] } else { &x[r.clone()] };
        assert_eq!(&gx[r], expect, "chain {c}");
        assert_eq!(gsx[c], if got[c] { sy[c] } else { sx[c] });
        if got[c] == want[c] {
            assert_eq!(&gx[c * l..(c + 1) * l], &hx[c * l..(c + 1) * l]);
            assert_eq!(gsx[c], hsx[c]);
        }
    }
    // Acceptance rate of the delta = -1 half: e^-1 = 0.3679; 10000 draws give a standard
    // deviation of 0.0048, so 5 sigma is 0.024.
    let rate = (0..b).step_by(2).filter(|&c| got[c]).count() as f64 / (b / 2) as f64;
    assert!(
        (rate - (-1.0f64).exp()).abs() < 0.024,
        "acceptance rate {rate}"
    );
}

/// The MH step's uniform: accepting iff log U < delta with U = ((r >> 8) + 0.5) 2^-24 from
/// Philox word 0 of counter (0, 0xffffffff, chain, step), resolved to 1e-4 of log U. Each chain's
/// delta sits 1e-4 of |log U| above (even chains: accepted) or below (odd: refused) its own
/// log U, over 8192 chains: both branches of the device's -log U (U below 1/2, and 1 - U with
/// its series near 1), and a chain of seed 15 whose r >> 8 is 4, where the half step in U
/// moves log U by 10%. The other MH tests' random deltas rarely come this close.
#[test]
fn mh_step_resolves_log_u_at_every_scale() {
    let Some(ctx) = gpu() else { return };
    let (b, l) = (8192usize, 1usize);
    let o = MhOptions {
        seed: 15,
        step: 0,
        ..Default::default()
    };
    let key = reference::seed_key(o.seed);
    let r: Vec<u32> = (0..b as u32)
        .map(|c| reference::philox4x32_10([0, u32::MAX, c, o.step], key)[0])
        .collect();
    // The extremes this seed reaches: U of 4.5 * 2^-24, and 1 - U of 7367.5 * 2^-24.
    assert_eq!(r.iter().map(|&r| r >> 8).min(), Some(4));
    assert_eq!(r.iter().map(|&r| r >> 8).max(), Some(0xff_ffff - 7367));
    let target: Vec<f32> = (0..b)
        .map(|c| {
            let log_u = reference::uniform(r[c]).ln();
            (log_u * if c % 2 == 0 { 1.0 - 1e-4 } else { 1.0 + 1e-4 }) as f32
        })
        .collect();
    // delta = (score_y - score_x) / T + log q(x <- y) - log q(y <- x) = target exactly.
    let zeros = vec![0.0f32; b];
    let x = vec![0u32; b * l];
    let y = vec![1u32; b * l];
    let acc = ctx.zeros::<u32>([b]).unwrap();
    let tensors = MhTensors {
        x: &ctx.upload(&x, [b, l]).unwrap(),
        y: &ctx.upload(&y, [b, l]).unwrap(),
        score_x: &ctx.upload(&zeros, [b]).unwrap(),
        score_y: &ctx.upload(&zeros, [b]).unwrap(),
        log_q_fwd: &ctx.upload(&zeros, [b]).unwrap(),
        log_q_back: &ctx.upload(&target, [b]).unwrap(),
        accepted: &acc,
    };
    ctx.mh_step(&tensors, 2, &o).unwrap();
    let got: Vec<bool> = acc.download().unwrap().iter().map(|&a| a == 1).collect();
    let (mut hx, mut hsx) = (x.clone(), zeros.clone());
    let want =
        reference::mh_step(&mut hx, &y, &[b, l], &mut hsx, &zeros, &zeros, &target, &o).unwrap();
    for c in 0..b {
        assert_eq!(want[c], c % 2 == 0, "reference, chain {c}");
        assert_eq!(
            got[c],
            want[c],
            "chain {c}: log U = {}, delta = {}",
            reference::uniform(r[c]).ln(),
            target[c]
        );
    }
}

/// At T = 0 the MH step accepts iff score(y) >= score(x), ties included; the proposal terms
/// do not count (here they would reverse every decision if they did). The other MH tests all
/// run at T = 1.
#[test]
fn mh_step_at_zero_temperature_accepts_iff_not_worse() {
    let Some(ctx) = gpu() else { return };
    let (b, l, v) = (6usize, 3usize, 10usize);
    let x = random_tokens(b * l, v, 101);
    let y = random_tokens(b * l, v, 102);
    let sx = [0.0f32, 1.0, -2.0, 3.5, 0.25, -1.0];
    let sy = [0.5f32, 1.0, -2.5, 3.5, 0.0, 4.0];
    let accept = [true, true, false, true, false, true];
    let qf: Vec<f32> = accept
        .iter()
        .map(|&a| if a { 50.0 } else { -50.0 })
        .collect();
    let qb: Vec<f32> = qf.iter().map(|q| -q).collect();
    let o = MhOptions {
        temperature: 0.0,
        seed: 103,
        step: 1,
    };
    let xt = ctx.upload(&x, [b, l]).unwrap();
    let sxt = ctx.upload(&sx, [b]).unwrap();
    let acc = ctx.zeros::<u32>([b]).unwrap();
    let tensors = MhTensors {
        x: &xt,
        y: &ctx.upload(&y, [b, l]).unwrap(),
        score_x: &sxt,
        score_y: &ctx.upload(&sy, [b]).unwrap(),
        log_q_fwd: &ctx.upload(&qf, [b]).unwrap(),
        log_q_back: &ctx.upload(&qb, [b]).unwrap(),
        accepted: &acc,
    };
    ctx.mh_step(&tensors, v, &o).unwrap();
    let got: Vec<bool> = acc.download().unwrap().iter().map(|&a| a == 1).collect();
    assert_eq!(got, accept);
    let (gx, gsx) = (xt.download().unwrap(), sxt.download().unwrap());
    for c in 0..b {
        let r = c * l..(c + 1) * l;
        let expect = if accept[c] {
            &y[r.clone()]
        } else {
            &x[r.clone()]
        };
        assert_eq!(&gx[r], expect, "chain {c}");
        assert_eq!(gsx[c], if accept[c] { sy[c] } else { sx[c] }, "chain {c}");
    }
    let (mut hx, mut hsx) = (x.clone(), sx.to_vec());
    let want = reference::mh_step(&mut hx, &y, &[b, l], &mut hsx, &sy, &qf, &qb, &o).unwrap();
    assert_eq!(want, accept, "reference");
}

// ------------------------------------------------------------------------------ bad input

/// Shapes whose element count overflows usize are shape errors in the reference, which
/// takes any dims (a wrapped product would let two values pass for 2^63 + 1 rows); a
/// temperature past MAX_TEMPERATURE is an option error (T times a Gumbel draw would
/// overflow f32).
#[test]
fn overflowing_shapes_and_temperatures_are_errors() {
    let w = (1usize << 63) + 1;
    let huge = |r: Result<Vec<u32>, Error>| {
        assert!(
            matches!(&r, Err(Error::Shape(m)) if m.contains("more elements than memory")),
            "{r:?}"
        )
    };
    huge(reference::sample_logits(
        &[1.0, 2.0],
        &[w, 2],
        &Default::default(),
    ));
    let model = HostModel {
        unary: vec![0.0; 8],
        unary_shape: vec![2, 4],
        pairwise: HostPairwise::Dense(vec![0.0; 16]),
    };
    let mut tokens = vec![0u32; 2];
    let r = reference::gibbs(&model, &mut tokens, &[w, 2], None, &Default::default());
    assert!(matches!(&r, Err(Error::Shape(_))), "{:?}", r.err());
    let mut score = vec![0.0f32; 2];
    let r = reference::mh_step(
        &mut [],
        &[],
        &[2, 1 << 63],
        &mut score,
        &[1.0, 1.0],
        &[0.0, 0.0],
        &[0.0, 0.0],
        &MhOptions::default(),
    );
    assert!(
        matches!(&r, Err(Error::Shape(m)) if m.contains("more elements than memory")),
        "{r:?}"
    );
    // Too large, or subnormal (which GPUs may flush to 0, greedy, while the CPU samples).
    for t in [3e38f32, 1.01e30, 1e-45, 1e-39] {
        let sample = SampleOptions {
            temperature: t,
            ..Default::default()
        };
        assert!(
            matches!(sample.validate(), Err(Error::InvalidOption(_))),
            "{t}"
        );
        let gibbs = GibbsOptions {
            temperature: t,
            ..Default::default()
        };
        assert!(
            matches!(gibbs.validate(), Err(Error::InvalidOption(_))),
            "{t}"
        );
        let anneal = GibbsOptions {
            anneal_to: Some(t),
            ..Default::default()
        };
        assert!(
            matches!(anneal.validate(), Err(Error::InvalidOption(_))),
            "{t}"
        );
    }
    let at_most = SampleOptions {
        temperature: 1e30,
        ..Default::default()
    };
    assert!(at_most.validate().is_ok());
    // At the largest temperature the GPU's f32 draws are still the reference's tokens.
    if let Some(ctx) = gpu() {
        let logits = random(64 * 8, 21, -4.0, 4.0);
        let t = ctx.upload(&logits, [64, 8]).unwrap();
        let got = ctx.sample_logits(&t, &at_most).unwrap().download().unwrap();
        let want = reference::sample_logits(&logits, &[64, 8], &at_most).unwrap();
        assert_eq!(got, want);
        // A plan with more sweeps than one plan records is refused before anything is
        // allocated for it.
        let unary = ctx.upload(&[0.0f32; 8], [2, 4]).unwrap();
        let w = ctx.upload(&[0.0f32; 16], [4, 4]).unwrap();
        let tokens = ctx.zeros::<u32>([3, 2]).unwrap();
        let endless = GibbsOptions {
            sweeps: u32::MAX,
            ..Default::default()
        };
        let model = ChainModel {
            unary: &unary,
            pairwise: Pairwise::Dense(&w),
        };
        let r = Gibbs::new(ctx, &endless)
            .unwrap()
            .plan(&model, &tokens, None, None);
        assert!(
            matches!(&r, Err(Error::InvalidOption(m)) if m.contains("GibbsOptions::part")),
            "{:?}",
            r.err()
        );
    }
}

#[test]
fn bad_input_is_an_error() {
    // Shape checks shared by GPU and reference need no adapter.
    assert!(matches!(
        chain_shape(&[4, 0], &[&[0, 0]], &[2, 4], None),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        chain_shape(&[4, 3], &[&[3, 3]], &[2, 5], None),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        chain_shape(&[3, 4, 3], &[&[3, 3]], &[2, 4], None),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        chain_shape(&[4, 3], &[&[3, 4]], &[2, 4], None),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        chain_shape(&[4, 3], &[&[3, 2], &[3, 3]], &[2, 4], None),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        chain_shape(&[4, 3], &[&[3, 3]], &[2, 4], Some(&[3])),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        chain_shape(&[4, 3], &[&[3, 3]], &[8], None),
        Err(Error::Shape(_))
    ));
    assert!(chain_shape(&[2, 4, 3], &[&[3, 2], &[3, 2]], &[2, 4], Some(&[2, 4])).is_ok());
    let bad_t = GibbsOptions {
        temperature: -1.0,
        ..Default::default()
    };
    assert!(matches!(bad_t.validate(), Err(Error::InvalidOption(_))));
    let bad_anneal = GibbsOptions {
        temperature: 0.0,
        anneal_to: Some(0.1),
        ..Default::default()
    };
    assert!(bad_anneal.validate().is_err());
    let host = HostModel {
        unary: vec![0.0; 6],
        unary_shape: vec![2, 3],
        pairwise: HostPairwise::Dense(vec![0.0; 9]),
    };
    let mut toks = vec![0u32, 3];
    assert!(matches!(
        reference::gibbs(&host, &mut toks, &[1, 2], None, &GibbsOptions::default()),
        Err(Error::InvalidOption(_))
    ));
    assert!(SampleOptions {
        top_p: 0.0,
        ..Default::default()
    }
    .validate()
    .is_err());
    assert!(SampleOptions {
        temperature: f32::NAN,
        ..Default::default()
    }
    .validate()
    .is_err());
    assert!(MhOptions {
        temperature: -0.5,
        ..Default::default()
    }
    .validate()
    .is_err());

    let Some(ctx) = gpu() else { return };
    let m = Model::new(ctx, None, 4, 3, 0, 1.0, 1.0, 101);
    let opts = GibbsOptions::default();
    // Token >= V, negative i32 token.
    let t = ctx.upload(&[0u32, 1, 2, 3, 0, 0, 0, 0], [2, 4]).unwrap();
    let e = ctx
        .gibbs(&m.gpu(), &t, None, &opts)
        .err()
        .expect("token 3 with V = 3");
    assert!(e.to_string().contains("vocabulary"), "{e}");
    let t = ctx.upload(&[0i32, 1, 2, -1, 0, 0, 0, 0], [2, 4]).unwrap();
    assert!(ctx.gibbs(&m.gpu(), &t, None, &opts).is_err());
    // Shapes that do not match.
    let t = ctx.upload(&[0u32; 10], [2, 5]).unwrap();
    assert!(matches!(
        ctx.gibbs(&m.gpu(), &t, None, &opts),
        Err(Error::Shape(_))
    ));
    let t = ctx.upload(&[0u32; 8], [2, 4]).unwrap();
    let c = ctx.upload_mask(&[true; 3], [3]).unwrap();
    assert!(matches!(
        ctx.gibbs(&m.gpu(), &t, Some(&c), &opts),
        Err(Error::Shape(_))
    ));
    // Wrong dtype of tokens, negative temperature.
    let f = ctx.upload(&[0.0f32; 8], [2, 4]).unwrap();
    assert!(matches!(
        ctx.gibbs(&m.gpu(), &f, None, &opts),
        Err(Error::Dtype(_))
    ));
    assert!(matches!(
        ctx.gibbs(&m.gpu(), &t, None, &bad_t),
        Err(Error::InvalidOption(_))
    ));
    // Sampling: wrong output shape, bad top_p.
    let logits = ctx.upload(&[0.0f32; 6], [2, 3]).unwrap();
    let out = ctx.zeros::<u32>([3]).unwrap();
    assert!(matches!(
        seq_kernels::Sampler::new(ctx, &SampleOptions::default())
            .unwrap()
            .plan(&logits, &out),
        Err(Error::Shape(_))
    ));
    assert!(ctx
        .sample_logits(
            &logits,
            &SampleOptions {
                top_p: 1.5,
                ..Default::default()
            }
        )
        .is_err());
    // MH: score shape mismatch; proposal outside the vocabulary.
    let x = ctx.upload(&[0u32; 4], [2, 2]).unwrap();
    let y = ctx.upload(&[0u32, 1, 2, 9], [2, 2]).unwrap();
    let one = ctx.upload(&[0.0f32], [1]).unwrap();
    let two = || ctx.upload(&[0.0f32; 2], [2]).unwrap();
    let (sx, sy, qf, qb) = (two(), two(), two(), two());
    let acc = ctx.zeros::<u32>([2]).unwrap();
    let mut mh = MhTensors {
        x: &x,
        y: &y,
        score_x: &sx,
        score_y: &one,
        log_q_fwd: &qf,
        log_q_back: &qb,
        accepted: &acc,
    };
    assert!(matches!(
        ctx.mh_step(&mh, 10, &MhOptions::default()),
        Err(Error::Shape(_))
    ));
    mh.score_y = &sx;
    assert!(matches!(
        ctx.mh_step(&mh, 10, &MhOptions::default()),
        Err(Error::InvalidOption(_))
    ));
    mh.score_y = &sy;
    assert!(ctx.mh_step(&mh, 10, &MhOptions::default()).is_ok());
    assert!(ctx.mh_step(&mh, 5, &MhOptions::default()).is_err());
}

// ------------------------------------------------------------------------------- CLI

#[cfg(feature = "cli")]
mod cli {
    use super::*;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    use crate::common::{load_npy, save_npy as save};

    fn load_i32(path: &Path) -> (Vec<u64>, Vec<i32>) {
        load_npy(path)
    }

    fn seqk(args: &[String]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_seqk"))
            .args(args)
            .output()
            .expect("seqk did not start")
    }

    fn dir() -> PathBuf {
        crate::common::scratch_dir("gibbs-test")
    }

    /// `seqk run gibbs` and `seqk run sample` on the GPU equal their `--cpu` runs exactly on
    /// these small fixed cases (the same cases the library tests pin), and bad input exits 2.
    #[test]
    fn run_gibbs_and_sample_match_cpu() {
        let Some(_) = gpu() else { return };
        let d = dir();
        let p = |f: &str| d.join(f).display().to_string();
        let (b, l, v) = (6usize, 7usize, 5usize);
        save(
            &d.join("u.npy"),
            &[l as u64, v as u64],
            &random(l * v, 1, -1.0, 1.0),
        );
        save(
            &d.join("w.npy"),
            &[v as u64, v as u64],
            &random(v * v, 2, -1.0, 1.0),
        );
        let init: Vec<i32> = random_tokens(b * l, v, 3)
            .iter()
            .map(|&t| t as i32)
            .collect();
        save(&d.join("x.npy"), &[b as u64, l as u64], &init);
        let clamp: Vec<bool> = (0..l).map(|i| i == 2).collect();
        save(&d.join("c.npy"), &[l as u64], &clamp);
        let mut outs = Vec::new();
        for cpu in [false, true] {
            let (o, best) = (p(&format!("o{cpu}.npy")), p(&format!("b{cpu}.npy")));
            let mut args: Vec<String> = [
                "run",
                "gibbs",
                "--in",
                &format!("unary={}", p("u.npy")),
                "--in",
                &format!("pairwise={}", p("w.npy")),
                "--in",
                &format!("init={}", p("x.npy")),
                "--in",
                &format!("clamp={}", p("c.npy")),
                "--out",
                &o,
                "--out2",
                &format!("best={best}"),
                "--set",
                "sweeps=5",
                "--set",
                "temperature=2",
                "--set",
                "anneal_to=0.1",
                "--set",
                "seed=9",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            if cpu {
                args.push("--cpu".into());
            }
            let out = seqk(&args);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let (shape, t) = load_i32(Path::new(&o));
            assert_eq!(shape, vec![b as u64, l as u64]);
            for c in 0..b {
                assert_eq!(t[c * l + 2], init[c * l + 2], "clamped site changed");
            }
            outs.push((t, load_i32(Path::new(&best)).1));
        }
        assert_eq!(outs[0], outs[1], "GPU and --cpu differ");

        // The same 5 annealed sweeps as two runs, 2 then 3, each placed in the schedule.
        let part = |init: &str, out: &str, sets: &[&str]| {
            let mut args: Vec<String> = ["run", "gibbs", "--cpu", "--out"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            args.push(p(out));
            for (name, file) in [
                ("unary", "u.npy"),
                ("pairwise", "w.npy"),
                ("clamp", "c.npy"),
            ] {
                args.extend(["--in".into(), format!("{name}={}", p(file))]);
            }
            args.extend(["--in".into(), format!("init={}", p(init))]);
            for kv in ["temperature=2", "anneal_to=0.1", "seed=9"]
                .iter()
                .chain(sets)
            {
                args.extend(["--set".into(), kv.to_string()]);
            }
            let out = seqk(&args);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        part("x.npy", "p1.npy", &["sweeps=2", "schedule_len=5"]);
        part(
            "p1.npy",
            "p2.npy",
            &[
                "sweeps=3",
                "schedule_len=5",
                "schedule_at=2",
                "first_sweep=2",
            ],
        );
        assert_eq!(
            load_i32(Path::new(&p("p2.npy"))).1,
            outs[1].0,
            "two parts vs one run"
        );

        save(&d.join("lg.npy"), &[50, 30], &random(50 * 30, 4, -3.0, 3.0));
        let mut samples = Vec::new();
        for cpu in [false, true] {
            let o = p(&format!("s{cpu}.npy"));
            let mut args: Vec<String> = [
                "run",
                "sample",
                "--in",
                &format!("logits={}", p("lg.npy")),
                "--out",
                &o,
                "--set",
                "top_k=10",
                "--set",
                "top_p=0.9",
                "--set",
                "seed=4",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            if cpu {
                args.push("--cpu".into());
            }
            let out = seqk(&args);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            samples.push(load_i32(Path::new(&o)));
        }
        assert_eq!(samples[0].0, vec![50]);
        assert_eq!(samples[0], samples[1], "GPU and --cpu samples differ");

        // Bad input: token outside the vocabulary, wrong pairwise shape, T < 0 (each with
        // otherwise valid inputs).
        save(&d.join("bad.npy"), &[1, l as u64], &vec![v as i32; l]);
        let good = |init: &str, pairwise: &str| {
            vec![
                format!("init={}", p(init)),
                format!("pairwise={}", p(pairwise)),
            ]
        };
        for (inputs, sets, expect) in [
            (good("bad.npy", "w.npy"), vec![], "vocabulary"),
            (good("x.npy", "u.npy"), vec![], "pairwise"),
            (
                good("x.npy", "w.npy"),
                vec!["temperature=-1"],
                "temperature must be 0 (argmax) or in [1.1754944e-38, 1e30]",
            ),
        ] {
            let mut args: Vec<String> = vec![
                "run".into(),
                "gibbs".into(),
                "--cpu".into(),
                "--out".into(),
                p("z.npy"),
                "--in".into(),
                format!("unary={}", p("u.npy")),
            ];
            for e in inputs {
                args.push("--in".into());
                args.push(e);
            }
            for kv in sets {
                args.push("--set".into());
                args.push(kv.into());
            }
            let out = seqk(&args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
            assert!(err.contains(expect), "{args:?}: {err}");
        }
        let _ = std::fs::remove_dir_all(&d);
    }
}
