//! Shared by the GPU tests: one context per test binary, a loud skip without an adapter
//! (a failure under SEQK_REQUIRE_GPU=1), seeded random data and error measures.
#![allow(dead_code)]

use std::sync::OnceLock;

use seq_kernels::Context;

/// The shared context, or `None` (after a loud message) when no adapter exists.
/// Panics when there is none and `SEQK_REQUIRE_GPU=1`.
pub fn gpu() -> Option<&'static Context> {
    static CTX: OnceLock<Option<Context>> = OnceLock::new();
    let ctx = CTX.get_or_init(|| match Context::new() {
        Ok(ctx) => {
            let i = ctx.adapter_info();
            eprintln!("GPU tests on {} ({:?}, {})", i.name, i.backend, i.driver);
            Some(ctx)
        }
        Err(e) => {
            eprintln!("no GPU adapter: {e}");
            None
        }
    });
    if ctx.is_none() {
        if std::env::var("SEQK_REQUIRE_GPU").is_ok_and(|v| v == "1") {
            panic!("SEQK_REQUIRE_GPU=1 but no GPU adapter could be opened (see the message above)");
        }
        let test = std::thread::current().name().unwrap_or("?").to_string();
        eprintln!("SKIPPING GPU TEST {test}: no adapter (set SEQK_REQUIRE_GPU=1 to fail instead)");
    }
    ctx.as_ref()
}

/// Deterministic pseudo-random values in [lo, hi).
pub use seq_kernels::reference::random_values as random;

/// Deterministic pseudo-random booleans with probability `p` of true.
pub fn random_mask(n: usize, seed: u64, p: f32) -> Vec<bool> {
    random(n, seed, 0.0, 1.0)
        .into_iter()
        .map(|u| u < p)
        .collect()
}
