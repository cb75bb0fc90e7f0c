//! RoPE family: rotary position embedding.
//!
//! Styles `half` (GPT-NeoX / HF Llama, default) and `interleaved` (RoFormer / GPT-J); partial
//! `rotary_dim` (features past it pass through bit-identical); layouts `bshd` and `bhsd` with any
//! row strides, so q and k can be views into a fused QKV buffer; positions from an offset (KV
//! cache) or an explicit list of shape `[s]`, `[1, s]` or `[b, s]`; the inverse rotation (backward pass);
//! q and k with different head counts (GQA) in one dispatch; in place or out of place; the
//! scalings `linear`, `ntk`, `dynamic`, `yarn` and `llama3`. Storage f32, f16 or bf16 (both
//! packed two per 32-bit word and converted in the shader, so they need no device feature and
//! run on every backend); arithmetic f32.
//!
//! **Angles.** WGSL's f32 `sin`/`cos` are only accurate on [-pi, pi], and `p * theta` in f32 has
//! lost most of its fraction by p ~ 2^20. So the host computes, for every distinct position row
//! of the call and every frequency, `cos` and `sin` of `p * theta'_i` in f64 (exact reduction),
//! folds in yarn's `mscale` and the inverse's sign, and uploads a table of `rows * r/2` f32
//! pairs: `s * r/2 * 8` bytes with an offset or `[s]` positions, `b * s * r/2 * 8` bytes with
//! `[b, s]` positions (0.5 MiB for s = 1024, r = 128: small next to the tensors it rotates, but
//! built and uploaded on every [`Rope::plan`]; keep the plan to reuse it).
//!
//! **Limits.** One dispatch rotates q and k together. Where a tensor is larger than the
//! device's `max_storage_buffer_binding_size`, the call is split along the batch axis into
//! dispatches whose bindings fit; a batch too large alone is split along its tokens (`bshd`),
//! or into runs of heads of q and of k, each head too large alone along its tokens (`bhsd`).
//! Rows of one token (one head's, in `bhsd`) that do not fit are `LimitExceeded`, and so are
//! most strided `bshd` views whose heads lie outside their tokens in memory.
//!
//! ```
//! use seq_kernels::{Context, Positions, RopeOptions};
//! # if seq_kernels::context::skip_example_without_adapter() { return Ok(()); }
//! let ctx = Context::new()?;
//! let (b, s, h, d) = (1, 3, 2, 4);
//! let q = ctx.upload(&vec![1.0f32; b * s * h * d], [b, s, h, d])?;
//! // Tokens at positions 7, 8, 9 (say, after 7 cached tokens).
//! let y = ctx.rope(&q, None, &RopeOptions { offset: 7, ..Default::default() })?;
//! // The same with an explicit positions list, in place.
//! ctx.rope_in_place(&q, Some(&Positions::new(vec![7i64, 8, 9], [3])?), &RopeOptions::default())?;
//! assert_eq!(y.download()?, q.download()?);
//! # Ok::<(), seq_kernels::Error>(())
//! ```

use std::f64::consts::PI;
use std::str::FromStr;

use crate::context::Context;
use crate::dispatch::{largest_fitting, sub_binding as sub, BindingCap, Plan, Step};
use crate::error::{Error, Result};
use crate::shader::{compose, ShaderVariant, GRID_WGSL};
use crate::tensor::{checked_numel, DType, Element, GpuTensor};

const SOURCE: &str = include_str!("../../shaders/rope.wgsl");

/// (aligned start, size) of a binding in bytes.
type ByteRange = (u64, u64);

/// Batches `b0..b1`, tokens `t0..t1` of each: the rows of one rope dispatch; with `one`
/// = (target, h0, h1), only heads `h0..h1` of that target (q 0, k 1).
struct Piece {
    b0: usize,
    b1: usize,
    t0: usize,
    t1: usize,
    one: Option<(usize, usize, usize)>,
}

const WG: u32 = 256;

const FLAG_INTERLEAVED: u32 = 1;
const FLAG_BHSD: u32 = 2;
const FLAG_IN_PLACE: u32 = 4;
const FLAG_PER_ROW: u32 = 8;
const FLAG_BATCH_POSITIONS: u32 = 16;

/// Largest position (and `offset + s - 1`): positions must fit in an i32.
pub const MAX_POSITION: i64 = i32::MAX as i64;

/// Which features form a rotation pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs `(i, i + r/2)`: GPT-NeoX, Hugging Face Llama (`rotate_half`).
    #[default]
    Half,
    /// Pairs `(2i, 2i + 1)`: RoFormer, GPT-J.
    Interleaved,
}

/// `half` or `interleaved`, also by model family: `neox` and `gptj`.
impl FromStr for RopeStyle {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "half" | "neox" => Ok(Self::Half),
            "interleaved" | "gptj" => Ok(Self::Interleaved),
            _ => Err(Error::option(format!(
                "unknown rope style {s:?}; expected half (also neox) or interleaved (also gptj)"
            ))),
        }
    }
}

/// Axis order of a rotated tensor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RopeLayout {
    /// `[batch, seq, heads, d]`.
    #[default]
    Bshd,
    /// `[batch, heads, seq, d]`.
    Bhsd,
}

impl FromStr for RopeLayout {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "bshd" => Ok(Self::Bshd),
            "bhsd" => Ok(Self::Bhsd),
            _ => Err(Error::option(format!(
                "unknown rope layout {s:?}; expected bshd or bhsd"
            ))),
        }
    }
}

