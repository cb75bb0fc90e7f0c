//! What `verify` and `bench` print: check rows, benchmark rows, and the copy-kernel baseline
//! that every memory-bound figure is divided by.

use crate::profile::{time_passes, Timing};
use crate::{Context, Error};

/// One verification: a kernel case, its error against the reference and the tolerance.
pub struct Check {
    pub kernel: &'static str,
    pub case: String,
    pub error: f64,
    pub tolerance: f64,
}

impl Check {
    pub fn passed(&self) -> bool {
        self.error <= self.tolerance
    }
}

/// One benchmark result.
pub struct BenchRow {
    pub kernel: &'static str,
    pub case: String,
    pub timing: Timing,
    /// Bytes read plus written per call (memory-bound kernels).
    pub bytes: Option<f64>,
    /// Floating-point operations per call (compute-bound kernels).
    pub flops: Option<f64>,
    /// GB/s of the copy kernel in the same run.
    pub copy_gbps: f64,
    /// Work counted in items (sites, tokens), for rows reported as items per second.
    pub rate: Option<Rate>,
}

impl BenchRow {
    pub fn gbps(&self) -> Option<f64> {
        self.bytes
            .map(|b| b / self.timing.best().as_secs_f64() / 1e9)
    }
    pub fn copy_ratio(&self) -> Option<f64> {
        self.gbps().map(|g| g / self.copy_gbps)
    }
    pub fn tflops(&self) -> Option<f64> {
        self.flops
            .map(|f| f / self.timing.best().as_secs_f64() / 1e12)
    }

    /// Attaches a rate in items per second (see [`Rate`]).
    pub fn with_rate(self, rate: Rate) -> Self {
        Self {
            rate: Some(rate),
            ..self
        }
    }
    /// The rate attached by [`BenchRow::with_rate`], if any.
    pub fn rate(&self) -> Option<Rate> {
        self.rate
    }
    /// Items per second, for rows with a rate.
    pub fn per_second(&self) -> Option<f64> {
        self.rate()
            .map(|r| r.items / self.timing.best().as_secs_f64())
    }
}

/// Work counted in items rather than bytes or FLOPs (Gibbs site updates, sampled tokens),
/// reported as items per second.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    /// Items per call.
    pub items: f64,
    /// What an item is, plural: "sites", "tokens".
    pub unit: &'static str,
    /// This row's items/s over the single-threaded CPU reference's, measured in the same run.
    pub speedup: Option<f64>,
}

/// Samples after warm-up; the median is reported.
pub const SAMPLES: usize = 10;
pub const WARMUP: usize = 2;

/// The copy kernel's bandwidth in this run.
pub struct Baseline {
    pub gbps: f64,
    timing: Timing,
    bytes: u64,
}

impl Baseline {
    /// The baseline as a benchmark row of its own.
    pub fn row(&self) -> BenchRow {
        BenchRow {
            kernel: "copy",
            case: format!("vec4 {} MiB", self.bytes >> 20),
            timing: self.timing,
            bytes: Some(2.0 * self.bytes as f64),
            flops: None,
            copy_gbps: self.gbps,
            rate: None,
        }
    }

    /// A memory-bound row moving `bytes` per call.
    pub fn memory(
        &self,
        kernel: &'static str,
        case: String,
        timing: Timing,
        bytes: f64,
    ) -> BenchRow {
        BenchRow {
            kernel,
            case,
            timing,
            bytes: Some(bytes),
            flops: None,
            copy_gbps: self.gbps,
            rate: None,
        }
    }
}

/// Measures the vec4 copy over a buffer well beyond any cache (256 MiB; 32 MiB with quick).
pub fn copy_baseline(ctx: &Context, quick: bool) -> Result<Baseline, Error> {
    let bytes: u64 = if quick { 32 << 20 } else { 256 << 20 };
    let src = ctx.scratch(bytes)?;
    let dst = ctx.scratch(bytes)?;
    let plan = crate::kernels::copy::plan(ctx, &src, &dst, bytes)?;
    // At least 4 calls a pass (one at 256 MiB by the byte rule): the pass's own start and end
    // would otherwise lower the denominator of every ratio by a few per cent.
    let timing = time_passes(ctx, WARMUP, SAMPLES, iterations(bytes).max(4), |pass| {
        plan.record(pass)
    })?;
    let gbps = 2.0 * bytes as f64 / timing.best().as_secs_f64() / 1e9;
    Ok(Baseline {
        gbps,
        timing,
        bytes,
    })
}

