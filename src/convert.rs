//! f16 storage on adapters without `SHADER_F16`: the f16 words stay packed two per u32 and are
//! widened into an f32 scratch before a kernel's f32 variant runs, then narrowed back after it.
//! Accumulation is f32 either way, so results match the native-f16 path; only bandwidth differs.

use crate::context::Context;
use crate::dispatch::{binding_chunks, sub_binding, BindingCap, Plan, Step};
use crate::error::Result;
use crate::shader::{compose, ShaderVariant, GRID_WGSL};
use crate::tensor::DType;

const SOURCE: &str = include_str!("../shaders/convert.wgsl");
const WG: u64 = 256;

/// How a kernel stores an element type in its shaders on this device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    /// The shader's `elem` is the tensor's own type (f32, or f16 with `SHADER_F16`).
    Native(DType),
    /// f16 tensor, f32 shader: widen before, narrow after.
    WidenedF16,
}

impl Storage {
    /// The storage a kernel uses for `dtype` on `ctx`.
    pub fn for_dtype(ctx: &Context, dtype: DType) -> Storage {
        match dtype {
            DType::F16 if !ctx.has_f16() => Storage::WidenedF16,
            d => Storage::Native(d),
        }
    }
    /// The element type the shader sees.
    pub fn shader_dtype(self) -> DType {
        match self {
            Storage::Native(d) => d,
            Storage::WidenedF16 => DType::F32,
        }
    }
    /// The buffer a shader reads for the `len` elements of `buf`: `buf` itself, or an f32
    /// scratch that a widening appended to `plan` fills.
    pub fn input(
        self,
        ctx: &Context,
        plan: &mut Plan,
        buf: &wgpu::Buffer,
        len: usize,
    ) -> Result<wgpu::Buffer> {
        match self {
            Storage::Native(_) => Ok(buf.clone()),
            Storage::WidenedF16 => widen(ctx, plan, buf, len),
        }
    }
    /// The buffer a shader writes for the `len` elements of `buf`: `buf` itself, or an f32
    /// scratch that [`Self::finish_output`] narrows into it.
    pub fn output(self, ctx: &Context, buf: &wgpu::Buffer, len: usize) -> Result<wgpu::Buffer> {
        match self {
            Storage::Native(_) => Ok(buf.clone()),
            Storage::WidenedF16 => ctx.scratch(len as u64 * 4),
        }
    }
    /// Appends, once the shaders have written `written` (from [`Self::output`]), what brings
    /// its `len` elements into `dst`: nothing, or a narrowing (the scratch kept with `plan`).
    pub fn finish_output(
        self,
        ctx: &Context,
        plan: &mut Plan,
        written: wgpu::Buffer,
        dst: &wgpu::Buffer,
        len: usize,
    ) -> Result<()> {
        if self == Storage::WidenedF16 {
            narrow(ctx, plan, &written, dst, len)?;
            plan.keep(written);
        }
        Ok(())
    }
}

/// Every variant of the conversion shader.
pub fn shader_variants() -> Vec<ShaderVariant> {
    ["widen_f16", "narrow_f16"]
        .into_iter()
        .map(variant)
        .collect()
}

fn variant(entry: &'static str) -> ShaderVariant {
    ShaderVariant {
        family: "convert",
        variant: "packed-f16".into(),
        source: compose(&[GRID_WGSL, SOURCE]),
        entry,
        constants: vec![("WG".into(), WG as f64)],
    }
}

/// Appends a widening of `len` packed f16 values in `src` and returns the f32 scratch.
pub fn widen(
    ctx: &Context,
    plan: &mut Plan,
    src: &wgpu::Buffer,
    len: usize,
) -> Result<wgpu::Buffer> {
    let wide = ctx.scratch(len as u64 * 4)?;
    convert(ctx, plan, "widen_f16", (0, src), (1, &wide), len)?;
    plan.keep(wide.clone());
    Ok(wide)
}

/// Appends a narrowing of `len` f32 values in `src` into packed f16 `dst`.
pub fn narrow(
    ctx: &Context,
    plan: &mut Plan,
    src: &wgpu::Buffer,
    dst: &wgpu::Buffer,
    len: usize,
) -> Result<()> {
    convert(ctx, plan, "narrow_f16", (4, dst), (3, src), len)
}

/// One conversion between `packed` f16 words and `wide` f32 values (each at its binding
/// slot), in as many dispatches as the device's storage bindings need: ranges of whole words
/// whose byte offsets stay aligned on both sides.
fn convert(
    ctx: &Context,
    plan: &mut Plan,
    entry: &'static str,
    packed: (u32, &wgpu::Buffer),
    wide: (u32, &wgpu::Buffer),
    len: usize,
) -> Result<()> {
    let words = (len as u64).div_ceil(2);
    // A "row" is one packed word: 2 elements, 8 bytes once widened. Capped as every kernel's
    // bindings are (BindingCap): the element count below and the shader's indices are u32.
    for range in binding_chunks(
        words,
        2,
        4,
        BindingCap::of(ctx),
        ctx.limits().min_storage_buffer_offset_alignment as u64,
    )? {
        let elems = (len as u64).min(range.end * 2) - range.start * 2;
        let params = ctx.uniform(&(elems as u32))?;
        plan.push(Step::new(
            ctx,
            &variant(entry),
            &[
                (packed.0, sub_binding(packed.1, range.start * 4, elems * 2)),
                (wide.0, sub_binding(wide.1, range.start * 8, elems * 4)),
                (2, params.as_entire_buffer_binding()),
            ],
            (range.end - range.start).div_ceil(WG),
        )?);
        plan.keep(params);
    }
    Ok(())
}
