//! `seqk` entries of the RoPE family.

use half::{bf16, f16};

use super::report::{iterations, Baseline, BenchRow, Check, SAMPLES, WARMUP};
use super::{usage, Array, CliError, Data, RunIo};
use crate::kernels::rope::MAX_POSITION;
use crate::profile::time_passes;
use crate::reference::{random_values, rope as reference, row_error};
use crate::{
    Context, Element, Error, Positions, Rope, RopeLayout, RopeOptions, RopeScaling, RopeStyle,
    RopeTarget,
};

/// Allowed error: 1e-6 of the row scale for f32 storage, 2e-3 for f16; bf16 has 8
/// significant bits (rounding costs up to half an ulp, 2^-8 = 3.9e-3 of the value), so 4e-3.
const TOL_F32: f64 = 1e-6;
const TOL_F16: f64 = 2e-3;
const TOL_BF16: f64 = 4e-3;

#[derive(Clone, Copy, PartialEq)]
enum Storage {
    F32,
    F16,
    Bf16,
}

impl Storage {
    fn name(self) -> &'static str {
        match self {
            Storage::F32 => "f32",
            Storage::F16 => "f16",
            Storage::Bf16 => "bf16",
        }
    }
    fn tolerance(self) -> f64 {
        match self {
            Storage::F32 => TOL_F32,
            Storage::F16 => TOL_F16,
            Storage::Bf16 => TOL_BF16,
        }
    }
    /// Rounds host values to what the storage holds.
    fn round(self, x: &mut [f32]) {
        match self {
            Storage::F32 => {}
            Storage::F16 => x.iter_mut().for_each(|v| *v = f16::from_f32(*v).to_f32()),
            Storage::Bf16 => x.iter_mut().for_each(|v| *v = bf16::from_f32(*v).to_f32()),
        }
    }
}

pub fn verify(ctx: &Context, quick: bool) -> Result<Vec<Check>, Error> {
    let d = RopeOptions::default();
    let yarn = RopeScaling::named("yarn", Some(8.0), Some(256))?;
    let llama3 = RopeScaling::named("llama3", Some(8.0), Some(512))?;
    // (shape in the layout's order, options, explicit positions, storage)
    let mut cases: Vec<([usize; 4], RopeOptions, bool, Storage)> = vec![
        (
            [1, 1, 1, 4],
            RopeOptions {
                offset: 3,
                ..d.clone()
            },
            false,
            Storage::F32,
        ),
        (
            [2, 33, 7, 64],
            RopeOptions {
                style: RopeStyle::Interleaved,
                offset: 100,
                ..d.clone()
            },
            false,
            Storage::F32,
        ),
        (
            [2, 3, 17, 80],
            RopeOptions {
                layout: RopeLayout::Bhsd,
                rotary_dim: Some(40),
                ..d.clone()
            },
            true,
            Storage::F32,
        ),
        (
            [1, 65, 3, 64],
            RopeOptions {
                scaling: yarn,
                inverse: true,
                ..d.clone()
            },
            false,
            Storage::F32,
        ),
        (
            [1, 65, 3, 128],
            RopeOptions {
                scaling: llama3,
                offset: 1 << 20,
                ..d.clone()
            },
            false,
            Storage::F32,
        ),
        ([2, 31, 5, 6], d.clone(), true, Storage::F16),
        (
            [2, 31, 5, 64],
            RopeOptions {
                style: RopeStyle::Interleaved,
                ..d.clone()
            },
            false,
            Storage::Bf16,
        ),
    ];
    if !quick {
        cases.extend([
            (
                [4, 1000, 7, 256],
                RopeOptions {
                    scaling: RopeScaling::Dynamic {
                        factor: 4.0,
                        original_max: 512,
                        current_len: None,
                    },
                    ..d.clone()
                },
                true,
                Storage::F32,
            ),
            ([2, 1000, 7, 128], d.clone(), false, Storage::F16),
        ]);
    }
    let mut checks = Vec::new();
    for (i, (shape, opts, explicit, storage)) in cases.into_iter().enumerate() {
        let len: usize = shape.iter().product();
        let mut x = random_values(len, i as u64 + 1, -2.0, 2.0);
        storage.round(&mut x);
        let (b, s) = match opts.layout {
            RopeLayout::Bshd => (shape[0], shape[1]),
            RopeLayout::Bhsd => (shape[0], shape[2]),
        };
        let positions = explicit
            .then(|| {
                let p: Vec<i64> = (0..(b * s) as i64).map(|k| (k * 7919) % 200_000).collect();
                Positions::new(p, [b, s])
            })
            .transpose()?;
        let xf: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let want = reference::rope(&xf, shape, positions.as_ref(), &opts)?;
        let got = run_gpu(ctx, &x, storage, shape, positions.as_ref(), &opts)?;
        checks.push(Check {
            kernel: "rope",
            case: format!(
                "{shape:?} {}{} {}",
                describe(&opts),
                if explicit { " positions[b,s]" } else { "" },
                storage.name()
            ),
            error: row_error(&got, &want, shape[3]),
            tolerance: storage.tolerance(),
        });
    }
    Ok(checks)
}