/// Calls per timed submit with `seqk bench --quick`: one, as a call on a software device
/// lasts long enough alone (its attention runs at 0.2-1 GFLOP/s); else `calls`.
pub fn quick_calls(quick: bool, calls: usize) -> usize {
    if quick {
        1
    } else {
        calls
    }
}

/// Calls per timed submit: enough to amortise launch costs on small inputs.
pub fn iterations(bytes: u64) -> usize {
    ((64u64 << 20) / bytes.max(1)).clamp(1, 64) as usize
}

/// The driver's name and version info; GL gives no name (its version is in `driver_info`),
/// so the parts that are there, or "-".
pub fn driver(i: &wgpu::AdapterInfo) -> String {
    let parts: Vec<&str> = [i.driver.trim(), i.driver_info.trim()]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" ")
    }
}

fn adapter_line(ctx: &Context) -> String {
    let i = ctx.adapter_info();
    format!("{} ({:?}, {})", i.name, i.backend, driver(i))
}

pub fn print_checks(ctx: &Context, checks: &[Check], json: bool) {
    if json {
        let rows: Vec<_> = checks
            .iter()
            .map(|c| {
                serde_json::json!({"kernel": c.kernel, "case": c.case.trim(), "error": finite(c.error),
                    "tolerance": c.tolerance, "passed": c.passed()})
            })
            .collect();
        println!(
            "{:#}",
            serde_json::json!({"adapter": adapter_line(ctx), "checks": rows})
        );
        return;
    }
    println!("seqk verify on {}", adapter_line(ctx));
    let w = width("case", checks.iter().map(|c| c.case.trim()));
    println!(
        "{:<10} {:<w$} {:>10} {:>9}  result",
        "kernel", "case", "error", "tolerance"
    );
    for c in checks {
        println!(
            "{:<10} {:<w$} {:>10.2e} {:>9.0e}  {}",
            c.kernel,
            c.case.trim(),
            c.error,
            c.tolerance,
            if c.passed() { "pass" } else { "FAIL" }
        );
    }
    let failed = checks.iter().filter(|c| !c.passed()).count();
    println!("{} checks, {} failed", checks.len(), failed);
}

/// Prints benchmark rows as each kernel family finishes. Table rows go to stdout at once, so
/// a failure or an interrupt later in the run keeps what was measured; JSON is one object at
/// the end, with an `"error"` member when a failure stopped the run early.
pub struct BenchPrinter {
    json: bool,
    header: bool,
    rows: Vec<serde_json::Value>,
    adapter: String,
    timestamps: bool,
}

/// The case column's width, enough for every case the bench has; a longer one would widen
/// its own family's rows only (the rows print as each family finishes).
const CASE_WIDTH: usize = 48;

impl BenchPrinter {
    pub fn new(ctx: &Context, json: bool) -> Self {
        Self {
            json,
            header: false,
            rows: Vec::new(),
            adapter: adapter_line(ctx),
            timestamps: ctx.has_timestamps(),
        }
    }

