//! The `seqk` command line: adapter info, verification against the CPU reference,
//! benchmarks, and running any kernel on .npy files.
//!
//! Each kernel family but copy has a file here with its `verify` cases, `bench` cases and
//! `run` handler (`sample`'s are in `gibbs.rs`; the copy kernel is the bench baseline, in
//! `report.rs`); `FAMILIES` lists them. Exit codes: 0 success, 1 a failed check, a device
//! error or no adapter, 2 bad input (unknown names, wrong dtypes or shapes, bad options, sizes
//! beyond the device's limits, unreadable input or unwritable output files, or a command line
//! clap rejects).

mod attention;
mod flash;
mod generate;
mod gibbs;
mod npy;
mod report;
mod rope;
mod softmax;

use std::any::TypeId;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;

use clap::{Parser, Subcommand, ValueEnum};

use crate::{Context, ContextOptions, Error};
pub use npy::{Array, Data};
use report::{Baseline, BenchRow, Check};

#[derive(Parser)]
#[command(
    name = "seqk",
    version,
    about = "GPU kernels for sequence models, checked against a CPU reference",
    after_help = "Without a command, seqk runs verify and a quick benchmark table on the \
                  default adapter.\n\nExit codes: 0 success; 1 a failed check, a device \
                  error or no adapter; 2 bad input (unknown names, wrong dtypes or shapes, \
                  bad options, sizes beyond the device's limits, an unreadable input or an \
                  unwritable output file)."
)]
struct Cli {
    /// Graphics backend (default: WGPU_BACKEND, else wgpu's choice).
    #[arg(long, global = true, value_enum)]
    backend: Option<Backend>,
    /// Use the first adapter whose name contains this substring (default: WGPU_ADAPTER_NAME).
    #[arg(long, global = true)]
    adapter: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Backend {
    Vulkan,
    Gl,
    Metal,
    Dx12,
}

/// `seqk run --help`: each kernel's inputs and options, with their defaults.
const RUN_HELP: &str = "\
Kernels: inputs (--in NAME=FILE.npy; float inputs float32 or float16, masks bool or uint8, \
true keeps) and options (--set KEY=VALUE, default in brackets). Outputs are float32 (tokens \
int32).

softmax: x [.., n]; optional mask (the shape of x). temperature [1], scale [1] (multiplies \
the logits before the temperature), log [false], causal [false] (the last two axes as an \
[m, n] score matrix, bottom-right: row i sees j <= i + n - m), softmax_plus [false].

rope: x [b, s, h, d] (layout=bshd) or [b, h, s, d] (bhsd); optional positions [s], [1, s] \
(Hugging Face's position_ids) or [b, s], int32 or int64, instead of offset. style [half] \
(half|interleaved), layout [bshd], rotary_dim [d], base [10000], offset [0], inverse [false], \
storage [the input's] (f32|f16|bf16: bf16 rounds float32 input as torch's .bfloat16() does), \
scaling [none] (none|linear|ntk|dynamic|yarn|llama3) with factor and original_max (linear and \
ntk need factor, dynamic and yarn both; llama3 defaults them to 8 and 8192), and: yarn \
beta_fast [32], beta_slow [1], mscale [0.1 ln(factor) + 1], truncate [true]; llama3 \
low_freq_factor [1], high_freq_factor [4]; dynamic current_len [the largest position + 1]. \
mscale multiplies cos and sin itself, what Hugging Face calls attention_factor; it is not a \
config's rope_scaling[\"mscale\"], which DeepSeek-style configs pair with mscale_all_dim: for \
those pass mscale = g(factor, mscale) / g(factor, mscale_all_dim), where \
g(s, m) = 0.1 m ln(s) + 1 (1 for s <= 1). inverse=true rotates by -theta, the backward \
pass: the exact inverse for every scaling but yarn, whose mscale multiplies both ways, so \
there inverse(rope(x)) = mscale^2 x. truncate=false keeps yarn's correction range \
fractional (HF's truncate: false). For dynamic, original_max is HF's \
max_position_embeddings. HF's q after transpose(1, 2) is bhsd.

attention: q [b, hq, m, d], k [b, hkv, n, d], v [b, hkv, n, dv] (layout=bhsd; bshd swaps the \
middle two axes); optional mask, bool (true keeps) or float (added), [m|1, n] or \
[b|1, 1|hq, m|1, n] (a 1 broadcasts). scale [1/sqrt(d)], causal [false], softcap [0: off], \
kv_len [n] (keys are the first kv_len positions of k and v), kv_lens [off] (a ragged \
batch, one length per batch, comma-separated: kv_lens=3,7,5 gives batch i the first \
kv_lens[i] positions; not with kv_len; the mask stays [.., n]), layout [bhsd]. causal is \
bottom-right: query i sees key j iff j <= i + n - m, with n batch i's length under kv_lens \
(torch's is_causal is top-left; compare with causal_lower_right(m, n)). Out [b, hq, m, dv] \
(bshd: [b, m, hq, dv]); --out2 lse=FILE gives the log-sum-exp [b, hq, m].

flash: qq, kq, ql, kl [b, n, s], v [b, n, e]; optional gate [b, n, e], bias [C, C] (used \
as float32 whatever its dtype), key_mask [b, n]. chunk [256], causal [false], attn_fn [relu2] \
(relu2|laplace), quad_scale [1/chunk], lin_norm [chunk] (chunk|length|prefix), lin_scale \
(overrides lin_norm), rope [false] with base [10000] and offset [0] for the fused RoPE (half \
style). lin_norm=chunk (z = 1/C) is the paper's causal code; its non-causal code divides by \
n: lin_norm=length. Out [b, n, e].

gibbs: unary [L, V] or [b, L, V]; pairwise [V, V], or pair_a and pair_b [V, r] each \
(W = A B^T); init [b, L] (int32, int64 or uint8 tokens); optional clamp [L] or [b, L] (true \
keeps the token). sweeps [100], temperature [1], anneal_to (geometric annealing from \
temperature to it), seed [0], first_sweep [0] (the Philox sweep index of the first sweep, to \
continue a run), and schedule_len with schedule_at (this run is sweeps schedule_at.. of a \
run of schedule_len sweeps: its annealing, and its Philox sweeps unless first_sweep is set). \
Out: the final tokens [b, L]; --out2 best= and best_score= give each chain's best state and \
its score.

sample: logits [b, V]. temperature [1] (0: greedy), top_k [0: off], top_p [1: off], seed [0], \
step [0] (the Philox counter's last word: a new step draws afresh with one seed); applied in \
that order. Out: tokens [b].

Inputs all float16 (flash's bias aside): the GPU runs with f16 storage, so results are \
rounded to f16 (inf beyond 65504) before they are written as float32, except attention's \
lse, which is kept in f32. --cpu runs the CPU reference, in f64.";

#[derive(Subcommand)]
enum Command {
    /// Adapter, backend, features and limits.
    Info {
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Every kernel against the CPU reference: a pass/fail table.
    Verify {
        /// One JSON object (a row per check) instead of the table.
        #[arg(long)]
        json: bool,
        /// Fewer, smaller cases.
        #[arg(long)]
        quick: bool,
    },
    /// GPU time, GB/s or FLOP/s, and the ratio to the copy kernel's bandwidth.
    Bench {
        /// Kernels to run: softmax, rope, gibbs, sample, attention, flash (default: all), or
        /// copy for the copy baseline alone (it runs first in every bench).
        kernels: Vec<String>,
        /// One JSON object: the adapter and a row per case (times in ms, bytes and FLOPs per
        /// call, GB/s, x copy, TFLOP/s, items/s and µs per item), printed at the end.
        #[arg(long)]
        json: bool,
        /// Smaller sizes, for a software device. The copy baseline then moves 32 MiB, which
        /// a large GPU's L2 cache can hold: its "x copy" ratios are low there; use the full
        /// run (256 MiB) for GPU figures.
        #[arg(long)]
        quick: bool,
    },
    /// Run one kernel on .npy inputs and write .npy outputs.
    #[command(after_help = RUN_HELP)]
    Run(RunArgs),
    /// Constrained text generation by Gibbs sampling.
    Generate(generate::GenerateArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Kernel name: softmax, rope, attention, flash, gibbs, sample.
    kernel: String,
    /// An input, NAME=FILE.npy (repeatable, each NAME once).
    #[arg(long = "in", value_name = "NAME=FILE")]
    inputs: Vec<String>,
    /// The main output file (.npy). Every output path is checked to be writable before
    /// computing; a bad one exits 2 with nothing written.
    #[arg(long)]
    out: PathBuf,
    /// A secondary output, NAME=FILE.npy (e.g. lse=lse.npy).
    #[arg(long, value_name = "NAME=FILE")]
    out2: Vec<String>,
    /// An option, KEY=VALUE (repeatable, each KEY once); an empty VALUE leaves the option at
    /// its default. Booleans: true/false, True/False or 1/0.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Run the CPU reference instead of the GPU.
    #[arg(long)]
    cpu: bool,
}

/// What went wrong in a command, and which exit code it earns.
#[derive(Debug)]
pub enum CliError {
    /// Bad input from the user, or input beyond what the device allows: exit code 2.
    Usage(String),
    /// A failure of the device or the machine: exit code 1.
    Failure(String),
}

impl From<Error> for CliError {
    fn from(e: Error) -> Self {
        match e {
            Error::Shape(_) | Error::Dtype(_) | Error::InvalidOption(_) => {
                CliError::Usage(e.to_string())
            }
            // A size the user's input passes is theirs to change, and told apart from a
            // missing adapter (exit 1); too few storage buffers per stage is the device's.
            Error::LimitExceeded { limit, .. }
                if limit != crate::error::STORAGE_BUFFERS_PER_STAGE =>
            {
                CliError::Usage(e.to_string())
            }
            _ => CliError::Failure(e.to_string()),
        }
    }
}

/// An error of work the CLI chose itself (verify's and bench's cases): the device's, exit 1.
fn failure(e: Error) -> CliError {
    CliError::Failure(e.to_string())
}

fn usage(msg: impl Into<String>) -> CliError {
    CliError::Usage(msg.into())
}

/// A kernel's entries in `verify` and `bench`; its name is a KERNEL of `bench` and `run`.
struct Family {
    name: &'static str,
    verify: fn(&Context, bool) -> Result<Vec<Check>, Error>,
    bench: fn(&Context, bool, &Baseline) -> Result<Vec<BenchRow>, Error>,
}

const FAMILIES: &[Family] = &[
    Family {
        name: "softmax",
        verify: softmax::verify,
        bench: softmax::bench,
    },
    Family {
        name: "rope",
        verify: rope::verify,
        bench: rope::bench,
    },
    Family {
        name: "gibbs",
        verify: gibbs::verify,
        bench: gibbs::bench,
    },
    Family {
        name: "sample",
        verify: gibbs::verify_sample,
        bench: gibbs::bench_sample,
    },
    Family {
        name: "attention",
        verify: attention::verify,
        bench: attention::bench,
    },
    Family {
        name: "flash",
        verify: flash::verify,
        bench: flash::bench,
    },
];

/// Entry point of the `seqk` binary; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    let options = ContextOptions {
        backends: cli.backend.map(|b| match b {
            Backend::Vulkan => wgpu::Backends::VULKAN,
            Backend::Gl => wgpu::Backends::GL,
            Backend::Metal => wgpu::Backends::METAL,
            Backend::Dx12 => wgpu::Backends::DX12,
        }),
        adapter_name: cli.adapter.clone(),
    };
    let result = match cli.command {
        None => open(&options).and_then(|ctx| {
            let code = verify(&ctx, false, false)?;
            println!();
            bench(&ctx, &[], false, true)?;
            Ok(code)
        }),
        Some(Command::Info { json }) => open(&options).and_then(|ctx| info(&ctx, json)),
        Some(Command::Verify { json, quick }) => {
            open(&options).and_then(|ctx| verify(&ctx, json, quick))
        }
        Some(Command::Bench {
            kernels,
            json,
            quick,
        }) => open(&options).and_then(|ctx| bench(&ctx, &kernels, json, quick)),
        Some(Command::Run(args)) => run(&options, args),
        Some(Command::Generate(args)) => generate::run(&options, args),
    };
    match result {
        Ok(code) => code,
        Err(CliError::Usage(msg)) => {
            eprintln!("seqk: {msg}");
            2
        }
        Err(CliError::Failure(msg)) => {
            eprintln!("seqk: {msg}");
            1
        }
    }
}

fn open(options: &ContextOptions) -> Result<Context, CliError> {
    Context::with_options(options).map_err(|e| CliError::Failure(e.to_string()))
}

fn info(ctx: &Context, json: bool) -> Result<i32, CliError> {
    let i = ctx.adapter_info();
    let l = ctx.limits();
    let named = [
        ("SHADER_F16", wgpu::Features::SHADER_F16),
        ("SUBGROUP", wgpu::Features::SUBGROUP),
        ("TIMESTAMP_QUERY", wgpu::Features::TIMESTAMP_QUERY),
        (
            "TIMESTAMP_QUERY_INSIDE_ENCODERS",
            wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS,
        ),
        (
            "TIMESTAMP_QUERY_INSIDE_PASSES",
            wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES,
        ),
    ];
    let features: Vec<String> = named
        .iter()
        .filter(|(_, f)| ctx.features().contains(*f))
        .map(|(n, _)| n.to_string())
        .collect();
    let limits = [
        (
            "max_storage_buffer_binding_size",
            l.max_storage_buffer_binding_size,
        ),
        ("max_buffer_size", l.max_buffer_size),
        (
            "max_storage_buffers_per_shader_stage",
            l.max_storage_buffers_per_shader_stage as u64,
        ),
        (
            "max_compute_workgroups_per_dimension",
            l.max_compute_workgroups_per_dimension as u64,
        ),
        (
            "max_compute_invocations_per_workgroup",
            l.max_compute_invocations_per_workgroup as u64,
        ),
        (
            "max_compute_workgroup_storage_size",
            l.max_compute_workgroup_storage_size as u64,
        ),
        (
            "min_storage_buffer_offset_alignment",
            l.min_storage_buffer_offset_alignment as u64,
        ),
    ];
    // The adapter reports subgroup sizes even without SUBGROUP (GL); they mean nothing there.
    let subgroups = ctx
        .features()
        .contains(wgpu::Features::SUBGROUP)
        .then_some((i.subgroup_min_size, i.subgroup_max_size));
    // Every adapter of every backend, whatever chose this one: what --backend and --adapter
    // can pick from.
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    desc.backends = wgpu::Backends::all();
    let instance = wgpu::Instance::new(desc);
    let adapters: Vec<String> =
        pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()))
            .iter()
            .map(|a| crate::context::adapter_label(&a.get_info()))
            .collect();
    if json {
        let v = serde_json::json!({
            "adapter": i.name, "backend": format!("{:?}", i.backend), "driver": i.driver,
            "driver_info": i.driver_info, "device_type": format!("{:?}", i.device_type),
            "subgroup_min_size": subgroups.map(|s| s.0),
            "subgroup_max_size": subgroups.map(|s| s.1),
            "features": features,
            "limits": limits.iter().map(|(k, v)| (k.to_string(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>(),
            "adapters": adapters,
        });
        println!("{v:#}");
    } else {
        println!("adapter   {} ({:?})", i.name, i.device_type);
        println!("backend   {:?}", i.backend);
        println!("driver    {}", report::driver(i));
        match subgroups {
            Some((lo, hi)) => println!("subgroups {lo}..{hi} lanes"),
            None => println!("subgroups not available (no SUBGROUP feature)"),
        }
        println!(
            "features  {}",
            if features.is_empty() {
                "none of the optional ones".into()
            } else {
                features.join(", ")
            }
        );
        for (k, v) in limits {
            println!("  {k:<40} {v}");
        }
        println!("adapters  (every backend; pick with --backend and --adapter)");
        for a in adapters {
            println!("  {a}");
        }
    }
    Ok(0)
}

fn verify(ctx: &Context, json: bool, quick: bool) -> Result<i32, CliError> {
    let mut checks = Vec::new();
    // The cases are the CLI's own: any error is the device's (exit 1), not bad input.
    for f in FAMILIES {
        checks.extend((f.verify)(ctx, quick).map_err(failure)?);
    }
    report::print_checks(ctx, &checks, json);
    Ok(if checks.iter().all(|c| c.passed()) {
        0
    } else {
        1
    })
}

fn bench(ctx: &Context, kernels: &[String], json: bool, quick: bool) -> Result<i32, CliError> {
    for k in kernels {
        // copy names the baseline, which every bench runs first.
        if k != "copy" && !FAMILIES.iter().any(|f| f.name == k) {
            return Err(usage(format!(
                "bench: unknown kernel {k:?}; known: copy, {}",
                names()
            )));
        }
    }
    let mut out = report::BenchPrinter::new(ctx, json);
    eprintln!("seqk bench: copy baseline");
    let baseline = match report::copy_baseline(ctx, quick) {
        Ok(b) => b,
        Err(e) => {
            out.finish(Some(&format!("copy: {e}")));
            return Err(failure(e));
        }
    };
    out.rows(&[baseline.row()]);
    for f in FAMILIES
        .iter()
        .filter(|f| kernels.is_empty() || kernels.iter().any(|k| k == f.name))
    {
        eprintln!("seqk bench: {}", f.name);
        match (f.bench)(ctx, quick, &baseline) {
            Ok(rows) => out.rows(&rows),
            Err(e) => {
                // The rows measured so far are printed (JSON: with the error) before failing.
                out.finish(Some(&format!("{}: {e}", f.name)));
                return Err(failure(e));
            }
        }
    }
    out.finish(None);
    Ok(0)
}

fn names() -> String {
    FAMILIES
        .iter()
        .map(|f| f.name)
        .collect::<Vec<_>>()
        .join(", ")
}

fn run(options: &ContextOptions, args: RunArgs) -> Result<i32, CliError> {
    let mut io = RunIo::parse(&args, options)?;
    match args.kernel.as_str() {
        "softmax" => softmax::run(&mut io)?,
        "rope" => rope::run(&mut io)?,
        "gibbs" => gibbs::run(&mut io)?,
        "sample" => gibbs::run_sample(&mut io)?,
        "attention" => attention::run(&mut io)?,
        "flash" => flash::run(&mut io)?,
        k => {
            return Err(usage(format!(
                "run: unknown kernel {k:?}; known: {}",
                names()
            )))
        }
    }
    io.finish()?;
    Ok(0)
}

/// Why a float option's text does not fit its type, where it would parse as inf or 0 and then
/// be refused (or used) as if inf or 0 had been typed: `temperature=1e-50` would sample
/// greedily.
fn outside_float_range<T: 'static>(text: &str) -> Option<String> {
    let (name, inf, zero) = if TypeId::of::<T>() == TypeId::of::<f32>() {
        let x = text.parse::<f32>().ok()?;
        ("float32", x.is_infinite(), x == 0.0)
    } else if TypeId::of::<T>() == TypeId::of::<f64>() {
        let x = text.parse::<f64>().ok()?;
        ("float64", x.is_infinite(), x == 0.0)
    } else {
        return None;
    };
    let unsigned = text.trim_start_matches(['+', '-']).to_ascii_lowercase();
    let typed_inf = unsigned == "inf" || unsigned == "infinity";
    let mantissa = unsigned.split('e').next().unwrap_or_default();
    let typed_zero = !mantissa.chars().any(|c| ('1'..='9').contains(&c));
    if inf && !typed_inf {
        Some(format!("beyond {name}'s range"))
    } else if zero && !typed_zero {
        Some(format!("too small for {name} (it would be 0)"))
    } else {
        None
    }
}

/// A float32 command-line value, refused where its text would round to inf or 0 (clap's
/// `value_parser` for float flags: `--t0 1e-50` would otherwise run greedily).
pub fn f32_arg(text: &str) -> Result<f32, String> {
    let x = text.parse::<f32>().map_err(|e| format!("{text:?}: {e}"))?;
    match outside_float_range::<f32>(text) {
        Some(why) => Err(format!("{text} is {why}")),
        None => Ok(x),
    }
}

/// Inputs, options and outputs of `seqk run`, with checks that every given name was used.
pub struct RunIo {
    inputs: BTreeMap<String, Array>,
    /// Every --in name, in the order given (`inputs` loses each as the kernel takes it).
    given: Vec<String>,
    /// Input names the handler asked for.
    asked_inputs: Vec<String>,
    sets: BTreeMap<String, String>,
    used_sets: Vec<String>,
    out: PathBuf,
    out2: BTreeMap<String, PathBuf>,
    offered_out2: Vec<String>,
    /// Run the CPU reference instead of the GPU.
    pub cpu: bool,
    options: ContextOptions,
}

impl RunIo {
    fn parse(args: &RunArgs, options: &ContextOptions) -> Result<Self, CliError> {
        let pair = |s: &String, what: &str| -> Result<(String, String), CliError> {
            s.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.to_string()))
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| usage(format!("{what} expects NAME=VALUE, got {s:?}")))
        };
        // NAME=VALUE pairs by name; a name given twice is an error, not "the last one wins".
        let pairs = |list: &[String], what: &str| -> Result<Vec<(String, String)>, CliError> {
            let mut out: Vec<(String, String)> = Vec::new();
            for s in list {
                let (k, v) = pair(s, what)?;
                if out.iter().any(|(seen, _)| *seen == k) {
                    return Err(usage(format!("{what} {k}=... is given more than once")));
                }
                out.push((k, v));
            }
            Ok(out)
        };
        let mut inputs = BTreeMap::new();
        let mut given = Vec::new();
        for (name, file) in pairs(&args.inputs, "--in")? {
            given.push(name.clone());
            let array = npy::read(&PathBuf::from(&file))
                .map_err(|e| usage(format!("input {name}: {e}")))?;
            inputs.insert(name, array);
        }
        let sets = pairs(&args.sets, "--set")?.into_iter().collect();
        let out2 = pairs(&args.out2, "--out2")?
            .into_iter()
            .map(|(k, v)| (k, PathBuf::from(v)))
            .collect();
        Ok(Self {
            inputs,
            given,
            asked_inputs: Vec::new(),
            sets,
            used_sets: Vec::new(),
            out: args.out.clone(),
            out2,
            offered_out2: Vec::new(),
            cpu: args.cpu,
            options: options.clone(),
        })
    }

    /// Takes an input by name; `None` if it was not given. No input may be empty or 0-d:
    /// either is an error naming the input and its `expected` shape and dtype.
    pub fn input(&mut self, name: &str, expected: &str) -> Result<Option<Array>, CliError> {
        self.asked_inputs.push(name.to_string());
        let Some(array) = self.inputs.remove(name) else {
            return Ok(None);
        };
        if array.shape.is_empty() {
            return Err(usage(format!(
                "input {name} is a 0-d array (a scalar); expected {expected}"
            )));
        }
        if array.shape.contains(&0) {
            return Err(usage(format!(
                "input {name} has shape {:?}, which holds no elements; expected {expected} \
                 with every axis at least 1",
                array.shape
            )));
        }
        Ok(Some(array))
    }

    /// Takes a required input.
    pub fn required(&mut self, name: &str, expected: &str) -> Result<Array, CliError> {
        // Name what was given, so a misspelt name shows up beside the missing one.
        let others = if self.given.is_empty() {
            String::new()
        } else {
            format!(" (inputs given: {})", self.given.join(", "))
        };
        self.input(name, expected)?.ok_or_else(|| {
            usage(format!(
                "missing input {name} (expected {expected}); give --in {name}=FILE.npy{others}"
            ))
        })
    }

    /// An option's value, or `default` when not set.
    pub fn set<T: FromStr + 'static>(&mut self, key: &str, default: T) -> Result<T, CliError> {
        Ok(self.set_opt(key)?.unwrap_or(default))
    }

