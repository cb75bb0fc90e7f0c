//! Exact attention on the GPU against the f64 reference, the properties of spec section 3,
//! f16 storage, the decode (split-key) path, the tile-engine matmul, and bad input.

mod common;

use common::{gpu, random, random_mask};
use half::f16;
use seq_kernels::kernels::attention::attention_shape;
use seq_kernels::reference::{attention as reference, row_error};
use seq_kernels::{AttentionOptions, Context, Error, Layout};

/// Spec section 0: attention within 1e-4 of the output magnitude for f32 storage (f32
/// accumulation over up to a few hundred keys with an online rescale), 2e-3 for f16 storage
/// (inputs and output rounded to 11 significant bits).
const TOL_F32: f64 = 1e-4;
const TOL_F16: f64 = 2e-3;

#[derive(Clone, Debug)]
struct Case {
    b: usize,
    hq: usize,
    hkv: usize,
    m: usize,
    n: usize,
    d: usize,
    dv: usize,
    opts: AttentionOptions,
    /// Mask shape and probability of keep.
    mask: Option<(Vec<usize>, f32)>,
    half: bool,
    seed: u64,
}

impl Case {
    fn new(b: usize, hq: usize, hkv: usize, m: usize, n: usize, d: usize) -> Self {
        Self {
            b,
            hq,
            hkv,
            m,
            n,
            d,
            dv: d,
            opts: AttentionOptions::default(),
            mask: None,
            half: false,
            seed: (b * 7 + hq * 11 + m * 13 + n * 17 + d * 19) as u64,
        }
    }
    fn shapes(&self) -> [Vec<usize>; 3] {
        let s = |h: usize, l: usize, dim: usize| match self.opts.layout {
            Layout::Bhsd => vec![self.b, h, l, dim],
            Layout::Bshd => vec![self.b, l, h, dim],
        };
        [
            s(self.hq, self.m, self.d),
            s(self.hkv, self.n, self.d),
            s(self.hkv, self.n, self.dv),
        ]
    }
}

struct Data {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    mask: Option<Vec<bool>>,
}

fn data(c: &Case) -> Data {
    let [qs, ks, vs] = c.shapes();
    let n = |s: &[usize]| s.iter().product::<usize>();
    let mut q = random(n(&qs), c.seed, -1.0, 1.0);
    let mut k = random(n(&ks), c.seed + 1, -1.0, 1.0);
    let mut v = random(n(&vs), c.seed + 2, -1.0, 1.0);
    if c.half {
        for x in q.iter_mut().chain(k.iter_mut()).chain(v.iter_mut()) {
            *x = f16::from_f32(*x).to_f32();
        }
    }
    let mask = c
        .mask
        .as_ref()
        .map(|(s, p)| random_mask(n(s), c.seed + 3, *p));
    Data { q, k, v, mask }
}

/// GPU output and lse.
fn run_gpu(ctx: &Context, c: &Case, x: &Data) -> (Vec<f32>, Vec<f32>) {
    let [qs, ks, vs] = c.shapes();
    let mask = x.mask.as_ref().map(|m| {
        ctx.upload_mask(m, c.mask.as_ref().unwrap().0.clone())
            .unwrap()
    });
    if c.half {
        let h = |v: &[f32]| v.iter().map(|&a| f16::from_f32(a)).collect::<Vec<_>>();
        let q = ctx.upload(&h(&x.q), qs).unwrap();
        let k = ctx.upload(&h(&x.k), ks).unwrap();
        let v = ctx.upload(&h(&x.v), vs).unwrap();
        let (o, l) = ctx
            .attention_lse(&q, &k, &v, mask.as_ref(), &c.opts)
            .unwrap();
        let o = o.download().unwrap().iter().map(|a| a.to_f32()).collect();
        (o, l.download().unwrap())
    } else {
        let q = ctx.upload(&x.q, qs).unwrap();
        let k = ctx.upload(&x.k, ks).unwrap();
        let v = ctx.upload(&x.v, vs).unwrap();
        let (o, l) = ctx
            .attention_lse(&q, &k, &v, mask.as_ref(), &c.opts)
            .unwrap();
        (o.download().unwrap(), l.download().unwrap())
    }
}

