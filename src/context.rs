//! The GPU context: adapter, device, queue, what they can do, and the pipeline cache.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::shader::{declared_bindings, Declared, ShaderVariant};

/// How [`Context::with_options`] picks an adapter. Empty fields defer to wgpu's environment
/// variables (`WGPU_BACKEND`, `WGPU_ADAPTER_NAME`, `WGPU_POWER_PREF`) and then to wgpu's default.
#[derive(Clone, Debug, Default)]
pub struct ContextOptions {
    /// Restrict the backends searched (e.g. `wgpu::Backends::GL`).
    pub backends: Option<wgpu::Backends>,
    /// Pick the first adapter whose name contains this substring (case-insensitive).
    pub adapter_name: Option<String>,
}

/// The optional features seq-kernels uses when the adapter offers them.
pub const OPTIONAL_FEATURES: wgpu::Features = wgpu::Features::SHADER_F16
    .union(wgpu::Features::SUBGROUP)
    .union(wgpu::Features::TIMESTAMP_QUERY)
    .union(wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS)
    .union(wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES);

/// A device and queue plus what the kernels need to know about them.
///
/// Cheap to clone (an `Arc`), `Send + Sync`, usable from many threads.
#[derive(Clone)]
pub struct Context {
    inner: Arc<Inner>,
}

struct Inner {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    /// Errors nobody captured in a scope (only installed when the crate owns the device).
    uncaptured: Arc<Mutex<Uncaptured>>,
    /// Why the device was lost, once it is (only known when the crate owns the device).
    lost: Arc<Mutex<Option<String>>>,
    modules: Mutex<HashMap<ModuleKey, wgpu::ShaderModule>>,
    /// Each module's group-0 declarations, read once (every dispatch checks its bindings).
    declared: Mutex<HashMap<ModuleKey, Arc<Vec<Declared>>>>,
    pipelines: Mutex<HashMap<PipelineKey, Arc<wgpu::ComputePipeline>>>,
}

/// What identifies a shader module: family and variant.
type ModuleKey = (&'static str, String);

/// What identifies a compiled pipeline: family, variant, entry point and override constants.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PipelineKey {
    family: &'static str,
    variant: String,
    entry: &'static str,
    constants: Vec<(String, u64)>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("adapter", &self.inner.info.name)
            .field("backend", &self.inner.info.backend)
            .finish_non_exhaustive()
    }
}

/// An adapter as the crate names it in messages and lists: its name, backend and device type
/// (one driver may appear on two backends under one name).
pub fn adapter_label(i: &wgpu::AdapterInfo) -> String {
    format!("{} ({:?}, {:?})", i.name, i.backend, i.device_type)
}

/// Errors raised outside any error scope, until `Context::wait` reports them: the first one
/// and a count of the rest (an application that never waits must not grow a list).
#[derive(Default)]
struct Uncaptured {
    first: Option<String>,
    more: u64,
}

impl Uncaptured {
    fn add(&mut self, error: String) {
        if self.first.is_none() {
            self.first = Some(error);
        } else {
            self.more += 1;
        }
    }
}

/// The adapters of the backends not in `backends`, as a clause for a no-adapter message (the
/// remedy is then another backend, not a driver); empty when there are none.
async fn adapters_elsewhere(backends: wgpu::Backends) -> String {
    let others = wgpu::Backends::all().difference(backends);
    if others.is_empty() {
        return String::new();
    }
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    desc.backends = others;
    let labels: Vec<String> = wgpu::Instance::new(desc)
        .enumerate_adapters(others)
        .await
        .iter()
        .map(|a| adapter_label(&a.get_info()))
        .collect();
    if labels.is_empty() {
        String::new()
    } else {
        format!("; on other backends: {}", labels.join("; "))
    }
}

/// For the documentation's examples, which run as tests: whether to skip one because no
/// adapter can be opened (said on stderr). With `SEQK_REQUIRE_GPU=1` it never skips, so the
/// example fails as the GPU tests do.
#[doc(hidden)]
pub fn skip_example_without_adapter() -> bool {
    if std::env::var("SEQK_REQUIRE_GPU").is_ok_and(|v| v == "1") {
        return false;
    }
    match Context::new() {
        Err(Error::NoAdapter(why)) => {
            eprintln!("SKIPPING EXAMPLE: no adapter ({why})");
            true
        }
        _ => false,
    }
}

