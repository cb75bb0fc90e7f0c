//! `seqk generate`: text generation as search. A smoothed word-bigram language model, estimated
//! from a corpus, becomes the Gibbs kernel's chain energy (`ChainModel`): the pairwise
//! potential is W[a, b] = log P(b | a), the first site's unary holds log P(v | <s>) and the last
//! site's log P(</s> | v), so a chain's score is the sentence's log-probability. Template words
//! are clamped sites; many chains anneal from T0 to T1, and each chain's best state over the run
//! is printed, the distinct ones best first.
//!
//! Smoothing is interpolated absolute discounting with an add-one unigram:
//! `P(b | a) = max(c(a, b) - D, 0) / c(a) + D N1+(a .) / c(a) P1(b)`,
//! `P1(b) = (c(b) + 1) / (N + V + 1)` over the V words and `</s>`, where c(a) counts the tokens
//! that follow a, N1+(a .) the distinct ones and N the tokens (`</s>` included).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;

use super::{open, usage, CliError};
use crate::kernels::gibbs::{temperature_ok, MAX_TEMPERATURE};
use crate::reference::gibbs::{self as reference, HostModel, HostPairwise};
use crate::reference::random_values;
use crate::{ChainModel, Context, ContextOptions, Gibbs, GibbsOptions, GpuTensor, Pairwise};

/// The default corpus, written for this crate: short sentences about a river town.
pub const DEFAULT_CORPUS: &str = include_str!("../../data/corpus.txt");

/// Largest vocabulary of a corpus (the dense W [V, V] is 64 MiB at this size).
pub const MAX_WORDS: usize = 4096;

/// The template's blank.
pub const BLANK: &str = "___";

