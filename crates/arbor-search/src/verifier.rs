//! Verifiers: what scores a candidate. Text verifiers (rules, an external command) run on the
//! host as soon as they are asked; model verifiers (LM-as-judge) become sequences of the
//! scheduler and run in the same engine steps as the policy.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Scores a candidate answer's text for a question; higher is better.
pub trait TextVerifier: Send {
    /// Short name shown in results (e.g. "command:./check.py").
    fn name(&self) -> String;
    /// The score of `answer` to `question`, or why it could not be computed.
    fn score(&mut self, question: &str, answer: &str) -> Result<f64, String>;
}

/// LM-as-judge: the probability that the model answers `yes` (rather than `no`) after a judging
/// prompt that shows the question and the candidate. Works with any causal LM the scheduler
/// runs; by default the policy judges its own candidates.
#[derive(Clone, Debug, PartialEq)]
pub struct Judge {
    /// The judging prompt; `{question}` and `{answer}` are replaced. It is sent as a user
    /// message through the model's chat template when the model has one.
    pub template: String,
    /// The reply meaning "correct" (its first token is scored).
    pub yes: String,
    /// The reply meaning "incorrect".
    pub no: String,
}

impl Default for Judge {
    fn default() -> Self {
        Judge {
            template: "Question:\n{question}\n\nProposed answer:\n{answer}\n\nIs the proposed \
                       answer correct? Reply with Yes or No."
                .into(),
            yes: "Yes".into(),
            no: "No".into(),
        }
    }
}

impl Judge {
    /// The judging prompt for one candidate.
    pub fn prompt(&self, question: &str, answer: &str) -> String {
        self.template
            .replace("{question}", question)
            .replace("{answer}", answer)
    }
}

/// One verifier of a search.
pub enum Verifier {
    /// Scored on the host.
    Text(Box<dyn TextVerifier>),
    /// LM-as-judge on the policy model.
    Judge(Judge),
}

impl Verifier {
    /// Name shown in results.
    pub fn name(&self) -> String {
        match self {
            Verifier::Text(t) => t.name(),
            Verifier::Judge(_) => "judge:policy".into(),
        }
    }
}

/// Rule-based: 1.0 when the candidate's extracted answer (\boxed{}, "the answer is", last
/// number; see [`crate::answer`]) equals an expected answer after normalisation, or when a
/// pattern matches the candidate's text; 0.0 otherwise.
pub enum RuleVerifier {
    Expected(String),
    Regex(regex::Regex),
}

impl RuleVerifier {
    /// Compares extracted answers with `answer`.
    pub fn expected(answer: &str) -> Self {
        RuleVerifier::Expected(answer.to_string())
    }
    /// Matches `pattern` anywhere in the candidate.
    pub fn regex(pattern: &str) -> Result<Self, String> {
        regex::Regex::new(pattern)
            .map(RuleVerifier::Regex)
            .map_err(|e| format!("verifier pattern '{pattern}': {e}"))
    }
}

impl TextVerifier for RuleVerifier {
    fn name(&self) -> String {
        match self {
            RuleVerifier::Expected(_) => "rule:answer".into(),
            RuleVerifier::Regex(r) => format!("regex:{}", r.as_str()),
        }
    }
    fn score(&mut self, _question: &str, answer: &str) -> Result<f64, String> {
        let ok = match self {
            RuleVerifier::Expected(want) => crate::answer::extract(answer)
                .is_some_and(|got| crate::answer::exact_match(&got, want)),
            RuleVerifier::Regex(r) => r.is_match(answer),
        };
        Ok(if ok { 1.0 } else { 0.0 })
    }
}

/// Runs a shell command per candidate: it reads `{"question": …, "answer": …}` as JSON on
/// stdin and prints a number on stdout. A non-zero exit, no number, or running past the
/// timeout is an error naming the command.
pub struct CommandVerifier {
    pub command: String,
    pub timeout: Duration,
}

impl TextVerifier for CommandVerifier {
    fn name(&self) -> String {
        format!("command:{}", self.command)
    }

    fn score(&mut self, question: &str, answer: &str) -> Result<f64, String> {
        let fail = |what: String| format!("verifier command '{}': {what}", self.command);
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(&self.command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| fail(format!("cannot start: {e}")))?;
        let input = serde_json::json!({ "question": question, "answer": answer }).to_string();
        if let Some(mut stdin) = child.stdin.take() {
            // A command that does not read its input is fine.
            let _ = stdin.write_all(input.as_bytes());
        }
        let mut stdout = child.stdout.take().expect("piped");
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        });
        let t0 = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) if t0.elapsed() > self.timeout => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(fail(format!("no answer within {:?}", self.timeout)));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(2)),
                Err(e) => return Err(fail(e.to_string())),
            }
        };
        let out = reader.join().unwrap_or_default();
        if !status.success() {
            return Err(fail(format!("exited with {status}")));
        }
        out.split_whitespace()
            .next()
            .and_then(|w| w.parse::<f64>().ok())
            .filter(|x| x.is_finite())
            .ok_or_else(|| fail(format!("printed no number: {:?}", out.trim())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(c: &str, ms: u64) -> CommandVerifier {
        CommandVerifier {
            command: c.into(),
            timeout: Duration::from_millis(ms),
        }
    }

    #[test]
    fn command_verifier_reads_json_and_prints_a_score() {
        let mut v = cmd("grep -q '\"answer\":\"42\"' && echo 1 || echo 0", 5000);
        assert_eq!(v.score("q", "42"), Ok(1.0));
        assert_eq!(v.score("q", "41"), Ok(0.0));
    }

    #[test]
    fn command_verifier_errors_are_clear() {
        let e = cmd("exit 3", 5000).score("q", "a").unwrap_err();
        assert!(e.contains("exit 3") && e.contains("exited"), "{e}");
        let e = cmd("echo hello", 5000).score("q", "a").unwrap_err();
        assert!(e.contains("no number"), "{e}");
        let e = cmd("sleep 5", 100).score("q", "a").unwrap_err();
        assert!(e.contains("within"), "{e}");
    }

    #[test]
    fn rule_verifier_extracts_and_compares() {
        let mut v = RuleVerifier::expected("1,000");
        assert_eq!(v.score("q", "so the answer is \\boxed{1000}"), Ok(1.0));
        assert_eq!(v.score("q", "it is 999"), Ok(0.0));
        assert_eq!(v.score("q", "no idea"), Ok(0.0));
        let mut r = RuleVerifier::regex("(?i)paris").unwrap();
        assert_eq!(r.score("q", "It is PARIS."), Ok(1.0));
        assert!(RuleVerifier::regex("(").is_err());
    }

    #[test]
    fn judge_prompt_fills_the_template() {
        let j = Judge::default();
        let p = j.prompt("2+2?", "4");
        assert!(p.contains("2+2?") && p.contains("4") && p.contains("Yes or No"));
    }
}
