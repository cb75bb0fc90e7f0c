//! Softmax family over the last axis: softmax, log-softmax, temperature, scale, boolean mask,
//! bottom-right causal alignment and softmax_plus. Storage f32 or f16, accumulation f32.
//!
//! The row length n picks the path. Rows of n <= 16 take one invocation each (64 rows per
//! workgroup). Rows of n <= 16 x the device's largest power-of-two workgroup size (at most
//! 1024, so 16,384 values where such workgroups are allowed) take one workgroup per row, up to
//! 16 values per invocation held in registers: one read and one write. Longer rows go in tiles
//! of 4096 values: an online (max, sum) partial per tile, a merge per row, and a normalise
//! pass (softmax_plus with a mask first counts each row's valid entries, tile by tile).
//!
//! ```
//! use seq_kernels::{Context, SoftmaxOptions};
//! # if seq_kernels::context::skip_example_without_adapter() { return Ok(()); }
//! let ctx = Context::new()?;
//! let x = ctx.upload(&[3.0f32, 1.0, -2.0, 1000.0, 999.0], [1, 5])?;
//! let y = ctx.softmax(&x, &SoftmaxOptions { temperature: 0.7, ..Default::default() })?;
//! let p = y.download()?; // [0, 0, 0, 0.8067, 0.1933]: 1000 / 0.7 does not overflow
//! assert!((p[3] - 0.8067).abs() < 1e-4 && (p[4] - 0.1933).abs() < 1e-4);
//! # Ok::<(), seq_kernels::Error>(())
//! ```

use crate::context::Context;
use crate::convert::Storage;
use crate::dispatch::{based_row_chunks, check_call_tensors, rows_binding, BindingCap, Plan, Step};
use crate::error::{Error, Result};
use crate::shader::{compose, elem_header, reduce_wgsl, ShaderVariant, GRID_WGSL};
use crate::tensor::{require_float, shape_elements, DType, Element, GpuTensor};

const SOURCE: &str = include_str!("../../shaders/softmax.wgsl");

/// Register-held values per invocation for the short-row path (each a shader variant).
const ITEM_COUNTS: [u32; 5] = [1, 2, 4, 8, 16];
/// Workgroup size of the long-row passes and elements per tile.
const LONG_WG: u32 = 256;
const TILE_LEN: u32 = LONG_WG * 16;

const FLAG_LOG: u32 = 1;
const FLAG_MASK: u32 = 2;
const FLAG_CAUSAL: u32 = 4;
const FLAG_PLUS: u32 = 8;

/// Options of the softmax family (`y = softmax(scale * x / temperature)` over the last axis).
#[derive(Clone, Debug, PartialEq)]
pub struct SoftmaxOptions {
    /// Temperature T > 0 (default 1).
    pub temperature: f32,
    /// Multiplies the logits before the temperature (default 1).
    pub scale: f32,
    /// Log-softmax instead of softmax; masked entries give -inf.
    pub log: bool,
    /// Treat the last two axes as an [m, n] score matrix with bottom-right causal alignment:
    /// query i sees key j iff j <= i + (n - m).
    pub causal: bool,
    /// Multiply the logits by log(max(l, 16)) / log(512), l = unmasked entries of the row.
    pub softmax_plus: bool,
}

impl Default for SoftmaxOptions {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            scale: 1.0,
            log: false,
            causal: false,
            softmax_plus: false,
        }
    }
}

impl SoftmaxOptions {
    /// Checks the options' values.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidOption`] if `temperature` is not finite and > 0, or if
    /// `scale / temperature` is not finite.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(Error::option(format!(
                "softmax temperature must be finite and > 0, got {}",
                self.temperature
            )));
        }
        if !(self.scale / self.temperature).is_finite() {
            return Err(Error::option(format!(
                "softmax scale / temperature must be finite, got {} / {}",
                self.scale, self.temperature
            )));
        }
        Ok(())
    }
}

