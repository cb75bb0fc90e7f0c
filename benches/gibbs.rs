//! Gibbs sweeps: site updates per second on the default adapter (GPU time from timestamp
//! queries, wall clock without them), beside the single-threaded f64 CPU reference in the
//! same run. Criterion's element throughput is site updates (chains x L per sweep).
//!
//! Cases: V = 2, L = 4096, 4096 chains; V = 1000, L = 64, 1024 chains;
//! V = 32000 with W = A B^T of rank 64, L = 32, 64 chains. The CPU reference runs the same
//! model on fewer chains (its rate per site does not depend on the number of chains).
//! `SEQK_BENCH_QUICK=1` divides the GPU chains by 16 for slow software adapters.

mod common;

use common::gpu_time;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use seq_kernels::reference::gibbs::{self as reference, HostModel, HostPairwise};
use seq_kernels::reference::random_values;
use seq_kernels::{ChainModel, Context, Gibbs, GibbsOptions, Pairwise};

struct Case {
    vocab: usize,
    len: usize,
    chains: usize,
    rank: usize,
    cpu_chains: usize,
}

const CASES: [Case; 3] = [
    Case {
        vocab: 2,
        len: 4096,
        chains: 4096,
        rank: 0,
        cpu_chains: 16,
    },
    Case {
        vocab: 1000,
        len: 64,
        chains: 1024,
        rank: 0,
        cpu_chains: 4,
    },
    Case {
        vocab: 32000,
        len: 32,
        chains: 64,
        rank: 64,
        cpu_chains: 1,
    },
];

fn bench(c: &mut Criterion) {
    let ctx = match Context::new() {
        Ok(ctx) => ctx,
        Err(e) => {
            eprintln!("SKIPPING gibbs bench: {e}");
            return;
        }
    };
    let quick = common::quick();
    let mut group = c.benchmark_group("gibbs");
    group.sample_size(10);
    let opts = GibbsOptions {
        sweeps: 1,
        seed: 1,
        ..Default::default()
    };
    for case in CASES {
        let (v, l, r) = (case.vocab, case.len, case.rank);
        let b = if quick {
            (case.chains / 16).max(1)
        } else {
            case.chains
        };
        let name = if r == 0 {
            format!("V{v}-L{l}")
        } else {
            format!("V{v}r{r}-L{l}")
        };
        let unary = random_values(l * v, 1, -1.0, 1.0);
        let pairwise = if r == 0 {
            HostPairwise::Dense(random_values(v * v, 2, -1.0, 1.0))
        } else {
            HostPairwise::Factored {
                a: random_values(v * r, 3, -0.3, 0.3),
                b: random_values(v * r, 4, -0.3, 0.3),
                rank: r,
            }
        };
        let gpu_unary = ctx.upload(&unary, [l, v]).unwrap();
        let (pa, pb) = match &pairwise {
            HostPairwise::Dense(w) => (ctx.upload(w, [v, v]).unwrap(), None),
            HostPairwise::Factored { a, b, rank } => (
                ctx.upload(a, [v, *rank]).unwrap(),
                Some(ctx.upload(b, [v, *rank]).unwrap()),
            ),
        };
        let model = ChainModel {
            unary: &gpu_unary,
            pairwise: match &pb {
                None => Pairwise::Dense(&pa),
                Some(pb) => Pairwise::Factored { a: &pa, b: pb },
            },
        };
        let tokens = ctx.zeros::<u32>([b, l]).unwrap();
        let plan = Gibbs::new(&ctx, &opts)
            .unwrap()
            .plan(&model, &tokens, None, None)
            .unwrap();
        group.throughput(Throughput::Elements((b * l) as u64));
        group.bench_function(BenchmarkId::new("gpu", format!("{name}-b{b}")), |bch| {
            bch.iter_custom(|iters| gpu_time(&ctx, &plan, iters))
        });

        let host = HostModel {
            unary,
            unary_shape: vec![l, v],
            pairwise,
        };
        let cb = case.cpu_chains;
        let mut state = vec![0u32; cb * l];
        group.throughput(Throughput::Elements((cb * l) as u64));
        group.bench_function(BenchmarkId::new("cpu", format!("{name}-b{cb}")), |bch| {
            bch.iter(|| reference::gibbs(&host, &mut state, &[cb, l], None, &opts).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
