//! # seq-kernels
//!
//! GPU compute kernels for sequence models, written in WGSL and run through wgpu on Vulkan,
//! Metal, DX12 and GL, each with a CPU f64 reference twin that validates it.
//!
//! ```no_run
//! use seq_kernels::{Context, SoftmaxOptions};
//! let ctx = Context::new()?; // default adapter; honours WGPU_BACKEND / WGPU_ADAPTER_NAME
//! let x = ctx.upload(&[3.0f32, 1.0, 4.0], [1, 3])?;
//! let y = ctx.softmax(&x, &SoftmaxOptions::default())?;
//! assert_eq!(y.download()?.len(), 3);
//! # Ok::<(), seq_kernels::Error>(())
//! ```
//!
//! Applications that own a `wgpu::Device` wrap it with [`Context::from_device`] and record
//! kernels into their own encoders ([`Softmax::encode`]).

#[cfg(feature = "cli")]
pub mod cli;
pub mod context;
pub mod convert;
pub mod dispatch;
pub mod error;
pub mod kernels;
pub mod profile;
pub mod reference;
pub mod shader;
pub mod tensor;

pub use context::{Context, ContextOptions};
pub use dispatch::Plan;
pub use error::{Error, Result};
pub use kernels::attention::{
    matmul_plan, Attention, AttentionOptions, AttnMask, HostMask, Layout,
};
pub use kernels::flash::{
    AttnFn, Flash, FlashBlock, FlashDecoder, FlashGpuBlock, FlashInputs, FlashOptions, FlashRope,
    LinNorm,
};
pub use kernels::gibbs::{
    BestState, ChainModel, Gibbs, GibbsOptions, GibbsOutput, Metropolis, MhOptions, MhTensors,
    Pairwise, SampleOptions, Sampler,
};
pub use kernels::rope::{
    Positions, Rope, RopeLayout, RopeOptions, RopeScaling, RopeStyle, RopeTarget, RopeView,
};
pub use kernels::softmax::{Softmax, SoftmaxOptions};
pub use profile::Timing;
pub use tensor::{DType, Element, GpuTensor};

/// The README's examples compile as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
