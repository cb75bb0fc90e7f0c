//! Exact attention, `O = softmax(scale * Q K^T [softcap] + mask) V` per (batch, head),
//! computed FlashAttention-2 style, plus a plain matmul on the same block products
//! (`shaders/gemm.wgsl`).
//!
//! - Shapes: q `[b, hq, m, d]`, k `[b, hkv, n, d]`, v `[b, hkv, n, dv]`, out `[b, hq, m, dv]`;
//!   with [`Layout::Bshd`] q `[b, m, hq, d]`, k `[b, n, hkv, d]`, v `[b, n, hkv, dv]`,
//!   out `[b, m, hq, dv]`. `hq % hkv == 0` (GQA/MQA: query head h reads kv head
//!   `h / (hq / hkv)`); d and dv up to 256. The optional lse is `[b, hq, m]`.
//! - Options: `scale` (default `1/sqrt(d)`), `causal` with bottom-right alignment (query i sees
//!   key j iff `j <= i + (n - m)`; PyTorch SDPA's `is_causal` is top-left aligned when m != n),
//!   `softcap` c (`S = c tanh(S / c)`, 0 = off), `kv_len` (decode against a preallocated KV
//!   cache: only its first `kv_len` positions are keys, and only they are read, so a step
//!   costs what the filled part does, except where f16 is widened; see the option), and
//!   `kv_lens` for a ragged batch (batch i's keys are its first `kv_lens[i]` positions, causal
//!   alignment per batch; each workgroup reads and scores its own batch's keys only).
//! - Mask [`AttnMask`], `[m|1, n]` or `[b|1, 1|hq, m|1, n]` (1 = the same for every batch,
//!   head or query: `[b, 1, 1, n]` is a key-padding mask): boolean (a nonzero byte keeps the
//!   key) or additive (f32, added to the soft-capped scores; -inf hides the key).
//! - Rows without any valid key give zeros and lse = -inf. A hidden key's value is never
//!   read into a sum, so junk (NaN, inf) in masked slots of a KV cache stays out.
//! - Calls with more query rows than one tile (prefill): one workgroup of 256 invocations per
//!   (batch, head, 64 query rows) computes S = Q K^T and O += P V 64 keys at a time with the
//!   register-blocked block products of `shaders/gemm.wgsl` (each invocation a 4 x 4
//!   micro-block), the online softmax in registers and row maxima and sums met in workgroup
//!   memory. Key blocks entirely above the causal diagonal are never visited.
//! - Fewer query rows, or key splits: one workgroup of 256 invocations per (batch, kv head,
//!   tile of 16 query rows, 8 for d > 128) scores 64 keys at a time, all at once, and folds
//!   them into each row's online softmax. A tile's rows are the query rows of every head of
//!   the kv head's GQA group, packed, so K and V are read once for the group. Decode shapes
//!   (few queries, many keys) split the keys across workgroups and merge the partial
//!   (m, l, O) triples in a second pass.
//! - Storage f32 or f16 (native with `SHADER_F16`, else widened to an f32 scratch);
//!   accumulation f32.
//!
//! ```
//! use seq_kernels::{AttentionOptions, AttnMask, Context};
//! # if seq_kernels::context::skip_example_without_adapter() { return Ok(()); }
//! let ctx = Context::new()?;
//! let (b, h, m, n, d) = (1, 2, 5, 7, 64);
//! let q = ctx.upload(&vec![0.1f32; b * h * m * d], [b, h, m, d])?;
//! let k = ctx.upload(&vec![0.2f32; b * h * n * d], [b, h, n, d])?;
//! let v = ctx.upload(&vec![0.3f32; b * h * n * d], [b, h, n, d])?;
//! let o = ctx.attention(&q, &k, &v, None, &AttentionOptions { causal: true, ..Default::default() })?;
//! assert_eq!(o.shape(), &[b, h, m, d]);
//! // An additive mask: the last key hidden from every query, a term of 0.5 on the others.
//! let terms: Vec<f32> = (0..m * n)
//!     .map(|e| if e % n == n - 1 { f32::NEG_INFINITY } else { 0.5 })
//!     .collect();
//! let terms = ctx.upload(&terms, [m, n])?;
//! let o = ctx.attention(&q, &k, &v, Some(AttnMask::Add(&terms)), &Default::default())?;
//! // One new query against a cache of 7 positions of which 4 are filled.
//! let q1 = ctx.upload(&vec![0.1f32; b * h * d], [b, h, 1, d])?;
//! let step = AttentionOptions { kv_len: Some(4), causal: true, ..Default::default() };
//! let o1 = ctx.attention(&q1, &k, &v, None, &step)?;
//! // A ragged batch of 3 sequences in a cache of 7 positions, filled to 3, 7 and 5.
//! let q3 = ctx.upload(&vec![0.1f32; 3 * h * d], [3, h, 1, d])?;
//! let k3 = ctx.upload(&vec![0.2f32; 3 * h * n * d], [3, h, n, d])?;
//! let v3 = ctx.upload(&vec![0.3f32; 3 * h * n * d], [3, h, n, d])?;
//! let ragged = AttentionOptions { kv_lens: Some(vec![3, 7, 5]), causal: true, ..Default::default() };
//! let o3 = ctx.attention(&q3, &k3, &v3, None, &ragged)?;
//! // Every value is 0.3, and attention weights sum to 1: so is every output.
//! for o in [o, o1, o3] {
//!     assert!(o.download()?.iter().all(|&y| (y - 0.3).abs() < 1e-6));
//! }
//! # Ok::<(), seq_kernels::Error>(())
//! ```

use crate::context::Context;
use crate::convert::Storage;
use crate::dispatch::{check_binding, check_call_tensors, sub_binding, CallTensor, Plan, Step};
use crate::error::{Error, Result};
use crate::shader::{compose, elem_header, ShaderVariant, GEMM_BLOCK, GEMM_WGSL, GRID_WGSL};
use crate::tensor::{data_binding, require_float, shape_elements, DType, Element, GpuTensor};

