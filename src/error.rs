//! The crate's one error type. Every message says what to change.

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in seq-kernels.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No GPU adapter could be found or opened.
    #[error(
        "no GPU adapter found ({0}). WGPU_BACKEND=vulkan|gl|metal|dx12 and \
         WGPU_ADAPTER_NAME=<substring> choose among adapters; with none at all, install a \
         Vulkan driver: on Debian/Ubuntu without a GPU, `apt-get install mesa-vulkan-drivers` \
         provides the lavapipe software device."
    )]
    NoAdapter(String),
    /// A tensor has the wrong shape, or shapes do not agree.
    #[error("shape error: {0}")]
    Shape(String),
    /// A tensor has the wrong element type.
    #[error("dtype error: {0}")]
    Dtype(String),
    /// An option has a value outside its domain (temperature <= 0, ...).
    #[error("invalid option: {0}")]
    InvalidOption(String),
    /// The adapter lacks a feature this call needs. No kernel returns it at present: every
    /// optional feature they use (`SHADER_F16`, `SUBGROUP`, timestamps) has a fallback. It
    /// is kept so that a kernel without one can say so without a breaking change.
    #[error("unsupported: the adapter lacks {feature}; {hint}")]
    Unsupported {
        /// The wgpu feature (or capability) that is missing.
        feature: &'static str,
        /// What the caller can do instead.
        hint: String,
    },
    /// A device limit would be exceeded.
    #[error(
        "limit exceeded: {what} need {needed}, more than {limit} allows ({max}); {}",
        limit_advice(limit)
    )]
    LimitExceeded {
        /// What exceeds it, with its unit, e.g. "bytes of attention k".
        what: String,
        /// The wgpu limit's name, e.g. `max_storage_buffer_binding_size`, or the index
        /// arithmetic's (`u32 indices`).
        limit: &'static str,
        /// What this call needs.
        needed: u64,
        /// What the device allows.
        max: u64,
    },
    /// The device reported an error: lost, out of memory, or a validation failure.
    #[error("device error: {0}")]
    Device(String),
}

/// A limit no smaller input avoids: a pipeline's storage buffers are fixed by the
/// kernel, so only a device made with more of them can run it.
pub const STORAGE_BUFFERS_PER_STAGE: &str = "max_storage_buffers_per_shader_stage";

/// A limit a kernel's fixed-size uniform binding needs whatever its input (a uniform array
/// has a size fixed in the shader), so smaller calls cannot avoid it either.
pub const UNIFORM_BINDING_SIZE: &str = "max_uniform_buffer_binding_size";

/// What to do about an exceeded limit.
fn limit_advice(limit: &str) -> String {
    match limit {
        STORAGE_BUFFERS_PER_STAGE | UNIFORM_BINDING_SIZE => {
            format!("create the device with a larger {limit} (up to what the adapter allows)")
        }
        _ if limit.starts_with("max_") => format!(
            "split the input into smaller calls, or create the device with a larger {limit} \
             (up to what the adapter allows)"
        ),
        _ => "split the input into smaller calls".to_string(),
    }
}

impl Error {
    pub(crate) fn shape(msg: impl Into<String>) -> Self {
        Error::Shape(msg.into())
    }
    pub(crate) fn option(msg: impl Into<String>) -> Self {
        Error::InvalidOption(msg.into())
    }
}
