//! FLASH mixed-chunk attention, the attention of the gated attention unit (GAU) of
//! "Transformer Quality in Linear Time": exact quadratic attention inside chunks of C tokens
//! plus linear attention across chunks, so the cost grows linearly with the sequence length.
//!
//! For each batch item, with G = ceil(n / C) chunks (the last one may be partial):
//! - quadratic branch, per chunk g: `Yquad_g = f(kappa qq_g kq_g^T + bias) v_g`, f = relu^2
//!   ([`AttnFn::Relu2`]) or the Laplace function ([`AttnFn::Laplace`]); causal zeroes key j > i
//!   inside the chunk; masked and padded keys give 0 *after* f;
//! - linear branch: `KV_g = kl_g^T v_g` over valid keys; non-causal `Ylin_g = z ql_g sum_h KV_h`,
//!   causal `Ylin_g = z_g ql_g sum_{h<g} KV_h` (an exclusive prefix: chunk 0 has no linear term);
//! - z ([`LinNorm`]): `1/C`, `1/n_valid`, or `1/(valid keys in the prefix)` (0 for an empty
//!   prefix); `lin_scale` overrides it;
//! - output `gate * (Yquad + Ylin)` (without a gate, `Yquad + Ylin`).
//!
//! Shapes: qq, kq, ql, kl `[b, n, s]`, v and gate `[b, n, e]`, bias `[C, C]` (f32),
//! key_mask `[b, n]` (nonzero byte = keep), out `[b, n, e]`; s <= 256, any n and e.
//! Storage f32 or f16 (native with `SHADER_F16`, else widened to an f32 scratch),
//! accumulation f32. Fused RoPE ([`FlashRope`]) rotates qq, kq, ql and kl in-kernel by their
//! global positions (half style) with the RoPE family's (cos, sin) table.
//! [`FlashDecoder`] feeds tokens one at a time or in blocks and reproduces the causal output.
//!
//! The GPU work is three passes of register-blocked block products (`shaders/gemm.wgsl`): the
//! chunks' activated scores and KV sums, an exclusive scan of the sums over chunks, and the
//! outputs. Scratch: `b G C^2` floats of scores and `b (G + 1) P s e` of KV sums, where a
//! call with few chunks splits each chunk's KV product over its keys into P <= C / 64 parts
//! so that the first pass has enough workgroups (P = 1 once `b G` is large). A call whose
//! tensors or scratch would not fit one storage binding of the device runs as segments (runs
//! of chunks of one batch item), the KV sum carried from one to the next; only a single
//! chunk's rows, C x C scores, bias and KV sum must each fit (a chunk too large for that is
//! refused, naming the largest chunk that fits).
//!
//! Speed: the work is linear in n, and on a large GPU the time per token is flat once the
//! passes have many waves of workgroups (`b n / C` chunks times the 64 x 64 blocks of s x e
//! and C x e). On an H200 with s = 128, e = 1536, C = 256 and b = 1, a token costs 0.085 us
//! at n = 64K and 0.12 us at n = 1K, where each pass is one or two waves (BENCHMARKS.md).
//! Batching sequences into one call (larger b) is the way to fill the GPU with short ones:
//! 64 sequences of 1K in one call cost 0.085 us per token too.
//!
//! ```
//! use seq_kernels::{Context, FlashInputs, FlashOptions};
//! # if seq_kernels::context::skip_example_without_adapter() { return Ok(()); }
//! let ctx = Context::new()?;
//! let (b, n, s, e) = (1, 1000, 128, 256);
//! let x = |len: usize| ctx.upload(&vec![0.1f32; len], [b, n, len / (b * n)]);
//! let (qq, kq, ql, kl, v) = (x(b * n * s)?, x(b * n * s)?, x(b * n * s)?, x(b * n * s)?, x(b * n * e)?);
//! let inputs = FlashInputs::new(&qq, &kq, &ql, &kl, &v);
//! let y = ctx.flash(&inputs, &FlashOptions { causal: true, ..Default::default() })?;
//! assert_eq!(y.shape(), &[b, n, e]);
//! # Ok::<(), seq_kernels::Error>(())
//! ```

use std::str::FromStr;

use crate::context::Context;
use crate::convert::Storage;
use crate::dispatch::{
    check_binding, check_call_tensors, largest_fitting, rows_binding, Plan, Step,
};
use crate::error::{Error, Result};
use crate::kernels::copy;
use crate::kernels::rope::{cos_sin_table, position_rows, RopeOptions};
use crate::shader::{compose, elem_header, ShaderVariant, GEMM_BLOCK, GEMM_WGSL, GRID_WGSL};
use crate::tensor::{data_binding, require_float, shape_elements, DType, Element, GpuTensor};

const SOURCE: &str = include_str!("../../shaders/flash.wgsl");
/// Largest s (the width of qq, kq, ql, kl).
pub const MAX_S: usize = 256;
/// Largest n: valid-key counts are kept exactly in f32.
pub const MAX_N: usize = 1 << 24;
/// Invocations per workgroup of shaders/gemm.wgsl.
const GEMM_WG: usize = 256;
/// Depth staged per step of shaders/gemm.wgsl.
const GEMM_BK: usize = 16;

const FLAG_CAUSAL: u32 = 1;
const FLAG_GATE: u32 = 2;
const FLAG_BIAS: u32 = 4;
const FLAG_MASK: u32 = 8;
const FLAG_ROPE: u32 = 16;
const FLAG_LAPLACE: u32 = 32;
const FLAG_UPDATE_STATE: u32 = 64;
const FLAG_TOTAL_FROM_STATE: u32 = 128;
const FLAG_NO_STATE: u32 = 256;
const FLAG_COUNTS_ONLY: u32 = 512;
const FLAG_COUNT_FROM_STATE: u32 = 1024;
/// Small calls split each chunk's KV product over its keys until the chunk pass has about
/// this many KV workgroups. On an H200 at s 128, e 1536, C 256: 384 beat 512 by 2% at n = 1K
/// and 6% at 2K (2% slower causal), and 512 beat 1024, 2048 and no split at n <= 4K.
const KV_BLOCKS_WANTED: usize = 384;
/// Fewest keys in one part of a split KV product.
const KV_SPLIT_MIN_KEYS: usize = 64;

const NORM_CONSTANT: u32 = 0;
const NORM_LENGTH: u32 = 1;
const NORM_PREFIX: u32 = 2;

/// The attention function of the quadratic branch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttnFn {
    /// `relu(x)^2`, the paper's choice.
    #[default]
    Relu2,
    /// `0.5 (1 + erf((x - mu) / (sigma sqrt 2)))`, mu = sqrt(1/2), sigma = sqrt(1/(4 pi)).
    Laplace,
}

/// `relu2` or `laplace`.
impl FromStr for AttnFn {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "relu2" => Ok(Self::Relu2),
            "laplace" => Ok(Self::Laplace),
            _ => Err(Error::option(format!(
                "flash attn_fn must be relu2 or laplace, got {s:?}"
            ))),
        }
    }
}

impl AttnFn {
    /// The function in f64 (the reference's).
    pub fn apply(self, x: f64) -> f64 {
        match self {
            Self::Relu2 => x.max(0.0).powi(2),
            Self::Laplace => {
                let mu = 0.5f64.sqrt();
                let sigma = (0.25 / std::f64::consts::PI).sqrt();
                0.5 * (1.0 + libm::erf((x - mu) / (sigma * std::f64::consts::SQRT_2)))
            }
        }
    }
}

/// The normaliser z of the linear branch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LinNorm {
    /// z = 1/C: the paper's causal code. Its non-causal code divides by the sequence length
    /// n instead, which is `Length` (the same when no key is masked): port a non-causal model
    /// with `Length`, or its scale with `lin_scale`.
    #[default]
    Chunk,
    /// z = 1/(number of valid keys of the sequence). Needs the whole sequence, so
    /// [`FlashDecoder`] refuses it; with `causal`, every output depends on the sequence's
    /// length (appending a token changes earlier outputs), so autoregressive models use
    /// `Chunk` or `Prefix`.
    Length,
    /// z_g = 1/(valid keys summed into the prefix the chunk reads), 0 when there are none
    /// (causal chunk 0). Non-causal, every chunk reads all the valid keys, chunk 0 included,
    /// so it equals `Length`.
    Prefix,
}

