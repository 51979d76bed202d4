//! The code verifier: runs each candidate program on the examples its prompt gives and scores
//! it by the examples it passes, and groups candidates that behave identically on them.

use super::examples::{defined_functions, extract_examples, Example};
use super::subprocess::run_with_timeout;
use super::{TextVerifier, Verdict};
use regex::Regex;
use std::hash::{Hash, Hasher};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// The Python program that loads a candidate under limits and reports on every example.
const HARNESS: &str = include_str!("harness.py");

/// Runs Python candidates on the prompt's worked examples (see [`extract_examples`]).
///
/// The program run is the prompt's code (its fenced block, or the prompt itself when it is
/// code) followed by the candidate's code (its last fenced block that defines a function, or
/// the whole answer). So a body-only completion finishes the prompt's function, and a full
/// function redefines it; the prompt's imports and helpers are there either way.
///
/// Score: the fraction of examples passed (with no examples: 1 if the program loads, else 0).
/// Group ([`Verdict::group`]): a hash of the outputs on every example, so candidates that
/// behave identically share it. Best-of-N picks among the candidates passing the most
/// examples one of the largest group (AlphaCode-style clustering), and inside it the one the
/// policy found most likely (highest mean token log-probability): programs that agree on the
/// examples can still differ elsewhere, and the likelier one was more often right.
///
/// Sandbox: a separate `python3 -I` process in an empty temporary directory with a cleared
/// environment, an address-space limit, a CPU-time limit, a 1 MB file-size limit, a per-example
/// alarm and a wall-clock kill. It contains runaway programs; it is not a security boundary
/// against hostile code (no network or filesystem isolation).
pub struct CodeVerifier {
    /// The Python interpreter.
    pub python: String,
    /// Wall-clock limit for one candidate (all its examples).
    pub timeout: Duration,
    /// Address-space limit of the candidate process.
    pub mem_bytes: u64,
    /// Limit for one example call.
    pub example_timeout: Duration,
}

impl CodeVerifier {
    /// A verifier running `python` with the default limits: 10 s per candidate, 1 s per
    /// example, 1 GiB of address space.
    pub fn new(python: &str) -> Self {
        CodeVerifier {
            python: python.to_string(),
            timeout: Duration::from_secs(10),
            mem_bytes: 1 << 30,
            example_timeout: Duration::from_secs(1),
        }
    }

    /// What running `answer` on the examples of `question` did.
    pub fn run(&self, question: &str, answer: &str) -> Result<Report, String> {
        let examples = extract_examples(question);
        let program = program(question, answer);
        let input = serde_json::json!({
            "program": program,
            "examples": examples.iter().map(|e| [&e.call, &e.expected]).collect::<Vec<_>>(),
            "mem_bytes": self.mem_bytes,
            "cpu_s": self.timeout.as_secs().max(1),
            "example_s": self.example_timeout.as_secs_f64(),
        });
        let dir = scratch_dir()?;
        let mut cmd = Command::new(&self.python);
        cmd.arg("-I")
            .arg("-c")
            .arg(HARNESS)
            .current_dir(&dir)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default());
        let done = run_with_timeout(cmd, input.to_string().as_bytes(), self.timeout);
        let _ = std::fs::remove_dir_all(&dir);
        let done = match done {
            Ok(d) => d,
            Err(e) if e.starts_with("cannot start") => {
                return Err(format!(
                    "code verifier: {e} ('{}'); install Python 3 or name an interpreter with \
                     --verifier code:/path/to/python3",
                    self.python
                ))
            }
            // A runaway candidate is a failed candidate, not a verifier error.
            Err(e) => return Ok(Report::failed(&examples, e)),
        };
        match serde_json::from_str::<serde_json::Value>(&done.stdout) {
            Ok(v) => Ok(Report::from_json(&v, &examples)),
            Err(_) => Ok(Report::failed(
                &examples,
                format!("the candidate ended the process ({})", done.status),
            )),
        }
    }
}

/// The outcome of one candidate.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// The program loaded (no syntax error, no exception at top level).
    pub loaded: bool,
    /// Why it did not load or did not finish.
    pub error: Option<String>,
    /// Per example: passed, and the result's `repr` (or `!ErrorType`).
    pub examples: Vec<(bool, String)>,
}

