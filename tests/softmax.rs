//! Softmax family on the GPU against the f64 reference, the kernel's properties, f16 storage,
//! and bad input.

mod common;

use common::{gpu, random, random_mask, small_bindings};
use half::f16;
use proptest::prelude::*;
use seq_kernels::kernels::softmax::row_shape;
use seq_kernels::reference::{row_error, softmax as reference};
use seq_kernels::{Context, Element, Error, GpuTensor, Softmax, SoftmaxOptions};

/// Runs the GPU kernel (f32 storage) and returns its output.
fn run(
    ctx: &Context,
    x: &[f32],
    shape: &[usize],
    mask: Option<&[bool]>,
    opts: &SoftmaxOptions,
) -> Vec<f32> {
    let xt = ctx.upload(x, shape.to_vec()).unwrap();
    let y = match mask {
        Some(m) => ctx.softmax_masked(&xt, &ctx.upload_mask(m, shape.to_vec()).unwrap(), opts),
        None => ctx.softmax(&xt, opts),
    };
    y.unwrap().download().unwrap()
}

/// Compares GPU and reference. Tolerance: 1e-6 of the row scale for softmax. Log-softmax values
/// are differences of O(|x|) numbers, so their error is bounded by f32 rounding of the logits
/// themselves: 1e-6 of the row's largest magnitude as well.
fn check(ctx: &Context, shape: &[usize], mask: Option<&[bool]>, opts: &SoftmaxOptions, seed: u64) {
    let n: usize = shape.iter().product();
    let x = random(n, seed, -8.0, 8.0);
    let got = run(ctx, &x, shape, mask, opts);
    let want = reference::softmax(&x, shape, mask, opts).unwrap();
    let err = row_error(&got, &want, *shape.last().unwrap());
    assert!(
        err <= 1e-6,
        "shape {shape:?} {opts:?} mask={}: relative error {err:e}",
        mask.is_some()
    );
}

#[test]
fn matches_reference_on_awkward_shapes() {
    let Some(ctx) = gpu() else { return };
    let opts = SoftmaxOptions::default();
    for &n in &[1usize, 2, 3, 31, 127, 1000, 4097, 65537, 1 << 20] {
        for &rows in &[1usize, 3, 70000] {
            // 70000 rows only where the tensor stays small enough for a CPU device.
            if rows * n > 70000 * 127 {
                continue;
            }
            check(ctx, &[rows, n], None, &opts, (n * 31 + rows) as u64);
        }
    }
}

#[test]
fn rows_longer_than_two_to_the_24() {
    let Some(ctx) = gpu() else { return };
    // 4097 tiles per row; masked so the counts pass and softmax_plus run too.
    let n = (1 << 24) + 3;
    let mask = random_mask(n, 8, 0.9);
    check(
        ctx,
        &[1, n],
        Some(&mask),
        &SoftmaxOptions {
            softmax_plus: true,
            ..Default::default()
        },
        8,
    );
}

#[test]
fn inputs_larger_than_one_binding_are_split() {
    let Some(ctx) = gpu() else { return };
    // Past max_storage_buffer_binding_size (128 MiB on lavapipe; capped at 160 MiB of data
    // elsewhere, where it may fit in one binding): the rows are split across dispatches,
    // each bound from the aligned offset at or before its first row. Causal and masked, so
    // the chunk's first-row offset matters too.
    let limit = ctx.limits().max_storage_buffer_binding_size.min(160 << 20) as usize;
    let (m, n) = (7usize, 1000usize);
    let rows = (limit / 4 / n + 64).next_multiple_of(m);
    let shape = [rows / m, m, n];
    let mask = random_mask(rows * n, 10, 0.8);
    check(
        ctx,
        &shape,
        Some(&mask),
        &SoftmaxOptions {
            causal: true,
            log: true,
            ..Default::default()
        },
        10,
    );
}