    /// An option's value, if set. An empty value (`--set lin_scale=`, as the option tables
    /// write an option without a default) is the same as leaving the option out. A boolean
    /// is `true` or `false`, also written `True`/`False` (Python's `str`) or `1`/`0`.
    pub fn set_opt<T: FromStr + 'static>(&mut self, key: &str) -> Result<Option<T>, CliError> {
        self.used_sets.push(key.to_string());
        let is_bool = TypeId::of::<T>() == TypeId::of::<bool>();
        match self.sets.get(key) {
            None => Ok(None),
            Some(v) if v.trim().is_empty() => Ok(None),
            Some(v) => {
                let text = match v.trim() {
                    "True" | "1" if is_bool => "true",
                    "False" | "0" if is_bool => "false",
                    t => t,
                };
                if let Some(why) = outside_float_range::<T>(text) {
                    return Err(usage(format!("--set {key}={v}: {why}")));
                }
                text.parse().map(Some).map_err(|_| {
                    usage(if is_bool {
                        format!("--set {key}={v}: expected true or false (or True/False, 1/0)")
                    } else {
                        format!(
                            "--set {key}={v}: cannot parse {v:?} as {}",
                            std::any::type_name::<T>()
                        )
                    })
                })
            }
        }
    }

    /// The GPU context (opened on first use; `--cpu` never needs one).
    pub fn context(&self) -> Result<Context, CliError> {
        open(&self.options)
    }

    /// Writes the main output.
    pub fn write_out(&self, array: &Array) -> Result<(), CliError> {
        npy::write(&self.out, array)
            .map_err(|e| CliError::Failure(format!("writing {}: {e}", self.out.display())))
    }

    /// Whether a secondary output was asked for. Handlers ask about every secondary output
    /// they offer before `check_unused`, which refuses the names nobody asked about.
    pub fn wants_out2(&mut self, name: &str) -> bool {
        self.offered_out2.push(name.to_string());
        self.out2.contains_key(name)
    }

    /// Writes a secondary output if it was asked for.
    pub fn write_out2(&mut self, name: &str, array: &Array) -> Result<(), CliError> {
        if let Some(path) = self.out2.remove(name) {
            npy::write(&path, array)
                .map_err(|e| CliError::Failure(format!("writing {}: {e}", path.display())))?;
        }
        Ok(())
    }

    /// Fails on inputs, options or secondary outputs the kernel did not take (likely typos),
    /// and on output files that cannot be written (so that a bad path fails before any
    /// computing, and before another output is written). Handlers call it after reading their
    /// inputs and options and asking about their secondary outputs, before computing or
    /// writing anything.
    pub fn check_unused(&self) -> Result<(), CliError> {
        self.check_names()?;
        let out2 = self.out2.iter().map(|(k, p)| (format!("--out2 {k}="), p));
        let outputs: Vec<(String, &PathBuf)> = std::iter::once(("--out ".to_string(), &self.out))
            .chain(out2)
            .collect();
        let files: Vec<Option<PathBuf>> = outputs
            .iter()
            .map(|(_, p)| npy::written_file(p).ok())
            .collect();
        for (i, (what, path)) in outputs.iter().enumerate() {
            // Two outputs into one file (however spelled): the second would silently replace
            // the first.
            let same = |j: usize| files[j].is_some() && files[j] == files[i];
            if let Some((other, other_path)) = (0..i).find(|&j| same(j)).map(|j| &outputs[j]) {
                return Err(usage(format!(
                    "{what}{} is the file of {other}{}: give each output its own file",
                    path.display(),
                    other_path.display()
                )));
            }
            npy::check_writable(path)
                .map_err(|e| usage(format!("{what}{}: cannot write: {e}", path.display())))?;
        }
        Ok(())
    }

    fn check_names(&self) -> Result<(), CliError> {
        // The names the handler asked for, to list beside an unknown one.
        let known = |names: &[String]| {
            let mut names: Vec<&str> = names.iter().map(String::as_str).collect();
            names.sort_unstable();
            names.dedup();
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        };
        if let Some(name) = self.inputs.keys().next() {
            return Err(usage(format!(
                "unknown input {name:?} for this kernel (its inputs: {})",
                known(&self.asked_inputs)
            )));
        }
        if let Some(key) = self.sets.keys().find(|k| !self.used_sets.contains(k)) {
            return Err(usage(format!(
                "unknown option --set {key}=... for this kernel (its options: {})",
                known(&self.used_sets)
            )));
        }
        if let Some(name) = self.out2.keys().find(|k| !self.offered_out2.contains(k)) {
            return Err(usage(format!(
                "unknown secondary output {name:?} for this kernel (its secondary outputs: {})",
                known(&self.offered_out2)
            )));
        }
        Ok(())
    }

    fn finish(&self) -> Result<(), CliError> {
        self.check_names()?;
        // A secondary output asked for and offered but never written is a handler's bug.
        if let Some(name) = self.out2.keys().next() {
            return Err(CliError::Failure(format!(
                "secondary output {name:?} was not written"
            )));
        }
        Ok(())
    }
}
