//! `seqk generate`: template words stay in place, scores are sorted, distinct and equal to the
//! bigram log-probability recomputed here independently, the annealed chains find the exact
//! maximum of a small model (checked by enumeration), GPU and --cpu agree, bad input exits 2.
#![cfg(feature = "cli")]

mod common;

use std::collections::HashMap;
use std::process::{Command, Output};

fn seqk(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_seqk"))
        .args(args)
        .output()
        .expect("seqk did not start")
}

fn error_lines(o: &Output) -> Vec<String> {
    String::from_utf8_lossy(&o.stderr)
        .lines()
        .filter(|l| l.starts_with("seqk:"))
        .map(String::from)
        .collect()
}

/// (text, score) pairs of a `--json` run.
fn results(args: &[&str]) -> Vec<(String, f64)> {
    let mut all = vec!["generate", "--json"];
    all.extend(args);
    let o = seqk(&all);
    assert!(
        o.status.success(),
        "seqk {all:?} failed: {:?}",
        error_lines(&o)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON output");
    v["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| {
            (
                r["text"].as_str().unwrap().to_string(),
                r["score"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// The model of the module docs of `src/cli/generate.rs`, written again from its formula:
/// interpolated absolute discounting with an add-one unigram over the words and </s>.
struct Model {
    pairs: HashMap<(String, String), f64>,
    context: HashMap<String, (f64, f64)>,
    unigram: HashMap<String, f64>,
    n: f64,
    v: f64,
    d: f64,
}

impl Model {
    /// Corpus text with words, `,` and `.` only; `.` ends a sentence.
    fn new(text: &str, d: f64) -> Self {
        let spaced = text
            .to_lowercase()
            .replace('.', " . \n")
            .replace(',', " , ");
        let mut pairs: HashMap<(String, String), f64> = HashMap::new();
        let mut words = std::collections::HashSet::new();
        for sentence in spaced.split('\n') {
            let toks: Vec<&str> = sentence.split_whitespace().collect();
            if toks.is_empty() {
                continue;
            }
            let mut prev = "<s>";
            for t in toks.iter().copied().chain(["</s>"]) {
                *pairs.entry((prev.into(), t.into())).or_default() += 1.0;
                if t != "</s>" {
                    words.insert(t.to_string());
                }
                prev = t;
            }
        }
        let mut context: HashMap<String, (f64, f64)> = HashMap::new();
        let mut unigram: HashMap<String, f64> = HashMap::new();
        for ((a, b), c) in &pairs {
            let e = context.entry(a.clone()).or_default();
            e.0 += c;
            e.1 += 1.0;
            *unigram.entry(b.clone()).or_default() += c;
        }
        let n = unigram.values().sum();
        Self {
            pairs,
            context,
            unigram,
            n,
            v: words.len() as f64,
            d,
        }
    }

    fn prob(&self, a: &str, b: &str) -> f64 {
        let p1 = (self.unigram.get(b).copied().unwrap_or(0.0) + 1.0) / (self.n + self.v + 1.0);
        let (ca, types) = self.context[a];
        let cab = self
            .pairs
            .get(&(a.to_string(), b.to_string()))
            .copied()
            .unwrap_or(0.0);
        (cab - self.d).max(0.0) / ca + self.d * types / ca * p1
    }

    fn log_prob(&self, sentence: &str) -> f64 {
        let mut prev = "<s>";
        let mut total = 0.0;
        for t in sentence.split_whitespace().chain(["</s>"]) {
            total += self.prob(prev, t).ln();
            prev = t;
        }
        total
    }
}

fn check_template(results: &[(String, f64)], template: &str) {
    let t: Vec<&str> = template.split_whitespace().collect();
    for (text, _) in results {
        let w: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(w.len(), t.len(), "{text:?} does not fit {template:?}");
        for (x, y) in w.iter().zip(&t) {
            assert!(
                *y == "___" || x == y,
                "{text:?} moved a word of {template:?}"
            );
        }
    }
    for pair in results.windows(2) {
        assert!(pair[0].1 >= pair[1].1, "scores not descending: {results:?}");
    }
    let mut texts: Vec<&String> = results.iter().map(|r| &r.0).collect();
    texts.sort();
    texts.dedup();
    assert_eq!(
        texts.len(),
        results.len(),
        "repeated sentences: {results:?}"
    );
}

const TEMPLATE: &str = "the ___ ___ river ___ ___ .";
/// Chains that end warm (T 2 -> 0.5) reach many distinct best states.
const SMALL: [&str; 10] = [
    "--template",
    TEMPLATE,
    "--chains",
    "32",
    "--sweeps",
    "30",
    "--batch",
    "7",
    "--t1",
    "0.5",
];

#[test]
fn default_corpus_keeps_template_and_scores_are_log_probs() {
    let Some(_) = common::gpu() else { return };
    let mut args = SMALL.to_vec();
    args.extend(["--seed", "5", "--top", "8"]);
    let gpu = results(&args);
    assert_eq!(gpu.len(), 8);
    check_template(&gpu, TEMPLATE);
    let model = Model::new(include_str!("../data/corpus.txt"), 0.75);
    for (text, score) in &gpu {
        let want = model.log_prob(text);
        assert!((score - want).abs() < 1e-9, "{text:?}: {score} vs {want}");
    }
    // The same Philox stream on the CPU: chains agree site by site except where f32 vs f64
    // energies flip a near-tie, which would change at most a chain or two; the best sentence,
    // found by many chains, is the same.
    args.push("--cpu");
    let cpu = results(&args);
    check_template(&cpu, TEMPLATE);
    assert_eq!(gpu[0], cpu[0], "GPU {gpu:?}\nCPU {cpu:?}");
}

/// `--batch` only splits the work: each chain's best state over the whole run is printed,
/// whichever batch met it, and the batches anneal along the one schedule. Warm chains
/// (T 3 -> 0.5) meet a new best state in many sweeps.
#[test]
fn batches_only_split_the_work() {
    let hot = [
        "--template",
        TEMPLATE,
        "--chains",
        "6",
        "--sweeps",
        "30",
        "--t0",
        "3",
        "--t1",
        "0.5",
        "--top",
        "10",
    ];
    let mut devices = vec![vec!["--cpu"]];
    if common::gpu().is_some() {
        devices.push(vec![]);
    }
    for device in devices {
        let run = |batch: &str| {
            let mut args = hot.to_vec();
            args.extend(["--batch", batch]);
            args.extend(&device);
            results(&args)
        };
        let whole = run("30");
        assert!(!whole.is_empty() && whole.len() <= 6, "{whole:?}");
        check_template(&whole, TEMPLATE);
        for batch in ["1", "7"] {
            assert_eq!(run(batch), whole, "--batch {batch} {device:?}");
        }
    }
}

#[test]
fn cpu_run_keeps_template_and_scores_are_log_probs() {
    // Needs no GPU.
    let mut args = SMALL.to_vec();
    args.extend(["--cpu", "--seed", "9", "--top", "5"]);
    let cpu = results(&args);
    assert_eq!(cpu.len(), 5);
    check_template(&cpu, TEMPLATE);
    let model = Model::new(include_str!("../data/corpus.txt"), 0.75);
    for (text, score) in &cpu {
        assert!((score - model.log_prob(text)).abs() < 1e-9, "{text:?}");
    }
}

#[test]
fn annealing_finds_the_exact_maximum_of_a_small_model() {
    let corpus = "A dog runs. A cat runs, a dog sleeps. The cat sleeps on a mat. \
                  The dog sees a cat. A cat sees the dog on the mat. The mat is red.";
    let path = std::env::temp_dir().join(format!("seqk-gen-corpus-{}.txt", std::process::id()));
    std::fs::write(&path, corpus).unwrap();
    let model = Model::new(corpus, 0.6);
    let words: Vec<String> = {
        let mut w: Vec<String> = model
            .unigram
            .keys()
            .filter(|w| *w != "</s>")
            .cloned()
            .collect();
        w.sort();
        w
    };
    let template = "___ cat ___ ___ .";
    // Exhaustive search over the 3 blanks.
    let mut all = Vec::new();
    for a in &words {
        for b in &words {
            for c in &words {
                let s = format!("{a} cat {b} {c} .");
                all.push((model.log_prob(&s), s));
            }
        }
    }
    let best = all.iter().map(|x| x.0).fold(f64::NEG_INFINITY, f64::max);
    // Every filling that ties the maximum (up to rounding).
    let argmax: Vec<&String> = all
        .iter()
        .filter(|x| x.0 >= best - 1e-12)
        .map(|x| &x.1)
        .collect();
    let p = path.to_str().unwrap();
    let common_args = [
        "--corpus",
        p,
        "--discount",
        "0.6",
        "--template",
        template,
        "--chains",
        "16",
        "--sweeps",
        "40",
        "--seed",
        "3",
    ];
    let mut runs = vec![("cpu", {
        let mut a = common_args.to_vec();
        a.push("--cpu");
        results(&a)
    })];
    if common::gpu().is_some() {
        runs.push(("gpu", results(&common_args)));
    }
    for (device, r) in runs {
        check_template(&r, template);
        assert!(argmax.contains(&&r[0].0), "{device}: {r:?} vs {argmax:?}");
        assert!((r[0].1 - best).abs() < 1e-9, "{device}: {r:?} vs {best}");
    }
    std::fs::remove_file(&path).ok();
}

#[test]
fn bad_input_exits_2_with_one_line() {
    let cases: [(&[&str], &str); 10] = [
        (
            &["--template", "the ___ zeppelin ___ ."],
            "template word \"zeppelin\"",
        ),
        (&["--template", "   "], "template is empty"),
        (&["--t0", "0", "--t1", "1"], "temperatures"),
        (&["--chains", "0"], "--chains"),
        (&["--corpus", "/nonexistent/corpus.txt"], "reading corpus"),
        (&["--discount", "1.5"], "discount"),
        // A negative value after a space is a value, not an unknown flag.
        (
            &["--t0", "-1"],
            "temperatures must be 0 or in [1.1754944e-38, 1e30]",
        ),
        (
            &["--t1", "-0.5"],
            "temperatures must be 0 or in [1.1754944e-38, 1e30]",
        ),
        (
            &["--t0", "2", "--t1", "1e31"],
            "temperatures must be 0 or in [1.1754944e-38, 1e30]",
        ),
        // Subnormal: a GPU may flush it to 0 (argmax) where the CPU samples.
        (
            &["--t0", "1e-40", "--t1", "1e-40"],
            "temperatures must be 0 or in [1.1754944e-38, 1e30]",
        ),
    ];
    // The JSON echoes the temperatures as given, not as f32 widened to f64.
    let o = seqk(&[
        "generate", "--cpu", "--json", "--sweeps", "1", "--chains", "2", "--t0", "0.3",
    ]);
    assert!(o.status.success(), "{:?}", error_lines(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON output");
    assert_eq!(
        (v["t0"].as_f64(), v["t1"].as_f64()),
        (Some(0.3), Some(0.05))
    );
    for (extra, expected) in cases {
        let mut args = vec!["generate", "--cpu", "--sweeps", "1"];
        args.extend(extra);
        let o = seqk(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let lines = error_lines(&o);
        assert_eq!(lines.len(), 1, "{args:?}: {lines:?}");
        assert!(lines[0].contains(expected), "{args:?}: {lines:?}");
        assert!(o.stdout.is_empty(), "{args:?} printed results");
    }
    // A temperature that float32 rounds to 0 is refused by the parser (clap's error), not
    // run as iterated conditional modes.
    let o = seqk(&["generate", "--cpu", "--t0", "1e-50", "--t1", "1e-50"]);
    assert_eq!(o.status.code(), Some(2));
    let msg = String::from_utf8_lossy(&o.stderr);
    assert!(msg.contains("too small for float32"), "{msg}");
    assert!(o.stdout.is_empty());
}