/// `chunk`, `length` or `prefix`.
impl FromStr for LinNorm {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "chunk" => Ok(Self::Chunk),
            "length" => Ok(Self::Length),
            "prefix" => Ok(Self::Prefix),
            _ => Err(Error::option(format!(
                "flash lin_norm must be chunk, length or prefix, got {s:?}"
            ))),
        }
    }
}

/// Fused rotary embedding of qq, kq, ql and kl (half style, rotary dim s): token t sits at
/// global position `offset + t`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FlashRope {
    /// Frequency base (10000 by default).
    pub base: f64,
    /// Position of the first token.
    pub offset: u64,
}

impl Default for FlashRope {
    fn default() -> Self {
        Self {
            base: 10000.0,
            offset: 0,
        }
    }
}

impl FlashRope {
    /// The RoPE family's options for these positions (the shared angle code).
    pub fn rope_options(&self) -> RopeOptions {
        RopeOptions {
            base: self.base,
            offset: self.offset,
            ..Default::default()
        }
    }
}

/// Options of FLASH mixed-chunk attention.
#[derive(Clone, Debug, PartialEq)]
pub struct FlashOptions {
    /// Chunk size C (default 256).
    pub chunk: usize,
    /// Causal attention: quadratic within the chunk up to the diagonal, linear over earlier
    /// chunks only.
    pub causal: bool,
    /// Attention function of the quadratic branch.
    pub attn_fn: AttnFn,
    /// kappa, the scale of `qq kq^T`; `None` means 1/C.
    pub quad_scale: Option<f32>,
    /// The normaliser z of the linear branch.
    pub lin_norm: LinNorm,
    /// An explicit z, overriding `lin_norm`.
    pub lin_scale: Option<f32>,
    /// Fused RoPE on qq, kq, ql, kl; `None` leaves them as given.
    pub rope: Option<FlashRope>,
}

impl Default for FlashOptions {
    fn default() -> Self {
        Self {
            chunk: 256,
            causal: false,
            attn_fn: AttnFn::Relu2,
            quad_scale: None,
            lin_norm: LinNorm::Chunk,
            lin_scale: None,
            rope: None,
        }
    }
}

impl FlashOptions {
    /// Checks the options' values.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidOption`] if `chunk` is 0 or passes [`MAX_N`], `quad_scale` or
    /// `lin_scale` is given and not finite, or the fused RoPE's base is not finite and > 0.
    pub fn validate(&self) -> Result<()> {
        if self.chunk == 0 || self.chunk > MAX_N {
            return Err(Error::option(format!(
                "flash chunk must be between 1 and {MAX_N}, got {}",
                self.chunk
            )));
        }
        for (name, x) in [
            ("quad_scale", self.quad_scale),
            ("lin_scale", self.lin_scale),
        ] {
            if let Some(x) = x.filter(|x| !x.is_finite()) {
                return Err(Error::option(format!(
                    "flash {name} must be finite, got {x}"
                )));
            }
        }
        if let Some(r) = &self.rope {
            if !(r.base > 0.0 && r.base.is_finite()) {
                return Err(Error::option(format!(
                    "flash rope base must be finite and > 0, got {}",
                    r.base
                )));
            }
        }
        Ok(())
    }
    /// The effective kappa.
    pub fn kappa(&self) -> f32 {
        self.quad_scale.unwrap_or(1.0 / self.chunk as f32)
    }
}

/// The geometry of a FLASH call, checked once for the GPU and the CPU reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlashShape {
    /// Batch.
    pub b: usize,
    /// Sequence length.
    pub n: usize,
    /// Width of qq, kq, ql, kl.
    pub s: usize,
    /// Width of v, the gate and the output.
    pub e: usize,
    /// Chunk size C.
    pub chunk: usize,
    /// Number of chunks G = ceil(n / C).
    pub groups: usize,
}

/// Checks the shapes of a FLASH call: `qk` are qq, kq, ql, kl; `gate`, `bias` and `key_mask`
/// are optional.
pub fn flash_shape(
    qk: [&[usize]; 4],
    v: &[usize],
    gate: Option<&[usize]>,
    bias: Option<&[usize]>,
    key_mask: Option<&[usize]>,
    opts: &FlashOptions,
) -> Result<FlashShape> {
    opts.validate()?;
    let names = ["qq", "kq", "ql", "kl"];
    for (name, s) in names.iter().zip(qk).chain([(&"v", v)]) {
        if s.len() != 3 || s.contains(&0) {
            return Err(Error::shape(format!(
                "flash {name} must have 3 non-zero axes [b, n, {}], got {s:?}",
                if *name == "v" { "e" } else { "s" }
            )));
        }
        shape_elements(format_args!("flash {name}"), s)?;
    }
    let (b, n, s) = (qk[0][0], qk[0][1], qk[0][2]);
    for (name, sh) in names.iter().zip(qk).skip(1) {
        if sh != qk[0] {
            return Err(Error::shape(format!(
                "flash {name} has shape {sh:?}; it must match qq's {:?}",
                qk[0]
            )));
        }
    }
    if v[0] != b || v[1] != n {
        return Err(Error::shape(format!(
            "flash v has shape {v:?}; expected [b, n, e] with b = {b}, n = {n}"
        )));
    }
    let e = v[2];
    if s > MAX_S {
        return Err(Error::shape(format!(
            "flash s = {s} is too wide: at most {MAX_S} supported"
        )));
    }
    if n > MAX_N {
        return Err(Error::shape(format!(
            "flash n = {n} is too long: at most {MAX_N} tokens per call (use FlashDecoder)"
        )));
    }
    if opts.rope.is_some() && s % 2 != 0 {
        return Err(Error::option(format!(
            "flash fused rope needs an even s, got {s}"
        )));
    }
    if let Some(g) = gate {
        if g != [b, n, e] {
            return Err(Error::shape(format!(
                "flash gate has shape {g:?}; it must match v's [b, n, e] = {:?}",
                [b, n, e]
            )));
        }
    }
    if let Some(bs) = bias {
        if bs != [opts.chunk, opts.chunk] {
            return Err(Error::shape(format!(
                "flash bias has shape {bs:?}; it must be [C, C] = [{c}, {c}] for chunk = {c}",
                c = opts.chunk
            )));
        }
    }
    if let Some(m) = key_mask {
        if m != [b, n] {
            return Err(Error::shape(format!(
                "flash key_mask has shape {m:?}; expected [b, n] = [{b}, {n}]"
            )));
        }
    }
    Ok(FlashShape {
        b,
        n,
        s,
        e,
        chunk: opts.chunk,
        groups: n.div_ceil(opts.chunk),
    })
}

/// The inputs of a FLASH call. `gate`, `bias` and `key_mask` are optional.
pub struct FlashInputs<'a, T: Element> {
    /// Queries of the quadratic branch, `[b, n, s]`.
    pub qq: &'a GpuTensor<T>,
    /// Keys of the quadratic branch, `[b, n, s]`.
    pub kq: &'a GpuTensor<T>,
    /// Queries of the linear branch, `[b, n, s]`.
    pub ql: &'a GpuTensor<T>,
    /// Keys of the linear branch, `[b, n, s]`.
    pub kl: &'a GpuTensor<T>,
    /// Values, `[b, n, e]`.
    pub v: &'a GpuTensor<T>,
    /// Gate u, `[b, n, e]`: the output becomes `u * (Yquad + Ylin)`.
    pub gate: Option<&'a GpuTensor<T>>,
    /// Additive bias of the quadratic scores, `[C, C]`, f32 whatever T is; a partial chunk of
    /// L rows (the tail, or n < C) adds its top-left `[L, L]`.
    pub bias: Option<&'a GpuTensor<f32>>,
    /// Key mask `[b, n]`, nonzero = keep.
    pub key_mask: Option<&'a GpuTensor<u8>>,
}

