//! Exact attention throughput on the default adapter (GPU time from timestamp queries, wall
//! clock without them), causal and not, next to the matmul of one head's Q K^T on the same block products.
//! Criterion reports elements as FLOPs: 4 b h m n d (halved for causal), 2 n n d for matmul.

mod common;

use common::gpu_time;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use seq_kernels::kernels::attention::matmul_plan;
use seq_kernels::reference::random_values;
use seq_kernels::{Attention, AttentionOptions, Context};

fn bench(c: &mut Criterion) {
    let ctx = match Context::new() {
        Ok(ctx) => ctx,
        Err(e) => {
            eprintln!("SKIPPING attention bench: {e}");
            return;
        }
    };
    let mut group = c.benchmark_group("attention");
    group.sample_size(10);
    // Small enough for lavapipe; `seqk bench attention` runs larger cases.
    for (b, h, n, d) in [(1usize, 4usize, 128usize, 64usize), (1, 4, 256, 128)] {
        let shape = [b, h, n, d];
        let len = b * h * n * d;
        let up = |seed| {
            ctx.upload(&random_values(len, seed, -1.0, 1.0), shape)
                .unwrap()
        };
        let (q, k, v) = (up(1), up(2), up(3));
        let o = ctx.zeros::<f32>(shape).unwrap();
        for causal in [false, true] {
            let opts = AttentionOptions {
                causal,
                ..Default::default()
            };
            let plan = Attention::new(&ctx, &opts)
                .unwrap()
                .plan(&q, &k, &v, None, &o, None)
                .unwrap();
            let flops = 4 * b * h * n * n * d / if causal { 2 } else { 1 };
            group.throughput(Throughput::Elements(flops as u64));
            let name = if causal { "causal" } else { "full" };
            group.bench_function(BenchmarkId::new(name, format!("b{b}h{h}n{n}d{d}")), |bn| {
                bn.iter_custom(|iters| gpu_time(&ctx, &plan, iters))
            });
        }
        let a = ctx
            .upload(&random_values(n * d, 4, -1.0, 1.0), [n, d])
            .unwrap();
        let bt = ctx
            .upload(&random_values(n * d, 5, -1.0, 1.0), [n, d])
            .unwrap();
        let cm = ctx.zeros::<f32>([n, n]).unwrap();
        let plan = matmul_plan(&ctx, &a, &bt, &cm, true).unwrap();
        group.throughput(Throughput::Elements((2 * n * n * d) as u64));
        group.bench_function(BenchmarkId::new("matmul", format!("{n}x{d}x{n}")), |bn| {
            bn.iter_custom(|iters| gpu_time(&ctx, &plan, iters))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
