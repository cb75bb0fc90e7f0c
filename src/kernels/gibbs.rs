//! Gibbs family: chromatic (red-black) Gibbs sampling over a chain model, with clamped sites,
//! constant or geometrically annealed temperature (0 = iterated conditional modes) and
//! best-state tracking; sampling from given logits with temperature, top-k and top-p; a
//! batched Metropolis-Hastings accept step. Every draw comes from Philox-4x32-10 under the key
//! (seed low word, seed high word), so the CPU reference (`reference::gibbs`) follows the same
//! stream site by site. Counters: sweep s draws the noise of token v at site i of chain c from
//! counter (v / 4, i, c, `first_sweep` + s), output word v % 4; sampling from logits uses
//! (v / 4, 0, row, `step`); the MH step's uniform is word 0 of (0, 0xffffffff, chain, `step`).
//!
//! Chain model: `p(x) ∝ exp((sum_i u[i, x_i] + sum_{i>=1} W[x_{i-1}, x_i]) / T)`, u [L, V] or
//! [b, L, V], W dense [V, V] or factorised `W = A B^T` with A, B [V, r] (vocabularies of 32K+).
//! A sweep updates all even sites in parallel, then all odd sites. Up to V = 64 one invocation
//! updates one site; larger vocabularies take one workgroup per site with a workgroup argmax.
//!
//! ```
//! use seq_kernels::{ChainModel, Context, GibbsOptions, Pairwise};
//! # if seq_kernels::context::skip_example_without_adapter() { return Ok(()); }
//! let ctx = Context::new()?;
//! let (b, l, v) = (256, 8, 5);
//! let unary = ctx.upload(&vec![0.0f32; l * v], [l, v])?;
//! let w = ctx.upload(&vec![0.5f32; v * v], [v, v])?;
//! let init = ctx.upload(&vec![0u32; b * l], [b, l])?;
//! let model = ChainModel { unary: &unary, pairwise: Pairwise::Dense(&w) };
//! let opts = GibbsOptions { sweeps: 50, temperature: 2.0, anneal_to: Some(0.1),
//!                           track_best: true, ..Default::default() };
//! let out = ctx.gibbs(&model, &init, None, &opts)?;
//! let tokens: Vec<u32> = out.tokens.download()?;
//! let (best_tokens, best_scores) = out.best.unwrap();
//! assert!(tokens.iter().all(|&t| t < v as u32) && best_scores.download()?.len() == b);
//! # Ok::<(), seq_kernels::Error>(())
//! ```

use std::ops::Range;

use crate::context::Context;
use crate::convert;
use crate::dispatch::{
    self, check_call_tensors, rows_binding, sub_binding as sub, BindingCap, Plan, Step,
};
use crate::error::{Error, Result};
use crate::shader::{compose, reduce_wgsl, ShaderVariant, GRID_WGSL};
use crate::tensor::{require_float, shape_elements, DType, Element, GpuTensor};

const SOURCE: &str = include_str!("../../shaders/gibbs.wgsl");
/// The Philox-4x32-10 snippet (WGSL), shared by every kernel that draws random numbers.
pub const PHILOX_WGSL: &str = include_str!("../../shaders/philox.wgsl");

/// Largest vocabulary: token indices pass through f32 in the workgroup argmax.
pub const MAX_VOCAB: usize = 1 << 24;

/// Largest sampling and Gibbs temperature. The draws add T times a Gumbel variate (at most
/// about 17) to the logits in f32, which past about 2e37 overflows; at 1e30 the draw is
/// already uniform over any logits below about 1e28.
pub const MAX_TEMPERATURE: f32 = 1e30;

/// Most dispatches with parameters of their own that one Gibbs plan records (two a sweep, per
/// chunk of chains): each holds a bind group, 1-2 KB of host and driver memory, so longer
/// runs go as several plans of [`GibbsOptions::part`]s.
pub const MAX_PLAN_DISPATCHES: usize = 1 << 20;

/// Whether `t` is a usable temperature: 0, or normal and at most [`MAX_TEMPERATURE`]. A
/// subnormal T (below 1.2e-38) would run as 0 on GPUs that flush subnormals, but not on the CPU.
pub fn temperature_ok(t: f32) -> bool {
    t == 0.0 || (t.is_normal() && t > 0.0 && t <= MAX_TEMPERATURE)
}
/// Vocabularies up to this size take one invocation per site.
const THREAD_MAX_VOCAB: usize = 64;
const THREAD_WG: u32 = 64;
const GROUP_WGS: [u32; 3] = [64, 128, 256];

const FLAG_UNARY_PER_CHAIN: u32 = 1;
const FLAG_CLAMP: u32 = 2;
const FLAG_CLAMP_PER_CHAIN: u32 = 4;
const FLAG_BEST_INIT: u32 = 8;

/// Options of a Gibbs run.
#[derive(Clone, Debug, PartialEq)]
pub struct GibbsOptions {
    /// Number of sweeps (each: even sites, then odd sites). Default 100.
    pub sweeps: u32,
    /// Temperature of the first sweep; 0 means argmax (iterated conditional modes), at most
    /// [`MAX_TEMPERATURE`]. Default 1.
    pub temperature: f32,
    /// Anneal geometrically from `temperature` to this over the sweeps (both must be > 0).
    pub anneal_to: Option<f32>,
    /// Philox key (low and high words).
    pub seed: u64,
    /// Philox sweep index of the first sweep, to continue a run without reusing draws
    /// ([`GibbsOptions::part`] sets it).
    pub first_sweep: u32,
    /// Keep each chain's best-scoring state (initial state included) and its score
    /// (used by [`Context::gibbs`] and the reference; [`Gibbs::plan`] takes the buffers).
    pub track_best: bool,
    /// With `anneal_to`: where this run lies in a longer annealing schedule, as (the index of
    /// its first sweep in the schedule, the schedule's length in sweeps); `None`: the schedule
    /// is this run's own sweeps. Without `anneal_to` the temperature is constant and this
    /// changes nothing. [`GibbsOptions::part`] sets it (and keeps `temperature` and
    /// `anneal_to`, the ends of the whole schedule).
    pub schedule: Option<(u32, u32)>,
}

