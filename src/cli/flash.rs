//! `seqk` entries of FLASH mixed-chunk attention (and the exact attention it is benchmarked
//! beside, for a Transformer of the same width).

use half::f16;
use std::time::Duration;

use super::report::{iterations, quick_calls, Baseline, BenchRow, Check, Rate, SAMPLES, WARMUP};
use super::{usage, Array, CliError, Data, RunIo};
use crate::kernels::flash::FlashShape;
use crate::profile::time_passes;
use crate::reference::flash::{flash as reference, FlashHost};
use crate::reference::{random_values, row_error};
use crate::{
    Attention, AttentionOptions, AttnFn, Context, Error, Flash, FlashInputs, FlashOptions,
    FlashRope, GpuTensor, LinNorm,
};

/// Allowed error, as for attention: 1e-4 of the output magnitude for f32 storage; f16 within
/// 2e-3 of the largest output (f16 holds tiny outputs only as subnormals).
const TOL_F32: f64 = 1e-4;
const TOL_F16: f64 = 2e-3;

/// Host inputs of one call: qq, kq, ql, kl, v, then optional gate, bias, key mask.
struct Host {
    dims: [usize; 4],
    x: [Vec<f32>; 5],
    gate: Option<Vec<f32>>,
    bias: Option<Vec<f32>>,
    mask: Option<Vec<bool>>,
}

impl Host {
    fn view(&self) -> FlashHost<'_> {
        FlashHost {
            qq: &self.x[0],
            kq: &self.x[1],
            ql: &self.x[2],
            kl: &self.x[3],
            v: &self.x[4],
            gate: self.gate.as_deref(),
            bias: self.bias.as_deref(),
            key_mask: self.mask.as_deref(),
            dims: self.dims,
        }
    }
}

/// Uploads `host` as `T` and runs one call on the GPU; the output comes back as f32.
fn run_gpu<T: crate::Element>(
    ctx: &Context,
    host: &Host,
    opts: &FlashOptions,
    convert: impl Fn(&[f32]) -> Vec<T>,
    back: impl Fn(T) -> f32,
) -> Result<Vec<f32>, Error> {
    let [b, n, s, e] = host.dims;
    let width = [s, s, s, s, e];
    let up = |i: usize| ctx.upload(&convert(&host.x[i]), [b, n, width[i]]);
    let (qq, kq, ql, kl, v) = (up(0)?, up(1)?, up(2)?, up(3)?, up(4)?);
    let gate = host
        .gate
        .as_ref()
        .map(|g| ctx.upload(&convert(g), [b, n, e]))
        .transpose()?;
    let bias = host
        .bias
        .as_ref()
        .map(|x| ctx.upload(x, [opts.chunk, opts.chunk]))
        .transpose()?;
    let mask = host
        .mask
        .as_ref()
        .map(|m| ctx.upload_mask(m, [b, n]))
        .transpose()?;
    let inputs = FlashInputs {
        gate: gate.as_ref(),
        bias: bias.as_ref(),
        key_mask: mask.as_ref(),
        ..FlashInputs::new(&qq, &kq, &ql, &kl, &v)
    };
    Ok(ctx
        .flash(&inputs, opts)?
        .download()?
        .into_iter()
        .map(back)
        .collect())
}

fn run_f32(ctx: &Context, host: &Host, opts: &FlashOptions) -> Result<Vec<f32>, Error> {
    run_gpu(ctx, host, opts, <[f32]>::to_vec, |x| x)
}

fn run_f16(ctx: &Context, host: &Host, opts: &FlashOptions) -> Result<Vec<f32>, Error> {
    run_gpu(
        ctx,
        host,
        opts,
        |x| x.iter().map(|&v| f16::from_f32(v)).collect(),
        f16::to_f32,
    )
}

fn random_host(dims: [usize; 4], seed: u64, extras: bool, chunk: usize, half: bool) -> Host {
    let [b, n, s, e] = dims;
    let r = |k: u64, len: usize| {
        let mut v = random_values(len, seed * 16 + k, -1.0, 1.0);
        if half {
            v.iter_mut().for_each(|x| *x = f16::from_f32(*x).to_f32());
        }
        v
    };
    Host {
        dims,
        x: [
            r(0, b * n * s),
            r(1, b * n * s),
            r(2, b * n * s),
            r(3, b * n * s),
            r(4, b * n * e),
        ],
        gate: extras.then(|| r(5, b * n * e)),
        bias: extras.then(|| random_values(chunk * chunk, seed + 7, -0.5, 0.5)),
        mask: extras.then(|| {
            random_values(b * n, seed + 8, 0.0, 1.0)
                .iter()
                .map(|&u| u < 0.8)
                .collect()
        }),
    }
}