/// The geometry of a softmax call, checked once for the GPU and the CPU reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowShape {
    /// Number of rows (product of all axes but the last).
    pub rows: usize,
    /// Row length (last axis).
    pub n: usize,
    /// Second-to-last axis (queries of a causal [m, n] matrix); 1 for 1-D input.
    pub m: usize,
}

/// Checks the input (and optional mask) shape against the options.
pub fn row_shape(
    shape: &[usize],
    mask: Option<&[usize]>,
    opts: &SoftmaxOptions,
) -> Result<RowShape> {
    opts.validate()?;
    if shape.is_empty() || shape.contains(&0) {
        return Err(Error::shape(format!(
            "softmax input shape {shape:?} must be non-empty with no zero axis"
        )));
    }
    if let Some(ms) = mask {
        if ms != shape {
            return Err(Error::shape(format!(
                "softmax mask shape {ms:?} must equal the input shape {shape:?}"
            )));
        }
    }
    if opts.causal && shape.len() < 2 {
        return Err(Error::shape(format!(
            "causal softmax needs an [.., m, n] input, got shape {shape:?}"
        )));
    }
    let n = shape[shape.len() - 1];
    let m = if shape.len() >= 2 {
        shape[shape.len() - 2]
    } else {
        1
    };
    // The causal band is computed in i32 (j <= i + n - m).
    if opts.causal && m.max(n) > i32::MAX as usize {
        return Err(Error::LimitExceeded {
            what: "rows or columns of a causal softmax".into(),
            limit: "i32 band arithmetic",
            needed: m.max(n) as u64,
            max: i32::MAX as u64,
        });
    }
    Ok(RowShape {
        rows: shape_elements("softmax input", shape)? / n,
        n,
        m,
    })
}

/// Which path a row length takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RowPath {
    /// n <= 16: one invocation per row (`items` >= n), `wg` rows per workgroup.
    Thread { wg: u32, items: u32 },
    /// One workgroup of `wg` per row, `items` values per invocation in registers.
    Workgroup { wg: u32, items: u32 },
    /// Tiles of `TILE_LEN`: partials, merge, normalise.
    Long,
}

fn row_path(n: usize, max_wg: u32) -> RowPath {
    let max_items = ITEM_COUNTS[ITEM_COUNTS.len() - 1];
    if n <= max_items as usize {
        return RowPath::Thread {
            wg: 64.min(max_wg),
            items: n.next_power_of_two() as u32,
        };
    }
    let wg = if n <= 4096 {
        (n.div_ceil(4).next_power_of_two() as u32).clamp(64, 256)
    } else {
        max_wg
    };
    let wg = wg.min(max_wg);
    let items = (n.div_ceil(wg as usize).next_power_of_two()) as u32;
    if items <= max_items {
        RowPath::Workgroup { wg, items }
    } else {
        RowPath::Long
    }
}

/// Largest power-of-two workgroup size (<= 1024) the device allows.
fn max_workgroup(ctx: &Context) -> u32 {
    let l = ctx.limits();
    let m = l
        .max_compute_invocations_per_workgroup
        .min(l.max_compute_workgroup_size_x)
        .min(1024);
    1 << (31 - m.leading_zeros())
}

/// The shader variant for a storage type, reduction flavour, register count and entry point.
fn variant(
    dtype: DType,
    subgroups: bool,
    items: u32,
    entry: &'static str,
    wg: u32,
) -> ShaderVariant {
    let items_line = format!("const ITEMS: u32 = {items}u;\n");
    ShaderVariant {
        family: "softmax",
        variant: format!(
            "{}-{}-i{items}",
            dtype.name(),
            if subgroups { "subgroup" } else { "shared" }
        ),
        source: compose(&[
            elem_header(dtype),
            &items_line,
            GRID_WGSL,
            reduce_wgsl(subgroups),
            SOURCE,
        ]),
        entry,
        constants: vec![("WG".into(), wg as f64)],
    }
}