impl<'a, T: Element> FlashInputs<'a, T> {
    /// The five required inputs, without gate, bias or mask.
    pub fn new(
        qq: &'a GpuTensor<T>,
        kq: &'a GpuTensor<T>,
        ql: &'a GpuTensor<T>,
        kl: &'a GpuTensor<T>,
        v: &'a GpuTensor<T>,
    ) -> Self {
        Self {
            qq,
            kq,
            ql,
            kl,
            v,
            gate: None,
            bias: None,
            key_mask: None,
        }
    }
    /// Checks the shapes against each other and `opts`.
    pub fn shape(&self, opts: &FlashOptions) -> Result<FlashShape> {
        flash_shape(
            [
                self.qq.shape(),
                self.kq.shape(),
                self.ql.shape(),
                self.kl.shape(),
            ],
            self.v.shape(),
            self.gate.map(|g| g.shape()),
            self.bias.map(|b| b.shape()),
            self.key_mask.map(|m| m.shape()),
            opts,
        )
    }
}

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    s: u32,
    e: u32,
    chunk: u32,
    groups: u32,
    tiles: u32,
    stiles: u32,
    etiles: u32,
    batch: u32,
    row_begin: u32,
    flags: u32,
    norm: u32,
    kappa: f32,
    lin_scale: f32,
    rope_base: u32,
    count_base: u32,
    pstride: u32,
    qk_base: u32,
    v_base: u32,
    mask_base: u32,
    batch_rows: u32,
    splits: u32,
    split_len: u32,
    pad: u32,
}

/// The shader variant for a storage type and entry point.
fn variant(dtype: DType, entry: &'static str) -> ShaderVariant {
    ShaderVariant {
        family: "flash",
        variant: dtype.name().to_string(),
        source: compose(&[elem_header(dtype), GRID_WGSL, GEMM_WGSL, SOURCE]),
        entry,
        constants: vec![],
    }
}

/// Every shader variant of the family (for the naga translation test).
pub fn shader_variants() -> Vec<ShaderVariant> {
    let mut out = Vec::new();
    for dtype in [DType::F32, DType::F16] {
        for entry in ["flash_chunks", "flash_scan", "flash_out"] {
            out.push(variant(dtype, entry));
        }
    }
    out
}

/// Buffers of one call as the shaders see them (f32 scratch for widened f16).
struct Bound {
    qq: wgpu::Buffer,
    kq: wgpu::Buffer,
    ql: wgpu::Buffer,
    kl: wgpu::Buffer,
    v: wgpu::Buffer,
    gate: Option<wgpu::Buffer>,
    bias: Option<wgpu::Buffer>,
    key_mask: Option<wgpu::Buffer>,
    out: wgpu::Buffer,
}

/// What differs between a one-shot call, a segment of one and a decoding step.
struct Call<'a> {
    /// The first row written to the output (rows before it are context only).
    row_begin: usize,
    /// Sum of KV (and valid keys) over earlier chunks; `None` = nothing before.
    state: Option<&'a wgpu::Buffer>,
    /// What the scan does with the chunks' KV sums.
    scan: Scan,
    /// Whether to run the output pass (the first sweep over non-causal segments only sums).
    outputs: bool,
    /// Global position of row 0 for fused RoPE.
    rope_offset: u64,
    /// Rows per batch item in the bound tensors when more than the call's n (the decoder's
    /// chunk buffers hold C rows of which the call uses the first n).
    batch_rows: Option<usize>,
    /// The passes' scratch.
    scratch: &'a Scratch,
}

/// How the scan pass treats the chunks' KV sums.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scan {
    /// The exclusive prefix over chunks, from the state (zero when there is none).
    Prefix,
    /// The prefix, and the state gains this call's chunks.
    PrefixIntoState,
    /// The total slot is the state, which already holds every chunk (non-causal segments).
    TotalFromState,
    /// Only the state's valid-key count gains this call's chunks (no scores, no KV sums).
    CountsIntoState,
    /// As `PrefixIntoState`, but the total slot's count is the state's, which already holds
    /// every chunk's (after `CountsIntoState` over all segments).
    PrefixIntoStateCountFromState,
}

/// Rows one sequence of passes works on: the whole call, or, when a tensor or scratch buffer
/// of the whole call would not fit one storage binding, a run of chunks of one batch item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    batch: usize,
    batches: usize,
    chunk: usize,
    chunks: usize,
}

impl Segment {
    fn whole(sh: &FlashShape) -> Self {
        Self {
            batch: 0,
            batches: sh.b,
            chunk: 0,
            chunks: sh.groups,
        }
    }

    /// The first row (within a batch item) and the number of rows.
    fn rows(&self, sh: &FlashShape) -> (usize, usize) {
        let r0 = self.chunk * sh.chunk;
        (r0, sh.n.min(r0 + self.chunks * sh.chunk) - r0)
    }

    /// Parts each chunk's KV product is split into (over its keys): enough that the chunk
    /// pass fills a GPU when there are few chunks, one when there are many, and never more
    /// than keep the KV scratch within one storage binding.
    fn kv_splits(&self, ctx: &Context, sh: &FlashShape, rope: bool) -> usize {
        // Saturating: a decoder's e is not bounded by any tensor's size yet.
        let blocks = [self.batches, self.chunks, sh.s.div_ceil(GEMM_BLOCK)]
            .iter()
            .fold(sh.e.div_ceil(GEMM_BLOCK), |a, &x| a.saturating_mul(x));
        let wanted = KV_BLOCKS_WANTED
            .div_ceil(blocks)
            .min(sh.chunk / KV_SPLIT_MIN_KEYS)
            .max(1);
        let max = ctx.limits().max_storage_buffer_binding_size;
        (1..=wanted)
            .rev()
            .find(|&parts| self.kv_floats(sh, rope, parts).saturating_mul(4) <= max)
            .unwrap_or(1)
    }

    /// Floats of the KV scratch: slots in `parts` parts, counts, RoPE table (saturating: past
    /// u64 is past any limit).
    fn kv_floats(&self, sh: &FlashShape, rope: bool, parts: usize) -> u64 {
        let (_, rows) = self.rows(sh);
        let slots = (self.batches as u64).saturating_mul(self.chunks as u64 + 1);
        let table = if rope { (rows * sh.s) as u64 } else { 0 };
        [parts as u64, sh.s as u64, sh.e as u64]
            .iter()
            .fold(slots, |a, &x| a.saturating_mul(x))
            .saturating_add(slots)
            .saturating_add(table)
    }

    /// Floats of the KV scratch and of the score scratch.
    fn scratch_floats(&self, ctx: &Context, sh: &FlashShape, rope: bool) -> (u64, u64) {
        let (_, rows) = self.rows(sh);
        let pc = sh.chunk.min(rows) as u64;
        (
            self.kv_floats(sh, rope, self.kv_splits(ctx, sh, rope)),
            [self.chunks as u64, pc, pc]
                .iter()
                .fold(self.batches as u64, |a, &x| a.saturating_mul(x)),
        )
    }
}

/// Scratch of a segment's passes: KV slots, counts and the RoPE table; activated scores; and
/// a small buffer bound in place of absent optional inputs. Both sweeps over a non-causal
/// segment share one, as do all the steps of a decoder (the RoPE table, written when a plan
/// is made, is the same for both sweeps, and a decoder submits each step before making the
/// next).
struct Scratch {
    kv: wgpu::Buffer,
    scores: wgpu::Buffer,
    absent: wgpu::Buffer,
}

impl Scratch {
    fn new(ctx: &Context, opts: &FlashOptions, sh: &FlashShape, seg: &Segment) -> Result<Self> {
        let (kv, scores) = seg.scratch_floats(ctx, sh, opts.rope.is_some());
        check_binding(ctx, "the flash KV scratch", kv.saturating_mul(4), 4)?;
        check_binding(ctx, "the flash score scratch", scores.saturating_mul(4), 4)?;
        Ok(Self {
            kv: ctx.scratch(kv * 4)?,
            scores: ctx.scratch(scores * 4)?,
            absent: ctx.scratch(16)?,
        })
    }

    /// Keeps the buffers alive as long as `plan`.
    fn keep_in(&self, plan: &mut Plan) {
        for b in [&self.kv, &self.scores, &self.absent] {
            plan.keep(b.clone());
        }
    }
}