pub fn verify(ctx: &Context, quick: bool) -> Result<Vec<Check>, Error> {
    let d = FlashOptions::default();
    // (b, n, s, e), options, gate/bias/mask, f16
    let mut cases: Vec<([usize; 4], FlashOptions, bool, bool)> = vec![
        (
            [1, 257, 32, 48],
            FlashOptions {
                chunk: 64,
                ..d.clone()
            },
            false,
            false,
        ),
        (
            [2, 100, 40, 70],
            FlashOptions {
                chunk: 16,
                causal: true,
                lin_norm: LinNorm::Prefix,
                rope: Some(FlashRope::default()),
                ..d.clone()
            },
            true,
            false,
        ),
        (
            [1, 200, 64, 96],
            FlashOptions {
                chunk: 64,
                causal: true,
                attn_fn: AttnFn::Laplace,
                lin_norm: LinNorm::Length,
                ..d.clone()
            },
            true,
            true,
        ),
    ];
    if !quick {
        cases.push((
            [1, 1000, 128, 1536],
            FlashOptions {
                causal: true,
                ..d.clone()
            },
            false,
            false,
        ));
    }
    let mut checks = Vec::new();
    for (i, (dims, opts, extras, half)) in cases.into_iter().enumerate() {
        let host = random_host(dims, i as u64 + 1, extras, opts.chunk, half);
        let want = reference(&host.view(), &opts)?;
        let (got, tol, row) = if half {
            let got = run_f16(ctx, &host, &opts)?;
            let len = got.len();
            (got, TOL_F16, len)
        } else {
            (run_f32(ctx, &host, &opts)?, TOL_F32, dims[3])
        };
        let [b, n, s, e] = dims;
        let mut case = format!("b{b} n{n} s{s} e{e} C{}", opts.chunk);
        if opts.causal {
            case.push_str(" causal");
        }
        if opts.attn_fn == AttnFn::Laplace {
            case.push_str(" laplace");
        }
        if opts.rope.is_some() {
            case.push_str(" rope");
        }
        if extras {
            case.push_str(" gate+bias+mask");
        }
        if half {
            case.push_str(" f16");
        }
        checks.push(Check {
            kernel: "flash",
            case,
            error: row_error(&got, &want, row),
            tolerance: tol,
        });
    }
    Ok(checks)
}

/// FLOPs of one call, the work the maths needs: per token `2 C (s + e)` in the quadratic
/// branch (halved for causal) and `2 s e` for each of the linear branch's products (`kl^T v`
/// and `ql KV`). Causal calls need no KV of the last chunk (no later chunk reads it) and no
/// linear term in chunk 0 (an empty exclusive prefix), and the kernel skips both.
fn flash_flops(sh: &FlashShape, causal: bool) -> f64 {
    let (n, c, s, e) = (
        sh.n as f64,
        sh.chunk.min(sh.n) as f64,
        sh.s as f64,
        sh.e as f64,
    );
    let quad = 2.0 * c * (s + e) / if causal { 2.0 } else { 1.0 };
    let (kv_tokens, ql_tokens) = if causal {
        let chunks = sh.n.div_ceil(sh.chunk) as f64;
        ((chunks - 1.0) * c, n - c)
    } else {
        (n, n)
    };
    sh.b as f64 * (n * quad + 2.0 * s * e * (kv_tokens + ql_tokens))
}

