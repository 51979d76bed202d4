//! Rule-based scoring: extracted answers compared with an expected one, or a pattern.

use super::TextVerifier;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
