//! RoPE: fused in-place q + k rotation (GQA), b = 16, s = 1024, hq = 32, hkv = 8, d = 128, in
//! f16 and f32. GPU time from timestamp queries (wall clock where the adapter has none);
//! bandwidth counts reading and writing q and k once plus reading the cos/sin table.
//!
//! `SEQK_BENCH_QUICK=1` shrinks the shape to b = 1, s = 128 for a smoke run on a CPU device.

mod common;

use common::gpu_time;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use half::f16;
use seq_kernels::profile::time_passes;
use seq_kernels::{Context, Element, Rope, RopeOptions, RopeTarget};

fn case<T: Element>(ctx: &Context, c: &mut Criterion, name: &str) {
    let quick = common::quick();
    let (b, s, hq, hkv, d) = if quick {
        (1, 128, 32, 8, 128)
    } else {
        (16, 1024, 32, 8, 128)
    };
    let setup = || -> seq_kernels::Result<_> {
        let q = ctx.zeros::<T>([b, s, hq, d])?;
        let k = ctx.zeros::<T>([b, s, hkv, d])?;
        let plan = Rope::new(ctx, &RopeOptions::default())?.plan(
            &RopeTarget::in_place(&q)?,
            Some(&RopeTarget::in_place(&k)?),
            None,
        )?;
        Ok((q, k, plan))
    };
    let (q, k, plan) = match setup() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("rope/{name}: skipped: {e}");
            return;
        }
    };
    let table = (s * d / 2 * 8) as u64;
    let bytes = 2 * (q.bytes() + k.bytes()) + table;

    // A plain line with the figures the project records (median of 10 samples of 10 calls).
    match time_passes(ctx, 2, 10, 10, |pass| plan.record(pass)) {
        Ok(t) => {
            let secs = t.best().as_secs_f64();
            println!(
                "rope/{name} b={b} s={s} hq={hq} hkv={hkv} d={d}: {:.3} ms ({} clock), {:.1} GB/s",
                secs * 1e3,
                t.clock(),
                bytes as f64 / secs / 1e9
            );
        }
        Err(e) => {
            eprintln!("rope/{name}: timing failed: {e}");
            return;
        }
    }

    let mut group = c.benchmark_group("rope");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(bytes));
    group.bench_function(format!("fused_qk_in_place/{name}"), |bencher| {
        bencher.iter_custom(|iters| gpu_time(ctx, &plan, iters))
    });
    group.finish();
}

fn rope(c: &mut Criterion) {
    let ctx = match Context::new() {
        Ok(ctx) => ctx,
        Err(e) => {
            eprintln!("rope bench skipped: {e}");
            return;
        }
    };
    let info = ctx.adapter_info();
    println!("adapter: {} ({:?})", info.name, info.backend);
    case::<f16>(&ctx, c, "f16");
    case::<f32>(&ctx, c, "f32");
}

criterion_group!(benches, rope);
criterion_main!(benches);