/// Bytes of the largest storage binding of a segment's passes (`elem` bytes per tensor
/// element; a segment's tensors start up to one alignment before its first row), the `[C, C]`
/// f32 bias included when there is one.
fn largest_binding(
    ctx: &Context,
    opts: &FlashOptions,
    sh: &FlashShape,
    seg: &Segment,
    elem: u64,
    bias: bool,
) -> u64 {
    let align = ctx.limits().min_storage_buffer_offset_alignment as u64;
    let (_, rows) = seg.rows(sh);
    let slack = if *seg == Segment::whole(sh) { 0 } else { align };
    let (kv, scores) = seg.scratch_floats(ctx, sh, opts.rope.is_some());
    let bias = if bias {
        (sh.chunk * sh.chunk * 4) as u64
    } else {
        0
    };
    [seg.batches as u64, rows as u64, sh.s.max(sh.e) as u64, elem]
        .iter()
        .fold(1u64, |a, &x| a.saturating_mul(x))
        .saturating_add(slack)
        .max(kv.saturating_mul(4))
        .max(scores.saturating_mul(4))
        .max(bias)
}

/// The error for a chunk C whose own bindings (`needed(C)` bytes for a chunk of C) exceed the
/// device's: it names the largest chunk that fits, since a smaller call cannot help (a call
/// runs as segments of whole chunks).
fn chunk_too_large(ctx: &Context, chunk: usize, needed: impl Fn(usize) -> u64) -> Error {
    let max = ctx.limits().max_storage_buffer_binding_size;
    if chunk == 1 || needed(1) > max {
        // Not the chunk's doing: what a chunk of 1 needs is what cannot shrink.
        return Error::LimitExceeded {
            what: "bytes of one chunk's rows, scores or KV sums, at a chunk of 1,".into(),
            limit: "max_storage_buffer_binding_size",
            needed: needed(1),
            max,
        };
    }
    let lo = largest_fitting(1, chunk - 1, |c| needed(c) <= max);
    Error::option(format!(
        "flash chunk {chunk} is too large for this device: one chunk's rows, C x C scores, KV \
         sums and bias need {} bytes in one storage binding, and max_storage_buffer_binding_size \
         is {max}; use chunk <= {lo}, or create the device with a larger limit",
        needed(chunk)
    ))
}

/// The segments of a call: the whole call when everything fits the device's storage bindings,
/// else runs of as many chunks of each batch item as fit (`elem` bytes per tensor element).
fn segments(
    ctx: &Context,
    opts: &FlashOptions,
    sh: &FlashShape,
    elem: u64,
    bias: bool,
) -> Result<Vec<Segment>> {
    let max = ctx.limits().max_storage_buffer_binding_size;
    let largest = |sh: &FlashShape, seg: &Segment| largest_binding(ctx, opts, sh, seg, elem, bias);
    let whole = Segment::whole(sh);
    if largest(sh, &whole) <= max {
        return Ok(vec![whole]);
    }
    let run = |chunks| Segment {
        batch: 0,
        batches: 1,
        chunk: 0,
        chunks,
    };
    if largest(sh, &run(1)) > max {
        let needed = |c: usize| {
            let sh = FlashShape {
                chunk: c,
                groups: sh.n.div_ceil(c),
                ..*sh
            };
            largest(&sh, &run(1))
        };
        return Err(chunk_too_large(ctx, sh.chunk, needed));
    }
    // The most chunks per segment that fit (the largest binding grows with the chunks).
    let lo = largest_fitting(1, sh.groups, |chunks| largest(sh, &run(chunks)) <= max);
    Ok((0..sh.b)
        .flat_map(|batch| {
            (0..sh.groups).step_by(lo).map(move |chunk| Segment {
                batch,
                batches: 1,
                chunk,
                chunks: lo.min(sh.groups - chunk),
            })
        })
        .collect())
}

/// A FLASH kernel with fixed options; pipelines are compiled on first use and cached in the
/// context.
///
/// Embedding into your own encoder:
/// ```
/// # use seq_kernels::{Context, Flash, FlashInputs, FlashOptions};
/// # if seq_kernels::context::skip_example_without_adapter() { return Ok(()); }
/// # let ctx = Context::new()?;
/// # let x = ctx.upload(&vec![0.1f32; 300 * 64], [1, 300, 64])?;
/// let out = ctx.zeros::<f32>([1, 300, 64])?;
/// let flash = Flash::new(&ctx, &FlashOptions { chunk: 128, causal: true, ..Default::default() })?;
/// let mut encoder = ctx.device().create_command_encoder(&Default::default());
/// flash.encode(&mut encoder, &FlashInputs::new(&x, &x, &x, &x, &x), &out)?;
/// ctx.queue().submit([encoder.finish()]);
/// # Ok::<(), seq_kernels::Error>(())
/// ```
pub struct Flash {
    ctx: Context,
    opts: FlashOptions,
}

impl Flash {
    /// Validates the options.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidOption`] as [`FlashOptions::validate`].
    pub fn new(ctx: &Context, opts: &FlashOptions) -> Result<Self> {
        opts.validate()?;
        Ok(Self {
            ctx: ctx.clone(),
            opts: opts.clone(),
        })
    }

    /// Records the call into `encoder` (no submit).
    ///
    /// # Errors
    ///
    /// As [`Flash::plan`].
    pub fn encode<T: Element>(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        inputs: &FlashInputs<'_, T>,
        out: &GpuTensor<T>,
    ) -> Result<()> {
        self.plan(inputs, out)?.encode(encoder);
        Ok(())
    }

    /// The dispatches of one call, to record as often as needed.
    ///
    /// # Errors
    ///
    /// Besides the [errors common to every
    /// kernel](crate::kernels#errors-common-to-every-kernel):
    /// - [`Error::Dtype`] unless `T` is f32 or f16.
    /// - [`Error::Shape`] if qq, kq, ql, kl or v is not 3-D; if kq, ql or kl is not qq's
    ///   shape `[b, n, s]`, or v not `[b, n, e]`; if s passes [`MAX_S`] or n passes
    ///   [`MAX_N`]; or if the gate, bias, key mask or `out` is not `[b, n, e]`, `[C, C]`,
    ///   `[b, n]`, `[b, n, e]` respectively.
    /// - [`Error::InvalidOption`] for the options, as [`FlashOptions::validate`]; if the
    ///   fused RoPE is on and s is odd, or its offset plus the positions passes
    ///   [`MAX_POSITION`](crate::kernels::rope::MAX_POSITION); or if one chunk's rows, C x C
    ///   scores and KV sums do not fit one storage binding but a smaller chunk would (the
    ///   error names the largest).
    /// - [`Error::LimitExceeded`] if they do not fit even with a chunk of 1; if the bias does
    ///   not fit one storage binding; or if the KV or score scratch passes
    ///   `max_storage_buffer_binding_size` or `u32::MAX` elements.
    pub fn plan<T: Element>(
        &self,
        inputs: &FlashInputs<'_, T>,
        out: &GpuTensor<T>,
    ) -> Result<Plan> {
        let ctx = &self.ctx;
        let mut read = vec![
            inputs.qq.named("qq"),
            inputs.kq.named("kq"),
            inputs.ql.named("ql"),
            inputs.kl.named("kl"),
            inputs.v.named("v"),
        ];
        read.extend(inputs.gate.map(|t| t.named("gate")));
        read.extend(inputs.key_mask.map(|t| t.named("key_mask")));
        read.extend(inputs.bias.map(|t| t.named("bias")));
        check_call_tensors(ctx, "flash", &[out.named("out")], &read)?;
        require_float::<T>("flash")?;
        let shape = inputs.shape(&self.opts)?;
        if out.shape() != [shape.b, shape.n, shape.e] {
            return Err(Error::shape(format!(
                "flash output shape {:?} must be [b, n, e] = {:?}",
                out.shape(),
                [shape.b, shape.n, shape.e]
            )));
        }
        let storage = Storage::for_dtype(ctx, T::DTYPE);
        let elem_bytes = storage.shader_dtype().size() as u64;
        let segs = segments(ctx, &self.opts, &shape, elem_bytes, inputs.bias.is_some())?;
        let mut plan = Plan::default();
        let mut bind = |t: &GpuTensor<T>| storage.input(ctx, &mut plan, t.buffer(), t.len());
        let bound = Bound {
            qq: bind(inputs.qq)?,
            kq: bind(inputs.kq)?,
            ql: bind(inputs.ql)?,
            kl: bind(inputs.kl)?,
            v: bind(inputs.v)?,
            gate: inputs.gate.map(&mut bind).transpose()?,
            bias: inputs.bias.map(|b| b.buffer().clone()),
            key_mask: inputs.key_mask.map(|m| m.buffer().clone()),
            out: storage.output(ctx, out.buffer(), out.len())?,
        };
        let dtype = storage.shader_dtype();
        let rope_offset = self.opts.rope.map_or(0, |r| r.offset);
        if let [whole] = segs.as_slice() {
            let scratch = Scratch::new(ctx, &self.opts, &shape, whole)?;
            scratch.keep_in(&mut plan);
            let one = Call {
                row_begin: 0,
                state: None,
                scan: Scan::Prefix,
                outputs: true,
                rope_offset,
                batch_rows: None,
                scratch: &scratch,
            };
            let (p, table) = passes(ctx, &self.opts, &shape, dtype, &bound, &one, whole)?;
            RopeTable::write(table, ctx, &scratch.kv)?;
            plan.extend(p);
        } else {
            // Segments: each batch item's chunks in order, the state carrying the KV sum from
            // one segment to the next. Non-causal outputs need every chunk's sum first: one
            // sweep sums, a second writes. Causal `length` needs every chunk's count first:
            // one sweep counts, a second writes.
            let whole_count =
                self.opts.lin_norm == LinNorm::Length && self.opts.lin_scale.is_none();
            let sweeps: &[(Scan, bool)] = match (self.opts.causal, whole_count) {
                (false, _) => &[(Scan::PrefixIntoState, false), (Scan::TotalFromState, true)],
                (true, false) => &[(Scan::PrefixIntoState, true)],
                (true, true) => &[
                    (Scan::CountsIntoState, false),
                    (Scan::PrefixIntoStateCountFromState, true),
                ],
            };
            let scratch = segs
                .iter()
                .map(|seg| Scratch::new(ctx, &self.opts, &shape, seg))
                .collect::<Result<Vec<_>>>()?;
            // The sweeps leave their sums in the state, and a plan may be recorded again:
            // every recording first copies zeros over it.
            let state_bytes = ((shape.s * shape.e + 1) as u64 * 4).next_multiple_of(16);
            let zeros = ctx.scratch(state_bytes)?;
            for bi in 0..shape.b {
                let state = ctx.scratch(state_bytes)?;
                plan.extend(copy::plan(ctx, &zeros, &state, state_bytes)?);
                for &(scan, outputs) in sweeps {
                    for (seg, scratch) in segs.iter().zip(&scratch).filter(|(g, _)| g.batch == bi) {
                        let c = Call {
                            row_begin: 0,
                            state: Some(&state),
                            scan,
                            outputs,
                            rope_offset,
                            batch_rows: None,
                            scratch,
                        };
                        let (p, table) = passes(ctx, &self.opts, &shape, dtype, &bound, &c, seg)?;
                        RopeTable::write(table, ctx, &scratch.kv)?;
                        plan.extend(p);
                    }
                }
                plan.keep(state);
            }
            plan.keep(zeros);
            for sc in &scratch {
                sc.keep_in(&mut plan);
            }
        }
        storage.finish_output(ctx, &mut plan, bound.out, out.buffer(), out.len())?;
        Ok(plan)
    }
}

