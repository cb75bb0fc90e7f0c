//! The vec4 copy kernel against its reference (the identity), including a buffer larger than
//! one storage binding, and its errors; and the tensor write it and every upload rely on.

mod common;

use common::gpu;
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
    let buffer = ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 1024,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    assert!(shape_err(GpuTensor::<f32>::from_buffer(ctx, buffer, wraps)));
}
