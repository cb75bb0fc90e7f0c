//! The vec4 copy kernel against its reference (the identity), including a buffer larger than
//! one storage binding, and its errors; and the tensor write it and every upload rely on.

mod common;

use common::{app_buffer, gpu, limited_device};
use seq_kernels::reference::copy as reference;
use seq_kernels::{Error, GpuTensor};

#[test]
fn copies_exactly() {
    let Some(ctx) = gpu() else { return };
    for n in [4usize, 12, 4 * 257, 4 * 65537] {
        let x = common::random(n, n as u64, -1e3, 1e3);
        let y = ctx
            .copy(&ctx.upload(&x, [n]).unwrap())
            .unwrap()
            .download()
            .unwrap();
        assert_eq!(y, reference::copy(&x), "n = {n}");
    }
}

#[test]
fn copies_more_than_one_binding_holds() {
    let Some(ctx) = gpu() else { return };
    // Just past the binding limit (or 160 MiB where the limit is larger): several dispatches.
    let limit = ctx.limits().max_storage_buffer_binding_size.min(160 << 20);
    let n = (limit as usize / 4 + 1024).next_multiple_of(4);
    let x: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let y = ctx
        .copy(&ctx.upload(&x, [n]).unwrap())
        .unwrap()
        .download()
        .unwrap();
    assert!(y == x, "copy of {n} floats differs");
}

#[test]
fn rejects_sizes_that_are_not_whole_vec4s() {
    let Some(ctx) = gpu() else { return };
    let x = ctx.upload(&[1.0f32; 6], [6]).unwrap();
    assert!(matches!(ctx.copy(&x), Err(Error::Shape(_))));
}

/// `GpuTensor::write`, which `upload` and the FLASH decoder's mask go through: contents
/// replaced (an odd byte count, padded to whole words), a wrong length refused untouched.
#[test]
fn tensor_write_replaces_contents() {
    let Some(ctx) = gpu() else { return };
    let t = ctx.upload(&[1u8, 2, 3, 4, 5], [5]).unwrap();
    t.write(&[9, 8, 7, 6, 5]).unwrap();
    assert_eq!(t.download().unwrap(), vec![9, 8, 7, 6, 5]);
    assert!(matches!(t.write(&[1, 2, 3]), Err(Error::Shape(_))));
    assert_eq!(t.download().unwrap(), vec![9, 8, 7, 6, 5]);
}

/// Shapes whose element count overflows are errors at every way a tensor is made: a wrapped
/// product would give a tensor smaller than its shape, which kernels would then index past.
#[test]
fn tensor_shapes_that_overflow_are_errors() {
    let Some(ctx) = gpu() else { return };
    let wraps = [1, 1, (1usize << 56) + 1, 256]; // 2^64 + 256 elements: wraps to 256
    let shape_err = |r: Result<GpuTensor<f32>, Error>| matches!(r, Err(Error::Shape(_)));
    assert!(shape_err(ctx.upload(&[0.0f32; 256], wraps)));
    assert!(shape_err(ctx.zeros::<f32>(wraps)));
    assert!(shape_err(ctx.zeros::<f32>([usize::MAX / 2, 3])));
    let t = ctx.zeros::<f32>([256]).unwrap();
    assert!(shape_err(t.reshape(wraps)));
    assert!(shape_err(t.reshape([0, 256])));
    assert_eq!(t.reshape([4, 64]).unwrap().shape(), &[4, 64]);
    let buffer = app_buffer(ctx, 1024, wgpu::BufferUsages::STORAGE);
    assert!(shape_err(GpuTensor::<f32>::from_buffer(ctx, buffer, wraps)));
}

// ---------------------------------------------------------------- shared machinery, embedded

/// In an application's device (`from_device`, wgpu's panicking error handler left in place),
/// the crate's own queue writes and maps run in error scopes: a bad call is an error, and a
/// lost device too, never a panic.
#[test]
fn embedded_errors_are_errors_not_panics() {
    let Some(_) = gpu() else { return };
    let ctx = &limited_device(|_| {});
    // STORAGE and COPY_SRC only: downloads work, writes cannot.
    let buffer = app_buffer(
        ctx,
        16,
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
    );
    let t = GpuTensor::<f32>::from_buffer(ctx, buffer, [4]).unwrap();
    assert!(matches!(t.write(&[1.0; 4]), Err(Error::Device(_))));
    assert_eq!(t.download().unwrap(), vec![0.0; 4]);
    // A destroyed device: errors from every call, no panic.
    let x = ctx.upload(&[1.0f32, 2.0, 3.0, 4.0], [4]).unwrap();
    ctx.device().destroy();
    assert!(ctx.upload(&[1.0f32; 4], [4]).is_err());
    // A write into a live buffer of a lost device may be dropped quietly: Ok or Err, no panic.
    let _ = x.write(&[0.0; 4]);
    assert!(x.download().is_err());
    assert!(pollster::block_on(x.download_async()).is_err());
    assert!(ctx.softmax(&x, &Default::default()).is_err());
}

