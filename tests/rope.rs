//! RoPE family: known check values, the kernel's properties on the f64 reference and on the
//! GPU, GPU against the reference over styles, layouts, rotary dims, positions, scalings and
//! storage types, fused q/k and QKV views, and bad input.

mod common;

use common::{gpu, random, small_bindings};
use half::{bf16, f16};
use proptest::prelude::*;
use seq_kernels::kernels::rope::{yarn_range, MAX_POSITION};
use seq_kernels::reference::rope as reference;
use seq_kernels::{
    Context, Element, Error, GpuTensor, Positions, Rope, RopeLayout, RopeOptions, RopeScaling,
    RopeStyle, RopeTarget, RopeView,
};

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// Largest error per row of `d` relative to the row's largest reference magnitude.
fn max_row_error(got: &[f32], want: &[f64], d: usize) -> f64 {
    assert_eq!(got.len(), want.len());
    let mut worst = 0.0f64;
    for (g, w) in got.chunks(d).zip(want.chunks(d)) {
        let scale = w.iter().fold(0.0f64, |a, v| a.max(v.abs())).max(1e-30);
        for (&a, &b) in g.iter().zip(w) {
            assert!(a.is_finite(), "got {a} where {b} was expected");
            worst = worst.max((a as f64 - b).abs() / scale);
        }
    }
    worst
}

/// GPU rope of a dense f32 tensor, out of place.
fn gpu_rope(
    ctx: &Context,
    x: &[f32],
    shape: [usize; 4],
    pos: Option<&Positions>,
    opts: &RopeOptions,
) -> Vec<f32> {
    let xt = ctx.upload(x, shape).unwrap();
    ctx.rope(&xt, pos, opts).unwrap().download().unwrap()
}

/// GPU rope of a dense f32 tensor, in place.
fn gpu_rope_in_place(
    ctx: &Context,
    x: &[f32],
    shape: [usize; 4],
    pos: Option<&Positions>,
    opts: &RopeOptions,
) -> Vec<f32> {
    let xt = ctx.upload(x, shape).unwrap();
    ctx.rope_in_place(&xt, pos, opts).unwrap();
    xt.download().unwrap()
}

// ---------------------------------------------------------------- check values

/// Equal to `want` printed with 5 significant digits (half a unit of the last digit).
fn assert_5_digits(got: f64, want: f64, what: &str) {
    let unit = 10f64.powf(want.abs().log10().floor() - 4.0);
    assert!(
        (got - want).abs() <= 0.5 * unit * 1.0001,
        "{what}: {got} is not {want} to 5 digits"
    );
}

#[test]
fn theta_check_values() {
    let o = |scaling| RopeOptions {
        scaling,
        ..Default::default()
    };
    let (t, m) = o(RopeScaling::None).frequencies(128, 1).unwrap();
    assert_eq!((t.len(), m), (64, 1.0));
    assert_5_digits(t[1], 0.86596, "default theta_1");

    let dynamic = RopeScaling::Dynamic {
        factor: 10.0,
        original_max: 2048,
        current_len: Some(16384),
    };
    let (t, _) = o(dynamic.clone()).frequencies(128, 1).unwrap();
    for (i, w) in [(1, 0.80931), (2, 0.65498), (3, 0.53008), (63, 1.6265e-6)] {
        assert_5_digits(t[i], w, &format!("dynamic theta_{i}"));
    }
    // Without current_len, the call's length (largest position + 1) is used.
    let mut unset = dynamic;
    if let RopeScaling::Dynamic { current_len, .. } = &mut unset {
        *current_len = None;
    }
    assert_5_digits(
        o(unset).frequencies(128, 16384).unwrap().0[1],
        0.80931,
        "dynamic l",
    );

    assert_eq!(yarn_range(128, 1e4, 2048, 32.0, 1.0, true), (16.0, 41.0));
    let yarn = RopeScaling::named("yarn", Some(10.0), Some(2048)).unwrap();
    let (t, m) = o(yarn).frequencies(128, 1).unwrap();
    for (i, w) in [(17, 8.3479e-2), (18, 6.9590e-2), (19, 5.7925e-2)] {
        assert_5_digits(t[i], w, &format!("yarn theta_{i}"));
    }
    assert!(
        (m - (0.1 * 10f64.ln() + 1.0)).abs() < 1e-15,
        "yarn mscale {m}"
    );
    // truncate = false keeps the correction range fractional (lo 16.128, hi 40.210). Values
    // from Hugging Face's yarn inverse frequencies with `truncate: False` (transformers 5.24,
    // theta 1e4, head_dim 128, factor 10, original 2048); 16 and 41 lie outside the ramp and
    // are the same either way.
    let mut fractional = RopeScaling::named("yarn", Some(10.0), Some(2048)).unwrap();
    if let RopeScaling::Yarn { truncate, .. } = &mut fractional {
        *truncate = false;
    }
    let (t, _) = o(fractional).frequencies(128, 1).unwrap();
    for (i, w) in [
        (16, 1.0000e-1),
        (17, 8.37744e-2),
        (18, 6.97432e-2),
        (19, 5.79683e-2),
        (40, 3.41093e-4),
        (41, 2.73842e-4),
    ] {
        assert_5_digits(t[i], w, &format!("yarn truncate=false theta_{i}"));
    }
    // As HF's get_mscale: a factor of at most 1 stretches nothing and scales nothing.
    for s in [0.5, 1.0] {
        let yarn = RopeScaling::named("yarn", Some(s), Some(2048)).unwrap();
        assert_eq!(o(yarn).frequencies(128, 1).unwrap().1, 1.0, "yarn s = {s}");
    }

    let llama3 = RopeScaling::named("llama3", Some(10.0), Some(2048)).unwrap();
    let (t, _) = o(llama3).frequencies(128, 1).unwrap();
    for (i, w) in [
        (31, 1.0730e-2),
        (32, 7.7785e-3),
        (33, 5.6009e-3),
        (34, 3.9991e-3),
    ] {
        assert_5_digits(t[i], w, &format!("llama3 theta_{i}"));
    }

    // linear: theta / s; ntk: base * s^(r/(r-2)).
    let (t, _) = o(RopeScaling::Linear { factor: 4.0 })
        .frequencies(128, 1)
        .unwrap();
    assert!((t[1] - 0.86596 / 4.0).abs() < 2e-6);
    let (t, _) = o(RopeScaling::Ntk { factor: 4.0 })
        .frequencies(128, 1)
        .unwrap();
    let want = (1e4 * 4f64.powf(128.0 / 126.0)).powf(-2.0 / 128.0);
    assert!((t[1] - want).abs() < 1e-15, "{} {want}", t[1]);
}

/// YaRN's frequencies from the spec's formulas, written out here, where the check values do
/// not reach: lo clamped at 0 (L < 2 pi beta_fast), hi clamped at r - 1 (a small base), and
/// lo == hi (hi moved by 0.001, so theta_0 stays and every other frequency is divided by s).
/// And dynamic scaling below its original length is no scaling: l = max(current length, L).
#[test]
fn yarn_and_dynamic_frequencies_at_the_ends_of_their_ranges() {
    use std::f64::consts::PI;
    let s = 4.0f64;
    for (r, base, big_l, range) in [
        (128usize, 1e4f64, 2048usize, (16.0, 41.0)),
        (128, 1e4, 100, (0.0, 20.0)),
        (64, 10.0, 1000, (22.0, 63.0)),
        (16, 1e4, 4, (0.0, 0.001)),
    ] {
        let rf = r as f64;
        let corr = |x: f64| rf * (big_l as f64 / (2.0 * PI * x)).ln() / (2.0 * base.ln());
        let lo = corr(32.0).floor().max(0.0);
        let mut hi = corr(1.0).ceil().min(rf - 1.0);
        if lo == hi {
            hi += 0.001;
        }
        assert_eq!(
            (lo, hi),
            range,
            "r {r} base {base} L {big_l}: the case's range"
        );
        assert_eq!(yarn_range(r, base, big_l, 32.0, 1.0, true), range);
        let opts = RopeOptions {
            base,
            scaling: RopeScaling::named("yarn", Some(s), Some(big_l)).unwrap(),
            ..Default::default()
        };
        let (got, mscale) = opts.frequencies(r, 1).unwrap();
        assert_eq!(mscale, 0.1 * s.ln() + 1.0);
        for (i, g) in got.iter().enumerate() {
            let theta = base.powf(-2.0 * i as f64 / rf);
            let ramp = ((i as f64 - lo) / (hi - lo)).clamp(0.0, 1.0);
            let want = theta * (1.0 - ramp) + theta / s * ramp;
            // The same formula up to the rounding of a few operations.
            assert!(
                (g - want).abs() <= 1e-14 * theta,
                "r {r} base {base} L {big_l}: theta'_{i} = {g}, expected {want}"
            );
        }
    }
    let plain = RopeOptions::default().frequencies(64, 1).unwrap();
    let dynamic = RopeOptions {
        scaling: RopeScaling::Dynamic {
            factor: 4.0,
            original_max: 2048,
            current_len: None,
        },
        ..Default::default()
    };
    for current in [1, 100, 2048] {
        assert_eq!(
            dynamic.frequencies(64, current).unwrap(),
            plain,
            "length {current}"
        );
    }
}