impl Report {
    fn failed(examples: &[Example], why: String) -> Self {
        Report {
            loaded: false,
            error: Some(why),
            examples: vec![(false, "!".into()); examples.len()],
        }
    }

    fn from_json(v: &serde_json::Value, examples: &[Example]) -> Self {
        let results: Vec<(bool, String)> = v["examples"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|r| {
                        let shown = r[1].as_str().unwrap_or("!").to_string();
                        (r[0].as_bool().unwrap_or(false), shown)
                    })
                    .collect()
            })
            .unwrap_or_default();
        let loaded = v["compiled"].as_bool().unwrap_or(false);
        Report {
            loaded,
            error: v["error"].as_str().map(str::to_string),
            examples: if loaded && results.len() == examples.len() {
                results
            } else {
                vec![(false, "!".into()); examples.len()]
            },
        }
    }

    /// Examples passed over examples given (1/0 for loaded/not when there are none).
    pub fn pass_fraction(&self) -> f64 {
        if self.examples.is_empty() {
            return if self.loaded { 1.0 } else { 0.0 };
        }
        self.examples.iter().filter(|e| e.0).count() as f64 / self.examples.len() as f64
    }

    /// What identifies identical behaviour: the outputs on every example.
    fn signature(&self) -> Option<String> {
        self.loaded.then(|| {
            self.examples
                .iter()
                .map(|e| e.1.as_str())
                .collect::<Vec<_>>()
                .join("\u{1f}")
        })
    }
}

impl TextVerifier for CodeVerifier {
    fn name(&self) -> String {
        format!("code:{}", self.python)
    }

    fn score(&mut self, question: &str, answer: &str) -> Result<f64, String> {
        Ok(self.run(question, answer)?.pass_fraction())
    }

    fn verdict(&mut self, question: &str, answer: &str) -> Result<Verdict, String> {
        let report = self.run(question, answer)?;
        let group = report.signature().map(|sig| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            sig.hash(&mut h);
            h.finish()
        });
        Ok(Verdict {
            score: report.pass_fraction(),
            group,
        })
    }
}

/// The program a candidate stands for: the prompt's code, then the candidate's.
pub fn program(question: &str, answer: &str) -> String {
    let prompt_code = match last_block(question, false) {
        Some(code) => code.to_string(),
        None if looks_like_code(question) => question.to_string(),
        None => String::new(),
    };
    let candidate = last_block(answer, true).unwrap_or(answer);
    format!("{prompt_code}\n\n{candidate}\n")
}

/// The last fenced code block of `text` (an unclosed last fence runs to the end); with
/// `prefer_def`, the last one that defines a function, if any does.
fn last_block(text: &str, prefer_def: bool) -> Option<&str> {
    static FENCE: OnceLock<Regex> = OnceLock::new();
    let re = FENCE
        .get_or_init(|| Regex::new(r"(?s)```[A-Za-z0-9_+.-]*[ \t]*\r?\n(.*?)(?:```|\z)").unwrap());
    let blocks: Vec<&str> = re
        .captures_iter(text)
        .filter_map(|c| c.get(1).map(|m| m.as_str()))
        .collect();
    let with_def = || {
        blocks
            .iter()
            .rev()
            .find(|b| !defined_functions(b).is_empty())
    };
    prefer_def
        .then(with_def)
        .flatten()
        .or(blocks.last())
        .copied()
}

/// Whether a prompt without a fence is itself code (a raw completion prompt).
fn looks_like_code(text: &str) -> bool {
    let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    ["def ", "import ", "from ", "class ", "@", "#", "\"\"\""]
        .iter()
        .any(|k| first.starts_with(k))
}