/// How the frequencies `theta_i = base^(-2i/r)` are rescaled for long contexts.
/// `factor` is s, `original_max` is L (the model's original maximum positions).
#[derive(Clone, Debug, Default, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    #[default]
    None,
    /// Position interpolation: `theta_i / factor`.
    Linear {
        /// s > 0.
        factor: f64,
    },
    /// NTK-aware: `base' = base * factor^(r/(r-2))`.
    Ntk {
        /// s > 0.
        factor: f64,
    },
    /// Dynamic NTK: `base' = base * ((s l / L) - (s - 1))^(r/(r-2))`, `l = max(current_len, L)`.
    Dynamic {
        /// s > 0.
        factor: f64,
        /// L: what Hugging Face's dynamic scaling calls `max_position_embeddings` (not its
        /// `original_max_position_embeddings`, which only yarn and llama3 read).
        original_max: usize,
        /// The current sequence length; `None`: the largest position of the call plus one.
        current_len: Option<usize>,
    },
    /// YaRN: a ramp between interpolation and extrapolation per frequency, and cos and sin
    /// multiplied by `mscale` (default `0.1 ln(s) + 1`, or 1 for s <= 1, as Hugging Face does).
    Yarn {
        /// s > 0.
        factor: f64,
        /// L.
        original_max: usize,
        /// Default 32.
        beta_fast: f64,
        /// Default 1.
        beta_slow: f64,
        /// The multiplier of cos and sin itself, what Hugging Face calls `attention_factor`;
        /// `None`: `0.1 ln(s) + 1` (1 for s <= 1). Not HF's `rope_scaling["mscale"]`: in
        /// DeepSeek-style configs that one goes with `mscale_all_dim`, and the multiplier they
        /// give (to pass here) is `g(s, mscale) / g(s, mscale_all_dim)` with
        /// `g(s, m) = 0.1 m ln(s) + 1` (1 for s <= 1).
        mscale: Option<f64>,
        /// Round the correction range out to whole frequency indices (floor lo, ceil hi), as
        /// Hugging Face's default `truncate: true` does; false keeps it fractional (HF's
        /// `truncate: false`, which gpt-oss configs set). Default true.
        truncate: bool,
    },
    /// Llama 3.1: keep high frequencies, interpolate low ones, blend in between.
    Llama3 {
        /// s (default 8).
        factor: f64,
        /// L (default 8192).
        original_max: usize,
        /// Default 1.
        low_freq_factor: f64,
        /// Default 4.
        high_freq_factor: f64,
    },
}

impl RopeScaling {
    /// A scaling by name (`none`, `linear`, `ntk`, `dynamic`, `yarn`, `llama3`). Parameters other
    /// than `factor` and `original_max` take the defaults documented on the variant's fields
    /// (`current_len` and `mscale`: `None`). `linear`, `ntk`, `dynamic` and `yarn` need
    /// `factor`, `dynamic` and `yarn` also `original_max`; `llama3` defaults them to 8 and 8192.
    /// Unknown names and missing values are errors.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidOption`] if `name` is unknown, a value it needs is missing, or `factor`
    /// or `original_max` is out of its domain (as [`RopeOptions::validate`] checks them).
    pub fn named(name: &str, factor: Option<f64>, original_max: Option<usize>) -> Result<Self> {
        let need_factor = || {
            factor
                .ok_or_else(|| Error::option(format!("rope scaling {name} needs a factor (s > 0)")))
        };
        let need_max = || {
            original_max.ok_or_else(|| {
                Error::option(format!(
                    "rope scaling {name} needs original_max (the model's original maximum positions L)"
                ))
            })
        };
        let s = match name {
            "none" => Self::None,
            "linear" => Self::Linear {
                factor: need_factor()?,
            },
            "ntk" => Self::Ntk {
                factor: need_factor()?,
            },
            "dynamic" => Self::Dynamic {
                factor: need_factor()?,
                original_max: need_max()?,
                current_len: None,
            },
            "yarn" => Self::Yarn {
                factor: need_factor()?,
                original_max: need_max()?,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale: None,
                truncate: true,
            },
            "llama3" => Self::Llama3 {
                factor: factor.unwrap_or(8.0),
                original_max: original_max.unwrap_or(8192),
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
            },
            _ => {
                return Err(Error::option(format!(
                    "unknown rope scaling {name:?}; expected none, linear, ntk, dynamic, yarn or llama3"
                )))
            }
        };
        s.validate(4)?;
        Ok(s)
    }

    /// The name used by [`RopeScaling::named`].
    pub fn name(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Linear { .. } => "linear",
            Self::Ntk { .. } => "ntk",
            Self::Dynamic { .. } => "dynamic",
            Self::Yarn { .. } => "yarn",
            Self::Llama3 { .. } => "llama3",
        }
    }

    fn validate(&self, r: usize) -> Result<()> {
        let name = self.name();
        let factor = match self {
            Self::None => return Ok(()),
            Self::Linear { factor }
            | Self::Ntk { factor }
            | Self::Dynamic { factor, .. }
            | Self::Yarn { factor, .. }
            | Self::Llama3 { factor, .. } => *factor,
        };
        if !(factor > 0.0 && factor.is_finite()) {
            return Err(Error::option(format!(
                "rope scaling {name}: factor must be finite and > 0, got {factor}"
            )));
        }
        match self {
            Self::Ntk { .. } | Self::Dynamic { .. } if r <= 2 => {
                return Err(Error::option(format!(
                    "rope scaling {name} needs rotary_dim > 2 (its exponent is r/(r-2)), got {r}"
                )))
            }
            Self::Dynamic { original_max, .. }
            | Self::Yarn { original_max, .. }
            | Self::Llama3 { original_max, .. }
                if *original_max == 0 =>
            {
                return Err(Error::option(format!(
                    "rope scaling {name}: original_max must be at least 1"
                )))
            }
            Self::Yarn {
                beta_fast,
                beta_slow,
                mscale,
                ..
            } => {
                if !(*beta_slow > 0.0 && beta_fast > beta_slow && beta_fast.is_finite()) {
                    return Err(Error::option(format!(
                        "rope scaling yarn needs 0 < beta_slow < beta_fast, got {beta_slow}, {beta_fast}"
                    )));
                }
                if let Some(m) = mscale.filter(|m| !(*m > 0.0 && m.is_finite())) {
                    return Err(Error::option(format!(
                        "rope scaling yarn: mscale must be finite and > 0, got {m}"
                    )));
                }
            }
            Self::Llama3 {
                low_freq_factor: lo,
                high_freq_factor: hi,
                ..
            } if !(*lo > 0.0 && hi > lo && hi.is_finite()) => {
                return Err(Error::option(format!(
                "rope scaling llama3 needs 0 < low_freq_factor < high_freq_factor, got {lo}, {hi}"
            )))
            }
            _ => {}
        }
        Ok(())
    }
}

