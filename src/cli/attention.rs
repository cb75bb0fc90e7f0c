//! `seqk` entries of exact attention (and the matmul it is benchmarked next to, on the same
//! block products).

use half::f16;

use super::report::{iterations, quick_calls, Baseline, BenchRow, Check, SAMPLES, WARMUP};
use super::{usage, Array, CliError, Data, RunIo};
use crate::kernels::attention::{attention_shape, matmul_plan, AttnMask, HostMask};
use crate::profile::time_passes;
use crate::reference::{attention as reference, random_values, row_error};
use crate::{Attention, AttentionOptions, Context, Element, Error, GpuTensor, Layout};

/// Allowed error: 1e-4 of the output magnitude for f32 storage, 2e-3 for f16.
const TOL_F32: f64 = 1e-4;
const TOL_F16: f64 = 2e-3;

/// Which mask a verify case draws.
#[derive(Clone, Copy, PartialEq)]
enum Masking {
    Off,
    Keep,
    Add,
}

struct Case {
    /// b, hq, hkv, m, n, d, dv
    dims: [usize; 7],
    opts: AttentionOptions,
    mask: Masking,
    half: bool,
}

/// A mask's values on the host, owned.
enum Mask {
    Keep(Vec<bool>),
    Add(Vec<f32>),
}

impl Mask {
    fn host(&self) -> HostMask<'_> {
        match self {
            Mask::Keep(v) => HostMask::Keep(v),
            Mask::Add(v) => HostMask::Add(v),
        }
    }
}

pub fn verify(ctx: &Context, quick: bool) -> Result<Vec<Check>, Error> {
    let d = AttentionOptions::default();
    let causal = AttentionOptions {
        causal: true,
        ..d.clone()
    };
    let mut cases = vec![
        Case {
            dims: [1, 2, 2, 17, 33, 64, 64],
            opts: d.clone(),
            mask: Masking::Off,
            half: false,
        },
        Case {
            dims: [2, 8, 2, 9, 40, 40, 40],
            opts: causal.clone(),
            mask: Masking::Keep,
            half: false,
        },
        Case {
            dims: [1, 6, 1, 33, 17, 128, 96],
            opts: AttentionOptions {
                softcap: 2.0,
                scale: Some(0.3),
                ..causal.clone()
            },
            mask: Masking::Add,
            half: false,
        },
        Case {
            dims: [1, 4, 2, 2, 1100, 64, 64],
            opts: d.clone(),
            mask: Masking::Off,
            half: false,
        },
        Case {
            dims: [1, 2, 1, 20, 31, 256, 256],
            opts: causal.clone(),
            mask: Masking::Off,
            half: true,
        },
        // A ragged batch: NaN past each batch's length must stay out.
        Case {
            dims: [3, 4, 2, 2, 45, 64, 64],
            opts: AttentionOptions {
                kv_lens: Some(vec![45, 1, 29]),
                ..causal.clone()
            },
            mask: Masking::Keep,
            half: false,
        },
    ];
    if !quick {
        cases.extend([
            Case {
                dims: [2, 4, 4, 257, 257, 64, 64],
                opts: causal.clone(),
                mask: Masking::Off,
                half: false,
            },
            Case {
                dims: [1, 8, 2, 1, 4097, 128, 128],
                opts: causal.clone(),
                mask: Masking::Keep,
                half: true,
            },
        ]);
    }
    let mut checks = Vec::new();
    for (i, c) in cases.into_iter().enumerate() {
        let [b, hq, hkv, m, n, dk, dv] = c.dims;
        let shapes = [vec![b, hq, m, dk], vec![b, hkv, n, dk], vec![b, hkv, n, dv]];
        let seed = i as u64 * 3 + 1;
        let mut vals: Vec<Vec<f32>> = shapes
            .iter()
            .enumerate()
            .map(|(j, s)| random_values(s.iter().product(), seed + j as u64, -1.0, 1.0))
            .collect();
        if c.half {
            for x in vals.iter_mut().flatten() {
                *x = f16::from_f32(*x).to_f32();
            }
        }
        // Positions past a batch's kv_lens hold NaN (k and v are [b, hkv, n, ..]).
        for (bb, &len) in c.opts.kv_lens.iter().flatten().enumerate() {
            for (t, dim) in [(1, dk), (2, dv)] {
                for h in 0..hkv {
                    let row = (bb * hkv + h) * n;
                    vals[t][(row + len) * dim..(row + n) * dim].fill(f32::NAN);
                }
            }
        }
        let u = random_values(m * n, seed + 9, 0.0, 1.0);
        let mask = match c.mask {
            Masking::Off => None,
            Masking::Keep => Some(Mask::Keep(u.iter().map(|&u| u < 0.7).collect())),
            // Terms of either sign, and -inf hiding about a third of the keys.
            Masking::Add => Some(Mask::Add(
                u.iter()
                    .map(|&u| {
                        if u < 0.3 {
                            f32::NEG_INFINITY
                        } else {
                            4.0 * u - 2.0
                        }
                    })
                    .collect(),
            )),
        };
        let mshape = [m, n];
        let want = reference::attention(
            (&vals[0], &shapes[0]),
            (&vals[1], &shapes[1]),
            (&vals[2], &shapes[2]),
            mask.as_ref().map(|mk| (mk.host(), &mshape[..])),
            &c.opts,
        )?;
        let (got, _) = run_gpu(
            ctx,
            [&vals[0], &vals[1], &vals[2]],
            &shapes,
            mask.as_ref().map(|mk| (mk.host(), &mshape[..])),
            c.half,
            &c.opts,
            false,
        )?;
        let mut case = format!("b{b} h{hq}/{hkv} m{m} n{n} d{dk} dv{dv}");
        if let Some(lens) = &c.opts.kv_lens {
            // As `--set` writes them.
            let lens: Vec<String> = lens.iter().map(|l| l.to_string()).collect();
            case.push_str(&format!(" kv_lens={}", lens.join(",")));
        }
        if c.opts.causal {
            case.push_str(" causal");
        }
        if c.opts.softcap > 0.0 {
            case.push_str(&format!(" softcap={}", c.opts.softcap));
        }
        match c.mask {
            Masking::Off => {}
            Masking::Keep => case.push_str(" mask"),
            Masking::Add => case.push_str(" additive mask"),
        }
        if c.half {
            case.push_str(" f16");
        }
        checks.push(Check {
            kernel: "attention",
            case,
            error: row_error(&got, &want.out, dv),
            tolerance: if c.half { TOL_F16 } else { TOL_F32 },
        });
    }
    Ok(checks)
}

