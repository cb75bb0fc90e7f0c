//! The `seqk` binary: `run` against `--cpu` on .npy files, exit codes and one-line errors for
//! bad input, and `verify` / `info` as JSON.
#![cfg(feature = "cli")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{load_npy, save_npy_in_order as save};

fn seqk(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_seqk"))
        .args(args)
        .output()
        .expect("seqk did not start")
}

/// A scratch directory of this test alone.
fn dir(test: &str) -> PathBuf {
    common::scratch_dir(&format!("cli-{test}"))
}

fn load_f32(path: &Path) -> (Vec<u64>, Vec<f32>) {
    load_npy(path)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr)
        .lines()
        .filter(|l| l.starts_with("seqk:"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn run_softmax_matches_cpu_reference() {
    let Some(_) = common::gpu() else { return };
    let d = dir("run");
    let x = common::random(4 * 37, 11, -5.0, 5.0);
    let mask: Vec<bool> = common::random_mask(4 * 37, 12, 0.8);
    save(&d.join("x.npy"), &[4, 37], &x, npyz::Order::C);
    save(&d.join("m.npy"), &[4, 37], &mask, npyz::Order::C);
    let (xs, ms) = (
        format!("x={}", d.join("x.npy").display()),
        format!("mask={}", d.join("m.npy").display()),
    );
    let (gpu, cpu) = (d.join("gpu.npy"), d.join("cpu.npy"));
    let sets = [
        "--set",
        "temperature=0.8",
        "--set",
        "log=true",
        "--set",
        "causal=true",
    ];
    for (out, extra) in [(&gpu, None), (&cpu, Some("--cpu"))] {
        let mut args = vec![
            "run",
            "softmax",
            "--in",
            &xs,
            "--in",
            &ms,
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend(sets);
        args.extend(extra);
        let o = seqk(&args);
        assert!(o.status.success(), "seqk {args:?} failed: {}", stderr(&o));
    }
    let (shape_g, g) = load_f32(&gpu);
    let (shape_c, c) = load_f32(&cpu);
    assert_eq!(shape_g, vec![4, 37]);
    assert_eq!(shape_c, vec![4, 37]);
    let want: Vec<f64> = c.iter().map(|&v| v as f64).collect();
    // Log-softmax: 1e-6 of the row scale, plus the f32 rounding of the reference output that
    // --cpu writes.
    let err = seq_kernels::reference::row_error(&g, &want, 37);
    assert!(err <= 2e-6, "GPU vs --cpu: {err:e}");
    assert!(
        g.contains(&f32::NEG_INFINITY),
        "masked entries should be -inf"
    );
}

#[test]
fn bad_input_exits_2_with_one_line() {
    let d = dir("bad-input");
    save(&d.join("x.npy"), &[2, 3], &[1.0f32; 6], npyz::Order::C);
    save(
        &d.join("xf.npy"),
        &[2, 3],
        &[1.0f32; 6],
        npyz::Order::Fortran,
    );
    save(&d.join("xd.npy"), &[2, 3], &[1.0f64; 6], npyz::Order::C);
    save(&d.join("m.npy"), &[3, 2], &[true; 6], npyz::Order::C);
    save(&d.join("xi.npy"), &[2, 3], &[1i32; 6], npyz::Order::C);
    // x.npy less its last element.
    let bytes = std::fs::read(d.join("x.npy")).unwrap();
    std::fs::write(d.join("short.npy"), &bytes[..bytes.len() - 4]).unwrap();
    // Headers whose element count wraps u64 to 2 ((2^63 + 1) x 2), with 2 values; numpy's
    // quotes and double quotes (unchecked, a debug build panicked in npyz's header product).
    let wrapped = |dict: String, name: &str| {
        let mut header = dict.into_bytes();
        while !(10 + header.len() + 1).is_multiple_of(64) {
            header.push(b' ');
        }
        header.push(b'\n');
        let mut file = b"\x93NUMPY\x01\x00".to_vec();
        file.extend((header.len() as u16).to_le_bytes());
        file.extend(header);
        file.extend([1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()));
        std::fs::write(d.join(name), file).unwrap();
    };
    let big = (1u64 << 63) + 1;
    wrapped(
        format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({big}, 2), }}"),
        "wrapped.npy",
    );
    wrapped(
        format!("{{\"descr\": \"<f4\", \"fortran_order\": False, \"shape\": ({big}, 2)}}"),
        "wrapped2.npy",
    );
    let p = |f: &str| d.join(f).display().to_string();
    let out = p("out.npy");
    let input = |name: &str, file: &str| vec!["--in".to_string(), format!("{name}={}", p(file))];
    let set = |kv: &str| vec!["--set".to_string(), kv.to_string()];
    let cases: Vec<(Vec<String>, &str)> = vec![
        (input("x", "xf.npy"), "Fortran order"),
        (input("x", "xd.npy"), "dtype"),
        (
            input("x", "xi.npy"),
            "input x has dtype int32; expected [.., n] float32 or float16",
        ),
        (
            [input("x", "x.npy"), input("mask", "x.npy")].concat(),
            "input mask has dtype float32; expected (the shape of x) bool or uint8",
        ),
        (
            [input("x", "x.npy"), input("mask", "m.npy")].concat(),
            "input mask has shape",
        ),
        (
            [input("x", "x.npy"), set("temperature=0")].concat(),
            "temperature",
        ),
        (
            [input("x", "x.npy"), set("tempreature=2")].concat(),
            "unknown option",
        ),
        // The known names are listed beside an unknown one.
        (
            [input("x", "x.npy"), set("tempreature=2")].concat(),
            "(its options: causal, log, scale, softmax_plus, temperature)",
        ),
        (
            [input("x", "x.npy"), input("masc", "m.npy")].concat(),
            "unknown input \"masc\" for this kernel (its inputs: mask, x)",
        ),
        // A misspelt name shows beside the missing one.
        (input("y", "x.npy"), "missing input x"),
        (input("y", "x.npy"), "inputs given: y"),
        (
            [input("x", "short.npy"), set("temperature=0.5")].concat(),
            "ends before the 6 elements its header declares",
        ),
        (
            input("x", "wrapped.npy"),
            "shape [9223372036854775809, 2] has more elements than memory can address",
        ),
        (
            input("x", "wrapped2.npy"),
            "shape [9223372036854775809, 2] has more elements than memory can address",
        ),
    ];
    for (extra, expected) in cases {
        let mut args = vec!["run", "softmax", "--cpu", "--out", &out];
        args.extend(extra.iter().map(|s| s.as_str()));
        let o = seqk(&args);
        let msg = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {msg}");
        assert_eq!(msg.lines().count(), 1, "{args:?}: {msg}");
        assert!(
            msg.contains(expected),
            "{args:?}: {msg:?} should mention {expected:?}"
        );
    }
    // Inputs the kernel already took are listed too.
    assert_usage_error(
        &[
            "run",
            "gibbs",
            "--cpu",
            "--out",
            &out,
            "--in",
            &format!("unary={}", p("x.npy")),
        ],
        &["missing input init", "inputs given: unary"],
    );
    // A missing input names the input and its expected shape; an unknown kernel is named.
    for (kernel, expected) in [("flash", "missing input qq"), ("nope", "unknown kernel")] {
        let o = seqk(&["run", kernel, "--out", &out]);
        assert_eq!(o.status.code(), Some(2));
        assert!(stderr(&o).contains(expected), "{}", stderr(&o));
    }
}

#[test]
fn empty_set_value_is_the_default() {
    // The option tables write options without a default as `key=`; given so, it is unset.
    let d = dir("empty-set");
    save(
        &d.join("x.npy"),
        &[3, 5],
        &common::random(15, 21, -3.0, 3.0),
        npyz::Order::C,
    );
    let x = format!("x={}", d.join("x.npy").display());
    let (plain, empty) = (d.join("plain.npy"), d.join("empty.npy"));
    let softmax = |out: &Path, sets: &[&str]| {
        let mut args = vec![
            "run",
            "softmax",
            "--cpu",
            "--in",
            &x,
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend(sets);
        seqk(&args)
    };
    for (out, sets) in [
        (&plain, &[][..]),
        (&empty, &["--set", "temperature=", "--set", "log= "]),
    ] {
        let o = softmax(out, sets);
        assert!(o.status.success(), "seqk {sets:?} failed: {}", stderr(&o));
    }
    assert_eq!(load_f32(&plain), load_f32(&empty));
    // An empty value is not a licence for typos: the key must still be known.
    let o = softmax(&empty, &["--set", "tempreature="]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("unknown option"), "{}", stderr(&o));
}

#[test]
fn verify_and_info_as_json() {
    let Some(ctx) = common::gpu() else { return };
    let o = seqk(&["verify", "--quick", "--json"]);
    assert!(
        o.status.success(),
        "verify failed: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("verify --json is JSON");
    let checks = v["checks"].as_array().unwrap();
    assert!(
        checks.len() >= 5 && checks.iter().all(|c| c["passed"] == true),
        "{v:#}"
    );
    let o = seqk(&["info", "--json"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("info --json is JSON");
    assert!(
        v["limits"]["max_storage_buffer_binding_size"]
            .as_u64()
            .unwrap()
            > 0
    );
    // The limit FLASH needs 10 of (and limit errors name) is shown.
    assert_eq!(
        v["limits"]["max_storage_buffers_per_shader_stage"].as_u64(),
        Some(ctx.limits().max_storage_buffers_per_shader_stage as u64),
        "{v:#}"
    );
}

/// Output into a pipe its reader closed early (`seqk info | head -0`) ends seqk quietly by
/// SIGPIPE, as Unix tools do, instead of a panic in `println!`.
#[cfg(unix)]
#[test]
fn closed_output_pipe_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;
    let Some(_) = common::gpu() else { return };
    let mut child = Command::new(env!("CARGO_BIN_EXE_seqk"))
        .arg("info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("seqk did not start");
    drop(child.stdout.take()); // closed before seqk has opened its adapter and printed
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
    const SIGPIPE: i32 = 13;
    assert_eq!(o.status.signal(), Some(SIGPIPE), "{:?}: {err}", o.status);
}

/// `seqk bench KERNEL --quick --json`: the parsed JSON and its rows, the copy row first.
fn bench_json(kernel: &str) -> (serde_json::Value, Vec<serde_json::Value>) {
    let o = seqk(&["bench", kernel, "--quick", "--json"]);
    assert!(o.status.success(), "bench failed: {}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("bench --json is JSON");
    let rows = v["results"].as_array().expect("results array").clone();
    assert_eq!(rows[0]["kernel"], "copy", "{v:#}");
    (v, rows)
}

#[test]
fn bench_softmax_quick_as_json() {
    let Some(_) = common::gpu() else { return };
    let (v, rows) = bench_json("softmax");
    assert!(
        v["adapter"].as_str().is_some_and(|a| !a.is_empty()),
        "{v:#}"
    );
    let positive = |r: &serde_json::Value, key: &str| {
        let x = r[key].as_f64();
        assert!(
            x.is_some_and(|x| x > 0.0 && x.is_finite()),
            "{key} in {r:#}"
        );
        x.unwrap()
    };
    // The copy kernel first: the denominator of every ratio, 1.0 against itself.
    positive(&rows[0], "gbps");
    assert_eq!(rows[0]["copy_ratio"].as_f64(), Some(1.0), "{v:#}");
    let softmax: Vec<_> = rows.iter().filter(|r| r["kernel"] == "softmax").collect();
    assert_eq!(softmax.len(), 4, "the issue's four shapes: {v:#}");
    for r in softmax {
        let gbps = positive(r, "gbps");
        let ratio = positive(r, "copy_ratio");
        let copy = rows[0]["gbps"].as_f64().unwrap();
        assert!((ratio - gbps / copy).abs() <= 1e-9 * ratio, "{r:#}");
        assert!(
            r["case"].as_str().is_some_and(|c| c.starts_with("f32 ")),
            "{r:#}"
        );
        assert!(
            ["gpu", "wall"].contains(&r["clock"].as_str().unwrap()),
            "{r:#}"
        );
        positive(r, "wall_ms");
    }
}

/// `bench copy` times the copy baseline alone (the README lists copy among the kernels).
#[test]
fn bench_copy_is_the_baseline_alone() {
    let Some(_) = common::gpu() else { return };
    let (v, rows) = bench_json("copy");
    assert_eq!(rows.len(), 1, "{v:#}");
    assert!(rows[0]["gbps"].as_f64().is_some_and(|x| x > 0.0), "{v:#}");
}

/// An unknown bench kernel is a usage error listing the known ones, copy among them.
#[test]
fn bench_unknown_kernel_lists_copy() {
    let Some(_) = common::gpu() else { return };
    assert_usage_error(
        &["bench", "nope"],
        &["unknown kernel \"nope\"", "known: copy, "],
    );
}

/// `bench sample` (a KERNEL of `seqk bench`) times the sampler alone: the copy row, then sample
/// rows only, each GPU row beside its CPU reference row.
#[test]
fn bench_sample_quick_as_json() {
    let Some(_) = common::gpu() else { return };
    let (v, rows) = bench_json("sample");
    assert!(rows.len() > 1, "no sample rows: {v:#}");
    for r in &rows[1..] {
        assert_eq!(r["kernel"], "sample", "{r:#}");
        assert_eq!(r["rate_unit"], "tokens/s", "{r:#}");
        assert!(
            r["rate"].as_f64().is_some_and(|x| x > 0.0 && x.is_finite()),
            "{r:#}"
        );
    }
    let cpu = rows[1..]
        .iter()
        .filter(|r| r["case"].as_str().is_some_and(|c| c.contains(" cpu (")))
        .count();
    assert_eq!(
        2 * cpu,
        rows.len() - 1,
        "a CPU row beside each GPU row: {v:#}"
    );
}

/// An unknown `--out2` name is bad input found with unknown inputs and options, before
/// anything is computed: exit 2 with one line naming it, and no output file written. The
/// names a kernel offers still work, all of them together.
#[test]
fn unknown_secondary_output_exits_2_before_writing() {
    let d = dir("out2");
    let p = |f: &str| d.join(f).display().to_string();
    save(&d.join("x.npy"), &[2, 3], &[1.0f32; 6], npyz::Order::C);
    save(&d.join("u.npy"), &[3, 2], &[0.5f32; 6], npyz::Order::C);
    save(&d.join("w.npy"), &[2, 2], &[0.0f32; 4], npyz::Order::C);
    save(&d.join("t.npy"), &[2, 3], &[1i32; 6], npyz::Order::C);
    let (x, u, w, t) = (
        format!("x={}", p("x.npy")),
        format!("unary={}", p("u.npy")),
        format!("pairwise={}", p("w.npy")),
        format!("init={}", p("t.npy")),
    );
    let softmax = vec!["run", "softmax", "--in", x.as_str()];
    let gibbs = vec!["run", "gibbs", "--in", &u, "--in", &w, "--in", &t];
    // The message lists the names the kernel offers.
    let offered = [
        (&softmax, "lse", "(its secondary outputs: none)"),
        (&gibbs, "bset", "(its secondary outputs: best, best_score)"),
    ];
    for (kernel_args, name, listed) in offered {
        let (out, out2) = (p("out.npy"), format!("{name}={}", p("out2.npy")));
        let mut args = kernel_args.clone();
        args.extend(["--cpu", "--out", &out, "--out2", &out2]);
        let o = seqk(&args);
        let msg = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {msg}");
        assert_eq!(msg.lines().count(), 1, "{args:?}: {msg}");
        assert!(
            msg.contains(&format!("unknown secondary output {name:?}")) && msg.contains(listed),
            "{args:?}: {msg}"
        );
        for f in ["out.npy", "out2.npy"] {
            assert!(!d.join(f).exists(), "{args:?} wrote {f}");
        }
    }
    let (out, best, score) = (
        p("out.npy"),
        format!("best={}", p("best.npy")),
        format!("best_score={}", p("score.npy")),
    );
    let mut args = gibbs.clone();
    args.extend(["--cpu", "--out", &out, "--out2", &best, "--out2", &score]);
    let o = seqk(&args);
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    for f in ["out.npy", "best.npy", "score.npy"] {
        assert!(d.join(f).exists(), "{args:?} did not write {f}");
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// No adapter: asking wgpu for Metal where it is not compiled in (Linux, Windows) leaves
/// none. Every command that needs a device exits 1 with one line naming how to get one.
#[cfg(not(target_vendor = "apple"))]
#[test]
fn no_adapter_exits_1_naming_lavapipe() {
    for args in [
        &["info"][..],
        &["bench", "softmax", "--quick", "--json"],
        &["--backend", "metal", "verify", "--quick"],
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_seqk"))
            .args(args)
            .env("WGPU_BACKEND", "metal")
            .env_remove("WGPU_ADAPTER_NAME")
            .output()
            .expect("seqk did not start");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        let msg = stderr(&o);
        assert_eq!(msg.lines().count(), 1, "{args:?}: {err}");
        for needle in ["no GPU adapter", "mesa-vulkan-drivers", "lavapipe"] {
            assert!(
                msg.contains(needle),
                "{args:?}: {msg:?} should name {needle:?}"
            );
        }
        assert!(o.stdout.is_empty(), "{args:?}: no partial output on stdout");
    }
    // With an adapter on another backend, the message names it: the remedy is that backend.
    if let Some(ctx) = common::gpu() {
        let o = Command::new(env!("CARGO_BIN_EXE_seqk"))
            .args(["--backend", "metal", "info"])
            .env_remove("WGPU_ADAPTER_NAME")
            .output()
            .expect("seqk did not start");
        let msg = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{msg}");
        let here = seq_kernels::context::adapter_label(ctx.adapter_info());
        assert!(
            msg.contains("on other backends: ") && msg.contains(&here),
            "{msg:?} should name {here:?}"
        );
    }
    // WGPU_ADAPTER_NAME naming no adapter: the same clear exit 1 (wgpu's own helper panics).
    let o = Command::new(env!("CARGO_BIN_EXE_seqk"))
        .arg("info")
        .env("WGPU_ADAPTER_NAME", "no-such-gpu")
        .output()
        .expect("seqk did not start");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(stderr(&o).contains("no-such-gpu"), "{err}");
}

/// Runs `seqk run` with `args` and checks a one-line usage error (exit 2) containing every
/// one of `needles`.
fn assert_usage_error(args: &[&str], needles: &[&str]) {
    let o = seqk(args);
    let msg = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{args:?}: {msg}");
    assert_eq!(msg.lines().count(), 1, "{args:?}: {msg}");
    for n in needles {
        assert!(msg.contains(n), "{args:?}: {msg:?} should mention {n:?}");
    }
}

/// A name given twice to `--in`, `--set` or `--out2` is an error naming it, not "the last one
/// wins".
#[test]
fn repeated_names_exit_2() {
    let d = dir("repeated");
    let p = |f: &str| d.join(f).display().to_string();
    save(&d.join("a.npy"), &[2, 3], &[1.0f32; 6], npyz::Order::C);
    save(&d.join("b.npy"), &[2, 3], &[2.0f32; 6], npyz::Order::C);
    let (xa, xb, out) = (
        format!("x={}", p("a.npy")),
        format!("x={}", p("b.npy")),
        p("o.npy"),
    );
    let softmax = ["run", "softmax", "--cpu", "--out", &out];
    assert_usage_error(
        &[&softmax[..], &["--in", &xa, "--in", &xb]].concat(),
        &["--in x=", "more than once"],
    );
    assert_usage_error(
        &[
            &softmax[..],
            &["--in", &xa, "--set", "log=true", "--set", "log=false"],
        ]
        .concat(),
        &["--set log=", "more than once"],
    );
    let (b1, b2) = (
        format!("best={}", p("b1.npy")),
        format!("best={}", p("b2.npy")),
    );
    assert_usage_error(
        &[&softmax[..], &["--in", &xa, "--out2", &b1, "--out2", &b2]].concat(),
        &["--out2 best=", "more than once"],
    );
    assert!(!d.join("o.npy").exists());
    let _ = std::fs::remove_dir_all(&d);
}

/// `--in`, `--set` and `--out2` with nothing before the `=` are errors quoting the argument,
/// not an input, option or output with an empty name.
#[test]
fn empty_names_exit_2() {
    let d = dir("empty-names");
    let p = |f: &str| d.join(f).display().to_string();
    save(&d.join("a.npy"), &[2, 3], &[1.0f32; 6], npyz::Order::C);
    let (xa, out) = (format!("x={}", p("a.npy")), p("o.npy"));
    let softmax = ["run", "softmax", "--cpu", "--out", &out];
    let bare = format!("={}", p("a.npy"));
    assert_usage_error(
        &[&softmax[..], &["--in", &bare]].concat(),
        &["--in expects NAME=VALUE", "\"="],
    );
    assert_usage_error(
        &[&softmax[..], &["--in", &xa, "--set", "=0.5"]].concat(),
        &["--set expects NAME=VALUE", "\"=0.5\""],
    );
    // A NAME of spaces alone is empty too.
    assert_usage_error(
        &[&softmax[..], &["--in", &xa, "--set", " =0.5"]].concat(),
        &["--set expects NAME=VALUE", "\" =0.5\""],
    );
    let bare_out = format!("={}", p("b.npy"));
    assert_usage_error(
        &[&softmax[..], &["--in", &xa, "--out2", &bare_out]].concat(),
        &["--out2 expects NAME=VALUE"],
    );
    assert!(!d.join("o.npy").exists());
    let _ = std::fs::remove_dir_all(&d);
}

/// Empty and 0-d arrays are errors naming the input and its expected shape.
#[test]
fn empty_and_scalar_inputs_exit_2_naming_the_input() {
    let d = dir("empty-input");
    let p = |f: &str| d.join(f).display().to_string();
    save::<f32>(&d.join("z.npy"), &[3, 0], &[], npyz::Order::C);
    save(&d.join("s.npy"), &[], &[3.0f32], npyz::Order::C);
    save(&d.join("x.npy"), &[2, 3], &[1.0f32; 6], npyz::Order::C);
    save::<bool>(&d.join("m.npy"), &[0, 3], &[], npyz::Order::C);
    let out = p("o.npy");
    for (inputs, needles) in [
        (
            vec![format!("x={}", p("z.npy"))],
            &["input x has shape [3, 0]", "expected [.., n]"][..],
        ),
        (
            vec![format!("x={}", p("s.npy"))],
            &["input x is a 0-d array", "expected [.., n]"][..],
        ),
        (
            vec![format!("x={}", p("x.npy")), format!("mask={}", p("m.npy"))],
            &["input mask has shape [0, 3]", "expected (the shape of x)"][..],
        ),
    ] {
        let mut args = vec!["run", "softmax", "--cpu", "--out", &out];
        for i in &inputs {
            args.extend(["--in", i]);
        }
        assert_usage_error(&args, needles);
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// Boolean options take true/false, Python's True/False and 1/0; anything else is an error
/// listing them.
#[test]
fn boolean_set_values() {
    let d = dir("bools");
    let p = |f: &str| d.join(f).display().to_string();
    save(
        &d.join("x.npy"),
        &[3, 5],
        &common::random(15, 22, -3.0, 3.0),
        npyz::Order::C,
    );
    let x = format!("x={}", p("x.npy"));
    let softmax = |out: &str, log: &str| {
        let set = format!("log={log}");
        seqk(&[
            "run", "softmax", "--cpu", "--in", &x, "--out", out, "--set", &set,
        ])
    };
    let mut results = Vec::new();
    for (i, v) in ["true", "True", "1", "false", "False", "0"]
        .iter()
        .enumerate()
    {
        let out = p(&format!("o{i}.npy"));
        let o = softmax(&out, v);
        assert!(o.status.success(), "log={v}: {}", stderr(&o));
        results.push(load_f32(Path::new(&out)));
    }
    assert!(results[..3].iter().all(|r| *r == results[0]));
    assert!(results[3..].iter().all(|r| *r == results[3]));
    assert_ne!(results[0], results[3], "log=true and log=false must differ");
    let o = softmax(&p("bad.npy"), "yes");
    let msg = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{msg}");
    for n in ["log=yes", "true", "False", "1/0"] {
        assert!(msg.contains(n), "{msg:?} should mention {n:?}");
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// Output paths are checked before computing: an unwritable `--out2` fails (exit 2, naming
/// it) before the main output is written, and an unwritable `--out` fails the same way.
#[test]
fn unwritable_outputs_fail_before_computing() {
    let d = dir("unwritable");
    let p = |f: &str| d.join(f).display().to_string();
    save(&d.join("u.npy"), &[3, 2], &[0.5f32; 6], npyz::Order::C);
    save(&d.join("w.npy"), &[2, 2], &[0.0f32; 4], npyz::Order::C);
    save(&d.join("t.npy"), &[2, 3], &[1i32; 6], npyz::Order::C);
    let (u, w, t) = (
        format!("unary={}", p("u.npy")),
        format!("pairwise={}", p("w.npy")),
        format!("init={}", p("t.npy")),
    );
    let missing = d.join("no-such-dir");
    let gibbs = ["run", "gibbs", "--cpu", "--in", &u, "--in", &w, "--in", &t];
    let bad_best = format!("best={}", missing.join("best.npy").display());
    let out = p("out.npy");
    assert_usage_error(
        &[&gibbs[..], &["--out", &out, "--out2", &bad_best]].concat(),
        &["--out2 best=", "no-such-dir", "cannot write"],
    );
    assert!(!d.join("out.npy").exists(), "the main output was written");
    let bad_out = missing.join("out.npy").display().to_string();
    assert_usage_error(
        &[&gibbs[..], &["--out", &bad_out]].concat(),
        &["--out ", "no-such-dir", "cannot write"],
    );
    // A directory is not an output file either; a good path still works and leaves no probe.
    assert_usage_error(
        &[&gibbs[..], &["--out", &p("")]].concat(),
        &["--out ", "directory"],
    );
    // Two outputs into one file, however spelled (the same path, another spelling of the
    // directory, a link).
    let respelled = d.join(".").join("out.npy").display().to_string();
    let mut spellings = vec![out.clone(), respelled];
    #[cfg(unix)]
    {
        let alias = d.join("alias.npy");
        std::os::unix::fs::symlink(d.join("out.npy"), &alias).unwrap();
        spellings.push(alias.display().to_string());
    }
    for spelling in spellings {
        let same_best = format!("best={spelling}");
        assert_usage_error(
            &[&gibbs[..], &["--out", &out, "--out2", &same_best]].concat(),
            &["--out2 best=", "is the file of --out", "own file"],
        );
    }
    let o = seqk(&[&gibbs[..], &["--out", &out]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(d.join("out.npy").exists());
    // A link to a file not there yet is written through, as before outputs were checked.
    #[cfg(unix)]
    {
        let link = d.join("link.npy");
        std::os::unix::fs::symlink(d.join("target.npy"), &link).unwrap();
        let link = link.display().to_string();
        let o = seqk(&[&gibbs[..], &["--out", &link]].concat());
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(d.join("target.npy").exists());
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// Option values are printed as values (NaN, inf), not as Rust's `Some(NaN)`.
#[test]
fn option_errors_print_plain_values() {
    let d = dir("plain-values");
    let p = |f: &str| d.join(f).display().to_string();
    save(&d.join("a.npy"), &[1, 4, 2], &[0.5f32; 8], npyz::Order::C);
    let inputs: Vec<String> = ["qq", "kq", "ql", "kl", "v"]
        .iter()
        .map(|n| format!("{n}={}", p("a.npy")))
        .collect();
    let out = p("o.npy");
    for (set, value) in [
        ("lin_scale=nan", "got NaN"),
        ("quad_scale=inf", "got inf"),
        ("lin_scale=1e40", "beyond float32's range"),
        ("lin_scale=1e-50", "too small for float32"),
        ("base=1e400", "beyond float64's range"),
    ] {
        let mut args = vec!["run", "flash", "--cpu", "--out", &out, "--set", set];
        for i in &inputs {
            args.extend(["--in", i]);
        }
        assert_usage_error(&args, &[value]);
        assert!(!stderr(&seqk(&args)).contains("Some("));
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// `seqk run --help` names every input and option each kernel takes: the names the kernel
/// itself lists beside an unknown one must all stand in its paragraph of the help.
#[test]
fn run_help_names_every_input_and_option() {
    let d = dir("run-help");
    let p = |f: &str| d.join(f).display().to_string();
    let f32s = |name: &str, shape: &[u64]| {
        let n = shape.iter().product::<u64>() as usize;
        save(&d.join(name), shape, &vec![0.25f32; n], npyz::Order::C);
        p(name)
    };
    let (x2, x4, x3) = (
        f32s("x2.npy", &[1, 4]),
        f32s("x4.npy", &[1, 2, 1, 4]),
        f32s("x3.npy", &[1, 4, 2]),
    );
    let (unary, pairwise) = (f32s("u.npy", &[3, 2]), f32s("w.npy", &[2, 2]));
    save(&d.join("init.npy"), &[1, 3], &[0i32; 3], npyz::Order::C);
    let init = p("init.npy");
    let kernels: [(&str, Vec<(&str, &String)>); 6] = [
        ("softmax", vec![("x", &x2)]),
        ("rope", vec![("x", &x4)]),
        ("attention", vec![("q", &x4), ("k", &x4), ("v", &x4)]),
        (
            "flash",
            ["qq", "kq", "ql", "kl", "v"].map(|n| (n, &x3)).to_vec(),
        ),
        (
            "gibbs",
            vec![("unary", &unary), ("pairwise", &pairwise), ("init", &init)],
        ),
        ("sample", vec![("logits", &x2)]),
    ];
    let help = String::from_utf8(seqk(&["run", "--help"]).stdout).unwrap();
    let out = p("o.npy");
    for (kernel, inputs) in &kernels {
        let section = help
            .split("\n\n")
            .find(|para| para.starts_with(&format!("{kernel}: ")))
            .unwrap_or_else(|| panic!("no paragraph for {kernel} in seqk run --help"));
        let words: Vec<&str> = section
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .collect();
        let mut args = vec!["run", kernel, "--cpu", "--out", &out];
        let given: Vec<String> = inputs.iter().map(|(n, f)| format!("{n}={f}")).collect();
        for g in &given {
            args.extend(["--in", g]);
        }
        let unknown_input = format!("zz={}", x2);
        for (extra, list) in [
            (["--in", unknown_input.as_str()], "(its inputs: "),
            (["--set", "zz=1"], "(its options: "),
        ] {
            let o = seqk(&[args.as_slice(), &extra].concat());
            let msg = stderr(&o);
            let names = msg
                .split_once(list)
                .and_then(|(_, rest)| rest.split_once(')'))
                .unwrap_or_else(|| panic!("{kernel}: no {list:?} in {msg:?}"))
                .0;
            for name in names.split(", ") {
                assert!(
                    words.contains(&name),
                    "seqk run --help does not name {kernel}'s {name:?}:\n{section}"
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// A FLASH chunk whose C x C scores no storage binding holds (C = n = 2^17: 64 GiB) is exit 2
/// naming a chunk that fits; it was exit 1, the missing-adapter code, advising to split the
/// input.
#[test]
fn flash_chunk_beyond_the_device_exits_2() {
    let Some(_) = common::gpu() else { return };
    let d = dir("flash-chunk");
    let p = |f: &str| d.join(f).display().to_string();
    let n = 1usize << 17;
    save(
        &d.join("a.npy"),
        &[1, n as u64, 1],
        &vec![0.5f32; n],
        npyz::Order::C,
    );
    let inputs: Vec<String> = ["qq", "kq", "ql", "kl", "v"]
        .iter()
        .map(|k| format!("{k}={}", p("a.npy")))
        .collect();
    let (out, chunk) = (p("o.npy"), format!("chunk={n}"));
    let mut args = vec!["run", "flash", "--out", &out, "--set", &chunk];
    for i in &inputs {
        args.extend(["--in", i]);
    }
    assert_usage_error(&args, &["flash chunk 131072 is too large", "use chunk <= "]);
    let _ = std::fs::remove_dir_all(&d);
}

/// An attention mask of another dtype: the message names both accepted kinds of mask.
#[test]
fn attention_int_mask_names_bool_and_float_masks() {
    let d = dir("int-mask");
    let p = |f: &str| d.join(f).display().to_string();
    save(
        &d.join("q.npy"),
        &[1, 1, 2, 4],
        &[0.5f32; 8],
        npyz::Order::C,
    );
    save(&d.join("m.npy"), &[2, 2], &[1i32; 4], npyz::Order::C);
    let (q, m, out) = (p("q.npy"), format!("mask={}", p("m.npy")), p("o.npy"));
    let (qa, ka, va) = (format!("q={q}"), format!("k={q}"), format!("v={q}"));
    let args = [
        "run",
        "attention",
        "--cpu",
        "--in",
        &qa,
        "--in",
        &ka,
        "--in",
        &va,
        "--in",
        &m,
        "--out",
        &out,
    ];
    assert_usage_error(
        &args,
        &["input mask has dtype int32", "bool", "float32 or float16"],
    );
    let _ = std::fs::remove_dir_all(&d);
}

/// The verify and bench tables keep their columns aligned whatever the case names' lengths,
/// and `verify --json` case names carry no padding.
#[test]
fn verify_and_bench_tables_align() {
    let Some(_) = common::gpu() else { return };
    let o = seqk(&["verify", "--quick"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    let lines: Vec<&str> = text.lines().collect();
    let header = lines.iter().position(|l| l.starts_with("kernel")).unwrap();
    let col = lines[header].find("result").unwrap();
    let rows = &lines[header + 1..lines.len() - 1];
    assert!(rows.len() >= 5, "{text}");
    for row in rows {
        assert!(
            row.get(col..).is_some_and(|r| r == "pass" || r == "FAIL"),
            "misaligned row {row:?} (result column at {col}):\n{text}"
        );
    }
    let o = seqk(&["verify", "--quick", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("verify --json is JSON");
    for c in v["checks"].as_array().unwrap() {
        let case = c["case"].as_str().unwrap();
        assert_eq!(case, case.trim(), "padded case name in {c}");
    }
    // rope's bench cases are longer than the old fixed case column; sample's copy ratios on
    // a software device take 8 characters (0.008110).
    let o = seqk(&["bench", "rope", "sample", "--quick"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    let lines: Vec<&str> = text.lines().collect();
    let header = lines.iter().position(|l| l.starts_with("kernel")).unwrap();
    let end = lines[header].find("clock").unwrap() + "clock".len();
    // The last figure column ends where its header does (wide figures would push it right).
    let last = lines[header].find("TFLOP/s").unwrap() + "TFLOP/s".len();
    for row in &lines[header + 1..] {
        let clock = [" gpu ", " wall "]
            .iter()
            .find_map(|c| row.find(c).map(|i| i + c.len() - 1));
        assert_eq!(clock, Some(end), "misaligned row {row:?}:\n{text}");
        let b = row.as_bytes();
        assert!(
            b[last - 1] != b' ' && b.get(last).is_none_or(|&c| c == b' '),
            "misaligned figures in {row:?}:\n{text}"
        );
    }
}

/// `info` on an adapter without SUBGROUP (GL) says so instead of printing its meaningless
/// subgroup sizes (null in JSON), and the driver line is never blank.
#[test]
fn info_subgroups_and_driver() {
    let Some(ctx) = common::gpu() else { return };
    let has = ctx.features().contains(wgpu::Features::SUBGROUP);
    let o = seqk(&["info", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("info --json is JSON");
    for key in ["subgroup_min_size", "subgroup_max_size"] {
        assert_eq!(v[key].is_u64(), has, "{key} with SUBGROUP = {has}: {v:#}");
        assert_eq!(v[key].is_null(), !has, "{key} with SUBGROUP = {has}: {v:#}");
    }
    let o = seqk(&["info"]);
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    let line = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} line in:\n{text}"))
            .trim()
            .to_string()
    };
    assert_eq!(
        line("subgroups").contains("not available"),
        !has,
        "SUBGROUP = {has}:\n{text}"
    );
    let driver = line("driver");
    assert!(
        !driver.is_empty() && !driver.starts_with(|c: char| c.is_whitespace()),
        "{text}"
    );
}

/// `--adapter` naming no adapter lists each adapter with its backend and device type, so two
/// of the same name (llvmpipe on Vulkan and on GL) can be told apart.
#[test]
fn adapter_no_match_lists_backends() {
    let Some(ctx) = common::gpu() else { return };
    let o = seqk(&["--adapter", "no-such-gpu", "info"]);
    let msg = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{msg}");
    let info = ctx.adapter_info();
    let want = format!("({:?}, {:?})", info.backend, info.device_type);
    assert!(msg.contains(&want), "{msg:?} should list {want:?}");
}

/// A WGPU_BACKEND naming no backend is reported as such, naming the value, instead of as a
/// missing driver; an empty one means unset (as an empty WGPU_ADAPTER_NAME does); an adapter
/// name that matches nothing lists what there is without the driver-install advice.
#[test]
fn backend_and_adapter_environment() {
    let Some(_) = common::gpu() else { return };
    let with_env = |k: &str, v: &str| {
        Command::new(env!("CARGO_BIN_EXE_seqk"))
            .arg("info")
            .env(k, v)
            .output()
            .unwrap()
    };
    let o = with_env("WGPU_BACKEND", "nonsense");
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("WGPU_BACKEND=\"nonsense\" names no backend"),
        "{e}"
    );
    assert!(!e.contains("Install a Vulkan driver"), "{e}");
    // An empty WGPU_BACKEND opens an adapter, and info's list is every backend's whatever
    // WGPU_BACKEND says: the same list with it empty and with it naming one backend.
    let o = with_env("WGPU_BACKEND", "");
    assert!(o.status.success(), "{}", stderr(&o));
    let list = |o: &Output| {
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        let at = text.find("adapters  ").expect("an adapters section");
        text[at..]
            .lines()
            .skip(1)
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let all = list(&o);
    assert!(!all.is_empty(), "no adapters listed");
    let backend = if all.iter().any(|a| a.contains("(Vulkan,")) {
        "vulkan"
    } else {
        "gl"
    };
    assert_eq!(list(&with_env("WGPU_BACKEND", backend)), all);
    let o = with_env("WGPU_ADAPTER_NAME", "no-such-adapter-name");
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("available: "), "{e}");
    assert!(!e.contains("Install a Vulkan driver"), "{e}");
}

/// A dtype no input takes (float64) is refused by the input that gets it, naming the input,
/// its expected shape and its dtypes, not by a list of every dtype some input takes.
#[test]
fn float64_input_names_the_expected_shape_and_dtype() {
    let d = dir("f64-input");
    let p = |f: &str| d.join(f).display().to_string();
    save(&d.join("l.npy"), &[2, 3], &[0.5f64; 6], npyz::Order::C);
    let (l, out) = (format!("logits={}", p("l.npy")), p("t.npy"));
    let args = ["run", "sample", "--cpu", "--in", &l, "--out", &out];
    assert_usage_error(
        &args,
        &[
            "input logits has dtype float64",
            "[b, V]",
            "float32 or float16",
        ],
    );
    assert!(!stderr(&seqk(&args)).contains("int64"));
    let _ = std::fs::remove_dir_all(&d);
}

/// Integer inputs of the wrong dtype or shape are refused naming the input (not the library's
/// word for it) and its expected shape: gibbs's init, rope's positions.
#[test]
fn integer_inputs_name_the_input_and_its_expected_shape() {
    let d = dir("int-inputs");
    let p = |f: &str| d.join(f).display().to_string();
    save(&d.join("u.npy"), &[5, 4], &[0.5f32; 20], npyz::Order::C);
    save(&d.join("w.npy"), &[4, 4], &[0.5f32; 16], npyz::Order::C);
    save(&d.join("xf.npy"), &[2, 5], &[0.0f32; 10], npyz::Order::C);
    save(&d.join("x1.npy"), &[5], &[0i32; 5], npyz::Order::C);
    save(&d.join("x3.npy"), &[2, 3], &[0i32; 6], npyz::Order::C);
    let (u, w, out) = (
        format!("unary={}", p("u.npy")),
        format!("pairwise={}", p("w.npy")),
        p("t.npy"),
    );
    for (init, needles) in [
        ("xf.npy", &["input init has dtype float32", "[b, L]"][..]),
        ("x1.npy", &["input init has shape [5]", "[b, 5]"][..]),
        ("x3.npy", &["input init has shape [2, 3]", "[b, 5]"][..]),
    ] {
        let init = format!("init={}", p(init));
        let args = [
            "run", "gibbs", "--cpu", "--in", &u, "--in", &w, "--in", &init, "--out", &out,
        ];
        assert_usage_error(&args, needles);
    }
    // rope: x [b = 2, s = 3, h = 1, d = 4]; positions of float32.
    save(
        &d.join("x.npy"),
        &[2, 3, 1, 4],
        &[0.5f32; 24],
        npyz::Order::C,
    );
    save(&d.join("pf.npy"), &[3], &[0.0f32; 3], npyz::Order::C);
    let (x, pos) = (
        format!("x={}", p("x.npy")),
        format!("positions={}", p("pf.npy")),
    );
    let args = [
        "run", "rope", "--cpu", "--in", &x, "--in", &pos, "--out", &out,
    ];
    assert_usage_error(
        &args,
        &[
            "input positions has dtype float32",
            "[3], [1, 3] or [2, 3]",
            "int32 or int64",
        ],
    );
    assert!(!d.join("t.npy").exists());
    let _ = std::fs::remove_dir_all(&d);
}