/// Every shader variant of the family (for the naga translation test).
pub fn shader_variants() -> Vec<ShaderVariant> {
    let mut out = Vec::new();
    for dtype in [DType::F32, DType::F16] {
        for subgroups in [false, true] {
            for items in ITEM_COUNTS {
                out.push(variant(dtype, subgroups, items, "softmax_row", 256));
                out.push(variant(dtype, subgroups, items, "softmax_thread_row", 64));
            }
            for entry in [
                "tile_counts",
                "row_counts",
                "tile_partials",
                "row_merge",
                "tile_normalize",
            ] {
                out.push(variant(dtype, subgroups, 1, entry, LONG_WG));
            }
        }
    }
    out
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    n: u32,
    m: u32,
    row_offset: u32,
    alpha: f32,
    flags: u32,
    tiles: u32,
    tile_len: u32,
    base: u32,
    mask_base: u32,
}

/// A softmax kernel with fixed options; pipelines are compiled on first use and cached in
/// the context.
///
/// Embedding into your own encoder:
/// ```
/// # use seq_kernels::{Context, Softmax, SoftmaxOptions};
/// # if seq_kernels::context::skip_example_without_adapter() { return Ok(()); }
/// # let ctx = Context::new()?;
/// # let x = ctx.upload(&vec![0.5f32; 8 * 100], [8, 100])?;
/// let y = ctx.zeros::<f32>([8, 100])?;
/// let k = Softmax::new(&ctx, &SoftmaxOptions { log: true, ..Default::default() })?;
/// let mut encoder = ctx.device().create_command_encoder(&Default::default());
/// k.encode(&mut encoder, &x, &y)?;
/// ctx.queue().submit([encoder.finish()]);
/// // Equal logits: every log-probability is -ln(100).
/// assert!(y.download()?.iter().all(|&l| (l + 100f32.ln()).abs() < 1e-5));
/// # Ok::<(), seq_kernels::Error>(())
/// ```
pub struct Softmax {
    ctx: Context,
    opts: SoftmaxOptions,
}

impl Softmax {
    /// Validates the options.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidOption`] as [`SoftmaxOptions::validate`].
    pub fn new(ctx: &Context, opts: &SoftmaxOptions) -> Result<Self> {
        opts.validate()?;
        Ok(Self {
            ctx: ctx.clone(),
            opts: opts.clone(),
        })
    }

    /// Records `y = softmax(x)` into `encoder` (no submit).
    ///
    /// # Errors
    ///
    /// As [`Softmax::plan`].
    pub fn encode<T: Element>(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        x: &GpuTensor<T>,
        y: &GpuTensor<T>,
    ) -> Result<()> {
        self.plan(x, None, y)?.encode(encoder);
        Ok(())
    }

    /// Records `y = softmax(x)` with a boolean mask (nonzero byte = keep) into `encoder`.
    ///
    /// # Errors
    ///
    /// As [`Softmax::plan`].
    pub fn encode_masked<T: Element>(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        x: &GpuTensor<T>,
        mask: &GpuTensor<u8>,
        y: &GpuTensor<T>,
    ) -> Result<()> {
        self.plan(x, Some(mask), y)?.encode(encoder);
        Ok(())
    }

