//! `seqk` entries of the Gibbs family: `run gibbs`, `run sample`, their `verify` cases (GPU
//! vs CPU agreement, chi-square against exact marginals) and `bench` cases (site updates/s,
//! sampled tokens/s).

use std::time::{Duration, Instant};

use super::report::{iterations, Baseline, BenchRow, Check, Rate, SAMPLES, WARMUP};
use super::{usage, Array, CliError, Data, RunIo};
use crate::kernels::gibbs::{check_tokens, logits_shape, MAX_PLAN_DISPATCHES};
use crate::profile::{time_passes, Timing};
use crate::reference::gibbs::{self as reference, HostModel, HostPairwise};
use crate::reference::random_values;
use crate::{
    ChainModel, Context, Error, Gibbs, GibbsOptions, GpuTensor, Pairwise, SampleOptions, Sampler,
};

/// Agreement of GPU and CPU chains site by site: f32 vs f64 energies may flip a near-tie,
/// so at most 0.1% of sites may differ.
const AGREEMENT_TOL: f64 = 1e-3;

fn host_model(l: usize, v: usize, rank: usize, pair_scale: f32, seed: u64) -> HostModel {
    HostModel {
        unary: random_values(l * v, seed, -1.0, 1.0),
        unary_shape: vec![l, v],
        pairwise: if rank == 0 {
            HostPairwise::Dense(random_values(v * v, seed + 1, -pair_scale, pair_scale))
        } else {
            HostPairwise::Factored {
                a: random_values(v * rank, seed + 2, -pair_scale, pair_scale),
                b: random_values(v * rank, seed + 3, -pair_scale, pair_scale),
                rank,
            }
        },
    }
}

/// The host model's tensors on the GPU: unary, W or A, and B.
struct Uploaded {
    unary: GpuTensor<f32>,
    pa: GpuTensor<f32>,
    pb: Option<GpuTensor<f32>>,
}

impl Uploaded {
    fn new(ctx: &Context, m: &HostModel) -> Result<Self, Error> {
        let v = *m.unary_shape.last().unwrap_or(&0);
        let (pa, pb) = match &m.pairwise {
            HostPairwise::Dense(w) => (ctx.upload(w, [v, v])?, None),
            HostPairwise::Factored { a, b, rank } => {
                (ctx.upload(a, [v, *rank])?, Some(ctx.upload(b, [v, *rank])?))
            }
        };
        Ok(Self {
            unary: ctx.upload(&m.unary, m.unary_shape.clone())?,
            pa,
            pb,
        })
    }

    fn model(&self) -> ChainModel<'_> {
        ChainModel {
            unary: &self.unary,
            pairwise: match &self.pb {
                None => Pairwise::Dense(&self.pa),
                Some(b) => Pairwise::Factored { a: &self.pa, b },
            },
        }
    }
}

/// Best tokens and scores, when tracked.
type HostBest = Option<(Vec<u32>, Vec<f32>)>;

/// Runs the GPU sampler; returns final tokens and (best tokens, best scores) if tracked.
fn run_gpu(
    ctx: &Context,
    m: &HostModel,
    init: &[u32],
    shape: [usize; 2],
    clamp: Option<(&[bool], &[usize])>,
    opts: &GibbsOptions,
) -> Result<(Vec<u32>, HostBest), Error> {
    let up = Uploaded::new(ctx, m)?;
    let init = ctx.upload(init, shape)?;
    let clamp = clamp
        .map(|(c, s)| ctx.upload_mask(c, s.to_vec()))
        .transpose()?;
    let out = ctx.gibbs(&up.model(), &init, clamp.as_ref(), opts)?;
    let best = match &out.best {
        Some((t, s)) => Some((t.download()?, s.download()?)),
        None => None,
    };
    Ok((out.tokens.download()?, best))
}

fn disagreement(a: &[u32], b: &[u32]) -> f64 {
    a.iter().zip(b).filter(|(x, y)| x != y).count() as f64 / a.len().max(1) as f64
}