/// FLASH over n with s = 128, e = 1536, C = 256, causal and not, and beside it exact attention
/// for a Transformer of the same width (12 heads of 64, m = n). Rows carry tokens/s and the
/// time per token as their rate.
/// `quick` takes n 1K and 2K (exact attention at 1K only, briefly sampled); the full run n up
/// to 64K. Exact attention is quadratic, so it goes on to the next n only while one pass took
/// under [`EXACT_PASS_LIMIT`] (a 64K pass is minutes on a software adapter), and takes fewer
/// samples once a pass is long. After the 64K rows the full run repeats FLASH for n below 16K
/// on the same 64K tokens batched (b = 64K / n). Sizes the adapter cannot bind are reported
/// and skipped.
pub fn bench(ctx: &Context, quick: bool, baseline: &Baseline) -> Result<Vec<BenchRow>, Error> {
    let ns: &[usize] = if quick {
        &[1024, 2048]
    } else {
        &[1024, 2048, 4096, 8192, 16384, 32768, 65536]
    };
    let mut rows = Vec::new();
    let mut exact_pass = Duration::ZERO;
    for &n in ns {
        // After the 64K rows, the batched ones on the same tensors.
        let batched: Vec<usize> = if !quick && n == BATCHED_TOKENS {
            ns.iter().copied().filter(|&m| m < BATCHED_BELOW).collect()
        } else {
            Vec::new()
        };
        match flash_series(ctx, n, &batched, baseline, quick) {
            Ok(r) => rows.extend(r),
            Err(e @ Error::LimitExceeded { .. }) => {
                eprintln!("seqk bench flash: n = {n} skipped, {e}")
            }
            Err(err) => return Err(err),
        }
        // The quick table takes exact attention at the first n only, sampled briefly.
        if quick && n > ns[0] {
            continue;
        }
        if exact_pass < EXACT_PASS_LIMIT {
            // The next pass is about four times the last: sample long ones less.
            let long = quick || exact_pass * 4 > LONG_PASS;
            let exact = exact_rows(ctx, n, baseline, long)?;
            exact_pass = exact
                .iter()
                .map(|r| r.timing.best())
                .max()
                .unwrap_or_default();
            rows.extend(exact);
        } else {
            eprintln!(
                "seqk bench flash: exact attention at n = {n} skipped, the last pass took {:.1} s",
                exact_pass.as_secs_f64()
            );
        }
    }
    Ok(rows)
}

/// s, e and C of the bench rows.
const BENCH_SHAPE: (usize, usize, usize) = (128, 1536, 256);
/// Tokens per call (b n) of the batched FLASH rows, and the n they are run below (from there
/// b = 1 already fills a large GPU).
const BATCHED_TOKENS: usize = 65536;
const BATCHED_BELOW: usize = 16384;

/// The longest exact-attention pass after which the exact series stops growing n.
const EXACT_PASS_LIMIT: Duration = Duration::from_millis(3000);
/// Passes longer than this are timed with one warm-up and three samples.
const LONG_PASS: Duration = Duration::from_millis(500);

/// Rows report tokens per second and time per token.
fn tokens(n: usize) -> Rate {
    Rate {
        items: n as f64,
        unit: "tokens",
        speedup: None,
    }
}

/// Random FLASH inputs [b, n, s] x 4 and [b, n, e], and an output, of the bench shape.
struct BenchTensors {
    qq: GpuTensor<f32>,
    kq: GpuTensor<f32>,
    ql: GpuTensor<f32>,
    kl: GpuTensor<f32>,
    v: GpuTensor<f32>,
    out: GpuTensor<f32>,
}

impl BenchTensors {
    fn new(ctx: &Context, b: usize, n: usize) -> Result<Self, Error> {
        let (s, e, _) = BENCH_SHAPE;
        let up = |seed, w: usize| -> Result<GpuTensor<f32>, Error> {
            ctx.upload(&random_values(b * n * w, seed, -1.0, 1.0), [b, n, w])
        };
        Ok(Self {
            qq: up(1, s)?,
            kq: up(2, s)?,
            ql: up(3, s)?,
            kl: up(4, s)?,
            v: up(5, e)?,
            out: ctx.zeros([b, n, e])?,
        })
    }

    /// The same tensors seen as [b, n, .] (b n unchanged).
    fn reshape(&self, b: usize, n: usize) -> Result<Self, Error> {
        let (s, e, _) = BENCH_SHAPE;
        Ok(Self {
            qq: self.qq.reshape([b, n, s])?,
            kq: self.kq.reshape([b, n, s])?,
            ql: self.ql.reshape([b, n, s])?,
            kl: self.kl.reshape([b, n, s])?,
            v: self.v.reshape([b, n, e])?,
            out: self.out.reshape([b, n, e])?,
        })
    }
}