/// On a device with 64 KiB bindings, rows whose size is no multiple of the offset alignment
/// split at any row (the shader adds the row's offset inside the binding), as many rows to a
/// binding as fit: these shapes were refused when chunks had to start aligned (up to 256 rows
/// a chunk, which then needed far more than the binding). f16 too, widened or native.
#[test]
fn rows_of_any_length_split_across_small_bindings() {
    let Some(_) = gpu() else { return };
    let ctx = &small_bindings(65536);
    let causal_log = SoftmaxOptions {
        causal: true,
        log: true,
        ..Default::default()
    };
    for (shape, masked, opts) in [
        (vec![40, 1000], false, SoftmaxOptions::default()),
        (vec![7, 9000], true, causal_log.clone()),
        (vec![2, 7, 5000], true, SoftmaxOptions::default()),
        (vec![3, 5, 3001], false, causal_log),
    ] {
        let len: usize = shape.iter().product();
        let mask = random_mask(len, 21, 0.7);
        check(ctx, &shape, masked.then_some(&mask[..]), &opts, 22);
    }
    check_f16(ctx, &[9, 9001], &SoftmaxOptions::default(), 23);
}

#[test]
fn more_rows_than_one_grid_dimension_holds() {
    let Some(ctx) = gpu() else { return };
    // 65535 * 64 + 3 rows of one-invocation rows, and 65537 rows of workgroup rows: both
    // need the grid folded into y.
    check(
        ctx,
        &[65535 * 64 + 3, 3],
        None,
        &SoftmaxOptions::default(),
        5,
    );
    check(
        ctx,
        &[65537, 40],
        None,
        &SoftmaxOptions {
            log: true,
            ..Default::default()
        },
        6,
    );
}

#[test]
fn every_option_matches_reference() {
    let Some(ctx) = gpu() else { return };
    let variants = [
        SoftmaxOptions {
            log: true,
            ..Default::default()
        },
        SoftmaxOptions {
            temperature: 0.37,
            ..Default::default()
        },
        SoftmaxOptions {
            scale: -2.5,
            ..Default::default()
        },
        SoftmaxOptions {
            causal: true,
            ..Default::default()
        },
        SoftmaxOptions {
            causal: true,
            log: true,
            softmax_plus: true,
            ..Default::default()
        },
        SoftmaxOptions {
            softmax_plus: true,
            temperature: 2.0,
            ..Default::default()
        },
    ];
    // Thread rows, workgroup rows, long rows; causal with m < n, m == n and m > n.
    let shapes: [&[usize]; 6] = [
        &[2, 5, 7],
        &[3, 7, 5],
        &[1, 33, 33],
        &[4, 257],
        &[2, 3, 5000],
        &[1, 2, 70001],
    ];
    for (i, opts) in variants.iter().enumerate() {
        for (k, shape) in shapes.iter().enumerate() {
            let len: usize = shape.iter().product();
            let seed = (i * 10 + k) as u64;
            check(ctx, shape, None, opts, seed);
            let mask = random_mask(len, seed + 100, 0.7);
            check(ctx, shape, Some(&mask), opts, seed);
        }
    }
}

#[test]
fn f16_storage_matches_reference() {
    let Some(ctx) = gpu() else { return };
    for (shape, opts) in [
        (vec![3usize, 5], SoftmaxOptions::default()),
        (
            vec![5, 999],
            SoftmaxOptions {
                log: true,
                ..Default::default()
            },
        ),
        (
            vec![2, 3, 4097],
            SoftmaxOptions {
                causal: true,
                ..Default::default()
            },
        ),
        (vec![1, 70001], SoftmaxOptions::default()),
    ] {
        check_f16(ctx, &shape, &opts, 9);
    }
}