/// The three passes (scores and KV per chunk, prefix scan, output) of one segment of a call
/// over bound buffers, and the RoPE table they read from the scratch (the caller writes it).
fn passes(
    ctx: &Context,
    opts: &FlashOptions,
    sh: &FlashShape,
    dtype: DType,
    bound: &Bound,
    call: &Call<'_>,
    seg: &Segment,
) -> Result<(Plan, Option<RopeTable>)> {
    let scratch = call.scratch;
    let (r0, n) = seg.rows(sh);
    let (b, s, e, g) = (seg.batches, sh.s, sh.e, seg.chunks);
    let pstride = opts.chunk.min(n);
    // kv scratch: KV slots (each in `splits` parts), counts, then the RoPE (cos, sin) table.
    // No more parts than the call's scratch holds: a decoder's is sized for a whole chunk,
    // and a step of fewer rows (a smaller RoPE table) could otherwise choose more.
    let rope = opts.rope.is_some();
    let splits = (1..=seg.kv_splits(ctx, sh, rope))
        .rev()
        .find(|&p| seg.kv_floats(sh, rope, p).saturating_mul(4) <= scratch.kv.size())
        .unwrap_or(1);
    // Parts of whole staging steps.
    let split_len = opts.chunk.div_ceil(splits).next_multiple_of(GEMM_BK);
    let slots = b * (g + 1);
    let count_base = slots * splits * s * e;
    let rope_base = count_base + slots;
    let table = match &opts.rope {
        Some(r) => {
            // Checked: an offset near u64::MAX must fail the position check, not wrap.
            let offset = call.rope_offset.checked_add(r0 as u64).ok_or_else(|| {
                Error::option("flash rope offset plus the position passes u64::MAX")
            })?;
            let ropts = RopeOptions {
                offset,
                ..r.rope_options()
            };
            let rows = position_rows(&ropts, 1, n, None)?;
            cos_sin_table(&ropts, s, &rows)?
        }
        None => Vec::new(),
    };
    let kv = &scratch.kv;
    let table = (!table.is_empty()).then(|| RopeTable {
        offset: rope_base as u64 * 4,
        values: table.into_iter().flatten().collect(),
    });
    let state = match call.state {
        Some(st) => st.clone(),
        None => ctx.scratch((b * s * e + b) as u64 * 4)?,
    };

    // The segment's rows of each tensor, bound from the aligned offset at or before its first
    // row; the shader adds the element offset of that row.
    let align = ctx.limits().min_storage_buffer_offset_alignment as u64;
    let elem = dtype.size() as u64;
    let first = (seg.batch * sh.n + r0) as u64;
    let batch_rows = call.batch_rows.unwrap_or(n);
    let count = (b * batch_rows) as u64;
    let view = |buf, width: usize| {
        rows_binding(buf, width as u64 * elem, first..first + count, align, elem)
    };
    // The key mask, one byte a row, bound by the segment's rows as the tensors are.
    let (mask, mask_base) = match &bound.key_mask {
        Some(m) => rows_binding(m, 1, first..first + count, align, 1),
        None => (scratch.absent.as_entire_buffer_binding(), 0),
    };

    let (norm, lin_scale) = match (opts.lin_scale, opts.lin_norm) {
        (Some(z), _) => (NORM_CONSTANT, z),
        (None, LinNorm::Chunk) => (NORM_CONSTANT, 1.0 / opts.chunk as f32),
        (None, LinNorm::Length) => (NORM_LENGTH, 0.0),
        (None, LinNorm::Prefix) => (NORM_PREFIX, 0.0),
    };
    let flag = |on: bool, f: u32| if on { f } else { 0 };
    let flags = flag(opts.causal, FLAG_CAUSAL)
        | flag(bound.gate.is_some(), FLAG_GATE)
        | flag(bound.bias.is_some(), FLAG_BIAS)
        | flag(bound.key_mask.is_some(), FLAG_MASK)
        | flag(opts.rope.is_some(), FLAG_ROPE)
        | flag(opts.attn_fn == AttnFn::Laplace, FLAG_LAPLACE)
        | flag(
            matches!(
                call.scan,
                Scan::PrefixIntoState | Scan::CountsIntoState | Scan::PrefixIntoStateCountFromState
            ),
            FLAG_UPDATE_STATE,
        )
        | flag(call.scan == Scan::TotalFromState, FLAG_TOTAL_FROM_STATE)
        | flag(call.scan == Scan::CountsIntoState, FLAG_COUNTS_ONLY)
        | flag(
            call.scan == Scan::PrefixIntoStateCountFromState,
            FLAG_COUNT_FROM_STATE,
        )
        | flag(call.state.is_none(), FLAG_NO_STATE);
    let tiles = pstride.div_ceil(GEMM_BLOCK);
    let stiles = s.div_ceil(GEMM_BLOCK);
    let etiles = e.div_ceil(GEMM_BLOCK);
    let u = |x: usize| x as u32;
    let (qq, qk_base) = view(&bound.qq, s);
    let (kq, _) = view(&bound.kq, s);
    let (ql, _) = view(&bound.ql, s);
    let (kl, _) = view(&bound.kl, s);
    let (v, v_base) = view(&bound.v, e);
    // A decoding step writes only its new rows, into an output of their own: bound whole.
    let out = if call.batch_rows.is_none() {
        view(&bound.out, e).0
    } else {
        bound.out.as_entire_buffer_binding()
    };
    let params = ctx.uniform(&Params {
        n: u(n),
        s: u(s),
        e: u(e),
        chunk: u(opts.chunk),
        groups: u(g),
        tiles: u(tiles),
        stiles: u(stiles),
        etiles: u(etiles),
        batch: u(b),
        row_begin: u(call.row_begin),
        flags,
        norm,
        kappa: opts.kappa(),
        lin_scale,
        rope_base: u(rope_base),
        count_base: u(count_base),
        pstride: u(pstride),
        qk_base,
        v_base,
        mask_base,
        batch_rows: u(batch_rows),
        splits: u(splits),
        split_len: u(split_len),
        pad: 0,
    })?;
    // Activated scores of every chunk, [b, G, pstride, pstride].
    let scores = &scratch.scores;
    // Absent optional inputs are bound to the scratch's small buffer.
    let ent = wgpu::Buffer::as_entire_buffer_binding;
    // The bias is bound over its [C, C] f32s only: an application's buffer may be larger.
    let bias = match &bound.bias {
        Some(bb) => data_binding(bb, opts.chunk * opts.chunk, DType::F32),
        None => ent(&scratch.absent),
    };
    let gate = match &bound.gate {
        Some(gb) => view(gb, e).0,
        None => ent(&scratch.absent),
    };
    // The block-product entry points reach every input through gemm_a / gemm_b; each binds
    // all of them but those it has no use for (a pipeline's layout lists only what its entry
    // point uses).
    let products = [
        (0, qq),
        (1, kq),
        (2, ql),
        (3, kl),
        (4, v),
        (5, gate),
        (6, out),
        (7, mask),
        (8, bias),
        (9, ent(&params)),
        (10, ent(kv)),
        (12, ent(scores)),
    ];
    let product = |entry, unused: &[u32], workgroups: usize| {
        let bindings: Vec<_> = products
            .iter()
            .filter(|(i, _)| !unused.contains(i))
            .cloned()
            .collect();
        Step::new(ctx, &variant(dtype, entry), &bindings, workgroups as u64)
    };
    let mut plan = Plan::default();
    plan.push(product(
        "flash_chunks",
        &[5, 6],
        b * g * (tiles * tiles + splits * stiles * etiles),
    )?);
    plan.push(Step::new(
        ctx,
        &variant(dtype, "flash_scan"),
        &[(9, ent(&params)), (10, ent(kv)), (11, ent(&state))],
        (b * s * e + b).div_ceil(GEMM_WG) as u64,
    )?);
    if call.outputs {
        plan.push(product("flash_out", &[8], b * g * tiles * etiles)?);
    }
    plan.keep(params);
    plan.keep(state);
    Ok((plan, table))
}