fn run_ref(c: &Case, x: &Data) -> reference::AttentionOutput {
    let [qs, ks, vs] = c.shapes();
    reference::attention(
        (&x.q, &qs),
        (&x.k, &ks),
        (&x.v, &vs),
        x.mask
            .as_deref()
            .map(|m| (m, c.mask.as_ref().unwrap().0.as_slice())),
        &c.opts,
    )
    .unwrap()
}

/// Runs a case on the GPU and the reference and checks output and lse.
fn check(ctx: &Context, c: &Case) {
    let x = data(c);
    let (o, l) = run_gpu(ctx, c, &x);
    let want = run_ref(c, &x);
    let tol = if c.half { TOL_F16 } else { TOL_F32 };
    let err = row_error(&o, &want.out, c.dv);
    assert!(err <= tol, "{c:?}: output error {err:e} > {tol:e}");
    // lse = m + log l: f32 rounding of O(10) values; -inf must match exactly.
    for (g, w) in l.iter().zip(&want.lse) {
        if w.is_infinite() {
            assert_eq!(*g as f64, *w, "{c:?}: lse of an empty row");
        } else {
            let e = (*g as f64 - w).abs() / w.abs().max(1.0);
            assert!(e <= tol, "{c:?}: lse {g} vs {w}");
        }
    }
}

#[test]
fn matches_reference_over_lengths_and_head_dims() {
    let Some(ctx) = gpu() else { return };
    // A covering set of m, n in {1, 2, 17, 64, 257} and d in {8, 40, 64, 128, 256}.
    for &(m, n, d) in &[
        (1, 1, 8),
        (2, 17, 40),
        (17, 2, 64),
        (17, 64, 128),
        (64, 17, 256),
        (64, 64, 64),
        (257, 17, 8),
        (17, 257, 40),
        (1, 257, 128),
        (2, 64, 256),
        (257, 257, 64),
    ] {
        check(ctx, &Case::new(1, 2, 2, m, n, d));
    }
}

#[test]
fn dv_differs_from_d_and_odd_dims() {
    let Some(ctx) = gpu() else { return };
    for &(d, dv) in &[
        (8, 40),
        (40, 8),
        (96, 96),
        (130, 33),
        (256, 16),
        (16, 256),
        (100, 200),
    ] {
        let mut c = Case::new(2, 2, 1, 9, 23, d);
        c.dv = dv;
        check(ctx, &c);
    }
}

#[test]
fn gqa_and_bshd_layout() {
    let Some(ctx) = gpu() else { return };
    for &(hq, hkv) in &[(8, 2), (6, 1)] {
        let mut c = Case::new(2, hq, hkv, 17, 31, 64);
        check(ctx, &c);
        c.opts.layout = Layout::Bshd;
        c.opts.causal = true;
        check(ctx, &c);
    }
}

#[test]
fn causal_with_m_less_and_greater_than_n() {
    let Some(ctx) = gpu() else { return };
    // m > n: the first m - n queries see no key (zeros, lse = -inf).
    for &(m, n) in &[(17, 64), (64, 17), (33, 33), (1, 257), (257, 64)] {
        let mut c = Case::new(1, 2, 1, m, n, 40);
        c.opts.causal = true;
        check(ctx, &c);
    }
}

#[test]
fn masks_with_empty_rows_scale_and_softcap() {
    let Some(ctx) = gpu() else { return };
    let (b, hq, m, n) = (2, 4, 17, 40);
    for shape in [
        vec![m, n],
        vec![b, 1, m, n],
        vec![b, hq, m, n],
        vec![1, hq, m, n],
    ] {
        // Keep-probability 0.15 over 40 keys: some rows are fully masked.
        let mut c = Case::new(b, hq, 2, m, n, 64);
        c.mask = Some((shape.clone(), 0.15));
        check(ctx, &c);
        c.opts.causal = true;
        c.opts.softcap = 0.5;
        c.opts.scale = Some(3.0);
        check(ctx, &c);
    }
    let mut c = Case::new(1, 1, 1, 5, 9, 8);
    c.mask = Some((vec![5, 9], 0.0));
    let x = data(&c);
    let (o, l) = run_gpu(ctx, &c, &x);
    assert!(
        o.iter().all(|&v| v == 0.0),
        "fully masked rows must be zero"
    );
    assert!(l.iter().all(|&v| v == f32::NEG_INFINITY));
}