/// Options of the RoPE family.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeOptions {
    /// Pairing of features (default [`RopeStyle::Half`]).
    pub style: RopeStyle,
    /// Axis order (default [`RopeLayout::Bshd`]).
    pub layout: RopeLayout,
    /// Rotated features r (even, <= d); `None`: all d. Features r..d pass through.
    pub rotary_dim: Option<usize>,
    /// Frequency base (default 10000).
    pub base: f64,
    /// Without explicit positions, token t of the sequence sits at `offset + t`. With explicit
    /// positions it must be 0 (add it to the positions instead): the two are exclusive.
    pub offset: u64,
    /// Rotate by -theta: the backward pass (the transpose). For every scaling but yarn this is
    /// the exact inverse; yarn's `mscale` multiplies in both directions, as its gradient does,
    /// so there `inverse(rope(x)) = mscale^2 x`.
    pub inverse: bool,
    /// Frequency scaling (default none).
    pub scaling: RopeScaling,
}

impl Default for RopeOptions {
    fn default() -> Self {
        Self {
            style: RopeStyle::Half,
            layout: RopeLayout::Bshd,
            rotary_dim: None,
            base: 10000.0,
            offset: 0,
            inverse: false,
            scaling: RopeScaling::None,
        }
    }
}

impl RopeOptions {
    /// Checks the options for head dim `d` and returns the rotary dim r.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidOption`] if the rotary dim (`rotary_dim`, else d) is not even, at least
    /// 2 and at most d; if `base` is not finite and > 0 (or, with yarn, not > 1); if `offset`
    /// passes [`MAX_POSITION`]; or if a scaling value is out of its domain (a factor not
    /// finite and > 0, ntk or dynamic with r <= 2, an `original_max` of 0, yarn's betas or
    /// mscale, llama3's frequency factors).
    pub fn validate(&self, d: usize) -> Result<usize> {
        let r = self.rotary_dim.unwrap_or(d);
        if r == 0 || !r.is_multiple_of(2) || r > d {
            return Err(Error::option(match self.rotary_dim {
                Some(r) => {
                    format!("rope rotary_dim must be even, at least 2 and at most d = {d}, got {r}")
                }
                None => format!(
                    "rope rotates the whole head dim d = {d} when rotary_dim is unset, so d \
                     must be even and at least 2; set rotary_dim (even, from 2 to d) to \
                     rotate part of each head"
                ),
            }));
        }
        if !(self.base > 0.0 && self.base.is_finite()) {
            return Err(Error::option(format!(
                "rope base must be finite and > 0, got {}",
                self.base
            )));
        }
        if matches!(self.scaling, RopeScaling::Yarn { .. }) && self.base <= 1.0 {
            return Err(Error::option(format!(
                "rope scaling yarn needs base > 1 (it divides by ln(base)), got {}",
                self.base
            )));
        }
        if self.offset > MAX_POSITION as u64 {
            return Err(Error::option(format!(
                "rope offset {} does not fit in an i32 position",
                self.offset
            )));
        }
        self.scaling.validate(r)?;
        Ok(r)
    }

    /// The scaled frequencies `theta'_i`, `i = 0 .. r/2`, and the cos/sin multiplier
    /// (yarn's mscale, else 1). `current_len` is the sequence length dynamic scaling uses
    /// when its own `current_len` is unset.
    pub fn frequencies(&self, r: usize, current_len: usize) -> Result<(Vec<f64>, f64)> {
        self.scaling.validate(r)?;
        let rf = r as f64;
        let plain = |base: f64| -> Vec<f64> {
            (0..r / 2)
                .map(|i| base.powf(-2.0 * i as f64 / rf))
                .collect()
        };
        let out = match &self.scaling {
            RopeScaling::None => (plain(self.base), 1.0),
            RopeScaling::Linear { factor } => {
                (plain(self.base).iter().map(|t| t / factor).collect(), 1.0)
            }
            RopeScaling::Ntk { factor } => (plain(self.base * factor.powf(rf / (rf - 2.0))), 1.0),
            RopeScaling::Dynamic {
                factor,
                original_max,
                current_len: given,
            } => {
                let big_l = *original_max as f64;
                let l = (given.unwrap_or(current_len) as f64).max(big_l);
                let base = self.base * (factor * l / big_l - (factor - 1.0)).powf(rf / (rf - 2.0));
                (plain(base), 1.0)
            }
            RopeScaling::Yarn {
                factor,
                original_max,
                beta_fast,
                beta_slow,
                mscale,
                truncate,
            } => {
                let (lo, hi) = yarn_range(
                    r,
                    self.base,
                    *original_max,
                    *beta_fast,
                    *beta_slow,
                    *truncate,
                );
                let theta = plain(self.base)
                    .iter()
                    .enumerate()
                    .map(|(i, t)| {
                        let ramp = ((i as f64 - lo) / (hi - lo)).clamp(0.0, 1.0);
                        t * (1.0 - ramp) + (t / factor) * ramp
                    })
                    .collect();
                // As HF's get_mscale: no magnitude change unless the context is stretched.
                let default = if *factor <= 1.0 {
                    1.0
                } else {
                    0.1 * factor.ln() + 1.0
                };
                (theta, mscale.unwrap_or(default))
            }
            RopeScaling::Llama3 {
                factor,
                original_max,
                low_freq_factor: low,
                high_freq_factor: high,
            } => {
                let big_l = *original_max as f64;
                let theta = plain(self.base)
                    .iter()
                    .map(|&t| {
                        let w = 2.0 * PI / t;
                        if w < big_l / high {
                            t
                        } else if w > big_l / low {
                            t / factor
                        } else {
                            let k = (big_l / w - low) / (high - low);
                            (1.0 - k) * t / factor + k * t
                        }
                    })
                    .collect();
                (theta, 1.0)
            }
        };
        // Finite options can still overflow here (theta / 1e-320, base * 1e-300^(r/(r-2)) = 0,
        // an mscale past f32): the table would hold inf and NaN.
        let (theta, mscale) = &out;
        if let Some(t) = theta.iter().find(|t| !(t.is_finite() && **t > 0.0)) {
            return Err(Error::option(format!(
                "rope scaling {} with base {} gives a frequency of {t}; the options are out of \
                 range",
                self.scaling.name(),
                self.base
            )));
        }
        if !(*mscale as f32).is_finite() || *mscale as f32 == 0.0 {
            return Err(Error::option(format!(
                "rope scaling {}: mscale {mscale} is outside float32's range",
                self.scaling.name()
            )));
        }
        Ok(out)
    }
}