/// The fused RoPE's (cos, sin) table of a call, for its scratch's `kv` at `offset` bytes:
/// the passes read it there.
struct RopeTable {
    offset: u64,
    values: Vec<f32>,
}

impl RopeTable {
    /// Writes the table now, through the queue: for a call whose scratch is its own.
    fn write(table: Option<Self>, ctx: &Context, kv: &wgpu::Buffer) -> Result<()> {
        let Some(t) = table else { return Ok(()) };
        ctx.checked("writing the flash RoPE table", || {
            ctx.queue()
                .write_buffer(kv, t.offset, bytemuck::cast_slice(&t.values))
        })
    }

    /// Records the table's copy into `encoder`: for scratch shared by calls recorded one
    /// after another (a decoder's steps), where a queue write would land before all of them.
    fn record(
        table: Option<Self>,
        ctx: &Context,
        encoder: &mut wgpu::CommandEncoder,
        kv: &wgpu::Buffer,
    ) -> Result<()> {
        let Some(t) = table else { return Ok(()) };
        let src = ctx.upload(&t.values, [t.values.len()])?;
        encoder.copy_buffer_to_buffer(src.buffer(), 0, kv, t.offset, t.values.len() as u64 * 4);
        Ok(())
    }
}

/// Tokens for one [`FlashDecoder::step`]: `t` new tokens of every batch item, C order.
#[derive(Clone, Copy, Debug)]
pub struct FlashBlock<'a> {
    /// `[b, t, s]`.
    pub qq: &'a [f32],
    /// `[b, t, s]`.
    pub kq: &'a [f32],
    /// `[b, t, s]`.
    pub ql: &'a [f32],
    /// `[b, t, s]`.
    pub kl: &'a [f32],
    /// `[b, t, e]`.
    pub v: &'a [f32],
    /// `[b, t, e]`, when the decoder was made with a gate.
    pub gate: Option<&'a [f32]>,
    /// `[b, t]`, true = keep; `None` keeps every token.
    pub key_mask: Option<&'a [bool]>,
}

/// Tokens for one [`FlashDecoder::step_gpu`], already on the GPU: `t` new tokens of every
/// batch item.
#[derive(Clone, Copy, Debug)]
pub struct FlashGpuBlock<'a> {
    /// `[b, t, s]`.
    pub qq: &'a GpuTensor<f32>,
    /// `[b, t, s]`.
    pub kq: &'a GpuTensor<f32>,
    /// `[b, t, s]`.
    pub ql: &'a GpuTensor<f32>,
    /// `[b, t, s]`.
    pub kl: &'a GpuTensor<f32>,
    /// `[b, t, e]`.
    pub v: &'a GpuTensor<f32>,
    /// `[b, t, e]`, when the decoder was made with a gate.
    pub gate: Option<&'a GpuTensor<f32>>,
    /// `[b, t]` on the host (a few bytes per step), true = keep; `None` keeps every token.
    pub key_mask: Option<&'a [bool]>,
}

/// Incremental causal FLASH: feed tokens one at a time or in blocks; the outputs equal those
/// of one causal call over the whole sequence.
///
/// The GPU holds the state (the sum of `kl^T v` and the valid-key count over completed chunks)
/// and the current partial chunk's rows; each step copies in only the new tokens, so a step
/// costs O(C (s + e)) work per batch item, never O(n). Feed host data with [`Self::step`] or
/// GPU tensors with [`Self::step_gpu`]. Storage is f32.
///
/// ```
/// # use seq_kernels::{Context, FlashBlock, FlashDecoder, FlashOptions};
/// # if seq_kernels::context::skip_example_without_adapter() { return Ok(()); }
/// let ctx = Context::new()?;
/// let opts = FlashOptions { chunk: 64, causal: true, ..Default::default() };
/// let (b, s, e) = (1, 32, 48);
/// let mut dec = FlashDecoder::new(&ctx, &opts, b, s, e, false, None)?;
/// let (x, y) = (vec![0.1f32; b * s], vec![0.2f32; b * e]);
/// let token = FlashBlock { qq: &x, kq: &x, ql: &x, kl: &x, v: &y, gate: None, key_mask: None };
/// let out = dec.step(&token, 1)?; // [b, 1, e]
/// assert_eq!(out.len(), b * e);
/// # Ok::<(), seq_kernels::Error>(())
/// ```
pub struct FlashDecoder {
    ctx: Context,
    opts: FlashOptions,
    b: usize,
    s: usize,
    e: usize,
    gated: bool,
    bias: Option<GpuTensor<f32>>,
    /// `[b, s, e]` KV sum over completed chunks, then `[b]` valid-key counts.
    state: wgpu::Buffer,
    /// The current chunk's rows, `[b, C, width]` each: qq, kq, ql, kl, v, and the gate when
    /// gated. Rows past `fill` are stale and never read.
    rows: Vec<GpuTensor<f32>>,
    /// The current chunk's key mask `[b, C]`, kept on the host and written before each piece.
    mask: Vec<bool>,
    mask_gpu: GpuTensor<u8>,
    /// The passes' scratch, sized for a full chunk and shared by every step.
    scratch: Scratch,
    fill: usize,
    /// Tokens consumed before the current chunk.
    start: u64,
}