#[derive(clap::Args)]
// `--t0 -1` is a (bad) temperature, not an unknown flag.
#[command(allow_negative_numbers = true)]
pub struct GenerateArgs {
    /// Words separated by spaces; each ___ is a blank to fill (it may touch punctuation:
    /// "___.").
    #[arg(long, default_value = "the ___ ___ river ___ ___ .")]
    template: String,
    /// A plain-text corpus to estimate the bigram model from (default: the built-in one).
    #[arg(long, value_name = "FILE")]
    corpus: Option<PathBuf>,
    /// Parallel chains, each from a random start.
    #[arg(long, default_value_t = 256)]
    chains: usize,
    /// Gibbs sweeps (each updates every blank once).
    #[arg(long, default_value_t = 200)]
    sweeps: u32,
    /// Temperature of the first sweep.
    #[arg(long, default_value_t = 2.0, value_parser = super::f32_arg)]
    t0: f32,
    /// Temperature of the last sweep (geometric annealing; equal to --t0 for a constant T,
    /// and both 0 for iterated conditional modes). With --sweeps 1 the one sweep runs at --t0.
    #[arg(long, default_value_t = 0.05, value_parser = super::f32_arg)]
    t1: f32,
    /// Seed of the random starts and of the Philox stream.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// How many sentences to print: the distinct chain bests, best first (at most --chains).
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Absolute discount D of the bigram counts, in (0, 1).
    #[arg(long, default_value_t = 0.75)]
    discount: f64,
    /// Sweeps per GPU submission (the progress bar advances per batch); the results do not
    /// depend on it.
    #[arg(long, default_value_t = 25)]
    batch: u32,
    /// Run the CPU reference sampler (the same random stream) instead of the GPU.
    #[arg(long)]
    cpu: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Splits text into sentences of tokens: lower-case words (letters, digits, apostrophes inside
/// a word; quotes around it are dropped, so a plural possessive "boys'" reads "boys"), `,`
/// (also for `;` `:` and CJK `，` `；` `：` `、`) and `.` (also for `!` `?` `。` `！` `？`), which
/// ends a sentence.
pub fn tokenize(text: &str) -> Vec<Vec<String>> {
    let mut sentences = Vec::new();
    let mut sentence: Vec<String> = Vec::new();
    let mut word = String::new();
    for ch in text.chars() {
        if ch.is_alphanumeric() || ch == '\'' {
            word.extend(ch.to_lowercase());
            continue;
        }
        push_word(&mut sentence, &mut word);
        match ch {
            ',' | ';' | ':' | '，' | '；' | '：' | '、' => sentence.push(",".into()),
            '.' | '!' | '?' | '。' | '！' | '？' => {
                sentence.push(".".into());
                sentences.push(std::mem::take(&mut sentence));
            }
            _ => {}
        }
    }
    push_word(&mut sentence, &mut word);
    if !sentence.is_empty() {
        sentences.push(sentence);
    }
    sentences
}

/// Ends `word`: apostrophes inside it stay ("rain's"), quotes around it go ('river').
fn push_word(sentence: &mut Vec<String>, word: &mut String) {
    let w = word.trim_matches('\'');
    if !w.is_empty() {
        sentence.push(w.to_string());
    }
    word.clear();
}

/// A word-bigram model with interpolated absolute discounting (see the module docs). Word ids
/// are 0..V; `BOS` contexts and `EOS` outcomes are the index V.
#[derive(Clone, Debug)]
pub struct Bigram {
    words: Vec<String>,
    index: HashMap<String, u32>,
    /// c(a, b) for contexts a in 0..=V (V = <s>) and outcomes b in 0..=V (V = </s>).
    pairs: HashMap<(u32, u32), u32>,
    /// c(a): tokens following a.
    context: Vec<u64>,
    /// N1+(a .): distinct tokens following a.
    types: Vec<u64>,
    /// c(b) as an outcome.
    unigram: Vec<u64>,
    tokens: u64,
    discount: f64,
}

impl Bigram {
    /// Estimates the model from text.
    pub fn from_text(text: &str, discount: f64) -> Result<Self, String> {
        if !(discount > 0.0 && discount < 1.0) {
            return Err(format!("the discount must be in (0, 1), got {discount}"));
        }
        let sentences = tokenize(text);
        let mut words: Vec<String> = Vec::new();
        let mut index: HashMap<String, u32> = HashMap::new();
        for w in sentences.iter().flatten() {
            if !index.contains_key(w) {
                index.insert(w.clone(), words.len() as u32);
                words.push(w.clone());
            }
        }
        let v = words.len();
        if v == 0 {
            return Err("the corpus has no words".into());
        }
        if v > MAX_WORDS {
            return Err(format!(
                "the corpus has {v} distinct words; at most {MAX_WORDS} are supported"
            ));
        }
        let (bos, eos) = (v as u32, v as u32);
        let mut pairs: HashMap<(u32, u32), u32> = HashMap::new();
        for s in &sentences {
            let ids: Vec<u32> = s.iter().map(|w| index[w]).collect();
            let mut prev = bos;
            for &t in ids.iter().chain(std::iter::once(&eos)) {
                *pairs.entry((prev, t)).or_default() += 1;
                prev = t;
            }
        }
        let mut context = vec![0u64; v + 1];
        let mut types = vec![0u64; v + 1];
        let mut unigram = vec![0u64; v + 1];
        for (&(a, b), &c) in &pairs {
            context[a as usize] += c as u64;
            types[a as usize] += 1;
            unigram[b as usize] += c as u64;
        }
        let tokens = unigram.iter().sum();
        Ok(Self {
            words,
            index,
            pairs,
            context,
            types,
            unigram,
            tokens,
            discount,
        })
    }

    /// Number of words V (without <s> and </s>).
    pub fn vocab(&self) -> usize {
        self.words.len()
    }

    /// Tokens of the corpus, </s> included.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// The id of a word.
    pub fn id(&self, word: &str) -> Option<u32> {
        self.index.get(word).copied()
    }

    /// The word of an id.
    pub fn word(&self, id: u32) -> &str {
        &self.words[id as usize]
    }

    /// The smoothed unigram P1(b), b in 0..=V (V = </s>).
    pub fn unigram_prob(&self, b: usize) -> f64 {
        (self.unigram[b] as f64 + 1.0) / (self.tokens as f64 + self.vocab() as f64 + 1.0)
    }

    /// P(b | a) with a in 0..=V (V = <s>) and b in 0..=V (V = </s>).
    pub fn prob(&self, a: usize, b: usize) -> f64 {
        let ca = self.context[a] as f64;
        if ca == 0.0 {
            return self.unigram_prob(b);
        }
        let cab = self.pairs.get(&(a as u32, b as u32)).copied().unwrap_or(0) as f64;
        let lambda = self.discount * self.types[a] as f64 / ca;
        (cab - self.discount).max(0.0) / ca + lambda * self.unigram_prob(b)
    }

    /// log P(b | a) (same index conventions as [`Bigram::prob`]).
    pub fn log_prob(&self, a: usize, b: usize) -> f64 {
        self.prob(a, b).ln()
    }

    /// log P(<s> x_0 .. x_{L-1} </s>).
    pub fn sentence_log_prob(&self, ids: &[u32]) -> f64 {
        let v = self.vocab();
        let mut prev = v;
        let mut total = 0.0;
        for &t in ids {
            total += self.log_prob(prev, t as usize);
            prev = t as usize;
        }
        total + self.log_prob(prev, v)
    }

    /// The chain model of a sentence of `len` tokens: u [len, V] and dense W [V, V].
    pub fn chain_model(&self, len: usize) -> HostModel {
        let v = self.vocab();
        let mut unary = vec![0.0f32; len * v];
        for x in 0..v {
            unary[x] = self.log_prob(v, x) as f32;
            unary[(len - 1) * v + x] += self.log_prob(x, v) as f32;
        }
        let mut w = vec![0.0f32; v * v];
        for a in 0..v {
            for b in 0..v {
                w[a * v + b] = self.log_prob(a, b) as f32;
            }
        }
        HostModel {
            unary,
            unary_shape: vec![len, v],
            pairwise: HostPairwise::Dense(w),
        }
    }
}

/// A parsed template: one entry per site, `Some(id)` for a fixed word, `None` for a blank.
pub fn parse_template(template: &str, model: &Bigram) -> Result<Vec<Option<u32>>, String> {
    let mut sites = Vec::new();
    // A blank may touch a word or punctuation ("___." or "the___river"): it is cut out first.
    let parts = template.split_whitespace().flat_map(|piece| {
        piece
            .split(BLANK)
            .enumerate()
            .map(move |(k, p)| (piece, k, p))
    });
    for (piece, k, part) in parts {
        if k > 0 {
            sites.push(None);
        }
        if part.is_empty() {
            continue;
        }
        let toks: Vec<String> = tokenize(part).into_iter().flatten().collect();
        if toks.is_empty() {
            return Err(format!(
                "template piece {piece:?} is neither words nor {BLANK} blanks ({part:?} is \
                 not a word)"
            ));
        }
        for t in toks {
            match model.id(&t) {
                Some(id) => sites.push(Some(id)),
                None => {
                    return Err(format!(
                        "template word {t:?} is not in the corpus vocabulary ({} words)",
                        model.vocab()
                    ))
                }
            }
        }
    }
    if sites.is_empty() {
        return Err(format!(
            "the template is empty; give words and {BLANK} blanks, e.g. \"the {BLANK} river .\""
        ));
    }
    Ok(sites)
}

/// `x` as the f64 of its shortest decimal (0.05, not f32's 0.05000000074505806), for JSON.
fn shortest(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(x as f64)
}

/// The options of the whole run (each batch runs a [`GibbsOptions::part`] of them).
pub fn run_options(t0: f32, t1: f32, seed: u64, sweeps: u32) -> GibbsOptions {
    GibbsOptions {
        sweeps,
        temperature: t0,
        anneal_to: (t0 != t1).then_some(t1),
        seed,
        first_sweep: 0,
        track_best: true,
        schedule: None,
    }
}

/// The GPU side of a run: the model, the chains and their best states, kept across batches.
struct GpuChains {
    ctx: Context,
    unary: GpuTensor<f32>,
    w: GpuTensor<f32>,
    clamp: GpuTensor<u8>,
    tokens: GpuTensor<u32>,
    best: GpuTensor<u32>,
    best_score: GpuTensor<f32>,
}

impl GpuChains {
    fn new(
        ctx: Context,
        m: &HostModel,
        init: &[u32],
        mask: &[bool],
        shape: [usize; 2],
    ) -> Result<Self, crate::Error> {
        let v = m.unary_shape[1];
        let HostPairwise::Dense(w) = &m.pairwise else {
            unreachable!("the bigram model is dense")
        };
        Ok(Self {
            unary: ctx.upload(&m.unary, m.unary_shape.clone())?,
            w: ctx.upload(w, [v, v])?,
            clamp: ctx.upload_mask(mask, [shape[1]])?,
            tokens: ctx.upload(init, shape)?,
            best: ctx.zeros::<u32>(shape)?,
            best_score: ctx.zeros::<f32>([shape[0]])?,
            ctx,
        })
    }

    /// Runs one batch; returns each chain's best state of the batch and its score.
    fn batch(&self, opts: &GibbsOptions) -> Result<(Vec<u32>, Vec<f64>), crate::Error> {
        let model = ChainModel {
            unary: &self.unary,
            pairwise: Pairwise::Dense(&self.w),
        };
        Gibbs::new(&self.ctx, opts)?
            .plan(
                &model,
                &self.tokens,
                Some(&self.clamp),
                Some((&self.best, &self.best_score)),
            )?
            .run(&self.ctx)?;
        let scores = self.best_score.download()?;
        Ok((
            self.best.download()?,
            scores.into_iter().map(f64::from).collect(),
        ))
    }
}

/// One generated sentence.
#[derive(Clone, Debug, PartialEq)]
pub struct Generated {
    /// Word ids.
    pub ids: Vec<u32>,
    /// log P under the bigram model (f64, recomputed on the host).
    pub score: f64,
}

fn progress(sweeps: u32, batch: u32) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() || sweeps <= batch {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(sweeps as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} sweep {pos}/{len} [{bar:40}] {elapsed_precise} (eta {eta})",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// What a run needs besides the model.
pub struct RunSpec {
    /// Template sites: fixed word or blank.
    pub sites: Vec<Option<u32>>,
    /// Chains.
    pub chains: usize,
    /// Sweeps.
    pub sweeps: u32,
    /// First and last temperature.
    pub t0: f32,
    /// Last temperature.
    pub t1: f32,
    /// Seed.
    pub seed: u64,
    /// Sweeps per batch.
    pub batch: u32,
}

/// Runs the chains (on the GPU, or the CPU reference when `ctx` is `None`) and returns each
/// chain's best state over the whole run (its initial state included), the distinct ones best
/// first. Batches only split the work: a chain keeps the first state that reached its best
/// score, whichever batch met it, so any `batch` gives the same result.
pub fn search(
    model: &Bigram,
    spec: &RunSpec,
    ctx: Option<Context>,
) -> Result<Vec<Generated>, CliError> {
    let l = spec.sites.len();
    let v = model.vocab();
    let b = spec.chains;
    let hm = model.chain_model(l);
    let mask: Vec<bool> = spec.sites.iter().map(|s| s.is_some()).collect();
    let starts = random_values(b * l, spec.seed, 0.0, v as f32);
    let init: Vec<u32> = (0..b * l)
        .map(|k| match spec.sites[k % l] {
            Some(id) => id,
            None => (starts[k] as u32).min(v as u32 - 1),
        })
        .collect();
    let bar = progress(spec.sweeps, spec.batch);
    let gpu = ctx
        .map(|c| GpuChains::new(c, &hm, &init, &mask, [b, l]))
        .transpose()?;
    let whole = run_options(spec.t0, spec.t1, spec.seed, spec.sweeps);
    // Each chain's best so far: state and score (f32 scores on the GPU, as it compares them).
    let mut best: Vec<(Vec<u32>, f64)> = init
        .chunks(l)
        .map(|s| (s.to_vec(), f64::NEG_INFINITY))
        .collect();
    let mut tokens = init;
    let mut start = 0;
    while start < spec.sweeps {
        let n = spec.batch.min(spec.sweeps - start);
        let opts = whole.part(start, n)?;
        let (states, scores) = match &gpu {
            Some(g) => g.batch(&opts)?,
            None => {
                let found =
                    reference::gibbs(&hm, &mut tokens, &[b, l], Some((&mask, &[l])), &opts)?;
                found.map(|f| (f.tokens, f.scores)).unwrap_or_default()
            }
        };
        for (c, (state, &score)) in states.chunks(l).zip(&scores).enumerate() {
            if score > best[c].1 {
                best[c] = (state.to_vec(), score);
            }
        }
        start += n;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    let mut seen: HashMap<Vec<u32>, f64> = HashMap::new();
    for (ids, _) in best {
        let score = model.sentence_log_prob(&ids);
        seen.insert(ids, score);
    }
    let mut out: Vec<Generated> = seen
        .into_iter()
        .map(|(ids, score)| Generated { ids, score })
        .collect();
    out.sort_by(|x, y| y.score.total_cmp(&x.score).then_with(|| x.ids.cmp(&y.ids)));
    Ok(out)
}

/// `seqk generate ...`
pub fn run(options: &ContextOptions, args: GenerateArgs) -> Result<i32, CliError> {
    let text = match &args.corpus {
        None => DEFAULT_CORPUS.to_string(),
        Some(p) => std::fs::read_to_string(p)
            .map_err(|e| usage(format!("generate: reading corpus {}: {e}", p.display())))?,
    };
    let fail = |m: String| usage(format!("generate: {m}"));
    if args.chains == 0 || args.chains > 1 << 20 {
        return Err(fail(format!(
            "--chains must be in 1..={}, got {}",
            1 << 20,
            args.chains
        )));
    }
    if args.top == 0 {
        return Err(fail("--top must be at least 1".into()));
    }
    if args.batch == 0 {
        return Err(fail("--batch must be at least 1".into()));
    }
    let (t0, t1) = (args.t0, args.t1);
    if !(temperature_ok(t0) && temperature_ok(t1)) || (t0 != t1 && (t0 == 0.0 || t1 == 0.0)) {
        return Err(fail(format!(
            "temperatures must be 0 or in [{:e}, {MAX_TEMPERATURE:e}], and > 0 when annealing \
             (--t0 {t0} --t1 {t1}); --t0 0 --t1 0 runs iterated conditional modes",
            f32::MIN_POSITIVE
        )));
    }
    let model = Bigram::from_text(&text, args.discount).map_err(fail)?;
    let sites = parse_template(&args.template, &model).map_err(fail)?;
    let spec = RunSpec {
        sites,
        chains: args.chains,
        sweeps: args.sweeps,
        t0,
        t1,
        seed: args.seed,
        batch: args.batch,
    };
    let ctx = if args.cpu { None } else { Some(open(options)?) };
    let device = match &ctx {
        None => "CPU reference".to_string(),
        Some(c) => format!("{} ({:?})", c.adapter_info().name, c.adapter_info().backend),
    };
    let found = search(&model, &spec, ctx)?;
    let top: Vec<&Generated> = found.iter().take(args.top).collect();
    let text_of = |g: &Generated| {
        g.ids
            .iter()
            .map(|&t| model.word(t))
            .collect::<Vec<_>>()
            .join(" ")
    };
    if args.json {
        let v = serde_json::json!({
            "template": args.template,
            "corpus_tokens": model.tokens(),
            "vocab": model.vocab(),
            "chains": spec.chains,
            "sweeps": spec.sweeps,
            "t0": shortest(t0),
            "t1": shortest(t1),
            "seed": spec.seed,
            "device": device,
            "distinct_bests": found.len(),
            "results": top.iter().map(|g| serde_json::json!({
                "text": text_of(g),
                "score": g.score,
            })).collect::<Vec<_>>(),
        });
        println!("{v:#}");
    } else {
        println!(
            "# {:?}: {} chains x {} sweeps, T {t0} -> {t1}, seed {}, {device}; corpus {} tokens, \
             {} words; {} distinct chain bests",
            args.template,
            spec.chains,
            spec.sweeps,
            spec.seed,
            model.tokens(),
            model.vocab(),
            found.len()
        );
        for g in top {
            println!("{:>9.3}  {}", g.score, text_of(g));
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_splits_words_and_punctuation() {
        let s = tokenize("The Boat, slowly; drifts! Rain's here\nno end");
        assert_eq!(
            s,
            vec![
                vec!["the", "boat", ",", "slowly", ",", "drifts", "."],
                vec!["rain's", "here", "no", "end"],
            ]
        );
        // Quotes around a word are not part of it; CJK punctuation counts as its ASCII kin.
        let s = tokenize("'the river' said '' he。河、水");
        assert_eq!(
            s,
            vec![
                vec!["the", "river", "said", "he", "."],
                vec!["河", ",", "水"],
            ]
        );
    }

    #[test]
    fn probabilities_sum_to_one_per_context() {
        for (text, d) in [
            (DEFAULT_CORPUS, 0.75),
            ("a b a. b b c, a. c", 0.5),
            ("one", 0.1),
        ] {
            let m = Bigram::from_text(text, d).unwrap();
            let v = m.vocab();
            for a in 0..=v {
                let total: f64 = (0..=v).map(|b| m.prob(a, b)).sum();
                assert!((total - 1.0).abs() < 1e-12, "context {a}: sum {total}");
                assert!((0..=v).all(|b| m.prob(a, b) > 0.0));
            }
            let uni: f64 = (0..=v).map(|b| m.unigram_prob(b)).sum();
            assert!((uni - 1.0).abs() < 1e-12);
        }
    }

    #[test]
    fn discounting_matches_hand_counts() {
        // Sentences: <s> a b . </s> and <s> a a . </s>; words a=0, b=1, .=2; V = 3.
        let m = Bigram::from_text("a b. a a.", 0.5).unwrap();
        let (a, b, eos) = (0, 1, 3);
        // a is followed by b, a and .: c(a) = 3, N1+(a .) = 3. Outcomes a:3 b:1 .:2 </s>:2,
        // N = 8, so P1(b) = (1 + 1) / (8 + 3 + 1).
        let p1b = 2.0 / 12.0;
        let want = (1.0 - 0.5) / 3.0 + 0.5 * 3.0 / 3.0 * p1b;
        assert!((m.prob(a, b) - want).abs() < 1e-15);
        // </s> never follows a directly: only the interpolated unigram (c(</s>) = 2).
        assert!((m.prob(a, eos) - 0.5 * 3.0 / 3.0 * 3.0 / 12.0).abs() < 1e-15);
    }

    #[test]
    fn chain_score_is_the_sentence_log_prob() {
        let m = Bigram::from_text(DEFAULT_CORPUS, 0.75).unwrap();
        let ids: Vec<u32> = ["the", "old", "boat", "drifts", "down", "the", "river", "."]
            .iter()
            .map(|w| m.id(w).unwrap())
            .collect();
        let hm = m.chain_model(ids.len());
        let got = hm.score(0, &ids);
        let want = m.sentence_log_prob(&ids);
        assert!((got - want).abs() < 1e-4, "{got} vs {want}");
    }

    #[test]
    fn template_parsing() {
        let m = Bigram::from_text(DEFAULT_CORPUS, 0.75).unwrap();
        let t = parse_template("The ___ river.", &m).unwrap();
        assert_eq!(t.len(), 4);
        assert_eq!(t[1], None);
        assert_eq!(t[3], m.id("."));
        let e = parse_template("the ___ zeppelin", &m).unwrap_err();
        assert!(e.contains("\"zeppelin\""), "{e}");
        assert!(parse_template("  ", &m).is_err());
        assert!(parse_template("the - river", &m).is_err());
        // Blanks touching punctuation or words are blanks.
        let (the, river, dot) = (m.id("the"), m.id("river"), m.id("."));
        let comma = m.id(",");
        assert_eq!(
            parse_template("the ___ river ___.", &m).unwrap(),
            [the, None, river, None, dot]
        );
        assert_eq!(parse_template("___, ___", &m).unwrap(), [None, comma, None]);
        assert_eq!(
            parse_template("the___river___", &m).unwrap(),
            [the, None, river, None]
        );
        // An underscore left over from a run of four is not a word.
        let e = parse_template("the ____ river", &m).unwrap_err();
        assert!(e.contains("\"_\""), "{e}");
    }
}