/// YaRN's correction range (lo, hi) over the frequency index, rounded out to whole indices
/// when `truncate` (see [`RopeScaling::Yarn`]).
pub fn yarn_range(
    r: usize,
    base: f64,
    original_max: usize,
    beta_fast: f64,
    beta_slow: f64,
    truncate: bool,
) -> (f64, f64) {
    let rf = r as f64;
    let corr = |x: f64| rf * (original_max as f64 / (2.0 * PI * x)).ln() / (2.0 * base.ln());
    let (lo, hi) = (corr(beta_fast), corr(beta_slow));
    let (lo, hi) = if truncate {
        (lo.floor(), hi.ceil())
    } else {
        (lo, hi)
    };
    let lo = lo.max(0.0);
    let mut hi = hi.min(rf - 1.0);
    if lo == hi {
        hi += 0.001;
    }
    (lo, hi)
}

/// Explicit positions of shape `[s]` or `[1, s]` (shared by every batch; `[1, s]` is Hugging
/// Face's usual `position_ids`) or `[b, s]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Positions {
    values: Vec<i64>,
    shape: Vec<usize>,
}

impl Positions {
    /// Positions (i32 or i64 values) of `shape` `[s]`, `[1, s]` or `[b, s]`.
    ///
    /// # Errors
    ///
    /// [`Error::Shape`] if `shape` has no axis or more than two, or holds other than
    /// `values.len()` elements.
    pub fn new<V: Into<i64> + Copy>(
        values: impl AsRef<[V]>,
        shape: impl Into<Vec<usize>>,
    ) -> Result<Self> {
        let values: Vec<i64> = values.as_ref().iter().map(|&v| v.into()).collect();
        let shape = shape.into();
        if shape.is_empty() || shape.len() > 2 || checked_numel(&shape) != Some(values.len()) {
            return Err(Error::shape(format!(
                "rope positions must have shape [s], [1, s] or [b, s] matching their {} values, got {shape:?}",
                values.len()
            )));
        }
        Ok(Self { values, shape })
    }
    /// The values.
    pub fn values(&self) -> &[i64] {
        &self.values
    }
    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
}

/// The positions of a call: one row per distinct (batch, token) the table needs.
#[derive(Clone, Debug, PartialEq)]
pub struct PositionRows {
    /// Position of each row: `[s]` rows, or `[b * s]` rows (batch-major) when `per_batch`.
    pub positions: Vec<u64>,
    /// Whether rows differ per batch.
    pub per_batch: bool,
}

impl PositionRows {
    /// The position of token `t` of batch `b`.
    pub fn get(&self, b: usize, t: usize, s: usize) -> u64 {
        if self.per_batch {
            self.positions[b * s + t]
        } else {
            self.positions[t]
        }
    }
}

/// Checks positions against `b` batches of `s` tokens (or, without them, the offset; with
/// them the offset must be 0). Positions `[1, s]` serve every batch, as `[s]` do.
pub fn position_rows(
    opts: &RopeOptions,
    b: usize,
    s: usize,
    positions: Option<&Positions>,
) -> Result<PositionRows> {
    if s == 0 {
        return Err(Error::shape("rope needs at least one token, got s = 0"));
    }
    let Some(pos) = positions else {
        let last = opts.offset.checked_add(s as u64 - 1);
        if last.is_none_or(|p| p > MAX_POSITION as u64) {
            return Err(Error::option(format!(
                "rope offset {} + {s} tokens passes the largest position {MAX_POSITION}",
                opts.offset
            )));
        }
        return Ok(PositionRows {
            positions: (0..s as u64).map(|t| opts.offset + t).collect(),
            per_batch: false,
        });
    };
    if opts.offset != 0 {
        return Err(Error::option(format!(
            "rope offset {} and explicit positions do not go together: give one (add the \
             offset to the positions)",
            opts.offset
        )));
    }
    let per_batch = match pos.shape() {
        [n] | [1, n] if *n == s => false,
        [nb, n] if *nb == b && *n == s => true,
        other => {
            return Err(Error::shape(format!(
                "rope positions have shape {other:?}; expected [{s}], [1, {s}] or [{b}, {s}]"
            )))
        }
    };
    if let Some(bad) = pos
        .values()
        .iter()
        .find(|&&v| !(0..=MAX_POSITION).contains(&v))
    {
        return Err(Error::option(format!(
            "rope position {bad} is out of range; positions must be in 0..={MAX_POSITION}"
        )));
    }
    Ok(PositionRows {
        positions: pos.values().iter().map(|&v| v as u64).collect(),
        per_batch,
    })
}

/// The (cos, sin) table the kernel reads: `rows * r/2` pairs, mscale and the inverse's sign
/// folded in, computed in f64 and rounded once to f32.
pub fn cos_sin_table(opts: &RopeOptions, r: usize, rows: &PositionRows) -> Result<Vec<[f32; 2]>> {
    let current = rows.positions.iter().max().map_or(1, |&m| m as usize + 1);
    let (theta, mscale) = opts.frequencies(r, current)?;
    let sign = if opts.inverse { -1.0 } else { 1.0 };
    let mut out = Vec::with_capacity(rows.positions.len() * theta.len());
    for &p in &rows.positions {
        for &t in &theta {
            // f64 sin/cos reduce their argument exactly; p * t is exact to ~2^-53 relative.
            let (s, c) = (p as f64 * t).sin_cos();
            out.push([(c * mscale) as f32, (sign * s * mscale) as f32]);
        }
    }
    Ok(out)
}

/// Where a `[4]`-axis tensor (`[b, s, h, d]` or `[b, h, s, d]` per the layout) lies in a buffer:
/// element offset of its first feature and the strides (in elements) of the first three axes.
/// The feature axis is contiguous.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RopeView {
    /// Logical shape in the layout's axis order.
    pub shape: [usize; 4],
    /// Element offset of element [0, 0, 0, 0].
    pub offset: usize,
    /// Strides of axes 0, 1, 2 in elements.
    pub strides: [usize; 3],
}

impl RopeView {
    /// A densely packed tensor.
    pub fn contiguous(shape: [usize; 4]) -> Self {
        let [_, a1, a2, d] = shape;
        Self {
            shape,
            offset: 0,
            // Saturated: an overflowing view then fails its end check instead of wrapping.
            strides: [
                a1.saturating_mul(a2).saturating_mul(d),
                a2.saturating_mul(d),
                d,
            ],
        }
    }
    /// Rows of axis 1 `row_stride` elements apart (axis 2 packed inside a row), starting at
    /// `offset`. For q of a fused `[b, s, (hq + 2 hkv) d]` QKV buffer in bshd: shape
    /// `[b, s, hq, d]`, offset 0, row stride `(hq + 2 hkv) d`; k: offset `hq d`.
    pub fn strided(shape: [usize; 4], offset: usize, row_stride: usize) -> Self {
        Self {
            shape,
            offset,
            strides: [shape[1].saturating_mul(row_stride), row_stride, shape[3]],
        }
    }