impl FlashDecoder {
    /// A decoder for `b` sequences of widths s and e. Needs `causal`; `lin_norm` must not be
    /// `Length` (it depends on the whole sequence). `bias` is `[C, C]` as in one-shot calls.
    ///
    /// # Errors
    ///
    /// Besides the [errors common to every
    /// kernel](crate::kernels#errors-common-to-every-kernel) (a first step's dispatches are
    /// built here):
    /// - [`Error::InvalidOption`] if `causal` is off, or `lin_norm` is `Length` without
    ///   `lin_scale`; as [`Flash::plan`] for the options, a fused RoPE with an odd s and a
    ///   chunk too large for one storage binding; or if the fused RoPE's offset passes
    ///   [`MAX_POSITION`](crate::kernels::rope::MAX_POSITION).
    /// - [`Error::Shape`] if b, s or e is 0, s passes [`MAX_S`], or `bias` does not hold C x C
    ///   values.
    /// - [`Error::LimitExceeded`] if a chunk of 1 does not fit one storage binding, or a
    ///   chunk's rows, the KV or score scratch pass `max_storage_buffer_binding_size` or
    ///   `u32::MAX` elements.
    pub fn new(
        ctx: &Context,
        opts: &FlashOptions,
        b: usize,
        s: usize,
        e: usize,
        gated: bool,
        bias: Option<&[f32]>,
    ) -> Result<Self> {
        if !opts.causal {
            return Err(Error::option(
                "flash decoding is causal: set causal = true (a non-causal output depends on future tokens)",
            ));
        }
        if opts.lin_norm == LinNorm::Length && opts.lin_scale.is_none() {
            return Err(Error::option(
                "flash decoding cannot use lin_norm = length (it needs the whole sequence's length); \
                 use chunk or prefix, or set lin_scale",
            ));
        }
        if b == 0 || s == 0 || e == 0 {
            return Err(Error::shape(format!(
                "flash decoder needs b, s and e of at least 1, got b = {b}, s = {s}, e = {e}"
            )));
        }
        let bias_shape = [opts.chunk, opts.chunk];
        let one: &[usize] = &[b, 1, s];
        flash_shape(
            [one; 4],
            &[b, 1, e],
            gated.then_some(&[b, 1, e][..]),
            bias.map(|_| &bias_shape[..]),
            None,
            opts,
        )?;
        if let Some(v) = bias.filter(|v| v.len() != opts.chunk * opts.chunk) {
            return Err(Error::shape(format!(
                "flash decoder bias must hold C x C = {} values (C = {}), got {}",
                opts.chunk * opts.chunk,
                opts.chunk,
                v.len()
            )));
        }
        let c = opts.chunk;
        // Every step binds a whole chunk's rows, scores, KV sums and the bias.
        let needed = |c: usize| {
            let full = Self::chunk_shape(b, c, s, e, c);
            largest_binding(ctx, opts, &full, &Segment::whole(&full), 4, bias.is_some())
        };
        if needed(c) > ctx.limits().max_storage_buffer_binding_size {
            return Err(chunk_too_large(ctx, c, needed));
        }
        // The rows' elements must stay addressable by u32 indices (saturating: past u64 is
        // past any limit).
        let row_bytes = [b, c, s.max(e), 4]
            .iter()
            .fold(1u64, |a, &x| a.saturating_mul(x as u64));
        check_binding(ctx, "the flash decoder's chunk rows", row_bytes, 4)?;
        let bias = bias.map(|v| ctx.upload(v, bias_shape)).transpose()?;
        let state = ctx.scratch((b * s * e + b) as u64 * 4)?;
        let widths = [s, s, s, s, e, e];
        let rows = widths[..if gated { 6 } else { 5 }]
            .iter()
            .map(|&w| ctx.zeros::<f32>([b, c, w]))
            .collect::<Result<Vec<_>>>()?;
        let mask = vec![true; b * c];
        let mask_gpu = ctx.upload_mask(&mask, [b, c])?;
        let full = Self::chunk_shape(b, c, s, e, c);
        let scratch = Scratch::new(ctx, opts, &full, &Segment::whole(&full))?;
        let decoder = Self {
            ctx: ctx.clone(),
            opts: opts.clone(),
            b,
            s,
            e,
            gated,
            bias,
            state,
            rows,
            mask,
            mask_gpu,
            scratch,
            fill: 0,
            start: 0,
        };
        // A first step's dispatches, built and dropped: a device that cannot run them is
        // refused here rather than at the first token, and the pipelines are compiled.
        decoder.run_piece(1, &ctx.zeros::<f32>([b, 1, e])?)?;
        Ok(decoder)
    }

    /// Tokens consumed so far.
    pub fn position(&self) -> u64 {
        self.start + self.fill as u64
    }

    /// Feeds `t` tokens of every batch item and returns their outputs, `[b, t, e]`.
    ///
    /// # Errors
    ///
    /// [`Error::Shape`] if `t` is 0 or a slice of `block` does not hold `[b, t, width]`
    /// values; else as [`Context::upload`] for the block, [`FlashDecoder::step_gpu`], and
    /// [`GpuTensor::download`] for the outputs.
    pub fn step(&mut self, block: &FlashBlock<'_>, t: usize) -> Result<Vec<f32>> {
        let (b, s, e) = (self.b, self.s, self.e);
        let check = |name: &str, got: usize, width: usize| {
            let want = shape_elements(format_args!("flash decoder {name}"), &[b, t, width])?;
            if got != want {
                Err(Error::shape(format!(
                    "flash decoder {name} has {got} values; expected [b, t, {width}] = {want}"
                )))
            } else {
                Ok(())
            }
        };
        if t == 0 {
            return Err(Error::shape("flash decoder step needs at least one token"));
        }
        for (name, x) in [
            ("qq", block.qq),
            ("kq", block.kq),
            ("ql", block.ql),
            ("kl", block.kl),
        ] {
            check(name, x.len(), s)?;
        }
        check("v", block.v.len(), e)?;
        if let Some(gt) = block.gate {
            check("gate", gt.len(), e)?;
        }
        let ctx = &self.ctx;
        let up = |x: &[f32], w: usize| ctx.upload(x, [b, t, w]);
        let (qq, kq, ql, kl, v) = (
            up(block.qq, s)?,
            up(block.kq, s)?,
            up(block.ql, s)?,
            up(block.kl, s)?,
            up(block.v, e)?,
        );
        let gate = block.gate.map(|g| up(g, e)).transpose()?;
        self.step_gpu(&FlashGpuBlock {
            qq: &qq,
            kq: &kq,
            ql: &ql,
            kl: &kl,
            v: &v,
            gate: gate.as_ref(),
            key_mask: block.key_mask,
        })?
        .download()
    }

    /// Feeds the tokens of a block on the GPU and returns their outputs, `[b, t, e]`, on the
    /// GPU (t from the block's shapes).
    ///
    /// # Errors
    ///
    /// As [`Context::zeros`] for the outputs and [`FlashDecoder::encode_step`], and
    /// [`Error::Device`] if the submission fails (the decoder then stays where it was).
    pub fn step_gpu(&mut self, block: &FlashGpuBlock<'_>) -> Result<GpuTensor<f32>> {
        let t = block.qq.shape().get(1).copied().unwrap_or(0);
        let out = self.ctx.zeros::<f32>([self.b, t.max(1), self.e])?;
        let mut encoder = self.ctx.encoder();
        let before = self.progress();
        self.encode_step(&mut encoder, block, &out)?;
        let ctx = self.ctx.clone();
        let submitted = ctx.checked("submitting a flash decoding step", || {
            ctx.queue().submit([encoder.finish()])
        });
        if let Err(err) = submitted {
            self.restore(before);
            return Err(err);
        }
        Ok(out)
    }

