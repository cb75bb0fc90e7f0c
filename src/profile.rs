//! GPU timing with timestamp queries at compute-pass boundaries, wall clock alongside.

use std::time::{Duration, Instant};

use crate::context::Context;
use crate::error::{Error, Result};

/// One measurement: time per iteration on the GPU (when the adapter has timestamps) and by
/// the wall clock (submit to completion).
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// GPU time per iteration from timestamp queries, `None` without `TIMESTAMP_QUERY`.
    pub gpu: Option<Duration>,
    /// Wall-clock time per iteration.
    pub wall: Duration,
}

impl Timing {
    /// The best available figure: GPU time if measured, else wall time.
    pub fn best(&self) -> Duration {
        self.gpu.unwrap_or(self.wall)
    }
    /// `"gpu"` or `"wall"`: which clock [`Timing::best`] used.
    pub fn clock(&self) -> &'static str {
        if self.gpu.is_some() {
            "gpu"
        } else {
            "wall"
        }
    }
}

/// Times `record`, which records one iteration of work into a compute pass.
///
/// Each sample records `iterations` iterations into a single pass (one submit), so launch
/// overhead is amortised; `warmup` samples are discarded and the median of `samples` is
/// returned.
///
/// # Errors
///
/// - [`Error::InvalidOption`] if `iterations` passes `u32::MAX`.
/// - [`Error::Device`] if creating the timestamp queries, submitting, waiting or reading the
///   timestamps fails, or the device is lost.
pub fn time_passes(
    ctx: &Context,
    warmup: usize,
    samples: usize,
    iterations: usize,
    mut record: impl FnMut(&mut wgpu::ComputePass<'_>),
) -> Result<Timing> {
    let iterations = iterations.max(1);
    // Durations divide by a u32; checked before recording billions of iterations.
    let per_sample = u32::try_from(iterations).map_err(|_| {
        Error::option(format!(
            "time_passes records at most {} iterations per sample, got {iterations}",
            u32::MAX
        ))
    })?;
    let queries = if ctx.has_timestamps() {
        Some(Timestamps::new(ctx)?)
    } else {
        None
    };
    let mut gpu = Vec::new();
    let mut gpu_valid = true;
    let mut wall = Vec::new();
    for i in 0..warmup + samples.max(1) {
        let mut encoder = ctx.encoder();
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("timed"),
                timestamp_writes: queries.as_ref().map(|q| q.writes()),
            });
            for _ in 0..iterations {
                record(&mut pass);
            }
        }
        if let Some(q) = &queries {
            q.resolve(&mut encoder);
        }
        let start = Instant::now();
        ctx.submit_and_wait(encoder)?;
        let elapsed = start.elapsed();
        if i >= warmup {
            wall.push(elapsed / per_sample);
            if let Some(q) = &queries {
                match q.read(ctx)? {
                    Some(t) => gpu.push(t / per_sample),
                    None => gpu_valid = false,
                }
            }
        }
    }
    Ok(Timing {
        // One unusable pair (an end not after its start) and the GPU clock is not trusted:
        // the wall clock stands in, and the output says so.
        gpu: (gpu_valid && !gpu.is_empty()).then(|| median(&mut gpu)),
        wall: median(&mut wall),
    })
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// A pair of timestamp queries (pass begin, pass end) and the buffers to read them.
struct Timestamps {
    set: wgpu::QuerySet,
    resolved: wgpu::Buffer,
    readback: wgpu::Buffer,
    period_ns: f64,
}

impl Timestamps {
    fn new(ctx: &Context) -> Result<Self> {
        let device = ctx.device();
        ctx.checked("creating timestamp queries", || Self {
            set: device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            }),
            resolved: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("timestamps resolved"),
                size: 16,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            }),
            readback: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("timestamps readback"),
                size: 16,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
            period_ns: ctx.queue().get_timestamp_period() as f64,
        })
    }

    fn writes(&self) -> wgpu::ComputePassTimestampWrites<'_> {
        wgpu::ComputePassTimestampWrites {
            query_set: &self.set,
            beginning_of_pass_write_index: Some(0),
            end_of_pass_write_index: Some(1),
        }
    }

    fn resolve(&self, encoder: &mut wgpu::CommandEncoder) {
        encoder.resolve_query_set(&self.set, 0..2, &self.resolved, 0);
        encoder.copy_buffer_to_buffer(&self.resolved, 0, &self.readback, 0, 16);
    }

    /// The pass's GPU time, or `None` when the end stamp is not after the start (a wrapped or
    /// unwritten query), which would otherwise read as an infinitely fast pass.
    fn read(&self, ctx: &Context) -> Result<Option<Duration>> {
        ctx.map_read(&self.readback, "the timestamps")?;
        let ticks = {
            let view = self
                .readback
                .get_mapped_range(..)
                .map_err(|e| Error::Device(format!("reading timestamps failed: {e}")))?;
            let t: [u64; 2] = bytemuck::pod_read_unaligned(&view[..16]);
            t[1].checked_sub(t[0]).filter(|&d| d > 0)
        };
        self.readback.unmap();
        Ok(ticks.map(|d| Duration::from_nanos((d as f64 * self.period_ns) as u64)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Per-iteration times divide by the iteration count as a u32: a count past it is an
    /// error, before any work is recorded (it truncated to 0 and the division panicked).
    #[test]
    fn iterations_past_u32_are_an_error() {
        if crate::context::skip_example_without_adapter() {
            return;
        }
        let ctx = Context::new().unwrap();
        let too_many = u32::MAX as usize + 1;
        match time_passes(&ctx, 0, 1, too_many, |_| {}) {
            Err(Error::InvalidOption(m)) => assert!(m.contains("iterations"), "{m}"),
            other => panic!("{other:?}"),
        }
        // A count within range still times.
        time_passes(&ctx, 0, 1, 3, |_| {}).unwrap();
    }
}