fn tokens(n: usize, v: usize, seed: u64) -> Vec<u32> {
    random_values(n, seed, 0.0, v as f32)
        .into_iter()
        .map(|x| (x as u32).min(v as u32 - 1))
        .collect()
}

pub fn verify(ctx: &Context, quick: bool) -> Result<Vec<Check>, Error> {
    let mut checks = Vec::new();
    // (b, L, V, rank, options)
    let anneal = GibbsOptions {
        sweeps: 6,
        temperature: 3.0,
        anneal_to: Some(0.2),
        seed: 7,
        ..Default::default()
    };
    let plain = GibbsOptions {
        sweeps: 4,
        seed: 3,
        ..Default::default()
    };
    let mut cases = vec![
        (37usize, 7usize, 5usize, 0usize, plain.clone()),
        (3, 5, 300, 0, plain.clone()),
        (16, 6, 9, 3, anneal.clone()),
    ];
    if !quick {
        cases.extend([
            (2, 4, 5000, 8, plain.clone()),
            (
                70000,
                2,
                65,
                0,
                GibbsOptions {
                    sweeps: 1,
                    ..plain.clone()
                },
            ),
        ]);
    }
    for (i, (b, l, v, r, opts)) in cases.into_iter().enumerate() {
        let m = host_model(l, v, r, 1.0, 10 + i as u64);
        let init = tokens(b * l, v, 20 + i as u64);
        let (got, _) = run_gpu(ctx, &m, &init, [b, l], None, &opts)?;
        let mut want = init;
        reference::gibbs(&m, &mut want, &[b, l], None, &opts)?;
        let mut case = format!("b{b} L{l} V{v}");
        if r > 0 {
            case.push_str(&format!(" r{r}"));
        }
        if opts.anneal_to.is_some() {
            case.push_str(" anneal");
        }
        case.push_str(" sites differing");
        checks.push(Check {
            kernel: "gibbs",
            case,
            error: disagreement(&got, &want),
            tolerance: AGREEMENT_TOL,
        });
    }
    // Clamped sites must never change.
    {
        let (b, l, v) = (8usize, 9usize, 70usize);
        let m = host_model(l, v, 0, 1.0, 40);
        let init = tokens(b * l, v, 41);
        let mask: Vec<bool> = (0..l).map(|i| i % 3 == 1).collect();
        let opts = GibbsOptions {
            sweeps: 4,
            temperature: 5.0,
            ..Default::default()
        };
        let (got, _) = run_gpu(ctx, &m, &init, [b, l], Some((&mask, &[l])), &opts)?;
        let changed = (0..b * l)
            .filter(|&k| mask[k % l] && got[k] != init[k])
            .count();
        checks.push(Check {
            kernel: "gibbs",
            case: "clamped sites changed".into(),
            error: changed as f64,
            tolerance: 0.0,
        });
    }
    // Final states of independent chains against exact marginals (chi-square, p >= 1e-4).
    if !quick {
        let (c, l, v) = (4000usize, 5usize, 3usize);
        let m = host_model(l, v, 0, 2.5, 31);
        let opts = GibbsOptions {
            sweeps: 60,
            seed: 2024,
            ..Default::default()
        };
        let (got, _) = run_gpu(ctx, &m, &tokens(c * l, v, 32), [c, l], None, &opts)?;
        let (single, _) = reference::marginals(&m, 0, l, 1.0)?;
        let mut worst: f64 = 0.0;
        for (i, probs) in single.iter().enumerate() {
            let mut counts = vec![0usize; v];
            for k in 0..c {
                counts[got[k * l + i] as usize] += 1;
            }
            // Pearson statistic; with 2 degrees of freedom the tail is exp(-x / 2).
            let stat: f64 = counts
                .iter()
                .zip(probs)
                .map(|(&o, &p)| (o as f64 - p * c as f64).powi(2) / (p * c as f64))
                .sum();
            worst = worst.max(stat / 2.0 / std::f64::consts::LN_10);
        }
        checks.push(Check {
            kernel: "gibbs",
            case: format!("b{c} L{l} V{v} site chi2: -log10 p"),
            error: worst,
            tolerance: 4.0,
        });
    }
    Ok(checks)
}