const SOURCE: &str = include_str!("../../shaders/attention.wgsl");

/// Padded head-dimension buckets; each (d, dv) bucket pair is a shader variant.
const DIMS: [u32; 6] = [32, 64, 96, 128, 192, 256];
/// Largest head dimension.
pub const MAX_HEAD_DIM: usize = 256;
/// Invocations of a workgroup of the split merge.
const WG: u32 = 64;

/// Each named tensor of `len` elements, as the shader binds it (f32 scratch for widened
/// f16), fits one storage binding and u32 element indices.
fn check_tensors(ctx: &Context, storage: Storage, tensors: &[(&str, usize)]) -> Result<()> {
    let size = storage.shader_dtype().size() as u64;
    for &(name, len) in tensors {
        check_binding(ctx, name, len as u64 * size, size)?;
    }
    Ok(())
}

const FLAG_CAUSAL: u32 = 1;
const FLAG_MASK: u32 = 2;
const FLAG_LSE: u32 = 4;
const FLAG_ADDITIVE: u32 = 8;
const FLAG_MATMUL_NN: u32 = 16;
const FLAG_KV_LENS: u32 = 32;

/// Most batches of a call with [`AttentionOptions::kv_lens`]: the lengths travel in a uniform
/// binding of 16 KiB (the least `max_uniform_buffer_binding_size` of wgpu's limit sets, the
/// WebGL2 downlevel one).
pub const MAX_KV_LENS: usize = 4096;
/// Bytes of the lengths' uniform binding (`kv_lens` in shaders/attention.wgsl).
const KV_LENS_BYTES: u64 = MAX_KV_LENS as u64 * 4;

/// The mask of an attention call, `[m|1, n]` or `[b|1, 1|hq, m|1, n]` (a dimension of 1 is
/// broadcast).
#[derive(Clone, Copy, Debug)]
pub enum AttnMask<'a> {
    /// Boolean: a nonzero byte keeps the key.
    Keep(&'a GpuTensor<u8>),
    /// Additive, f32 whatever the storage of q, k and v: added to the scores after the scale
    /// and the soft cap. -inf hides the key as a false boolean would (its row gives zeros if
    /// every key is hidden); every other value must be finite.
    Add(&'a GpuTensor<f32>),
}

impl<'a> From<&'a GpuTensor<u8>> for AttnMask<'a> {
    fn from(t: &'a GpuTensor<u8>) -> Self {
        Self::Keep(t)
    }
}

impl<'a> From<&'a GpuTensor<f32>> for AttnMask<'a> {
    fn from(t: &'a GpuTensor<f32>) -> Self {
        Self::Add(t)
    }
}

impl<'a> AttnMask<'a> {
    /// The context of the mask's tensor.
    pub fn context(&self) -> &'a Context {
        match self {
            Self::Keep(t) => t.context(),
            Self::Add(t) => t.context(),
        }
    }
    /// The mask's shape.
    pub fn shape(&self) -> &'a [usize] {
        match self {
            Self::Keep(t) => t.shape(),
            Self::Add(t) => t.shape(),
        }
    }
    fn buffer(&self) -> &wgpu::Buffer {
        match self {
            Self::Keep(t) => t.buffer(),
            Self::Add(t) => t.buffer(),
        }
    }
    fn named(&self, name: &'a str) -> CallTensor<'a> {
        match self {
            Self::Keep(t) => t.named(name),
            Self::Add(t) => t.named(name),
        }
    }
    fn bytes(&self) -> u64 {
        match self {
            Self::Keep(t) => t.bytes(),
            Self::Add(t) => t.bytes(),
        }
    }
}

/// Host values of a mask for the CPU reference, laid out as [`AttnMask`].
#[derive(Clone, Copy, Debug)]
pub enum HostMask<'a> {
    /// true keeps the key.
    Keep(&'a [bool]),
    /// Added to the scores; -inf hides the key.
    Add(&'a [f32]),
}

impl HostMask<'_> {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            Self::Keep(v) => v.len(),
            Self::Add(v) => v.len(),
        }
    }
    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Memory layout of q, k, v and the output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Layout {
    /// `[batch, heads, seq, dim]`.
    #[default]
    Bhsd,
    /// `[batch, seq, heads, dim]`.
    Bshd,
}

/// `bhsd` or `bshd`.
impl std::str::FromStr for Layout {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "bhsd" => Ok(Self::Bhsd),
            "bshd" => Ok(Self::Bshd),
            _ => Err(Error::option(format!(
                "unknown attention layout {s:?}; expected bhsd or bshd"
            ))),
        }
    }
}

