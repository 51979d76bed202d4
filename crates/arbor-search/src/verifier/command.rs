//! An external command as the verifier: JSON on stdin, a number on stdout.

use super::subprocess::run_with_timeout;
use super::TextVerifier;
use std::process::Command;
use std::time::Duration;

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
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(&self.command);
        let input = serde_json::json!({ "question": question, "answer": answer }).to_string();
        let done = run_with_timeout(cmd, input.as_bytes(), self.timeout).map_err(fail)?;
        let (status, out) = (done.status, done.stdout);
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
}