/// FLASH rows at b = 1 and n, then at the same tokens batched as b = n / m for each m in
/// `batched`: the time per token when batching fills the GPU. The batched rows reshape the
/// b = 1 tensors rather than make new ones: on an H200, calls on tensors of 64K tokens made
/// anew in a process that had already made and dropped such tensors sometimes ran 2-4x slower
/// (BENCHMARKS.md). Their calls take as long as the b = 1 call: sampled less when that was
/// long.
fn flash_series(
    ctx: &Context,
    n: usize,
    batched: &[usize],
    baseline: &Baseline,
    quick: bool,
) -> Result<Vec<BenchRow>, Error> {
    let x = BenchTensors::new(ctx, 1, n)?;
    let mut rows = flash_rows(ctx, &x, baseline, false, quick)?;
    let long = rows.iter().any(|r| r.timing.best() > LONG_PASS);
    for &m in batched {
        rows.extend(flash_rows(
            ctx,
            &x.reshape(n / m, m)?,
            baseline,
            long,
            quick,
        )?);
    }
    Ok(rows)
}

fn flash_rows(
    ctx: &Context,
    x: &BenchTensors,
    baseline: &Baseline,
    long: bool,
    quick: bool,
) -> Result<Vec<BenchRow>, Error> {
    let (s, e, chunk) = BENCH_SHAPE;
    let (b, n) = (x.v.shape()[0], x.v.shape()[1]);
    let (warmup, samples) = if long { (1, 3) } else { (WARMUP, SAMPLES) };
    let out = &x.out;
    let inputs = FlashInputs::new(&x.qq, &x.kq, &x.ql, &x.kl, &x.v);
    let mut rows = Vec::new();
    for causal in [false, true] {
        let opts = FlashOptions {
            chunk,
            causal,
            ..Default::default()
        };
        let plan = Flash::new(ctx, &opts)?.plan(&inputs, out)?;
        let flops = flash_flops(&inputs.shape(&opts)?, causal);
        // Several calls per timed submit at small n, as for every other kernel's rows.
        let bytes = (b * n * (4 * s + 2 * e) * 4) as u64;
        let calls = quick_calls(quick, iterations(bytes));
        let timing = time_passes(ctx, warmup, samples, calls, |pass| plan.record(pass))?;
        rows.push(BenchRow {
            kernel: "flash",
            case: format!(
                "{}n{n} s{s} e{e} C{chunk}{}",
                if b > 1 {
                    format!("b{b} ")
                } else {
                    String::new()
                },
                if causal { " causal" } else { "" },
            ),
            timing,
            bytes: None,
            flops: Some(flops),
            copy_gbps: baseline.gbps,
            rate: Some(tokens(b * n)),
        });
    }
    Ok(rows)
}

/// Exact attention of a Transformer of the same width: 12 heads of 64, m = n.
fn exact_rows(
    ctx: &Context,
    n: usize,
    baseline: &Baseline,
    long: bool,
) -> Result<Vec<BenchRow>, Error> {
    let (warmup, samples) = if long { (1, 3) } else { (WARMUP, SAMPLES) };
    let (h, d) = (12usize, 64usize);
    let shape = [1, h, n, d];
    let up = |seed| ctx.upload(&random_values(h * n * d, seed, -1.0, 1.0), shape);
    let (q, k, v) = (up(1)?, up(2)?, up(3)?);
    let o = ctx.zeros::<f32>(shape)?;
    let mut rows = Vec::new();
    for causal in [false, true] {
        let opts = AttentionOptions {
            causal,
            ..Default::default()
        };
        let plan = Attention::new(ctx, &opts)?.plan(&q, &k, &v, None, &o, None)?;
        let flops = 4.0 * (h * n * n * d) as f64 / if causal { 2.0 } else { 1.0 };
        let timing = time_passes(ctx, warmup, samples, 1, |pass| plan.record(pass))?;
        rows.push(BenchRow {
            kernel: "attention",
            case: format!("h12 d64 n{n}{}", if causal { " causal" } else { "" }),
            timing,
            bytes: None,
            flops: Some(flops),
            copy_gbps: baseline.gbps,
            rate: Some(tokens(n)),
        });
    }
    Ok(rows)
}

