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

/// A scratch directory of this test alone (tests run in parallel).
fn dir(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("seqk-cli-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
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
    // Log-softmax: 1e-6 of the row scale (spec section 0), plus the f32 rounding of the
    // reference output that --cpu writes.
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
            "input mask has dtype float32; expected (the shape of x) bool",
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
        (input("y", "x.npy"), "missing input x"),
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
    let Some(_) = common::gpu() else { return };
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

/// `bench sample` (a KERNEL of spec section 6) times the sampler alone: the copy row, then
/// sample rows only, each GPU row beside its CPU reference row.
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
    for (kernel_args, name) in [(&softmax, "lse"), (&gibbs, "bset")] {
        let (out, out2) = (p("out.npy"), format!("{name}={}", p("out2.npy")));
        let mut args = kernel_args.clone();
        args.extend(["--cpu", "--out", &out, "--out2", &out2]);
        let o = seqk(&args);
        let msg = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {msg}");
        assert_eq!(msg.lines().count(), 1, "{args:?}: {msg}");
        assert!(
            msg.contains(&format!("unknown secondary output {name:?}")),
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
