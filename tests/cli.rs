//! End-to-end tests of the `arbor` binary: real runs on fixture models and the default
//! model, and bad input that must end in a clear error and a non-zero exit, never a panic.

use std::path::{Path, PathBuf};
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

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("arbor-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
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
    copy_fixture("llama", &d, "tokenizer.json");
    fails_with(
        &arbor(&["run", "-m", d.to_str().unwrap(), "-p", "x"]),
        "tokenizer.json",
    );
    let d = temp_dir("bert");
    copy_fixture("llama", &d, "config.json");
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