/// Options of exact attention.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AttentionOptions {
    /// Multiplies `Q K^T`; `None` means `1 / sqrt(d)`.
    pub scale: Option<f32>,
    /// Bottom-right causal masking: query i sees key j iff `j <= i + (n - m)`.
    pub causal: bool,
    /// Soft cap c > 0: scores become `c tanh(s / c)` (after scaling); 0 = off.
    pub softcap: f32,
    /// Layout of q, k, v and the output.
    pub layout: Layout,
    /// Keys per workgroup when the keys are split across workgroups (rounded up to a multiple
    /// of 16, of 8 for d > 128). `None` chooses: split only for decode shapes (m <= 4,
    /// n >= 1024; with `kv_lens`, n is the longest length), into about 2048 workgroups of at
    /// least 256 keys.
    pub key_split: Option<usize>,
    /// Attend to the first `kv_len` positions of k and v only: a preallocated KV cache filled
    /// that far. The call then has n = `kv_len` keys (causal alignment, mask shapes `[..,
    /// kv_len]`, work) and the positions past it are never read by the kernel. Two costs still
    /// follow the whole cache: k and v are bound whole (each must fit one storage binding),
    /// and on devices without `SHADER_F16` f16 k and v are widened whole every call.
    /// `None`: all of k's positions.
    pub kv_len: Option<usize>,
    /// A ragged batch: batch `i` attends to the first `kv_lens[i]` positions of its k and v
    /// only (flash-attn's `cache_seqlens`: batched decode over a preallocated KV cache, each
    /// sequence filled to its own length). One length per batch, each in 1..= k's positions;
    /// not together with `kv_len` (set one or the other). With it, batch i has
    /// `n_i = kv_lens[i]` keys: causal alignment is per batch (query j of m sees key l iff
    /// `l <= j + (n_i - m)`), keys at or past `n_i` are hidden, and a query that sees no key
    /// gives zeros and lse -inf. Masks keep k's positions as their last axis (`[.., n]`).
    /// m is the same for every batch: in a chunked prefill where a sequence brings fewer new
    /// tokens than m, put them in its last rows (bottom-right alignment) and ignore the
    /// outputs of the rows before them.
    ///
    /// What it skips and costs: each workgroup reads and scores only its batch's `n_i` keys,
    /// so the scoring work is that of the filled parts, not b times the longest; the
    /// positions past `n_i` are never read into a sum. Key splits are sized by the longest
    /// length, so decode launches the longest length's workgroups for every batch: those
    /// wholly past a batch's length score nothing but still load their query tile and write
    /// an empty partial, and the merge reads every split's partial. The lengths are fixed when
    /// the plan is made (like `kv_len`), so a decode loop whose lengths grow makes a plan per
    /// step. They travel in a 16 KiB uniform buffer (at most [`MAX_KV_LENS`] batches), and k
    /// and v are bound (and, without `SHADER_F16`, widened from f16) whole, as with `kv_len`.
    /// `None`: every batch has n keys.
    pub kv_lens: Option<Vec<usize>>,
}

impl AttentionOptions {
    /// Checks the options' values.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidOption`] if `scale` is given and not finite, `softcap` is not finite
    /// and >= 0, `key_split` or `kv_len` is `Some(0)`, `kv_lens` is empty or holds a 0, or
    /// both `kv_len` and `kv_lens` are set. (Their count against the batch and their values
    /// against k's positions are checked with the shapes.)
    pub fn validate(&self) -> Result<()> {
        if let Some(s) = self.scale {
            if !s.is_finite() {
                return Err(Error::option(format!(
                    "attention scale must be finite, got {s}"
                )));
            }
        }
        if !(self.softcap >= 0.0 && self.softcap.is_finite()) {
            return Err(Error::option(format!(
                "attention softcap must be finite and >= 0 (0 = off), got {}",
                self.softcap
            )));
        }
        if self.key_split == Some(0) {
            return Err(Error::option("attention key_split must be at least 1"));
        }
        if self.kv_len == Some(0) {
            return Err(Error::option("attention kv_len must be at least 1"));
        }
        if let Some(lens) = &self.kv_lens {
            if let Some(n) = self.kv_len {
                return Err(Error::option(format!(
                    "attention kv_len ({n}) and kv_lens ({lens:?}) are exclusive: set kv_lens \
                     alone (a length per batch) or kv_len alone (one for every batch)"
                )));
            }
            if lens.is_empty() {
                return Err(Error::option(
                    "attention kv_lens is empty; give one length per batch",
                ));
            }
            if let Some(i) = lens.iter().position(|&l| l == 0) {
                return Err(Error::option(format!(
                    "attention kv_lens[{i}] is 0 (kv_lens {lens:?}); every length must be at \
                     least 1"
                )));
            }
        }
        Ok(())
    }
}

/// Element strides of a `[.., .., .., dim]` tensor in (batch, head, position) order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Strides {
    /// Between batches.
    pub batch: usize,
    /// Between heads.
    pub head: usize,
    /// Between positions.
    pub row: usize,
}

impl Strides {
    fn new(layout: Layout, heads: usize, seq: usize, dim: usize) -> Self {
        match layout {
            Layout::Bhsd => Self {
                batch: heads * seq * dim,
                head: seq * dim,
                row: dim,
            },
            Layout::Bshd => Self {
                batch: seq * heads * dim,
                head: dim,
                row: heads * dim,
            },
        }
    }
    /// Flat index of element `c` of position `i` of head `h` of batch `b`.
    pub fn index(&self, b: usize, h: usize, i: usize, c: usize) -> usize {
        b * self.batch + h * self.head + i * self.row + c
    }
}

/// The geometry of an attention call, checked once for the GPU and the CPU reference.
#[derive(Clone, Debug, PartialEq)]
pub struct AttnShape {
    /// Batch.
    pub b: usize,
    /// Query heads.
    pub hq: usize,
    /// Key/value heads.
    pub hkv: usize,
    /// Query heads per kv head.
    pub group: usize,
    /// Queries.
    pub m: usize,
    /// Positions of k and v the call spans: `kv_len`, else k's positions. The mask's last
    /// axis; each batch's keys are a prefix of them, [`AttnShape::keys`].
    pub n: usize,
    /// Keys of each batch (`kv_lens`, each at most n); `None`: n for every batch.
    pub kv_lens: Option<Vec<usize>>,
    /// Head dimension of q and k.
    pub d: usize,
    /// Head dimension of v and the output.
    pub dv: usize,
    /// The effective scale.
    pub scale: f32,
    /// Strides of q.
    pub q: Strides,
    /// Strides of k.
    pub k: Strides,
    /// Strides of v.
    pub v: Strides,
    /// Strides of the output.
    pub o: Strides,
    /// Mask strides between batches, heads and query rows (0 where broadcast).
    pub mask_batch: usize,
    /// See `mask_batch`.
    pub mask_head: usize,
    /// See `mask_batch`: n, or 0 for a mask with one row for every query.
    pub mask_row: usize,
    /// Whether the causal option is on.
    pub causal: bool,
}

