//! # seq-kernels
//!
//! GPU compute kernels for sequence models, written in WGSL and run through wgpu on Vulkan,
//! Metal, DX12 and GL, each with a CPU f64 reference twin that validates it.
//!
//! ```
//! use seq_kernels::{Context, SoftmaxOptions};
//! # if seq_kernels::context::skip_example_without_adapter() { return Ok(()); }
//! let ctx = Context::new()?; // default adapter; honours WGPU_BACKEND / WGPU_ADAPTER_NAME
//! let x = ctx.upload(&[3.0f32, 1.0, 4.0], [1, 3])?;
//! let p = ctx.softmax(&x, &SoftmaxOptions::default())?.download()?;
//! assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6 && p[2] > p[0] && p[0] > p[1]);
//! # Ok::<(), seq_kernels::Error>(())
//! ```
//!
//! Applications that own a `wgpu::Device` wrap it with [`Context::from_device`] and record
//! kernels into their own encoders ([`Softmax::encode`]).
//!
//! The kernel families, each a module with its exact contract and an example, and each with
//! a CPU reference in [`reference`](mod@reference):
//! - [`kernels::softmax`]: softmax and log-softmax over the last axis, with temperature,
//!   masks, bottom-right causal alignment and softmax_plus;
//! - [`kernels::rope`]: rotary position embedding, half or interleaved, with the long-context
//!   scalings, fused q and k;
//! - [`kernels::attention`]: exact tiled attention (GQA, masks, causal, softcap, decoding
//!   over a KV cache) and [`Context::matmul`];
//! - [`kernels::flash`]: FLASH mixed-chunk attention (GAU) and its incremental decoder;
//! - [`kernels::gibbs`]: Gibbs sweeps over token chains, sampling from logits
//!   ([`Context::sample_logits`]) and a Metropolis-Hastings step;
//! - [`kernels::copy`]: the vec4 copy that memory-bound benchmarks are measured against.
//!
//! Errors are one enum, [`Error`]; tensors are [`GpuTensor`]s of a [`Context`].

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