/// Compares the GPU with f16 storage and the reference on the f16-rounded input. Tolerance:
/// 2e-3 relative, the f16 rounding of the output.
fn check_f16(ctx: &Context, shape: &[usize], opts: &SoftmaxOptions, seed: u64) {
    let n: usize = shape.iter().product();
    let x: Vec<f16> = random(n, seed, -4.0, 4.0)
        .into_iter()
        .map(f16::from_f32)
        .collect();
    let xt = ctx.upload(&x, shape.to_vec()).unwrap();
    let got: Vec<f32> = ctx
        .softmax(&xt, opts)
        .unwrap()
        .download()
        .unwrap()
        .iter()
        .map(|v| v.to_f32())
        .collect();
    let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
    let want = reference::softmax(&xf, shape, None, opts).unwrap();
    let err = row_error(&got, &want, *shape.last().unwrap());
    assert!(
        err <= 2e-3,
        "f16 {shape:?} {opts:?}: relative error {err:e}"
    );
}

/// Logits below -3e38 are still logits: the running max must not be a sentinel they lose to
/// (that gave 0 / 0). Rows of 2, 40 and 5000 take the one-invocation, workgroup and long-row
/// paths.
#[test]
fn logits_near_the_lowest_f32_are_still_logits() {
    let Some(ctx) = gpu() else { return };
    for n in [2usize, 40, 5000] {
        // Spread below -3e38 (one-hot at the largest), all equal (uniform), and large
        // positive logits under a negative scale.
        let spread: Vec<f32> = (0..n)
            .map(|j| -3.40e38 + 1.0e36 * (j as f32 / n as f32))
            .collect();
        let negate = SoftmaxOptions {
            scale: -1.0,
            ..Default::default()
        };
        for (x, opts) in [
            (spread, SoftmaxOptions::default()),
            (vec![-3.3e38; n], SoftmaxOptions::default()),
            (vec![3.3e38; n], negate),
        ] {
            let got = run(ctx, &x, &[1, n], None, &opts);
            let want = reference::softmax(&x, &[1, n], None, &opts).unwrap();
            let err = row_error(&got, &want, n);
            assert!(
                err <= 1e-6,
                "n = {n} {opts:?}: error {err:e}, got {:?}",
                &got[..2]
            );
        }
    }
}

/// An odd f16 tensor wrapped over a larger buffer shares its last word with what follows it;
/// the output leaves that half alone (the packed-f16 path narrows whole words).
#[test]
fn odd_f16_output_leaves_the_rest_of_its_buffer() {
    let Some(ctx) = gpu() else { return };
    let words: Vec<u16> = [1.0f32, 2.0, 3.0, 42.0]
        .iter()
        .map(|&v| f16::from_f32(v).to_bits())
        .collect();
    let buffer = common::app_buffer(
        ctx,
        8,
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
    );
    ctx.queue()
        .write_buffer(&buffer, 0, bytemuck::cast_slice(&words));
    let y = GpuTensor::<f16>::from_buffer(ctx, buffer.clone(), [3]).unwrap();
    let x = ctx
        .upload(
            &[f16::from_f32(0.5), f16::from_f32(1.5), f16::from_f32(2.5)],
            [3],
        )
        .unwrap();
    let k = Softmax::new(ctx, &SoftmaxOptions::default()).unwrap();
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    k.encode(&mut encoder, &x, &y).unwrap();
    ctx.queue().submit([encoder.finish()]);
    let all = GpuTensor::<f16>::from_buffer(ctx, buffer, [4])
        .unwrap()
        .download()
        .unwrap();
    assert_eq!(all[3].to_f32(), 42.0, "the value after the tensor: {all:?}");
    let want =
        reference::softmax(&[0.5, 1.5, 2.5], &[3], None, &SoftmaxOptions::default()).unwrap();
    // f16 storage: 2e-3 relative.
    assert!(
        row_error(
            &[all[0].to_f32(), all[1].to_f32(), all[2].to_f32()],
            &want,
            3
        ) <= 2e-3
    );
}