    /// The strides the shader steps by: an axis of length 1 is never stepped along, so its
    /// stride (which may be anything) is 0 and cannot exceed the shader's u32 indices.
    fn used_strides(&self) -> [usize; 3] {
        std::array::from_fn(|a| {
            if self.shape[a] == 1 {
                0
            } else {
                self.strides[a]
            }
        })
    }

    /// One past the largest element index, or `None` past `usize` (axes at least 1).
    fn end(&self) -> Option<usize> {
        (0..3).try_fold(self.offset.checked_add(self.shape[3])?, |end, a| {
            end.checked_add((self.shape[a] - 1).checked_mul(self.strides[a])?)
        })
    }

    fn check(&self, what: &str, len: usize) -> Result<()> {
        if self.shape.contains(&0) {
            return Err(Error::shape(format!(
                "rope {what}: shape {:?} has a zero axis",
                self.shape
            )));
        }
        match self.end() {
            Some(end) if end <= len => {}
            end => {
                return Err(Error::shape(format!(
                    "rope {what}: view {:?} (offset {}, strides {:?}) reaches element {} of a tensor of {len}",
                    self.shape,
                    self.offset,
                    self.strides,
                    end.map_or("past usize::MAX".to_string(), |e| e.to_string())
                )))
            }
        }
        // No two rows overlap: sorted by stride, each axis steps past everything below it.
        let mut axes: Vec<(usize, usize)> = (0..3)
            .filter(|&a| self.shape[a] > 1)
            .map(|a| (self.strides[a], self.shape[a]))
            .collect();
        axes.sort();
        let mut extent = self.shape[3];
        for (stride, n) in axes {
            if stride < extent {
                return Err(Error::shape(format!(
                    "rope {what}: strides {:?} make rows of shape {:?} overlap",
                    self.strides, self.shape
                )));
            }
            extent += stride * (n - 1);
        }
        Ok(())
    }
}

/// One tensor to rotate: source and destination (the same tensor and view: in place).
pub struct RopeTarget<'a, T: Element> {
    /// Read from.
    pub src: &'a GpuTensor<T>,
    /// Where `src` lies in its buffer.
    pub src_view: RopeView,
    /// Written to.
    pub dst: &'a GpuTensor<T>,
    /// Where the result goes.
    pub dst_view: RopeView,
}

impl<'a, T: Element> RopeTarget<'a, T> {
    /// `dst = rope(src)`, both dense 4-D tensors of the same shape.
    ///
    /// # Errors
    ///
    /// [`Error::Shape`] if `src` or `dst` is not 4-D (the shapes are compared by
    /// [`Rope::plan`]).
    pub fn new(src: &'a GpuTensor<T>, dst: &'a GpuTensor<T>) -> Result<Self> {
        let shape = dense_shape(src.shape())?;
        Ok(Self {
            src,
            src_view: RopeView::contiguous(shape),
            dst,
            dst_view: RopeView::contiguous(dense_shape(dst.shape())?),
        })
    }
    /// `x = rope(x)` on a dense 4-D tensor.
    ///
    /// # Errors
    ///
    /// [`Error::Shape`] if `x` is not 4-D.
    pub fn in_place(x: &'a GpuTensor<T>) -> Result<Self> {
        Self::new(x, x)
    }
    /// `x = rope(x)` on a view of `x` (e.g. q or k inside a fused QKV buffer).
    pub fn in_place_view(x: &'a GpuTensor<T>, view: RopeView) -> Self {
        Self {
            src: x,
            src_view: view,
            dst: x,
            dst_view: view,
        }
    }
    fn in_place_flag(&self) -> bool {
        self.src.buffer() == self.dst.buffer() && self.src_view == self.dst_view
    }
}

fn dense_shape(shape: &[usize]) -> Result<[usize; 4]> {
    shape.try_into().map_err(|_| {
        Error::shape(format!(
            "rope takes 4-D tensors ([b, s, h, d] or [b, h, s, d]), got shape {shape:?}"
        ))
    })
}

/// Storage code of the shader (`STORAGE` constant).
fn storage_code(dtype: DType) -> Option<u32> {
    match dtype {
        DType::F32 => Some(0),
        DType::F16 => Some(1),
        DType::BF16 => Some(2),
        _ => None,
    }
}

fn variant(dtype: DType) -> ShaderVariant {
    let code = storage_code(dtype).unwrap_or(0);
    ShaderVariant {
        family: "rope",
        variant: dtype.name().to_string(),
        source: compose(&[
            &format!("const STORAGE: u32 = {code}u;\n"),
            GRID_WGSL,
            SOURCE,
        ]),
        entry: "rope",
        constants: vec![("WG".into(), WG as f64)],
    }
}

/// Every shader variant of the family (for the naga translation test).
pub fn shader_variants() -> Vec<ShaderVariant> {
    [DType::F32, DType::F16, DType::BF16]
        .into_iter()
        .map(variant)
        .collect()
}

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct TargetParams {
    rows: u32,
    heads: u32,
    src_off: u32,
    src_strides: [u32; 3],
    dst_off: u32,
    dst_strides: [u32; 3],
    _pad: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    q: TargetParams,
    k: TargetParams,
    seq: u32,
    d: u32,
    r: u32,
    units: u32,
    flags: u32,
    table_off: u32,
    _pad: [u32; 2],
}

/// A RoPE kernel with fixed options; the pipeline is compiled on first use and cached in the
/// context.
///
/// Fused q and k (GQA) in place, recorded into your own encoder:
/// ```
/// # use seq_kernels::{Context, Rope, RopeOptions, RopeTarget};
/// # if seq_kernels::context::skip_example_without_adapter() { return Ok(()); }
/// # let ctx = Context::new()?;
/// let (b, s, hq, hkv, d) = (2, 16, 8, 2, 64);
/// let q = ctx.upload(&vec![1.0f32; b * s * hq * d], [b, s, hq, d])?;
/// let k = ctx.upload(&vec![1.0f32; b * s * hkv * d], [b, s, hkv, d])?;
/// let rope = Rope::new(&ctx, &RopeOptions { offset: 100, ..Default::default() })?;
/// let mut encoder = ctx.device().create_command_encoder(&Default::default());
/// rope.encode(&mut encoder, &RopeTarget::in_place(&q)?, Some(&RopeTarget::in_place(&k)?), None)?;
/// ctx.queue().submit([encoder.finish()]);
/// // A rotation keeps each pair's length: the sum of squares stays b s hkv d.
/// let squares: f32 = k.download()?.iter().map(|x| x * x).sum();
/// assert!((squares - (b * s * hkv * d) as f32).abs() < 1e-2);
/// # Ok::<(), seq_kernels::Error>(())
/// ```
pub struct Rope {
    ctx: Context,
    opts: RopeOptions,
}

