//! FLASH mixed-chunk attention throughput on the default adapter (GPU time from timestamp
//! queries, wall clock without them), causal and not. Criterion reports elements as tokens,
//! so its throughput is tokens per second; `seqk bench flash` adds TFLOP/s and the exact
//! attention kernel at the same n.

mod common;

use common::gpu_time;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use seq_kernels::reference::random_values;
use seq_kernels::{Context, Flash, FlashInputs, FlashOptions};

fn bench(c: &mut Criterion) {
    let ctx = match Context::new() {
        Ok(ctx) => ctx,
        Err(e) => {
            eprintln!("SKIPPING flash bench: {e}");
            return;
        }
    };
    let mut group = c.benchmark_group("flash");
    group.sample_size(10);
    // Small enough for lavapipe; `seqk bench flash` runs n up to 64K.
    let (s, e, chunk) = (128usize, 1536usize, 256usize);
    for n in [1024usize, 2048] {
        let up = |seed, w: usize| {
            ctx.upload(&random_values(n * w, seed, -1.0, 1.0), [1, n, w])
                .unwrap()
        };
        let (qq, kq, ql, kl, v) = (up(1, s), up(2, s), up(3, s), up(4, s), up(5, e));
        let out = ctx.zeros::<f32>([1, n, e]).unwrap();
        for causal in [false, true] {
            let opts = FlashOptions {
                chunk,
                causal,
                ..Default::default()
            };
            let plan = Flash::new(&ctx, &opts)
                .unwrap()
                .plan(&FlashInputs::new(&qq, &kq, &ql, &kl, &v), &out)
                .unwrap();
            group.throughput(Throughput::Elements(n as u64));
            let name = if causal { "causal" } else { "full" };
            group.bench_function(
                BenchmarkId::new(name, format!("n{n}s{s}e{e}C{chunk}")),
                |bn| bn.iter_custom(|iters| gpu_time(&ctx, &plan, iters)),
            );
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