impl Default for GibbsOptions {
    fn default() -> Self {
        Self {
            sweeps: 100,
            temperature: 1.0,
            anneal_to: None,
            seed: 0,
            first_sweep: 0,
            track_best: false,
            schedule: None,
        }
    }
}

impl GibbsOptions {
    /// Checks the options' values.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidOption`] if `temperature` is neither 0 nor in
    /// `[f32::MIN_POSITIVE, MAX_TEMPERATURE]`; if `anneal_to` is given and it or `temperature`
    /// is not in that range; if `first_sweep + sweeps` passes `u32::MAX`; or if `schedule`
    /// does not hold the run's sweeps.
    pub fn validate(&self) -> Result<()> {
        let t = self.temperature;
        if !temperature_ok(t) {
            return Err(Error::option(format!(
                "gibbs temperature must be 0 (argmax) or in [{:e}, {MAX_TEMPERATURE:e}], got {t}",
                f32::MIN_POSITIVE
            )));
        }
        if let Some(t1) = self.anneal_to {
            if !(t > 0.0 && t1 > 0.0 && temperature_ok(t1)) {
                return Err(Error::option(format!(
                    "gibbs annealing goes geometrically from temperature to anneal_to, both must \
                     be in [{:e}, {MAX_TEMPERATURE:e}], got {t} -> {t1}; for a final argmax run \
                     a T = 0 pass after",
                    f32::MIN_POSITIVE
                )));
            }
        }
        if self.first_sweep.checked_add(self.sweeps).is_none() {
            return Err(Error::option("gibbs first_sweep + sweeps must fit in u32"));
        }
        if let Some((at, len)) = self.schedule {
            if at.checked_add(self.sweeps).is_none_or(|end| end > len) {
                return Err(Error::option(format!(
                    "gibbs schedule ({at}, {len}): the run's {} sweeps from sweep {at} must lie \
                     within the schedule's {len}",
                    self.sweeps
                )));
            }
        }
        Ok(())
    }

    /// The temperature of sweep `s` (0-based within this run): constant, or
    /// `T0 (T1 / T0)^(i / (len - 1))` for sweep i of a schedule of len sweeps (this run's own
    /// unless `schedule` says otherwise). GPU and reference use this same f32 value.
    pub fn temperature_at(&self, s: u32) -> f32 {
        let (at, len) = self.schedule.unwrap_or((0, self.sweeps));
        match self.anneal_to {
            Some(t1) if len > 1 => {
                let t0 = self.temperature as f64;
                let f = (at as f64 + s as f64) / (len - 1) as f64;
                (t0 * (t1 as f64 / t0).powf(f)) as f32
            }
            _ => self.temperature,
        }
    }

    /// The options of sweeps `start..start + n` of this run, as a run of its own, to run a
    /// long chain as several plans: the Philox sweep index goes on from `first_sweep + start`
    /// and the part's place in the annealing schedule from `start`, so the parts run one after
    /// another on the same tokens make exactly this run's chains. Each part's best state starts
    /// from the part's initial state: keep the better of the parts' best states by their
    /// scores.
    ///
    /// ```
    /// # use seq_kernels::GibbsOptions;
    /// let run = GibbsOptions {
    ///     sweeps: 1000,
    ///     temperature: 2.0,
    ///     anneal_to: Some(0.05),
    ///     ..Default::default()
    /// };
    /// let second = run.part(250, 250)?;
    /// assert_eq!((second.first_sweep, second.sweeps), (250, 250));
    /// assert_eq!(second.temperature_at(10), run.temperature_at(260));
    /// # Ok::<(), seq_kernels::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidOption`] as [`GibbsOptions::validate`], or if `n` is 0 or
    /// `start..start + n` is not within `0..sweeps`.
    pub fn part(&self, start: u32, n: u32) -> Result<Self> {
        self.validate()?;
        if n == 0 || start.checked_add(n).is_none_or(|end| end > self.sweeps) {
            return Err(Error::option(format!(
                "gibbs part: sweeps {start}..{start}+{n} must be a non-empty range within 0..{}",
                self.sweeps
            )));
        }
        let (at, len) = self.schedule.unwrap_or((0, self.sweeps));
        Ok(Self {
            sweeps: n,
            first_sweep: self.first_sweep + start,
            // Within the schedule: validate holds at + sweeps <= len.
            schedule: Some((at + start, len)),
            ..self.clone()
        })
    }
}

/// Sizes of a chain-model call, checked once for the GPU and the CPU reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainShape {
    /// Number of chains b.
    pub chains: usize,
    /// Sequence length L.
    pub len: usize,
    /// Vocabulary V.
    pub vocab: usize,
    /// 0 for dense W, else the rank r of W = A B^T.
    pub rank: usize,
    /// Unary is [b, L, V] rather than [L, V].
    pub unary_per_chain: bool,
    /// `Some(per_chain)` when a clamp mask is given (`[b, L]` when per_chain, else `[L]`).
    pub clamp: Option<bool>,
}

/// Checks the shapes of unary, pairwise (one [V, V] or two [V, r]), tokens [b, L] and the
/// optional clamp mask against each other.
pub fn chain_shape(
    unary: &[usize],
    pairwise: &[&[usize]],
    tokens: &[usize],
    clamp: Option<&[usize]>,
) -> Result<ChainShape> {
    let &[b, l] = tokens else {
        return Err(Error::shape(format!(
            "gibbs tokens must be [chains, L], got {tokens:?}"
        )));
    };
    if b == 0 || l == 0 {
        return Err(Error::shape(format!(
            "gibbs tokens {tokens:?} need at least one chain and one site"
        )));
    }
    shape_elements("gibbs tokens", tokens)?;
    shape_elements("gibbs unary", unary)?;
    let (per_chain, ul, v) = match *unary {
        [ul, v] => (false, ul, v),
        [ub, ul, v] if ub == b => (true, ul, v),
        _ => {
            return Err(Error::shape(format!(
                "gibbs unary must be [L, V] or [chains, L, V] = [{b}, {l}, V], got {unary:?}"
            )))
        }
    };
    if ul != l {
        return Err(Error::shape(format!(
            "gibbs unary {unary:?} has L = {ul} but tokens {tokens:?} have L = {l}"
        )));
    }
    if v == 0 {
        return Err(Error::shape(format!(
            "gibbs vocabulary size V must be >= 1, unary is {unary:?}"
        )));
    }
    if v > MAX_VOCAB {
        return Err(Error::shape(format!(
            "gibbs vocabulary size V = {v} exceeds the supported {MAX_VOCAB}"
        )));
    }
    let rank = match pairwise {
        [w] if *w == [v, v] => 0,
        [a, bb] if a.len() == 2 && a == bb && a[0] == v && a[1] >= 1 => a[1],
        _ => {
            return Err(Error::shape(format!(
                "gibbs pairwise must be W [{v}, {v}] or A, B [{v}, r] (r >= 1), got {pairwise:?}"
            )))
        }
    };
    let clamp = match clamp {
        None => None,
        Some(c) if c == [l] => Some(false),
        Some(c) if c == [b, l] => Some(true),
        Some(c) => {
            return Err(Error::shape(format!(
                "gibbs clamp mask must be [{l}] or [{b}, {l}], got {c:?}"
            )))
        }
    };
    Ok(ChainShape {
        chains: b,
        len: l,
        vocab: v,
        rank,
        unary_per_chain: per_chain,
        clamp,
    })
}

