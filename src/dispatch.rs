//! Dispatch geometry and plans: folding large grids, splitting work that exceeds binding
//! limits, and `Plan`, a recorded sequence of dispatches that any kernel can be encoded as.

use std::ops::Range;
use std::sync::Arc;

use crate::context::Context;
use crate::error::{Error, Result};
use crate::shader::{Access, Declared, ShaderVariant};

/// One dispatch: a pipeline, its bind group and a folded grid. A clone repeats the dispatch.
#[derive(Clone)]
pub struct Step {
    /// The context whose device the pipeline and bind group belong to.
    ctx: Context,
    pipeline: Arc<wgpu::ComputePipeline>,
    bind_group: wgpu::BindGroup,
    grid: [u32; 3],
}

impl Step {
    /// A dispatch of `variant` over `workgroups` linear workgroups (folded into x, y, z) with
    /// `bindings` as (binding index, buffer range) pairs of group 0.
    pub fn new(
        ctx: &Context,
        variant: &ShaderVariant,
        bindings: &[(u32, wgpu::BufferBinding<'_>)],
        workgroups: u64,
    ) -> Result<Self> {
        // Every binding but the uniform parameters (Context::uniform or uniform_slots, without
        // STORAGE) is a storage buffer; a device made with fewer per stage (wgpu's default
        // limits allow 8) cannot build the pipeline.
        let limits = ctx.limits();
        let storage = bindings
            .iter()
            .filter(|(_, b)| b.buffer.usage().contains(wgpu::BufferUsages::STORAGE))
            .count() as u64;
        let max = limits.max_storage_buffers_per_shader_stage as u64;
        if storage > max {
            return Err(Error::LimitExceeded {
                what: format!("storage buffers of {} ({})", variant.family, variant.entry),
                limit: crate::error::STORAGE_BUFFERS_PER_STAGE,
                needed: storage,
                max,
            });
        }
        check_aliasing(variant, &ctx.declared(variant)?, bindings)?;
        let pipeline = ctx.pipeline(variant)?;
        let bind_group = ctx.bind_group(&pipeline, bindings).map_err(|e| match e {
            Error::Device(m) => Error::Device(format!(
                "{}/{}/{}: {m}",
                variant.family, variant.variant, variant.entry
            )),
            e => e,
        })?;
        let grid = fold(workgroups, limits.max_compute_workgroups_per_dimension)?;
        Ok(Self {
            ctx: ctx.clone(),
            pipeline,
            bind_group,
            grid,
        })
    }
}

/// A buffer the dispatch writes must not also be bound for reading: wgpu refuses the mix at
/// submit (or panics in the application's `finish`), so the call is refused here, naming both.
fn check_aliasing(
    variant: &ShaderVariant,
    declared: &[Declared],
    bindings: &[(u32, wgpu::BufferBinding<'_>)],
) -> Result<()> {
    let find = |i: u32| declared.iter().find(|d| d.index == i);
    for (k, (i, a)) in bindings.iter().enumerate() {
        for (j, b) in &bindings[k + 1..] {
            let (Some(da), Some(db)) = (find(*i), find(*j)) else {
                continue;
            };
            let written = (da.access == Access::ReadWrite) != (db.access == Access::ReadWrite);
            if written && a.buffer == b.buffer {
                let (w, r) = if da.access == Access::ReadWrite {
                    (da, db)
                } else {
                    (db, da)
                };
                return Err(Error::option(format!(
                    "{}/{}: `{}` is written but its buffer is also bound as `{}`, which the \
                     kernel reads; give `{}` a buffer of its own",
                    variant.family, variant.entry, w.name, r.name, w.name
                )));
            }
        }
    }
    Ok(())
}

/// One tensor of a call: the name its kernel binds it under, its context and its buffer.
#[derive(Clone, Copy)]
pub struct CallTensor<'a> {
    /// The binding's name, for errors.
    pub name: &'a str,
    /// The context the tensor belongs to.
    pub context: &'a Context,
    /// The tensor's buffer.
    pub buffer: &'a wgpu::Buffer,
}

/// The checks every kernel makes on the tensors of a call, before anything is built: each
/// belongs to `ctx` ([`Context::check_owned`]; first, as buffers of another device may share
/// ids with this one's), and a written one shares its buffer with no other. Aliasing is checked
/// here on the caller's tensors because a call whose f16 tensors are widened into f32 scratch
/// binds copies, which the check of each dispatch cannot see through; so both storages refuse
/// the same calls with the same words.
pub fn check_call_tensors(
    ctx: &Context,
    family: &str,
    written: &[CallTensor<'_>],
    read: &[CallTensor<'_>],
) -> Result<()> {
    let owners: Vec<&Context> = written.iter().chain(read).map(|t| t.context).collect();
    ctx.check_owned(&owners)?;
    for (i, w) in written.iter().enumerate() {
        if let Some(r) = read.iter().find(|r| r.buffer == w.buffer) {
            let (w, r) = (w.name, r.name);
            return Err(Error::option(format!(
                "{family}: `{w}` is written but its buffer is also bound as `{r}`, which the \
                 kernel reads; give `{w}` a buffer of its own"
            )));
        }
        if let Some(o) = written[i + 1..].iter().find(|o| o.buffer == w.buffer) {
            let (w, o) = (w.name, o.name);
            return Err(Error::option(format!(
                "{family}: `{w}` and `{o}` are both written and share a buffer; give each a \
                 buffer of its own"
            )));
        }
    }
    Ok(())
}

/// A kernel call ready to record: its dispatches in order, and the scratch buffers and
/// parameters they use (kept alive as long as the plan). Record it as often as you like.
#[derive(Default)]
pub struct Plan {
    steps: Vec<Step>,
    keep: Vec<wgpu::Buffer>,
}

impl Plan {
    /// Appends a dispatch.
    pub fn push(&mut self, step: Step) {
        self.steps.push(step);
    }
    /// Keeps a buffer (scratch, uniform parameters) alive as long as the plan.
    pub fn keep(&mut self, buffer: wgpu::Buffer) {
        self.keep.push(buffer);
    }
    /// Appends all of `other`.
    pub fn extend(&mut self, other: Plan) {
        self.steps.extend(other.steps);
        self.keep.extend(other.keep);
    }
    /// Number of dispatches.
    pub fn len(&self) -> usize {
        self.steps.len()
    }
    /// Whether the plan has no dispatches.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }
    /// Records the dispatches into an open compute pass (wgpu orders them).
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        for s in &self.steps {
            if s.grid[0] == 0 {
                continue;
            }
            pass.set_pipeline(&s.pipeline);
            pass.set_bind_group(0, &s.bind_group, &[]);
            pass.dispatch_workgroups(s.grid[0], s.grid[1], s.grid[2]);
        }
    }
    /// Records the dispatches into `encoder` in a compute pass of their own; no submit.
    pub fn encode(&self, encoder: &mut wgpu::CommandEncoder) {
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("seq-kernels"),
            timestamp_writes: None,
        });
        self.record(&mut pass);
    }
    /// Encodes, submits and waits on `ctx`, which must be the context the plan was made in.
    pub fn run(&self, ctx: &Context) -> Result<()> {
        let owners: Vec<&Context> = self.steps.iter().map(|s| &s.ctx).collect();
        ctx.check_owned(&owners)?;
        let mut encoder = ctx.encoder();
        self.encode(&mut encoder);
        ctx.submit_and_wait(encoder)
    }
}

/// Folds `workgroups` linear workgroups into an (x, y, z) grid with each dimension at most
/// `max_per_dim`. Shaders recover the linear index with `linear_workgroup` (shaders/grid.wgsl)
/// and return early when it is past the end (the grid may hold up to x-1 extra workgroups).
pub fn fold(workgroups: u64, max_per_dim: u32) -> Result<[u32; 3]> {
    let max = max_per_dim.max(1) as u64;
    if workgroups == 0 {
        return Ok([0, 1, 1]);
    }
    let x = workgroups.min(max);
    let y = workgroups.div_ceil(x).min(max);
    let z = workgroups.div_ceil(x * y);
    if z > max {
        return Err(Error::LimitExceeded {
            what: "workgroups of one dispatch".into(),
            limit: "max_compute_workgroups_per_dimension (cubed)",
            needed: workgroups,
            max: max * max * max,
        });
    }
    Ok([x as u32, y as u32, z as u32])
}

/// The most bytes a kernel binds at once and the name of the limit that sets it, for errors:
/// the device's `max_storage_buffer_binding_size`, or 2^31 bytes where the device allows more
/// (element indices inside a binding stay below 2^31), in whole words (byte masks and f16
/// ranges are bound rounded up to whole words, which then still fit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BindingCap {
    /// Bytes, a whole number of words.
    pub bytes: u64,
    /// The limit's name.
    pub limit: &'static str,
}

impl BindingCap {
    /// The cap of `ctx`'s device.
    pub fn of(ctx: &Context) -> Self {
        let max = ctx.limits().max_storage_buffer_binding_size;
        if max <= 1 << 31 {
            max.into()
        } else {
            Self {
                bytes: 1 << 31,
                limit: "2^31 bytes a binding (the kernels' u32 indices)",
            }
        }
    }
}

/// A device limit of that many bytes (rounded down to whole words).
impl From<u64> for BindingCap {
    fn from(bytes: u64) -> Self {
        Self {
            bytes: bytes / 4 * 4,
            limit: "max_storage_buffer_binding_size",
        }
    }
}

/// Splits `rows` rows of `row_elems` elements into consecutive row ranges such that every
/// tensor of those rows (elements of at most `max_elem_bytes` bytes) fits in one binding of
/// `max_binding` bytes and starts at a byte offset that is a multiple of `offset_align` (the
/// device's `min_storage_buffer_offset_alignment`) for any element size.
pub fn binding_chunks(
    rows: u64,
    row_elems: u64,
    max_elem_bytes: u64,
    max_binding: impl Into<BindingCap>,
    offset_align: u64,
) -> Result<Vec<Range<u64>>> {
    // Any element size: the widest sets the binding size, one-byte elements the alignment.
    row_chunks(
        rows,
        &[row_elems * max_elem_bytes, row_elems],
        max_binding,
        offset_align,
    )
}

/// Splits `rows` rows into consecutive row ranges bound one range at a time, where
/// `row_bytes` lists the bytes per row of each tensor so bound: every tensor's range fits in
/// one binding of `max_binding` bytes and starts at a byte offset that is a multiple of
/// `offset_align`. Rows per chunk are a multiple of the fewest rows that keep all of them
/// aligned (1 when every row size is a multiple of the alignment).
pub fn row_chunks(
    rows: u64,
    row_bytes: &[u64],
    max_binding: impl Into<BindingCap>,
    offset_align: u64,
) -> Result<Vec<Range<u64>>> {
    let cap = max_binding.into();
    let max_binding = cap.bytes;
    let widest = row_bytes.iter().copied().max().unwrap_or(0);
    if widest > max_binding {
        return Err(Error::LimitExceeded {
            what: "bytes of one row of a tensor".into(),
            limit: cap.limit,
            needed: widest,
            max: max_binding,
        });
    }
    // Rows whose bytes pass u64 would need more than 2^33 bindings: refused, not wrapped.
    let total = rows
        .checked_mul(widest)
        .ok_or_else(|| Error::LimitExceeded {
            what: "bytes of the rows of a tensor".into(),
            limit: cap.limit,
            needed: u64::MAX,
            max: max_binding,
        })?;
    if total <= max_binding {
        return Ok(std::iter::once(0..rows).collect());
    }
    // r rows of b bytes start aligned iff r is a multiple of align / gcd(b, align).
    let align = offset_align.max(1);
    let step = row_bytes.iter().fold(1, |step, &b| {
        let need = align / gcd(b, align);
        step / gcd(step, need) * need
    });
    let per_chunk = (max_binding / widest) / step * step;
    if per_chunk == 0 {
        return Err(Error::LimitExceeded {
            what: "bytes of the fewest rows that start aligned".into(),
            limit: cap.limit,
            needed: step * widest,
            max: max_binding,
        });
    }
    Ok((0..rows)
        .step_by(per_chunk as usize)
        .map(|r| r..(r + per_chunk).min(rows))
        .collect())
}

/// Splits `rows` rows into consecutive row ranges each bound with [`rows_binding`] (from the
/// aligned offset at or before its first row, the shader adding that row's element offset),
/// where `row_bytes` lists the bytes per row of each tensor so bound. Any row may start a
/// range, so a range takes as many rows as fit one binding less the alignment slack, not a
/// multiple of the rows that keep starts aligned (up to 256 rows of up to `max_binding`).
/// `max_binding` is a whole number of words, as bindings are rounded up to them.
pub fn based_row_chunks(
    rows: u64,
    row_bytes: &[u64],
    max_binding: impl Into<BindingCap>,
    offset_align: u64,
) -> Result<Vec<Range<u64>>> {
    let cap = max_binding.into();
    let max_binding = cap.bytes;
    let widest = row_bytes.iter().copied().max().unwrap_or(0).max(1);
    // A range of b-byte rows is bound from at most align - gcd(b, align) bytes before its
    // first row (none when rows are whole multiples of the alignment), and still fits.
    let align = offset_align.max(1);
    let per_chunk = row_bytes
        .iter()
        .map(|&b| max_binding.saturating_sub(align - gcd(b, align)) / b.max(1))
        .min()
        .unwrap_or(rows);
    if rows.checked_mul(widest).is_none_or(|t| t <= max_binding) || per_chunk == 0 {
        // One binding from offset 0, rows so wide that only aligned starts fit, or so many
        // that their bytes pass u64 (refused there).
        return row_chunks(rows, row_bytes, cap, offset_align);
    }
    Ok((0..rows)
        .step_by(per_chunk as usize)
        .map(|r| r..(r + per_chunk).min(rows))
        .collect())
}

/// The largest x in `lo..=hi` for which `fits` holds, given that it holds at `lo` and, once
/// it fails, fails for every larger x (sizes of runs of rows, chunks, heads).
pub fn largest_fitting(lo: usize, hi: usize, fits: impl Fn(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (lo, hi);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

/// Checks that `bytes` fit one storage binding of the device and that its elements of
/// `elem_bytes` bytes stay addressable by the shaders' u32 indices; `what` names the tensor.
pub fn check_binding(ctx: &Context, what: &str, bytes: u64, elem_bytes: u64) -> Result<()> {
    let max = ctx.limits().max_storage_buffer_binding_size;
    if bytes > max {
        return Err(Error::LimitExceeded {
            what: format!("bytes of {what}"),
            limit: "max_storage_buffer_binding_size",
            needed: bytes,
            max,
        });
    }
    if bytes / elem_bytes > u32::MAX as u64 {
        return Err(Error::LimitExceeded {
            what: format!("elements of {what}"),
            limit: "u32 indices",
            needed: bytes / elem_bytes,
            max: u32::MAX as u64,
        });
    }
    Ok(())
}

/// Rows `rows` of a buffer of `row_bytes`-byte rows as a binding that starts at the aligned
/// offset at or before the first row (`align`, the device's storage offset alignment), and the
/// element offset of that first row inside the binding (elements of `elem` bytes), for the
/// shader to add to its indices.
pub fn rows_binding(
    buffer: &wgpu::Buffer,
    row_bytes: u64,
    rows: Range<u64>,
    align: u64,
    elem: u64,
) -> (wgpu::BufferBinding<'_>, u32) {
    let start = rows.start * row_bytes;
    let offset = start / align * align;
    let base = ((start - offset) / elem) as u32;
    (
        sub_binding(buffer, offset, rows.end * row_bytes - offset),
        base,
    )
}

/// The byte range `offset .. offset + size` of a buffer as a binding (size rounded up to a
/// whole word: f16 and byte tensors may end mid-word).
pub fn sub_binding(buffer: &wgpu::Buffer, offset: u64, size: u64) -> wgpu::BufferBinding<'_> {
    wgpu::BufferBinding {
        buffer,
        offset,
        size: std::num::NonZeroU64::new(size.div_ceil(4) * 4),
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fold_covers_exactly_enough_workgroups() {
        for &(n, max) in &[
            (1u64, 65535u32),
            (65535, 65535),
            (65536, 65535),
            (70000, 65535),
            (10, 3),
            (27, 3),
            (7, 3),
            (65535 * 2 + 1, 65535),
        ] {
            let [x, y, z] = fold(n, max).unwrap();
            let cap = x as u64 * y as u64 * z as u64;
            assert!(x <= max && y <= max && z <= max, "{n} {max}: {x} {y} {z}");
            // Enough workgroups, and the last z layer is needed.
            assert!(
                cap >= n && cap - n < x as u64 * y as u64,
                "{n} {max}: {x} {y} {z}"
            );
            if z == 1 {
                assert!(cap - n < x as u64, "{n} {max}: {x} {y} {z}");
            }
            // z only once x and y are full: up to max^2 workgroups fit in x and y.
            if n <= max as u64 * max as u64 {
                assert_eq!(z, 1, "{n} {max}: {x} {y} {z}");
            }
        }
        assert!(matches!(fold(28, 3), Err(Error::LimitExceeded { .. })));
    }

    #[test]
    fn chunks_are_aligned_and_fit() {
        // Chunks must start at multiples of 256 rows (3 elements a row, 256-byte alignment).
        let chunks = binding_chunks(1000, 3, 4, 8192, 256).unwrap();
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks.first().unwrap().start, 0);
        assert_eq!(chunks.last().unwrap().end, 1000);
        for w in chunks.windows(2) {
            assert_eq!(w[0].end, w[1].start);
        }
        for c in &chunks {
            assert_eq!((c.start * 3) % 256, 0);
            assert!((c.end - c.start) * 12 <= 8192);
        }
        assert!(matches!(
            binding_chunks(1, 512, 4, 1024, 256),
            Err(Error::LimitExceeded { .. })
        ));
        assert_eq!(binding_chunks(3, 1, 4, 1024, 256).unwrap(), vec![0..3]);
    }

    /// A limit error names the limit that set the cap: the crate's own 2^31 bytes where a
    /// device allows more (it named the device's, and advised raising it).
    #[test]
    fn limit_errors_name_the_cap() {
        let own = BindingCap {
            bytes: 1 << 31,
            limit: "2^31 bytes a binding (the kernels' u32 indices)",
        };
        for cap in [own, BindingCap::from(1027)] {
            match row_chunks(1, &[1 << 32], cap, 256) {
                Err(Error::LimitExceeded { limit, max, .. }) => {
                    assert_eq!((limit, max), (cap.limit, cap.bytes))
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(BindingCap::from(1027).bytes, 1024);
        let e = row_chunks(1, &[1 << 32], own, 256).unwrap_err().to_string();
        assert!(
            e.ends_with("; split the input into smaller calls"),
            "no advice to raise a device limit that is not the cap: {e}"
        );
    }

    #[test]
    fn row_chunks_step_only_as_far_as_alignment_needs() {
        // Rows of 1024 and 16 bytes, 32-byte alignment: 2 rows keep both aligned, so a
        // 3-row binding takes 2 at a time (not 0, as rounding to 32 rows would).
        assert_eq!(
            row_chunks(5, &[1024, 16], 3 * 1024, 32).unwrap(),
            vec![0..2, 2..4, 4..5]
        );
        // Rows that are whole multiples of the alignment split one row at a time.
        assert_eq!(
            row_chunks(3, &[1024], 1024, 32).unwrap(),
            vec![0..1, 1..2, 2..3]
        );
        // A 4-byte row needs 8 rows per step; 2 rows of the widest fit: refused, naming the
        // 8 rows it would take.
        assert!(matches!(
            row_chunks(5, &[1024, 4], 2 * 1024, 32),
            Err(Error::LimitExceeded { needed: 8192, .. })
        ));
        // Every chunk start is aligned for every tensor.
        let chunks = row_chunks(300, &[96, 12, 3], 130 * 96, 64).unwrap();
        assert_eq!(chunks.len(), 3);
        for c in chunks {
            for b in [96, 12, 3] {
                assert_eq!((c.start * b) % 64, 0, "{c:?}");
            }
            assert!((c.end - c.start) * 96 <= 130 * 96);
        }
    }

    #[test]
    fn rows_whose_bytes_pass_u64_are_refused() {
        let rows = u64::MAX / 2;
        for split in [row_chunks, based_row_chunks] {
            match split(rows, &[8], BindingCap::from(1024), 4) {
                Err(Error::LimitExceeded { needed, .. }) => assert_eq!(needed, u64::MAX),
                other => panic!("{other:?}"),
            }
        }
        // Rows of a sane size still split.
        let ok = row_chunks(1 << 20, &[8], BindingCap::from(1 << 20), 4).unwrap();
        assert_eq!(ok.len(), 8);
    }

    #[test]
    fn based_row_chunks_start_anywhere_and_bind_within_the_limit() {
        // Rows of 4004 and 1001 bytes, 64 KiB bindings, 256-byte alignment: 16 rows a chunk
        // (the slack before an unaligned first row included), where aligned starts needed
        // 256 rows.
        let chunks = based_row_chunks(70, &[4004, 1001], 65536, 256).unwrap();
        assert_eq!(chunks.len(), 5);
        assert_eq!(chunks[0], 0..16);
        // Rows of whole multiples of the alignment start aligned: no slack, 2 rows of half a
        // binding each.
        assert_eq!(
            based_row_chunks(5, &[512], 1024, 256).unwrap(),
            vec![0..2, 2..4, 4..5]
        );
        for (rows, bytes, max, align) in [
            (70u64, vec![4004u64, 1001], 65536u64, 256u64),
            (1000, vec![36], 1024, 64),
            (9, vec![1000, 250], 1000 + 24, 32),
            (40, vec![4004, 1001, 96], 65536, 64),
            (3, vec![7], 1 << 20, 256),
        ] {
            let chunks = based_row_chunks(rows, &bytes, max, align).unwrap();
            assert_eq!(chunks.first().unwrap().start, 0);
            assert_eq!(chunks.last().unwrap().end, rows);
            for w in chunks.windows(2) {
                assert_eq!(w[0].end, w[1].start);
            }
            for c in &chunks {
                for &b in &bytes {
                    // As rows_binding binds them: from the aligned offset at or before the
                    // first row, in whole words.
                    let offset = c.start * b / align * align;
                    let size = (c.end * b - offset).div_ceil(4) * 4;
                    assert!(size <= max, "{c:?} of {b}-byte rows binds {size} > {max}");
                }
            }
        }
        // A row too wide for the slack but not for the binding: aligned starts, one row each.
        assert_eq!(
            based_row_chunks(3, &[1024], 1024, 32).unwrap(),
            vec![0..1, 1..2, 2..3]
        );
    }
}
