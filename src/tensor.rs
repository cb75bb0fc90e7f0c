//! `GpuTensor`: a storage buffer with a shape and an element type; upload and download.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll, Waker};

use crate::context::Context;
use crate::dispatch::CallTensor;
use crate::error::{Error, Result};

/// Element types a tensor can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// IEEE half, 2 bytes, packed two per 32-bit word in the buffer.
    F16,
    /// 32-bit unsigned integer.
    U32,
    /// 32-bit signed integer.
    I32,
    /// Byte (booleans in masks: nonzero = true), packed four per word.
    U8,
    /// bfloat16, 2 bytes, packed two per 32-bit word in the buffer.
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::U8 => 1,
            _ => 4,
        }
    }
    /// Lower-case name, as in numpy.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::U32 => "u32",
            DType::I32 => "i32",
            DType::U8 => "u8",
            DType::BF16 => "bf16",
        }
    }
}

/// Err unless `T` is f32 or f16, the storage types of the float kernels but RoPE (which also
/// takes bf16); `what` names the kernel.
pub(crate) fn require_float<T: Element>(what: &str) -> Result<()> {
    if !matches!(T::DTYPE, DType::F32 | DType::F16) {
        return Err(Error::Dtype(format!(
            "{what} takes f32 or f16 tensors, got {}",
            T::DTYPE.name()
        )));
    }
    Ok(())
}

/// A host type that can live in a [`GpuTensor`].
pub trait Element: bytemuck::Pod + Send + Sync + 'static {
    /// The matching [`DType`].
    const DTYPE: DType;
}
impl Element for f32 {
    const DTYPE: DType = DType::F32;
}
impl Element for half::f16 {
    const DTYPE: DType = DType::F16;
}
impl Element for half::bf16 {
    const DTYPE: DType = DType::BF16;
}
impl Element for u32 {
    const DTYPE: DType = DType::U32;
}
impl Element for i32 {
    const DTYPE: DType = DType::I32;
}
impl Element for u8 {
    const DTYPE: DType = DType::U8;
}

/// A contiguous (C-order) tensor in a GPU storage buffer.
///
/// Cloning shares the buffer. Buffers are padded to whole 32-bit words.
pub struct GpuTensor<T: Element> {
    ctx: Context,
    buffer: Arc<wgpu::Buffer>,
    shape: Vec<usize>,
    _elem: PhantomData<T>,
}

impl<T: Element> Clone for GpuTensor<T> {
    fn clone(&self) -> Self {
        Self {
            ctx: self.ctx.clone(),
            buffer: self.buffer.clone(),
            shape: self.shape.clone(),
            _elem: PhantomData,
        }
    }
}

impl<T: Element> std::fmt::Debug for GpuTensor<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuTensor<{}>{:?}", T::DTYPE.name(), self.shape)
    }
}

/// Number of elements of a shape (of a tensor, whose product is known to fit).
pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Number of elements of a shape, or `None` when the product overflows `usize`.
pub fn checked_numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |a, &x| a.checked_mul(x))
}

/// Number of elements of `what`'s shape, or a shape error when the product overflows `usize`
/// (shape checks compare lengths with products that would otherwise wrap). `what` is only
/// formatted on error (pass `format_args!` for a composed name).
pub fn shape_elements(what: impl std::fmt::Display, shape: &[usize]) -> Result<usize> {
    checked_numel(shape).ok_or_else(|| {
        Error::shape(format!(
            "{what} shape {shape:?} has more elements than memory can address"
        ))
    })
}

/// Elements of a tensor shape of `dtype`: every axis at least 1, and the element and byte
/// counts representable (a wrapped product would make a tensor smaller than its shape).
fn tensor_len(shape: &[usize], dtype: DType) -> Result<usize> {
    if shape.is_empty() || shape.contains(&0) {
        return Err(Error::shape(format!(
            "tensor shape {shape:?} is empty; every dimension must be at least 1"
        )));
    }
    let n = shape_elements("tensor", shape)?;
    match n.checked_mul(dtype.size()) {
        Some(bytes) if bytes <= isize::MAX as usize => Ok(n),
        _ => Err(Error::shape(format!(
            "tensor shape {shape:?} has more bytes than memory can address"
        ))),
    }
}

/// Bytes of a buffer holding `n` elements of `dtype`, padded to a whole word (at least one).
pub(crate) fn padded_bytes(n: usize, dtype: DType) -> u64 {
    ((n * dtype.size()).div_ceil(4).max(1) * 4) as u64
}