/// Logits sampling with temperature, top-k, top-p against the reference.
pub fn verify_sample(ctx: &Context, quick: bool) -> Result<Vec<Check>, Error> {
    let mut checks = Vec::new();
    for (i, o) in [
        SampleOptions::default(),
        SampleOptions {
            top_k: 5,
            top_p: 0.8,
            temperature: 0.7,
            seed: 3,
            ..Default::default()
        },
    ]
    .into_iter()
    .enumerate()
    {
        let (b, v) = if quick { (64, 37) } else { (256, 3000) };
        let logits = random_values(b * v, 50 + i as u64, -4.0, 4.0);
        let t = ctx.upload(&logits, [b, v])?;
        let got = ctx.sample_logits(&t, &o)?.download()?;
        let want = reference::sample_logits(&logits, &[b, v], &o)?;
        checks.push(Check {
            kernel: "sample",
            case: format!(
                "b{b} V{v} T={} k={} p={} differing",
                o.temperature, o.top_k, o.top_p
            ),
            error: disagreement(&got, &want),
            tolerance: AGREEMENT_TOL,
        });
    }
    Ok(checks)
}

/// The benchmark's sizes (V, L, chains, rank of W; 0 = dense) and the chains `quick` keeps.
const BENCH_CASES: [(usize, usize, usize, usize, usize); 3] = [
    (2, 4096, 4096, 0, 256),
    (1000, 64, 1024, 0, 64),
    (32000, 32, 64, 64, 1),
];

/// Wall-clock budget of each CPU measurement: whole chains (rows) are timed one after
/// another until it is spent, at least one, at most all of them.
fn cpu_budget(quick: bool) -> Duration {
    Duration::from_millis(if quick { 200 } else { 2000 })
}

/// Site updates per second of one chromatic sweep on the GPU, each beside the
/// single-threaded CPU reference timed in the same run.
pub fn bench(ctx: &Context, quick: bool, baseline: &Baseline) -> Result<Vec<BenchRow>, Error> {
    let budget = cpu_budget(quick);
    let mut rows = Vec::new();
    for (v, l, b, r, quick_b) in BENCH_CASES {
        let b = if quick { quick_b } else { b };
        let m = host_model(l, v, r, if r > 0 { 0.3 } else { 1.0 }, 1);
        let up = Uploaded::new(ctx, &m)?;
        let t = ctx.zeros::<u32>([b, l])?;
        let opts = GibbsOptions {
            sweeps: 1,
            ..Default::default()
        };
        let plan = Gibbs::new(ctx, &opts)?.plan(&up.model(), &t, None, None)?;
        let timing = time_passes(ctx, WARMUP, SAMPLES, 1, |pass| plan.record(pass))?;
        // The reference sweeps one chain at a time from the same (all-zero) start.
        let (timed, per_chain) = cpu_time(b, budget, |_| {
            let mut row = vec![0u32; l];
            reference::gibbs(&m, &mut row, &[1, l], None, &opts).map(|_| ())
        })?;
        let w = if r > 0 {
            format!("r{r}")
        } else {
            String::new()
        };
        let case = format!("V{v}{w} L{l} b{b}");
        rows.extend(beside_cpu(
            baseline,
            "gibbs",
            case,
            timing,
            None,
            (b * l) as f64,
            "sites",
            b,
            timed,
            per_chain,
        ));
    }
    Ok(rows)
}