    /// Prints (table) or keeps (JSON) one family's rows.
    pub fn rows(&mut self, rows: &[BenchRow]) {
        if self.json {
            self.rows.extend(rows.iter().map(|r| {
                serde_json::json!({"kernel": r.kernel, "case": r.case.trim(),
                    "gpu_ms": r.timing.gpu.map(|d| d.as_secs_f64() * 1e3),
                    "wall_ms": r.timing.wall.as_secs_f64() * 1e3, "clock": r.timing.clock(),
                    "bytes": r.bytes, "flops": r.flops,
                    "gbps": r.gbps(), "copy_ratio": r.copy_ratio(), "tflops": r.tflops(),
                    "items": r.rate().map(|x| x.items),
                    "rate": r.per_second(), "rate_unit": r.rate().map(|x| format!("{}/s", x.unit)),
                    "us_per_item": r.per_second().map(|x| 1e6 / x),
                    "speedup_vs_cpu": r.rate().and_then(|x| x.speedup)})
            }));
            return;
        }
        let w = width("case", rows.iter().map(|r| r.case.trim())).max(CASE_WIDTH);
        if !self.header {
            self.header = true;
            println!("seqk bench on {}", self.adapter);
            if !self.timestamps {
                println!(
                    "(no TIMESTAMP_QUERY on this adapter: times are wall clock, submit to completion)"
                );
            }
            println!(
                "{:<10} {:<w$} {:>10} {:>5} {:>9} {:>8} {:>9}  rate",
                "kernel", "case", "time ms", "clock", "GB/s", "x copy", "TFLOP/s"
            );
        }
        let opt = |v: Option<f64>| v.map_or("-".to_string(), figure);
        for r in rows {
            let mut line = format!(
                "{:<10} {:<w$} {:>10} {:>5} {:>9} {:>8} {:>9}",
                r.kernel,
                r.case.trim(),
                figure(r.timing.best().as_secs_f64() * 1e3),
                r.timing.clock(),
                opt(r.gbps()),
                opt(r.copy_ratio()),
                opt(r.tflops())
            );
            if let (Some(rate), Some(per_s)) = (r.rate(), r.per_second()) {
                let one = rate.unit.strip_suffix('s').unwrap_or(rate.unit);
                line.push_str(&format!(
                    "  {per_s:.3e} {}/s, {} us/{one}",
                    rate.unit,
                    figure(1e6 / per_s)
                ));
                if let Some(x) = rate.speedup {
                    line.push_str(&format!(" ({x:.1}x cpu)"));
                }
            }
            println!("{line}");
        }
    }

    /// Ends the output: the JSON object (with the error, if the run stopped early).
    pub fn finish(self, error: Option<&str>) {
        if self.json {
            let mut out = serde_json::json!({"adapter": self.adapter, "results": self.rows});
            if let Some(e) = error {
                out["error"] = serde_json::json!(e);
            }
            println!("{out:#}");
        }
    }
}

/// Four significant digits, so that small figures (0.034 GB/s, 0.0007 TFLOP/s) do not print
/// as 0; an exponent outside 1e-3 ..= 1e6. At most 8 characters for figures >= 0 (the width
/// of the narrowest figure column).
fn figure(v: f64) -> String {
    let a = v.abs();
    if v == 0.0 || !v.is_finite() {
        format!("{v}")
    } else if !(1e-3..1e6).contains(&a) {
        format!("{v:.3e}")
    } else {
        let decimals = (3 - a.log10().floor() as i32).max(0) as usize;
        format!("{v:.decimals$}")
    }
}

/// The width of a text column: its widest entry or its header.
fn width<'a>(header: &str, entries: impl Iterator<Item = &'a str>) -> usize {
    entries
        .map(|e| e.chars().count())
        .fold(header.len(), usize::max)
}

fn finite(v: f64) -> serde_json::Value {
    if v.is_finite() {
        serde_json::json!(v)
    } else {
        serde_json::json!("inf")
    }
}

#[cfg(test)]
mod tests {
    use super::figure;

    #[test]
    fn figures_keep_four_significant_digits() {
        assert_eq!(figure(0.034), "0.03400");
        assert_eq!(figure(0.0012345), "0.001234");
        assert_eq!(figure(0.0007), "7.000e-4");
        assert_eq!(figure(19.3), "19.30");
        assert_eq!(figure(4066.2), "4066");
        assert_eq!(figure(12345.6), "12346");
        assert_eq!(figure(2.5e6), "2.500e6");
        assert_eq!(figure(0.0), "0");
        for v in [0.001, 0.0012345, 0.99999, 999999.0, 1e-9, 3e20] {
            assert!(figure(v).len() <= 8, "{v}: {}", figure(v));
        }
    }
}
