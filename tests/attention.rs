//! Exact attention on the GPU against the f64 reference, the kernel's properties,
//! f16 storage, the decode (split-key) path, the matmul, and bad input.

mod common;

use common::{gpu, in_oversized_buffer, random, random_mask, small_bindings};
use half::f16;
use seq_kernels::kernels::attention::attention_shape;
use seq_kernels::kernels::attention::matmul_plan;
use seq_kernels::reference::{attention as reference, row_error};
use seq_kernels::{
    Attention, AttentionOptions, AttnMask, Context, Element, Error, GpuTensor, HostMask, Layout,
};

/// Allowed error: 1e-4 of the output magnitude for f32 storage (f32 accumulation over up to a
/// few hundred keys with an online rescale), 2e-3 for f16 storage (inputs and output rounded
/// to 11 significant bits).
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
    /// The mask as additive terms: -inf where hidden, a random term in [-2, 2) where kept.
    additive: bool,
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
            additive: false,
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

#[derive(Clone)]
struct Data {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    mask: Option<Vec<bool>>,
    /// The additive form of `mask`, for additive cases.
    terms: Option<Vec<f32>>,
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
    let mask = c.mask.as_ref().map(|(s, p)| {
        let mut keep = random_mask(n(s), c.seed + 3, *p);
        // Mask rows 1 and the last hide every key: empty rows beside full ones in a tile.
        let rows = keep.len() / c.n;
        for r in [1.min(rows - 1), rows - 1] {
            keep[r * c.n..(r + 1) * c.n].fill(false);
        }
        keep
    });
    let terms = mask.as_ref().filter(|_| c.additive).map(|keep| {
        let u = random(keep.len(), c.seed + 4, -2.0, 2.0);
        keep.iter()
            .zip(u)
            .map(|(&k, u)| if k { u } else { f32::NEG_INFINITY })
            .collect()
    });
    Data {
        q,
        k,
        v,
        mask,
        terms,
    }
}

impl Data {
    fn host_mask(&self) -> Option<HostMask<'_>> {
        match (&self.terms, &self.mask) {
            (Some(t), _) => Some(HostMask::Add(t)),
            (None, Some(m)) => Some(HostMask::Keep(m)),
            (None, None) => None,
        }
    }
}

/// GPU output and lse.
fn run_gpu(ctx: &Context, c: &Case, x: &Data) -> (Vec<f32>, Vec<f32>) {
    let [qs, ks, vs] = c.shapes();
    let mshape = || c.mask.as_ref().unwrap().0.clone();
    let (keep, add) = match x.host_mask() {
        None => (None, None),
        Some(HostMask::Keep(m)) => (Some(ctx.upload_mask(m, mshape()).unwrap()), None),
        Some(HostMask::Add(t)) => (None, Some(ctx.upload(t, mshape()).unwrap())),
    };
    let mask = keep
        .as_ref()
        .map(AttnMask::from)
        .or(add.as_ref().map(AttnMask::from));
    if c.half {
        let h = |v: &[f32]| v.iter().map(|&a| f16::from_f32(a)).collect::<Vec<_>>();
        let q = ctx.upload(&h(&x.q), qs).unwrap();
        let k = ctx.upload(&h(&x.k), ks).unwrap();
        let v = ctx.upload(&h(&x.v), vs).unwrap();
        let (o, l) = ctx.attention_lse(&q, &k, &v, mask, &c.opts).unwrap();
        let o = o.download().unwrap().iter().map(|a| a.to_f32()).collect();
        (o, l.download().unwrap())
    } else {
        let q = ctx.upload(&x.q, qs).unwrap();
        let k = ctx.upload(&x.k, ks).unwrap();
        let v = ctx.upload(&x.v, vs).unwrap();
        let (o, l) = ctx.attention_lse(&q, &k, &v, mask, &c.opts).unwrap();
        (o.download().unwrap(), l.download().unwrap())
    }
}

fn run_ref(c: &Case, x: &Data) -> reference::AttentionOutput {
    let [qs, ks, vs] = c.shapes();
    reference::attention(
        (&x.q, &qs),
        (&x.k, &ks),
        (&x.v, &vs),
        x.host_mask()
            .map(|m| (m, c.mask.as_ref().unwrap().0.as_slice())),
        &c.opts,
    )
    .unwrap()
}

/// Runs a case on the GPU and the reference and checks output and lse.
fn check(ctx: &Context, c: &Case) {
    check_data(ctx, c, &data(c));
}

fn check_data(ctx: &Context, c: &Case, x: &Data) {
    let (o, l) = run_gpu(ctx, c, x);
    assert_close(c, &o, &l, &run_ref(c, x));
}