/// Checks that every token is below `vocab` (i32 tokens are passed as their bits, so a
/// negative token is caught too).
pub fn check_tokens(tokens: &[u32], vocab: usize, what: &str) -> Result<()> {
    if let Some((i, &t)) = tokens
        .iter()
        .enumerate()
        .find(|(_, &t)| t as usize >= vocab)
    {
        return Err(Error::option(format!(
            "{what}: token {} at flat index {i} is outside the vocabulary 0..{vocab}",
            t as i32
        )));
    }
    Ok(())
}

fn token_dtype<T: Element>(what: &str) -> Result<()> {
    match T::DTYPE {
        DType::U32 | DType::I32 => Ok(()),
        d => Err(Error::Dtype(format!(
            "{what} tokens must be u32 or i32, got {}",
            d.name()
        ))),
    }
}

/// Pairwise potentials on the GPU.
#[derive(Clone, Copy, Debug)]
pub enum Pairwise<'a> {
    /// Dense W [V, V] (row = previous token, column = next token).
    Dense(&'a GpuTensor<f32>),
    /// W = A B^T with A, B [V, r].
    Factored {
        /// A [V, r]: the previous token's factor.
        a: &'a GpuTensor<f32>,
        /// B [V, r]: the next token's factor.
        b: &'a GpuTensor<f32>,
    },
}

/// A chain model on the GPU: unary [L, V] or [b, L, V] and pairwise potentials.
#[derive(Clone, Copy, Debug)]
pub struct ChainModel<'a> {
    /// u [L, V] (shared by all chains) or [b, L, V].
    pub unary: &'a GpuTensor<f32>,
    /// W.
    pub pairwise: Pairwise<'a>,
}

impl ChainModel<'_> {
    fn pair_shapes(&self) -> Vec<&[usize]> {
        match self.pairwise {
            Pairwise::Dense(w) => vec![w.shape()],
            Pairwise::Factored { a, b } => vec![a.shape(), b.shape()],
        }
    }
}

/// A best state on the GPU: tokens `[b, L]` and scores `[b]`.
pub type BestState<'a, T> = (&'a GpuTensor<T>, &'a GpuTensor<f32>);

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    chains: u32,
    len: u32,
    vocab: u32,
    rank: u32,
    parity: u32,
    sites: u32,
    sweep: u32,
    chain_offset: u32,
    seed_lo: u32,
    seed_hi: u32,
    temperature: f32,
    flags: u32,
    top_k: u32,
    top_p: f32,
    logits_base: u32,
    _pad1: u32,
}

fn variant(subgroups: bool, entry: &'static str, wg: u32) -> ShaderVariant {
    ShaderVariant {
        family: "gibbs",
        variant: if subgroups { "subgroup" } else { "shared" }.into(),
        source: compose(&[GRID_WGSL, PHILOX_WGSL, reduce_wgsl(subgroups), SOURCE]),
        entry,
        constants: vec![("WG".into(), wg as f64)],
    }
}

/// Every shader variant of the family (for the naga translation test).
pub fn shader_variants() -> Vec<ShaderVariant> {
    let mut out = Vec::new();
    for subgroups in [false, true] {
        for entry in ["sweep_thread", "chain_score", "mh_accept", "philox_test"] {
            out.push(variant(subgroups, entry, THREAD_WG));
        }
        for wg in GROUP_WGS {
            out.push(variant(subgroups, "sweep_group", wg));
            out.push(variant(subgroups, "sample_logits", wg));
        }
    }
    out
}

fn group_wg(ctx: &Context, work: usize) -> u32 {
    let l = ctx.limits();
    let max = l
        .max_compute_invocations_per_workgroup
        .min(l.max_compute_workgroup_size_x);
    let want = (work.next_power_of_two() as u32).clamp(64, 256);
    GROUP_WGS
        .into_iter()
        .filter(|&w| w <= want && w <= max)
        .max()
        .unwrap_or(64)
}

/// Splits `rows` rows into chunks whose per-row tensors (`row_bytes`: bytes per row of each)
/// fit one binding and start at the device's offset alignment.
fn row_chunks(ctx: &Context, rows: u64, row_bytes: &[u64]) -> Result<Vec<Range<u64>>> {
    let align = ctx.limits().min_storage_buffer_offset_alignment as u64;
    dispatch::row_chunks(rows, row_bytes, BindingCap::of(ctx), align)
}

/// Checks that `what`, bound whole, fits one storage binding.
fn check_fits(ctx: &Context, what: &str, bytes: u64) -> Result<()> {
    let cap = BindingCap::of(ctx);
    let max = cap.bytes;
    if bytes > max {
        return Err(Error::LimitExceeded {
            what: format!("bytes of {what}"),
            limit: cap.limit,
            needed: bytes,
            max,
        });
    }
    Ok(())
}

fn seed_words(seed: u64) -> (u32, u32) {
    (seed as u32, (seed >> 32) as u32)
}