/// The first `n` elements of `dtype` in `buffer`, padded to a whole word, as a binding: a
/// tensor's data, not the whole buffer (an application's may exceed a storage binding).
pub(crate) fn data_binding(
    buffer: &wgpu::Buffer,
    n: usize,
    dtype: DType,
) -> wgpu::BufferBinding<'_> {
    crate::dispatch::sub_binding(buffer, 0, padded_bytes(n, dtype))
}

impl Context {
    /// Uploads `data` as a tensor of `shape` (C order), through a queue write: wgpu keeps the
    /// staged bytes until the next submit. An application that may upload and then submit
    /// nothing (say, every request's call rejected) frees them with `ctx.queue().submit([])`.
    ///
    /// # Errors
    ///
    /// - [`Error::Shape`] if `shape` is empty, has a zero axis, has more bytes than memory can
    ///   address, or holds other than `data.len()` elements.
    /// - [`Error::LimitExceeded`] if the tensor's bytes, padded to a whole word, pass the
    ///   device's `max_buffer_size`.
    /// - [`Error::Device`] if allocating or writing the buffer fails (out of memory, a lost
    ///   device).
    pub fn upload<T: Element>(
        &self,
        data: &[T],
        shape: impl Into<Vec<usize>>,
    ) -> Result<GpuTensor<T>> {
        let shape = shape.into();
        let len = tensor_len(&shape, T::DTYPE)?;
        if len != data.len() {
            return Err(Error::shape(format!(
                "upload: shape {shape:?} holds {len} elements but {} were given",
                data.len()
            )));
        }
        let t = self.zeros::<T>(shape)?;
        t.write(data)?;
        Ok(t)
    }

    /// Uploads booleans as a byte mask (true = 1).
    ///
    /// # Errors
    ///
    /// As [`Context::upload`].
    pub fn upload_mask(
        &self,
        mask: &[bool],
        shape: impl Into<Vec<usize>>,
    ) -> Result<GpuTensor<u8>> {
        let bytes: Vec<u8> = mask.iter().map(|&b| b as u8).collect();
        self.upload(&bytes, shape)
    }

    /// A zero-filled tensor of `shape`.
    ///
    /// # Errors
    ///
    /// - [`Error::Shape`] if `shape` is empty, has a zero axis or has more bytes than memory
    ///   can address.
    /// - [`Error::LimitExceeded`] if the tensor's bytes, padded to a whole word, pass the
    ///   device's `max_buffer_size`.
    /// - [`Error::Device`] if the allocation fails (out of memory, a lost device).
    pub fn zeros<T: Element>(&self, shape: impl Into<Vec<usize>>) -> Result<GpuTensor<T>> {
        let shape = shape.into();
        let len = tensor_len(&shape, T::DTYPE)?;
        let buffer = self.storage_buffer(padded_bytes(len, T::DTYPE), "a tensor")?;
        Ok(GpuTensor {
            ctx: self.clone(),
            buffer: Arc::new(buffer),
            shape,
            _elem: PhantomData,
        })
    }
}

