//! f16 storage on adapters without `SHADER_F16`: the f16 words stay packed two per u32 and are
//! widened into an f32 scratch before a kernel's f32 variant runs, then narrowed back after it.
//! Accumulation is f32 either way, so results match the native-f16 path; only bandwidth differs.

use crate::context::Context;
use crate::dispatch::{Plan, Step};
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
    let params = ctx.uniform(&(len as u32))?;
    plan.push(Step::new(
        ctx,
        &variant("widen_f16"),
        &[
            (0, src.as_entire_buffer_binding()),
            (1, wide.as_entire_buffer_binding()),
            (2, params.as_entire_buffer_binding()),
        ],
        (len as u64).div_ceil(2).div_ceil(WG),
    )?);
    plan.keep(params);
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
    let params = ctx.uniform(&(len as u32))?;
    plan.push(Step::new(
        ctx,
        &variant("narrow_f16"),
        &[
            (2, params.as_entire_buffer_binding()),
            (3, src.as_entire_buffer_binding()),
            (4, dst.as_entire_buffer_binding()),
        ],
        (len as u64).div_ceil(2).div_ceil(WG),
    )?);
    plan.keep(params);
    Ok(())
}