/// On a device the crate made, a lost device is named as the cause of every later error,
/// waits included (they were wgpu's "invalid buffer" messages, and `wait` returned Ok).
#[test]
fn a_lost_device_is_named_in_errors() {
    let Some(_) = gpu() else { return };
    let ctx = seq_kernels::Context::new().unwrap();
    let x = ctx.upload(&[1.0f32, 2.0, 3.0, 4.0], [4]).unwrap();
    let y = ctx.zeros::<f32>([4]).unwrap();
    let plan = seq_kernels::Softmax::new(&ctx, &Default::default())
        .unwrap()
        .plan(&x, None, &y)
        .unwrap();
    ctx.device().destroy();
    let lost = |r: Result<(), Error>| match r {
        Err(Error::Device(m)) => assert!(m.contains("device was lost"), "{m}"),
        other => panic!("{other:?}"),
    };
    lost(ctx.wait());
    lost(ctx.upload(&[1.0f32; 4], [4]).map(drop));
    lost(ctx.softmax(&x, &Default::default()).map(drop));
    lost(x.download().map(drop));
    // A plan made before: its submit and wait.
    lost(plan.run(&ctx));
}

/// An error the application raises outside any error scope on the crate's device fails no
/// kernel call (a download on another thread used to return it, losing its own result);
/// `wait` reports it, once.
#[test]
fn the_applications_uncaptured_errors_surface_from_wait_only() {
    let Some(_) = gpu() else { return };
    let ctx = seq_kernels::Context::new().unwrap();
    // MAP_READ with STORAGE is not allowed: validation errors nobody captures.
    let bad = |label| {
        ctx.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: 16,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        })
    };
    let _bad = [bad("app-bad"), bad("app-bad-2"), bad("app-bad-3")];
    let x = ctx.upload(&[1.0f32, 2.0, 3.0, 4.0], [4]).unwrap();
    let y = ctx.softmax(&x, &Default::default()).unwrap();
    let sum: f32 = y.download().unwrap().iter().sum();
    assert!((sum - 1.0).abs() < 1e-6, "{sum}");
    assert_eq!(
        pollster::block_on(x.download_async()).unwrap(),
        [1.0, 2.0, 3.0, 4.0]
    );
    // The first error, and a count of the others (kept, not listed, until a wait).
    match ctx.wait() {
        Err(Error::Device(m)) => assert!(
            m.contains("'app-bad'") && m.ends_with("(and 2 more errors since)"),
            "{m}"
        ),
        other => panic!("wait should report the application's error: {other:?}"),
    }
    ctx.wait().unwrap();
}

/// A tensor wrapping part of an application's buffer: writes touch the tensor's words and
/// nothing after them; a buffer without room for whole words is refused.
#[test]
fn wrapped_buffers_keep_what_is_not_the_tensor() {
    let Some(ctx) = gpu() else { return };
    let buffer = app_buffer(
        ctx,
        32,
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
    );
    ctx.queue()
        .write_buffer(&buffer, 0, bytemuck::cast_slice(&[7.0f32; 8]));
    let front = GpuTensor::<f32>::from_buffer(ctx, buffer.clone(), [2]).unwrap();
    front.write(&[1.0, 2.0]).unwrap();
    let all = GpuTensor::<f32>::from_buffer(ctx, buffer, [8]).unwrap();
    assert_eq!(
        all.download().unwrap(),
        [1.0, 2.0, 7.0, 7.0, 7.0, 7.0, 7.0, 7.0]
    );
    // Downloads read the tensor's words only: a buffer not of whole words around them works.
    let ten = app_buffer(
        ctx,
        10,
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
    );
    let t = GpuTensor::<f32>::from_buffer(ctx, ten, [2]).unwrap();
    t.write(&[3.0, 4.0]).unwrap();
    assert_eq!(t.download().unwrap(), [3.0, 4.0]);
    assert_eq!(pollster::block_on(t.download_async()).unwrap(), [3.0, 4.0]);
    // f16 [3] is 6 bytes of data in 2 words: an 8-byte buffer at least.
    let six = app_buffer(
        ctx,
        6,
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
    );
    assert!(matches!(
        GpuTensor::<half::f16>::from_buffer(ctx, six, [3]),
        Err(Error::Shape(_))
    ));
}