impl AttnShape {
    /// Output shape in the call's layout.
    pub fn out_shape(&self, layout: Layout) -> Vec<usize> {
        match layout {
            Layout::Bhsd => vec![self.b, self.hq, self.m, self.dv],
            Layout::Bshd => vec![self.b, self.m, self.hq, self.dv],
        }
    }
    /// Keys of batch `b`: the first `keys(b)` positions of its k and v.
    pub fn keys(&self, b: usize) -> usize {
        self.kv_lens.as_ref().map_or(self.n, |l| l[b])
    }
    /// Keys of the longest batch.
    pub fn max_keys(&self) -> usize {
        self.kv_lens
            .as_ref()
            .map_or(self.n, |l| l.iter().copied().max().unwrap_or(0))
    }
    /// What the mask adds to the score of query i and key j of (batch b, head h), or `None`
    /// where the key is hidden from the query (past the batch's keys, causality, a false
    /// boolean, an additive -inf). `mask` is laid out as the validated mask shape.
    pub fn mask_term(
        &self,
        b: usize,
        h: usize,
        i: usize,
        j: usize,
        mask: Option<HostMask<'_>>,
    ) -> Option<f64> {
        // Bottom-right causal alignment against the batch's own keys.
        let n = self.keys(b);
        if j >= n || (self.causal && j as i64 > i as i64 + n as i64 - self.m as i64) {
            return None;
        }
        let e = b * self.mask_batch + h * self.mask_head + i * self.mask_row + j;
        match mask {
            None => Some(0.0),
            Some(HostMask::Keep(keep)) => keep[e].then_some(0.0),
            Some(HostMask::Add(add)) => (add[e] != f32::NEG_INFINITY).then_some(add[e] as f64),
        }
    }
}

/// Checks q, k, v (and mask) shapes against each other and the options.
pub fn attention_shape(
    q: &[usize],
    k: &[usize],
    v: &[usize],
    mask: Option<&[usize]>,
    opts: &AttentionOptions,
) -> Result<AttnShape> {
    opts.validate()?;
    for (name, s) in [("q", q), ("k", k), ("v", v)] {
        if s.len() != 4 || s.contains(&0) {
            return Err(Error::shape(format!(
                "attention {name} must have 4 non-zero axes ({}), got {s:?}",
                match opts.layout {
                    Layout::Bhsd => "[b, heads, seq, dim]",
                    Layout::Bshd => "[b, seq, heads, dim]",
                }
            )));
        }
        shape_elements(format_args!("attention {name}"), s)?;
    }
    if let Some(ms) = mask {
        shape_elements("attention mask", ms)?;
    }
    // (batch, heads, seq, dim)
    let split = |s: &[usize]| match opts.layout {
        Layout::Bhsd => (s[0], s[1], s[2], s[3]),
        Layout::Bshd => (s[0], s[2], s[1], s[3]),
    };
    let (b, hq, m, d) = split(q);
    // `cache` positions are stored; the call reads the first n of them.
    let (bk, hkv, cache, dk) = split(k);
    let (bv, hv, nv, dv) = split(v);
    if bk != b || bv != b {
        return Err(Error::shape(format!(
            "attention batch sizes differ: q {q:?}, k {k:?}, v {v:?}"
        )));
    }
    if dk != d {
        return Err(Error::shape(format!(
            "attention k head dim {dk} must equal q's {d} (q {q:?}, k {k:?})"
        )));
    }
    if hv != hkv || nv != cache {
        return Err(Error::shape(format!(
            "attention v {v:?} must have the heads and length of k {k:?}"
        )));
    }
    let n = opts.kv_len.unwrap_or(cache);
    if n > cache {
        return Err(Error::shape(format!(
            "attention kv_len {n} is more than the {cache} positions k {k:?} holds"
        )));
    }
    if let Some(lens) = &opts.kv_lens {
        if lens.len() != b {
            return Err(Error::shape(format!(
                "attention kv_lens has {} lengths ({lens:?}) for a batch of {b}; give one per \
                 batch",
                lens.len()
            )));
        }
        if let Some(i) = lens.iter().position(|&l| l > cache) {
            return Err(Error::shape(format!(
                "attention kv_lens[{i}] = {} is more than the {cache} positions k {k:?} holds",
                lens[i]
            )));
        }
    }
    if hq % hkv != 0 {
        return Err(Error::shape(format!(
            "attention query heads {hq} must be a multiple of the kv heads {hkv}"
        )));
    }
    if d > MAX_HEAD_DIM || dv > MAX_HEAD_DIM {
        return Err(Error::shape(format!(
            "attention head dims d = {d}, dv = {dv}: at most {MAX_HEAD_DIM} supported"
        )));
    }
    let (mask_batch, mask_head, mask_row) = match mask {
        None => (0, 0, 0),
        Some(ms) => {
            let bad = || {
                let keys = if opts.kv_lens.is_some() {
                    " (with kv_lens, n is k's positions, not a batch's length)"
                } else {
                    ""
                };
                Error::shape(format!(
                    "attention mask shape {ms:?} must be [m|1, n] = [{m}|1, {n}] or \
                     [b|1, 1|hq, m|1, n] with b = {b}, hq = {hq}{keys}"
                ))
            };
            // A dimension of 1 is the same for every batch, head or query (stride 0).
            let rows_ok = |mm: usize| mm == m || mm == 1;
            let row = |mm: usize| if mm == 1 { 0 } else { n };
            match *ms {
                [mm, nn] if rows_ok(mm) && nn == n => (0, 0, row(mm)),
                [mb, mh, mm, nn] if rows_ok(mm) && nn == n && (mb == b || mb == 1) => {
                    let head = match mh {
                        1 => 0,
                        x if x == hq => mm * n,
                        _ => return Err(bad()),
                    };
                    let batch = if mb == 1 { 0 } else { mh * mm * n };
                    (batch, head, row(mm))
                }
                _ => return Err(bad()),
            }
        }
    };
    let scale = opts.scale.unwrap_or(1.0 / (d as f32).sqrt());
    Ok(AttnShape {
        b,
        hq,
        hkv,
        group: hq / hkv,
        m,
        n,
        kv_lens: opts.kv_lens.clone(),
        d,
        dv,
        scale,
        q: Strides::new(opts.layout, hq, m, d),
        k: Strides::new(opts.layout, hkv, cache, d),
        v: Strides::new(opts.layout, hkv, cache, dv),
        o: Strides::new(opts.layout, hq, m, dv),
        mask_batch,
        mask_head,
        mask_row,
        causal: opts.causal,
    })
}