/// A fresh empty directory for one candidate run.
fn scratch_dir() -> Result<std::path::PathBuf, String> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "arbor-code-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir)
        .map_err(|e| format!("code verifier: cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROMPT: &str = "Complete the function.\n```python\ndef add(a, b):\n    \"\"\"Adds.\n    >>> add(1, 2)\n    3\n    >>> add(-1, 1)\n    0\n    add(2, 2) == 4\n    \"\"\"\n```";

    fn python() -> Option<CodeVerifier> {
        let ok = Command::new("python3")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            eprintln!("SKIPPED: no python3 on PATH for the code verifier tests");
        }
        ok.then(|| CodeVerifier::new("python3"))
    }

    #[test]
    fn programs_join_prompt_and_candidate() {
        let p = program(
            PROMPT,
            "Sure:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.",
        );
        assert!(p.starts_with("def add(a, b):\n    \"\"\"Adds."), "{p}");
        assert!(p.trim_end().ends_with("return a + b"), "{p}");
        // A body-only completion of a raw code prompt finishes the prompt's function.
        let p = program("def f():\n    \"\"\"Doc.\"\"\"\n", "    return 1");
        assert!(p.contains("\"\"\"Doc.\"\"\"\n\n\n    return 1"), "{p}");
        // An unclosed fence (cut by a stop string) still yields its code.
        assert_eq!(last_block("```py\nx = 1\n", true), Some("x = 1\n"));
    }

    #[test]
    fn scores_by_examples_passed() {
        let Some(mut v) = python() else { return };
        let good = "```python\ndef add(a, b):\n    return a + b\n```";
        let half = "```python\ndef add(a, b):\n    return a + b if a > 0 else 7\n```";
        let broken = "```python\ndef add(a, b) return\n```";
        let r = v.run(PROMPT, good).unwrap();
        assert_eq!(r.examples.len(), 3);
        assert!(r.loaded && r.pass_fraction() == 1.0, "{r:?}");
        assert!((v.run(PROMPT, half).unwrap().pass_fraction() - 2.0 / 3.0).abs() < 1e-9);
        let r = v.run(PROMPT, broken).unwrap();
        assert!(!r.loaded && r.error.as_deref().unwrap_or("").contains("SyntaxError"));
        assert_eq!(v.score(PROMPT, broken), Ok(0.0));
    }

    #[test]
    fn runaway_candidates_fail_within_limits() {
        let Some(mut v) = python() else { return };
        v.timeout = Duration::from_secs(5);
        v.example_timeout = Duration::from_millis(200);
        let spin = "```python\ndef add(a, b):\n    while True: pass\n```";
        let t0 = std::time::Instant::now();
        let r = v.run(PROMPT, spin).unwrap();
        assert_eq!(r.pass_fraction(), 0.0);
        assert!(r.examples.iter().all(|e| e.1 == "!ExampleTimeout"), "{r:?}");
        assert!(t0.elapsed() < Duration::from_secs(4));
        let hog = "```python\ndef add(a, b):\n    return len(bytearray(8 << 30))\n```";
        assert_eq!(v.run(PROMPT, hog).unwrap().pass_fraction(), 0.0);
        let quits = "```python\nimport os\nos._exit(0)\n```";
        assert!(!v.run(PROMPT, quits).unwrap().loaded);
        let chatty =
            "```python\nprint('{\"compiled\": true}')\ndef add(a, b):\n    return a + b\n```";
        assert_eq!(v.run(PROMPT, chatty).unwrap().pass_fraction(), 1.0);
    }

    #[test]
    fn identical_behaviour_shares_a_group() {
        let Some(mut v) = python() else { return };
        // Neither passes add(-1, 1) == 0, both pass the other two; `a` written three ways
        // behaves one way, `b` another.
        let a = |k: u32| {
            format!(
                "```python\ndef add(a, b):\n    {}return abs(a) + b\n```",
                "x = 1; ".repeat(k as usize)
            )
        };
        let b = "```python\ndef add(a, b):\n    return a + b if a >= 0 else 99\n```";
        let va: Vec<Verdict> = (0..3).map(|k| v.verdict(PROMPT, &a(k)).unwrap()).collect();
        let vb = v.verdict(PROMPT, b).unwrap();
        assert!(va
            .iter()
            .chain([&vb])
            .all(|x| (x.score - 2.0 / 3.0).abs() < 1e-9));
        assert!(va[0].group.is_some() && va.iter().all(|x| x.group == va[0].group));
        assert!(vb.group.is_some() && vb.group != va[0].group);
        // A program that does not load has no behaviour to share.
        let broken = v.verdict(PROMPT, "```python\ndef add(a, b) return\n```");
        assert_eq!(broken.unwrap().group, None);
    }

    #[test]
    fn a_missing_interpreter_is_a_clear_error() {
        let mut v = CodeVerifier::new("/nonexistent/python3");
        let e = v.score(PROMPT, "x").unwrap_err();
        assert!(
            e.contains("cannot start") && e.contains("--verifier code:"),
            "{e}"
        );
    }
}