const X4: [f64; 4] = [1.0, 2.0, 3.0, 4.0];
const VECTORS: [(u64, RopeStyle, [f64; 4]); 4] = [
    (
        1,
        RopeStyle::Interleaved,
        [-1.142640, 1.922076, 2.959851, 4.029800],
    ),
    (
        1,
        RopeStyle::Half,
        [-1.984111, 1.959901, 2.462378, 4.019800],
    ),
    (
        3,
        RopeStyle::Interleaved,
        [-1.272233, -1.838865, 2.878668, 4.088187],
    ),
    (
        3,
        RopeStyle::Half,
        [-1.413353, 1.879118, -2.828857, 4.058191],
    ),
];

#[test]
fn reference_check_vectors() {
    for (p, style, want) in VECTORS {
        let opts = RopeOptions {
            style,
            offset: p,
            ..Default::default()
        };
        let got = reference::rope(&X4, [1, 1, 1, 4], None, &opts).unwrap();
        for (g, w) in got.iter().zip(want) {
            // The check values have 6 decimals: half a unit of the last one.
            assert!(
                (g - w).abs() <= 5e-7,
                "p={p} {style:?}: {got:?} vs {want:?}"
            );
        }
    }
}

#[test]
fn gpu_check_vectors() {
    let Some(ctx) = gpu() else { return };
    for (p, style, want) in VECTORS {
        let opts = RopeOptions {
            style,
            offset: p,
            ..Default::default()
        };
        let got = gpu_rope(ctx, &[1.0, 2.0, 3.0, 4.0], [1, 1, 1, 4], None, &opts);
        for (g, w) in got.iter().zip(want) {
            // 6 printed decimals (5e-7) plus f32 rounding of values up to 4 (2.4e-7 each).
            assert!(
                (*g as f64 - w).abs() <= 1e-6,
                "p={p} {style:?}: {got:?} vs {want:?}"
            );
        }
    }
}

// ---------------------------------------------------------------- reference properties

