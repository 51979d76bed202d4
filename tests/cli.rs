//! End-to-end tests of the `arbor` binary: real runs on fixture models and the default
//! model, and bad input that must end in a clear error and a non-zero exit, never a panic.

use std::path::Path;
use std::process::{Command, Output};

fn arbor(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_arbor"))
        .args(args)
        .output()
        .expect("run arbor")
}

fn fixture(arch: &str) -> String {
    format!(
        "{}/tests/fixtures/models/{arch}",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// A scratch directory, removed with everything in it when the guard drops.
fn temp_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("arbor-cli-{name}-"))
        .tempdir()
        .expect("temp dir")
}

/// Asserts a clean failure whose message contains `want`.
fn fails_with(out: &Output, want: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(err.contains(want), "stderr lacks {want:?}: {err}");
}

/// The JSON object on each stdout line of a successful run.
fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

#[test]
fn run_streams_text_and_reports_speed() {
    let m = fixture("qwen2");
    let out = arbor(&[
        "run",
        "--model",
        &m,
        "--prompt",
        "hello world",
        "--temperature",
        "0",
        "--max-tokens",
        "12",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("decode:") && err.contains("tok/s"), "{err}");
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty());
}

#[test]
fn same_seed_same_text() {
    let m = fixture("llama");
    let run = |seed: &str| {
        let out = arbor(&[
            "run",
            "-m",
            &m,
            "-p",
            "the tree",
            "--temperature",
            "1.0",
            "--seed",
            seed,
            "-n",
            "16",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    assert_eq!(run("7"), run("7"));
    let (a, b, c) = (run("1"), run("2"), run("3"));
    assert!(a != b || b != c, "three seeds gave the same text");
}

#[test]
fn info_json_describes_the_model() {
    let out = arbor(&["info", "--model", &fixture("qwen3"), "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["architecture"], "qwen3");
    assert_eq!(v["head_dim"], 32);
    // 3 layers × 2 KV heads × 32 dims × (K + V) × 4 bytes.
    assert_eq!(v["kv_bytes_per_token_f32"], 3 * 2 * 32 * 2 * 4);
    // f16 pages on the CPU unless --kv-dtype f32 (or --exact).
    assert_eq!(v["kv_dtype_cpu"], "f16");
    assert_eq!(v["kv_bytes_per_token_cpu"], 3 * 2 * 32 * 2 * 2);
}

#[test]
fn default_model_says_paris() {
    let out = arbor(&[
        "run",
        "--prompt",
        "The capital of France is",
        "--temperature",
        "0",
        "--max-tokens",
        "3",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with(" Paris"), "{text:?}");
}

#[test]
fn bad_model_paths_and_files() {
    fails_with(
        &arbor(&["run", "-m", "/nonexistent/m.gguf", "-p", "x"]),
        "/nonexistent/m.gguf",
    );
    let d = temp_dir("garbage");
    let d = d.path();
    let g = d.join("g.gguf");
    std::fs::write(&g, b"GGUF\x03\0\0\0 truncated").expect("write");
    fails_with(
        &arbor(&["run", "-m", g.to_str().unwrap(), "-p", "x"]),
        "malformed GGUF",
    );
    std::fs::write(&g, b"definitely not a model").expect("write");
    fails_with(
        &arbor(&["info", "-m", g.to_str().unwrap()]),
        "not a GGUF file",
    );
}

fn copy_fixture(arch: &str, to: &Path, skip: &str) {
    for e in std::fs::read_dir(fixture(arch)).expect("fixture") {
        let e = e.expect("entry");
        if e.file_name() != skip {
            std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
        }
    }
}

#[test]
fn missing_tokenizer_and_unknown_architecture() {
    let d = temp_dir("notok");
    let d = d.path();
    copy_fixture("llama", d, "tokenizer.json");
    fails_with(
        &arbor(&["run", "-m", d.to_str().unwrap(), "-p", "x"]),
        "tokenizer.json",
    );
    let d = temp_dir("bert");
    let d = d.path();
    copy_fixture("llama", d, "config.json");
    std::fs::write(
        d.join("config.json"),
        r#"{"model_type": "bert", "hidden_size": 8}"#,
    )
    .expect("write");
    fails_with(
        &arbor(&["run", "-m", d.to_str().unwrap(), "-p", "x"]),
        "unsupported architecture 'bert'",
    );
}

#[test]
fn prompt_longer_than_context() {
    let long = "word ".repeat(400);
    fails_with(
        &arbor(&["run", "-m", &fixture("llama"), "-p", &long]),
        "does not fit the context",
    );
}

#[test]
fn bad_flags() {
    let m = fixture("llama");
    fails_with(
        &arbor(&["run", "-m", &m, "-p", "x", "--temperature=-1"]),
        "--temperature",
    );
    fails_with(
        &arbor(&["run", "-m", &m, "-p", "x", "--top-p", "1.5"]),
        "--top-p",
    );
    fails_with(
        &arbor(&["run", "-m", &m, "-p", "x", "--device", "cuda"]),
        "CUDA",
    );
    fails_with(
        &arbor(&["run", "-m", &m, "-p", "x", "--device", "tpu"]),
        "unknown device",
    );
    fails_with(
        &arbor(&["run", "-m", &m, "-p", "x", "--page-size", "12"]),
        "page size",
    );
    fails_with(&arbor(&["run", "-m", &m]), "--prompt");
    fails_with(
        &arbor(&["run", "-m", &m, "-p", "x", "--chat"]),
        "chat template",
    );
}

#[test]
fn chat_answers_each_turn_and_survives_errors() {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_arbor"))
        // --exact: on this prompt the fast path (like llama.cpp, which answers the same)
        // starts with "L'Étoile"; f32 activations answer "The capital of France is Paris."
        .args(["chat", "--temperature", "0", "--max-tokens", "8", "--exact"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let long = "word ".repeat(9000);
    let input = format!("What is the capital of France?\n{long}\n/reset\nSay hi.\n/exit\n");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // The over-long turn is refused with an error, and the session goes on.
    assert!(err.contains("does not fit the context"), "{err}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Paris"), "{text:?}");
    assert!(
        text.lines().filter(|l| !l.trim().is_empty()).count() >= 2,
        "{text:?}"
    );
}

// ---- arbor bench and arbor profile-kv ----

/// Keys every `arbor bench --json` record has.
const BENCH_KEYS: &[&str] = &[
    "strategy",
    "width",
    "prompt_len",
    "gen_len",
    "sharing",
    "tokens_per_s",
    "steps_per_s",
    "step_p50_ms",
    "step_p99_ms",
    "kv_peak_bytes",
    "kv_bytes_per_unique_token",
    "generated_tokens",
    "processed_tokens",
    "steps",
    "wall_s",
    "model",
    "device",
    "kv_peak_pages",
    "page_bytes",
];

fn is_svg(path: &Path) -> bool {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let head = text.trim_start();
    (head.starts_with("<svg") || head.starts_with("<?xml")) && text.trim_end().ends_with("</svg>")
}

#[test]
fn bench_grid_reports_consistent_cells_csv_and_plots() {
    let dir = temp_dir("bench");
    let dir = dir.path();
    let m = fixture("qwen2");
    let out = arbor(&[
        "bench",
        "--model",
        &m,
        "--page-size",
        "8",
        "--strategy",
        "best-of-n,beam",
        "--width",
        "1,4",
        "--prompt-len",
        "16",
        "--gen-len",
        "8",
        "--sharing",
        "on,off",
        "--json",
        "--out",
        dir.to_str().expect("utf-8 path"),
    ]);
    let recs = json_lines(&out);
    assert_eq!(recs.len(), 8, "2 strategies × 2 widths × 2 sharing modes");
    let n = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap_or(-1.0);
    for r in &recs {
        for k in BENCH_KEYS {
            assert!(r.get(*k).is_some_and(|v| !v.is_null()), "{k} missing: {r}");
        }
        assert_eq!(n(r, "errors"), 0.0, "{r}");
        // Every branch generates exactly gen_len tokens (EOS ignored), one search per cell.
        assert_eq!(n(r, "generated_tokens"), n(r, "width") * 8.0, "{r}");
        assert_eq!(
            n(r, "kv_peak_bytes"),
            n(r, "kv_peak_pages") * n(r, "page_bytes")
        );
        assert!(n(r, "tokens_per_s") > 0.0 && n(r, "step_p99_ms") >= n(r, "step_p50_ms"));
        // CUDA graphs are a GPU matter: the keys are there, null on the CPU.
        for key in ["cuda_graph_replays", "cuda_tree_graph_replays"] {
            assert!(
                r.get(key).is_some_and(serde_json::Value::is_null),
                "{key}: {r}"
            );
        }
    }
    let cell = |s: &str, w: f64, sh: &str| {
        recs.iter()
            .find(|r| r["strategy"] == s && n(r, "width") == w && r["sharing"] == sh)
            .unwrap_or_else(|| panic!("no cell {s} {w} {sh}"))
    };
    for s in ["best-of-n", "beam"] {
        let (on, off) = (cell(s, 4.0, "on"), cell(s, 4.0, "off"));
        assert!(
            n(off, "kv_peak_pages") > n(on, "kv_peak_pages"),
            "{on}\n{off}"
        );
        // Off: each of the 4 branches computes and stores its own 2-page prompt (one of
        // them continues the prompt's own sequence, the other 3 compute it again).
        assert!(n(off, "kv_peak_pages") >= 8.0, "{off}");
        assert!(
            n(off, "processed_tokens") - n(on, "processed_tokens") >= 3.0 * 15.0,
            "{on}\n{off}"
        );
        assert!(n(off, "kv_bytes_per_unique_token") > n(on, "kv_bytes_per_unique_token"));
    }
    let csv = std::fs::read_to_string(dir.join("bench.csv")).expect("bench.csv");
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().expect("header").split(',').collect();
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), recs.len());
    for (row, r) in rows.iter().zip(&recs) {
        assert_eq!(row.len(), header.len(), "{row:?}");
        for k in [
            "strategy",
            "width",
            "sharing",
            "generated_tokens",
            "kv_peak_pages",
        ] {
            let i = header.iter().position(|h| h == &k).expect("column");
            let want = r[k].as_str().map_or(r[k].to_string(), str::to_string);
            assert_eq!(row[i], want, "{k}");
        }
    }
    for f in ["tokens_per_s_p16_g8.svg", "kv_peak_p16_g8.svg"] {
        assert!(is_svg(&dir.join(f)), "{f} is not an SVG");
    }
}

#[test]
fn bench_rejects_bad_grids() {
    let m = fixture("qwen2");
    fails_with(
        &arbor(&["bench", "--model", &m, "--strategy", "vote"]),
        "not benchmarked",
    );
    fails_with(
        &arbor(&["bench", "--model", &m, "--width", "0"]),
        "at least 1",
    );
    fails_with(
        &arbor(&["bench", "--model", &m, "--sharing", "maybe"]),
        "neither on nor off",
    );
    fails_with(
        &arbor(&["bench", "--model", &m, "--prompt-len", "200"]),
        "exceed the model's context",
    );
    fails_with(
        &arbor(&["bench", "--dummy-weights", "gpt-5", "--width", "1"]),
        "known shapes are smollm2-135m",
    );
}

/// `arbor bench attention` on the CPU kernels: one self-consistent JSON line per cell, the
/// byte counts of the trees it built, and cascade and paged outputs that agree.
#[test]
fn bench_attention_reports_consistent_cells() {
    let out = arbor(&[
        "bench",
        "attention",
        "--branches",
        "3,8",
        "--prefix",
        "64,40",
        "--suffix",
        "8",
        "--levels",
        "2,4",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--head-dim",
        "32",
        "--page-size",
        "16",
        "--reps",
        "2",
        "--copy-mib",
        "4",
    ]);
    let recs = json_lines(&out);
    assert_eq!(recs.len(), 8, "2 branch counts × 2 prefixes × 2 depths");
    let n = |r: &serde_json::Value, k: &str| {
        r[k].as_f64()
            .unwrap_or_else(|| panic!("{k} missing or not a number: {r}"))
    };
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * a.abs().max(b.abs());
    // K and V of one position over 2 KV heads × 32 dims, f32 on the CPU.
    let per_pos = 2.0 * 2.0 * 32.0 * 4.0;
    let copy_bw = n(&recs[0], "copy_bw_gbs");
    assert!(copy_bw > 0.0);
    for r in &recs {
        let (b, p, s, levels) = (n(r, "b"), n(r, "p"), n(r, "s"), n(r, "levels"));
        let (cascade, paged) = (n(r, "cascade_ms"), n(r, "paged_ms"));
        assert!(cascade > 0.0 && paged > 0.0, "{r}");
        assert!(close(n(r, "speedup"), paged / cascade), "{r}");
        let unique = n(r, "unique_kv_bytes");
        let bw = n(r, "unique_bw_gbs");
        assert!(close(bw, unique / (cascade * 1e-3) / 1e9), "{r}");
        assert_eq!(n(r, "copy_bw_gbs"), copy_bw, "one copy measurement per run");
        assert!(close(n(r, "frac_of_copy_bw"), bw / copy_bw), "{r}");
        assert_eq!(n(r, "rows"), b);
        // Every branch reads its whole context alone; the tree holds each token once.
        let depth = levels - 1.0;
        assert_eq!(
            n(r, "paged_kv_bytes_read"),
            b * (p + depth * s) * per_pos,
            "{r}"
        );
        if levels == 2.0 {
            assert_eq!(unique, (p + b * s) * per_pos, "{r}");
        }
        let read = n(r, "kv_bytes_read");
        assert!(unique <= read && read <= n(r, "paged_kv_bytes_read"), "{r}");
        if b > 1.0 {
            assert!(
                read < n(r, "paged_kv_bytes_read"),
                "sharing must save reads: {r}"
            );
        }
        assert!(
            n(r, "max_abs_diff") < 1e-5,
            "cascade and paged disagree: {r}"
        );
        assert!(r["device"].as_str().is_some_and(|d| d.starts_with("cpu")));
    }
    // Page-aligned prefix of 64 tokens: the flat tree reads each unique byte exactly once.
    let aligned = recs
        .iter()
        .find(|r| n(r, "p") == 64.0 && n(r, "levels") == 2.0)
        .expect("cell");
    assert_eq!(n(aligned, "kv_bytes_read"), n(aligned, "unique_kv_bytes"));
    assert!(
        recs.iter().all(|r| r["sparse_ms"].is_null()),
        "no budget, no sparse"
    );

    // Sparse: 2 pages per row keep part of the reads; a budget above every page keeps all of
    // them and gives the dense output exactly.
    for (budget, all) in [("2", false), ("1000", true)] {
        let out = arbor(&[
            "bench",
            "attention",
            "--branches",
            "2",
            "--prefix",
            "256",
            "--suffix",
            "8",
            "--levels",
            "2",
            "--heads",
            "4",
            "--kv-heads",
            "2",
            "--head-dim",
            "32",
            "--reps",
            "2",
            "--copy-mib",
            "4",
            "--sparse-budget",
            budget,
        ]);
        let r = &json_lines(&out)[0];
        let frac = n(r, "sparse_reads_frac");
        assert!(
            close(
                n(r, "sparse_speedup"),
                n(r, "cascade_ms") / n(r, "sparse_ms")
            ),
            "{r}"
        );
        if all {
            assert_eq!(frac, 1.0, "{r}");
            assert_eq!(n(r, "sparse_max_abs_diff"), 0.0, "{r}");
        } else {
            assert!(frac > 0.0 && frac < 1.0, "{r}");
            assert!(n(r, "sparse_max_abs_diff") > 0.0, "{r}");
        }
    }

    fails_with(
        &arbor(&["bench", "attention", "--levels", "1"]),
        "at least 2 levels",
    );
    fails_with(
        &arbor(&["bench", "attention", "--heads", "4", "--kv-heads", "3"]),
        "must divide",
    );
    fails_with(
        &arbor(&["bench", "attention", "--branches", "0"]),
        "at least 1",
    );
}

#[test]
fn profile_kv_writes_a_timeline_and_a_fits_table() {
    let dir = temp_dir("profile-kv");
    let dir = dir.path();
    let m = fixture("qwen2");
    let out = arbor(&[
        "profile-kv",
        "--model",
        &m,
        "--width",
        "4",
        "--prompt-tokens",
        "32",
        "--gen-tokens",
        "16",
        "--out",
        dir.to_str().expect("utf-8 path"),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "Fits",
        "need = weights",
        "24 GB",
        "48 GB",
        "80 GB",
        "141 GB",
    ] {
        assert!(text.contains(want), "no {want:?} in {text}");
    }
    let csv = std::fs::read_to_string(dir.join("kv_timeline.csv")).expect("timeline");
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("step,t_ms,pages_in_use,pages_cached,kv_bytes,unique_tokens,gpu_mem_used_bytes")
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    // One prompt step, then 16 sampling steps and the last write.
    assert_eq!(rows.len(), 18);
    let mut per_page = None;
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r.len(), 7, "{r:?}");
        assert_eq!(r[0], (i + 1).to_string());
        let v: Vec<f64> = r[1..6].iter().map(|x| x.parse().expect("number")).collect();
        assert!(r[6].is_empty() || r[6].parse::<u64>().is_ok());
        let bytes_per_page = v[3] / v[1];
        assert_eq!(*per_page.get_or_insert(bytes_per_page), bytes_per_page);
    }
    assert!(is_svg(&dir.join("kv_timeline.svg")));
}

// ---- arbor search ----

#[test]
fn search_with_a_reward_model_beside_the_policy() {
    let orm = format!("orm:{}", fixture("reward-orm"));
    let out = arbor(&[
        "search",
        "-m",
        &fixture("qwen2"),
        "--strategy",
        "best-of-n",
        "--width",
        "3",
        "-P",
        "max_tokens=6",
        "--prompt",
        "hello",
        "--verifier",
        &orm,
    ]);
    let v = &json_lines(&out)[0];
    assert_eq!(v["verifier"][0], orm.as_str());
    let cands = v["candidates"].as_array().expect("candidates");
    assert_eq!(cands.len(), 3);
    for c in cands {
        let s = c["score"].as_f64().expect("scored");
        assert!(s > 0.0 && s < 1.0, "{s}");
    }
    assert!(v["accounting"]["verifier_tokens"].as_u64().unwrap() > 0);
    // The wrong kind of model, and a model spec that does not load, fail clearly.
    let prm = format!("prm:{}", fixture("reward-orm"));
    let out = arbor(&[
        "search",
        "-m",
        &fixture("qwen2"),
        "--strategy",
        "best-of-n",
        "--prompt",
        "x",
        "--verifier",
        &prm,
    ]);
    fails_with(&out, "ForTokenClassification");
    let out = arbor(&[
        "search",
        "-m",
        &fixture("qwen2"),
        "--strategy",
        "best-of-n",
        "--prompt",
        "x",
        "--verifier",
        "judge:/no/such/model",
    ]);
    fails_with(&out, "/no/such/model");
}

#[test]
fn adaptive_over_a_dataset_pools_its_budget() {
    let dir = temp_dir("adaptive");
    let dir = dir.path();
    let data = dir.join("d.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\":\"What is 2+2?\"}\n{\"prompt\":\"What is 3+5?\"}\n{\"prompt\":\"Name a colour.\"}\n",
    )
    .unwrap();
    let out = arbor(&[
        "search",
        "-m",
        &fixture("qwen2"),
        "--strategy",
        "adaptive",
        "--width",
        "4",
        "-P",
        "budget=4",
        "-P",
        "probe=2",
        "-P",
        "max_tokens=6",
        "--dataset",
        data.to_str().unwrap(),
        "--verifier",
        "regex:^ [a-z]",
    ]);
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 3);
    let drawn: usize = lines
        .iter()
        .map(|v| v["candidates"].as_array().unwrap().len())
        .sum();
    let err = String::from_utf8_lossy(&out.stderr);
    let granted: usize = err
        .split("adaptive: ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no pool summary: {err}"));
    // Every prompt draws its 2 probes; the pool's grants are drawn in full, never more than
    // the 3 × (4 − 2) it holds.
    assert_eq!(drawn, 6 + granted, "{err}");
    assert!(granted <= 6);
}

/// A MoE model's bench cells report how evenly tokens spread over the experts, in the JSON,
/// bench.csv and expert_load.csv; a dense model's leave those empty.
#[test]
fn bench_reports_expert_load_of_moe_models() {
    let dir = temp_dir("bench-moe");
    let dir = dir.path();
    let m = fixture("qwen2-moe");
    let out = arbor(&[
        "bench",
        "--model",
        &m,
        "--strategy",
        "sampling",
        "--width",
        "1,4",
        "--prompt-len",
        "16",
        "--gen-len",
        "8",
        "--sharing",
        "on",
        "--json",
        "--out",
        dir.to_str().expect("utf-8 path"),
    ]);
    let recs = json_lines(&out);
    assert_eq!(recs.len(), 2);
    for r in &recs {
        let l = &r["expert_load"];
        let f = |k: &str| l[k].as_f64().unwrap_or_else(|| panic!("{k} missing: {r}"));
        // qwen2-moe: 2 MoE layers of 8 experts, top-4; every computed token is routed.
        assert_eq!((f("moe_layers"), f("experts")), (2.0, 8.0), "{r}");
        let processed = r["processed_tokens"].as_f64().expect("processed");
        assert_eq!(f("assignments"), processed * 4.0 * 2.0, "{r}");
        assert_eq!(f("mean_tokens"), f("assignments") / 16.0, "{r}");
        assert!(
            f("max_tokens") >= f("mean_tokens") && f("imbalance") >= 1.0,
            "{r}"
        );
        assert!(f("max_layer_imbalance") >= f("imbalance") && f("step_imbalance") >= 1.0);
    }
    let csv = std::fs::read_to_string(dir.join("bench.csv")).expect("bench.csv");
    let header: Vec<&str> = csv.lines().next().expect("header").split(',').collect();
    let col = header
        .iter()
        .position(|h| *h == "expert_load.imbalance")
        .expect("imbalance column");
    for row in csv.lines().skip(1) {
        assert!(
            row.split(',')
                .nth(col)
                .is_some_and(|v| v.parse::<f64>().is_ok()),
            "{row}"
        );
    }
    let per = std::fs::read_to_string(dir.join("expert_load.csv")).expect("expert_load.csv");
    let rows: Vec<Vec<&str>> = per
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    assert_eq!(rows.len(), 2 * 2 * 8, "2 cells × 2 MoE layers × 8 experts");
    let cell0: f64 = rows
        .iter()
        .filter(|r| r[0] == "0")
        .map(|r| r[8].parse::<f64>().expect("tokens"))
        .sum();
    assert_eq!(
        cell0,
        recs[0]["expert_load"]["assignments"].as_f64().expect("n")
    );
}