impl<T: Element> GpuTensor<T> {
    /// Wraps a buffer the application owns: `STORAGE`, plus `COPY_SRC` to download and
    /// `COPY_DST` to write. The buffer must come from the context's own device: wgpu offers
    /// no way to check it here, and a kernel given another device's buffer fails inside wgpu
    /// (a panic where the devices come from different instances) or reads and writes
    /// unrelated memory. It holds at least the data padded to whole 4-byte words, from offset
    /// 0; a kernel writing an odd-byte tensor (u8, f16) keeps the rest of its last word, but
    /// [`GpuTensor::write`] zeroes those padding bytes.
    ///
    /// # Errors
    ///
    /// - [`Error::Shape`] if `shape` is empty, has a zero axis or has more bytes than memory
    ///   can address, or if `buffer` is smaller than the data padded to whole words.
    /// - [`Error::InvalidOption`] if `buffer` lacks `BufferUsages::STORAGE`.
    pub fn from_buffer(
        ctx: &Context,
        buffer: wgpu::Buffer,
        shape: impl Into<Vec<usize>>,
    ) -> Result<Self> {
        let shape = shape.into();
        // Whole words: copies and bindings come in 4-byte units.
        let need = padded_bytes(tensor_len(&shape, T::DTYPE)?, T::DTYPE);
        if buffer.size() < need {
            return Err(Error::shape(format!(
                "buffer of {} bytes is too small for {shape:?} {} ({need} bytes, the data \
                 padded to whole 4-byte words)",
                buffer.size(),
                T::DTYPE.name()
            )));
        }
        if !buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
            return Err(Error::option("buffer needs BufferUsages::STORAGE"));
        }
        Ok(Self {
            ctx: ctx.clone(),
            buffer: Arc::new(buffer),
            shape,
            _elem: PhantomData,
        })
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        numel(&self.shape)
    }
    /// Never true: tensors have at least one element.
    pub fn is_empty(&self) -> bool {
        false
    }
    /// The buffer.
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }
    /// The context the tensor lives in.
    pub fn context(&self) -> &Context {
        &self.ctx
    }
    /// The tensor under the name a kernel binds it by, for
    /// [`check_call_tensors`](crate::dispatch::check_call_tensors).
    pub(crate) fn named<'a>(&'a self, name: &'a str) -> CallTensor<'a> {
        CallTensor {
            name,
            context: &self.ctx,
            buffer: &self.buffer,
        }
    }
    /// Bytes of data (without padding).
    pub fn bytes(&self) -> u64 {
        (self.len() * T::DTYPE.size()) as u64
    }
    /// The same buffer viewed with another shape of the same number of elements.
    ///
    /// # Errors
    ///
    /// [`Error::Shape`] if `shape` is empty, has a zero axis, has more bytes than memory can
    /// address, or holds another number of elements.
    pub fn reshape(&self, shape: impl Into<Vec<usize>>) -> Result<Self> {
        let shape = shape.into();
        if tensor_len(&shape, T::DTYPE)? != self.len() {
            return Err(Error::shape(format!(
                "cannot reshape {:?} ({} elements) to {shape:?}",
                self.shape,
                self.len()
            )));
        }
        Ok(Self {
            shape,
            ..self.clone()
        })
    }

    /// Replaces the tensor's contents with `data` (as many elements as the tensor holds); the
    /// write lands before the next submitted work, as queue writes do.
    ///
    /// # Errors
    ///
    /// - [`Error::Shape`] if `data` holds another number of elements than the tensor.
    /// - [`Error::Device`] if the queue write fails (a wrapped buffer without
    ///   `BufferUsages::COPY_DST`, a lost device).
    pub fn write(&self, data: &[T]) -> Result<()> {
        if data.len() != self.len() {
            return Err(Error::shape(format!(
                "write: tensor {:?} holds {} elements but {} were given",
                self.shape,
                self.len(),
                data.len()
            )));
        }
        // Queue writes come in whole words: up to 3 padding bytes after the data are zeroed,
        // nothing past them (a wrapped buffer may hold more than the tensor).
        let mut bytes = bytemuck::cast_slice::<T, u8>(data).to_vec();
        bytes.resize(padded_bytes(self.len(), T::DTYPE) as usize, 0);
        self.ctx.checked("writing a tensor", || {
            self.ctx.queue().write_buffer(&self.buffer, 0, &bytes)
        })
    }

    /// Copies the tensor back to the host, blocking.
    ///
    /// # Errors
    ///
    /// [`Error::Device`] if allocating the readback buffer, the copy into it (a wrapped
    /// buffer without `BufferUsages::COPY_SRC`), its mapping or the wait fails, or the device
    /// is lost.
    pub fn download(&self) -> Result<Vec<T>> {
        let staging = self.stage_readback()?;
        self.ctx.map_read(&staging, "the readback buffer")?;
        self.read_mapped(&staging)
    }

    /// Copies the tensor back to the host without blocking the calling thread: while the copy
    /// is pending, a helper thread waits on the device and wakes the task (no busy polling).
    /// Dropping the future early is safe.
    ///
    /// # Errors
    ///
    /// As [`GpuTensor::download`], and [`Error::Device`] if polling the device fails or the
    /// helper thread cannot be started.
    pub async fn download_async(&self) -> Result<Vec<T>> {
        let staging = self.stage_readback()?;
        let slot: Arc<Mutex<Option<Result<(), wgpu::BufferAsyncError>>>> = Arc::default();
        let sink = slot.clone();
        self.ctx.checked("mapping the readback buffer", || {
            staging.map_async(wgpu::MapMode::Read, .., move |r| {
                if let Ok(mut s) = sink.lock() {
                    *s = Some(r);
                }
            })
        })?;
        MapFuture {
            ctx: &self.ctx,
            slot,
            waiter: Arc::default(),
        }
        .await?;
        self.read_mapped(&staging)
    }

    fn stage_readback(&self) -> Result<wgpu::Buffer> {
        // The tensor's words only: a wrapped buffer may be larger, or not whole words.
        let size = padded_bytes(self.len(), T::DTYPE);
        let staging = self.ctx.checked("allocating a readback buffer", || {
            self.ctx.device().create_buffer(&wgpu::BufferDescriptor {
                label: Some("readback"),
                size,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        })?;
        let mut encoder = self.ctx.encoder();
        encoder.copy_buffer_to_buffer(&self.buffer, 0, &staging, 0, size);
        self.ctx.checked("copying for readback", || {
            self.ctx.queue().submit([encoder.finish()])
        })?;
        Ok(staging)
    }

    fn read_mapped(&self, staging: &wgpu::Buffer) -> Result<Vec<T>> {
        let view = staging
            .get_mapped_range(..)
            .map_err(|e| Error::Device(format!("reading the readback buffer failed: {e}")))?;
        let n = self.len() * T::DTYPE.size();
        // The mapped bytes are not necessarily aligned for T; copy through a Vec<T>.
        let mut out = vec![T::zeroed(); self.len()];
        bytemuck::cast_slice_mut::<T, u8>(&mut out).copy_from_slice(&view[..n]);
        Ok(out)
    }

    /// The tensor's bytes (padded to a whole word) as a binding. Not the whole buffer: an
    /// application's buffer may be larger than a storage binding may be.
    pub fn binding(&self) -> wgpu::BufferBinding<'_> {
        data_binding(&self.buffer, self.len(), T::DTYPE)
    }
}

