//! The kernel families: options, validation, pipeline selection, planning and encoding.
//! One module per family; each lists its shader variants for the naga translation test.

pub mod attention;
pub mod copy;
pub mod flash;
pub mod gibbs;
pub mod rope;
pub mod softmax;

use crate::shader::ShaderVariant;

/// Every shader variant the crate can select on any adapter.
pub fn all_shader_variants() -> Vec<ShaderVariant> {
    let mut v = crate::convert::shader_variants();
    v.extend(copy::shader_variants());
    v.extend(rope::shader_variants());
    v.extend(softmax::shader_variants());
    v.extend(gibbs::shader_variants());
    v.extend(attention::shader_variants());
    v.extend(flash::shader_variants());
    v
}