/// Tensors belong to the context that made them: another context's tensor is refused (its
/// buffer ids may even equal this context's, which once computed on the wrong buffer).
#[test]
fn tensors_of_another_context_are_refused() {
    let Some(a) = gpu() else { return };
    let b = &limited_device(|_| {});
    let xa = a.upload(&[0.0f32; 4], [4]).unwrap();
    let xb = b.upload(&[1.0f32, 2.0, 3.0, 4.0], [4]).unwrap();
    assert!(matches!(
        b.softmax(&xa, &Default::default()),
        Err(Error::InvalidOption(_))
    ));
    assert!(matches!(b.copy(&xa), Err(Error::InvalidOption(_))));
    let q = a.zeros::<f32>([1, 1, 4, 8]).unwrap();
    let o = b.zeros::<f32>([1, 1, 4, 8]).unwrap();
    let att = seq_kernels::Attention::new(a, &Default::default()).unwrap();
    assert!(matches!(
        att.plan(&q, &q, &q, None, &o, None),
        Err(Error::InvalidOption(_))
    ));
    // Gibbs reads and copies its initial state itself; a plan runs only on its own context.
    let unary = b.zeros::<f32>([3, 4]).unwrap();
    let w = b.zeros::<f32>([4, 4]).unwrap();
    let model = seq_kernels::ChainModel {
        unary: &unary,
        pairwise: seq_kernels::Pairwise::Dense(&w),
    };
    let init = a.zeros::<u32>([2, 3]).unwrap();
    assert!(matches!(
        b.gibbs(&model, &init, None, &Default::default()),
        Err(Error::InvalidOption(_))
    ));
    let plan = seq_kernels::Softmax::new(b, &Default::default())
        .unwrap()
        .plan(&xb, None, &b.zeros::<f32>([4]).unwrap())
        .unwrap();
    assert!(matches!(plan.run(a), Err(Error::InvalidOption(_))));
    plan.run(b).unwrap();
    // Each context still computes on its own tensors.
    let y = b
        .softmax(&xb, &Default::default())
        .unwrap()
        .download()
        .unwrap();
    assert!((y[3] - 0.6439).abs() < 1e-3, "{y:?}");
}

/// Every tensor of a call is checked for its context, the optional ones and the outputs too:
/// a mask, a Gibbs clamp, the matmul's output.
#[test]
fn optional_tensors_of_another_context_are_refused() {
    let Some(a) = gpu() else { return };
    let b = &limited_device(|_| {});
    let refused = |r: Result<seq_kernels::Plan, Error>| matches!(r, Err(Error::InvalidOption(m)) if m.contains("another Context"));
    let keep = a.upload_mask(&[true; 16], [4, 4]).unwrap();
    let x = b.zeros::<f32>([4, 4]).unwrap();
    let y = b.zeros::<f32>([4, 4]).unwrap();
    let softmax = seq_kernels::Softmax::new(b, &Default::default()).unwrap();
    assert!(refused(softmax.plan(&x, Some(&keep), &y)));
    let q = b.zeros::<f32>([1, 1, 4, 8]).unwrap();
    let o = b.zeros::<f32>([1, 1, 4, 8]).unwrap();
    let att = seq_kernels::Attention::new(b, &Default::default()).unwrap();
    let mask = Some(seq_kernels::AttnMask::from(&keep));
    assert!(refused(att.plan(&q, &q, &q, mask, &o, None)));
    let c = a.zeros::<f32>([4, 4]).unwrap();
    assert!(refused(seq_kernels::kernels::attention::matmul_plan(
        b, &x, &y, &c, true
    )));
    let unary = b.zeros::<f32>([3, 4]).unwrap();
    let w = b.zeros::<f32>([4, 4]).unwrap();
    let model = seq_kernels::ChainModel {
        unary: &unary,
        pairwise: seq_kernels::Pairwise::Dense(&w),
    };
    let init = b.zeros::<u32>([2, 3]).unwrap();
    let clamp = a.upload_mask(&[false; 6], [2, 3]).unwrap();
    let r = b.gibbs(&model, &init, Some(&clamp), &Default::default());
    assert!(
        matches!(&r, Err(Error::InvalidOption(m)) if m.contains("another Context")),
        "{:?}",
        r.err()
    );
}