/// `seqk run flash --in qq=.. --in kq=.. --in ql=.. --in kl=.. --in v=.. [--in gate=..]
/// [--in bias=..] [--in key_mask=..] --out Y.npy [--set chunk=.. causal=.. attn_fn=..
/// quad_scale=.. lin_norm=.. lin_scale=.. rope=.. base=.. offset=..]`: `rope=true` rotates
/// qq, kq, ql and kl in the kernel (half style, positions offset .. offset + n - 1).
pub fn run(io: &mut RunIo) -> Result<(), CliError> {
    let names = ["qq", "kq", "ql", "kl"];
    let mut qk = Vec::new();
    for name in names {
        qk.push(io.required(name, "[b, n, s] float32 or float16")?);
    }
    let v = io.required("v", "[b, n, e] float32 or float16")?;
    let gate = io.input("gate", "[b, n, e] float32 or float16")?;
    let bias = io.input("bias", "[C, C] float32 or float16")?;
    let mask = io.input("key_mask", "[b, n] bool or uint8")?;
    let chunk: usize = io.set("chunk", 256)?;
    let rope = io.set("rope", false)?;
    let base: Option<f64> = io.set_opt("base")?;
    let offset: Option<u64> = io.set_opt("offset")?;
    if !rope && (base.is_some() || offset.is_some()) {
        return Err(usage(
            "flash: --set base and offset apply to rope=true only",
        ));
    }
    let opts = FlashOptions {
        chunk,
        causal: io.set("causal", false)?,
        attn_fn: io.set::<String>("attn_fn", "relu2".into())?.parse()?,
        quad_scale: io.set_opt("quad_scale")?,
        lin_norm: io.set::<String>("lin_norm", "chunk".into())?.parse()?,
        lin_scale: io.set_opt("lin_scale")?,
        rope: rope.then(|| {
            let d = FlashRope::default();
            FlashRope {
                base: base.unwrap_or(d.base),
                offset: offset.unwrap_or(d.offset),
            }
        }),
    };
    io.check_unused()?;
    let shapes: Vec<&[usize]> = qk.iter().map(|a| a.shape.as_slice()).collect();
    let sh = crate::kernels::flash::flash_shape(
        [shapes[0], shapes[1], shapes[2], shapes[3]],
        &v.shape,
        gate.as_ref().map(|g| g.shape.as_slice()),
        bias.as_ref().map(|b| b.shape.as_slice()),
        mask.as_ref().map(|m| m.shape.as_slice()),
        &opts,
    )?;
    let mut half = true;
    let mut take = |a: &Array, name: &str, shape: &str| -> Result<Vec<f32>, CliError> {
        let (x, h) = a.floats(name, shape)?;
        half &= h;
        Ok(x)
    };
    let x = [
        take(&qk[0], "qq", "[b, n, s]")?,
        take(&qk[1], "kq", "[b, n, s]")?,
        take(&qk[2], "ql", "[b, n, s]")?,
        take(&qk[3], "kl", "[b, n, s]")?,
        take(&v, "v", "[b, n, e]")?,
    ];
    let gate = gate
        .as_ref()
        .map(|g| take(g, "gate", "[b, n, e]"))
        .transpose()?;
    // The bias is f32 whatever the storage type; its dtype does not pick the storage.
    let bias = bias
        .as_ref()
        .map(|b| b.floats("bias", "[C, C]").map(|x| x.0))
        .transpose()?;
    let mask = mask.map(|m| m.bools("key_mask", "[b, n]")).transpose()?;
    let host = Host {
        dims: [sh.b, sh.n, sh.s, sh.e],
        x,
        gate,
        bias,
        mask,
    };
    let out = if io.cpu {
        reference(&host.view(), &opts)?
            .into_iter()
            .map(|a| a as f32)
            .collect()
    } else {
        // f16 storage on the GPU only when every float input is f16.
        let ctx = io.context()?;
        if half {
            run_f16(&ctx, &host, &opts)?
        } else {
            run_f32(&ctx, &host, &opts)?
        }
    };
    io.write_out(&Array {
        shape: vec![sh.b, sh.n, sh.e],
        data: Data::F32(out),
    })?;
    Ok(())
}