fn one(x: &[f64], p: u64, opts: &RopeOptions) -> Vec<f64> {
    let o = RopeOptions {
        offset: p,
        ..opts.clone()
    };
    reference::rope(x, [1, 1, 1, x.len()], None, &o).unwrap()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn style_strategy() -> impl Strategy<Value = RopeStyle> {
    prop_oneof![Just(RopeStyle::Half), Just(RopeStyle::Interleaved)]
}

/// Gathers features: (P x)_j = x_pi(j), pi(j) = 2j (j < r/2), 2(j - r/2) + 1 (j < r), j.
fn permute(x: &[f64], r: usize) -> Vec<f64> {
    (0..x.len())
        .map(|j| {
            let k = if j < r / 2 {
                2 * j
            } else if j < r {
                2 * (j - r / 2) + 1
            } else {
                j
            };
            x[k]
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn reference_properties(
        half_d in 1usize..12, pass in 0usize..3, style in style_strategy(),
        m in 0u64..5000, n in 0u64..5000, c in 0u64..5000, seed in 0u64..1000,
    ) {
        let r = 2 * half_d;
        let d = r + pass;
        let opts = RopeOptions { style, rotary_dim: Some(r), ..Default::default() };
        let q = f64s(&random(d, seed, -2.0, 2.0));
        let k = f64s(&random(d, seed + 1, -2.0, 2.0));
        let scale = dot(&q, &q).sqrt() * dot(&k, &k).sqrt();
        // Relative position: angles up to ~1e4 carry ~1e-12 rounding in f64.
        let lhs = dot(&one(&q, m + c, &opts), &one(&k, n + c, &opts));
        let rhs = dot(&one(&q, m, &opts), &one(&k, n, &opts));
        prop_assert!((lhs - rhs).abs() <= 1e-9 * scale, "{lhs} vs {rhs}");
        // Norm preserved (f64 rounding only).
        let y = one(&q, m, &opts);
        prop_assert!((dot(&y, &y) - dot(&q, &q)).abs() <= 1e-12 * dot(&q, &q));
        // Position 0 is the identity, exactly (cos 0 = 1, sin 0 = 0).
        prop_assert_eq!(one(&q, 0, &opts), q.clone());
        // Pass-through features are untouched.
        prop_assert_eq!(&y[r..], &q[r..]);
        // R_a R_b = R_(a + b).
        let ab = one(&one(&q, m, &opts), n, &opts);
        let direct = one(&q, m + n, &opts);
        for (a, b) in ab.iter().zip(&direct) {
            prop_assert!((a - b).abs() <= 1e-9, "{ab:?} vs {direct:?}");
        }
        // Inverse undoes the rotation.
        let inv = RopeOptions { inverse: true, ..opts.clone() };
        let back = one(&y, m, &inv);
        for (a, b) in back.iter().zip(&q) {
            prop_assert!((a - b).abs() <= 1e-12, "{back:?} vs {q:?}");
        }
        // Layout permutation: half(P x) = P interleaved(x), exactly (same products).
        let half = RopeOptions { style: RopeStyle::Half, ..opts.clone() };
        let inter = RopeOptions { style: RopeStyle::Interleaved, ..opts.clone() };
        prop_assert_eq!(one(&permute(&q, r), m, &half), permute(&one(&q, m, &inter), r));
    }

    #[test]
    fn scaled_theta_stays_between_theta_over_s_and_theta(
        factor in 1.0f64..64.0, lmax in 16usize..100000, half_r in 2usize..128,
        base in 2.0f64..1e6,
    ) {
        let r = 2 * half_r;
        for scaling in [
            RopeScaling::Yarn { factor, original_max: lmax, beta_fast: 32.0, beta_slow: 1.0, mscale: None, truncate: true },
            RopeScaling::Yarn { factor, original_max: lmax, beta_fast: 32.0, beta_slow: 1.0, mscale: None, truncate: false },
            RopeScaling::Llama3 { factor, original_max: lmax, low_freq_factor: 1.0, high_freq_factor: 4.0 },
        ] {
            let plain = RopeOptions { base, ..Default::default() }.frequencies(r, 1).unwrap().0;
            let opts = RopeOptions { base, scaling: scaling.clone(), ..Default::default() };
            let scaled = opts.frequencies(r, 1).unwrap().0;
            for (t, s) in plain.iter().zip(&scaled) {
                // One rounding of the blend may step an ulp past either end.
                let slack = 1e-15 * t;
                prop_assert!(t / factor - slack <= *s && *s <= t + slack,
                    "{scaling:?}: theta {t}, scaled {s}");
            }
        }
    }
}

#[test]
fn reference_offset_equals_slice_of_full_rotation() {
    let (b, s, h, d, p) = (2, 5, 3, 10, 7);
    let opts = RopeOptions {
        rotary_dim: Some(8),
        ..Default::default()
    };
    let full_x = f64s(&random(b * (p + s) * h * d, 3, -1.0, 1.0));
    let full = reference::rope(&full_x, [b, p + s, h, d], None, &opts).unwrap();
    let slice = |v: &[f64]| -> Vec<f64> {
        (0..b)
            .flat_map(|bi| v[(bi * (p + s) + p) * h * d..(bi + 1) * (p + s) * h * d].to_vec())
            .collect()
    };
    let part = reference::rope(
        &slice(&full_x),
        [b, s, h, d],
        None,
        &RopeOptions {
            offset: p as u64,
            ..opts
        },
    )
    .unwrap();
    assert_eq!(part, slice(&full));
}

#[test]
fn reference_yarn_inverse_is_the_transpose() {
    let x = f64s(&random(8, 4, -1.0, 1.0));
    let yarn = RopeOptions {
        scaling: RopeScaling::named("yarn", Some(4.0), Some(64)).unwrap(),
        ..Default::default()
    };
    let m = 0.1 * 4f64.ln() + 1.0;
    let y = one(&x, 9, &yarn);
    // mscale multiplies cos and sin: the norm grows by mscale.
    assert!((dot(&y, &y).sqrt() - m * dot(&x, &x).sqrt()).abs() < 1e-12);
    let back = one(
        &y,
        9,
        &RopeOptions {
            inverse: true,
            ..yarn
        },
    );
    for (a, b) in back.iter().zip(&x) {
        assert!((a - m * m * b).abs() < 1e-12, "{back:?}");
    }
}

// ---------------------------------------------------------------- GPU against the reference

#[test]
fn gpu_matches_reference_over_shapes() {
    let Some(ctx) = gpu() else { return };
    let mut case = 0u64;
    for (di, d) in [2usize, 6, 64, 80, 256].into_iter().enumerate() {
        for (si, s) in [1usize, 1000].into_iter().enumerate() {
            for (hi, h) in [1usize, 7].into_iter().enumerate() {
                case += 1;
                // Rotate styles, layouts, partial dims and in/out of place across the cases:
                // style, layout and place from independent parities of the indices, so every
                // s and every h runs each style, each layout and both places, and the grid
                // holds all eight combinations of the three.
                let style = [RopeStyle::Half, RopeStyle::Interleaved][(di + hi) % 2];
                let layout = [RopeLayout::Bshd, RopeLayout::Bhsd][(di + si) % 2];
                let in_place = (di + si + hi) % 2 == 1;
                let rotary_dim = (case.is_multiple_of(3) && d > 2).then_some((d / 2) & !1);
                let opts = RopeOptions {
                    style,
                    layout,
                    rotary_dim,
                    offset: case * 37,
                    ..Default::default()
                };
                let b = 2;
                let shape = match layout {
                    RopeLayout::Bshd => [b, s, h, d],
                    RopeLayout::Bhsd => [b, h, s, d],
                };
                let n = b * s * h * d;
                let x = random(n, case, -3.0, 3.0);
                let want = reference::rope(&f64s(&x), shape, None, &opts).unwrap();
                let got = if in_place {
                    gpu_rope_in_place(ctx, &x, shape, None, &opts)
                } else {
                    gpu_rope(ctx, &x, shape, None, &opts)
                };
                // Allowed error: 1e-6 of the row scale (f32 cos/sin and two products).
                let err = max_row_error(&got, &want, d);
                assert!(err <= 1e-6, "d={d} s={s} h={h} {opts:?}: error {err:e}");
                let r = rotary_dim.unwrap_or(d);
                for (g, x) in got.chunks(d).zip(x.chunks(d)) {
                    assert_eq!(
                        g[r..].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        x[r..].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "pass-through changed, {opts:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn gpu_explicit_positions_match_reference() {
    let Some(ctx) = gpu() else { return };
    let (b, s, h, d) = (3, 9, 2, 16);
    let x = random(b * s * h * d, 11, -1.0, 1.0);
    let shared: Vec<i32> = (0..s as i32).map(|t| 5 * t + 3).collect();
    let per_batch: Vec<i64> = (0..(b * s) as i64).map(|i| (i * 7919) % 100000).collect();
    for (pos, style) in [
        (Positions::new(&shared, [s]).unwrap(), RopeStyle::Half),
        (
            Positions::new(&per_batch, [b, s]).unwrap(),
            RopeStyle::Interleaved,
        ),
    ] {
        for layout in [RopeLayout::Bshd, RopeLayout::Bhsd] {
            let opts = RopeOptions {
                style,
                layout,
                ..Default::default()
            };
            let shape = match layout {
                RopeLayout::Bshd => [b, s, h, d],
                RopeLayout::Bhsd => [b, h, s, d],
            };
            let want = reference::rope(&f64s(&x), shape, Some(&pos), &opts).unwrap();
            let got = gpu_rope(ctx, &x, shape, Some(&pos), &opts);
            // Allowed error: 1e-6 of the row scale.
            let err = max_row_error(&got, &want, d);
            assert!(err <= 1e-6, "{:?} {layout:?}: error {err:e}", pos.shape());
        }
    }
}

#[test]
fn gpu_angles_are_exact_at_large_positions() {
    let Some(ctx) = gpu() else { return };
    let (s, d) = (64, 128);
    // Positions up to 2^20, where an f32 angle p * theta has lost ~2^-4 rad.
    let pos: Vec<i64> = (0..s as i64).map(|t| (1 << 20) - 63 + t).collect();
    let pos = Positions::new(&pos, [s]).unwrap();
    let x = random(s * 3 * d, 12, -1.0, 1.0);
    for style in [RopeStyle::Half, RopeStyle::Interleaved] {
        let opts = RopeOptions {
            style,
            ..Default::default()
        };
        let want = reference::rope(&f64s(&x), [1, s, 3, d], Some(&pos), &opts).unwrap();
        let got = gpu_rope(ctx, &x, [1, s, 3, d], Some(&pos), &opts);
        // The requirement: 1e-5 |x| at positions up to 2^20 (row scale).
        let err = max_row_error(&got, &want, d);
        assert!(err <= 1e-5, "{style:?}: error {err:e}");
    }
}

#[test]
fn gpu_every_scaling_matches_reference() {
    let Some(ctx) = gpu() else { return };
    let (b, s, h, d) = (2, 33, 3, 64);
    let x = random(b * s * h * d, 13, -2.0, 2.0);
    let scalings = [
        RopeScaling::Linear { factor: 4.0 },
        RopeScaling::Ntk { factor: 8.0 },
        RopeScaling::Dynamic {
            factor: 4.0,
            original_max: 16,
            current_len: None,
        },
        RopeScaling::Dynamic {
            factor: 10.0,
            original_max: 2048,
            current_len: Some(16384),
        },
        RopeScaling::named("yarn", Some(10.0), Some(2048)).unwrap(),
        RopeScaling::Yarn {
            factor: 4.0,
            original_max: 256,
            beta_fast: 16.0,
            beta_slow: 2.0,
            mscale: Some(1.5),
            truncate: false,
        },
        RopeScaling::named("llama3", Some(10.0), Some(2048)).unwrap(),
        RopeScaling::named("llama3", None, None).unwrap(),
    ];
    for (i, scaling) in scalings.into_iter().enumerate() {
        let opts = RopeOptions {
            scaling,
            offset: 1000 * i as u64,
            inverse: i % 3 == 2,
            style: [RopeStyle::Half, RopeStyle::Interleaved][i % 2],
            ..Default::default()
        };
        let want = reference::rope(&f64s(&x), [b, s, h, d], None, &opts).unwrap();
        let got = gpu_rope(ctx, &x, [b, s, h, d], None, &opts);
        // Allowed error: 1e-6 of the row scale (mscale is folded into the table).
        let err = max_row_error(&got, &want, d);
        assert!(err <= 1e-6, "{opts:?}: error {err:e}");
    }
}

// ---------------------------------------------------------------- GPU properties

#[test]
fn gpu_identity_inverse_offset_slicing_and_permutation() {
    let Some(ctx) = gpu() else { return };
    let (b, s, h, d, r) = (2, 12, 3, 20, 16);
    let x = random(b * s * h * d, 14, -1.0, 1.0);
    let opts = RopeOptions {
        rotary_dim: Some(r),
        ..Default::default()
    };
    // Position 0 everywhere is the identity, bit for bit (cos 1, sin 0).
    let zeros = Positions::new(vec![0i32; s], [s]).unwrap();
    assert_eq!(gpu_rope(ctx, &x, [b, s, h, d], Some(&zeros), &opts), x);
    // inverse(rope(x)) = x up to f32 rounding of two rotations.
    let y = gpu_rope(ctx, &x, [b, s, h, d], None, &opts);
    let back = gpu_rope(
        ctx,
        &y,
        [b, s, h, d],
        None,
        &RopeOptions {
            inverse: true,
            ..opts.clone()
        },
    );
    let err = max_row_error(&back, &f64s(&x), d);
    assert!(err <= 1e-6, "inverse: error {err:e}");
    // Offset p on tokens [p, p + T) equals slicing the full rotation: the same table entries
    // and the same arithmetic, so bit for bit.
    let (p, t) = (5, s - 5);
    let full = gpu_rope(ctx, &x, [b, s, h, d], None, &opts);
    let slice = |v: &[f32]| -> Vec<f32> {
        (0..b)
            .flat_map(|bi| v[(bi * s + p) * h * d..(bi + 1) * s * h * d].to_vec())
            .collect()
    };
    let part = gpu_rope(
        ctx,
        &slice(&x),
        [b, t, h, d],
        None,
        &RopeOptions {
            offset: p as u64,
            ..opts.clone()
        },
    );
    assert_eq!(part, slice(&full));
    // half(P x) = P interleaved(x), per row.
    let perm = |v: &[f32]| -> Vec<f32> {
        v.chunks(d)
            .flat_map(|row| permute(&f64s(row), r).into_iter().map(|v| v as f32))
            .collect()
    };
    let half = gpu_rope(ctx, &perm(&x), [b, s, h, d], None, &opts);
    let inter = gpu_rope(
        ctx,
        &x,
        [b, s, h, d],
        None,
        &RopeOptions {
            style: RopeStyle::Interleaved,
            ..opts.clone()
        },
    );
    // Same products, possibly contracted differently: 1e-6 of the row scale.
    let err = max_row_error(&half, &f64s(&perm(&inter)), d);
    assert!(err <= 1e-6, "permutation: error {err:e}");
}

#[test]
fn gpu_fused_qk_with_gqa() {
    let Some(ctx) = gpu() else { return };
    let (b, s, hq, hkv, d) = (2, 17, 6, 2, 32);
    let qx = random(b * s * hq * d, 15, -1.0, 1.0);
    let kx = random(b * s * hkv * d, 16, -1.0, 1.0);
    let pos: Vec<i64> = (0..(b * s) as i64).map(|i| 3 * i + 1).collect();
    let pos = Positions::new(&pos, [b, s]).unwrap();
    for layout in [RopeLayout::Bshd, RopeLayout::Bhsd] {
        let opts = RopeOptions {
            layout,
            rotary_dim: Some(24),
            ..Default::default()
        };
        let (qs, ks) = match layout {
            RopeLayout::Bshd => ([b, s, hq, d], [b, s, hkv, d]),
            RopeLayout::Bhsd => ([b, hq, s, d], [b, hkv, s, d]),
        };
        let want_q = reference::rope(&f64s(&qx), qs, Some(&pos), &opts).unwrap();
        let want_k = reference::rope(&f64s(&kx), ks, Some(&pos), &opts).unwrap();
        // In place, one dispatch.
        let q = ctx.upload(&qx, qs).unwrap();
        let k = ctx.upload(&kx, ks).unwrap();
        ctx.rope_qk_in_place(&q, &k, Some(&pos), &opts).unwrap();
        // Allowed error: 1e-6 of the row scale.
        assert!(max_row_error(&q.download().unwrap(), &want_q, d) <= 1e-6);
        assert!(max_row_error(&k.download().unwrap(), &want_k, d) <= 1e-6);
        // Out of place, one dispatch.
        let q = ctx.upload(&qx, qs).unwrap();
        let k = ctx.upload(&kx, ks).unwrap();
        let (qo, ko) = (ctx.zeros::<f32>(qs).unwrap(), ctx.zeros::<f32>(ks).unwrap());
        let rope = Rope::new(ctx, &opts).unwrap();
        let plan = rope
            .plan(
                &RopeTarget::new(&q, &qo).unwrap(),
                Some(&RopeTarget::new(&k, &ko).unwrap()),
                Some(&pos),
            )
            .unwrap();
        assert_eq!(plan.len(), 1, "q and k share one dispatch");
        plan.run(ctx).unwrap();
        assert!(max_row_error(&qo.download().unwrap(), &want_q, d) <= 1e-6);
        assert!(max_row_error(&ko.download().unwrap(), &want_k, d) <= 1e-6);
        assert_eq!(q.download().unwrap(), qx, "source changed out of place");
    }
}

/// q and k in place inside a fused [b, s, (hq + 2 hkv) d] QKV buffer; v untouched.
fn check_fused_qkv<T: Element + PartialEq + std::fmt::Debug>(
    ctx: &Context,
    to: impl Fn(f32) -> T,
    from: impl Fn(T) -> f32,
    tol: f64,
) {
    let (b, s, hq, hkv, d) = (2, 7, 4, 2, 12);
    let row = (hq + 2 * hkv) * d;
    let host: Vec<T> = random(b * s * row, 17, -1.0, 1.0)
        .into_iter()
        .map(&to)
        .collect();
    let qkv: GpuTensor<T> = ctx.upload(&host, [b, s, row]).unwrap();
    let qv = RopeView::strided([b, s, hq, d], 0, row);
    let kv = RopeView::strided([b, s, hkv, d], hq * d, row);
    let opts = RopeOptions {
        offset: 40,
        ..Default::default()
    };
    Rope::new(ctx, &opts)
        .unwrap()
        .plan(
            &RopeTarget::in_place_view(&qkv, qv),
            Some(&RopeTarget::in_place_view(&qkv, kv)),
            None,
        )
        .unwrap()
        .run(ctx)
        .unwrap();
    let got = qkv.download().unwrap();
    let gather = |v: &[T], off: usize, h: usize| -> Vec<f64> {
        (0..b * s)
            .flat_map(|t| v[t * row + off..t * row + off + h * d].to_vec())
            .map(|e| from(e) as f64)
            .collect()
    };
    let want_q = reference::rope(&gather(&host, 0, hq), [b, s, hq, d], None, &opts).unwrap();
    let want_k = reference::rope(&gather(&host, hq * d, hkv), [b, s, hkv, d], None, &opts).unwrap();
    let as_f32 = |v: Vec<f64>| -> Vec<f32> { v.into_iter().map(|x| x as f32).collect() };
    let eq = max_row_error(&as_f32(gather(&got, 0, hq)), &want_q, d);
    let ek = max_row_error(&as_f32(gather(&got, hq * d, hkv)), &want_k, d);
    assert!(eq <= tol && ek <= tol, "q error {eq:e}, k error {ek:e}");
    for t in 0..b * s {
        let v = t * row + (hq + hkv) * d..(t + 1) * row;
        assert_eq!(got[v.clone()], host[v], "v part of the QKV buffer changed");
    }
}

#[test]
fn gpu_fused_qkv_views_in_place() {
    let Some(ctx) = gpu() else { return };
    // Allowed error: 1e-6 of the row scale for f32.
    check_fused_qkv::<f32>(ctx, |v| v, |v| v, 1e-6);
    // f16: 2e-3. bf16 has 8 significant bits: rounding the output costs up to half an ulp,
    // 2^-8 = 3.9e-3 of the value's power of two, so 4e-3 of the row scale.
    check_fused_qkv::<f16>(ctx, f16::from_f32, f16::to_f32, 2e-3);
    check_fused_qkv::<bf16>(ctx, bf16::from_f32, bf16::to_f32, 4e-3);
}

/// 16-bit storage against the reference on the widened input, over every packed path.
fn check_16bit<T: Element>(
    ctx: &Context,
    to: impl Fn(f32) -> T,
    from: impl Fn(T) -> f32,
    tol: f64,
) {
    let cases = [
        // (d, rotary_dim, style, in place): r % 4 == 0 half (word pairs), r % 4 == 2 half
        // (one invocation per row), interleaved (one word per pair), partial dims.
        (64, None, RopeStyle::Half, false),
        (6, None, RopeStyle::Half, true),
        (6, None, RopeStyle::Half, false),
        (10, Some(6), RopeStyle::Half, false),
        (80, Some(40), RopeStyle::Interleaved, false),
        (80, Some(40), RopeStyle::Interleaved, true),
        (20, Some(8), RopeStyle::Half, true),
        (2, None, RopeStyle::Interleaved, false),
        // Word pairs and the pass-through words after them, out of place.
        (20, Some(8), RopeStyle::Half, false),
    ];
    for (i, (d, rotary_dim, style, in_place)) in cases.into_iter().enumerate() {
        let (b, s, h) = (2, 11, 3);
        let host: Vec<T> = random(b * s * h * d, 18 + i as u64, -2.0, 2.0)
            .into_iter()
            .map(&to)
            .collect();
        let xf: Vec<f64> = host.iter().map(|&v| from(v) as f64).collect();
        let opts = RopeOptions {
            style,
            rotary_dim,
            offset: 3,
            ..Default::default()
        };
        let x = ctx.upload(&host, [b, s, h, d]).unwrap();
        let got = if in_place {
            ctx.rope_in_place(&x, None, &opts).unwrap();
            x.download().unwrap()
        } else {
            ctx.rope(&x, None, &opts).unwrap().download().unwrap()
        };
        let want = reference::rope(&xf, [b, s, h, d], None, &opts).unwrap();
        let gf: Vec<f32> = got.iter().map(|&v| from(v)).collect();
        let err = max_row_error(&gf, &want, d);
        assert!(err <= tol, "{} case {i}: error {err:e}", T::DTYPE.name());
        let r = rotary_dim.unwrap_or(d);
        for (g, x) in got.chunks(d).zip(host.chunks(d)) {
            assert!(
                bytemuck::cast_slice::<T, u8>(&g[r..]) == bytemuck::cast_slice::<T, u8>(&x[r..]),
                "{} case {i}: pass-through changed",
                T::DTYPE.name()
            );
        }
    }
}

#[test]
fn gpu_f16_storage_matches_reference() {
    let Some(ctx) = gpu() else { return };
    // Allowed error: f16 storage 2e-3 relative (the output's f16 rounding is 4.9e-4).
    check_16bit::<f16>(ctx, f16::from_f32, f16::to_f32, 2e-3);
}

#[test]
fn gpu_bf16_storage_matches_reference() {
    let Some(ctx) = gpu() else { return };
    // bf16 has 8 significant bits: rounding the output costs up to half an ulp, 2^-8 = 3.9e-3
    // of the value's power of two (plus ~1e-7 of f32 arithmetic), so 4e-3 of the row scale.
    check_16bit::<bf16>(ctx, bf16::from_f32, bf16::to_f32, 4e-3);
}

/// bf16 outputs round to nearest, ties to even. At position 0 the rotation is the identity
/// times mscale, so with mscale 1.5 every output is exactly 1.5 x in f32 (no rounding before
/// the narrowing), and half of the bf16 values of [1, 2) then fall exactly halfway between two
/// bf16 values. The 4e-3 tolerance of the other bf16 test cannot see the direction of a tie.
/// Word-pair (half, r % 4 == 0), one-invocation-per-row (half, r % 4 == 2) and interleaved
/// paths.
#[test]
fn gpu_bf16_ties_round_to_even() {
    let Some(ctx) = gpu() else { return };
    let values: Vec<f32> = (0..128)
        .map(|k| 1.0 + k as f32 / 128.0)
        .flat_map(|x| [x, -x])
        .collect();
    let ties = values
        .iter()
        .filter(|&&x| (x * 1.5).to_bits() & 0xffff == 0x8000)
        .count();
    assert!(ties >= 64, "only {ties} ties");
    for (d, style) in [
        (256, RopeStyle::Half),
        (258, RopeStyle::Half),
        (256, RopeStyle::Interleaved),
    ] {
        let host: Vec<bf16> = (0..d)
            .map(|i| bf16::from_f32(values[i % values.len()]))
            .collect();
        let opts = RopeOptions {
            style,
            scaling: RopeScaling::Yarn {
                factor: 2.0,
                original_max: 16,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale: Some(1.5),
                truncate: true,
            },
            ..Default::default()
        };
        let x = ctx.upload(&host, [1, 1, 1, d]).unwrap();
        let got = ctx.rope(&x, None, &opts).unwrap().download().unwrap();
        for (i, (g, x)) in got.iter().zip(&host).enumerate() {
            // half's from_f32 rounds to nearest, ties to even.
            let want = bf16::from_f32(x.to_f32() * 1.5);
            assert_eq!(
                g.to_bits(),
                want.to_bits(),
                "d {d} {style:?} element {i}: 1.5 * {x} gave {g}, expected {want}"
            );
        }
    }
}

// ---------------------------------------------------------------- bad input

#[test]
fn bad_options_are_errors() {
    let bad = |o: RopeOptions| reference::rope(&[0.0; 8], [1, 1, 1, 8], None, &o);
    let opt = |e: Result<Vec<f64>, Error>| matches!(e, Err(Error::InvalidOption(_)));
    // Finite options whose frequencies or multiplier overflow: theta / 1e-320 = inf,
    // base * (1e-300)^(r/(r-2)) = 0 (theta inf), an mscale past f32.
    for scaling in [
        RopeScaling::Linear { factor: 1e-320 },
        RopeScaling::Ntk { factor: 1e-300 },
        RopeScaling::Yarn {
            factor: 2.0,
            original_max: 16,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: Some(1e300),
            truncate: true,
        },
    ] {
        let got = bad(RopeOptions {
            scaling: scaling.clone(),
            ..Default::default()
        });
        let shown = format!("{got:?}");
        assert!(opt(got), "{scaling:?}: {shown}");
    }
    // Dims whose product overflows usize, and no tokens at all.
    let w = (1usize << 63) + 1;
    let got = reference::rope(&[1.0, 2.0], [w, 1, 1, 2], None, &Default::default());
    assert!(matches!(got, Err(Error::Shape(_))), "{got:?}");
    let got = seq_kernels::kernels::rope::position_rows(&Default::default(), 1, 0, None);
    assert!(
        matches!(&got, Err(Error::Shape(m)) if m.contains("s = 0")),
        "{got:?}"
    );
    assert!(opt(bad(RopeOptions {
        rotary_dim: Some(5),
        ..Default::default()
    })));
    assert!(opt(bad(RopeOptions {
        rotary_dim: Some(10),
        ..Default::default()
    })));
    assert!(opt(bad(RopeOptions {
        rotary_dim: Some(0),
        ..Default::default()
    })));
    // An odd head dim with rotary_dim unset: the error names the head dim, not a rotary_dim
    // the caller never gave.
    let odd = reference::rope(&[0.0; 5], [1, 1, 1, 5], None, &Default::default());
    assert!(
        matches!(&odd, Err(Error::InvalidOption(m)) if m.contains("head dim d = 5") && !m.contains("got 5")),
        "{odd:?}"
    );
    assert!(opt(bad(RopeOptions {
        base: 0.0,
        ..Default::default()
    })));
    // Values print as values, not as Rust's Some(..).
    for (m, shown) in [
        (f64::NAN, "got NaN"),
        (f64::INFINITY, "got inf"),
        (-1.0, "got -1"),
    ] {
        let yarn = RopeScaling::Yarn {
            factor: 4.0,
            original_max: 64,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: Some(m),
            truncate: true,
        };
        let err = bad(RopeOptions {
            scaling: yarn,
            ..Default::default()
        });
        assert!(
            matches!(&err, Err(Error::InvalidOption(msg)) if msg.ends_with(shown)),
            "{err:?}"
        );
    }
    for f in [0.0, -2.0, f64::NAN, f64::INFINITY] {
        assert!(opt(bad(RopeOptions {
            scaling: RopeScaling::Linear { factor: f },
            ..Default::default()
        })));
        assert!(matches!(
            RopeScaling::named("yarn", Some(f), Some(2048)),
            Err(Error::InvalidOption(_))
        ));
    }
    assert!(matches!(
        RopeScaling::named("rotary", Some(2.0), None),
        Err(Error::InvalidOption(m)) if m.contains("unknown rope scaling")
    ));
    assert!(matches!(
        RopeScaling::named("linear", None, None),
        Err(Error::InvalidOption(_))
    ));
    assert!(matches!(
        RopeScaling::named("dynamic", Some(2.0), None),
        Err(Error::InvalidOption(_))
    ));
    assert!(matches!(
        "diagonal".parse::<RopeStyle>(),
        Err(Error::InvalidOption(_))
    ));
    assert!(matches!(
        "sbhd".parse::<RopeLayout>(),
        Err(Error::InvalidOption(_))
    ));
    assert_eq!(
        "interleaved".parse::<RopeStyle>().unwrap(),
        RopeStyle::Interleaved
    );
    assert_eq!("bhsd".parse::<RopeLayout>().unwrap(), RopeLayout::Bhsd);
    // ntk's exponent r/(r-2) needs r > 2.
    assert!(matches!(
        reference::rope(
            &[0.0; 2],
            [1, 1, 1, 2],
            None,
            &RopeOptions {
                scaling: RopeScaling::Ntk { factor: 2.0 },
                ..Default::default()
            }
        ),
        Err(Error::InvalidOption(_))
    ));
    assert!(opt(bad(RopeOptions {
        scaling: RopeScaling::Llama3 {
            factor: 8.0,
            original_max: 8192,
            low_freq_factor: 4.0,
            high_freq_factor: 4.0
        },
        ..Default::default()
    })));
    // Offsets past i32.
    assert!(opt(bad(RopeOptions {
        offset: MAX_POSITION as u64 + 1,
        ..Default::default()
    })));
    assert!(opt(reference::rope(
        &[0.0; 16],
        [1, 2, 1, 8],
        None,
        &RopeOptions {
            offset: MAX_POSITION as u64,
            ..Default::default()
        }
    )));
}

#[test]
fn bad_positions_are_errors() {
    let x = [0.0; 2 * 3 * 4];
    let run = |p: &Positions| reference::rope(&x, [2, 3, 1, 4], Some(p), &RopeOptions::default());
    // Shape that does not match [s] or [b, s].
    assert!(matches!(
        run(&Positions::new([0i32, 1], [2]).unwrap()),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        run(&Positions::new([0i32; 9], [3, 3]).unwrap()),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        Positions::new([0i32; 4], [3]),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        Positions::new([0i32; 8], [2, 2, 2]),
        Err(Error::Shape(_))
    ));
    // Negative, or not fitting in an i32.
    assert!(matches!(
        run(&Positions::new([0i64, -1, 2], [3]).unwrap()),
        Err(Error::InvalidOption(_))
    ));
    assert!(matches!(
        run(&Positions::new([0i64, 1, 1 << 31], [3]).unwrap()),
        Err(Error::InvalidOption(_))
    ));
    assert!(run(&Positions::new([0i64, 1, MAX_POSITION], [3]).unwrap()).is_ok());
    // An offset and explicit positions do not go together: one or the other.
    let offset = RopeOptions {
        offset: 5,
        ..Default::default()
    };
    let p = Positions::new([0i32, 1, 2], [3]).unwrap();
    assert!(matches!(
        reference::rope(&x, [2, 3, 1, 4], Some(&p), &offset),
        Err(Error::InvalidOption(m)) if m.contains("offset 5")
    ));
}

/// Positions `[1, s]` (Hugging Face's `position_ids`) serve every batch, as `[s]` do.
#[test]
fn positions_one_by_s_serve_every_batch() {
    let (b, s, h, d) = (3, 4, 2, 8);
    let x: Vec<f64> = random(b * s * h * d, 40, -1.0, 1.0)
        .into_iter()
        .map(f64::from)
        .collect();
    let p = [3i32, 9, 0, 77];
    let opts = RopeOptions::default();
    let shared = reference::rope(
        &x,
        [b, s, h, d],
        Some(&Positions::new(p, [s]).unwrap()),
        &opts,
    );
    let row = reference::rope(
        &x,
        [b, s, h, d],
        Some(&Positions::new(p, [1, s]).unwrap()),
        &opts,
    );
    assert_eq!(row.unwrap(), shared.unwrap());
    let Some(ctx) = gpu() else { return };
    let xf: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    let want = gpu_rope(
        ctx,
        &xf,
        [b, s, h, d],
        Some(&Positions::new(p, [s]).unwrap()),
        &opts,
    );
    let got = gpu_rope(
        ctx,
        &xf,
        [b, s, h, d],
        Some(&Positions::new(p, [1, s]).unwrap()),
        &opts,
    );
    assert_eq!(got, want);
    // With an offset: refused on the GPU as in the reference.
    let xt = ctx.upload(&xf, [b, s, h, d]).unwrap();
    let offset = RopeOptions {
        offset: 2,
        ..Default::default()
    };
    assert!(matches!(
        ctx.rope(&xt, Some(&Positions::new(p, [s]).unwrap()), &offset),
        Err(Error::InvalidOption(_))
    ));
}

#[test]
fn gpu_bad_input_is_an_error() {
    let Some(ctx) = gpu() else { return };
    let x = ctx.upload(&[1.0f32; 24], [1, 3, 2, 4]).unwrap();
    let d = RopeOptions::default();
    // The message names the tensor's d, as the reference's does, whatever r is.
    for r in [3, 5, 6] {
        let got = ctx.rope(
            &x,
            None,
            &RopeOptions {
                rotary_dim: Some(r),
                ..Default::default()
            },
        );
        let want = format!("at most d = 4, got {r}");
        assert!(
            matches!(&got, Err(Error::InvalidOption(m)) if m.contains(&want)),
            "{:?}",
            got.err()
        );
    }
    assert!(matches!(
        ctx.rope(
            &x,
            None,
            &RopeOptions {
                rotary_dim: Some(6),
                ..Default::default()
            }
        ),
        Err(Error::InvalidOption(_))
    ));
    assert!(matches!(
        ctx.rope(&x, Some(&Positions::new([1i32, 2], [2]).unwrap()), &d),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        ctx.rope(&x, Some(&Positions::new([1i32, -2, 3], [3]).unwrap()), &d),
        Err(Error::InvalidOption(_))
    ));
    // Not 4-D; wrong dtype.
    let flat = ctx.upload(&[1.0f32; 24], [6, 4]).unwrap();
    assert!(matches!(ctx.rope(&flat, None, &d), Err(Error::Shape(_))));
    let xi = ctx.upload(&[1i32; 24], [1, 3, 2, 4]).unwrap();
    assert!(matches!(ctx.rope(&xi, None, &d), Err(Error::Dtype(_))));
    let rope = Rope::new(ctx, &d).unwrap();
    // Output of another shape.
    let y = ctx.zeros::<f32>([1, 2, 3, 4]).unwrap();
    assert!(matches!(
        rope.plan(&RopeTarget::new(&x, &y).unwrap(), None, None),
        Err(Error::Shape(_))
    ));
    // k disagreeing with q on the sequence length.
    let k = ctx.zeros::<f32>([1, 2, 1, 4]).unwrap();
    assert!(matches!(
        rope.plan(
            &RopeTarget::in_place(&x).unwrap(),
            Some(&RopeTarget::in_place(&k).unwrap()),
            None
        ),
        Err(Error::Shape(_))
    ));
    // Mixed in place / out of place.
    let y = ctx.zeros::<f32>([1, 3, 2, 4]).unwrap();
    let k = ctx.zeros::<f32>([1, 3, 1, 4]).unwrap();
    assert!(matches!(
        rope.plan(
            &RopeTarget::new(&x, &y).unwrap(),
            Some(&RopeTarget::in_place(&k).unwrap()),
            None
        ),
        Err(Error::InvalidOption(_))
    ));
    // A view past the end of its tensor, and one whose rows overlap.
    let past = RopeView::strided([1, 3, 2, 4], 4, 8);
    assert!(matches!(
        rope.plan(&RopeTarget::in_place_view(&x, past), None, None),
        Err(Error::Shape(_))
    ));
    // Views whose extent overflows usize: a shape error, not a wrapped end that passes.
    for huge in [
        RopeView::strided([1 << 40, 3, 2, 4], 0, 1 << 40),
        RopeView {
            shape: [usize::MAX / 2 + 2, 1, 1, 4],
            offset: 0,
            strides: [2, 4, 4],
        },
        RopeView::contiguous([(1 << 62) + 1, 1, 1, 4]),
    ] {
        assert!(matches!(
            rope.plan(&RopeTarget::in_place_view(&x, huge), None, None),
            Err(Error::Shape(_))
        ));
    }
    let overlap = RopeView::strided([1, 3, 2, 4], 0, 4);
    assert!(matches!(
        rope.plan(&RopeTarget::in_place_view(&x, overlap), None, None),
        Err(Error::Shape(_))
    ));
    // The stride of an axis of length 1 is never stepped along: any value gives the
    // contiguous result (it used to be refused past u32 as a limit).
    let host = random(4 * 3, 52, -1.0, 1.0);
    let one = ctx.upload(&host, [1, 1, 3, 4]).unwrap();
    let want = ctx.rope(&one, None, &d).unwrap().download().unwrap();
    let loose = RopeView {
        shape: [1, 1, 3, 4],
        offset: 0,
        strides: [1 << 40, 1 << 40, 4],
    };
    let one = ctx.upload(&host, [1, 1, 3, 4]).unwrap();
    rope.plan(&RopeTarget::in_place_view(&one, loose), None, None)
        .unwrap()
        .run(ctx)
        .unwrap();
    assert_eq!(one.download().unwrap(), want);
    // With 16-bit storage odd strides of length-1 axes are not rows off whole words either.
    let half: Vec<f16> = host.iter().map(|&v| f16::from_f32(v)).collect();
    let one = ctx.upload(&half, [1, 1, 3, 4]).unwrap();
    let want = ctx.rope(&one, None, &d).unwrap().download().unwrap();
    let odd = RopeView {
        strides: [7, 5, 4],
        ..loose
    };
    let one = ctx.upload(&half, [1, 1, 3, 4]).unwrap();
    Rope::new(ctx, &d)
        .unwrap()
        .plan(&RopeTarget::in_place_view(&one, odd), None, None)
        .unwrap()
        .run(ctx)
        .unwrap();
    assert_eq!(one.download().unwrap(), want);
    // 16-bit rows that do not start on whole words.
    let h = ctx.upload(&[f16::ZERO; 30], [1, 3, 2, 5]).unwrap();
    assert!(matches!(
        ctx.rope(
            &h,
            None,
            &RopeOptions {
                rotary_dim: Some(4),
                ..Default::default()
            }
        ),
        Err(Error::Shape(_))
    ));
}

// ---------------------------------------------------------------- seqk run rope

#[cfg(feature = "cli")]
#[test]
fn seqk_run_rope_matches_cpu_and_rejects_bad_input() {
    use common::{load_npy, save_npy};
    use std::process::Command;
    let Some(_) = gpu() else { return };
    let dir = common::scratch_dir("rope");
    let (b, h, s, d) = (2, 3, 5, 8);
    save_npy(
        &dir.join("x.npy"),
        &[b, h, s, d],
        &random((b * h * s * d) as usize, 30, -1.0, 1.0),
    );
    save_npy(
        &dir.join("p.npy"),
        &[b, s],
        &[0i64, 5, 9, 2, 1, 7, 7, 7, 3, 1000],
    );
    let p = |f: &str| dir.join(f).display().to_string();
    let run = |extra: &[&str], out: &str| {
        let mut args = vec!["run", "rope", "--in"];
        let x = format!("x={}", p("x.npy"));
        let pos = format!("positions={}", p("p.npy"));
        let out = p(out);
        args.extend([x.as_str(), "--in", pos.as_str(), "--out", out.as_str()]);
        args.extend([
            "--set",
            "layout=bhsd",
            "--set",
            "style=interleaved",
            "--set",
            "rotary_dim=6",
            "--set",
            "scaling=llama3",
            "--set",
            "factor=4",
            "--set",
            "original_max=64",
            "--set",
            "high_freq_factor=8",
        ]);
        args.extend(extra);
        Command::new(env!("CARGO_BIN_EXE_seqk"))
            .args(&args)
            .output()
            .unwrap()
    };
    assert!(run(&[], "gpu.npy").status.success());
    assert!(run(&["--cpu"], "cpu.npy").status.success());
    let load = |name: &str| load_npy::<f32>(&dir.join(name)).1;
    let (g, c) = (load("gpu.npy"), load("cpu.npy"));
    let cf: Vec<f64> = c.iter().map(|&v| v as f64).collect();
    // Allowed error: 1e-6 of the row scale (the CPU side is the f64 reference in f32).
    let err = max_row_error(&g, &cf, d as usize);
    assert!(err <= 1e-6, "seqk GPU vs --cpu: {err:e}");
    // A key of another scaling: exit code 2 and a one-line message naming it.
    for key in ["mscale=2", "truncate=false"] {
        let o = run(&["--cpu", "--set", key], "bad.npy");
        let msg = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{msg}");
        assert!(msg.contains(key.split('=').next().unwrap()), "{msg}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// `seqk run rope --set storage=bf16`: float32 input rounded to bf16 (numpy has none), rotated
/// with bf16 storage; the output holds bf16 values, within bf16's rounding (4e-3 of the row
/// scale) of the reference on the rounded input. A bad name is exit 2.
#[cfg(feature = "cli")]
#[test]
fn seqk_run_rope_bf16_storage() {
    use common::{load_npy, save_npy};
    use std::process::Command;
    let Some(_) = gpu() else { return };
    let dir = common::scratch_dir("rope-bf16");
    let (b, s, h, d) = (2, 5, 3, 16);
    let x = random(b * s * h * d, 33, -2.0, 2.0);
    save_npy(
        &dir.join("x.npy"),
        &[b as u64, s as u64, h as u64, d as u64],
        &x,
    );
    let run = |storage: &str, cpu: bool| {
        let out = dir.join("y.npy");
        let o = Command::new(env!("CARGO_BIN_EXE_seqk"))
            .args(["run", "rope", "--set", "offset=9", "--set"])
            .arg(format!("storage={storage}"))
            .args(cpu.then_some("--cpu"))
            .arg("--in")
            .arg(format!("x={}", dir.join("x.npy").display()))
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        (o, out)
    };
    let (o, out) = run("bf16", false);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = load_npy::<f32>(&out).1;
    assert!(
        got.iter().all(|&v| bf16::from_f32(v).to_f32() == v),
        "not bf16 values"
    );
    let rounded: Vec<f64> = x.iter().map(|&v| bf16::from_f32(v).to_f64()).collect();
    let opts = RopeOptions {
        offset: 9,
        ..Default::default()
    };
    let want = reference::rope(&rounded, [b, s, h, d], None, &opts).unwrap();
    let err = max_row_error(&got, &want, d);
    assert!(err <= 4e-3, "bf16 storage vs reference: {err:e}");
    // --cpu rounds the input the same way: the reference's result, in f32.
    let (o, out) = run("bf16", true);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cpu = load_npy::<f32>(&out).1;
    assert_eq!(cpu, want.iter().map(|&v| v as f32).collect::<Vec<_>>());
    let (o, _) = run("bf8", false);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("f32, f16 or bf16"));
    std::fs::remove_dir_all(&dir).ok();
}

/// `seqk run rope`: positions `[1, s]` with b > 1 serve every batch (as `[s]`); an offset with
/// positions, negative positions and a bad rotary_dim are one-line errors (exit 2) naming the
/// input or the head dim d, on the GPU as with `--cpu`.
#[cfg(feature = "cli")]
#[test]
fn seqk_run_rope_positions_and_option_errors() {
    use common::{load_npy, save_npy};
    use std::process::Command;
    let Some(_) = gpu() else { return };
    let dir = common::scratch_dir("rope-pos");
    let (b, s, h, d) = (2u64, 3u64, 2u64, 8u64);
    save_npy(
        &dir.join("x.npy"),
        &[b, s, h, d],
        &random((b * s * h * d) as usize, 31, -1.0, 1.0),
    );
    save_npy(&dir.join("p.npy"), &[s], &[4i64, 0, 9]);
    save_npy(&dir.join("p1.npy"), &[1, s], &[4i64, 0, 9]);
    save_npy(&dir.join("neg.npy"), &[1, s], &[4i32, -1, 9]);
    let p = |f: &str| dir.join(f).display().to_string();
    let run = |positions: Option<&str>, out: &str, extra: &[&str]| {
        let x = format!("x={}", p("x.npy"));
        let out = p(out);
        let mut args = vec!["run", "rope", "--in", x.as_str(), "--out", out.as_str()];
        let pos = positions.map(|f| format!("positions={}", p(f)));
        if let Some(pos) = &pos {
            args.extend(["--in", pos.as_str()]);
        }
        args.extend(extra);
        Command::new(env!("CARGO_BIN_EXE_seqk"))
            .args(&args)
            .output()
            .unwrap()
    };
    let err = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).trim().to_string();
    for cpu in [&[][..], &["--cpu"]] {
        let shared = run(Some("p.npy"), "shared.npy", cpu);
        assert!(shared.status.success(), "{}", err(&shared));
        let row = run(Some("p1.npy"), "row.npy", cpu);
        assert!(row.status.success(), "{}", err(&row));
        assert_eq!(
            load_npy::<f32>(&dir.join("row.npy")),
            load_npy::<f32>(&dir.join("shared.npy"))
        );
        let bad: [(Option<&str>, &[&str], &[&str]); 3] = [
            (
                Some("p.npy"),
                &["--set", "offset=5"],
                &["offset", "--in positions"],
            ),
            (Some("neg.npy"), &[], &["input positions", "-1"]),
            (None, &["--set", "rotary_dim=5"], &["d = 8, got 5"]),
        ];
        for (positions, extra, needles) in bad {
            let o = run(positions, "bad.npy", &[extra, cpu].concat());
            let msg = err(&o);
            assert_eq!(o.status.code(), Some(2), "{extra:?} {cpu:?}: {msg}");
            assert_eq!(msg.lines().count(), 1, "{msg}");
            for n in needles {
                assert!(
                    msg.contains(n),
                    "{extra:?} {cpu:?}: {msg:?} should name {n:?}"
                );
            }
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

// ---------------------------------------------------------------- binding limits

#[test]
fn gpu_splits_bindings_past_the_device_limit() {
    let Some(_) = gpu() else { return };
    let ctx = &small_bindings(4096);
    // Fused QKV rows of (hq + 2 hkv) d = 60 f32 (240 bytes) per token, 5 tokens per batch:
    // 1200 bytes per batch, so a 4096-byte binding holds 3 batches. Chunk starts (3600 bytes,
    // k at +144, table rows of 3 pairs) are not multiples of the offset alignment, so the
    // aligned-down bindings need element and table offsets.
    let (b, s, hq, hkv, d) = (7, 5, 3, 1, 12);
    let row = (hq + 2 * hkv) * d;
    let host = random(b * s * row, 40, -1.0, 1.0);
    let pos: Vec<i64> = (0..(b * s) as i64).map(|i| (i * 131) % 4000).collect();
    let pos = Positions::new(&pos, [b, s]).unwrap();
    let opts = RopeOptions {
        style: RopeStyle::Interleaved,
        rotary_dim: Some(6),
        ..Default::default()
    };
    let gather = |v: &[f32], off: usize, h: usize| -> Vec<f64> {
        (0..b * s)
            .flat_map(|t| v[t * row + off..t * row + off + h * d].to_vec())
            .map(|e| e as f64)
            .collect()
    };
    let want_q = reference::rope(&gather(&host, 0, hq), [b, s, hq, d], Some(&pos), &opts).unwrap();
    let want_k = reference::rope(
        &gather(&host, hq * d, hkv),
        [b, s, hkv, d],
        Some(&pos),
        &opts,
    )
    .unwrap();
    let qkv = ctx.upload(&host, [b, s, row]).unwrap();
    let plan = Rope::new(ctx, &opts)
        .unwrap()
        .plan(
            &RopeTarget::in_place_view(&qkv, RopeView::strided([b, s, hq, d], 0, row)),
            Some(&RopeTarget::in_place_view(
                &qkv,
                RopeView::strided([b, s, hkv, d], hq * d, row),
            )),
            Some(&pos),
        )
        .unwrap();
    assert!(
        plan.len() >= 3,
        "expected several dispatches, got {}",
        plan.len()
    );
    plan.run(ctx).unwrap();
    let got = qkv.download().unwrap();
    let as_f32 = |v: Vec<f64>| -> Vec<f32> { v.into_iter().map(|x| x as f32).collect() };
    // Allowed error: 1e-6 of the row scale.
    let eq = max_row_error(&as_f32(gather(&got, 0, hq)), &want_q, d);
    let ek = max_row_error(&as_f32(gather(&got, hq * d, hkv)), &want_k, d);
    assert!(eq <= 1e-6 && ek <= 1e-6, "q error {eq:e}, k error {ek:e}");
    for t in 0..b * s {
        let v = t * row + (hq + hkv) * d..(t + 1) * row;
        assert_eq!(got[v.clone()], host[v], "v part changed");
    }

    // bf16 out of place, dense, split the same way.
    let (b, s, h, d) = (9, 4, 3, 32);
    let xb: Vec<bf16> = random(b * s * h * d, 41, -1.0, 1.0)
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    let x = ctx.upload(&xb, [b, s, h, d]).unwrap();
    let y = ctx.zeros::<bf16>([b, s, h, d]).unwrap();
    let plan = Rope::new(ctx, &opts)
        .unwrap()
        .plan(&RopeTarget::new(&x, &y).unwrap(), None, None)
        .unwrap();
    assert!(
        plan.len() >= 2,
        "expected several dispatches, got {}",
        plan.len()
    );
    plan.run(ctx).unwrap();
    let xf: Vec<f64> = xb.iter().map(|v| v.to_f64()).collect();
    let want = reference::rope(&xf, [b, s, h, d], None, &opts).unwrap();
    let got: Vec<f32> = y.download().unwrap().iter().map(|v| v.to_f32()).collect();
    // bf16: half an ulp, 2^-8 of the row scale (see gpu_bf16_storage_matches_reference).
    let err = max_row_error(&got, &want, d);
    assert!(err <= 4e-3, "bf16 split: error {err:e}");

    // One token's rows larger than a binding: a clear error naming the limit.
    let big = ctx.zeros::<f32>([1, 4, 40, 32]).unwrap();
    assert!(matches!(
        ctx.rope_in_place(&big, None, &opts),
        Err(Error::LimitExceeded {
            limit: "max_storage_buffer_binding_size",
            ..
        })
    ));
}

/// One sequence larger than a binding (b = 1, a long prefill on a device with default
/// limits) splits along its tokens (bshd) or heads and then tokens (bhsd): positions per token
/// and per (batch, token), in place and not, GQA, f32 and f16, checked against the reference.
#[test]
fn gpu_splits_one_sequence_along_its_tokens() {
    let Some(_) = gpu() else { return };
    let ctx = &small_bindings(4096);
    let opts = |layout, style| RopeOptions {
        layout,
        style,
        rotary_dim: Some(12),
        ..Default::default()
    };
    // (b, s, heads, d), or (b, heads, s, d) in bhsd: sequences of 5120 to 19200 bytes, each
    // more than the 4096-byte binding holds. bhsd splits into runs of heads (2560 bytes a
    // head), and a head too large alone (6400 bytes) into runs of its tokens.
    for (layout, style, shape, per_batch, in_place) in [
        (
            RopeLayout::Bshd,
            RopeStyle::Half,
            [1, 40, 2, 16],
            false,
            true,
        ),
        (
            RopeLayout::Bshd,
            RopeStyle::Interleaved,
            [2, 21, 4, 20],
            true,
            false,
        ),
        (
            RopeLayout::Bhsd,
            RopeStyle::Half,
            [1, 2, 40, 16],
            true,
            true,
        ),
        (
            RopeLayout::Bhsd,
            RopeStyle::Half,
            [1, 4, 40, 16],
            false,
            false,
        ),
        (
            RopeLayout::Bhsd,
            RopeStyle::Interleaved,
            [2, 3, 100, 16],
            true,
            true,
        ),
    ] {
        let o = opts(layout, style);
        let [b, a1, a2, d] = shape;
        let s = if layout == RopeLayout::Bhsd { a2 } else { a1 };
        let n = b * a1 * a2 * d;
        let host = random(n, 50, -1.0, 1.0);
        let pos: Vec<i64> = (0..(b * s) as i64).map(|i| (i * 37) % 3000).collect();
        let pos = if per_batch {
            Positions::new(&pos, [b, s]).unwrap()
        } else {
            Positions::new(&pos[..s], [s]).unwrap()
        };
        let want = reference::rope(
            &host.iter().map(|&v| v as f64).collect::<Vec<_>>(),
            shape,
            Some(&pos),
            &o,
        )
        .unwrap();
        let x = ctx.upload(&host, shape).unwrap();
        let rope = Rope::new(ctx, &o).unwrap();
        let got = if in_place {
            let plan = rope
                .plan(&RopeTarget::in_place(&x).unwrap(), None, Some(&pos))
                .unwrap();
            assert!(plan.len() >= 2, "{shape:?}: {} dispatches", plan.len());
            plan.run(ctx).unwrap();
            x.download().unwrap()
        } else {
            let y = ctx.zeros::<f32>(shape).unwrap();
            let plan = rope
                .plan(&RopeTarget::new(&x, &y).unwrap(), None, Some(&pos))
                .unwrap();
            assert!(plan.len() >= 2, "{shape:?}: {} dispatches", plan.len());
            plan.run(ctx).unwrap();
            y.download().unwrap()
        };
        // Allowed error: 1e-6 of the row scale.
        let err = max_row_error(&got, &want, d);
        assert!(err <= 1e-6, "{layout:?} {shape:?}: error {err:e}");
    }
    // GQA in bhsd: q with 4 heads and k with 2 in one call, each split into its own runs.
    let o = opts(RopeLayout::Bhsd, RopeStyle::Half);
    let (qs, ks) = ([1, 4, 40, 16], [1, 2, 40, 16]);
    let (qh, kh) = (
        random(4 * 640, 52, -1.0, 1.0),
        random(2 * 640, 53, -1.0, 1.0),
    );
    let (q, k) = (ctx.upload(&qh, qs).unwrap(), ctx.upload(&kh, ks).unwrap());
    let (qy, ky) = (ctx.zeros::<f32>(qs).unwrap(), ctx.zeros::<f32>(ks).unwrap());
    let plan = Rope::new(ctx, &o)
        .unwrap()
        .plan(
            &RopeTarget::new(&q, &qy).unwrap(),
            Some(&RopeTarget::new(&k, &ky).unwrap()),
            None,
        )
        .unwrap();
    assert!(plan.len() >= 6, "{} dispatches", plan.len());
    plan.run(ctx).unwrap();
    for (host, shape, y) in [(&qh, qs, &qy), (&kh, ks, &ky)] {
        let x64: Vec<f64> = host.iter().map(|&v| v as f64).collect();
        let want = reference::rope(&x64, shape, None, &o).unwrap();
        let err = max_row_error(&y.download().unwrap(), &want, 16);
        assert!(err <= 1e-6, "GQA {shape:?}: error {err:e}");
    }
    // f16, dense bshd, positions from an offset.
    // 9600 bytes of tensor and 9600 of table (300 positions of 4 pairs).
    let (s, h, d) = (300, 2, 8);
    let xh: Vec<f16> = random(s * h * d, 51, -1.0, 1.0)
        .into_iter()
        .map(f16::from_f32)
        .collect();
    let o = RopeOptions {
        offset: 1000,
        ..Default::default()
    };
    let x = ctx.upload(&xh, [1, s, h, d]).unwrap();
    let y = ctx.rope(&x, None, &o).unwrap();
    let xf: Vec<f64> = xh.iter().map(|v| v.to_f64()).collect();
    let want = reference::rope(&xf, [1, s, h, d], None, &o).unwrap();
    let got: Vec<f32> = y.download().unwrap().iter().map(|v| v.to_f32()).collect();
    // f16: half an ulp, 2^-11 of the row scale, and the f32 arithmetic.
    let err = max_row_error(&got, &want, d);
    assert!(err <= 2e-3, "f16 split: error {err:e}");
}