type Out = (Vec<f32>, Option<Vec<f32>>);

fn run_gpu(
    ctx: &Context,
    vals: [&[f32]; 3],
    shapes: &[Vec<usize>; 3],
    mask: Option<(HostMask<'_>, &[usize])>,
    half: bool,
    opts: &AttentionOptions,
    want_lse: bool,
) -> Result<Out, Error> {
    let (keep, add) = match mask {
        None => (None, None),
        Some((HostMask::Keep(m), s)) => (Some(ctx.upload_mask(m, s.to_vec())?), None),
        Some((HostMask::Add(m), s)) => (None, Some(ctx.upload(m, s.to_vec())?)),
    };
    let mask: Option<AttnMask> = keep
        .as_ref()
        .map(AttnMask::from)
        .or(add.as_ref().map(AttnMask::from));
    if half {
        let up = |i: usize| -> Result<GpuTensor<f16>, Error> {
            let h: Vec<f16> = vals[i].iter().map(|&v| f16::from_f32(v)).collect();
            ctx.upload(&h, shapes[i].clone())
        };
        let (q, k, v) = (up(0)?, up(1)?, up(2)?);
        let (o, l) = ctx.attention_lse(&q, &k, &v, mask, opts)?;
        let o = o.download()?.iter().map(|x| x.to_f32()).collect();
        Ok((o, want_lse.then(|| l.download()).transpose()?))
    } else {
        let up = |i: usize| ctx.upload(vals[i], shapes[i].clone());
        let (q, k, v) = (up(0)?, up(1)?, up(2)?);
        let (o, l) = ctx.attention_lse(&q, &k, &v, mask, opts)?;
        Ok((o.download()?, want_lse.then(|| l.download()).transpose()?))
    }
}

/// Prefill cases (m = n) over n in {512 .. 8192} and d in {64, 128}, causal and not, as
/// TFLOP/s (4 b h m n d, halved for causal) next to the matmul on the same block products
/// (one head's `Q K^T` as an `[n, d] x [d, n]` product); b h n = 65536 in every case, so
/// FLOPs grow with n.
/// Then decode (m = 1, many keys, split-key path) as GB/s of reading K and V once, next to the
/// copy kernel: the target is a copy ratio of at least 1 / 1.5; and decode of a ragged batch
/// (`kv_lens`), as GB/s of its sequences' filled keys.
/// `quick` (software devices, 0.2-1 GFLOP/s) takes b = 1, h = 2, n in {256, 512} and 1024
/// decode keys, one call per timed submit.
pub fn bench(ctx: &Context, quick: bool, baseline: &Baseline) -> Result<Vec<BenchRow>, Error> {
    let mut rows = Vec::new();
    // Quick: shapes a software device runs in seconds.
    let ns: &[usize] = if quick {
        &[256, 512]
    } else {
        &[512, 1024, 2048, 4096, 8192]
    };
    for d in [64usize, 128] {
        for &n in ns {
            let (b, h) = match (quick, n) {
                (true, _) => (1usize, 2usize),
                (false, 512) => (4, 32),
                (false, 1024) => (4, 16),
                (false, 2048) => (2, 16),
                (false, 4096) => (1, 16),
                (false, _) => (1, 8),
            };
            rows.extend(prefill(ctx, baseline, [b, h, n, d], quick)?);
        }
    }
    let n = if quick { 1024 } else { 32768 };
    rows.push(decode::<f16>(ctx, baseline, n, None, "f16", quick)?);
    rows.push(decode::<f32>(ctx, baseline, n, None, "f32", quick)?);
    // A ragged batch: 8 sequences in a cache of 4096 positions filled to 512, 1024, .., 4096
    // (18432 keys; the cache's k, widened to f32 where f16 is not native, is 128 MiB, a common
    // storage binding limit); quick, 4 in a cache of 1024 filled to 1024 keys in all.
    let (n, lens): (usize, Vec<usize>) = if quick {
        (1024, vec![640, 256, 96, 32])
    } else {
        (4096, (1..=8).map(|i| 512 * i).collect())
    };
    rows.push(decode::<f16>(ctx, baseline, n, Some(lens), "f16", quick)?);
    Ok(rows)
}

/// f32 attention with m = n, causal and not, then the matmul of one head's scores on the same block products.
fn prefill(
    ctx: &Context,
    baseline: &Baseline,
    dims: [usize; 4],
    quick: bool,
) -> Result<Vec<BenchRow>, Error> {
    let [b, h, n, d] = dims;
    let mut rows = Vec::new();
    let len = b * h * n * d;
    let q = ctx.upload(&random_values(len, 1, -1.0, 1.0), dims)?;
    let k = ctx.upload(&random_values(len, 2, -1.0, 1.0), dims)?;
    let v = ctx.upload(&random_values(len, 3, -1.0, 1.0), dims)?;
    let o = ctx.zeros::<f32>(dims)?;
    for causal in [false, true] {
        let opts = AttentionOptions {
            causal,
            ..Default::default()
        };
        let plan = Attention::new(ctx, &opts)?.plan(&q, &k, &v, None, &o, None)?;
        let flops = 4.0 * (b * h * n * n * d) as f64 / if causal { 2.0 } else { 1.0 };
        let timing = time_passes(ctx, WARMUP, SAMPLES, calls(flops, quick), |pass| {
            plan.record(pass)
        })?;
        rows.push(BenchRow {
            kernel: "attention",
            case: format!(
                "f32 b{b} h{h} n{n} d{d}{}",
                if causal { " causal" } else { "" }
            ),
            timing,
            bytes: None,
            flops: Some(flops),
            copy_gbps: baseline.gbps,
            rate: None,
        });
    }
    // The same engine's matmul: one head's Q K^T, [n, d] x [n, d]^T, at most 4096 query rows
    // so that the [rows, n] product stays within a 128 MiB storage binding.
    let r = n.min(4096);
    let a = ctx.upload(&random_values(r * d, 4, -1.0, 1.0), [r, d])?;
    let bt = ctx.upload(&random_values(n * d, 5, -1.0, 1.0), [n, d])?;
    let c = ctx.zeros::<f32>([r, n])?;
    let plan = matmul_plan(ctx, &a, &bt, &c, true)?;
    let flops = 2.0 * (r * n * d) as f64;
    let timing = time_passes(ctx, WARMUP, SAMPLES, calls(flops, quick), |pass| {
        plan.record(pass)
    })?;
    rows.push(BenchRow {
        kernel: "matmul",
        case: format!("f32 A B^T {r}x{d} . {d}x{n} (block products)"),
        timing,
        bytes: None,
        flops: Some(flops),
        copy_gbps: baseline.gbps,
        rate: None,
    });
    Ok(rows)
}

/// Decode: one query per head (hq = 32, hkv = 8, d = 128) over a cache of `n` positions, keys
/// split across workgroups (the default for m <= 4, n >= 1024): b = 1 over all n, or a ragged
/// batch with `kv_lens` (one sequence per length). Bytes are the keys' K and V read once, so the
/// copy ratio is (time to read them at copy bandwidth) / (decode time). Values are zeros:
/// nothing in the kernel's time depends on them.
fn decode<T: Element>(
    ctx: &Context,
    baseline: &Baseline,
    n: usize,
    kv_lens: Option<Vec<usize>>,
    name: &str,
    quick: bool,
) -> Result<BenchRow, Error> {
    let (hq, hkv, d) = (32, 8, 128);
    let b = kv_lens.as_ref().map_or(1, Vec::len);
    let keys: usize = kv_lens.as_ref().map_or(n, |l| l.iter().sum());
    let case = match &kv_lens {
        None => format!("decode {name} b{b} h{hq}/{hkv} m1 n{n} d{d}"),
        Some(l) => {
            let (lo, hi) = (l.iter().min().unwrap_or(&0), l.iter().max().unwrap_or(&0));
            format!("decode {name} ragged b{b} h{hq}/{hkv} m1 n{lo}..{hi} d{d}")
        }
    };
    let q = ctx.zeros::<T>([b, hq, 1, d])?;
    let k = ctx.zeros::<T>([b, hkv, n, d])?;
    let v = ctx.zeros::<T>([b, hkv, n, d])?;
    let o = ctx.zeros::<T>([b, hq, 1, d])?;
    let opts = AttentionOptions {
        kv_lens,
        ..Default::default()
    };
    let plan = Attention::new(ctx, &opts)?.plan(&q, &k, &v, None, &o, None)?;
    let bytes = (2 * keys * hkv * d * T::DTYPE.size()) as u64;
    let calls = quick_calls(quick, iterations(bytes));
    let timing = time_passes(ctx, WARMUP, SAMPLES, calls, |pass| plan.record(pass))?;
    Ok(baseline.memory("attention", case, timing, bytes as f64))
}

/// Calls per timed submit: about a GFLOP, at most 16 (one with `quick`).
fn calls(flops: f64, quick: bool) -> usize {
    quick_calls(quick, (1e9 / flops).clamp(1.0, 16.0) as usize)
}

/// Shapes of the optional mask of `seqk run attention`, and its dtypes: bool (or uint8), true =
/// keep, or float32/float16, added to the scores.
const MASK_SHAPE: &str = "[m|1, n] or [b|1, 1|hq, m|1, n]";
const MASK_EXPECTED: &str =
    "[m|1, n] or [b|1, 1|hq, m|1, n] bool (or uint8; true = keep), or float32 or float16 (added to the scores)";

/// `--set kv_lens=3,7,5`: one length per batch, comma-separated.
fn parse_lens(v: &str) -> Result<Vec<usize>, CliError> {
    v.split(',')
        .map(|x| {
            x.trim().parse().map_err(|_| {
                usage(format!(
                    "--set kv_lens={v}: cannot parse {:?} as a length; expected one per batch, \
                     comma-separated (kv_lens=3,7,5)",
                    x.trim()
                ))
            })
        })
        .collect()
}

/// `seqk run attention --in q=Q.npy --in k=K.npy --in v=V.npy [--in mask=M.npy] --out O.npy
/// [--out2 lse=L.npy] [--set scale=.. causal=.. softcap=.. kv_len=.. kv_lens=N,N,..
/// layout=bhsd|bshd]`
pub fn run(io: &mut RunIo) -> Result<(), CliError> {
    let layout: Layout = io.set::<String>("layout", "bhsd".into())?.parse()?;
    // The tensors' axes in the layout's order, for messages.
    let [qs, ks, vs] = match layout {
        Layout::Bhsd => ["[b, hq, m, d]", "[b, hkv, n, d]", "[b, hkv, n, dv]"],
        Layout::Bshd => ["[b, m, hq, d]", "[b, n, hkv, d]", "[b, n, hkv, dv]"],
    };
    let q = io.required("q", &format!("{qs} float32 or float16"))?;
    let k = io.required("k", &format!("{ks} float32 or float16"))?;
    let v = io.required("v", &format!("{vs} float32 or float16"))?;
    let mask = io.input("mask", MASK_EXPECTED)?;
    let opts = AttentionOptions {
        scale: io.set_opt("scale")?,
        causal: io.set("causal", false)?,
        softcap: io.set("softcap", 0.0)?,
        kv_len: io.set_opt("kv_len")?,
        kv_lens: io
            .set_opt::<String>("kv_lens")?
            .map(|v| parse_lens(&v))
            .transpose()?,
        layout,
        ..Default::default()
    };
    let want_lse = io.wants_out2("lse");
    io.check_unused()?;
    // A float mask is additive, a bool or uint8 one boolean.
    let mask: Option<(Mask, Vec<usize>)> = mask
        .map(|m| {
            let shape = m.shape.clone();
            let values = match m.data {
                Data::F32(_) | Data::F16(_) => Mask::Add(m.floats("mask", MASK_SHAPE)?.0),
                Data::Bool(_) | Data::U8(_) => Mask::Keep(m.bools("mask", MASK_SHAPE)?),
                other => {
                    return Err(usage(format!(
                        "input mask has dtype {}; expected {MASK_EXPECTED}",
                        other.dtype_name()
                    )))
                }
            };
            Ok((values, shape))
        })
        .transpose()?;
    let (qv, qh) = q.floats("q", qs)?;
    let (kv, kh) = k.floats("k", ks)?;
    let (vv, vh) = v.floats("v", vs)?;
    let s = attention_shape(
        &q.shape,
        &k.shape,
        &v.shape,
        mask.as_ref().map(|m| m.1.as_slice()),
        &opts,
    )?;
    let shapes = [q.shape.clone(), k.shape.clone(), v.shape.clone()];
    let mask_ref = mask.as_ref().map(|(m, sh)| (m.host(), sh.as_slice()));
    let (out, lse) = if io.cpu {
        let r = reference::attention(
            (&qv, &shapes[0]),
            (&kv, &shapes[1]),
            (&vv, &shapes[2]),
            mask_ref,
            &opts,
        )?;
        let f = |x: Vec<f64>| x.into_iter().map(|a| a as f32).collect::<Vec<f32>>();
        (f(r.out), Some(f(r.lse)))
    } else {
        // f16 storage on the GPU only when every input is f16.
        let half = qh && kh && vh;
        let ctx = io.context()?;
        run_gpu(
            &ctx,
            [&qv, &kv, &vv],
            &shapes,
            mask_ref,
            half,
            &opts,
            want_lse,
        )?
    };
    io.write_out(&Array {
        shape: s.out_shape(opts.layout),
        data: Data::F32(out),
    })?;
    if let Some(l) = lse {
        io.write_out2(
            "lse",
            &Array {
                shape: vec![s.b, s.hq, s.m],
                data: Data::F32(l),
            },
        )?;
    }
    Ok(())
}