#[test]
fn known_values() {
    let Some(ctx) = gpu() else { return };
    let d = SoftmaxOptions::default();
    // softmax(log x) = x / sum x
    let y = run(ctx, &[3f32.ln(), 1f32.ln(), 4f32.ln()], &[3], None, &d);
    for (a, b) in y.iter().zip([0.375f32, 0.125, 0.5]) {
        assert!((a - b).abs() <= 1e-6, "{y:?}");
    }
    // Large gaps are exact.
    assert_eq!(run(ctx, &[1234.0, 0.0], &[2], None, &d), vec![1.0, 0.0]);
    // Values up to 1e3: max 1000, denominator 1.3678794.
    let y = run(ctx, &[3.0, 1.0, -2.0, 1000.0, 999.0], &[1, 5], None, &d);
    let denom = 1.3678794f64;
    assert!((y[3] as f64 - 1.0 / denom).abs() <= 1e-6, "{y:?}");
    assert!((y[4] as f64 - (-1f64).exp() / denom).abs() <= 1e-6, "{y:?}");
    assert_eq!(&y[..3], &[0.0, 0.0, 0.0]);
    // +-1e4 stays finite.
    let y = run(ctx, &[1e4, -1e4, 9999.0], &[3], None, &d);
    assert!(
        y.iter().all(|v| v.is_finite()) && (y.iter().sum::<f32>() - 1.0).abs() <= 1e-6,
        "{y:?}"
    );
}

#[test]
fn masking_edge_cases() {
    let Some(ctx) = gpu() else { return };
    let x = [0.3f32, -1.0, 2.0, 0.5];
    // Fully masked row: zeros; log-softmax: -inf everywhere.
    let none = [false; 4];
    assert_eq!(
        run(ctx, &x, &[4], Some(&none), &SoftmaxOptions::default()),
        vec![0.0; 4]
    );
    let log = SoftmaxOptions {
        log: true,
        ..Default::default()
    };
    assert!(run(ctx, &x, &[4], Some(&none), &log)
        .iter()
        .all(|&v| v == f32::NEG_INFINITY));
    // A single valid entry: one-hot, log 0 there.
    let one = [false, false, true, false];
    assert_eq!(
        run(ctx, &x, &[4], Some(&one), &SoftmaxOptions::default()),
        vec![0.0, 0.0, 1.0, 0.0]
    );
    let l = run(ctx, &x, &[4], Some(&one), &log);
    assert_eq!(l[2], 0.0);
    assert!(l[0] == f32::NEG_INFINITY && l[3] == f32::NEG_INFINITY);
    // Causal with more queries than keys: the first m - n rows see nothing.
    let y = run(
        ctx,
        &random(5 * 3, 1, -1.0, 1.0),
        &[5, 3],
        None,
        &SoftmaxOptions {
            causal: true,
            ..Default::default()
        },
    );
    assert_eq!(&y[..6], &[0.0; 6]);
    assert_eq!(&y[6..9], &[1.0, 0.0, 0.0]);
    // The same on the long-row path.
    let n = 70001;
    let mut m = vec![false; n];
    let y = run(
        ctx,
        &random(n, 2, -1.0, 1.0),
        &[1, n],
        Some(&m),
        &SoftmaxOptions::default(),
    );
    assert!(y.iter().all(|&v| v == 0.0));
    m[n - 1] = true;
    let y = run(
        ctx,
        &random(n, 2, -1.0, 1.0),
        &[1, n],
        Some(&m),
        &SoftmaxOptions::default(),
    );
    assert_eq!(y[n - 1], 1.0);
    assert!(y[..n - 1].iter().all(|&v| v == 0.0));
}

#[test]
fn softmax_plus_scaling_factor() {
    let Some(ctx) = gpu() else { return };
    // Two entries differing by d: p0 / p1 = exp(f d), f = log(max(l, 16)) / log(512).
    for (l, f) in [(2usize, 0.4444444f64), (512, 1.0), (4096, 1.3333333)] {
        let mut x = vec![0.0f32; l];
        x[0] = 1.0;
        let y = run(
            ctx,
            &x,
            &[1, l],
            None,
            &SoftmaxOptions {
                softmax_plus: true,
                ..Default::default()
            },
        );
        let got = (y[0] as f64 / y[1] as f64).ln();
        assert!(
            (got - f).abs() <= 1e-5,
            "l = {l}: factor {got}, expected {f}"
        );
    }
}

