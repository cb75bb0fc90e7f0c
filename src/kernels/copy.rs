//! vec4 copy: the bandwidth the adapter can actually reach, the denominator of every
//! memory-bound figure in `seqk bench` and the criterion benches.

use crate::context::Context;
use crate::dispatch::{binding_chunks, BindingCap, Plan, Step};
use crate::error::{Error, Result};
use crate::shader::{compose, ShaderVariant, GRID_WGSL};
use crate::tensor::{Element, GpuTensor};

const SOURCE: &str = include_str!("../../shaders/copy.wgsl");
const WG: u64 = 256;
const ITEMS: u64 = 4;

/// Every shader variant of the family.
pub fn shader_variants() -> Vec<ShaderVariant> {
    vec![variant()]
}

fn variant() -> ShaderVariant {
    ShaderVariant {
        family: "copy",
        variant: "vec4".into(),
        source: compose(&[GRID_WGSL, SOURCE]),
        entry: "copy_vec4",
        constants: vec![("WG".into(), WG as f64), ("ITEMS".into(), ITEMS as f64)],
    }
}

/// A plan copying the first `bytes` bytes of `src` to `dst` (a multiple of 16), split into
/// several dispatches when the buffers exceed the binding-size limit.
///
/// # Errors
///
/// Besides the [errors common to every
/// kernel](crate::kernels#errors-common-to-every-kernel) (here [`Error::InvalidOption`] if
/// `src` and `dst` are one buffer):
/// - [`Error::Shape`] if `bytes` is 0 or not a multiple of 16, or `src` or `dst` holds fewer
///   than `bytes` bytes.
pub fn plan(ctx: &Context, src: &wgpu::Buffer, dst: &wgpu::Buffer, bytes: u64) -> Result<Plan> {
    if bytes == 0 || !bytes.is_multiple_of(16) {
        return Err(Error::shape(format!(
            "the vec4 copy needs a positive multiple of 16 bytes, got {bytes}"
        )));
    }
    if src.size() < bytes || dst.size() < bytes {
        return Err(Error::shape(format!(
            "copy of {bytes} bytes between buffers of {} and {} bytes",
            src.size(),
            dst.size()
        )));
    }
    let limits = ctx.limits();
    let max_binding = BindingCap::of(ctx);
    let vec4s = bytes / 16;
    let mut plan = Plan::default();
    // A "row" is one vec4 here.
    for rows in binding_chunks(
        vec4s,
        1,
        16,
        max_binding,
        limits.min_storage_buffer_offset_alignment as u64,
    )? {
        let len = rows.end - rows.start;
        let params = ctx.uniform(&(len as u32))?;
        let range = |b| crate::dispatch::sub_binding(b, rows.start * 16, len * 16);
        let step = Step::new(
            ctx,
            &variant(),
            &[
                (0, range(src)),
                (1, range(dst)),
                (2, params.as_entire_buffer_binding()),
            ],
            len.div_ceil(WG * ITEMS),
        )?;
        plan.push(step);
        plan.keep(params);
    }
    Ok(plan)
}

impl Context {
    /// Copies a tensor with the vec4 copy kernel (its size must be a multiple of 16 bytes).
    ///
    /// # Errors
    ///
    /// As [`copy::plan`](plan), so [`Error::Shape`] if `x`'s bytes are not a multiple of 16;
    /// [`Error::InvalidOption`] if `x` belongs to another context; and those of [allocating
    /// the output and running the call](crate::kernels#errors-common-to-every-kernel).
    pub fn copy<T: Element>(&self, x: &GpuTensor<T>) -> Result<GpuTensor<T>> {
        self.check_owned(&[x.context()])?;
        let y = self.zeros::<T>(x.shape().to_vec())?;
        plan(self, x.buffer(), y.buffer(), x.bytes())?.run(self)?;
        Ok(y)
    }
}
