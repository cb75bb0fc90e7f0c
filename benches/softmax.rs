//! Softmax throughput on the default adapter, GPU time from timestamp queries (wall clock
//! without them). The vec4 copy of the same bytes runs in the same group: divide the two
//! throughputs for the ratio to the reachable bandwidth.

mod common;

use common::gpu_time;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use seq_kernels::reference::random_values;
use seq_kernels::{Context, Softmax, SoftmaxOptions};

fn bench(c: &mut Criterion) {
    let ctx = match Context::new() {
        Ok(ctx) => ctx,
        Err(e) => {
            eprintln!("SKIPPING softmax bench: {e}");
            return;
        }
    };
    let mut group = c.benchmark_group("softmax");
    group.sample_size(10);
    // Small enough for lavapipe; `seqk bench softmax` runs the full-size cases.
    for (rows, n) in [(256usize, 1024usize), (64, 4096), (8, 32768), (2, 1 << 20)] {
        let len = rows * n;
        let x = ctx
            .upload(&random_values(len, 1, -4.0, 4.0), [rows, n])
            .unwrap();
        let y = ctx.zeros::<f32>([rows, n]).unwrap();
        group.throughput(Throughput::Bytes(2 * x.bytes()));
        let plan = Softmax::new(&ctx, &SoftmaxOptions::default())
            .unwrap()
            .plan(&x, None, &y)
            .unwrap();
        group.bench_function(BenchmarkId::new("f32", format!("{rows}x{n}")), |b| {
            b.iter_custom(|iters| gpu_time(&ctx, &plan, iters))
        });
        let copy =
            seq_kernels::kernels::copy::plan(&ctx, x.buffer(), y.buffer(), x.bytes()).unwrap();
        group.bench_function(BenchmarkId::new("copy", format!("{rows}x{n}")), |b| {
            b.iter_custom(|iters| gpu_time(&ctx, &copy, iters))
        });
        let xh = ctx
            .upload(&vec![half::f16::from_f32(0.5); len], [rows, n])
            .unwrap();
        let yh = ctx.zeros::<half::f16>([rows, n]).unwrap();
        group.throughput(Throughput::Bytes(2 * xh.bytes()));
        let plan = Softmax::new(&ctx, &SoftmaxOptions::default())
            .unwrap()
            .plan(&xh, None, &yh)
            .unwrap();
        group.bench_function(BenchmarkId::new("f16", format!("{rows}x{n}")), |b| {
            b.iter_custom(|iters| gpu_time(&ctx, &plan, iters))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
