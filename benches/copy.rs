//! vec4 copy bandwidth on the default adapter (GPU time from timestamp queries): the
//! reachable bandwidth that memory-bound kernels are compared with.

mod common;

use common::gpu_time;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use seq_kernels::Context;

fn bench(c: &mut Criterion) {
    let ctx = match Context::new() {
        Ok(ctx) => ctx,
        Err(e) => {
            eprintln!("SKIPPING copy bench: {e}");
            return;
        }
    };
    let mut group = c.benchmark_group("copy");
    group.sample_size(10);
    for mib in [4u64, 64, 256] {
        let bytes = mib << 20;
        let src = ctx.scratch(bytes).unwrap();
        let dst = ctx.scratch(bytes).unwrap();
        let plan = seq_kernels::kernels::copy::plan(&ctx, &src, &dst, bytes).unwrap();
        group.throughput(Throughput::Bytes(2 * bytes));
        group.bench_function(BenchmarkId::new("vec4", format!("{mib}MiB")), |b| {
            b.iter_custom(|iters| gpu_time(&ctx, &plan, iters))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