fn describe(o: &RopeOptions) -> String {
    let mut parts = vec![
        match o.style {
            RopeStyle::Half => "half",
            RopeStyle::Interleaved => "interleaved",
        }
        .to_string(),
        match o.layout {
            RopeLayout::Bshd => "bshd",
            RopeLayout::Bhsd => "bhsd",
        }
        .to_string(),
    ];
    if let Some(r) = o.rotary_dim {
        parts.push(format!("r={r}"));
    }
    if o.offset != 0 {
        parts.push(format!("offset={}", o.offset));
    }
    if o.inverse {
        parts.push("inverse".into());
    }
    if o.scaling != RopeScaling::None {
        parts.push(o.scaling.name().into());
    }
    parts.join(" ")
}

fn gpu_typed<T: Element>(
    ctx: &Context,
    x: &[f32],
    shape: [usize; 4],
    positions: Option<&Positions>,
    opts: &RopeOptions,
    to: impl Fn(f32) -> T,
    from: impl Fn(T) -> f32,
) -> Result<Vec<f32>, Error> {
    let host: Vec<T> = x.iter().map(|&v| to(v)).collect();
    let xt = ctx.upload(&host, shape)?;
    let y = ctx.rope(&xt, positions, opts)?;
    Ok(y.download()?.into_iter().map(from).collect())
}

fn run_gpu(
    ctx: &Context,
    x: &[f32],
    storage: Storage,
    shape: [usize; 4],
    positions: Option<&Positions>,
    opts: &RopeOptions,
) -> Result<Vec<f32>, Error> {
    match storage {
        Storage::F32 => gpu_typed(ctx, x, shape, positions, opts, |v| v, |v| v),
        Storage::F16 => gpu_typed(ctx, x, shape, positions, opts, f16::from_f32, f16::to_f32),
        Storage::Bf16 => gpu_typed(ctx, x, shape, positions, opts, bf16::from_f32, bf16::to_f32),
    }
}

/// Fused in-place q + k (GQA) of the issue: b = 16, s = 1024, hq = 32, hkv = 8, d = 128 in f16
/// and f32; `quick` uses b = 1. Bytes: q and k read and written once, plus the cos/sin table.
pub fn bench(ctx: &Context, quick: bool, baseline: &Baseline) -> Result<Vec<BenchRow>, Error> {
    fn one<T: Element>(
        ctx: &Context,
        baseline: &Baseline,
        b: usize,
        name: &str,
    ) -> Result<BenchRow, Error> {
        let (s, hq, hkv, d) = (1024, 32, 8, 128);
        let q = ctx.zeros::<T>([b, s, hq, d])?;
        let k = ctx.zeros::<T>([b, s, hkv, d])?;
        let plan = Rope::new(ctx, &RopeOptions::default())?.plan(
            &RopeTarget::in_place(&q)?,
            Some(&RopeTarget::in_place(&k)?),
            None,
        )?;
        let bytes = 2 * (q.bytes() + k.bytes()) + (s * d / 2 * 8) as u64;
        let timing = time_passes(ctx, WARMUP, SAMPLES, iterations(bytes), |pass| {
            plan.record(pass)
        })?;
        Ok(baseline.memory(
            "rope",
            format!("{name} q+k in place b={b} s={s} hq={hq} hkv={hkv} d={d}"),
            timing,
            bytes as f64,
        ))
    }
    let b = if quick { 1 } else { 16 };
    Ok(vec![
        one::<f16>(ctx, baseline, b, "f16")?,
        one::<f32>(ctx, baseline, b, "f32")?,
    ])
}