/// Tokens per second of logits sampling over a 32000-token vocabulary (plain temperature,
/// then top-k + top-p, then top-p alone) on the GPU, each beside the single-threaded CPU reference.
pub fn bench_sample(
    ctx: &Context,
    quick: bool,
    baseline: &Baseline,
) -> Result<Vec<BenchRow>, Error> {
    let budget = cpu_budget(quick);
    let mut rows = Vec::new();
    let (b, v) = if quick {
        (4usize, 32000usize)
    } else {
        (256, 32000)
    };
    let logits = random_values(b * v, 5, -4.0, 4.0);
    let x = ctx.upload(&logits, [b, v])?;
    let out = ctx.zeros::<u32>([b])?;
    for opts in [
        SampleOptions::default(),
        SampleOptions {
            top_k: 50,
            top_p: 0.9,
            ..Default::default()
        },
        SampleOptions {
            top_p: 0.9,
            ..Default::default()
        },
    ] {
        let plan = Sampler::new(ctx, &opts)?.plan(&x, &out)?;
        let bytes = (b * v * 4 + b * 4) as u64;
        // At most 8 draws per submit: top-k / top-p pass over the row many times, so the
        // small quick case would otherwise take seconds per sample on a software device.
        let calls = iterations(bytes).min(8);
        let timing = time_passes(ctx, WARMUP, SAMPLES, calls, |pass| plan.record(pass))?;
        let (timed, per_row) = cpu_time(b, budget, |i| {
            reference::sample_logits(&logits[i * v..(i + 1) * v], &[1, v], &opts).map(|_| ())
        })?;
        let mut case = format!("b{b} V{v}");
        if opts.top_k > 0 {
            case.push_str(&format!(" k{}", opts.top_k));
        }
        if opts.top_p < 1.0 {
            case.push_str(&format!(" p{}", opts.top_p));
        }
        rows.extend(beside_cpu(
            baseline,
            "sample",
            case,
            timing,
            Some(bytes as f64),
            b as f64,
            "tokens",
            b,
            timed,
            per_row,
        ));
    }
    Ok(rows)
}

/// Runs `one(i)` for i = 0, 1, .. < `n` until `budget` has passed (at least once); returns
/// how many ran and the wall time of one.
fn cpu_time(
    n: usize,
    budget: Duration,
    mut one: impl FnMut(usize) -> Result<(), Error>,
) -> Result<(usize, Duration), Error> {
    let start = Instant::now();
    let mut done = 0;
    while done < n && (done == 0 || start.elapsed() < budget) {
        one(done)?;
        done += 1;
    }
    Ok((done, start.elapsed() / done as u32))
}

/// A GPU row of `items` per call and, beside it, the row of the single-threaded CPU reference
/// (case "... cpu (N timed)"): `timed` of the call's `units` (chains or rows) took `per_unit`
/// each, and its call time is extrapolated to all units. The GPU row carries the speed-up.
#[allow(clippy::too_many_arguments)]
fn beside_cpu(
    baseline: &Baseline,
    kernel: &'static str,
    case: String,
    timing: Timing,
    bytes: Option<f64>,
    items: f64,
    unit: &'static str,
    units: usize,
    timed: usize,
    per_unit: Duration,
) -> [BenchRow; 2] {
    let cpu_timing = Timing {
        gpu: None,
        wall: per_unit * units as u32,
    };
    let rate = |t: &Timing| items / t.best().as_secs_f64();
    let speedup = rate(&timing) / rate(&cpu_timing);
    let row = |case: String, timing: Timing, bytes: Option<f64>| {
        let mut row = baseline.memory(kernel, case, timing, 0.0);
        row.bytes = bytes;
        row
    };
    [
        row(case.clone(), timing, bytes).with_rate(Rate {
            items,
            unit,
            speedup: Some(speedup),
        }),
        row(format!("{case} cpu ({timed} timed)"), cpu_timing, None).with_rate(Rate {
            items,
            unit,
            speedup: None,
        }),
    ]
}

fn ints(a: Array, name: &str, vocab: usize) -> Result<Vec<u32>, CliError> {
    let v: Vec<i64> = match a.data {
        Data::I32(v) => v.into_iter().map(i64::from).collect(),
        Data::I64(v) => v,
        Data::U8(v) => v.into_iter().map(i64::from).collect(),
        other => {
            return Err(usage(format!(
                "input {name} has dtype {}; expected [b, L] int32, int64 or uint8 tokens",
                other.dtype_name()
            )))
        }
    };
    if let Some(t) = v.iter().find(|&&t| t < 0 || t >= vocab as i64) {
        return Err(usage(format!(
            "input {name}: token {t} is outside the vocabulary 0..{vocab}"
        )));
    }
    let out: Vec<u32> = v.into_iter().map(|t| t as u32).collect();
    check_tokens(&out, vocab, name)?;
    Ok(out)
}