/// A Gibbs sampler with fixed options; pipelines are compiled on first use and cached in the
/// context. Tokens are updated in place.
///
/// ```
/// # use seq_kernels::{ChainModel, Context, Gibbs, GibbsOptions, Pairwise};
/// # if seq_kernels::context::skip_example_without_adapter() { return Ok(()); }
/// # let ctx = Context::new()?;
/// # let unary = ctx.upload(&vec![0.0f32; 8 * 5], [8, 5])?;
/// # let w = ctx.upload(&vec![0.5f32; 25], [5, 5])?;
/// let tokens = ctx.zeros::<u32>([64, 8])?;
/// let model = ChainModel { unary: &unary, pairwise: Pairwise::Dense(&w) };
/// let k = Gibbs::new(&ctx, &GibbsOptions { sweeps: 10, ..Default::default() })?;
/// let mut encoder = ctx.device().create_command_encoder(&Default::default());
/// k.encode(&mut encoder, &model, &tokens, None, None)?;
/// ctx.queue().submit([encoder.finish()]);
/// assert!(tokens.download()?.iter().all(|&t| t < 5));
/// # Ok::<(), seq_kernels::Error>(())
/// ```
pub struct Gibbs {
    ctx: Context,
    opts: GibbsOptions,
}

impl Gibbs {
    /// Validates the options.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidOption`] as [`GibbsOptions::validate`].
    pub fn new(ctx: &Context, opts: &GibbsOptions) -> Result<Self> {
        opts.validate()?;
        Ok(Self {
            ctx: ctx.clone(),
            opts: opts.clone(),
        })
    }

    /// Records the sweeps into `encoder` (no submit). Tokens must be below V (checked by
    /// [`Context::gibbs`]; here an out-of-range neighbour is read as V - 1, never out of
    /// bounds).
    ///
    /// # Errors
    ///
    /// As [`Gibbs::plan`].
    pub fn encode<T: Element>(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        model: &ChainModel<'_>,
        tokens: &GpuTensor<T>,
        clamp: Option<&GpuTensor<u8>>,
        best: Option<BestState<'_, T>>,
    ) -> Result<()> {
        self.plan(model, tokens, clamp, best)?.encode(encoder);
        Ok(())
    }