/// Workgroups a decode call (split keys) aims at: enough to fill a large GPU (an H100's 132
/// multiprocessors hold 8 workgroups of 256 invocations each).
const DECODE_WORKGROUPS: usize = 2048;

/// The padded bucket of a head dimension.
pub(crate) fn bucket(x: usize) -> u32 {
    DIMS.into_iter()
        .find(|&b| b as usize >= x)
        .unwrap_or(DIMS[DIMS.len() - 1])
}

/// Packed query rows a workgroup of the few-rows path takes, for a head-dim bucket d: its
/// queries (rows x d) and one block's scores (rows x 64) stay within 16 KiB of workgroup
/// memory.
fn tile_rows(d: u32) -> u32 {
    if d <= 128 {
        16
    } else {
        8
    }
}

/// The shader variant for a storage type, padded dims and entry point.
fn variant(dtype: DType, d: u32, dv: u32, entry: &'static str) -> ShaderVariant {
    let rows = tile_rows(d);
    let slabs = dv.div_ceil(64);
    let consts = format!(
        "const D: u32 = {d}u;\nconst DV: u32 = {dv}u;\nconst ROWS: u32 = {rows}u;\n\
         const WG: u32 = {WG}u;\nconst SLABS: u32 = {slabs}u;\n"
    );
    ShaderVariant {
        family: "attention",
        variant: format!("{}-d{d}-dv{dv}", dtype.name()),
        source: compose(&[elem_header(dtype), &consts, GRID_WGSL, GEMM_WGSL, SOURCE]),
        entry,
        constants: vec![],
    }
}

/// Every shader variant of the family (for the naga translation test).
pub fn shader_variants() -> Vec<ShaderVariant> {
    let mut out = Vec::new();
    for dtype in [DType::F32, DType::F16] {
        for d in DIMS {
            for dv in DIMS {
                for entry in ["attention", "attention_merge", "attention_blocked"] {
                    out.push(variant(dtype, d, dv, entry));
                }
            }
        }
        out.push(variant(dtype, 64, 64, "matmul"));
    }
    out
}

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    m: u32,
    n: u32,
    d: u32,
    dv: u32,
    hq: u32,
    group: u32,
    qtiles: u32,
    splits: u32,
    q_row: u32,
    q_head: u32,
    q_batch: u32,
    k_row: u32,
    k_head: u32,
    k_batch: u32,
    v_row: u32,
    v_head: u32,
    v_batch: u32,
    o_row: u32,
    o_head: u32,
    o_batch: u32,
    mask_batch: u32,
    mask_head: u32,
    flags: u32,
    chunk: u32,
    scale: f32,
    softcap: f32,
    bh: u32,
    ntiles: u32,
    mask_row: u32,
    _pad: [u32; 3],
}

/// An exact-attention kernel with fixed options; pipelines are compiled on first use and
/// cached in the context.
///
/// Embedding into your own encoder:
/// ```
/// # use seq_kernels::{Attention, AttentionOptions, Context};
/// # if seq_kernels::context::skip_example_without_adapter() { return Ok(()); }
/// # let ctx = Context::new()?;
/// # let q = ctx.upload(&vec![0.5f32; 4 * 16 * 64], [1, 4, 16, 64])?;
/// # let k = q.clone();
/// # let v = q.clone();
/// let o = ctx.zeros::<f32>([1, 4, 16, 64])?;
/// let lse = ctx.zeros::<f32>([1, 4, 16])?;
/// let a = Attention::new(&ctx, &AttentionOptions { causal: true, ..Default::default() })?;
/// let mut encoder = ctx.device().create_command_encoder(&Default::default());
/// a.encode(&mut encoder, &q, &k, &v, None, &o, Some(&lse))?;
/// ctx.queue().submit([encoder.finish()]);
/// assert!(o.download()?.iter().all(|&y| (y - 0.5).abs() < 1e-6));
/// assert!(lse.download()?.iter().all(|l| l.is_finite()));
/// # Ok::<(), seq_kernels::Error>(())
/// ```
pub struct Attention {
    ctx: Context,
    opts: AttentionOptions,
}

impl Attention {
    /// Validates the options.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidOption`] as [`AttentionOptions::validate`].
    pub fn new(ctx: &Context, opts: &AttentionOptions) -> Result<Self> {
        opts.validate()?;
        Ok(Self {
            ctx: ctx.clone(),
            opts: opts.clone(),
        })
    }

    /// Records the attention into `encoder` (no submit).
    ///
    /// # Errors
    ///
    /// As [`Attention::plan`].
    #[allow(clippy::too_many_arguments)]
    pub fn encode<T: Element>(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        q: &GpuTensor<T>,
        k: &GpuTensor<T>,
        v: &GpuTensor<T>,
        mask: Option<AttnMask<'_>>,
        out: &GpuTensor<T>,
        lse: Option<&GpuTensor<f32>>,
    ) -> Result<()> {
        self.plan(q, k, v, mask, out, lse)?.encode(encoder);
        Ok(())
    }