fn token_array(shape: Vec<usize>, t: &[u32]) -> Array {
    Array {
        shape,
        data: Data::I32(t.iter().map(|&x| x as i32).collect()),
    }
}

/// `seqk run gibbs --in unary=U.npy --in pairwise=W.npy --in init=X.npy [--in clamp=C.npy]
/// --out X1.npy [--out2 best=B.npy] [--out2 best_score=S.npy] [--set sweeps=..]`;
/// `--in pair_a=A.npy --in pair_b=B.npy` give a factorised W = A B^T instead of `pairwise`.
pub fn run(io: &mut RunIo) -> Result<(), CliError> {
    let unary = io.required("unary", "[L, V] or [b, L, V] float32 or float16")?;
    let pairwise = io.input("pairwise", "[V, V] float32 or float16")?;
    let pair_a = io.input("pair_a", "[V, r] float32 or float16")?;
    let pair_b = io.input("pair_b", "[V, r] float32 or float16")?;
    let init = io.required("init", "[b, L] int32, int64 or uint8")?;
    let clamp = io.input("clamp", "[L] or [b, L] bool or uint8")?;
    // Both asked about (no short circuit), so check_unused knows both names.
    let (best, best_score) = (io.wants_out2("best"), io.wants_out2("best_score"));
    // A part of a longer run: schedule_len sweeps, this run from sweep schedule_at, which is
    // also its Philox sweep index unless first_sweep says otherwise (as GibbsOptions::part).
    let schedule_at: Option<u32> = io.set_opt("schedule_at")?;
    let opts = GibbsOptions {
        sweeps: io.set("sweeps", 100)?,
        temperature: io.set("temperature", 1.0)?,
        anneal_to: io.set_opt("anneal_to")?,
        seed: io.set("seed", 0)?,
        first_sweep: io.set("first_sweep", schedule_at.unwrap_or(0))?,
        track_best: best || best_score,
        schedule: None,
    };
    let opts = match (io.set_opt("schedule_len")?, schedule_at) {
        (Some(len), at) => GibbsOptions {
            schedule: Some((at.unwrap_or(0), len)),
            ..opts
        },
        (None, Some(_)) => return Err(usage("gibbs: --set schedule_at needs schedule_len")),
        (None, None) => opts,
    };
    io.check_unused()?;
    opts.validate()?;
    let parts = opts.sweeps as usize * 2;
    if !io.cpu && parts > MAX_PLAN_DISPATCHES {
        return Err(usage(format!(
            "gibbs: {} sweeps are more than one GPU call runs (about {}); run them as several \
             calls, each with --set schedule_len=<all sweeps> schedule_at=<its first sweep>, \
             and the last call's tokens as the next call's init",
            opts.sweeps,
            MAX_PLAN_DISPATCHES / 2
        )));
    }
    let v = *unary.shape.last().unwrap_or(&0);
    let unary_shape = unary.shape.clone();
    let pairwise = match (pairwise, pair_a, pair_b) {
        (Some(w), None, None) => {
            if w.shape != [v, v] {
                return Err(usage(format!(
                    "input pairwise has shape {:?}; expected [{v}, {v}], V = {v} being the last \
                     axis of unary {:?}",
                    w.shape, unary.shape
                )));
            }
            HostPairwise::Dense(w.floats("pairwise", "[V, V]")?.0)
        }
        (None, Some(a), Some(b)) => {
            let rank = a.shape.get(1).copied().unwrap_or(0);
            if a.shape != [v, rank] || b.shape != [v, rank] || rank == 0 {
                return Err(usage(format!(
                    "inputs pair_a, pair_b have shapes {:?}, {:?}; expected [{v}, r] each, \
                     V = {v} being the last axis of unary {:?}",
                    a.shape, b.shape, unary.shape
                )));
            }
            HostPairwise::Factored {
                a: a.floats("pair_a", "[V, r]")?.0,
                b: b.floats("pair_b", "[V, r]")?.0,
                rank,
            }
        }
        _ => {
            return Err(usage(
                "give either --in pairwise=W.npy ([V, V]) or both --in pair_a=A.npy and \
                 --in pair_b=B.npy ([V, r])",
            ))
        }
    };
    let model = HostModel {
        unary: unary.floats("unary", "[L, V] or [b, L, V]")?.0,
        unary_shape,
        pairwise,
    };
    let shape = init.shape.clone();
    // init is checked here, by its name: the library's shape errors call it "tokens".
    let unary_shape = &model.unary_shape;
    let unary_len = match unary_shape.len() {
        2 | 3 => Some(unary_shape[unary_shape.len() - 2]),
        _ => None,
    };
    if shape.len() != 2 || unary_len.is_some_and(|l| shape[1] != l) {
        let expected = match unary_len {
            Some(l) => format!("[b, {l}], L = {l} being the sites of unary {unary_shape:?}"),
            None => "[b, L]".to_string(),
        };
        return Err(usage(format!(
            "input init has shape {shape:?}; expected {expected}"
        )));
    }
    let clamp_shape = clamp.as_ref().map(|c| c.shape.clone());
    // Shapes first, so a mismatch names the shapes rather than a token.
    model.shape(&shape, clamp_shape.as_deref())?;
    let init = ints(init, "init", v)?;
    let clamp = clamp
        .map(|c| c.bools("clamp", "[L] or [b, L]"))
        .transpose()?;
    let clamp_ref = clamp.as_deref().zip(clamp_shape.as_deref());
    let (out, best) = if io.cpu {
        let mut t = init;
        let best = reference::gibbs(&model, &mut t, &shape, clamp_ref, &opts)?;
        (
            t,
            best.map(|b| (b.tokens, b.scores.iter().map(|&s| s as f32).collect())),
        )
    } else {
        let ctx = io.context()?;
        let dense_bytes = match &model.pairwise {
            HostPairwise::Dense(w) => Some(w.len() as u64 * 4),
            HostPairwise::Factored { .. } => None,
        };
        run_gpu(&ctx, &model, &init, [shape[0], shape[1]], clamp_ref, &opts).map_err(|e| {
            match e {
                // The one remedy in the input's hands: a factorised W.
                Error::LimitExceeded { needed, max, .. } if Some(needed) == dense_bytes => {
                    usage(format!(
                    "pairwise [V, V] takes {needed} bytes, more than this device binds at once \
                         ({max}); give a factorised W = A B^T as --in pair_a=A.npy --in \
                         pair_b=B.npy ([V, r] each)"
                ))
                }
                e => e.into(),
            }
        })?
    };
    io.write_out(&token_array(shape.clone(), &out))?;
    if let Some((bt, bs)) = best {
        io.write_out2("best", &token_array(shape.clone(), &bt))?;
        io.write_out2(
            "best_score",
            &Array {
                shape: vec![shape[0]],
                data: Data::F32(bs),
            },
        )?;
    }
    Ok(())
}

/// `seqk run sample --in logits=L.npy --out T.npy [--set temperature=1 top_k=0 top_p=1 seed=0
/// step=0]`
pub fn run_sample(io: &mut RunIo) -> Result<(), CliError> {
    let logits = io.required("logits", "[b, V] float32 or float16")?;
    let opts = SampleOptions {
        temperature: io.set("temperature", 1.0)?,
        top_k: io.set("top_k", 0)?,
        top_p: io.set("top_p", 1.0)?,
        seed: io.set("seed", 0)?,
        step: io.set("step", 0)?,
    };
    io.check_unused()?;
    opts.validate()?;
    let shape = logits.shape.clone();
    let (b, v) = logits_shape(&shape)
        .map_err(|_| usage(format!("input logits has shape {shape:?}; expected [b, V]")))?;
    let x = logits.floats("logits", "[b, V]")?.0;
    let out = if io.cpu {
        reference::sample_logits(&x, &shape, &opts)?
    } else {
        let ctx = io.context()?;
        let t = ctx.upload(&x, [b, v])?;
        ctx.sample_logits(&t, &opts)?.download()?
    };
    io.write_out(&token_array(vec![b], &out))
}