    /// The dispatches of one run (sweeps x 2 colours, plus scoring when `best` is given).
    /// `best` receives each chain's best state and score, the initial state included.
    /// The parameters of all dispatches share one buffer, but each dispatch has its own bind
    /// group, so memory still grows with `sweeps`: on lavapipe about 2.6 KB a sweep for the
    /// plan and 4 KB once it has run (20,000 sweeps: 52 and 80 MB). Run very long chains as
    /// several plans of [`GibbsOptions::part`]s, as `seqk generate --batch` does; one plan
    /// records at most [`MAX_PLAN_DISPATCHES`] parameterised dispatches (about 500,000 sweeps
    /// of one chunk of chains), and more is an `InvalidOption` error.
    ///
    /// # Errors
    ///
    /// Besides the [errors common to every
    /// kernel](crate::kernels#errors-common-to-every-kernel):
    /// - [`Error::Dtype`] unless `T` is u32 or i32.
    /// - [`Error::Shape`] if `tokens` is not `[b, L]` with b, L >= 1; if the unary is not
    ///   `[L, V]` or `[b, L, V]` for that L, or V passes [`MAX_VOCAB`]; if the pairwise
    ///   potentials are not W `[V, V]` or A, B `[V, r]`; if `clamp` is not `[L]` or `[b, L]`;
    ///   or if `best` is not `tokens`' shape and `[b]`.
    /// - [`Error::InvalidOption`] if the run would record more than [`MAX_PLAN_DISPATCHES`]
    ///   dispatches.
    /// - [`Error::LimitExceeded`] if a tensor shared by all chains (the unary `[L, V]`, W, A,
    ///   B, the best scores) does not fit one storage binding, or one chain's rows (tokens,
    ///   a per-chain unary or clamp, best tokens) are too long to bind; bindings are
    ///   `max_storage_buffer_binding_size`, of which at most 2^31 bytes are used.
    pub fn plan<T: Element>(
        &self,
        model: &ChainModel<'_>,
        tokens: &GpuTensor<T>,
        clamp: Option<&GpuTensor<u8>>,
        best: Option<BestState<'_, T>>,
    ) -> Result<Plan> {
        let ctx = &self.ctx;
        let mut written = vec![tokens.named("tokens")];
        if let Some((bt, bs)) = best {
            written.extend([bt.named("best_tokens"), bs.named("best_score")]);
        }
        let mut read = vec![model.unary.named("unary")];
        match model.pairwise {
            Pairwise::Dense(w) => read.push(w.named("pairwise")),
            Pairwise::Factored { a, b } => read.extend([a.named("pair_a"), b.named("pair_b")]),
        }
        read.extend(clamp.map(|c| c.named("clamp")));
        check_call_tensors(ctx, "gibbs", &written, &read)?;
        token_dtype::<T>("gibbs")?;
        let s = chain_shape(
            model.unary.shape(),
            &model.pair_shapes(),
            tokens.shape(),
            clamp.map(|c| c.shape()),
        )?;
        if let Some((bt, bs)) = best {
            if bt.shape() != tokens.shape() || bs.shape() != [s.chains] {
                return Err(Error::shape(format!(
                    "gibbs best state must be tokens {:?} and scores [{}], got {:?} and {:?}",
                    tokens.shape(),
                    s.chains,
                    bt.shape(),
                    bs.shape()
                )));
            }
        }
        let (b, l, v, r) = (s.chains as u64, s.len as u64, s.vocab as u64, s.rank as u64);
        // Tensors shared by all chains must fit one binding.
        if !s.unary_per_chain {
            check_fits(ctx, "the unary potentials [L, V]", l * v * 4)?;
        }
        if r == 0 {
            check_fits(ctx, "the pairwise W [V, V]", v * v * 4)?;
        } else {
            check_fits(ctx, "pair_a or pair_b [V, r]", v * r * 4)?;
        }
        // Per-chain tensors bound chunk by chunk: tokens, and where given per-chain unary,
        // per-chain clamp bytes and best tokens. Best scores are bound whole.
        let mut row_bytes = vec![l * 4];
        if s.unary_per_chain {
            row_bytes.push(l * v * 4);
        }
        if s.clamp == Some(true) {
            row_bytes.push(l);
        }
        if best.is_some() {
            row_bytes.push(l * 4);
            check_fits(ctx, "the best scores [b]", b * 4)?;
        }
        let chunks = row_chunks(ctx, b, &row_bytes)?;

        let mut plan = Plan::default();
        let dummy = ctx.scratch(16)?;
        let subgroups = ctx.has_subgroups();
        let (pa, pb) = match model.pairwise {
            Pairwise::Dense(w) => (w.binding(), dummy.as_entire_buffer_binding()),
            Pairwise::Factored { a, b } => (a.binding(), b.binding()),
        };
        let (seed_lo, seed_hi) = seed_words(self.opts.seed);
        let mut flags = 0;
        if s.unary_per_chain {
            flags |= FLAG_UNARY_PER_CHAIN;
        }
        match s.clamp {
            Some(true) => flags |= FLAG_CLAMP | FLAG_CLAMP_PER_CHAIN,
            Some(false) => flags |= FLAG_CLAMP,
            None => {}
        }
        let base = Params {
            len: l as u32,
            vocab: v as u32,
            rank: r as u32,
            seed_lo,
            seed_hi,
            flags,
            top_p: 1.0,
            ..Default::default()
        };
        let group = s.vocab > THREAD_MAX_VOCAB;
        let wg = group_wg(ctx, s.vocab.div_ceil(16));
        let sweep_v = if group {
            variant(subgroups, "sweep_group", wg)
        } else {
            variant(subgroups, "sweep_thread", THREAD_WG)
        };
        let score_v = variant(subgroups, "chain_score", THREAD_WG);

        // Every dispatch's parameters, chunk by chunk, in one uniform buffer: with `best`,
        // the initial scoring and the scoring after each sweep (the same every sweep), then
        // each sweep's colours. A colour without sites (L = 1) is left out.
        let per_chunk = |p: Params| {
            chunks.iter().map(move |rows| Params {
                chains: (rows.end - rows.start) as u32,
                chain_offset: rows.start as u32,
                ..p
            })
        };
        let colours: usize = if l >= 2 { 2 } else { 1 };
        let count = chunks
            .len()
            .saturating_mul(2 * best.is_some() as usize + self.opts.sweeps as usize * colours);
        // Refused before the values are made: too many for one plan, or for one buffer.
        if count > MAX_PLAN_DISPATCHES {
            return Err(Error::option(format!(
                "gibbs: {} sweeps make {count} dispatches, more than one plan records \
                 ({MAX_PLAN_DISPATCHES}); run them as several plans of GibbsOptions::part",
                self.opts.sweeps
            )));
        }
        ctx.slot_layout::<Params>(count)?;
        let mut values = Vec::with_capacity(count);
        if best.is_some() {
            values.extend(per_chunk(Params {
                flags: flags | FLAG_BEST_INIT,
                ..base
            }));
            values.extend(per_chunk(base));
        }
        for sweep in 0..self.opts.sweeps {
            let temperature = self.opts.temperature_at(sweep);
            for parity in 0..colours as u32 {
                values.extend(per_chunk(Params {
                    parity,
                    sites: (l as u32 + 1 - parity) / 2,
                    sweep: self.opts.first_sweep + sweep,
                    temperature,
                    ..base
                }));
            }
        }
        let slots = ctx.uniform_slots(&values)?;

        // The dispatch of slot `slot`, for the chains `rows`.
        let step = |slot: usize, rows: &Range<u64>, score: bool| -> Result<Step> {
            let n = rows.end - rows.start;
            let u_b = if s.unary_per_chain {
                sub(model.unary.buffer(), rows.start * l * v * 4, n * l * v * 4)
            } else {
                model.unary.binding()
            };
            let t_b = sub(tokens.buffer(), rows.start * l * 4, n * l * 4);
            let p_b = slots.binding(slot);
            if let (true, Some((bt, bs))) = (score, best) {
                let bindings = [
                    (0, u_b),
                    (1, pa.clone()),
                    (2, pb.clone()),
                    (3, t_b),
                    (5, p_b),
                    (6, sub(bt.buffer(), rows.start * l * 4, n * l * 4)),
                    (7, sub(bs.buffer(), 0, b * 4)),
                ];
                return Step::new(ctx, &score_v, &bindings, n.div_ceil(THREAD_WG as u64));
            }
            let c_b = match (clamp, s.clamp) {
                (Some(c), Some(true)) => sub(c.buffer(), rows.start * l, n * l),
                (Some(c), _) => c.binding(),
                _ => dummy.as_entire_buffer_binding(),
            };
            let bindings = [
                (0, u_b),
                (1, pa.clone()),
                (2, pb.clone()),
                (3, t_b),
                (4, c_b),
                (5, p_b),
            ];
            let units = n * values[slot].sites as u64;
            let groups = if group {
                units
            } else {
                units.div_ceil(THREAD_WG as u64)
            };
            Step::new(ctx, &sweep_v, &bindings, groups)
        };

        let c = chunks.len();
        let mut next = 0;
        let mut score_steps = Vec::new();
        if best.is_some() {
            for (i, rows) in chunks.iter().enumerate() {
                plan.push(step(i, rows, true)?);
                score_steps.push(step(c + i, rows, true)?);
            }
            next = 2 * c;
        }
        for _ in 0..self.opts.sweeps {
            for _ in 0..colours {
                for (i, rows) in chunks.iter().enumerate() {
                    plan.push(step(next + i, rows, false)?);
                }
                next += c;
            }
            for st in &score_steps {
                plan.push(st.clone());
            }
        }
        plan.keep(slots.into_buffer());
        plan.keep(dummy);
        Ok(plan)
    }
}

/// Result of [`Context::gibbs`].
pub struct GibbsOutput<T: Element> {
    /// Final states [b, L].
    pub tokens: GpuTensor<T>,
    /// With `track_best`: each chain's best state `[b, L]` and its score `[b]`.
    pub best: Option<(GpuTensor<T>, GpuTensor<f32>)>,
}