impl Rope {
    /// Checks the options that do not depend on shapes. `rotary_dim` (and the scalings' needs
    /// on r) is checked against the head dim d by [`Rope::plan`], which knows d.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidOption`] as [`RopeOptions::validate`], but for the checks on the rotary
    /// dim.
    pub fn new(ctx: &Context, opts: &RopeOptions) -> Result<Self> {
        RopeOptions {
            rotary_dim: None,
            ..opts.clone()
        }
        .validate(usize::MAX - 1)?;
        Ok(Self {
            ctx: ctx.clone(),
            opts: opts.clone(),
        })
    }

    /// The options.
    pub fn options(&self) -> &RopeOptions {
        &self.opts
    }

    /// Records the rotation of `q` (and `k`, in the same dispatch) into `encoder`; no submit.
    ///
    /// # Errors
    ///
    /// As [`Rope::plan`].
    pub fn encode<T: Element>(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        q: &RopeTarget<'_, T>,
        k: Option<&RopeTarget<'_, T>>,
        positions: Option<&Positions>,
    ) -> Result<()> {
        self.plan(q, k, positions)?.encode(encoder);
        Ok(())
    }

    /// The dispatch of one call (with its cos/sin table), to record as often as needed.
    ///
    /// q and k must agree on batch, sequence and head dim; their head counts may differ. Either
    /// both are in place (destination = source, same view) or both write to buffers neither
    /// reads. q and k must not overlap each other (not checked).
    ///
    /// # Errors
    ///
    /// Besides the [errors common to every
    /// kernel](crate::kernels#errors-common-to-every-kernel):
    /// - [`Error::Dtype`] unless `T` is f32, f16 or bf16.
    /// - [`Error::Shape`] if a view has a zero axis, reaches past its tensor or has rows that
    ///   overlap; if a destination view's shape is not its source's; if k and q disagree on
    ///   batch, sequence or head dim; if f16 or bf16 rows are not on whole 32-bit words (an
    ///   odd d, offset, or stride of an axis longer than 1); or if `positions` is not `[s]`,
    ///   `[1, s]` or `[b, s]`.
    /// - [`Error::InvalidOption`] for the options, as [`RopeOptions::validate`] checks them
    ///   against the head dim d; if some targets are in place and others not, or a
    ///   destination not in place shares its buffer with a source; if `offset` plus the
    ///   tokens passes [`MAX_POSITION`], `offset` is not 0 with `positions`, or a position is
    ///   outside `0..=MAX_POSITION`; or if the scaling makes a frequency or mscale that is
    ///   not finite and nonzero.
    /// - [`Error::LimitExceeded`] if the smallest piece the call splits into (one token of one
    ///   batch item: all its heads in bshd, one head in bhsd) binds more than
    ///   `max_storage_buffer_binding_size` (of which at most 2^31 bytes are used), if an
    ///   offset, stride or row count passes `u32::MAX`, or if a dispatch would need more than
    ///   `u32::MAX` invocations.
    pub fn plan<T: Element>(
        &self,
        q: &RopeTarget<'_, T>,
        k: Option<&RopeTarget<'_, T>>,
        positions: Option<&Positions>,
    ) -> Result<Plan> {
        let ctx = &self.ctx;
        let owners: Vec<&Context> = std::iter::once(q)
            .chain(k)
            .flat_map(|t| [t.src.context(), t.dst.context()])
            .collect();
        ctx.check_owned(&owners)?;
        if storage_code(T::DTYPE).is_none() {
            return Err(Error::Dtype(format!(
                "rope takes f32, f16 or bf16 tensors, got {}",
                T::DTYPE.name()
            )));
        }
        let targets: Vec<&RopeTarget<'_, T>> = std::iter::once(q).chain(k).collect();
        let bhsd = self.opts.layout == RopeLayout::Bhsd;
        let split = |v: &RopeView| {
            let [b, a1, a2, d] = v.shape;
            if bhsd {
                (b, a2, a1, d)
            } else {
                (b, a1, a2, d)
            }
        };
        let (b, s, _, d) = split(&q.src_view);
        let r = self.opts.validate(d)?;
        for (i, t) in targets.iter().enumerate() {
            let name = ["q", "k"][i];
            t.src_view.check(&format!("{name} source"), t.src.len())?;
            t.dst_view
                .check(&format!("{name} destination"), t.dst.len())?;
            if t.src_view.shape != t.dst_view.shape {
                return Err(Error::shape(format!(
                    "rope {name}: destination shape {:?} must equal the source shape {:?}",
                    t.dst_view.shape, t.src_view.shape
                )));
            }
            let (tb, ts, _, td) = split(&t.src_view);
            if (tb, ts, td) != (b, s, d) {
                return Err(Error::shape(format!(
                    "rope: k {:?} and q {:?} must agree on batch, sequence and head dim",
                    t.src_view.shape, q.src_view.shape
                )));
            }
        }
        let in_place = q.in_place_flag();
        for t in &targets {
            let aliased = targets.iter().any(|o| o.src.buffer() == t.dst.buffer());
            if t.in_place_flag() != in_place || (!in_place && aliased) {
                return Err(Error::option(
                    "rope: either every target is in place (destination = source tensor and view) \
                     or every destination is a buffer no source reads",
                ));
            }
        }
        let packed = T::DTYPE.size() == 2;
        if packed {
            for t in &targets {
                for v in [&t.src_view, &t.dst_view] {
                    let strides = v.used_strides();
                    if d % 2 != 0 || v.offset % 2 != 0 || strides.iter().any(|s| s % 2 != 0) {
                        return Err(Error::shape(format!(
                            "rope with {} storage needs rows on whole 32-bit words: even d, offset \
                             and strides (of axes longer than 1); got d = {d}, offset {}, \
                             strides {:?}",
                            T::DTYPE.name(),
                            v.offset,
                            v.strides
                        )));
                    }
                }
            }
        }
        let rows = position_rows(&self.opts, b, s, positions)?;
        let table = cos_sin_table(&self.opts, r, &rows)?;

        let interleaved = self.opts.style == RopeStyle::Interleaved;
        let per_row = packed && !interleaved && r % 4 != 0;
        let pass = if in_place { 0 } else { d - r };
        let units = match (packed, per_row, interleaved) {
            (false, _, _) => r / 2 + pass,
            (true, true, _) => 1,
            (true, false, true) => r / 2 + pass / 2,
            (true, false, false) => r / 4 + pass / 2,
        };
        let flags = [
            (interleaved, FLAG_INTERLEAVED),
            (bhsd, FLAG_BHSD),
            (in_place, FLAG_IN_PLACE),
            (per_row, FLAG_PER_ROW),
            (rows.per_batch, FLAG_BATCH_POSITIONS),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .fold(0, |acc, (_, f)| acc | f);

        // Bindings larger than the device allows are split along the batch axis, and a batch
        // too large alone along its tokens (bshd) or heads and then tokens (bhsd): each
        // `Piece` binds the byte ranges its rows touch (aligned down) and gets its own dispatch.
        let limits = ctx.limits();
        let cap = BindingCap::of(ctx);
        let max_binding = cap.bytes;
        let align = (limits.min_storage_buffer_offset_alignment as u64).max(16);
        let esize = T::DTYPE.size() as u64;
        let hr = (r / 2) as u64;
        // Strides of a view's token and head axes.
        let axes = |v: &RopeView| {
            if bhsd {
                (v.strides[2], v.strides[1])
            } else {
                (v.strides[1], v.strides[2])
            }
        };
        // The heads of target `ti`'s view `v` that a piece rotates.
        let head_run = |v: &RopeView, pc: &Piece, ti: usize| match pc.one {
            Some((t, h0, h1)) if t == ti => (h0, h1),
            _ => (0, if bhsd { v.shape[1] } else { v.shape[2] }),
        };
        // The element of a view where a piece starts.
        let first = |v: &RopeView, pc: &Piece, ti: usize| {
            let (tok, head) = axes(v);
            v.offset + pc.b0 * v.strides[0] + pc.t0 * tok + head_run(v, pc, ti).0 * head
        };
        // (aligned start, size) in bytes of what a piece of a view touches.
        let view_range = |v: &RopeView, pc: &Piece, ti: usize| -> (u64, u64) {
            let lo = first(v, pc, ti) as u64 * esize;
            let (tok, head) = axes(v);
            let last = v.offset
                + (pc.b1 - 1) * v.strides[0]
                + (pc.t1 - 1) * tok
                + (head_run(v, pc, ti).1 - 1) * head
                + v.shape[3];
            let start = lo / align * align;
            (start, last as u64 * esize - start)
        };
        // The table's position rows of a piece: per (batch, token) or per token.
        let table_rows = |pc: &Piece| -> (u64, u64) {
            if rows.per_batch {
                ((pc.b0 * s + pc.t0) as u64, ((pc.b1 - 1) * s + pc.t1) as u64)
            } else {
                (pc.t0 as u64, pc.t1 as u64)
            }
        };
        let table_range = |pc: &Piece| -> (u64, u64) {
            let (lo, hi) = table_rows(pc);
            let start = lo * hr * 8 / align * align;
            (start, hi * hr * 8 - start)
        };
        // Whether a piece rotates target `ti`.
        let rotates = |pc: &Piece, ti: usize| pc.one.is_none_or(|(t, _, _)| t == ti);
        let need = |pc: &Piece| -> u64 {
            targets
                .iter()
                .enumerate()
                .filter(|(ti, _)| rotates(pc, *ti))
                .flat_map(|(ti, t)| {
                    [
                        view_range(&t.src_view, pc, ti).1,
                        view_range(&t.dst_view, pc, ti).1,
                    ]
                })
                .chain(std::iter::once(table_range(pc).1))
                .max()
                .unwrap_or(0)
        };
        let piece = |b0, b1, t0, t1, one| Piece {
            b0,
            b1,
            t0,
            t1,
            one,
        };
        // Runs of tokens t0.. of batch b0 (heads as `one` says) that fit, into `pieces`.
        let token_runs = |pieces: &mut Vec<Piece>, b0: usize, one| -> Result<()> {
            let mut t0 = 0;
            while t0 < s {
                let needed = need(&piece(b0, b0 + 1, t0, t0 + 1, one));
                if needed > max_binding {
                    return Err(Error::LimitExceeded {
                        what: "bytes of one token's rows of the rope tensors".into(),
                        limit: cap.limit,
                        needed,
                        max: max_binding,
                    });
                }
                let t1 = largest_fitting(t0 + 1, s, |t1| {
                    need(&piece(b0, b0 + 1, t0, t1, one)) <= max_binding
                });
                pieces.push(piece(b0, b0 + 1, t0, t1, one));
                t0 = t1;
            }
            Ok(())
        };
        let mut pieces = Vec::new();
        let mut b0 = 0;
        while b0 < b {
            if need(&piece(b0, b0 + 1, 0, s, None)) <= max_binding {
                let b1 = largest_fitting(b0 + 1, b, |b1| {
                    need(&piece(b0, b1, 0, s, None)) <= max_binding
                });
                pieces.push(piece(b0, b1, 0, s, None));
                b0 = b1;
                continue;
            }
            if !bhsd {
                // One batch does not fit: its tokens (every head of both targets) in runs.
                token_runs(&mut pieces, b0, None)?;
            } else {
                // bhsd: tokens are inside heads, so each target in runs of heads, and a head
                // too large alone in runs of its tokens.
                for (ti, t) in targets.iter().enumerate() {
                    let heads = t.src_view.shape[1];
                    let mut h0 = 0;
                    while h0 < heads {
                        let run = |h1| piece(b0, b0 + 1, 0, s, Some((ti, h0, h1)));
                        if need(&run(h0 + 1)) > max_binding {
                            token_runs(&mut pieces, b0, Some((ti, h0, h0 + 1)))?;
                            h0 += 1;
                            continue;
                        }
                        let h1 = largest_fitting(h0 + 1, heads, |h1| need(&run(h1)) <= max_binding);
                        pieces.push(run(h1));
                        h0 = h1;
                    }
                }
            }
            b0 += 1;
        }

        let table_buf = ctx.scratch((table.len() * 8) as u64)?;
        ctx.checked("writing the rope cos/sin table", || {
            ctx.queue()
                .write_buffer(&table_buf, 0, bytemuck::cast_slice(&table))
        })?;
        let u = |x: u64| -> Result<u32> {
            u32::try_from(x).map_err(|_| Error::LimitExceeded {
                what: "elements of a rope tensor".into(),
                limit: "u32 indices",
                needed: x,
                max: u32::MAX as u64,
            })
        };
        let variant = variant(T::DTYPE);
        let mut plan = Plan::default();
        for pc in pieces {
            // Per target: parameters relative to its bindings, and the bindings' byte ranges.
            let bound =
                |t: &RopeTarget<'_, T>, ti| -> Result<(TargetParams, ByteRange, ByteRange)> {
                    let (h0, h1) = head_run(&t.src_view, &pc, ti);
                    // A target the piece does not rotate is bound over one row, in range.
                    let tiny = piece(pc.b0, pc.b0 + 1, pc.t0, pc.t0 + 1, Some((ti, 0, 1)));
                    let at = if rotates(&pc, ti) { &pc } else { &tiny };
                    let src = view_range(&t.src_view, at, ti);
                    let dst = view_range(&t.dst_view, at, ti);
                    let st = |s: [usize; 3]| -> Result<[u32; 3]> {
                        Ok([u(s[0] as u64)?, u(s[1] as u64)?, u(s[2] as u64)?])
                    };
                    let off =
                        |v: &RopeView, range: ByteRange| first(v, at, ti) as u64 - range.0 / esize;
                    let th = h1 - h0;
                    // A target the piece does not rotate has no rows (its bindings are unused).
                    let rows = if rotates(&pc, ti) {
                        (pc.b1 - pc.b0) * (pc.t1 - pc.t0) * th
                    } else {
                        0
                    };
                    Ok((
                        TargetParams {
                            rows: u(rows as u64)?,
                            heads: u(th as u64)?,
                            src_off: u(off(&t.src_view, src))?,
                            src_strides: st(t.src_view.used_strides())?,
                            dst_off: u(off(&t.dst_view, dst))?,
                            dst_strides: st(t.dst_view.used_strides())?,
                            _pad: [0; 2],
                        },
                        src,
                        dst,
                    ))
                };
            let (qp, q_src, q_dst) = bound(q, 0)?;
            let (kp, k_src, k_dst, k_bufs) = match k {
                Some(k) => {
                    let (kp, ks, kd) = bound(k, 1)?;
                    (kp, ks, kd, (k.src.buffer(), k.dst.buffer()))
                }
                None => (
                    TargetParams::default(),
                    q_src,
                    q_dst,
                    (q.src.buffer(), q.dst.buffer()),
                ),
            };
            let invocations = (qp.rows as u64 + kp.rows as u64) * units as u64;
            if invocations > u32::MAX as u64 {
                return Err(Error::LimitExceeded {
                    what: "invocations of one rope dispatch".into(),
                    limit: "u32 indices",
                    needed: invocations,
                    max: u32::MAX as u64,
                });
            }
            // The shader counts batches and tokens from the piece's first, and its table
            // pairs from the piece's first row.
            let table_at = table_range(&pc);
            let table_off = table_rows(&pc).0 * hr - table_at.0 / 8;
            let params = ctx.uniform(&Params {
                q: qp,
                k: kp,
                seq: (pc.t1 - pc.t0) as u32,
                d: d as u32,
                r: r as u32,
                units: units as u32,
                flags,
                table_off: u(table_off)?,
                _pad: [0; 2],
            })?;
            plan.push(Step::new(
                ctx,
                &variant,
                &[
                    (0, sub(q.src.buffer(), q_src.0, q_src.1)),
                    (1, sub(q.dst.buffer(), q_dst.0, q_dst.1)),
                    (2, sub(k_bufs.0, k_src.0, k_src.1)),
                    (3, sub(k_bufs.1, k_dst.0, k_dst.1)),
                    (4, sub(&table_buf, table_at.0, table_at.1)),
                    (5, params.as_entire_buffer_binding()),
                ],
                invocations.div_ceil(WG as u64),
            )?);
            plan.keep(params);
        }
        plan.keep(table_buf);
        Ok(plan)
    }
}

