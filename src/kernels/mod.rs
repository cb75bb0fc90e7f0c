//! The kernel families: options, validation, pipeline selection, planning and encoding.
//! One module per family; each lists its shader variants for the naga translation test.
//!
//! # Errors common to every kernel
//!
//! Besides the errors its own `plan` documents, every kernel's `plan` (and so its `encode`
//! methods, which record that plan) returns:
//! - [`Error::InvalidOption`] if a tensor belongs to another [`Context`] than the kernel's,
//!   or if a tensor the call writes shares its buffer with another tensor of the call (RoPE
//!   in place is allowed: see [`Rope::plan`]);
//! - [`Error::LimitExceeded`] if a scratch or parameter buffer would pass the device's
//!   `max_buffer_size`, a dispatch would bind more storage buffers than
//!   `max_storage_buffers_per_shader_stage` (FLASH needs 10, exact attention 8: see
//!   [`Context::from_device`]), or a dispatch's workgroups would pass
//!   `max_compute_workgroups_per_dimension` cubed;
//! - [`Error::Device`] if compiling a pipeline, allocating a buffer or creating a bind group
//!   fails (a validation error, out of memory, a lost device).
//!
//! The `Context` convenience methods (such as [`Context::softmax`]) return the errors of the
//! kernel's `new` and `plan`, those of [`Context::zeros`] for the tensors they allocate, and
//! [`Error::Device`] if submitting the work or waiting for it fails or the device is lost.
//!
//! [`Error::InvalidOption`]: crate::Error::InvalidOption
//! [`Error::LimitExceeded`]: crate::Error::LimitExceeded
//! [`Error::Device`]: crate::Error::Device
//! [`Context`]: crate::Context
//! [`Context::from_device`]: crate::Context::from_device
//! [`Context::softmax`]: crate::Context::softmax
//! [`Context::zeros`]: crate::Context::zeros
//! [`Rope::plan`]: rope::Rope::plan

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