    /// The dispatches of one call, to record as often as needed.
    ///
    /// # Errors
    ///
    /// Besides the [errors common to every
    /// kernel](crate::kernels#errors-common-to-every-kernel):
    /// - [`Error::Dtype`] unless `T` is f32 or f16.
    /// - [`Error::Shape`] if q, k or v is not 4-D; if their batch sizes differ; if k's head
    ///   dim is not q's, or v's heads and length are not k's; if `kv_len`, or a length of
    ///   `kv_lens`, is more than k's positions; if `kv_lens` does not hold one length per
    ///   batch; if q's heads are not a multiple of k's; if d or dv passes
    ///   [`MAX_HEAD_DIM`]; if the mask is not `[m|1, n]` or `[b|1, 1|hq, m|1, n]`; or if `out`
    ///   or `lse` does not have the shape the call gives it.
    /// - [`Error::InvalidOption`] for the options, as [`AttentionOptions::validate`].
    /// - [`Error::LimitExceeded`] if q, k, v, `out` (each f32 where f16 is widened), the mask,
    ///   `lse` or the key splits' partial results do not fit one storage binding
    ///   (`max_storage_buffer_binding_size`) or pass `u32::MAX` elements; if `kv_lens` has
    ///   more than [`MAX_KV_LENS`] lengths; or if the device's
    ///   `max_uniform_buffer_binding_size` is under the 16 KiB of the lengths' binding.
    pub fn plan<T: Element>(
        &self,
        q: &GpuTensor<T>,
        k: &GpuTensor<T>,
        v: &GpuTensor<T>,
        mask: Option<AttnMask<'_>>,
        out: &GpuTensor<T>,
        lse: Option<&GpuTensor<f32>>,
    ) -> Result<Plan> {
        let ctx = &self.ctx;
        let mut written = vec![out.named("out")];
        written.extend(lse.map(|l| l.named("lse")));
        let mut read = vec![q.named("q"), k.named("k"), v.named("v")];
        read.extend(mask.as_ref().map(|m| m.named("mask")));
        check_call_tensors(ctx, "attention", &written, &read)?;
        require_float::<T>("attention")?;
        let s = attention_shape(
            q.shape(),
            k.shape(),
            v.shape(),
            mask.map(|m| m.shape()),
            &self.opts,
        )?;
        let want = s.out_shape(self.opts.layout);
        if out.shape() != want.as_slice() {
            return Err(Error::shape(format!(
                "attention output shape {:?} must be {want:?}",
                out.shape()
            )));
        }
        if let Some(l) = lse {
            if l.shape() != [s.b, s.hq, s.m] {
                return Err(Error::shape(format!(
                    "attention lse shape {:?} must be [b, hq, m] = {:?}",
                    l.shape(),
                    [s.b, s.hq, s.m]
                )));
            }
        }
        let storage = Storage::for_dtype(ctx, T::DTYPE);
        check_tensors(
            ctx,
            storage,
            &[
                ("attention q", q.len()),
                ("attention k", k.len()),
                ("attention v", v.len()),
                ("the attention output", out.len()),
            ],
        )?;
        if let Some(m) = mask {
            check_binding(ctx, "the attention mask", m.bytes(), 1)?;
        }
        if let Some(l) = lse {
            check_binding(ctx, "the attention lse", l.bytes(), 4)?;
        }
        let lens = kv_lens_uniform(ctx, s.kv_lens.as_deref())?;

        let mut plan = Plan::default();
        let qb = storage.input(ctx, &mut plan, q.buffer(), q.len())?;
        let kb = storage.input(ctx, &mut plan, k.buffer(), k.len())?;
        let vb = storage.input(ctx, &mut plan, v.buffer(), v.len())?;
        let ob = storage.output(ctx, out.buffer(), out.len())?;
        let dtype = storage.shader_dtype();
        let (dp, dvp) = (bucket(s.d), bucket(s.dv));
        let t = tile_rows(dp) as usize;
        // The longest batch's keys (n without kv_lens): the grid is sized by it, and each
        // workgroup stops at its own batch's keys.
        let n = s.max_keys();

        // Key splits: decode shapes (few queries, many keys) or on request.
        let chunk = match self.opts.key_split {
            // Clamped first: a huge request (usize::MAX = never split) must not wrap.
            Some(c) => c.min(n).div_ceil(t) * t,
            // About DECODE_WORKGROUPS workgroups in all (tiles of a kv head's packed rows
            // times splits), with at least 256 keys each so that the merge stays small.
            None if s.m <= 4 && n >= 1024 => {
                let tiles = s.b * s.hkv * (s.group * s.m).div_ceil(t);
                let splits = DECODE_WORKGROUPS.div_ceil(tiles);
                256usize.max(n.div_ceil(splits).div_ceil(t) * t)
            }
            None => n,
        };
        let chunk = chunk.min(n.div_ceil(t) * t);
        let splits = n.div_ceil(chunk);
        let bh = s.b * s.hq;
        // Without key splits and with more query rows than one tile of the few-rows path, the
        // register-blocked kernel (64 rows a workgroup) does the work.
        let blocked = splits == 1 && s.m > t;
        // Workgroups per key split: the blocked kernel takes 64 query rows of one head; the
        // few-rows path packs a GQA group's query heads into its tiles' rows (group * m rows
        // per kv head), so their keys and values are read once.
        let (entry, qtiles, units) = if blocked {
            ("attention_blocked", s.m.div_ceil(GEMM_BLOCK), bh)
        } else {
            ("attention", (s.group * s.m).div_ceil(t), s.b * s.hkv)
        };

        let flags = ((s.causal as u32) * FLAG_CAUSAL)
            | ((mask.is_some() as u32) * FLAG_MASK)
            | ((matches!(mask, Some(AttnMask::Add(_))) as u32) * FLAG_ADDITIVE)
            | ((lse.is_some() as u32) * FLAG_LSE)
            | ((s.kv_lens.is_some() as u32) * FLAG_KV_LENS);
        let u = |x: usize| x as u32;
        let params = ctx.uniform(&Params {
            m: u(s.m),
            n: u(n),
            d: u(s.d),
            dv: u(s.dv),
            hq: u(s.hq),
            group: u(s.group),
            qtiles: u(qtiles),
            splits: u(splits),
            q_row: u(s.q.row),
            q_head: u(s.q.head),
            q_batch: u(s.q.batch),
            k_row: u(s.k.row),
            k_head: u(s.k.head),
            k_batch: u(s.k.batch),
            v_row: u(s.v.row),
            v_head: u(s.v.head),
            v_batch: u(s.v.batch),
            o_row: u(s.o.row),
            o_head: u(s.o.head),
            o_batch: u(s.o.batch),
            mask_batch: u(s.mask_batch),
            mask_head: u(s.mask_head),
            flags,
            chunk: u(chunk),
            scale: s.scale,
            softcap: self.opts.softcap,
            bh: u(bh),
            ntiles: 0,
            mask_row: u(s.mask_row),
            _pad: [0; 3],
        })?;
        // Unused bindings get small buffers of their own (a buffer bound read-only and
        // read-write in one dispatch is a usage conflict).
        // Every buffer is bound over its data only (an application's may exceed a binding).
        let (mask_b, mask_bytes) = match mask {
            Some(m) => (m.buffer().clone(), m.bytes()),
            None => (ctx.scratch(16)?, 16),
        };
        let (lse_b, lse_bytes) = match lse {
            Some(l) => (l.buffer().clone(), l.bytes()),
            None => (ctx.scratch(16)?, 16),
        };
        let (part_o, part_ml) = if splits > 1 {
            let rows = (bh * s.m * splits) as u64;
            check_binding(
                ctx,
                "the split-key partial outputs",
                rows * s.dv as u64 * 4,
                4,
            )?;
            check_binding(ctx, "the split-key partial maxima and sums", rows * 8, 8)?;
            (ctx.scratch(rows * s.dv as u64 * 4)?, ctx.scratch(rows * 8)?)
        } else {
            (ctx.scratch(16)?, ctx.scratch(16)?)
        };
        let e = wgpu::Buffer::as_entire_buffer_binding;
        let data = |b, len| data_binding(b, len, dtype);
        let mut bindings = vec![
            (0, data(&qb, q.len())),
            (1, data(&kb, k.len())),
            (2, data(&vb, v.len())),
            (3, data(&ob, out.len())),
            (4, sub_binding(&mask_b, 0, mask_bytes)),
            (5, e(&params)),
            (6, sub_binding(&lse_b, 0, lse_bytes)),
            (9, e(&lens)),
        ];
        if !blocked {
            // The key splits' partials (the blocked kernel has no splits).
            bindings.extend([(7, e(&part_o)), (8, e(&part_ml))]);
        }
        plan.push(Step::new(
            ctx,
            &variant(dtype, dp, dvp, entry),
            &bindings,
            (units * qtiles * splits) as u64,
        )?);
        if splits > 1 {
            plan.push(Step::new(
                ctx,
                &variant(dtype, dp, dvp, "attention_merge"),
                &[
                    (3, data(&ob, out.len())),
                    (5, e(&params)),
                    (6, sub_binding(&lse_b, 0, lse_bytes)),
                    (7, e(&part_o)),
                    (8, e(&part_ml)),
                ],
                (bh * s.m) as u64,
            )?);
        }
        storage.finish_output(ctx, &mut plan, ob, out.buffer(), out.len())?;
        for b in [params, mask_b, lse_b, part_o, part_ml, lens] {
            plan.keep(b);
        }
        Ok(plan)
    }
}

