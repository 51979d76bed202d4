//! Verifiers: what scores a candidate. Text verifiers (rules, an external command, running
//! candidate programs) run on the
//! host as soon as they are asked; model verifiers (LM-as-judge) become sequences of the
//! scheduler and run in the same engine steps as the policy.

mod code;
mod command;
mod examples;
mod rule;
mod subprocess;

pub use code::CodeVerifier;
pub use command::CommandVerifier;
pub use examples::{extract_examples, Example};
pub use rule::RuleVerifier;

/// A verifier's finding on one candidate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Verdict {
    /// Higher is better.
    pub score: f64,
    /// The candidate's behaviour class, where the verifier can tell: candidates of one
    /// question with the same group behaved identically (e.g. the same outputs on every
    /// example). Among equal scores, selection prefers the largest group.
    pub group: Option<u64>,
}

/// Scores a candidate answer's text for a question; higher is better.
pub trait TextVerifier: Send {
    /// Short name shown in results (e.g. "command:./check.py").
    fn name(&self) -> String;
    /// The score of `answer` to `question`, or why it could not be computed.
    fn score(&mut self, question: &str, answer: &str) -> Result<f64, String>;
    /// The score with the candidate's behaviour group; verifiers that cannot tell behaviours
    /// apart give none.
    fn verdict(&mut self, question: &str, answer: &str) -> Result<Verdict, String> {
        Ok(Verdict {
            score: self.score(question, answer)?,
            group: None,
        })
    }
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
    /// The score from the log-probabilities of the yes and the no token:
    /// p(yes) / (p(yes) + p(no)).
    pub fn probability(logp_yes: f64, logp_no: f64) -> f64 {
        let m = logp_yes.max(logp_no);
        let (y, n) = ((logp_yes - m).exp(), (logp_no - m).exp());
        y / (y + n)
    }

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
    /// A verifier model the scheduler runs beside the policy (a reward model, or another LM
    /// as judge): lane `lane` of [`crate::Scheduler::add_verifier_model`].
    Model { lane: usize, name: String },
}

impl Verifier {
    /// Name shown in results.
    pub fn name(&self) -> String {
        match self {
            Verifier::Text(t) => t.name(),
            Verifier::Judge(_) => "judge:policy".into(),
            Verifier::Model { name, .. } => name.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judge_prompt_fills_the_template() {
        let j = Judge::default();
        let p = j.prompt("2+2?", "4");
        assert!(p.contains("2+2?") && p.contains("4") && p.contains("Yes or No"));
    }
}
