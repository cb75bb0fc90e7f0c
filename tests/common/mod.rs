//! Shared by the GPU tests: one context per test binary, a loud skip without an adapter
//! (a failure under SEQK_REQUIRE_GPU=1), seeded random data and error measures, and .npy
//! save/load for the `seqk run` round trips.
#![allow(dead_code)]

use std::sync::OnceLock;

use seq_kernels::Context;

/// An empty-or-new scratch directory of one test (tests run in parallel, and test binaries
/// at once): `name` and the process id.
pub fn scratch_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("seqk-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The shared context, or `None` (after a loud message) when no adapter exists.
/// Panics when there is none and `SEQK_REQUIRE_GPU=1`.
pub fn gpu() -> Option<&'static Context> {
    static CTX: OnceLock<Option<Context>> = OnceLock::new();
    let ctx = CTX.get_or_init(|| match Context::new() {
        Ok(ctx) => {
            let i = ctx.adapter_info();
            eprintln!("GPU tests on {} ({:?}, {})", i.name, i.backend, i.driver);
            Some(ctx)
        }
        Err(e) => {
            eprintln!("no GPU adapter: {e}");
            None
        }
    });
    if ctx.is_none() {
        if std::env::var("SEQK_REQUIRE_GPU").is_ok_and(|v| v == "1") {
            panic!("SEQK_REQUIRE_GPU=1 but no GPU adapter could be opened (see the message above)");
        }
        let test = std::thread::current().name().unwrap_or("?").to_string();
        eprintln!("SKIPPING GPU TEST {test}: no adapter (set SEQK_REQUIRE_GPU=1 to fail instead)");
    }
    ctx.as_ref()
}

/// Deterministic pseudo-random values in [lo, hi).
pub use seq_kernels::reference::random_values as random;

/// Deterministic pseudo-random booleans with probability `p` of true.
pub fn random_mask(n: usize, seed: u64, p: f32) -> Vec<bool> {
    random(n, seed, 0.0, 1.0)
        .into_iter()
        .map(|u| u < p)
        .collect()
}

/// A second device on the test adapter (with the optional features the adapter has) whose
/// limits are the adapter's changed by `change`, wrapped with `Context::from_device`: wgpu's
/// default error handler stays, so an error the crate fails to capture panics the test.
pub fn limited_device(change: impl FnOnce(&mut wgpu::Limits)) -> Context {
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter = pollster::block_on(wgpu::util::initialize_adapter_from_env_or_default(
        &instance, None,
    ))
    .expect("the adapter of the GPU tests");
    let mut limits = adapter.limits();
    change(&mut limits);
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        required_features: adapter.features() & seq_kernels::context::OPTIONAL_FEATURES,
        required_limits: limits.clone(),
        ..Default::default()
    }))
    .expect("a device with the changed limits");
    assert_eq!(
        device.limits(),
        limits,
        "the device must keep the limits asked for"
    );
    Context::from_device(device, queue)
}

/// A buffer of `size` bytes the way an application makes one, to wrap with `from_buffer`.
pub fn app_buffer(ctx: &Context, size: u64, usage: wgpu::BufferUsages) -> wgpu::Buffer {
    ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size,
        usage,
        mapped_at_creation: false,
    })
}

/// `data` in an application buffer larger than a storage binding may be (the device's limit
/// plus 4 KiB), wrapped with `from_buffer`: kernels must bind only the tensor's bytes.
pub fn in_oversized_buffer<T: seq_kernels::Element>(
    ctx: &Context,
    data: &[T],
    shape: impl Into<Vec<usize>>,
) -> seq_kernels::GpuTensor<T> {
    let size = ctx.limits().max_storage_buffer_binding_size + 4096;
    let usage =
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    let t = seq_kernels::GpuTensor::from_buffer(ctx, app_buffer(ctx, size, usage), shape).unwrap();
    t.write(data).unwrap();
    t
}

/// A device whose storage bindings hold at most `bytes`, for the paths that split work
/// across bindings or report `LimitExceeded`.
pub fn small_bindings(bytes: u64) -> Context {
    limited_device(|l| l.max_storage_buffer_binding_size = bytes)
}

/// Writes `data` in C order to the .npy file `path` with shape `shape`.
#[cfg(feature = "cli")]
pub fn save_npy<T: npyz::AutoSerialize + Copy>(path: &std::path::Path, shape: &[u64], data: &[T]) {
    save_npy_in_order(path, shape, data, npyz::Order::C);
}

/// Writes `data` to the .npy file `path` with shape `shape` in the element order `order`.
#[cfg(feature = "cli")]
pub fn save_npy_in_order<T: npyz::AutoSerialize + Copy>(
    path: &std::path::Path,
    shape: &[u64],
    data: &[T],
    order: npyz::Order,
) {
    use npyz::WriterBuilder;
    let f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(shape)
        .order(order)
        .writer(f)
        .begin_nd()
        .unwrap();
    w.extend(data.iter().copied()).unwrap();
    w.finish().unwrap();
}

/// Reads the .npy file `path`: its shape and its elements as `T`.
#[cfg(feature = "cli")]
pub fn load_npy<T: npyz::Deserialize>(path: &std::path::Path) -> (Vec<u64>, Vec<T>) {
    let npy = npyz::NpyFile::new(std::fs::File::open(path).unwrap()).unwrap();
    (npy.shape().to_vec(), npy.into_vec().unwrap())
}