/// Options of sampling from logits: temperature, then top-k, then top-p.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleOptions {
    /// Temperature; 0 = greedy argmax (top-k / top-p then change nothing), at most
    /// [`MAX_TEMPERATURE`]. Default 1.
    pub temperature: f32,
    /// Keep the k largest logits (all ties of the k-th kept); 0 = off.
    pub top_k: usize,
    /// Keep the smallest set of largest logits whose probability reaches p (after top-k;
    /// of equal logits at the threshold, the lowest indices first); 1 = off. "Reaches" is
    /// within 2^-14 of probability ([`SampleOptions::top_p_goal`]): equal logits make sums
    /// that land exactly on p common (10 ties and p = 0.1), and f32 and f64 sums must decide
    /// them alike.
    pub top_p: f32,
    /// Philox key.
    pub seed: u64,
    /// Philox counter word 3, to draw afresh at every generation step. Row r's token v uses
    /// counter (v / 4, 0, r, step): the counter [`Context::gibbs`] gives site 0 of chain r at
    /// sweep `step`. Sampling and Gibbs sweeps under one seed therefore share uniforms
    /// there (the same logits give the same token); give them different seeds when their
    /// draws must be independent.
    pub step: u32,
}

impl Default for SampleOptions {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            step: 0,
        }
    }
}

impl SampleOptions {
    /// The share of the (top-k kept) probability top-p's kept set must reach, as the f32 the
    /// shader gets (the reference uses the same value): `top_p - min(2^-14, top_p / 2)`, or 1
    /// when top-p is off. The slack, 6.1e-5 of probability, is above the f32 rounding of the
    /// GPU's sums and moves the threshold off the round fractions that tied logits give (10
    /// equal logits and p = 0.1), so the GPU and the reference keep the same set; only a p
    /// chosen within f32 rounding of such a fraction plus the slack can still split them.
    pub fn top_p_goal(&self) -> f32 {
        if self.top_p < 1.0 {
            self.top_p - (1.0f32 / 16384.0).min(self.top_p / 2.0)
        } else {
            1.0
        }
    }

    /// Checks the options' values.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidOption`] if `temperature` is neither 0 nor in
    /// `[f32::MIN_POSITIVE, MAX_TEMPERATURE]`, `top_p` is not in (0, 1], or `top_k` passes
    /// `u32::MAX`.
    pub fn validate(&self) -> Result<()> {
        let t = self.temperature;
        if !temperature_ok(t) {
            return Err(Error::option(format!(
                "sampling temperature must be 0 (greedy) or in [{:e}, {MAX_TEMPERATURE:e}], \
                 got {t}",
                f32::MIN_POSITIVE
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::option(format!(
                "top_p must be in (0, 1] (1 = off), got {}",
                self.top_p
            )));
        }
        if self.top_k > u32::MAX as usize {
            return Err(Error::option("top_k must fit in u32"));
        }
        Ok(())
    }
}

/// Checks logits [b, V] and returns (b, V).
pub fn logits_shape(shape: &[usize]) -> Result<(usize, usize)> {
    match *shape {
        [b, v] if b > 0 && v > 0 && v <= MAX_VOCAB => {
            shape_elements("logits", shape)?;
            Ok((b, v))
        }
        _ => Err(Error::shape(format!(
            "logits must be [rows, V] with rows >= 1 and 1 <= V <= {MAX_VOCAB}, got {shape:?}"
        ))),
    }
}

/// Draws one token per row of logits [b, V].
pub struct Sampler {
    ctx: Context,
    opts: SampleOptions,
}

impl Sampler {
    /// Validates the options.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidOption`] as [`SampleOptions::validate`].
    pub fn new(ctx: &Context, opts: &SampleOptions) -> Result<Self> {
        opts.validate()?;
        Ok(Self {
            ctx: ctx.clone(),
            opts: opts.clone(),
        })
    }

    /// Records the draw of `out` `[b]` from `logits` `[b, V]` (f32 or f16) into `encoder`.
    ///
    /// # Errors
    ///
    /// As [`Sampler::plan`].
    pub fn encode<L: Element, T: Element>(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        logits: &GpuTensor<L>,
        out: &GpuTensor<T>,
    ) -> Result<()> {
        self.plan(logits, out)?.encode(encoder);
        Ok(())
    }

    /// The dispatches of one draw. f16 logits are widened to an f32 scratch first (exactly:
    /// every f16 is an f32), so they draw what the same values in f32 draw.
    ///
    /// # Errors
    ///
    /// Besides the [errors common to every
    /// kernel](crate::kernels#errors-common-to-every-kernel):
    /// - [`Error::Dtype`] unless the logits are f32 or f16 and `T` is u32 or i32.
    /// - [`Error::Shape`] if `logits` is not `[b, V]` with 1 <= V <= [`MAX_VOCAB`], or `out`
    ///   is not `[b]`.
    /// - [`Error::LimitExceeded`] if `out` does not fit one storage binding, or a row of
    ///   logits (f32 where f16 is widened) is too long to bind; bindings are
    ///   `max_storage_buffer_binding_size`, of which at most 2^31 bytes are used.
    pub fn plan<L: Element, T: Element>(
        &self,
        logits: &GpuTensor<L>,
        out: &GpuTensor<T>,
    ) -> Result<Plan> {
        let ctx = &self.ctx;
        check_call_tensors(
            ctx,
            "sample",
            &[out.named("out")],
            &[logits.named("logits")],
        )?;
        require_float::<L>("sampling logits")?;
        token_dtype::<T>("sampled")?;
        let (b, v) = logits_shape(logits.shape())?;
        if out.shape() != [b] {
            return Err(Error::shape(format!(
                "sampled tokens must be [{b}] for logits {:?}, got {:?}",
                logits.shape(),
                out.shape()
            )));
        }
        let (seed_lo, seed_hi) = seed_words(self.opts.seed);
        let wg = group_wg(ctx, v.div_ceil(4));
        let sv = variant(ctx.has_subgroups(), "sample_logits", wg);
        // Logits are bound chunk by chunk, the sampled tokens whole.
        check_fits(ctx, "the sampled tokens [b]", b as u64 * 4)?;
        let mut plan = Plan::default();
        let wide = match L::DTYPE {
            DType::F16 => Some(convert::widen(
                ctx,
                &mut plan,
                logits.buffer(),
                logits.len(),
            )?),
            _ => None,
        };
        let source = wide.as_ref().unwrap_or(logits.buffer());
        let align = ctx.limits().min_storage_buffer_offset_alignment as u64;
        let row_bytes = v as u64 * 4;
        for rows in dispatch::based_row_chunks(b as u64, &[row_bytes], BindingCap::of(ctx), align)?
        {
            let n = rows.end - rows.start;
            let (logits_b, logits_base) = rows_binding(source, row_bytes, rows.clone(), align, 4);
            let params = ctx.uniform(&Params {
                chains: n as u32,
                vocab: v as u32,
                sweep: self.opts.step,
                chain_offset: rows.start as u32,
                seed_lo,
                seed_hi,
                temperature: self.opts.temperature,
                top_k: self.opts.top_k as u32,
                top_p: self.opts.top_p_goal(),
                logits_base,
                ..Default::default()
            })?;
            let bindings = [
                (0, logits_b),
                (3, sub(out.buffer(), 0, b as u64 * 4)),
                (5, params.as_entire_buffer_binding()),
            ];
            plan.push(Step::new(ctx, &sv, &bindings, n)?);
            plan.keep(params);
        }
        Ok(plan)
    }
}

/// Options of the Metropolis-Hastings accept step.
#[derive(Clone, Debug, PartialEq)]
pub struct MhOptions {
    /// Divides the score difference; 0 accepts iff score(y) >= score(x). Default 1.
    pub temperature: f32,
    /// Philox key.
    pub seed: u64,
    /// Philox counter word 3 (the MH step index).
    pub step: u32,
}

impl Default for MhOptions {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            seed: 0,
            step: 0,
        }
    }
}