/// Resolves once the readback buffer is mapped. Native wgpu runs map callbacks only inside a
/// device poll, so one helper thread at a time blocks in a poll and then wakes the task.
struct MapFuture<'a> {
    ctx: &'a Context,
    slot: Arc<Mutex<Option<Result<(), wgpu::BufferAsyncError>>>>,
    waiter: Arc<Mutex<Waiter>>,
}

#[derive(Default)]
struct Waiter {
    /// The task's latest waker.
    waker: Option<Waker>,
    /// Whether a helper thread is waiting on the device.
    running: bool,
}

/// Marks the helper thread's wait over and wakes the task when dropped.
struct WakeOnDrop(Arc<Mutex<Waiter>>);

impl Drop for WakeOnDrop {
    fn drop(&mut self) {
        // Woken outside the lock: a waker may poll the task inline.
        let mut w = self.0.lock().unwrap_or_else(|e| e.into_inner());
        w.running = false;
        let waker = w.waker.take();
        drop(w);
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl Future for MapFuture<'_> {
    type Output = Result<()>;
    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        if let Err(e) = self.ctx.device().poll(wgpu::PollType::Poll) {
            return Poll::Ready(Err(Error::Device(format!(
                "polling the device failed: {e}"
            ))));
        }
        let done = self.slot.lock().ok().and_then(|mut s| s.take());
        match done {
            Some(Ok(())) => return Poll::Ready(Ok(())),
            Some(Err(e)) => return Poll::Ready(Err(Error::Device(format!("mapping failed: {e}")))),
            None => {}
        }
        let Ok(mut w) = self.waiter.lock() else {
            return Poll::Ready(Err(Error::Device("a download's waiter panicked".into())));
        };
        w.waker = Some(cx.waker().clone());
        if !w.running {
            w.running = true;
            let device = self.ctx.device().clone();
            let waiter = self.waiter.clone();
            let spawned = std::thread::Builder::new()
                .name("seq-kernels download".into())
                .spawn(move || {
                    // Wakes the task however the wait ends, a panic inside wgpu's poll
                    // included (GL's lock after 6 s): the task must not wait forever.
                    let _wake = WakeOnDrop(waiter);
                    // Waits in short slices: GL holds its context lock through a wait, and
                    // other callers give up after 6 s. The map callback runs in a poll.
                    let slice = wgpu::PollType::Wait {
                        submission_index: None,
                        timeout: Some(std::time::Duration::from_millis(50)),
                    };
                    while let Err(wgpu::PollError::Timeout) = device.poll(slice.clone()) {}
                });
            if let Err(e) = spawned {
                return Poll::Ready(Err(Error::Device(format!(
                    "starting a thread to wait for the download failed: {e}"
                ))));
            }
        }
        Poll::Pending
    }
}