    /// The dispatches of one call, to record as often as needed (benchmarks, graphs).
    ///
    /// # Errors
    ///
    /// Besides the [errors common to every
    /// kernel](crate::kernels#errors-common-to-every-kernel):
    /// - [`Error::Dtype`] unless `T` is f32 or f16.
    /// - [`Error::Shape`] if `mask` or `y` has another shape than `x`, or if `causal` is set
    ///   and `x` is 1-D.
    /// - [`Error::LimitExceeded`] if the rows of `x` (f32 where f16 is widened) or of `mask`
    ///   are too long to bind within `max_storage_buffer_binding_size` (of which at most
    ///   2^31 bytes are used), or if `causal` is set and the last two axes pass `i32::MAX`.
    pub fn plan<T: Element>(
        &self,
        x: &GpuTensor<T>,
        mask: Option<&GpuTensor<u8>>,
        y: &GpuTensor<T>,
    ) -> Result<Plan> {
        let ctx = &self.ctx;
        let mut read = vec![x.named("x")];
        read.extend(mask.map(|m| m.named("mask")));
        check_call_tensors(ctx, "softmax", &[y.named("y")], &read)?;
        require_float::<T>("softmax")?;
        let shape = row_shape(x.shape(), mask.map(|m| m.shape()), &self.opts)?;
        if y.shape() != x.shape() {
            return Err(Error::shape(format!(
                "softmax output shape {:?} must equal the input shape {:?}",
                y.shape(),
                x.shape()
            )));
        }
        let mut plan = Plan::default();
        let storage = Storage::for_dtype(ctx, T::DTYPE);
        let len = x.len();
        let xs = storage.input(ctx, &mut plan, x.buffer(), len)?;
        let ys = storage.output(ctx, y.buffer(), len)?;
        let dummy = ctx.scratch(16)?;
        let mask_buf = mask
            .map(|m| m.buffer().clone())
            .unwrap_or_else(|| dummy.clone());
        self.plan_rows(
            &mut plan,
            shape,
            storage.shader_dtype(),
            &xs,
            &ys,
            &mask_buf,
            mask.is_some(),
            &dummy,
        )?;
        storage.finish_output(ctx, &mut plan, ys, y.buffer(), len)?;
        plan.keep(dummy);
        Ok(plan)
    }