#[test]
fn f16_storage() {
    let Some(ctx) = gpu() else { return };
    for &(m, n, d, causal) in &[(17, 33, 64, false), (9, 64, 128, true), (3, 20, 40, true)] {
        let mut c = Case::new(1, 4, 2, m, n, d);
        c.half = true;
        c.opts.causal = causal;
        check(ctx, &c);
    }
}

#[test]
fn decode_splits_keys_and_merges() {
    let Some(ctx) = gpu() else { return };
    // m <= 4, n >= 1024 takes the split path on its own.
    for &(m, causal) in &[(1, false), (4, true), (3, false)] {
        let mut c = Case::new(1, 4, 2, m, 1100, 64);
        c.opts.causal = causal;
        check(ctx, &c);
    }
    let mut c = Case::new(1, 2, 1, 2, 1030, 128);
    c.mask = Some((vec![2, 1030], 0.01));
    c.half = true;
    check(ctx, &c);
}

#[test]
fn equals_naive_attention_for_random_tile_sizes() {
    let Some(ctx) = gpu() else { return };
    // Key blocks of random sizes (the split path), random shapes.
    let r = random(60, 99, 0.0, 1.0);
    for t in 0..10 {
        let u = |i: usize, lo: usize, hi: usize| lo + (r[t * 6 + i] * (hi - lo) as f32) as usize;
        let mut c = Case::new(1, 2, 1, u(0, 1, 40), u(1, 1, 120), u(2, 1, 140));
        c.opts.key_split = Some(u(3, 1, 80));
        c.opts.causal = r[t * 6 + 4] < 0.5;
        if r[t * 6 + 5] < 0.3 {
            c.mask = Some((vec![c.m, c.n], 0.3));
        }
        c.seed = t as u64;
        check(ctx, &c);
    }
}

#[test]
fn lse_equals_logsumexp() {
    let Some(ctx) = gpu() else { return };
    let c = Case::new(1, 1, 1, 3, 50, 16);
    let x = data(&c);
    let (_, l) = run_gpu(ctx, &c, &x);
    let scale = 1.0 / 4.0;
    for (i, &got) in l.iter().enumerate() {
        let s: Vec<f64> = (0..50)
            .map(|j| {
                scale
                    * (0..16)
                        .map(|e| x.q[i * 16 + e] as f64 * x.k[j * 16 + e] as f64)
                        .sum::<f64>()
            })
            .collect();
        let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = mx + s.iter().map(|v| (v - mx).exp()).sum::<f64>().ln();
        // f32 online softmax vs f64: 1e-5 absolute on O(4) values.
        assert!((got as f64 - lse).abs() < 1e-5, "{got} vs {lse}");
    }
}

#[test]
fn causality_perturbing_a_value_leaves_earlier_rows() {
    let Some(ctx) = gpu() else { return };
    let mut c = Case::new(1, 1, 1, 20, 30, 8);
    c.opts.causal = true;
    let mut x = data(&c);
    let (o1, _) = run_gpu(ctx, &c, &x);
    let j = 21; // visible to queries i >= j - (n - m) = 11
    for e in 0..8 {
        x.v[j * 8 + e] += 5.0;
    }
    let (o2, _) = run_gpu(ctx, &c, &x);
    for i in 0..20 {
        let same = o1[i * 8..(i + 1) * 8] == o2[i * 8..(i + 1) * 8];
        assert_eq!(same, i < 11, "row {i}");
    }
}