/// GPU output and lse against the reference's, within the case's tolerance.
fn assert_close(c: &Case, o: &[f32], l: &[f32], want: &reference::AttentionOutput) {
    let tol = if c.half { TOL_F16 } else { TOL_F32 };
    let err = row_error(o, &want.out, c.dv);
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

/// The tile path packs the query rows of a kv head's GQA group into its tiles (group * m rows,
/// head-major): tiles holding several heads' rows or ending inside one head's rows, causal
/// with m < n (a tile's latest query index need not be its last row's), per-head masks with
/// key splits, bshd, and the blocked kernel beside it (m = 5 above a 4-row tile).
#[test]
fn tile_path_packs_gqa_heads_into_tiles() {
    let Some(ctx) = gpu() else { return };
    // d 128: tiles of 8 rows; d 256: tiles of 4.
    for &(hq, hkv, m, d) in &[
        (8, 2, 3, 128),
        (6, 1, 3, 256),
        (4, 4, 2, 128),
        (6, 2, 5, 256),
    ] {
        let n = 21;
        let mut c = Case::new(2, hq, hkv, m, n, d);
        c.opts.causal = true;
        check(ctx, &c);
        c.mask = Some((vec![2, hq, m, n], 0.6));
        c.opts.layout = Layout::Bshd;
        c.opts.key_split = Some(8);
        check(ctx, &c);
    }
    // Tiles of 4 over two heads' 7 rows, causal with n - m = 15: a row's last key opens a
    // key tile (keys 16.. of a split, 20 the last of index 5), so a limit one key short drops
    // a whole tile.
    let mut c = Case::new(1, 2, 1, 7, 22, 256);
    c.opts.causal = true;
    c.opts.key_split = Some(8);
    check(ctx, &c);
}

/// The register-blocked kernel (no key splits, more query rows than one tile): query rows
/// and keys on both sides of its 64-row blocks, several 64-column value slabs (the last one
/// partial), causal with m < n and m > n, and an additive key mask with a soft cap.
#[test]
fn blocked_kernel_across_block_edges() {
    let Some(ctx) = gpu() else { return };
    for &(m, n, dv, causal) in &[
        (63, 65, 96, false),
        (64, 130, 200, true),
        (65, 63, 33, true),
        (129, 64, 64, false),
    ] {
        let mut c = Case::new(1, 2, 1, m, n, 48);
        c.dv = dv;
        c.opts.causal = causal;
        check(ctx, &c);
    }
    let mut c = Case::new(2, 4, 2, 70, 90, 64);
    c.mask = Some((vec![2, 1, 1, 90], 0.7));
    c.additive = true;
    c.opts.softcap = 5.0;
    check(ctx, &c);
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

/// A cap a few times the scores (|s / c| up to about 0.1) bends them by c tanh(s / c), which
/// differs from s by up to about s (s / c)^2 / 3: the shortcut for tiny s / c must not
/// reach this far. Both kernels: 5 query rows (tile path) and 40 (register-blocked).
#[test]
fn moderate_softcap_bends_the_scores() {
    let Some(ctx) = gpu() else { return };
    for m in [5, 40] {
        let mut c = Case::new(1, 2, 1, m, 9, 16);
        c.opts.softcap = 8.0;
        check(ctx, &c);
    }
}

/// A cap far above the scores leaves them unchanged (c tanh(s / c) = s): s / c used to be
/// subnormal, flushed to 0, and every score 0.
#[test]
fn huge_softcap_leaves_scores() {
    let Some(ctx) = gpu() else { return };
    for softcap in [1e30, 3e38] {
        let mut c = Case::new(1, 2, 1, 5, 9, 16);
        c.opts.softcap = softcap;
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
        // Keep-probability 0.15 over 40 keys, and two mask rows fully masked (see `data`).
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
fn additive_masks_match_reference_and_equal_boolean_ones() {
    let Some(ctx) = gpu() else { return };
    let (b, hq, m, n) = (2, 4, 17, 40);
    for shape in [vec![m, n], vec![b, hq, m, n], vec![1, hq, m, n]] {
        let mut c = Case::new(b, hq, 2, m, n, 64);
        c.mask = Some((shape, 0.6));
        c.additive = true;
        check(ctx, &c);
        // The terms come after the cap (the reference adds them there).
        c.opts.causal = true;
        c.opts.softcap = 0.5;
        check(ctx, &c);
        c.half = true;
        check(ctx, &c);
    }
    // Terms of 0 and -inf are the boolean mask, to the bit.
    let mut c = Case::new(1, 2, 1, 33, 70, 32);
    c.mask = Some((vec![33, 70], 0.5));
    let x = data(&c);
    let (o_keep, l_keep) = run_gpu(ctx, &c, &x);
    let zero_or_hidden = x
        .mask
        .as_ref()
        .unwrap()
        .iter()
        .map(|&k| if k { 0.0 } else { f32::NEG_INFINITY })
        .collect();
    let x = Data {
        terms: Some(zero_or_hidden),
        ..x
    };
    let (o_add, l_add) = run_gpu(ctx, &c, &x);
    assert_eq!(o_keep, o_add);
    assert_eq!(l_keep, l_add);
}

/// A mask dimension of 1 is broadcast (`[b, 1, 1, n]` is PyTorch's key-padding shape): the
/// GPU output equals, to the bit, the output with the mask expanded to `[b, hq, m, n]`, and
/// matches the reference given the expanded mask.
#[test]
fn broadcast_masks_equal_the_expanded_mask() {
    let Some(ctx) = gpu() else { return };
    // (19, 37) runs the tiled path, (2, 1100) the split-key decode path (m <= 4, n >= 1024).
    for (m, n) in [(19, 37), (2, 1100)] {
        broadcast_case(ctx, 2, 3, m, n);
    }
    // A row count that is neither 1 nor m is refused.
    let (b, hq, m, n) = (2, 3, 19, 37);
    let q = ctx
        .upload(&vec![0.0f32; b * hq * m * 8], [b, hq, m, 8])
        .unwrap();
    let kv = ctx.upload(&vec![0.0f32; b * n * 8], [b, 1, n, 8]).unwrap();
    let bad = ctx.upload_mask(&vec![true; 2 * n], [2, n]).unwrap();
    let err = ctx.attention(
        &q,
        &kv,
        &kv,
        Some(AttnMask::from(&bad)),
        &Default::default(),
    );
    assert!(
        matches!(&err, Err(Error::Shape(msg)) if msg.contains("[m|1, n]")),
        "{err:?}"
    );
}

fn broadcast_case(ctx: &Context, b: usize, hq: usize, m: usize, n: usize) {
    let index = |s: &[usize], (bi, h, i, j): (usize, usize, usize, usize)| {
        let [sb, sh, sm, sn] = match *s {
            [sm, sn] => [1, 1, sm, sn],
            [sb, sh, sm, sn] => [sb, sh, sm, sn],
            _ => unreachable!(),
        };
        (((bi % sb) * sh + h % sh) * sm + i % sm) * sn + j
    };
    for (shape, additive, causal) in [
        (vec![b, 1, 1, n], false, false),
        (vec![b, 1, 1, n], true, true),
        (vec![1, n], false, true),
        (vec![1, hq, 1, n], true, false),
        (vec![b, hq, 1, n], false, false),
        (vec![1, 1, m, n], true, false),
    ] {
        let mut small = Case::new(b, hq, 1, m, n, 24);
        small.opts.causal = causal;
        small.additive = additive;
        small.mask = Some((shape.clone(), 0.5));
        let keep = random_mask(shape.iter().product(), 7, 0.5);
        let x = Data {
            mask: Some(keep.clone()),
            terms: additive.then(|| {
                let u = random(keep.len(), 8, -2.0, 2.0);
                keep.iter()
                    .zip(u)
                    .map(|(&k, u)| if k { u } else { f32::NEG_INFINITY })
                    .collect()
            }),
            ..data(&small)
        };
        let full = [b, hq, m, n];
        let mut big = small.clone();
        big.mask = Some((full.to_vec(), 0.5));
        let mut expand = Vec::with_capacity(b * hq * m * n);
        for bi in 0..b {
            for h in 0..hq {
                for i in 0..m {
                    for j in 0..n {
                        expand.push(index(&shape, (bi, h, i, j)));
                    }
                }
            }
        }
        let xe = Data {
            mask: Some(expand.iter().map(|&e| keep[e]).collect()),
            terms: x
                .terms
                .as_ref()
                .map(|t| expand.iter().map(|&e| t[e]).collect()),
            ..x.clone()
        };
        let (o, l) = run_gpu(ctx, &small, &x);
        let (oe, le) = run_gpu(ctx, &big, &xe);
        assert_eq!(o, oe, "{shape:?} additive {additive} causal {causal}");
        assert_eq!(l, le, "{shape:?} additive {additive} causal {causal}");
        check_data(ctx, &big, &xe);
        check_data(ctx, &small, &x);
    }
}

/// Junk (NaN, +-inf) in the values of keys a row may not see never reaches that row, as in
/// the masked slots of a preallocated KV cache (perturbing v[j] leaves the rows that cannot
/// see j; fully masked rows are zeros). A hidden key's p = 0 alone would give NaN.
#[test]
fn junk_values_of_hidden_keys_never_reach_outputs() {
    let Some(ctx) = gpu() else { return };
    // (case, hidden key j, queries that cannot see j, their mask rows to clear key j in)
    let mut cases = Vec::new();
    // Boolean and additive masks: key 3 hidden from every query; query 0 sees nothing.
    for additive in [false, true] {
        let mut c = Case::new(1, 1, 1, 4, 8, 8);
        c.mask = Some((vec![4, 8], 1.0));
        c.additive = additive;
        cases.push((c, 3, vec![0, 1, 2, 3]));
    }
    // Causal: key 25 of 30 is seen by queries 15.. of 20.
    let mut c = Case::new(1, 1, 1, 20, 30, 8);
    c.opts.causal = true;
    cases.push((c, 25, (0..15).collect()));
    // The register-blocked kernel (m above one tile) with a mask: key 70 of 100 hidden from
    // queries 5 and 40 only.
    let mut c = Case::new(1, 2, 1, 50, 100, 8);
    c.mask = Some((vec![50, 100], 1.0));
    cases.push((c, 70, vec![5, 40]));
    // The register-blocked kernel, causal with m < n: key 100 of 130 is seen by queries 70..
    // of 100, in the second of three key blocks.
    let mut c = Case::new(1, 1, 1, 100, 130, 8);
    c.opts.causal = true;
    cases.push((c, 100, (0..70).collect()));
    // The register-blocked kernel with a key block (keys 64..) of one key hidden from every
    // query: no query sees a key of that block.
    let mut c = Case::new(1, 1, 1, 65, 65, 8);
    c.mask = Some((vec![65, 65], 1.0));
    cases.push((c, 64, (0..65).collect()));
    // The register-blocked kernel, causal with m > n: key 99 of 100 is seen by query 129 of
    // 130 only, and hidden from query 128, the other row (index >= n) of the last block.
    let mut c = Case::new(1, 1, 1, 130, 100, 8);
    c.opts.causal = true;
    cases.push((c, 99, (0..129).collect()));
    // Decode with split keys (m <= 4, n >= 1024): key 700 hidden from query 1 only.
    let mut c = Case::new(1, 2, 1, 3, 1100, 16);
    c.mask = Some((vec![3, 1100], 1.0));
    cases.push((c, 700, vec![1]));
    for (c, j, blind) in cases {
        let mut x = data(&c);
        if let Some(keep) = x.mask.as_mut() {
            keep.fill(true);
            for &i in &blind {
                keep[i * c.n + j] = false;
            }
            if c.m == 4 {
                keep[..c.n].fill(false); // query 0 sees nothing
            }
        }
        if c.additive {
            x.terms = x.mask.as_ref().map(|keep| {
                keep.iter()
                    .map(|&k| if k { 0.5 } else { f32::NEG_INFINITY })
                    .collect()
            });
        }
        let (clean, _) = run_gpu(ctx, &c, &x);
        for junk in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut y = x.clone();
            // Heads share the kv head (hkv = 1): key j of it.
            y.v[j * c.dv..(j + 1) * c.dv].fill(junk);
            let (got, _) = run_gpu(ctx, &c, &y);
            for h in 0..c.hq {
                for &i in &blind {
                    let row = (h * c.m + i) * c.dv..(h * c.m + i + 1) * c.dv;
                    let (a, b) = (&clean[row.clone()], &got[row]);
                    assert!(
                        a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{c:?}: v[{j}] = {junk} changed row {i} of head {h}: {b:?} (was {a:?})"
                    );
                }
            }
            if c.m == 4 {
                assert!(got[..c.dv].iter().all(|&a| a == 0.0), "fully masked row");
            }
        }
    }
}

/// Finite scores far below -3e38 are scores, not a mask: all equal, the row is the mean of v.
#[test]
fn scores_near_the_lowest_f32_still_count() {
    let Some(ctx) = gpu() else { return };
    let mut c = Case::new(1, 1, 1, 1, 4, 8);
    c.opts.scale = Some(4e37); // each score -8 * 4e37 = -3.2e38, finite in f32
    let mut x = data(&c);
    x.q.fill(1.0);
    x.k.fill(-1.0);
    check_data(ctx, &c, &x);
}

/// Masks and lse outputs past the device's storage binding limit are `LimitExceeded`, named,
/// before anything is recorded.
#[test]
fn masks_larger_than_a_binding_are_limit_errors() {
    let Some(_) = gpu() else { return };
    let small = small_bindings(64 << 10);
    let (m, d) = (300, 8);
    let q = small.zeros::<f32>([1, 1, m, d]).unwrap(); // 9.6 KB
    let keep = small.upload_mask(&vec![true; m * m], [m, m]).unwrap(); // 90 KB
    let add = small.zeros::<f32>([m / 2, m / 2]).unwrap(); // 90 KB
    let (q2, add_ok) = (
        small.zeros::<f32>([1, 1, m / 2, d]).unwrap(),
        small.zeros::<f32>([m / 4, m / 4]).unwrap(),
    );
    let o = AttentionOptions::default();
    // The error names the tensor too big to bind.
    let limit = |r: Result<_, Error>| {
        matches!(
            r,
            Err(Error::LimitExceeded {
                limit: "max_storage_buffer_binding_size",
                ref what,
                ..
            }) if what == "bytes of the attention mask"
        )
    };
    assert!(limit(small.attention(
        &q,
        &q,
        &q,
        Some(AttnMask::Keep(&keep)),
        &o
    )));
    assert!(limit(small.attention(
        &q2,
        &q2,
        &q2,
        Some(AttnMask::Add(&add)),
        &o
    )));
    let q4 = small.zeros::<f32>([1, 1, m / 4, d]).unwrap();
    assert!(small
        .attention(&q4, &q4, &q4, Some(AttnMask::Add(&add_ok)), &o)
        .is_ok());
}

/// Tensors in application buffers larger than a storage binding may be: the kernels bind each
/// tensor's bytes, not its whole buffer (which was a device error at any tensor size).
#[test]
fn tensors_in_buffers_larger_than_a_binding() {
    let Some(_) = gpu() else { return };
    let small = small_bindings(1 << 20);
    for additive in [false, true] {
        let mut c = Case::new(1, 2, 1, 5, 7, 16);
        c.mask = Some((vec![5, 7], 0.7));
        c.additive = additive;
        let x = data(&c);
        let [qs, ks, vs] = c.shapes();
        let big = |v: &[f32], s: Vec<usize>| in_oversized_buffer(&small, v, s);
        let (q, k, v) = (big(&x.q, qs), big(&x.k, ks), big(&x.v, vs));
        let out = big(&[0.0; 2 * 5 * 16], vec![1, 2, 5, 16]);
        let lse = big(&[0.0; 2 * 5], vec![1, 2, 5]);
        let keep: Vec<u8> = x.mask.as_ref().unwrap().iter().map(|&k| k as u8).collect();
        let keep = in_oversized_buffer(&small, &keep, [5, 7]);
        let terms = x.terms.as_ref().map(|t| big(t, vec![5, 7]));
        let mask = match &terms {
            Some(t) => AttnMask::Add(t),
            None => AttnMask::Keep(&keep),
        };
        Attention::new(&small, &c.opts)
            .unwrap()
            .plan(&q, &k, &v, Some(mask), &out, Some(&lse))
            .unwrap()
            .run(&small)
            .unwrap();
        let want = run_ref(&c, &x);
        let err = row_error(&out.download().unwrap(), &want.out, c.dv);
        assert!(
            err <= TOL_F32,
            "additive = {additive}: output error {err:e}"
        );
        for (g, w) in lse.download().unwrap().iter().zip(&want.lse) {
            // Empty rows give -inf on both sides.
            let same = *g as f64 == *w || (*g as f64 - w).abs() <= TOL_F32 * w.abs().max(1.0);
            assert!(same, "lse {g} vs {w}");
        }
    }
    // The matmul, C = A B^T, all three in oversized buffers.
    let (a, b) = (random(3 * 4, 1, -1.0, 1.0), random(2 * 4, 2, -1.0, 1.0));
    let ga = in_oversized_buffer(&small, &a, [3, 4]);
    let gb = in_oversized_buffer(&small, &b, [2, 4]);
    let gc: GpuTensor<f32> = in_oversized_buffer(&small, &[0.0; 6], [3, 2]);
    matmul_plan(&small, &ga, &gb, &gc, true)
        .unwrap()
        .run(&small)
        .unwrap();
    let want: Vec<f64> = (0..6)
        .map(|x| {
            (0..4)
                .map(|e| a[(x / 2) * 4 + e] as f64 * b[(x % 2) * 4 + e] as f64)
                .sum()
        })
        .collect();
    // Dot products of 4 f32 terms.
    assert!(row_error(&gc.download().unwrap(), &want, 2) < 1e-6);
}

/// A written tensor (out, lse) whose buffer is also an input is refused before recording,
/// naming both; it was a usage conflict that panicked in the application's `finish`. f16
/// storage is refused alike, also where its tensors are widened into f32 copies (GL).
#[test]
fn written_tensors_sharing_an_input_buffer_are_refused() {
    let Some(ctx) = gpu() else { return };
    refuse_shared_buffers::<f32>(ctx);
    refuse_shared_buffers::<f16>(ctx);
}

fn refuse_shared_buffers<T: Element>(ctx: &Context) {
    let q = ctx.zeros::<T>([1, 2, 5, 16]).unwrap();
    let out = ctx.zeros::<T>([1, 2, 5, 16]).unwrap();
    let lse = GpuTensor::<f32>::from_buffer(ctx, q.buffer().clone(), [1, 2, 5]).unwrap();
    let keep = ctx.upload_mask(&[true; 25], [5, 5]).unwrap();
    let mask_in_out = GpuTensor::<u8>::from_buffer(ctx, out.buffer().clone(), [5, 5]).unwrap();
    let lse_in_out = GpuTensor::<f32>::from_buffer(ctx, out.buffer().clone(), [1, 2, 5]).unwrap();
    let a = Attention::new(ctx, &AttentionOptions::default()).unwrap();
    let lse_own = ctx.zeros::<f32>([1, 2, 5]).unwrap();
    let dtype = T::DTYPE.name();
    for (mask, lse, want) in [
        (Some(&keep), &lse, ["`lse` is written", "`q`"]),
        (Some(&mask_in_out), &lse_own, ["`out` is written", "`mask`"]),
        // Two written tensors in one buffer: wgpu allows it, the rows would collide.
        (None, &lse_in_out, ["`out` and `lse` are both written", ""]),
    ] {
        let mut enc = ctx.encoder();
        let r = a.encode(
            &mut enc,
            &q,
            &q,
            &q,
            mask.map(AttnMask::from),
            &out,
            Some(lse),
        );
        match r {
            Err(Error::InvalidOption(m)) => {
                assert!(want.iter().all(|w| m.contains(w)), "{dtype}: {m}")
            }
            other => panic!("{dtype}, expected {want:?}: {other:?}"),
        }
    }
    // The same tensors, each in a buffer of its own, run.
    a.plan(
        &q,
        &q,
        &q,
        Some(AttnMask::from(&keep)),
        &out,
        Some(&lse_own),
    )
    .unwrap()
    .run(ctx)
    .unwrap();
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
    // Values of another width than the keys (each widened by its own length).
    let mut c = Case::new(1, 4, 2, 5, 20, 40);
    c.dv = 24;
    c.half = true;
    check(ctx, &c);
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
    // A split larger than the keys (usize::MAX: never split) is one split.
    let mut c = Case::new(1, 4, 2, 2, 1100, 64);
    c.opts.key_split = Some(usize::MAX);
    check(ctx, &c);
    let mut c = Case::new(1, 2, 1, 2, 1030, 128);
    c.mask = Some((vec![2, 1030], 0.01));
    c.half = true;
    check(ctx, &c);
}

/// A KV cache filled to `kv_len`: the call equals attention over the filled prefix on its own,
/// bit for bit (GPU) and exactly (reference), and the unfilled positions, NaN here, are never
/// read. Both layouts, causal, masks, f16, the split-key path (auto and forced).
#[test]
fn kv_len_reads_the_filled_prefix_of_a_cache() {
    let Some(ctx) = gpu() else { return };
    let cases = [
        (Layout::Bhsd, 1, 5, 9, true, false, false, None),
        (Layout::Bshd, 3, 17, 40, true, true, false, None),
        (Layout::Bhsd, 2, 1030, 1100, false, true, false, None),
        (Layout::Bshd, 4, 70, 129, true, false, true, Some(16)),
        (Layout::Bhsd, 5, 33, 33, false, false, false, None),
    ];
    for (layout, m, kv, cache, causal, masked, half, split) in cases {
        let (b, hkv, d) = (2, 2, 16);
        let mut c = Case::new(b, 4, hkv, m, kv, d);
        c.opts.layout = layout;
        c.opts.causal = causal;
        c.opts.key_split = split;
        c.half = half;
        if masked {
            c.mask = Some((vec![b, 1, m, kv], 0.7));
        }
        let x = data(&c);
        check_data(ctx, &c, &x);
        // The same keys at the front of a cache of `cache` positions, NaN behind them.
        let embed = |src: &[f32]| {
            let mut big = vec![f32::NAN; b * hkv * cache * d];
            for (bb, h, j) in
                (0..b).flat_map(|bb| (0..hkv).flat_map(move |h| (0..kv).map(move |j| (bb, h, j))))
            {
                let (from, to) = match layout {
                    Layout::Bhsd => (
                        ((bb * hkv + h) * kv + j) * d,
                        ((bb * hkv + h) * cache + j) * d,
                    ),
                    Layout::Bshd => (
                        ((bb * kv + j) * hkv + h) * d,
                        ((bb * cache + j) * hkv + h) * d,
                    ),
                };
                big[to..to + d].copy_from_slice(&src[from..from + d]);
            }
            big
        };
        let y = Data {
            k: embed(&x.k),
            v: embed(&x.v),
            ..x.clone()
        };
        let mut big = c.clone();
        big.n = cache;
        big.opts.kv_len = Some(kv);
        let name = format!("{layout:?} m {m} kv_len {kv} of {cache}");
        let (want, want_lse) = run_gpu(ctx, &c, &x);
        let (got, got_lse) = run_gpu(ctx, &big, &y);
        let bits = |v: &[f32]| v.iter().map(|a| a.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&want), "{name}: output");
        assert_eq!(bits(&got_lse), bits(&want_lse), "{name}: lse");
        let (r, r_big) = (run_ref(&c, &x), run_ref(&big, &y));
        assert_eq!((r.out, r.lse), (r_big.out, r_big.lse), "{name}: reference");
    }
    // kv_len 0, or past the cache, is refused.
    let q = ctx.zeros::<f32>([1, 1, 1, 8]).unwrap();
    let k = ctx.zeros::<f32>([1, 1, 6, 8]).unwrap();
    for (kv_len, zero) in [(0, true), (7, false)] {
        let opts = AttentionOptions {
            kv_len: Some(kv_len),
            ..Default::default()
        };
        let r = ctx.attention(&q, &k, &k, None, &opts);
        let ok = match &r {
            Err(Error::InvalidOption(_)) => zero,
            Err(Error::Shape(m)) => !zero && m.contains("kv_len 7 is more than the 6"),
            _ => false,
        };
        assert!(ok, "kv_len {kv_len}: {:?}", r.err());
    }
}

/// A ragged batch: batch i of a KV cache of `n` positions filled to `kv_lens[i]`, NaN behind
/// (in k and v: a key read into a sum would show). Each batch's output and lse equal that batch
/// alone with `kv_len` = its length: bit for bit where both calls take the same kernel and the
/// same key splits (`exact`), else within the tolerance (the ragged call's splits follow the
/// longest length); the GPU matches the reference, and the reference of the ragged call equals
/// the reference of each batch alone exactly. Lengths 1, odd and prime, one batch at full
/// length; GQA and MQA; causal with m = 1 and m > 1 (rows that see no key: zeros, lse -inf);
/// boolean and additive masks; f32 and f16; bhsd and bshd; no, forced and auto key splits;
/// the few-rows and the register-blocked kernel.
#[test]
fn kv_lens_give_each_batch_its_own_keys() {
    let Some(ctx) = gpu() else { return };
    type MaskShape = fn(usize, usize, usize, usize) -> Vec<usize>;
    struct Ragged {
        layout: Layout,
        hq: usize,
        hkv: usize,
        m: usize,
        n: usize,
        lens: Vec<usize>,
        causal: bool,
        /// Mask shape from (b, hq, m, n), and whether it is additive.
        mask: Option<(MaskShape, bool)>,
        half: bool,
        split: Option<usize>,
        /// Both calls take the same kernel and key splits.
        exact: bool,
    }
    let cases = [
        // Decode, GQA, few-rows kernel without splits.
        Ragged {
            layout: Layout::Bhsd,
            hq: 4,
            hkv: 2,
            m: 1,
            n: 40,
            lens: vec![1, 7, 40, 13],
            causal: true,
            mask: None,
            half: false,
            split: None,
            exact: true,
        },
        // MQA, causal m = 3 (batch 1 of one key: rows 0 and 1 see nothing), a per-batch
        // boolean mask, f16, forced splits of 16 keys (splits past a batch's length).
        Ragged {
            layout: Layout::Bshd,
            hq: 4,
            hkv: 1,
            m: 3,
            n: 37,
            lens: vec![37, 1, 23],
            causal: true,
            mask: Some((|b, _, m, n| vec![b, 1, m, n], false)),
            half: true,
            split: Some(16),
            exact: true,
        },
        // Prefill on the register-blocked kernel, m > n_i for two batches: not causal, then
        // causal with a per-head mask.
        Ragged {
            layout: Layout::Bhsd,
            hq: 2,
            hkv: 2,
            m: 70,
            n: 129,
            lens: vec![1, 61, 129],
            causal: false,
            mask: None,
            half: false,
            split: None,
            exact: true,
        },
        Ragged {
            layout: Layout::Bshd,
            hq: 2,
            hkv: 1,
            m: 70,
            n: 129,
            lens: vec![129, 61, 1],
            causal: true,
            mask: Some((|_, hq, m, n| vec![1, hq, m, n], true)),
            half: false,
            split: None,
            exact: true,
        },
        // Auto key splits, sized by the longest batch (so other splits than alone), with an
        // additive mask broadcast over batches.
        Ragged {
            layout: Layout::Bhsd,
            hq: 4,
            hkv: 2,
            m: 2,
            n: 1100,
            lens: vec![1030, 257, 3],
            causal: false,
            mask: Some((|_, _, m, n| vec![m, n], true)),
            half: false,
            split: None,
            exact: false,
        },
        // Forced splits with more query rows than a tile: alone, the batch of 3 keys has one
        // split and takes the register-blocked kernel.
        Ragged {
            layout: Layout::Bshd,
            hq: 6,
            hkv: 3,
            m: 20,
            n: 50,
            lens: vec![50, 3, 29],
            causal: true,
            mask: None,
            half: true,
            split: Some(16),
            exact: false,
        },
    ];
    for r in cases {
        let b = r.lens.len();
        let d = 16;
        let mut c = Case::new(b, r.hq, r.hkv, r.m, r.n, d);
        c.opts.layout = r.layout;
        c.opts.causal = r.causal;
        c.opts.key_split = r.split;
        c.opts.kv_lens = Some(r.lens.clone());
        c.half = r.half;
        if let Some((shape, additive)) = r.mask {
            c.mask = Some((shape(b, r.hq, r.m, r.n), 0.7));
            c.additive = additive;
        }
        let name = format!(
            "{:?} h{}/{} m {} n {} kv_lens {:?} causal {} mask {:?} half {} split {:?}",
            r.layout,
            r.hq,
            r.hkv,
            r.m,
            r.n,
            r.lens,
            r.causal,
            c.mask.as_ref().map(|m| &m.0),
            r.half,
            r.split
        );
        let mut x = data(&c);
        // NaN past each batch's length, in k and v.
        let [_, ks, _] = c.shapes();
        let strides = |dim: usize| match r.layout {
            Layout::Bhsd => [r.hkv * r.n * dim, r.n * dim, dim],
            Layout::Bshd => [r.n * r.hkv * dim, dim, r.hkv * dim],
        };
        assert_eq!(ks.iter().product::<usize>(), x.k.len());
        for (bb, &len) in r.lens.iter().enumerate() {
            for h in 0..r.hkv {
                for j in len..r.n {
                    for (t, dim) in [(&mut x.k, c.d), (&mut x.v, c.dv)] {
                        let [sb, sh, sj] = strides(dim);
                        let at = bb * sb + h * sh + j * sj;
                        t[at..at + dim].fill(f32::NAN);
                    }
                }
            }
        }
        let (o, l) = run_gpu(ctx, &c, &x);
        assert!(
            o.iter().chain(&l).all(|a| !a.is_nan()),
            "{name}: a NaN past a batch's length reached the output"
        );
        let want = run_ref(&c, &x);
        assert_close(&c, &o, &l, &want);

        // Each batch alone, as the prefix of its cache with kv_len.
        let (qn, kn, vn) = (r.hq * r.m * d, r.hkv * r.n * d, r.hkv * r.n * c.dv);
        let (on, ln) = (r.hq * r.m * c.dv, r.hq * r.m);
        for (bb, &len) in r.lens.iter().enumerate() {
            let mut one = c.clone();
            one.b = 1;
            one.opts.kv_lens = None;
            one.opts.kv_len = Some(len);
            let mut y = Data {
                q: x.q[bb * qn..(bb + 1) * qn].to_vec(),
                k: x.k[bb * kn..(bb + 1) * kn].to_vec(),
                v: x.v[bb * vn..(bb + 1) * vn].to_vec(),
                mask: None,
                terms: None,
            };
            // The batch's mask (boolean and additive alike), cut to the first `len` keys: a
            // kv_len call's mask is [.., kv_len].
            if let (Some((shape, p)), Some(keep)) = (&c.mask, &x.mask) {
                let (s, kept) = cut_mask(shape, keep, bb, r.n, len);
                y.mask = Some(kept);
                y.terms = x.terms.as_ref().map(|t| cut_mask(shape, t, bb, r.n, len).1);
                one.mask = Some((s, *p));
            }
            let (o1, l1) = run_gpu(ctx, &one, &y);
            let (got_o, got_l) = (&o[bb * on..(bb + 1) * on], &l[bb * ln..(bb + 1) * ln]);
            let at = format!("{name}: batch {bb} of {len} keys");
            if r.exact {
                let bits = |v: &[f32]| v.iter().map(|a| a.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(got_o), bits(&o1), "{at}: output");
                assert_eq!(bits(got_l), bits(&l1), "{at}: lse");
            } else {
                let w1 = reference::AttentionOutput {
                    out: o1.iter().map(|&a| a as f64).collect(),
                    lse: l1.iter().map(|&a| a as f64).collect(),
                };
                assert_close(&one, got_o, got_l, &w1);
            }
            let r1 = run_ref(&one, &y);
            assert_eq!(
                (
                    &want.out[bb * on..(bb + 1) * on],
                    &want.lse[bb * ln..(bb + 1) * ln]
                ),
                (r1.out.as_slice(), r1.lse.as_slice()),
                "{at}: reference"
            );
        }
    }
}

/// Batch `bb`'s part of a mask of `shape` (all of it where batches share it), each row of `n`
/// keys cut to the first `len`, and its shape.
fn cut_mask<T: Copy>(
    shape: &[usize],
    vals: &[T],
    bb: usize,
    n: usize,
    len: usize,
) -> (Vec<usize>, Vec<T>) {
    let mut s = shape.to_vec();
    let part = if s.len() == 4 && s[0] > 1 {
        let per = vals.len() / s[0];
        s[0] = 1;
        &vals[bb * per..(bb + 1) * per]
    } else {
        vals
    };
    *s.last_mut().unwrap() = len;
    let cut = part
        .chunks(n)
        .flat_map(|row| &row[..len])
        .copied()
        .collect();
    (s, cut)
}

/// The reference with kv_lens against attention written out per batch (bhsd, GQA, causal or
/// not): batch i's softmax over its first kv_lens[i] keys, query j seeing key l iff
/// `l <= j + kv_lens[i] - m` under causality, zeros and lse -inf where no key is seen.
#[test]
fn reference_kv_lens_equals_naive_per_batch_attention() {
    let (b, hq, hkv, m, n, d) = (3, 4, 2, 5, 11, 6);
    let lens = [11, 2, 7];
    let q = random(b * hq * m * d, 31, -1.0, 1.0);
    let k = random(b * hkv * n * d, 32, -1.0, 1.0);
    let v = random(b * hkv * n * d, 33, -1.0, 1.0);
    for causal in [false, true] {
        let opts = AttentionOptions {
            causal,
            kv_lens: Some(lens.to_vec()),
            ..Default::default()
        };
        let got = reference::attention(
            (&q, &[b, hq, m, d]),
            (&k, &[b, hkv, n, d]),
            (&v, &[b, hkv, n, d]),
            None,
            &opts,
        )
        .unwrap();
        // The default scale, 1/sqrt(d), as the f32 the options hold.
        let scale = (1.0 / (d as f32).sqrt()) as f64;
        let mut empty_rows = 0;
        for bi in 0..b {
            for h in 0..hq {
                let hk = h / (hq / hkv);
                for i in 0..m {
                    let row = (bi * hq + h) * m + i;
                    let seen: Vec<usize> = (0..lens[bi])
                        .filter(|&j| !causal || j + m <= i + lens[bi])
                        .collect();
                    let s: Vec<f64> = seen
                        .iter()
                        .map(|&j| {
                            scale
                                * (0..d)
                                    .map(|c| {
                                        q[row * d + c] as f64
                                            * k[((bi * hkv + hk) * n + j) * d + c] as f64
                                    })
                                    .sum::<f64>()
                        })
                        .collect();
                    let o = &got.out[row * d..(row + 1) * d];
                    if seen.is_empty() {
                        empty_rows += 1;
                        assert!(o.iter().all(|&a| a == 0.0), "row {row}: zeros");
                        assert_eq!(got.lse[row], f64::NEG_INFINITY, "row {row}: lse");
                        continue;
                    }
                    let mx = s.iter().cloned().fold(f64::MIN, f64::max);
                    let sum: f64 = s.iter().map(|x| (x - mx).exp()).sum();
                    assert!(
                        (got.lse[row] - (mx + sum.ln())).abs() < 1e-12,
                        "row {row}: lse"
                    );
                    for c in 0..d {
                        let want: f64 = seen
                            .iter()
                            .zip(&s)
                            .map(|(&j, x)| {
                                (x - mx).exp() / sum * v[((bi * hkv + hk) * n + j) * d + c] as f64
                            })
                            .sum();
                        assert!((o[c] - want).abs() < 1e-12, "row {row} col {c}");
                    }
                }
            }
        }
        // Causal: batch 1 (2 keys, 5 queries) has rows 0..3 without a key, in every head.
        assert_eq!(empty_rows, if causal { 3 * hq } else { 0 });
    }
}

/// kv_lens that do not fit the call: clear errors naming the values, on the GPU and in the
/// reference alike.
#[test]
fn kv_lens_bad_input_is_an_error() {
    let q = [3, 2, 1, 8];
    let kv = [3, 1, 6, 8];
    let opts = |lens: &[usize]| AttentionOptions {
        kv_lens: Some(lens.to_vec()),
        ..Default::default()
    };
    assert!(attention_shape(&q, &kv, &kv, None, &opts(&[1, 6, 3])).is_ok());
    let err = |o: &AttentionOptions, mask: Option<&[usize]>| {
        attention_shape(&q, &kv, &kv, mask, o)
            .map(|_| ())
            .unwrap_err()
    };
    let has = |e: Error, s: &str| e.to_string().contains(s);
    let e = err(&opts(&[1, 0, 3]), None);
    assert!(matches!(e, Error::InvalidOption(_)) && has(e, "kv_lens[1] is 0"));
    let e = err(&opts(&[1, 7, 3]), None);
    assert!(matches!(e, Error::Shape(_)) && has(e, "kv_lens[1] = 7 is more than the 6"));
    let e = err(&opts(&[1, 6]), None);
    assert!(
        matches!(e, Error::Shape(_)) && has(e, "kv_lens has 2 lengths ([1, 6]) for a batch of 3")
    );
    let e = err(&opts(&[]), None);
    assert!(matches!(e, Error::InvalidOption(_)) && has(e, "kv_lens is empty"));
    let both = AttentionOptions {
        kv_len: Some(4),
        ..opts(&[1, 2, 3])
    };
    let e = err(&both, None);
    assert!(matches!(e, Error::InvalidOption(_)) && has(e, "exclusive"));
    // The mask keeps k's positions as its last axis, not the longest length.
    assert!(attention_shape(&q, &kv, &kv, Some(&[1, 6]), &opts(&[1, 5, 3])).is_ok());
    let e = err(&opts(&[1, 5, 3]), Some(&[1, 5]));
    assert!(matches!(e, Error::Shape(_)) && has(e, "with kv_lens, n is k's positions"));
    // The reference refuses the same way.
    let z = vec![0.0f32; 3 * 6 * 8];
    let r = reference::attention(
        (&z[..3 * 2 * 8], &q),
        (&z, &kv),
        (&z, &kv),
        None,
        &opts(&[1, 6]),
    );
    assert!(matches!(r, Err(Error::Shape(_))));

    let Some(ctx) = gpu() else { return };
    let (qt, kt) = (ctx.zeros::<f32>(q).unwrap(), ctx.zeros::<f32>(kv).unwrap());
    for lens in [&[1, 0, 3][..], &[1, 7, 3], &[1, 6]] {
        assert!(
            ctx.attention(&qt, &kt, &kt, None, &opts(lens)).is_err(),
            "{lens:?}"
        );
        // A 0 is refused with the options; the others with the shapes.
        assert_eq!(Attention::new(ctx, &opts(lens)).is_err(), lens.contains(&0));
    }
    // More batches than the lengths' uniform holds.
    let big = seq_kernels::kernels::attention::MAX_KV_LENS + 1;
    let qb = ctx.zeros::<f32>([big, 1, 1, 4]).unwrap();
    let r = ctx.attention(&qb, &qb, &qb, None, &opts(&vec![1; big]));
    assert!(
        matches!(r, Err(Error::LimitExceeded { needed, max, .. }) if needed == big as u64 && max == big as u64 - 1),
        "{:?}",
        r.err()
    );
    // A device whose uniform bindings cannot hold the lengths' 16 KiB: a limit error, for
    // every attention call (the kernels declare the binding), whose advice is a larger limit
    // (smaller calls bind the same 16 KiB).
    let small = common::limited_device(|l| l.max_uniform_buffer_binding_size = 4096);
    let t = small.zeros::<f32>([1, 1, 2, 8]).unwrap();
    let r = small.attention(&t, &t, &t, None, &AttentionOptions::default());
    assert!(
        matches!(
            &r,
            Err(Error::LimitExceeded {
                limit: "max_uniform_buffer_binding_size",
                ..
            })
        ),
        "{:?}",
        r.err()
    );
    let msg = r.unwrap_err().to_string();
    assert!(
        !msg.contains("split") && msg.contains("create the device with a larger"),
        "{msg}"
    );
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
        terms: None,
    };
    let (o2, _) = run_gpu(ctx, &c2, &x2);
    assert_eq!(o, o2, "GQA must equal attention over repeated kv heads");
}

#[test]
fn matmul_matches_reference() {
    let Some(ctx) = gpu() else { return };
    // Blocks of 64 x 64 with partial last ones, depths not a multiple of the 16-deep steps.
    for &(m, k, n) in &[(1, 1, 1), (17, 70, 33), (64, 130, 65), (129, 20, 130)] {
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
        // f16 storage (widened where the device lacks SHADER_F16) against the f64 product of
        // the f16-rounded inputs.
        let h = |x: &[f32]| x.iter().map(|&a| f16::from_f32(a)).collect::<Vec<_>>();
        let (ha, hbt) = (h(&a), h(&bt));
        let want: Vec<f64> = (0..m * n)
            .map(|x| {
                (0..k)
                    .map(|e| ha[(x / n) * k + e].to_f64() * hbt[(x % n) * k + e].to_f64())
                    .sum()
            })
            .collect();
        let ga = ctx.upload(&ha, [m, k]).unwrap();
        let gbt = ctx.upload(&hbt, [n, k]).unwrap();
        let c: Vec<f32> = ctx
            .matmul(&ga, &gbt, true)
            .unwrap()
            .download()
            .unwrap()
            .iter()
            .map(|a| a.to_f32())
            .collect();
        let err = row_error(&c, &want, n);
        assert!(err <= TOL_F16, "f16 {m}x{k}x{n}: {err:e}");
    }
}

#[test]
fn bad_input_is_an_error() {
    let o = AttentionOptions::default();
    let q = [1, 4, 5, 8];
    let kv = [1, 2, 7, 8];
    assert!(attention_shape(&q, &kv, &kv, None, &o).is_ok());
    let shape_err = |r: Result<_, Error>| matches!(r, Err(Error::Shape(_)));
    // Element counts past usize: an error, not strides wrapped to 0.
    let g = 1usize << 32;
    let wide = [1, g, g, 1];
    assert!(shape_err(attention_shape(&wide, &wide, &wide, None, &o)));
    let tall = [1, 1, g, 1];
    assert!(shape_err(attention_shape(
        &tall,
        &tall,
        &tall,
        Some(&[1, 1, g, g]),
        &o
    )));
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
    let dir = common::scratch_dir("attention");
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
    // The f32-storage tolerance (the CPU side is the f64 reference rounded to f32).
    assert!(row_error(&go, &want, 8) <= TOL_F32);
    let (ls, lg) = load("lg.npy");
    let (_, lc) = load("lc.npy");
    assert_eq!(ls, vec![1, 4, 5]);
    for (a, b) in lg.iter().zip(&lc) {
        assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "lse {a} vs {b}");
    }
    // A float mask is additive: GPU against CPU, and the terms change the answer.
    let terms: Vec<f32> = random(45, 4, -3.0, 3.0)
        .into_iter()
        .map(|t| if t < -2.0 { f32::NEG_INFINITY } else { t })
        .collect();
    save("mask.npy", &[5, 9], &terms);
    let m = arg("mask");
    let g = run(&["--in", &m], "omg.npy", "lmg.npy");
    assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
    let c = run(&["--in", &m, "--cpu"], "omc.npy", "lmc.npy");
    assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stderr));
    let (_, gm) = load("omg.npy");
    let (_, cm) = load("omc.npy");
    let want: Vec<f64> = cm.iter().map(|&x| x as f64).collect();
    assert!(row_error(&gm, &want, 8) <= TOL_F32);
    assert!(
        row_error(&go, &want, 8) > 1e-2,
        "the additive mask must change the output"
    );
    // layout=bshd: the same tensors with seq and heads swapped give the same output, swapped.
    let swap = |x: &[f32], [h, n, d]: [usize; 3]| -> Vec<f32> {
        (0..n * h * d)
            .map(|i| {
                let (t, hh, e) = (i / (h * d), (i / d) % h, i % d);
                x[(hh * n + t) * d + e]
            })
            .collect()
    };
    save(
        "q.npy",
        &[1, 5, 4, 16],
        &swap(&random(320, 1, -1.0, 1.0), [4, 5, 16]),
    );
    save(
        "k.npy",
        &[1, 9, 2, 16],
        &swap(&random(288, 2, -1.0, 1.0), [2, 9, 16]),
    );
    save(
        "v.npy",
        &[1, 9, 2, 8],
        &swap(&random(144, 3, -1.0, 1.0), [2, 9, 8]),
    );
    for device in [&[][..], &["--cpu"][..]] {
        let g = run(
            &[&["--set", "layout=bshd"][..], device].concat(),
            "os.npy",
            "ls.npy",
        );
        assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
        let (shape, os) = load("os.npy");
        assert_eq!(shape, vec![1, 5, 4, 8]);
        let bhsd: Vec<f64> = go.iter().map(|&x| x as f64).collect();
        // Back to [b, h, s, d] (swap of [s, h] axes is its own inverse with h and n swapped).
        assert!(
            row_error(&swap(&os, [5, 4, 8]), &bhsd, 8) <= TOL_F32,
            "{device:?}"
        );
        assert_eq!(load("ls.npy").0, vec![1, 4, 5]);
    }
    let bad = run(&["--set", "layout=sbhd", "--cpu"], "ob.npy", "lb.npy");
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("expected bhsd or bshd"));
    // v with another length than k: exit 2 and one line naming the problem.
    save("q.npy", &[1, 4, 5, 16], &random(320, 1, -1.0, 1.0));
    save("k.npy", &[1, 2, 9, 16], &random(288, 2, -1.0, 1.0));
    save("v.npy", &[1, 2, 8, 8], &random(128, 3, -1.0, 1.0));
    let bad = run(&["--cpu"], "ob.npy", "lb.npy");
    let msg = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2), "{msg}");
    assert!(msg.contains("v [1, 2, 8, 8]"), "{msg}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `seqk run attention --set kv_lens=3,7,5`: a ragged batch on .npy files, GPU against
/// `--cpu`, each batch equal to its prefix alone with `kv_len`; a list that does not parse,
/// or of another count than the batch, is a one-line usage error (exit code 2).
#[cfg(feature = "cli")]
#[test]
fn seqk_run_attention_kv_lens() {
    use common::{load_npy, save_npy};
    let Some(_) = gpu() else { return };
    let dir = common::scratch_dir("attention-kv-lens");
    let (b, hq, hkv, n, d) = (3usize, 4usize, 2usize, 7usize, 8usize);
    let q = random(b * hq * d, 41, -1.0, 1.0);
    let mut k = random(b * hkv * n * d, 42, -1.0, 1.0);
    let mut v = random(b * hkv * n * d, 43, -1.0, 1.0);
    let lens = [3usize, 7, 5];
    // NaN past each batch's length: never read.
    for (bb, &len) in lens.iter().enumerate() {
        for h in 0..hkv {
            let row = (bb * hkv + h) * n;
            k[(row + len) * d..(row + n) * d].fill(f32::NAN);
            v[(row + len) * d..(row + n) * d].fill(f32::NAN);
        }
    }
    let p = |f: &str| dir.join(f).display().to_string();
    let u = |x: usize| x as u64;
    save_npy(&dir.join("q.npy"), &[u(b), u(hq), 1, u(d)], &q);
    save_npy(&dir.join("k.npy"), &[u(b), u(hkv), u(n), u(d)], &k);
    save_npy(&dir.join("v.npy"), &[u(b), u(hkv), u(n), u(d)], &v);
    let run = |prefix: &str, set: &str, cpu: bool| {
        let (qa, ka, va) = (
            format!("q={}", p(&format!("{prefix}q.npy"))),
            format!("k={}", p(&format!("{prefix}k.npy"))),
            format!("v={}", p(&format!("{prefix}v.npy"))),
        );
        let out = p(&format!("{prefix}o{cpu}.npy"));
        let mut args = vec!["run", "attention", "--in", &qa, "--in", &ka, "--in", &va];
        args.extend(["--out", &out, "--set", set, "--set", "causal=true"]);
        if cpu {
            args.push("--cpu");
        }
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_seqk"))
            .args(&args)
            .output()
            .unwrap();
        (o, out)
    };
    let mut outs = Vec::new();
    for cpu in [false, true] {
        let (o, out) = run("", "kv_lens=3,7,5", cpu);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let (shape, y) = load_npy::<f32>(std::path::Path::new(&out));
        assert_eq!(shape, vec![u(b), u(hq), 1, u(d)]);
        assert!(y.iter().all(|a| a.is_finite()), "cpu {cpu}: {y:?}");
        outs.push(y);
    }
    let want: Vec<f64> = outs[1].iter().map(|&x| x as f64).collect();
    // The f32-storage tolerance (the CPU side is the f64 reference rounded to f32).
    assert!(row_error(&outs[0], &want, d) <= TOL_F32);
    // Batch 2 alone with kv_len = 5 (its cache's NaN tail cut off the same way): the same rows.
    let (qn, kn) = (hq * d, hkv * n * d);
    save_npy(&dir.join("2q.npy"), &[1, u(hq), 1, u(d)], &q[2 * qn..]);
    save_npy(&dir.join("2k.npy"), &[1, u(hkv), u(n), u(d)], &k[2 * kn..]);
    save_npy(&dir.join("2v.npy"), &[1, u(hkv), u(n), u(d)], &v[2 * kn..]);
    let (o, out) = run("2", "kv_len=5", false);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        load_npy::<f32>(std::path::Path::new(&out)).1,
        &outs[0][2 * qn..]
    );
    for (set, says) in [
        ("kv_lens=3,x,5", "cannot parse \"x\""),
        ("kv_lens=3,7", "kv_lens has 2 lengths"),
        ("kv_lens=3,0,5", "kv_lens[1] is 0"),
        ("kv_lens=3,8,5", "kv_lens[1] = 8 is more than the 7"),
    ] {
        let (o, _) = run("", set, true);
        let msg = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{set}: {msg}");
        assert!(
            msg.contains(says) && msg.lines().count() == 1,
            "{set}: {msg}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