impl MhOptions {
    /// Checks the options' values.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidOption`] if `temperature` is not finite and >= 0.
    pub fn validate(&self) -> Result<()> {
        let t = self.temperature;
        if !(t >= 0.0 && t.is_finite()) {
            return Err(Error::option(format!(
                "MH temperature must be finite and >= 0, got {t}"
            )));
        }
        Ok(())
    }
}

/// The tensors of a batched MH step: states x are replaced by proposals y where accepted,
/// and `score_x` by `score_y`; `accepted` gets 1 or 0 per chain.
pub struct MhTensors<'a, T: Element> {
    /// Current states x [b, L] (updated).
    pub x: &'a GpuTensor<T>,
    /// Proposals y [b, L].
    pub y: &'a GpuTensor<T>,
    /// score(x) `[b]` (updated).
    pub score_x: &'a GpuTensor<f32>,
    /// score(y) `[b]`.
    pub score_y: &'a GpuTensor<f32>,
    /// log q(y <- x) `[b]`.
    pub log_q_fwd: &'a GpuTensor<f32>,
    /// log q(x <- y) `[b]`.
    pub log_q_back: &'a GpuTensor<f32>,
    /// 1 where y was accepted `[b]`.
    pub accepted: &'a GpuTensor<u32>,
}

/// Checks the MH shapes: x, y `[b, L]`; the rest `[b]`. Returns (b, L).
pub fn mh_shape(x: &[usize], y: &[usize], per_chain: &[&[usize]]) -> Result<(usize, usize)> {
    let &[b, l] = x else {
        return Err(Error::shape(format!(
            "MH states must be [chains, L], got {x:?}"
        )));
    };
    shape_elements("MH states", x)?;
    if y != x {
        return Err(Error::shape(format!(
            "MH proposals {y:?} must have the states' shape {x:?}"
        )));
    }
    for s in per_chain {
        if *s != [b] {
            return Err(Error::shape(format!(
                "MH scores, proposal log-probabilities and flags must be [{b}], got {s:?}"
            )));
        }
    }
    Ok((b, l))
}

/// The batched Metropolis-Hastings accept step.
pub struct Metropolis {
    ctx: Context,
    opts: MhOptions,
}

impl Metropolis {
    /// Validates the options.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidOption`] as [`MhOptions::validate`].
    pub fn new(ctx: &Context, opts: &MhOptions) -> Result<Self> {
        opts.validate()?;
        Ok(Self {
            ctx: ctx.clone(),
            opts: opts.clone(),
        })
    }

    /// Records the step into `encoder`.
    ///
    /// # Errors
    ///
    /// As [`Metropolis::plan`].
    pub fn encode<T: Element>(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        t: &MhTensors<'_, T>,
    ) -> Result<()> {
        self.plan(t)?.encode(encoder);
        Ok(())
    }

    /// The dispatch of one step.
    ///
    /// # Errors
    ///
    /// Besides the [errors common to every
    /// kernel](crate::kernels#errors-common-to-every-kernel):
    /// - [`Error::Dtype`] unless `T` is u32 or i32.
    /// - [`Error::Shape`] if x is not `[b, L]`, y is not x's shape, or a score, proposal
    ///   log-probability or `accepted` tensor is not `[b]`.
    /// - [`Error::LimitExceeded`] if x does not fit one storage binding
    ///   (`max_storage_buffer_binding_size`, of which at most 2^31 bytes are used).
    pub fn plan<T: Element>(&self, t: &MhTensors<'_, T>) -> Result<Plan> {
        let ctx = &self.ctx;
        check_call_tensors(
            ctx,
            "MH",
            &[
                t.x.named("x"),
                t.score_x.named("score_x"),
                t.accepted.named("accepted"),
            ],
            &[
                t.y.named("y"),
                t.score_y.named("score_y"),
                t.log_q_fwd.named("log_q_fwd"),
                t.log_q_back.named("log_q_back"),
            ],
        )?;
        token_dtype::<T>("MH")?;
        let (b, l) = mh_shape(
            t.x.shape(),
            t.y.shape(),
            &[
                t.score_x.shape(),
                t.score_y.shape(),
                t.log_q_fwd.shape(),
                t.log_q_back.shape(),
                t.accepted.shape(),
            ],
        )?;
        check_fits(ctx, "the tokens [b, L]", (b * l * 4) as u64)?;
        let (seed_lo, seed_hi) = seed_words(self.opts.seed);
        let params = ctx.uniform(&Params {
            chains: b as u32,
            len: l as u32,
            sweep: self.opts.step,
            seed_lo,
            seed_hi,
            temperature: self.opts.temperature,
            top_p: 1.0,
            ..Default::default()
        })?;
        let bindings = [
            (3, t.x.binding()),
            (5, params.as_entire_buffer_binding()),
            (8, t.y.binding()),
            (9, t.score_x.binding()),
            (10, t.score_y.binding()),
            (11, t.log_q_fwd.binding()),
            (12, t.log_q_back.binding()),
            (13, t.accepted.binding()),
        ];
        let v = variant(ctx.has_subgroups(), "mh_accept", THREAD_WG);
        let mut plan = Plan::default();
        plan.push(Step::new(
            ctx,
            &v,
            &bindings,
            (b as u64).div_ceil(THREAD_WG as u64),
        )?);
        plan.keep(params);
        Ok(plan)
    }
}