/// The backends `WGPU_BACKEND` names (empty or unset: all); a value naming none is an error
/// rather than an instance without backends, whose failure would read as a missing driver.
fn env_backends() -> Result<wgpu::Backends> {
    match std::env::var("WGPU_BACKEND") {
        Ok(v) if !v.trim().is_empty() => match wgpu::Backends::from_env() {
            Some(b) if !b.is_empty() => Ok(b),
            _ => Err(Error::InvalidOption(format!(
                "WGPU_BACKEND={v:?} names no backend; use vulkan, gl, metal or dx12 \
                 (comma-separated for several)"
            ))),
        },
        _ => Ok(wgpu::Backends::all()),
    }
}

impl Context {
    /// Opens the default adapter (honouring `WGPU_BACKEND` and `WGPU_ADAPTER_NAME`), blocking.
    ///
    /// # Errors
    ///
    /// As [`Context::with_options`].
    pub fn new() -> Result<Self> {
        Self::with_options(&ContextOptions::default())
    }

    /// Opens an adapter chosen by `options`, blocking.
    ///
    /// # Errors
    ///
    /// - [`Error::InvalidOption`] if `options.backends` is `None` and `WGPU_BACKEND` names no
    ///   backend, or if a name is asked for (`options.adapter_name`, else `WGPU_ADAPTER_NAME`)
    ///   and the backends searched have adapters but none whose name contains it.
    /// - [`Error::NoAdapter`] if no adapter is found on the backends searched.
    /// - [`Error::Device`] if the adapter fails to open a device.
    pub fn with_options(options: &ContextOptions) -> Result<Self> {
        pollster::block_on(Self::with_options_async(options))
    }

