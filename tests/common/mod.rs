//! Shared by the GPU tests: one context per test binary, a loud skip without an adapter
//! (a failure under SEQK_REQUIRE_GPU=1), seeded random data and error measures, and .npy
//! save/load for the `seqk run` round trips.
#![allow(dead_code)]

use std::sync::OnceLock;

use seq_kernels::Context;

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

/// A second context on the test adapter, with its optional features, whose storage bindings
/// hold at most `max` bytes, so that calls must split their work across bindings.
pub fn small_binding_context(max: u64) -> Context {
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter = pollster::block_on(wgpu::util::initialize_adapter_from_env_or_default(
        &instance, None,
    ))
    .expect("the adapter of the GPU tests");
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        required_features: adapter.features() & seq_kernels::context::OPTIONAL_FEATURES,
        required_limits: wgpu::Limits {
            max_storage_buffer_binding_size: max,
            ..adapter.limits()
        },
        ..Default::default()
    }))
    .expect("a device with smaller storage bindings");
    assert_eq!(
        device.limits().max_storage_buffer_binding_size,
        max,
        "the device must keep the smaller binding limit, or nothing is split"
    );
    Context::from_device(device, queue)
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