/// Runs the WGSL Philox-4x32-10 on (counter, key) pairs (for known-answer tests).
pub fn philox_gpu(ctx: &Context, cases: &[([u32; 4], [u32; 2])]) -> Result<Vec<[u32; 4]>> {
    if cases.is_empty() {
        return Ok(Vec::new());
    }
    let words: Vec<u32> = cases
        .iter()
        .flat_map(|(c, k)| c.iter().chain(k.iter()).copied())
        .collect();
    let input = ctx.upload(&words, [words.len()])?;
    let out = ctx.zeros::<u32>([cases.len() * 4])?;
    let params = ctx.uniform(&Params {
        chains: cases.len() as u32,
        ..Default::default()
    })?;
    let v = variant(ctx.has_subgroups(), "philox_test", THREAD_WG);
    let mut plan = Plan::default();
    plan.push(Step::new(
        ctx,
        &v,
        &[
            (3, input.binding()),
            (5, params.as_entire_buffer_binding()),
            (6, out.binding()),
        ],
        (cases.len() as u64).div_ceil(THREAD_WG as u64),
    )?);
    plan.keep(params);
    plan.run(ctx)?;
    Ok(out
        .download()?
        .chunks(4)
        .map(|c| [c[0], c[1], c[2], c[3]])
        .collect())
}

fn download_bits<T: Element>(t: &GpuTensor<T>) -> Result<Vec<u32>> {
    Ok(bytemuck::cast_slice::<T, u32>(&t.download()?).to_vec())
}

impl Context {
    /// Runs `opts.sweeps` Gibbs sweeps from `init` [b, L] (checked: every token below V) and
    /// returns the final states, plus the best states and scores with `opts.track_best`.
    ///
    /// # Errors
    ///
    /// As [`Gibbs::new`] and [`Gibbs::plan`], and those of [allocating the outputs and running
    /// the call](crate::kernels#errors-common-to-every-kernel); [`Error::InvalidOption`] if a
    /// token of `init` is not below V; and those of [`GpuTensor::download`], which reads
    /// `init` for that check.
    pub fn gibbs<T: Element>(
        &self,
        model: &ChainModel<'_>,
        init: &GpuTensor<T>,
        clamp: Option<&GpuTensor<u8>>,
        opts: &GibbsOptions,
    ) -> Result<GibbsOutput<T>> {
        // init is read and copied here, before any plan checks its tensors.
        self.check_owned(&[init.context()])?;
        token_dtype::<T>("gibbs")?;
        let s = chain_shape(
            model.unary.shape(),
            &model.pair_shapes(),
            init.shape(),
            clamp.map(|c| c.shape()),
        )?;
        check_tokens(&download_bits(init)?, s.vocab, "gibbs initial state")?;
        let tokens = self.zeros::<T>(init.shape().to_vec())?;
        let best = if opts.track_best {
            Some((
                self.zeros::<T>(init.shape().to_vec())?,
                self.zeros::<f32>([s.chains])?,
            ))
        } else {
            None
        };
        let plan = Gibbs::new(self, opts)?.plan(
            model,
            &tokens,
            clamp,
            best.as_ref().map(|(t, s)| (t, s)),
        )?;
        let mut encoder = self.encoder();
        // The tensor's bytes, not its buffer's: a buffer may be larger than its tensor.
        encoder.copy_buffer_to_buffer(init.buffer(), 0, tokens.buffer(), 0, init.bytes());
        plan.encode(&mut encoder);
        self.submit_and_wait(encoder)?;
        Ok(GibbsOutput { tokens, best })
    }

    /// Draws one token per row of `logits` [b, V], f32 or f16 (temperature, top-k, top-p).
    ///
    /// ```
    /// # use seq_kernels::{Context, SampleOptions};
    /// # if seq_kernels::context::skip_example_without_adapter() { return Ok(()); }
    /// let ctx = Context::new()?;
    /// let logits = ctx.upload(&[0.0f32, 5.0, 1.0, 4.9, 2.0, 0.5], [2, 3])?;
    /// // Top-2 of each row, then the smallest set reaching p = 0.5: each row's largest.
    /// let opts = SampleOptions { top_k: 2, top_p: 0.5, seed: 7, ..Default::default() };
    /// assert_eq!(ctx.sample_logits(&logits, &opts)?.download()?, [1, 0]);
    /// // Temperature 0 is the greedy argmax.
    /// let greedy = SampleOptions { temperature: 0.0, ..Default::default() };
    /// assert_eq!(ctx.sample_logits(&logits, &greedy)?.download()?, [1, 0]);
    /// # Ok::<(), seq_kernels::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`Sampler::new`] and [`Sampler::plan`], and those of [allocating the output and
    /// running the call](crate::kernels#errors-common-to-every-kernel).
    pub fn sample_logits<L: Element>(
        &self,
        logits: &GpuTensor<L>,
        opts: &SampleOptions,
    ) -> Result<GpuTensor<u32>> {
        let (b, _) = logits_shape(logits.shape())?;
        let out = self.zeros::<u32>([b])?;
        Sampler::new(self, opts)?.plan(logits, &out)?.run(self)?;
        Ok(out)
    }

    /// One batched Metropolis-Hastings accept step (in place); proposals are checked to be
    /// below `vocab`.
    ///
    /// # Errors
    ///
    /// As [`Metropolis::new`] and [`Metropolis::plan`], and those of [running the
    /// call](crate::kernels#errors-common-to-every-kernel); [`Error::InvalidOption`] if a
    /// token of `t.y` is not below `vocab`; and those of [`GpuTensor::download`], which reads
    /// `t.y` for that check.
    pub fn mh_step<T: Element>(
        &self,
        t: &MhTensors<'_, T>,
        vocab: usize,
        opts: &MhOptions,
    ) -> Result<()> {
        token_dtype::<T>("MH")?;
        check_tokens(&download_bits(t.y)?, vocab, "MH proposals")?;
        Metropolis::new(self, opts)?.plan(t)?.run(self)
    }
}