    /// Records the step of a block into `encoder`, its outputs into `out`, `[b, t, e]`; no
    /// submit. The decoder moves on when the step is recorded, so submit the encoders of
    /// successive steps in the order they were recorded (everything a step needs, its key
    /// mask included, travels in the encoder). An error here leaves the decoder where it was;
    /// an encoder of yours that then fails to finish or submit does not, so make a new
    /// decoder after that.
    ///
    /// # Errors
    ///
    /// Besides the [errors common to every
    /// kernel](crate::kernels#errors-common-to-every-kernel):
    /// - [`Error::Shape`] if qq is not `[b, t, s]` with t >= 1; if kq, ql or kl is not
    ///   `[b, t, s]`, or v, the gate or `out` not `[b, t, e]`; if a gate is given to a decoder
    ///   made without one, or none to one made with one; or if `key_mask` does not hold
    ///   b x t values.
    /// - [`Error::InvalidOption`] if an input's buffer lacks `BufferUsages::COPY_SRC`; if
    ///   `out`'s lacks `COPY_DST` and the step crosses a chunk's end; or if the fused RoPE's
    ///   positions pass [`MAX_POSITION`](crate::kernels::rope::MAX_POSITION).
    pub fn encode_step(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        block: &FlashGpuBlock<'_>,
        out: &GpuTensor<f32>,
    ) -> Result<()> {
        let (b, s, e, c) = (self.b, self.s, self.e, self.opts.chunk);
        let t = match block.qq.shape() {
            &[bb, t, ss] if bb == b && ss == s && t > 0 => t,
            other => {
                return Err(Error::shape(format!(
                    "flash decoder qq is {other:?}; expected [b, t, s] = [{b}, t >= 1, {s}]"
                )))
            }
        };
        let mut ins = vec![
            ("qq", block.qq, s),
            ("kq", block.kq, s),
            ("ql", block.ql, s),
            ("kl", block.kl, s),
            ("v", block.v, e),
        ];
        match (self.gated, block.gate) {
            (true, Some(g)) => ins.push(("gate", g, e)),
            (false, None) => {}
            (true, None) => {
                return Err(Error::shape("flash decoder was made with a gate; give one"))
            }
            (false, Some(_)) => {
                return Err(Error::shape(
                    "flash decoder was made without a gate; make it with gated = true",
                ))
            }
        }
        let read: Vec<_> = ins.iter().map(|(n, x, _)| x.named(n)).collect();
        check_call_tensors(&self.ctx, "flash decoder", &[out.named("out")], &read)?;
        for (name, x, w) in ins.iter().chain([&("out", out, e)]) {
            if x.shape() != [b, t, *w] {
                return Err(Error::shape(format!(
                    "flash decoder {name} is {:?}; expected [b, t, {w}] = {:?}",
                    x.shape(),
                    [b, t, *w]
                )));
            }
        }
        if let Some(m) = block.key_mask {
            if m.len() != b * t {
                return Err(Error::shape(format!(
                    "flash decoder key_mask has {} values; expected [b, t] = {}",
                    m.len(),
                    b * t
                )));
            }
        }
        // The copies need COPY_SRC on the inputs, and COPY_DST on the output of a step of
        // several pieces: checked now, as at submit the decoder would have moved on.
        for (name, x, _) in &ins {
            if !x.buffer().usage().contains(wgpu::BufferUsages::COPY_SRC) {
                return Err(Error::option(format!(
                    "flash decoder {name} needs BufferUsages::COPY_SRC (its rows are copied into the decoder's chunk)"
                )));
            }
        }
        if t > c - self.fill && !out.buffer().usage().contains(wgpu::BufferUsages::COPY_DST) {
            return Err(Error::option(
                "flash decoder output needs BufferUsages::COPY_DST when a step crosses a chunk's end",
            ));
        }
        // A failure part-way leaves the decoder where it was.
        let before = self.progress();
        let recorded = self.record_pieces(encoder, &ins, block.key_mask, out, t);
        if recorded.is_err() {
            self.restore(before);
        }
        recorded
    }

    /// Where the decoder stands: chunk fill, chunk start and the chunk's key mask.
    fn progress(&self) -> (usize, u64, Vec<bool>) {
        (self.fill, self.start, self.mask.clone())
    }

    fn restore(&mut self, (fill, start, mask): (usize, u64, Vec<bool>)) {
        (self.fill, self.start, self.mask) = (fill, start, mask);
    }

    /// Records a checked step: piece by piece up to the chunk's end, the decoder moving on.
    fn record_pieces(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        ins: &[(&str, &GpuTensor<f32>, usize)],
        key_mask: Option<&[bool]>,
        out: &GpuTensor<f32>,
        t: usize,
    ) -> Result<()> {
        let (b, e, c) = (self.b, self.e, self.opts.chunk);
        let ctx = &self.ctx;
        let mut done = 0;
        while done < t {
            let take = (c - self.fill).min(t - done);
            // The new rows into the chunk, then one call over the chunk's rows so far that
            // writes only them, then their outputs into place.
            for ((_, src, w), dst) in ins.iter().zip(&self.rows) {
                let row = (*w * 4) as u64;
                for bi in 0..b {
                    encoder.copy_buffer_to_buffer(
                        src.buffer(),
                        (bi * t + done) as u64 * row,
                        dst.buffer(),
                        (bi * c + self.fill) as u64 * row,
                        take as u64 * row,
                    );
                }
            }
            for bi in 0..b {
                for i in 0..take {
                    self.mask[bi * c + self.fill + i] =
                        key_mask.is_none_or(|m| m[bi * t + done + i]);
                }
            }
            // The mask goes through the encoder (a queue write would land before every
            // recorded step, not between them).
            let mask = ctx.upload_mask(&self.mask, [b, c])?;
            let size = mask.buffer().size();
            encoder.copy_buffer_to_buffer(mask.buffer(), 0, self.mask_gpu.buffer(), 0, size);
            let record = |encoder: &mut wgpu::CommandEncoder, piece: &GpuTensor<f32>| {
                let (plan, table) = self.run_piece(take, piece)?;
                RopeTable::record(table, ctx, encoder, &self.scratch.kv)?;
                plan.encode(encoder);
                Ok::<_, Error>(())
            };
            if take == t {
                // The whole block in one piece: its outputs are the step's.
                record(encoder, out)?;
            } else {
                let piece = ctx.zeros::<f32>([b, take, e])?;
                record(encoder, &piece)?;
                let row = (e * 4) as u64;
                for bi in 0..b {
                    encoder.copy_buffer_to_buffer(
                        piece.buffer(),
                        (bi * take) as u64 * row,
                        out.buffer(),
                        (bi * t + done) as u64 * row,
                        take as u64 * row,
                    );
                }
            }
            done += take;
            self.fill += take;
            if self.fill == c {
                self.start += c as u64;
                self.fill = 0;
            }
        }
        Ok(())
    }

    /// The passes over the chunk's rows so far after `take` new ones were copied in, writing
    /// the new rows' outputs into `piece`, `[b, take, e]`.
    fn run_piece(&self, take: usize, piece: &GpuTensor<f32>) -> Result<(Plan, Option<RopeTable>)> {
        let (b, n, c) = (self.b, self.fill + take, self.opts.chunk);
        let shape = Self::chunk_shape(b, n, self.s, self.e, c);
        let buf = |i: usize| self.rows[i].buffer().clone();
        let bound = Bound {
            qq: buf(0),
            kq: buf(1),
            ql: buf(2),
            kl: buf(3),
            v: buf(4),
            gate: self.gated.then(|| buf(5)),
            bias: self.bias.as_ref().map(|x| x.buffer().clone()),
            key_mask: Some(self.mask_gpu.buffer().clone()),
            out: piece.buffer().clone(),
        };
        let call = Call {
            row_begin: self.fill,
            state: Some(&self.state),
            scan: if n == c {
                Scan::PrefixIntoState
            } else {
                Scan::Prefix
            },
            outputs: true,
            rope_offset: self
                .opts
                .rope
                .map_or(0, |r| r.offset)
                .saturating_add(self.start),
            batch_rows: Some(c),
            scratch: &self.scratch,
        };
        let whole = Segment::whole(&shape);
        passes(
            &self.ctx,
            &self.opts,
            &shape,
            DType::F32,
            &bound,
            &call,
            &whole,
        )
    }

    /// The shape of one call over the current chunk's first n rows.
    fn chunk_shape(b: usize, n: usize, s: usize, e: usize, chunk: usize) -> FlashShape {
        FlashShape {
            b,
            n,
            s,
            e,
            chunk,
            groups: 1,
        }
    }
}

impl Context {
    /// FLASH mixed-chunk attention into a new tensor `[b, n, e]`.
    ///
    /// # Errors
    ///
    /// As [`Flash::new`] and [`Flash::plan`], and those of [allocating the output and running
    /// the call](crate::kernels#errors-common-to-every-kernel).
    pub fn flash<T: Element>(
        &self,
        inputs: &FlashInputs<'_, T>,
        opts: &FlashOptions,
    ) -> Result<GpuTensor<T>> {
        let sh = inputs.shape(opts)?;
        let out = self.zeros::<T>([sh.b, sh.n, sh.e])?;
        Flash::new(self, opts)?.plan(inputs, &out)?.run(self)?;
        Ok(out)
    }
}