    #[allow(clippy::too_many_arguments)]
    fn plan_rows(
        &self,
        plan: &mut Plan,
        shape: RowShape,
        dtype: DType,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        mask: &wgpu::Buffer,
        masked: bool,
        dummy: &wgpu::Buffer,
    ) -> Result<()> {
        let ctx = &self.ctx;
        let limits = ctx.limits();
        let subgroups = ctx.has_subgroups();
        let max_wg = max_workgroup(ctx);
        let n = shape.n as u64;
        let o = &self.opts;
        let flags = ((o.log as u32) * FLAG_LOG)
            | ((masked as u32) * FLAG_MASK)
            | ((o.causal as u32) * FLAG_CAUSAL)
            | ((o.softmax_plus as u32) * FLAG_PLUS);
        // Whole words: f16 and mask ranges are bound rounded up to whole words, which then
        // still fit.
        let max_binding = BindingCap::of(ctx);
        let align = limits.min_storage_buffer_offset_alignment as u64;
        let elem_bytes = dtype.size() as u64;
        let mut row_bytes = vec![n * elem_bytes];
        row_bytes.extend(masked.then_some(n));
        let chunks = based_row_chunks(shape.rows as u64, &row_bytes, max_binding, align)?;
        let path = row_path(shape.n, max_wg);
        let tiles = n.div_ceil(TILE_LEN as u64);
        let max_rows = chunks.iter().map(|c| c.end - c.start).max().unwrap_or(1);
        // Long-row scratch, shared by all chunks (dispatches run in order).
        let (counts, partials, stats) = if path == RowPath::Long {
            (
                ctx.scratch(max_rows * 4)?,
                ctx.scratch(max_rows * tiles * 16)?,
                ctx.scratch(max_rows * 16)?,
            )
        } else {
            (dummy.clone(), dummy.clone(), dummy.clone())
        };
        for rows in chunks {
            let count = rows.end - rows.start;
            // x and y have the same rows, so the same offset and base.
            let (x_b, base) = rows_binding(x, n * elem_bytes, rows.clone(), align, elem_bytes);
            let (y_b, _) = rows_binding(y, n * elem_bytes, rows.clone(), align, elem_bytes);
            let (m_b, mask_base) = if masked {
                rows_binding(mask, n, rows.clone(), align, 1)
            } else {
                (mask.as_entire_buffer_binding(), 0)
            };
            let params = ctx.uniform(&Params {
                rows: count as u32,
                n: n as u32,
                m: shape.m as u32,
                // Only the query index is needed; the global row may pass u32.
                row_offset: (rows.start % shape.m as u64) as u32,
                alpha: o.scale / o.temperature,
                flags,
                tiles: tiles as u32,
                tile_len: TILE_LEN,
                base,
                mask_base,
            })?;
            let p_b = params.as_entire_buffer_binding();
            let io = [
                (0, x_b.clone()),
                (1, y_b.clone()),
                (2, m_b.clone()),
                (3, p_b.clone()),
            ];
            match path {
                RowPath::Thread { wg, items } => {
                    let v = variant(dtype, subgroups, items, "softmax_thread_row", wg);
                    plan.push(Step::new(ctx, &v, &io, count.div_ceil(wg as u64))?);
                }
                RowPath::Workgroup { wg, items } => {
                    let v = variant(dtype, subgroups, items, "softmax_row", wg);
                    plan.push(Step::new(ctx, &v, &io, count)?);
                }
                RowPath::Long => {
                    let v = |entry| variant(dtype, subgroups, 1, entry, LONG_WG);
                    let c_b = counts.as_entire_buffer_binding();
                    let q_b = partials.as_entire_buffer_binding();
                    let s_b = stats.as_entire_buffer_binding();
                    if masked && o.softmax_plus {
                        plan.push(Step::new(
                            ctx,
                            &v("tile_counts"),
                            &[(2, m_b.clone()), (3, p_b.clone()), (5, q_b.clone())],
                            count * tiles,
                        )?);
                        plan.push(Step::new(
                            ctx,
                            &v("row_counts"),
                            &[(3, p_b.clone()), (4, c_b.clone()), (5, q_b.clone())],
                            count,
                        )?);
                    }
                    plan.push(Step::new(
                        ctx,
                        &v("tile_partials"),
                        &[
                            (0, x_b.clone()),
                            (2, m_b.clone()),
                            (3, p_b.clone()),
                            (4, c_b.clone()),
                            (5, q_b.clone()),
                        ],
                        count * tiles,
                    )?);
                    plan.push(Step::new(
                        ctx,
                        &v("row_merge"),
                        &[(3, p_b.clone()), (4, c_b), (5, q_b), (6, s_b.clone())],
                        count,
                    )?);
                    plan.push(Step::new(
                        ctx,
                        &v("tile_normalize"),
                        &[(0, x_b), (1, y_b), (2, m_b), (3, p_b), (6, s_b)],
                        count * tiles,
                    )?);
                }
            }
            plan.keep(params);
        }
        if path == RowPath::Long {
            plan.keep(counts);
            plan.keep(partials);
            plan.keep(stats);
        }
        Ok(())
    }
}

impl Context {
    /// `softmax(x)` over the last axis into a new tensor.
    ///
    /// # Errors
    ///
    /// As [`Softmax::new`] and [`Softmax::plan`], and those of [allocating the output and
    /// running the call](crate::kernels#errors-common-to-every-kernel).
    pub fn softmax<T: Element>(
        &self,
        x: &GpuTensor<T>,
        opts: &SoftmaxOptions,
    ) -> Result<GpuTensor<T>> {
        let kernel = Softmax::new(self, opts)?;
        let y = self.zeros::<T>(x.shape().to_vec())?;
        kernel.plan(x, None, &y)?.run(self)?;
        Ok(y)
    }

    /// Masked `softmax(x)` (nonzero mask byte = keep) into a new tensor.
    ///
    /// # Errors
    ///
    /// As [`Context::softmax`].
    pub fn softmax_masked<T: Element>(
        &self,
        x: &GpuTensor<T>,
        mask: &GpuTensor<u8>,
        opts: &SoftmaxOptions,
    ) -> Result<GpuTensor<T>> {
        let kernel = Softmax::new(self, opts)?;
        let y = self.zeros::<T>(x.shape().to_vec())?;
        kernel.plan(x, Some(mask), &y)?.run(self)?;
        Ok(y)
    }
}
