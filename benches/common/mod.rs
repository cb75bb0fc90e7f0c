//! Shared by the benches (a folder, not benches/common.rs, so Cargo does not take it for a
//! bench target of its own).

use seq_kernels::profile::time_passes;
use seq_kernels::{Context, Plan};

/// Time of `iters` runs of `plan` recorded into one pass, for criterion's `iter_custom`: GPU
/// time from timestamps, or wall time on an adapter without them (`Timing::best`).
pub fn gpu_time(ctx: &Context, plan: &Plan, iters: u64) -> std::time::Duration {
    let t =
        time_passes(ctx, 0, 1, iters as usize, |pass| plan.record(pass)).expect("timing failed");
    t.best() * iters as u32
}

/// `SEQK_BENCH_QUICK=1`: the benches with full-size cases (rope, gibbs) shrink them for a
/// software adapter; the others are sized for one already (and do not call this).
#[allow(dead_code)]
pub fn quick() -> bool {
    std::env::var("SEQK_BENCH_QUICK").is_ok_and(|v| v == "1")
}