/// The uniform buffer of binding 9 (`kv_lens`): each batch's keys, or, without kv_lens, a
/// buffer the kernels do not read (FLAG_KV_LENS off), left unwritten.
///
/// Why a uniform: the attention entry points already bind 8 storage buffers, wgpu's default
/// `max_storage_buffers_per_shader_stage`, while uniform bindings are plenty (12 by default).
/// A uniform array has a fixed size, so the buffer is always [`MAX_KV_LENS`] lengths (16 KiB,
/// the least `max_uniform_buffer_binding_size` of wgpu's limit sets), and a ragged call of more
/// batches is refused rather than split: a batch of thousands of sequences can be made into
/// several calls by the caller as cheaply, and one dispatch keeps the ragged batch one grid.
fn kv_lens_uniform(ctx: &Context, lens: Option<&[usize]>) -> Result<wgpu::Buffer> {
    let max = ctx.limits().max_uniform_buffer_binding_size;
    if max < KV_LENS_BYTES {
        return Err(Error::LimitExceeded {
            what: "bytes of attention's kv_lens uniform binding".into(),
            limit: crate::error::UNIFORM_BINDING_SIZE,
            needed: KV_LENS_BYTES,
            max,
        });
    }
    let Some(lens) = lens else {
        return ctx.checked("allocating attention's kv_lens uniform", || {
            ctx.device().create_buffer(&wgpu::BufferDescriptor {
                label: Some("attention kv_lens (unused)"),
                size: KV_LENS_BYTES,
                usage: wgpu::BufferUsages::UNIFORM,
                mapped_at_creation: false,
            })
        });
    };
    if lens.len() > MAX_KV_LENS {
        return Err(Error::LimitExceeded {
            what: "batches of an attention call with kv_lens".into(),
            limit: "the kv_lens uniform (16 KiB of lengths)",
            needed: lens.len() as u64,
            max: MAX_KV_LENS as u64,
        });
    }
    let mut words = [0u32; MAX_KV_LENS];
    for (w, &l) in words.iter_mut().zip(lens) {
        *w = l as u32;
    }
    ctx.uniform(&words)
}

