//! `seqk` entries of the softmax family.

use half::f16;

use super::report::{iterations, Baseline, BenchRow, Check, SAMPLES, WARMUP};
use super::{usage, Array, CliError, Data, RunIo};
use crate::profile::time_passes;
use crate::reference::{random_values, row_error, softmax as reference};
use crate::{Context, Error, Softmax, SoftmaxOptions};

/// Allowed error: 1e-6 of the row scale for f32 storage, 2e-3 for f16.
const TOL_F32: f64 = 1e-6;
const TOL_F16: f64 = 2e-3;

pub fn verify(ctx: &Context, quick: bool) -> Result<Vec<Check>, Error> {
    let d = SoftmaxOptions::default();
    let mut cases: Vec<(Vec<usize>, SoftmaxOptions, bool, bool)> = vec![
        (vec![3, 1], d.clone(), false, false),
        (vec![7, 127], d.clone(), false, false),
        (
            vec![3, 4097],
            SoftmaxOptions {
                log: true,
                ..d.clone()
            },
            false,
            false,
        ),
        (
            vec![2, 9, 13],
            SoftmaxOptions {
                causal: true,
                ..d.clone()
            },
            true,
            false,
        ),
        (
            vec![5, 1000],
            SoftmaxOptions {
                temperature: 0.5,
                softmax_plus: true,
                ..d.clone()
            },
            true,
            false,
        ),
        (vec![4, 1000], d.clone(), false, true),
    ];
    if !quick {
        cases.extend([
            (vec![70000, 3], d.clone(), false, false),
            (
                vec![2, 65537],
                SoftmaxOptions {
                    softmax_plus: true,
                    ..d.clone()
                },
                true,
                false,
            ),
            (
                vec![1, 1 << 20],
                SoftmaxOptions {
                    log: true,
                    scale: 0.5,
                    ..d.clone()
                },
                false,
                false,
            ),
            (vec![3, 70001], d.clone(), false, true),
        ]);
    }
    let mut checks = Vec::new();
    for (i, (shape, opts, masked, half)) in cases.into_iter().enumerate() {
        let len: usize = shape.iter().product();
        let n = shape[shape.len() - 1];
        let mut x = random_values(len, i as u64 + 1, -8.0, 8.0);
        if half {
            x.iter_mut().for_each(|v| *v = f16::from_f32(*v).to_f32());
        }
        let mask: Option<Vec<bool>> = masked.then(|| {
            random_values(len, i as u64 + 99, 0.0, 1.0)
                .iter()
                .map(|&u| u < 0.8)
                .collect()
        });
        let want = reference::softmax(&x, &shape, mask.as_deref(), &opts)?;
        let got = run_gpu(ctx, &x, half, &shape, mask.as_deref(), &opts)?;
        let mut case = format!("{shape:?}");
        if !describe(&opts).is_empty() {
            case = format!("{case} {}", describe(&opts));
        }
        if masked {
            case.push_str(" mask");
        }
        if half {
            case.push_str(" f16");
        }
        let tolerance = if half { TOL_F16 } else { TOL_F32 };
        checks.push(Check {
            kernel: "softmax",
            case,
            error: row_error(&got, &want, n),
            tolerance,
        });
    }
    Ok(checks)
}

fn describe(o: &SoftmaxOptions) -> String {
    let mut parts = Vec::new();
    if o.log {
        parts.push("log".to_string());
    }
    if o.temperature != 1.0 {
        parts.push(format!("T={}", o.temperature));
    }
    if o.scale != 1.0 {
        parts.push(format!("scale={}", o.scale));
    }
    if o.causal {
        parts.push("causal".into());
    }
    if o.softmax_plus {
        parts.push("plus".into());
    }
    parts.join(" ")
}

fn run_gpu(
    ctx: &Context,
    x: &[f32],
    half: bool,
    shape: &[usize],
    mask: Option<&[bool]>,
    opts: &SoftmaxOptions,
) -> Result<Vec<f32>, Error> {
    let mask = mask
        .map(|m| ctx.upload_mask(m, shape.to_vec()))
        .transpose()?;
    if half {
        let xh: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
        let xt = ctx.upload(&xh, shape.to_vec())?;
        let y = match &mask {
            Some(m) => ctx.softmax_masked(&xt, m, opts)?,
            None => ctx.softmax(&xt, opts)?,
        };
        Ok(y.download()?.iter().map(|v| v.to_f32()).collect())
    } else {
        let xt = ctx.upload(x, shape.to_vec())?;
        let y = match &mask {
            Some(m) => ctx.softmax_masked(&xt, m, opts)?,
            None => ctx.softmax(&xt, opts)?,
        };
        y.download()
    }
}

/// rows x n: the benchmark's cases; `quick` divides the rows by 16.
pub fn bench(ctx: &Context, quick: bool, baseline: &Baseline) -> Result<Vec<BenchRow>, Error> {
    let mut rows = Vec::new();
    for (r, n) in [
        (4096usize, 1024usize),
        (4096, 4096),
        (1024, 32768),
        (64, 1 << 20),
    ] {
        let r = if quick { (r / 16).max(4) } else { r };
        let x = ctx.upload(&random_values(r * n, 7, -4.0, 4.0), [r, n])?;
        let y = ctx.zeros::<f32>([r, n])?;
        let plan = Softmax::new(ctx, &SoftmaxOptions::default())?.plan(&x, None, &y)?;
        let bytes = 2 * x.bytes();
        let timing = time_passes(ctx, WARMUP, SAMPLES, iterations(bytes), |pass| {
            plan.record(pass)
        })?;
        rows.push(baseline.memory("softmax", format!("f32 {r}x{n}"), timing, bytes as f64));
    }
    Ok(rows)
}

/// `seqk run softmax --in x=X.npy [--in mask=M.npy] --out Y.npy [--set ...]`
pub fn run(io: &mut RunIo) -> Result<(), CliError> {
    let x = io.required("x", "[.., n] float32 or float16")?;
    let mask = io.input("mask", "(the shape of x) bool or uint8")?;
    let opts = SoftmaxOptions {
        temperature: io.set("temperature", 1.0)?,
        scale: io.set("scale", 1.0)?,
        log: io.set("log", false)?,
        causal: io.set("causal", false)?,
        softmax_plus: io.set("softmax_plus", false)?,
    };
    io.check_unused()?;
    let mask: Option<Vec<bool>> = match mask {
        None => None,
        Some(m) => {
            if m.shape != x.shape {
                return Err(usage(format!(
                    "input mask has shape {:?}; expected the shape of x, {:?}",
                    m.shape, x.shape
                )));
            }
            Some(m.bools("mask", "(the shape of x)")?)
        }
    };
    let (values, half) = x.floats("x", "[.., n]")?;
    let out: Vec<f32> = if io.cpu {
        reference::softmax(&values, &x.shape, mask.as_deref(), &opts)?
            .iter()
            .map(|&v| v as f32)
            .collect()
    } else {
        let ctx = io.context()?;
        run_gpu(&ctx, &values, half, &x.shape, mask.as_deref(), &opts)?
    };
    io.write_out(&Array {
        shape: x.shape.clone(),
        data: Data::F32(out),
    })
}