impl Context {
    /// `rope(x)` of a dense 4-D tensor into a new tensor.
    ///
    /// # Errors
    ///
    /// As [`Rope::new`] and [`Rope::plan`], with [`Error::Shape`] if `x` is not 4-D, and
    /// those of [allocating the output and running the
    /// call](crate::kernels#errors-common-to-every-kernel).
    pub fn rope<T: Element>(
        &self,
        x: &GpuTensor<T>,
        positions: Option<&Positions>,
        opts: &RopeOptions,
    ) -> Result<GpuTensor<T>> {
        let kernel = Rope::new(self, opts)?;
        let y = self.zeros::<T>(x.shape().to_vec())?;
        kernel
            .plan(&RopeTarget::new(x, &y)?, None, positions)?
            .run(self)?;
        Ok(y)
    }

    /// `x = rope(x)` of a dense 4-D tensor.
    ///
    /// # Errors
    ///
    /// As [`Rope::new`] and [`Rope::plan`], with [`Error::Shape`] if `x` is not 4-D, and
    /// those of [running the call](crate::kernels#errors-common-to-every-kernel).
    pub fn rope_in_place<T: Element>(
        &self,
        x: &GpuTensor<T>,
        positions: Option<&Positions>,
        opts: &RopeOptions,
    ) -> Result<()> {
        Rope::new(self, opts)?
            .plan(&RopeTarget::in_place(x)?, None, positions)?
            .run(self)
    }

    /// `q = rope(q)`, `k = rope(k)` in one dispatch (head counts may differ).
    ///
    /// # Errors
    ///
    /// As [`Context::rope_in_place`], for `q` and `k`.
    pub fn rope_qk_in_place<T: Element>(
        &self,
        q: &GpuTensor<T>,
        k: &GpuTensor<T>,
        positions: Option<&Positions>,
        opts: &RopeOptions,
    ) -> Result<()> {
        Rope::new(self, opts)?
            .plan(
                &RopeTarget::in_place(q)?,
                Some(&RopeTarget::in_place(k)?),
                positions,
            )?
            .run(self)
    }
}