/// A device with fewer storage buffers per shader stage than a kernel binds (wgpu's default
/// limits allow 8, downlevel ones 4): `LimitExceeded` naming the limit, before any pipeline.
#[test]
fn too_few_storage_buffers_per_stage_is_a_named_limit() {
    let Some(_) = gpu() else { return };
    let named = |r: Result<_, Error>| {
        matches!(
            r,
            Err(Error::LimitExceeded {
                limit: "max_storage_buffers_per_shader_stage",
                ..
            })
        )
    };
    let ctx = &limited_device(|l| l.max_storage_buffers_per_shader_stage = 8);
    let x = ctx.zeros::<f32>([1, 16, 8]).unwrap();
    let v = ctx.zeros::<f32>([1, 16, 8]).unwrap();
    let inputs = seq_kernels::FlashInputs::new(&x, &x, &x, &x, &v);
    let opts = seq_kernels::FlashOptions {
        chunk: 16,
        ..Default::default()
    };
    assert!(named(ctx.flash(&inputs, &opts).map(|_| ())));
    let q = ctx.zeros::<f32>([1, 1, 4, 8]).unwrap();
    assert!(ctx.attention(&q, &q, &q, None, &Default::default()).is_ok());
    // A storage binding counts whatever other usages its buffer has (here also UNIFORM).
    let ctx = &limited_device(|l| l.max_storage_buffers_per_shader_stage = 7);
    let both = app_buffer(
        ctx,
        4 * 8 * 4,
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::UNIFORM,
    );
    let q = GpuTensor::<f32>::from_buffer(ctx, both, [1, 1, 4, 8]).unwrap();
    assert!(named(
        ctx.attention(&q, &q, &q, None, &Default::default())
            .map(|_| ())
    ));
    let ctx = &limited_device(|l| l.max_storage_buffers_per_shader_stage = 4);
    let q = ctx.zeros::<f32>([1, 1, 4, 8]).unwrap();
    assert!(named(
        ctx.attention(&q, &q, &q, None, &Default::default())
            .map(|_| ())
    ));
    assert!(ctx
        .softmax(&ctx.zeros::<f32>([2, 5]).unwrap(), &Default::default())
        .is_ok());
}

/// `download_async` waits without spinning: the task is polled a handful of times while the
/// GPU works, not once per spin (it used to wake itself on every poll), and the data arrive.
#[test]
fn download_async_waits_without_spinning() {
    use std::future::Future;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{mpsc, Arc, Mutex};
    use std::task::{Context as TaskContext, Poll, Wake, Waker};
    struct Signal(Mutex<mpsc::Sender<()>>);
    impl Wake for Signal {
        fn wake(self: Arc<Self>) {
            let _ = self.0.lock().unwrap().send(());
        }
    }
    let Some(ctx) = gpu() else { return };
    // Enough softmax work queued ahead of the copy that the download has to wait.
    let x = ctx.upload(&vec![0.5f32; 1 << 20], [256, 4096]).unwrap();
    let y = ctx.zeros::<f32>([256, 4096]).unwrap();
    let k = seq_kernels::Softmax::new(ctx, &Default::default()).unwrap();
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    for _ in 0..8 {
        k.encode(&mut encoder, &x, &y).unwrap();
    }
    ctx.queue().submit([encoder.finish()]);
    let (tx, rx) = mpsc::channel();
    let waker = Waker::from(Arc::new(Signal(Mutex::new(tx))));
    let mut cx = TaskContext::from_waker(&waker);
    let mut fut = Box::pin(y.download_async());
    let polls = AtomicUsize::new(0);
    let got = loop {
        polls.fetch_add(1, Ordering::Relaxed);
        if let Poll::Ready(r) = fut.as_mut().poll(&mut cx) {
            break r.unwrap();
        }
        rx.recv().unwrap();
    };
    assert!(got.iter().all(|&v| (v - 1.0 / 4096.0).abs() < 1e-9));
    let polls = polls.into_inner();
    assert!(polls <= 8, "{polls} polls: the future spins");
}