#[test]
fn small_temperature_gives_one_hot() {
    let Some(ctx) = gpu() else { return };
    let x = random(1000, 3, -1.0, 1.0);
    let argmax = x
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0;
    let y = run(
        ctx,
        &x,
        &[1000],
        None,
        &SoftmaxOptions {
            temperature: 1e-6,
            ..Default::default()
        },
    );
    for (i, v) in y.iter().enumerate() {
        assert_eq!(*v, if i == argmax { 1.0 } else { 0.0 }, "index {i}");
    }
}

/// A scale near f32's largest takes every exponent far below -2.4e38, where some exp
/// implementations (llvmpipe's) return NaN: the rows are still one-hot (softmax) and
/// 0 / -huge (log-softmax) on every path (one thread, one workgroup, tiles), as the reference.
#[test]
fn huge_scales_give_one_hot_rows() {
    let Some(ctx) = gpu() else { return };
    for n in [3, 300, 70_000] {
        let x = random(n, 5, -1.0, 1.0);
        for scale in [3e38f32, -3e38] {
            for log in [false, true] {
                let opts = SoftmaxOptions {
                    scale,
                    log,
                    ..Default::default()
                };
                let got = run(ctx, &x, &[1, n], None, &opts);
                let want = reference::softmax(&x, &[1, n], None, &opts).unwrap();
                assert!(
                    got.iter().all(|v| !v.is_nan()),
                    "n {n} scale {scale} log {log}"
                );
                if log {
                    let top = want.iter().position(|&w| w == 0.0).unwrap();
                    assert_eq!(got[top], 0.0, "n {n} scale {scale}");
                } else {
                    let got: Vec<f64> = got.iter().map(|&v| v as f64).collect();
                    assert_eq!(got, want, "n {n} scale {scale}");
                }
            }
        }
    }
}

/// Shapes whose element count overflows usize are shape errors, not a wrapped product that
/// two values could fill (the CPU reference takes any dims).
#[test]
fn overflowing_shapes_are_errors() {
    let g = 1usize << 32;
    for (x, shape) in [
        (&[][..], vec![g, g]),
        (&[1.0, 2.0][..], vec![(1usize << 63) + 1, 2, 1]),
    ] {
        let got = reference::softmax(x, &shape, None, &Default::default());
        assert!(
            matches!(&got, Err(Error::Shape(m)) if m.contains("more elements than memory")),
            "{shape:?}: {got:?}"
        );
    }
}