/// `seqk run rope --in x=X.npy [--in positions=P.npy] --out Y.npy [--set ...]`
///
/// Positions are `[s]`, `[1, s]` (Hugging Face's `position_ids`, the same for every batch) or
/// `[b, s]`; `offset` is for calls without them. `mscale` is yarn's multiplier of cos and sin
/// itself (Hugging Face's `attention_factor`), not `rope_scaling["mscale"]` (see
/// [`RopeScaling::Yarn`]). `storage` (`f32`, `f16`, `bf16`; default the input's) rounds the
/// input to that type (numpy has no bfloat16), for the GPU run and `--cpu` alike; the GPU
/// also stores its output in it.
pub fn run(io: &mut RunIo) -> Result<(), CliError> {
    let x = io.required(
        "x",
        "[b, s, h, d] (bshd) or [b, h, s, d] (bhsd), float32 or float16",
    )?;
    let positions = io.input("positions", "[s] or [b, s] int32 or int64")?;
    let style: String = io.set("style", "half".to_string())?;
    let layout: String = io.set("layout", "bshd".to_string())?;
    let rotary_dim: Option<usize> = io.set_opt("rotary_dim")?;
    let base: f64 = io.set("base", 10000.0)?;
    let offset: u64 = io.set("offset", 0)?;
    let inverse: bool = io.set("inverse", false)?;
    let scaling_name: String = io.set("scaling", "none".to_string())?;
    let factor: Option<f64> = io.set_opt("factor")?;
    let original_max: Option<usize> = io.set_opt("original_max")?;
    let beta_fast: Option<f64> = io.set_opt("beta_fast")?;
    let beta_slow: Option<f64> = io.set_opt("beta_slow")?;
    let mscale: Option<f64> = io.set_opt("mscale")?;
    let truncate: Option<bool> = io.set_opt("truncate")?;
    let low_freq_factor: Option<f64> = io.set_opt("low_freq_factor")?;
    let high_freq_factor: Option<f64> = io.set_opt("high_freq_factor")?;
    let current_len: Option<usize> = io.set_opt("current_len")?;
    let storage_name: Option<String> = io.set_opt("storage")?;
    io.check_unused()?;
    if positions.is_some() && offset != 0 {
        return Err(usage(
            "--set offset=... does not apply with --in positions (add the offset to the positions)",
        ));
    }

    let mut scaling = RopeScaling::named(&scaling_name, factor, original_max)?;
    let misplaced = |key: &str| {
        usage(format!(
            "--set {key}=... does not apply to scaling={scaling_name}"
        ))
    };
    if scaling_name == "none" && factor.is_some() {
        return Err(misplaced("factor"));
    }
    if matches!(scaling_name.as_str(), "none" | "linear" | "ntk") && original_max.is_some() {
        return Err(misplaced("original_max"));
    }
    match &mut scaling {
        RopeScaling::Yarn {
            beta_fast: bf,
            beta_slow: bs,
            mscale: m,
            truncate: t,
            ..
        } => {
            *bf = beta_fast.unwrap_or(*bf);
            *bs = beta_slow.unwrap_or(*bs);
            *m = mscale.or(*m);
            *t = truncate.unwrap_or(*t);
        }
        RopeScaling::Llama3 {
            low_freq_factor: lo,
            high_freq_factor: hi,
            ..
        } => {
            *lo = low_freq_factor.unwrap_or(*lo);
            *hi = high_freq_factor.unwrap_or(*hi);
        }
        RopeScaling::Dynamic { current_len: c, .. } => *c = current_len,
        _ => {}
    }
    let is = |name: &str| scaling_name == name;
    for (key, given, applies) in [
        ("beta_fast", beta_fast.is_some(), is("yarn")),
        ("beta_slow", beta_slow.is_some(), is("yarn")),
        ("mscale", mscale.is_some(), is("yarn")),
        ("truncate", truncate.is_some(), is("yarn")),
        ("low_freq_factor", low_freq_factor.is_some(), is("llama3")),
        ("high_freq_factor", high_freq_factor.is_some(), is("llama3")),
        ("current_len", current_len.is_some(), is("dynamic")),
    ] {
        if given && !applies {
            return Err(misplaced(key));
        }
    }
    let opts = RopeOptions {
        style: style.parse()?,
        layout: layout.parse()?,
        rotary_dim,
        base,
        offset,
        inverse,
        scaling,
    };

    let shape: [usize; 4] = x.shape.as_slice().try_into().map_err(|_| {
        usage(format!(
            "input x has shape {:?}; expected [b, s, h, d] (layout=bshd) or [b, h, s, d] (layout=bhsd)",
            x.shape
        ))
    })?;
    let (b, s) = match opts.layout {
        RopeLayout::Bshd => (shape[0], shape[1]),
        RopeLayout::Bhsd => (shape[0], shape[2]),
    };
    // The shapes positions may have: [s], [1, s] or [b, s] ([1, s] once when b = 1).
    let position_shapes = if b == 1 {
        format!("[{s}] or [1, {s}]")
    } else {
        format!("[{s}], [1, {s}] or [{b}, {s}]")
    };
    let positions = match positions {
        None => None,
        Some(p) => {
            let values: Vec<i64> = match p.data {
                Data::I32(v) => v.into_iter().map(i64::from).collect(),
                Data::I64(v) => v,
                other => {
                    return Err(usage(format!(
                        "input positions has dtype {}; expected {position_shapes} int32 or int64",
                        other.dtype_name()
                    )))
                }
            };
            if p.shape != [s] && p.shape != [1, s] && p.shape != [b, s] {
                return Err(usage(format!(
                    "input positions has shape {:?}; expected {position_shapes}",
                    p.shape
                )));
            }
            if let Some(bad) = values.iter().find(|&&v| !(0..=MAX_POSITION).contains(&v)) {
                return Err(usage(format!(
                    "input positions holds {bad}; expected [s], [1, s] or [b, s] int32 or int64 in \
                     0..={MAX_POSITION}"
                )));
            }
            Some(Positions::new(values, p.shape)?)
        }
    };
    let (values, half) = x.floats("x", "[b, s, h, d] or [b, h, s, d]")?;
    // numpy has no bfloat16: storage=bf16 rounds float32 input to it (as torch's .bfloat16()).
    let storage = match storage_name.as_deref() {
        None if half => Storage::F16,
        None => Storage::F32,
        Some(name) => [Storage::F32, Storage::F16, Storage::Bf16]
            .into_iter()
            .find(|s| s.name() == name)
            .ok_or_else(|| usage(format!("--set storage={name}: expected f32, f16 or bf16")))?,
    };
    let out: Vec<f32> = if io.cpu {
        // The reference takes the input as the storage holds it (bf16 or f16 rounded).
        let mut values = values;
        storage.round(&mut values);
        let xf: Vec<f64> = values.iter().map(|&v| v as f64).collect();
        reference::rope(&xf, shape, positions.as_ref(), &opts)?
            .iter()
            .map(|&v| v as f32)
            .collect()
    } else {
        let ctx = io.context()?;
        run_gpu(&ctx, &values, storage, shape, positions.as_ref(), &opts)?
    };
    io.write_out(&Array {
        shape: x.shape.clone(),
        data: Data::F32(out),
    })
}