    /// Async form of [`Context::with_options`].
    ///
    /// # Errors
    ///
    /// As [`Context::with_options`].
    pub async fn with_options_async(options: &ContextOptions) -> Result<Self> {
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
        desc.backends = match options.backends {
            Some(backends) => backends,
            None => env_backends()?,
        };
        let backends = desc.backends;
        let instance = wgpu::Instance::new(desc);
        // WGPU_ADAPTER_NAME is matched here, not by wgpu's helper, which panics on no match.
        let env_name = std::env::var("WGPU_ADAPTER_NAME")
            .ok()
            .filter(|n| !n.is_empty());
        let found = match options.adapter_name.as_ref().or(env_name.as_ref()) {
            Some(wanted) => {
                let lower = wanted.to_lowercase();
                let adapters = instance.enumerate_adapters(backends).await;
                let names: Vec<String> = adapters
                    .iter()
                    .map(|a| adapter_label(&a.get_info()))
                    .collect();
                adapters
                    .into_iter()
                    .find(|a| a.get_info().name.to_lowercase().contains(&lower))
                    .ok_or_else(|| {
                        if names.is_empty() {
                            Error::NoAdapter(format!("no adapter name contains {wanted:?}"))
                        } else {
                            Error::InvalidOption(format!(
                                "no adapter name contains {wanted:?} (--adapter or \
                                 WGPU_ADAPTER_NAME); available: {}",
                                names.join("; ")
                            ))
                        }
                    })
            }
            None => wgpu::util::initialize_adapter_from_env_or_default(&instance, None)
                .await
                .map_err(|e| Error::NoAdapter(e.to_string())),
        };
        let adapter = match found {
            Ok(a) => a,
            Err(Error::NoAdapter(why)) => {
                return Err(Error::NoAdapter(format!(
                    "{why}{}",
                    adapters_elsewhere(backends).await
                )))
            }
            Err(e) => return Err(e),
        };
        let features = adapter.features() & OPTIONAL_FEATURES;
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("seq-kernels"),
                required_features: features,
                required_limits: adapter.limits(),
                ..Default::default()
            })
            .await
            .map_err(|e| Error::Device(format!("request_device failed: {e}")))?;
        let uncaptured: Arc<Mutex<Uncaptured>> = Arc::default();
        let sink = uncaptured.clone();
        // wgpu's default handler panics; a library must not. The crate's own calls run in
        // error scopes, so what lands here is the application's (its calls on `device()`
        // outside a scope): `wait` reports it, and no kernel call fails for it.
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            if let Ok(mut u) = sink.lock() {
                u.add(e.to_string());
            }
        }));
        // After a loss every call fails with wgpu's "invalid" messages; say the cause instead.
        let lost: Arc<Mutex<Option<String>>> = Arc::default();
        let cause = lost.clone();
        device.set_device_lost_callback(move |reason, message| {
            if let Ok(mut l) = cause.lock() {
                *l = Some(format!("{reason:?}: {message}"));
            }
        });
        Ok(Self::assemble(device, queue, uncaptured, lost))
    }

    /// Wraps a device and queue the application already owns. The crate uses only the features
    /// and limits the device was created with; it leaves the device's error handler alone
    /// (its own calls run in error scopes). Tensors belong to the context that made them: a
    /// kernel refuses tensors of another context. FLASH needs 10 storage buffers per shader
    /// stage (wgpu's default limits allow 8), exact attention 8; a device with fewer gets
    /// `LimitExceeded` naming the limit. The device-lost callback stays the application's, so
    /// after a loss the crate's errors are wgpu's own (an `invalid` object), not "lost".
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue) -> Self {
        Self::assemble(device, queue, Arc::default(), Arc::default())
    }

    fn assemble(
        device: wgpu::Device,
        queue: wgpu::Queue,
        uncaptured: Arc<Mutex<Uncaptured>>,
        lost: Arc<Mutex<Option<String>>>,
    ) -> Self {
        let info = device.adapter_info();
        Self {
            inner: Arc::new(Inner {
                device,
                queue,
                info,
                uncaptured,
                lost,
                modules: Mutex::default(),
                declared: Mutex::default(),
                pipelines: Mutex::default(),
            }),
        }
    }

    /// Whether `other` is this context (a clone of it), not merely one on the same adapter.
    pub fn same(&self, other: &Context) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// An error unless every tensor context in `owners` is this one: buffers of another
    /// context are another wgpu device's, and may even share ids with this one's.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidOption`] if a context in `owners` is not this one (nor a clone of it).
    pub fn check_owned(&self, owners: &[&Context]) -> Result<()> {
        if owners.iter().all(|c| self.same(c)) {
            Ok(())
        } else {
            Err(Error::option(
                "a tensor of another Context was given; upload it to this kernel's Context \
                 (or make the kernel from the tensor's)",
            ))
        }
    }

    /// The wgpu device.
    pub fn device(&self) -> &wgpu::Device {
        &self.inner.device
    }
    /// The wgpu queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.inner.queue
    }
    /// The adapter's description (name, backend, driver, subgroup sizes).
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.inner.info
    }
    /// The features enabled on the device.
    pub fn features(&self) -> wgpu::Features {
        self.inner.device.features()
    }
    /// The limits of the device.
    pub fn limits(&self) -> wgpu::Limits {
        self.inner.device.limits()
    }
    /// Whether the device has native f16 in shaders.
    pub fn has_f16(&self) -> bool {
        self.features().contains(wgpu::Features::SHADER_F16)
    }
    /// Whether the device has subgroup operations.
    pub fn has_subgroups(&self) -> bool {
        self.features().contains(wgpu::Features::SUBGROUP)
    }
    /// Whether GPU timestamps can be written at compute-pass boundaries.
    pub fn has_timestamps(&self) -> bool {
        self.features().contains(wgpu::Features::TIMESTAMP_QUERY)
    }

    /// Blocks until all submitted work is done, then reports any device error nobody captured:
    /// on a device made by [`Context::new`], the first error of the application's own calls
    /// on [`Context::device`] outside an error scope since the last `wait` (wgpu would panic
    /// on it). The crate's calls never report those: one thread's error does not fail another
    /// thread's kernel.
    ///
    /// # Errors
    ///
    /// [`Error::Device`] if waiting fails, if the device is lost (said as such only on a
    /// device made by [`Context::new`] or [`Context::with_options`]), or for that first
    /// uncaptured error.
    pub fn wait(&self) -> Result<()> {
        self.idle()?;
        self.take_uncaptured()
    }

    /// Blocks until all submitted work is done.
    fn idle(&self) -> Result<()> {
        self.wait_for(None)
    }

    /// Blocks until submission `index` (all submitted work when `None`) is done.
    fn wait_for(&self, index: Option<wgpu::SubmissionIndex>) -> Result<()> {
        self.inner
            .device
            .poll(wgpu::PollType::Wait {
                submission_index: index,
                timeout: None,
            })
            .map_err(|e| self.wait_failed(e))?;
        self.check_lost()
    }

    /// The error of a failed wait: a lost device (known on one the crate made) is the cause
    /// worth naming, else wgpu's words.
    fn wait_failed(&self, e: wgpu::PollError) -> Error {
        self.check_lost()
            .err()
            .unwrap_or_else(|| Error::Device(format!("waiting for the GPU failed: {e}")))
    }

    /// An error naming the cause once the device is lost (known only on a device the crate
    /// made: the device-lost callback of an application's device is the application's).
    fn check_lost(&self) -> Result<()> {
        match &*self.inner.lost.lock().map_err(|_| poisoned())? {
            Some(cause) => Err(Error::Device(format!(
                "the GPU device was lost ({cause}); make a new Context"
            ))),
            None => Ok(()),
        }
    }

    /// Maps `buffer` (MAP_READ, copied into by work already submitted) for reading and
    /// blocks until it is mapped; `what` names it in errors.
    pub(crate) fn map_read(&self, buffer: &wgpu::Buffer, what: &str) -> Result<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.checked(&format!("mapping {what}"), || {
            buffer.map_async(wgpu::MapMode::Read, .., move |r| {
                let _ = tx.send(r);
            })
        })?;
        self.idle()?;
        rx.recv()
            .map_err(|_| Error::Device(format!("{what}: the map callback never ran")))?
            .map_err(|e| Error::Device(format!("mapping {what} failed: {e}")))
    }

    /// Returns (and clears) the first error the device raised outside any error scope since
    /// the last call, with a count of the later ones.
    fn take_uncaptured(&self) -> Result<()> {
        let mut errors = self.inner.uncaptured.lock().map_err(|_| poisoned())?;
        let Uncaptured { first, more } = std::mem::take(&mut *errors);
        match (first, more) {
            (None, _) => Ok(()),
            (Some(e), 0) => Err(Error::Device(e)),
            (Some(e), n) => Err(Error::Device(format!("{e} (and {n} more errors since)"))),
        }
    }

    /// Runs `f` inside internal, out-of-memory and validation error scopes and turns what
    /// they catch into [`Error::Device`], so a bad call is an error rather than a panic.
    ///
    /// # Errors
    ///
    /// [`Error::Device`] if a scope catches an error of `f`; where the device is known to be
    /// lost (one the crate made), the error names the loss instead.
    pub fn checked<R>(&self, what: &str, f: impl FnOnce() -> R) -> Result<R> {
        let device = &self.inner.device;
        let internal = device.push_error_scope(wgpu::ErrorFilter::Internal);
        let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let out = f();
        let validation = pollster::block_on(validation.pop());
        let oom = pollster::block_on(oom.pop());
        let internal = pollster::block_on(internal.pop());
        match validation.or(oom).or(internal) {
            Some(e) => {
                self.check_lost()?;
                Err(Error::Device(format!("{what}: {e}")))
            }
            None => Ok(out),
        }
    }

    /// The compiled pipeline of a shader variant, built on first use and cached by
    /// (family, variant, entry point, override constants).
    ///
    /// # Errors
    ///
    /// [`Error::Device`] if the shader fails to compile or the pipeline to build (a validation
    /// error, out of memory, a lost device), or if a thread panicked while holding the cache.
    pub fn pipeline(&self, v: &ShaderVariant) -> Result<Arc<wgpu::ComputePipeline>> {
        let key = PipelineKey {
            family: v.family,
            variant: v.variant.clone(),
            entry: v.entry,
            constants: v
                .constants
                .iter()
                .map(|(k, x)| (k.clone(), x.to_bits()))
                .collect(),
        };
        if let Some(p) = self
            .inner
            .pipelines
            .lock()
            .map_err(|_| poisoned())?
            .get(&key)
        {
            return Ok(p.clone());
        }
        let module = self.module(v)?;
        let constants: Vec<(&str, f64)> =
            v.constants.iter().map(|(k, x)| (k.as_str(), *x)).collect();
        let label = format!("{}/{}/{}", v.family, v.variant, v.entry);
        let pipeline = self.checked(&format!("building pipeline {label}"), || {
            self.inner
                .device
                .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(&label),
                    layout: None,
                    module: &module,
                    entry_point: Some(v.entry),
                    compilation_options: wgpu::PipelineCompilationOptions {
                        constants: &constants,
                        // Every kernel writes its workgroup memory before reading it.
                        zero_initialize_workgroup_memory: false,
                    },
                    cache: None,
                })
        })?;
        let pipeline = Arc::new(pipeline);
        self.inner
            .pipelines
            .lock()
            .map_err(|_| poisoned())?
            .insert(key, pipeline.clone());
        Ok(pipeline)
    }

    fn module(&self, v: &ShaderVariant) -> Result<wgpu::ShaderModule> {
        let key = (v.family, v.variant.clone());
        if let Some(m) = self.inner.modules.lock().map_err(|_| poisoned())?.get(&key) {
            return Ok(m.clone());
        }
        let label = format!("{}/{}", v.family, v.variant);
        let module = self.checked(&format!("compiling shader {label}"), || {
            self.inner
                .device
                .create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(&label),
                    source: wgpu::ShaderSource::Wgsl(v.source.as_str().into()),
                })
        })?;
        self.inner
            .modules
            .lock()
            .map_err(|_| poisoned())?
            .insert(key, module.clone());
        Ok(module)
    }

    /// The group-0 buffers a shader variant declares (read from its source once per module).
    pub(crate) fn declared(&self, v: &ShaderVariant) -> Result<Arc<Vec<Declared>>> {
        let mut map = self.inner.declared.lock().map_err(|_| poisoned())?;
        let entry = map
            .entry((v.family, v.variant.clone()))
            .or_insert_with(|| Arc::new(declared_bindings(&v.source)));
        Ok(entry.clone())
    }

    /// A bind group for `pipeline`'s group 0 from (binding index, buffer range) pairs.
    ///
    /// # Errors
    ///
    /// [`Error::Device`] if the device refuses the bind group (a binding the pipeline does not
    /// declare or a range it cannot take, out of memory, a lost device).
    pub fn bind_group(
        &self,
        pipeline: &wgpu::ComputePipeline,
        buffers: &[(u32, wgpu::BufferBinding<'_>)],
    ) -> Result<wgpu::BindGroup> {
        let layout = pipeline.get_bind_group_layout(0);
        let entries: Vec<wgpu::BindGroupEntry<'_>> = buffers
            .iter()
            .map(|(i, b)| wgpu::BindGroupEntry {
                binding: *i,
                resource: wgpu::BindingResource::Buffer(b.clone()),
            })
            .collect();
        self.checked("creating a bind group", || {
            self.inner
                .device
                .create_bind_group(&wgpu::BindGroupDescriptor {
                    label: None,
                    layout: &layout,
                    entries: &entries,
                })
        })
    }

    /// A uniform buffer holding `value` (padded to 16 bytes).
    ///
    /// # Errors
    ///
    /// [`Error::Device`] if allocating or writing the buffer fails.
    pub fn uniform<T: bytemuck::Pod>(&self, value: &T) -> Result<wgpu::Buffer> {
        let mut bytes = bytemuck::bytes_of(value).to_vec();
        bytes.resize(uniform_size::<T>() as usize, 0);
        self.buffer_from(&bytes, wgpu::BufferUsages::UNIFORM)
    }

    /// One uniform buffer holding every value of `values`, each at its own offset aligned as
    /// the device requires: a plan of thousands of dispatches then allocates and writes one
    /// buffer instead of one each.
    ///
    /// # Errors
    ///
    /// - [`Error::LimitExceeded`] if the slots (each aligned to
    ///   `min_uniform_buffer_offset_alignment`) would pass the device's `max_buffer_size`.
    /// - [`Error::Device`] if allocating or writing the buffer fails.
    pub fn uniform_slots<T: bytemuck::Pod>(&self, values: &[T]) -> Result<UniformSlots> {
        let (stride, total) = self.slot_layout::<T>(values.len())?;
        let size = uniform_size::<T>();
        let mut bytes = vec![0u8; total as usize];
        for (i, v) in values.iter().enumerate() {
            let at = i * stride as usize;
            bytes[at..at + size_of::<T>()].copy_from_slice(bytemuck::bytes_of(v));
        }
        Ok(UniformSlots {
            buffer: self.buffer_from(&bytes, wgpu::BufferUsages::UNIFORM)?,
            stride,
            size,
        })
    }

    /// The stride and total bytes of `count` uniform slots of `T`, or the limit error if the
    /// device cannot hold them in one buffer: checkable before the values are made.
    pub(crate) fn slot_layout<T>(&self, count: usize) -> Result<(u64, u64)> {
        let align = self.limits().min_uniform_buffer_offset_alignment.max(1) as u64;
        let stride = uniform_size::<T>().div_ceil(align) * align;
        let max = self.limits().max_buffer_size;
        let needed = stride.saturating_mul(count.max(1) as u64);
        if needed > max {
            return Err(Error::LimitExceeded {
                what: "bytes of a plan's uniform values".into(),
                limit: "max_buffer_size",
                needed,
                max,
            });
        }
        Ok((stride, needed))
    }

    /// A scratch storage buffer of at least `bytes` bytes (rounded up to whole words).
    ///
    /// # Errors
    ///
    /// - [`Error::LimitExceeded`] if that size passes the device's `max_buffer_size`.
    /// - [`Error::Device`] if the allocation fails (out of memory, a lost device).
    pub fn scratch(&self, bytes: u64) -> Result<wgpu::Buffer> {
        self.storage_buffer(bytes.div_ceil(4).max(1) * 4, "scratch memory")
    }

    /// A storage buffer of `size` bytes that can be copied to and from, if the device allows
    /// one that large; `what` names it in errors.
    pub(crate) fn storage_buffer(&self, size: u64, what: &str) -> Result<wgpu::Buffer> {
        let max = self.limits().max_buffer_size;
        if size > max {
            return Err(Error::LimitExceeded {
                what: format!("bytes of {what}"),
                limit: "max_buffer_size",
                needed: size,
                max,
            });
        }
        self.checked(&format!("allocating {what}"), || {
            self.inner.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(what),
                size,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        })
    }

    fn buffer_from(&self, bytes: &[u8], usage: wgpu::BufferUsages) -> Result<wgpu::Buffer> {
        let buffer = self.checked("allocating a buffer", || {
            self.inner.device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: bytes.len() as u64,
                usage: usage | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        })?;
        self.checked("writing a buffer", || {
            self.inner.queue.write_buffer(&buffer, 0, bytes)
        })?;
        Ok(buffer)
    }

    /// Submits `encoder` and waits for the GPU to finish it.
    ///
    /// # Errors
    ///
    /// [`Error::Device`] if the submission fails (a validation error in the recorded work),
    /// the wait fails or the device is lost.
    pub fn submit_and_wait(&self, encoder: wgpu::CommandEncoder) -> Result<()> {
        let index = self.checked("submitting work", || {
            self.inner.queue.submit([encoder.finish()])
        })?;
        self.wait_for(Some(index))
    }

    /// A new command encoder on this device.
    pub fn encoder(&self) -> wgpu::CommandEncoder {
        self.inner
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None })
    }
}

/// Bytes a uniform value of type `T` takes: WGSL rounds uniform structs up to 16 bytes.
fn uniform_size<T>() -> u64 {
    (size_of::<T>().div_ceil(16).max(1) * 16) as u64
}

/// Uniform values in one buffer ([`Context::uniform_slots`]), bound one at a time.
pub struct UniformSlots {
    buffer: wgpu::Buffer,
    stride: u64,
    size: u64,
}

impl UniformSlots {
    /// The binding of value `i` (past the end, making a bind group of it fails).
    pub fn binding(&self, i: usize) -> wgpu::BufferBinding<'_> {
        wgpu::BufferBinding {
            buffer: &self.buffer,
            offset: (i as u64).saturating_mul(self.stride),
            size: std::num::NonZeroU64::new(self.size),
        }
    }
    /// The buffer, to keep it alive as long as the bind groups that use it.
    pub fn into_buffer(self) -> wgpu::Buffer {
        self.buffer
    }
}

fn poisoned() -> Error {
    Error::Device(
        "a thread panicked while holding the context's pipeline cache or error records; make a \
         new Context"
            .into(),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn context_is_send_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<super::Context>();
    }
}