/// `C = A B^T` (`transpose_b`, B `[n, k]`) or `C = A B` (B `[k, n]`) for A `[m, k]`, C `[m, n]`,
/// all row-major, on the block products of the register-blocked attention
/// (`shaders/gemm.wgsl`, 64 x 64 blocks of C): the matmul that attention's FLOP/s are
/// compared with. f32 or f16 storage, f32 accumulation.
///
/// # Errors
///
/// Besides the [errors common to every
/// kernel](crate::kernels#errors-common-to-every-kernel):
/// - [`Error::Dtype`] unless `T` is f32 or f16.
/// - [`Error::Shape`] if A or B is not 2-D, their inner dims differ, or C is not `[m, n]`.
/// - [`Error::LimitExceeded`] if A, B or C (each f32 where f16 is widened) does not fit one
///   storage binding (`max_storage_buffer_binding_size`) or passes `u32::MAX` elements.
pub fn matmul_plan<T: Element>(
    ctx: &Context,
    a: &GpuTensor<T>,
    b: &GpuTensor<T>,
    c: &GpuTensor<T>,
    transpose_b: bool,
) -> Result<Plan> {
    check_call_tensors(
        ctx,
        "matmul",
        &[c.named("c")],
        &[a.named("a"), b.named("b")],
    )?;
    require_float::<T>("matmul")?;
    let (sa, sb) = (a.shape(), b.shape());
    if sa.len() != 2 || sb.len() != 2 {
        return Err(Error::shape(format!(
            "matmul takes 2-D tensors, got {sa:?} and {sb:?}"
        )));
    }
    let (m, kd) = (sa[0], sa[1]);
    let (n, kb) = if transpose_b {
        (sb[0], sb[1])
    } else {
        (sb[1], sb[0])
    };
    if kb != kd {
        return Err(Error::shape(format!(
            "matmul inner dims differ: A {sa:?}, B {sb:?} (transpose_b = {transpose_b})"
        )));
    }
    if c.shape() != [m, n] {
        return Err(Error::shape(format!(
            "matmul output shape {:?} must be [{m}, {n}]",
            c.shape()
        )));
    }
    let storage = Storage::for_dtype(ctx, T::DTYPE);
    check_tensors(
        ctx,
        storage,
        &[
            ("matmul a", a.len()),
            ("matmul b", b.len()),
            ("matmul c", c.len()),
        ],
    )?;
    let mut plan = Plan::default();
    let ab = storage.input(ctx, &mut plan, a.buffer(), a.len())?;
    let bb = storage.input(ctx, &mut plan, b.buffer(), b.len())?;
    let cb = storage.output(ctx, c.buffer(), c.len())?;
    // 64 x 64 blocks of C (the block products of the register-blocked attention).
    let qtiles = m.div_ceil(GEMM_BLOCK);
    let ntiles = n.div_ceil(GEMM_BLOCK);
    let u = |x: usize| x as u32;
    let params = ctx.uniform(&Params {
        m: u(m),
        n: u(n),
        d: u(kd),
        q_row: u(kd),
        k_row: u(kd),
        v_row: u(n),
        o_row: u(n),
        qtiles: u(qtiles),
        ntiles: u(ntiles),
        splits: 1,
        flags: if transpose_b { 0 } else { FLAG_MATMUL_NN },
        ..Default::default()
    })?;
    let dtype = storage.shader_dtype();
    let data = |buf, len| data_binding(buf, len, dtype);
    plan.push(Step::new(
        ctx,
        &variant(dtype, 64, 64, "matmul"),
        // The kernel reads B from k (A B^T) or v (A B); B fills both.
        &[
            (0, data(&ab, a.len())),
            (1, data(&bb, b.len())),
            (2, data(&bb, b.len())),
            (3, data(&cb, c.len())),
            (5, params.as_entire_buffer_binding()),
        ],
        (qtiles * ntiles) as u64,
    )?);
    storage.finish_output(ctx, &mut plan, cb, c.buffer(), c.len())?;
    plan.keep(params);
    Ok(plan)
}

impl Context {
    /// Exact attention into a new tensor (shape `[b, hq, m, dv]`, or `[b, m, hq, dv]` for bshd).
    ///
    /// # Errors
    ///
    /// As [`Attention::new`] and [`Attention::plan`], and those of [allocating the output and
    /// running the call](crate::kernels#errors-common-to-every-kernel).
    pub fn attention<T: Element>(
        &self,
        q: &GpuTensor<T>,
        k: &GpuTensor<T>,
        v: &GpuTensor<T>,
        mask: Option<AttnMask<'_>>,
        opts: &AttentionOptions,
    ) -> Result<GpuTensor<T>> {
        let s = attention_shape(
            q.shape(),
            k.shape(),
            v.shape(),
            mask.map(|m| m.shape()),
            opts,
        )?;
        let out = self.zeros::<T>(s.out_shape(opts.layout))?;
        Attention::new(self, opts)?
            .plan(q, k, v, mask, &out, None)?
            .run(self)?;
        Ok(out)
    }

    /// Exact attention and the log-sum-exp of each query row's scores (`[b, hq, m]`, -inf for
    /// rows without a valid key).
    ///
    /// # Errors
    ///
    /// As [`Context::attention`].
    pub fn attention_lse<T: Element>(
        &self,
        q: &GpuTensor<T>,
        k: &GpuTensor<T>,
        v: &GpuTensor<T>,
        mask: Option<AttnMask<'_>>,
        opts: &AttentionOptions,
    ) -> Result<(GpuTensor<T>, GpuTensor<f32>)> {
        let s = attention_shape(
            q.shape(),
            k.shape(),
            v.shape(),
            mask.map(|m| m.shape()),
            opts,
        )?;
        let out = self.zeros::<T>(s.out_shape(opts.layout))?;
        let lse = self.zeros::<f32>([s.b, s.hq, s.m])?;
        Attention::new(self, opts)?
            .plan(q, k, v, mask, &out, Some(&lse))?
            .run(self)?;
        Ok((out, lse))
    }

    /// `C = A B^T` (`transpose_b`) or `C = A B` on attention's block products, into a new
    /// tensor.
    ///
    /// # Errors
    ///
    /// As [`matmul_plan`], and those of [allocating the output and running the
    /// call](crate::kernels#errors-common-to-every-kernel).
    pub fn matmul<T: Element>(
        &self,
        a: &GpuTensor<T>,
        b: &GpuTensor<T>,
        transpose_b: bool,
    ) -> Result<GpuTensor<T>> {
        let (m, n) = match (a.shape(), b.shape()) {
            ([m, _], [n, _]) if transpose_b => (*m, *n),
            ([m, _], [_, n]) => (*m, *n),
            (sa, sb) => {
                return Err(Error::shape(format!(
                    "matmul takes 2-D tensors, got {sa:?} and {sb:?}"
                )))
            }
        };
        let c = self.zeros::<T>([m, n])?;
        matmul_plan(self, a, b, &c, transpose_b)?.run(self)?;
        Ok(c)
    }
}