#[test]
fn gqa_equals_repeated_kv_heads() {
    let Some(ctx) = gpu() else { return };
    let c = Case::new(2, 6, 2, 9, 13, 16);
    let x = data(&c);
    let (o, _) = run_gpu(ctx, &c, &x);
    // Repeat each kv head 3 times.
    let rep = |t: &[f32]| {
        let mut out = Vec::new();
        for b in 0..2 {
            for h in 0..6 {
                let s = (b * 2 + h / 3) * 13 * 16;
                out.extend_from_slice(&t[s..s + 13 * 16]);
            }
        }
        out
    };
    let mut c2 = c.clone();
    c2.hkv = 6;
    let x2 = Data {
        q: x.q.clone(),
        k: rep(&x.k),
        v: rep(&x.v),
        mask: None,
    };
    let (o2, _) = run_gpu(ctx, &c2, &x2);
    assert_eq!(o, o2, "GQA must equal attention over repeated kv heads");
}

#[test]
fn matmul_of_the_tile_engine() {
    let Some(ctx) = gpu() else { return };
    for &(m, k, n) in &[(1, 1, 1), (17, 70, 33), (64, 130, 65)] {
        let a = random(m * k, 1, -1.0, 1.0);
        let bt = random(n * k, 2, -1.0, 1.0); // [n, k]
        let ga = ctx.upload(&a, [m, k]).unwrap();
        let gbt = ctx.upload(&bt, [n, k]).unwrap();
        let b: Vec<f32> = (0..k * n).map(|x| bt[(x % n) * k + x / n]).collect(); // [k, n]
        let gb = ctx.upload(&b, [k, n]).unwrap();
        let want: Vec<f64> = (0..m * n)
            .map(|x| {
                (0..k)
                    .map(|e| a[(x / n) * k + e] as f64 * bt[(x % n) * k + e] as f64)
                    .sum()
            })
            .collect();
        for (gbx, tr) in [(&gbt, true), (&gb, false)] {
            let c = ctx.matmul(&ga, gbx, tr).unwrap().download().unwrap();
            // f32 dot products of up to 130 terms: 1e-5 of the row's magnitude.
            let err = row_error(&c, &want, n);
            assert!(err < 1e-5, "{m}x{k}x{n} transpose_b={tr}: {err:e}");
        }
    }
}

#[test]
fn bad_input_is_an_error() {
    let o = AttentionOptions::default();
    let q = [1, 4, 5, 8];
    let kv = [1, 2, 7, 8];
    assert!(attention_shape(&q, &kv, &kv, None, &o).is_ok());
    let shape_err = |r: Result<_, Error>| matches!(r, Err(Error::Shape(_)));
    assert!(shape_err(attention_shape(
        &q,
        &[1, 3, 7, 8],
        &[1, 3, 7, 8],
        None,
        &o
    )));
    assert!(shape_err(attention_shape(
        &[1, 4, 5, 300],
        &[1, 2, 7, 300],
        &kv,
        None,
        &o
    )));
    assert!(shape_err(attention_shape(
        &q,
        &kv,
        &[1, 2, 7, 300],
        None,
        &o
    )));
    assert!(shape_err(attention_shape(&q, &[1, 2, 7, 9], &kv, None, &o)));
    assert!(shape_err(attention_shape(&q, &kv, &[1, 2, 6, 8], None, &o)));
    assert!(shape_err(attention_shape(&q, &[2, 2, 7, 8], &kv, None, &o)));
    assert!(shape_err(attention_shape(&[4, 5, 8], &kv, &kv, None, &o)));
    assert!(shape_err(attention_shape(&q, &kv, &kv, Some(&[5, 6]), &o)));
    assert!(shape_err(attention_shape(
        &q,
        &kv,
        &kv,
        Some(&[1, 2, 5, 7]),
        &o
    )));
    assert!(shape_err(attention_shape(
        &q,
        &kv,
        &kv,
        Some(&[3, 1, 5, 7]),
        &o
    )));
    assert!(attention_shape(&q, &kv, &kv, Some(&[1, 4, 5, 7]), &o).is_ok());
    let opt_err = |o: AttentionOptions| {
        matches!(
            attention_shape(&q, &kv, &kv, None, &o),
            Err(Error::InvalidOption(_))
        )
    };
    assert!(opt_err(AttentionOptions {
        softcap: -1.0,
        ..Default::default()
    }));
    assert!(opt_err(AttentionOptions {
        softcap: f32::NAN,
        ..Default::default()
    }));
    assert!(opt_err(AttentionOptions {
        scale: Some(f32::INFINITY),
        ..Default::default()
    }));

    let Some(ctx) = gpu() else { return };
    let t = |s: [usize; 4]| ctx.zeros::<f32>(s).unwrap();
    let (qt, kt) = (t(q), t(kv));
    // Wrong output shape, integer dtype, in-place: errors, not panics.
    let a = seq_kernels::Attention::new(ctx, &o).unwrap();
    assert!(matches!(
        a.plan(&qt, &kt, &kt, None, &t([1, 4, 5, 9]), None),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        a.plan(&qt, &kt, &kt, None, &qt, None),
        Err(Error::InvalidOption(_))
    ));
    let qi = ctx.zeros::<u32>(q).unwrap();
    let ki = ctx.zeros::<u32>(kv).unwrap();
    assert!(matches!(
        ctx.attention(&qi, &ki, &ki, None, &o),
        Err(Error::Dtype(_))
    ));
    assert!(ctx
        .attention(&qt, &t([1, 4, 7, 8]), &t([1, 4, 7, 8]), None, &o)
        .is_ok());
}