#[test]
fn bad_input_is_an_error() {
    // Causal rows past i32 (the band j <= i + n - m is computed in i32): a named limit.
    let causal = SoftmaxOptions {
        causal: true,
        ..Default::default()
    };
    for shape in [[1usize, 1 << 31, 1], [1, 1, 1 << 31]] {
        assert!(matches!(
            row_shape(&shape, None, &causal),
            Err(Error::LimitExceeded { .. })
        ));
    }
    assert!(row_shape(&[1, (1 << 31) - 1, 1], None, &causal).is_ok());
    let Some(ctx) = gpu() else { return };
    let x = ctx.upload(&[1.0f32; 6], [2, 3]).unwrap();
    let bad_t = |t: f32| {
        ctx.softmax(
            &x,
            &SoftmaxOptions {
                temperature: t,
                ..Default::default()
            },
        )
    };
    assert!(matches!(bad_t(0.0), Err(Error::InvalidOption(_))));
    assert!(matches!(bad_t(-1.0), Err(Error::InvalidOption(_))));
    assert!(matches!(bad_t(f32::NAN), Err(Error::InvalidOption(_))));
    // Zero-size tensors cannot be made.
    assert!(matches!(
        ctx.upload::<f32>(&[], [0, 3]),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        ctx.upload(&[1.0f32; 5], [2, 3]),
        Err(Error::Shape(_))
    ));
    // Mask of another shape.
    let mask = ctx.upload_mask(&[true; 6], [3, 2]).unwrap();
    assert!(matches!(
        ctx.softmax_masked(&x, &mask, &SoftmaxOptions::default()),
        Err(Error::Shape(_))
    ));
    // Output of another shape, and in place.
    let k = seq_kernels::Softmax::new(ctx, &SoftmaxOptions::default()).unwrap();
    let mut enc = ctx.encoder();
    assert!(matches!(
        k.encode(&mut enc, &x, &ctx.zeros::<f32>([3, 2]).unwrap()),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        k.encode(&mut enc, &x, &x),
        Err(Error::InvalidOption(_))
    ));
    // A mask in the output's buffer: refused before recording, naming both (a wgpu usage
    // conflict at submit otherwise); f16 alike, also where it is widened into f32 copies (GL).
    mask_in_output_buffer_is_refused::<f32>(ctx, &k);
    mask_in_output_buffer_is_refused::<f16>(ctx, &k);
    // Wrong dtype.
    let xi = ctx.upload(&[1i32; 6], [2, 3]).unwrap();
    assert!(matches!(
        ctx.softmax(&xi, &SoftmaxOptions::default()),
        Err(Error::Dtype(_))
    ));
    // Causal needs a matrix.
    let v = ctx.upload(&[1.0f32; 3], [3]).unwrap();
    assert!(matches!(
        ctx.softmax(
            &v,
            &SoftmaxOptions {
                causal: true,
                ..Default::default()
            }
        ),
        Err(Error::Shape(_))
    ));
}

fn mask_in_output_buffer_is_refused<T: Element>(ctx: &Context, k: &Softmax) {
    let x = ctx.zeros::<T>([2, 3]).unwrap();
    let y = ctx.zeros::<T>([2, 3]).unwrap();
    let mask_in_y = GpuTensor::<u8>::from_buffer(ctx, y.buffer().clone(), [2, 3]).unwrap();
    let dtype = T::DTYPE.name();
    match k.plan(&x, Some(&mask_in_y), &y) {
        Err(Error::InvalidOption(m)) => {
            assert!(
                m.contains("`y` is written") && m.contains("`mask`"),
                "{dtype}: {m}"
            )
        }
        Err(e) => panic!("{dtype}: {e}"),
        Ok(_) => panic!("{dtype}: a mask in the output's buffer was accepted"),
    }
    let mask = ctx.upload_mask(&[true; 6], [2, 3]).unwrap();
    k.plan(&x, Some(&mask), &y).unwrap();
}

