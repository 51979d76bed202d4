//! Tokenizer tests: llama.cpp's vocabulary golden files, round trips, incremental decoding,
//! chat templates, `tokenizer.json` loading and malformed vocabularies.
//!
//! The golden cases are llama.cpp's `ggml-vocab-*.gguf` with `.gguf.inp` / `.gguf.out` in
//! `tests/fixtures/vocab/` (override the folder with `ARBOR_VOCAB_DIR`), read and run as
//! llama.cpp's `test-tokenizer-0` does: cases separated by `\n__ggml_vocab_test__\n`, expected
//! ids one line per case, no BOS added, special tokens not parsed.

use arbor_runtime::gguf::{parse, GgufFile};
use arbor_runtime::{
    ChatMessage, ChatTemplate, IncrementalDecoder, RuntimeError, TokenKind, Tokenizer,
};
use std::path::{Path, PathBuf};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn vocab_dir() -> PathBuf {
    match std::env::var_os("ARBOR_VOCAB_DIR") {
        Some(d) => PathBuf::from(d),
        None => repo_root().join("tests/fixtures/vocab"),
    }
}

/// The fixture folder, or `None` (with a note) when it has not been added to the checkout at
/// all. Once the folder exists, every file the tests name must be in it.
fn fixtures() -> Option<PathBuf> {
    let dir = vocab_dir();
    if dir.is_dir() {
        Some(dir)
    } else {
        println!(
            "skipped: {} does not exist (llama.cpp vocab fixtures)",
            dir.display()
        );
        None
    }
}

/// Reads `inp`/`out` as test-tokenizer-0 does.
fn read_cases(inp: &Path, out: &Path) -> Cases {
    let raw = std::fs::read_to_string(inp).unwrap_or_else(|e| panic!("{}: {e}", inp.display()));
    let expected =
        std::fs::read_to_string(out).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
    const SEP: &str = "\n__ggml_vocab_test__\n";
    let mut inputs = Vec::new();
    let mut rest = raw.as_str();
    while !rest.is_empty() {
        match rest.find(SEP) {
            Some(at) => {
                inputs.push(rest[..at].to_string());
                rest = &rest[at + SEP.len()..];
            }
            None => {
                inputs.push(rest.to_string());
                break;
            }
        }
    }
    let outputs: Vec<Vec<u32>> = expected
        .lines()
        .map(|l| {
            l.split_whitespace()
                .map(|t| t.parse().expect("token id"))
                .collect()
        })
        .collect();
    assert_eq!(
        inputs.len(),
        outputs.len(),
        "{}: inputs and outputs differ in number",
        inp.display()
    );
    inputs.into_iter().zip(outputs).collect()
}

/// Golden cases: input text and the ids llama.cpp gives.
type Cases = Vec<(String, Vec<u32>)>;

fn load_vocab(name: &str) -> Option<(Tokenizer, Cases)> {
    let dir = fixtures()?;
    let gguf = dir.join(format!("ggml-vocab-{name}.gguf"));
    let file = GgufFile::open(&gguf).unwrap_or_else(|e| panic!("{}: {e}", gguf.display()));
    let tok = Tokenizer::from_gguf(&file).unwrap_or_else(|e| panic!("{name}: {e}"));
    let cases = read_cases(
        &dir.join(format!("ggml-vocab-{name}.gguf.inp")),
        &dir.join(format!("ggml-vocab-{name}.gguf.out")),
    );
    Some((tok, cases))
}

/// Encodes every case and reports all mismatches at once.
fn check_golden(name: &str, tok: &Tokenizer, cases: &[(String, Vec<u32>)]) {
    check_golden_with(name, tok, cases, false);
}

/// As [`check_golden`], choosing whether special tokens written in the text are parsed.
fn check_golden_with(
    name: &str,
    tok: &Tokenizer,
    cases: &[(String, Vec<u32>)],
    parse_special: bool,
) {
    let mut failures = Vec::new();
    for (text, want) in cases {
        let got = tok
            .encode(text, false, parse_special)
            .unwrap_or_else(|e| panic!("{name}: {text:?}: {e}"));
        if &got != want {
            failures.push(format!("  {text:?}\n    want {want:?}\n    got  {got:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{name}: {} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    println!("{name}: {} cases match llama.cpp", cases.len());
}

fn check_round_trip(name: &str, tok: &Tokenizer, cases: &[(String, Vec<u32>)]) {
    for (text, _) in cases {
        let ids = tok
            .encode(text, false, false)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            &tok.decode(&ids, false),
            text,
            "{name}: decode(encode(s)) != s"
        );
    }
}

mod chat;
mod decode;
mod goldens;
mod sources;