/// `seqk run attention` on .npy files: GPU against `--cpu`, the lse output, and a one-line
/// usage error (exit code 2) for shapes that disagree.
#[cfg(feature = "cli")]
#[test]
fn seqk_run_attention_matches_cpu() {
    use common::{load_npy, save_npy};
    let Some(_) = gpu() else { return };
    let dir = std::env::temp_dir().join(format!("seqk-attention-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let save = |name: &str, shape: &[u64], data: &[f32]| save_npy(&dir.join(name), shape, data);
    let load = |name: &str| load_npy::<f32>(&dir.join(name));
    save("q.npy", &[1, 4, 5, 16], &random(320, 1, -1.0, 1.0));
    save("k.npy", &[1, 2, 9, 16], &random(288, 2, -1.0, 1.0));
    save("v.npy", &[1, 2, 9, 8], &random(144, 3, -1.0, 1.0));
    let arg = |k: &str| format!("{k}={}", dir.join(format!("{k}.npy")).display());
    let run = |extra: &[&str], out: &str, lse: &str| {
        let (o, l) = (dir.join(out), format!("lse={}", dir.join(lse).display()));
        let (q, k, v) = (arg("q"), arg("k"), arg("v"));
        let mut args = vec![
            "run",
            "attention",
            "--in",
            &q,
            "--in",
            &k,
            "--in",
            &v,
            "--out",
        ];
        let o_s = o.display().to_string();
        args.extend([o_s.as_str(), "--out2", &l, "--set", "causal=true", "--set"]);
        args.push("softcap=3");
        args.extend(extra);
        std::process::Command::new(env!("CARGO_BIN_EXE_seqk"))
            .args(&args)
            .output()
            .unwrap()
    };
    let g = run(&[], "og.npy", "lg.npy");
    assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
    let c = run(&["--cpu"], "oc.npy", "lc.npy");
    assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stderr));
    let (gs, go) = load("og.npy");
    let (_, co) = load("oc.npy");
    assert_eq!(gs, vec![1, 4, 5, 8]);
    let want: Vec<f64> = co.iter().map(|&x| x as f64).collect();
    // Spec tolerance for f32 storage (the CPU side is the f64 reference rounded to f32).
    assert!(row_error(&go, &want, 8) <= TOL_F32);
    let (ls, lg) = load("lg.npy");
    let (_, lc) = load("lc.npy");
    assert_eq!(ls, vec![1, 4, 5]);
    for (a, b) in lg.iter().zip(&lc) {
        assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "lse {a} vs {b}");
    }
    // v with another length than k: exit 2 and one line naming the problem.
    save("v.npy", &[1, 2, 8, 8], &random(128, 3, -1.0, 1.0));
    let bad = run(&["--cpu"], "ob.npy", "lb.npy");
    let msg = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2), "{msg}");
    assert!(msg.contains("v [1, 2, 8, 8]"), "{msg}");
    let _ = std::fs::remove_dir_all(&dir);
}