#[test]
fn embedding_records_into_the_callers_encoder() {
    let Some(ctx) = gpu() else { return };
    // A context wrapping the same device, as an application would build it.
    let app = Context::from_device(ctx.device().clone(), ctx.queue().clone());
    let x = app.upload(&random(3 * 50, 4, -2.0, 2.0), [3, 50]).unwrap();
    let y = app.zeros::<f32>([3, 50]).unwrap();
    let k = seq_kernels::Softmax::new(&app, &SoftmaxOptions::default()).unwrap();
    let mut encoder = app.device().create_command_encoder(&Default::default());
    k.encode(&mut encoder, &x, &y).unwrap();
    app.queue().submit([encoder.finish()]);
    let got = pollster::block_on(y.download_async()).unwrap();
    let want = reference::softmax(
        &x.download().unwrap(),
        &[3, 50],
        None,
        &SoftmaxOptions::default(),
    )
    .unwrap();
    assert!(row_error(&got, &want, 50) <= 1e-6);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn sums_to_one_and_shift_invariant(
        x in prop::collection::vec(-50.0f32..50.0, 1..600),
        c in -100.0f32..100.0,
    ) {
        let Some(ctx) = gpu() else { return Ok(()) };
        let n = x.len();
        let d = SoftmaxOptions::default();
        let y = run(ctx, &x, &[n], None, &d);
        let sum: f64 = y.iter().map(|&v| v as f64).sum();
        // n * eps of f32, plus one rounding of the division.
        prop_assert!((sum - 1.0).abs() <= (n as f64 + 1.0) * f32::EPSILON as f64, "sum {}", sum);
        // Shift invariance, GPU against GPU. Logits and shift are rounded to multiples of
        // 2^-16; with |x + c| < 2^8 the f32 sum x + c then needs at most 24 significant bits,
        // so it is exact and softmax(x + c) = softmax(x) exactly. Each GPU result is within the
        // allowed 1e-6 of the row scale of that one true value (asserted against the
        // reference), hence the two GPU results are within 2e-6 of the row scale of each other.
        let q = |v: f32| (v * 65536.0).round() / 65536.0;
        let xq: Vec<f32> = x.iter().map(|&v| q(v)).collect();
        let cq = q(c);
        let shifted: Vec<f32> = xq.iter().map(|&v| v + cq).collect();
        prop_assert!(xq.iter().zip(&shifted).all(|(&a, &s)| s as f64 == a as f64 + cq as f64));
        let yq = run(ctx, &xq, &[n], None, &d);
        let ys = run(ctx, &shifted, &[n], None, &d);
        let want = reference::softmax(&xq, &[n], None, &d).unwrap();
        prop_assert!(row_error(&yq, &want, n) <= 1e-6);
        prop_assert!(row_error(&ys, &want, n) <= 1e-6);
        let scale = want.iter().fold(0.0f64, |a, &v| a.max(v));
        let e = yq.iter().zip(&ys).fold(0.0f64, |a, (&p, &q)| a.max((p as f64 - q as f64).abs()));
        prop_assert!(e <= 2e-6 * scale, "GPU(x + {}) vs GPU(x): {:e} of the row scale", cq, e / scale);
    }

    #[test]
    fn log_softmax_is_log_of_softmax(
        x in prop::collection::vec(-20.0f32..20.0, 1..300),
        keep in prop::collection::vec(any::<bool>(), 300),
    ) {
        let Some(ctx) = gpu() else { return Ok(()) };
        let n = x.len();
        let mask = &keep[..n];
        let y = run(ctx, &x, &[n], Some(mask), &SoftmaxOptions::default());
        let l = run(ctx, &x, &[n], Some(mask), &SoftmaxOptions { log: true, ..Default::default() });
        for j in 0..n {
            if mask[j] {
                // |log y - l| <= relative error of y (1e-6 of the row scale over y) + f32 rounding.
                prop_assert!((l[j] - y[j].ln()).abs() <= 2e-5 * (1.0 + l[j].abs()), "{} vs {}", l[j], y[j].ln());
            } else {
                prop_assert_eq!(l[j], f32::NEG_INFINITY);
                prop_assert_eq!(y[j], 0.0);
            }
        }
    }
}

/// A row longer than a storage binding: `LimitExceeded` reports the device's own
/// `max_storage_buffer_binding_size` (what `seqk info` shows), not a value the kernel derived
/// from it.
#[test]
fn row_past_the_binding_limit_reports_the_device_limit() {
    let Some(_) = gpu() else { return };
    let small = small_bindings(1024);
    let x = small.upload(&random(257, 5, -1.0, 1.0), [1, 257]).unwrap();
    let err = small.softmax(&x, &SoftmaxOptions::default()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::LimitExceeded {
                limit: "max_storage_buffer_binding_size",
                needed: 1028,
                max: 1024,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("bytes of one row of a tensor need 1028"),
        "{err}"
    );
    // A row that fills the binding exactly still runs.
    let x = small.upload(&random(256, 6, -1.0, 1.0), [1, 256]).unwrap();
    let y = small.softmax(&x, &SoftmaxOptions::default()).unwrap();
    let sum: f32 = y.download().unwrap().iter().sum();
    assert!((sum - 1.0).abs() <= 1e-5, "{sum}");
}

/// softmax_plus on causal rows without a mask takes each long row's valid count from its
/// causal band, so from its query index; in a binding chunk that starts inside an [m, n]
/// matrix (rows 13.. of 5-row matrices here) that index counts from the chunk's first row.
#[test]
fn causal_softmax_plus_long_rows_split_across_bindings() {
    let Some(_) = gpu() else { return };
    // 80000-byte rows in 1 MiB bindings: 13 rows a chunk, the second starting at query 3.
    let ctx = &small_bindings(1 << 20);
    let opts = SoftmaxOptions {
        causal: true,
        softmax_plus: true,
        ..Default::default()
    };
    check(ctx, &[3, 5, 20000], None, &opts, 24);
}

/// On a device that allows 4 workgroups a grid dimension every path's grid is folded into y
/// and z, and the shaders recover the linear workgroup index from all three (on real devices
/// z is used only past 65535^2 workgroups). Thread rows: 37 workgroups; workgroup rows: 50;
/// long rows: 36 tiles; the f16 widening and narrowing where f16 is packed: 18.
#[test]
fn grids_folded_into_z_on_a_device_of_four_workgroups_a_dimension() {
    let Some(_) = gpu() else { return };
    let ctx = &common::limited_device(|l| l.max_compute_workgroups_per_dimension = 4);
    let log = SoftmaxOptions {
        log: true,
        ..Default::default()
    };
    let plus = SoftmaxOptions {
        softmax_plus: true,
        ..Default::default()
    };
    for (shape, masked, opts) in [
        (vec![37 * 64 - 5, 3], false, SoftmaxOptions::default()),
        (vec![50, 40], true, log),
        (vec![2, 70001], true, plus),
    ] {
        let len: usize = shape.iter().product();
        let mask = random_mask(len, 25, 0.8);
        check(ctx, &shape, masked.then_some(&mask[..]), &opts, 26);
    }
    check_f16(ctx, &[1, 9000], &SoftmaxOptions::default(), 27);
    // Past 4^3 workgroups a dispatch cannot be folded: refused, naming the limit.
    let x = ctx.upload(&vec![0.0f32; 65 * 64], [65 * 64, 1]).unwrap();
    match ctx.softmax(&x, &SoftmaxOptions::default()) {
        Err(Error::LimitExceeded { limit, .. }) => {
            assert!(
                limit.contains("max_compute_workgroups_per_dimension"),
                "{limit}"
            )
        }
        other => panic!("{other:?}"),
    }
}

/// Each row's maximum comes from its own logits only: rows alternately near 0 and near 1000
/// (rows of 3 and 5 take one invocation each, 40 a workgroup each), where a neighbour's
/// logit in the maximum would underflow every exp of the row to 0 / 0.
#[test]
fn rows_far_apart_in_scale_keep_their_own_maximum() {
    let Some(ctx) = gpu() else { return };
    let rows = 7;
    for n in [3usize, 5, 40] {
        let noise = random(rows * n, n as u64, -1.0, 1.0);
        let x: Vec<f32> = (0..rows * n)
            .map(|e| ((e / n) % 2) as f32 * 1000.0 + noise[e])
            .collect();
        for opts in [
            SoftmaxOptions::default(),
            SoftmaxOptions {
                log: true,
                ..Default::default()
            },
        ] {
            let got = run(ctx, &x, &[rows, n], None, &opts);
            let want = reference::softmax(&x, &[rows, n], None, &opts).unwrap();
            // Softmax: 1e-6 of the row scale; log-softmax: 1e-6 of the largest logit, 1000.
            let err = row_error(&got, &want, n);
            assert!(
                err <= 1e-6,
                "n {n} {opts:?}: relative error {err:e}, {got:?}"
            );
        }
    }
}
