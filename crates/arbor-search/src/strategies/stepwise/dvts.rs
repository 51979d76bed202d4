//! `dvts`: diverse verifier tree search (Beeching, Tunstall & Rush 2024, HF "Scaling
//! test-time compute with open models"; search-and-learn's `dvts`).
//!
//! The budget of `width` = N is split into N/M independent subtrees. The root is expanded N
//! ways once, its children shared out in order (the first M to subtree 0, …); then each
//! subtree keeps its single best open step by verifier 0 (the others are pruned, "beam
//! cut") and expands it M ways, on its own clock: a subtree moves on as soon as its own
//! step is scored. A subtree ends when none of its candidates is open or at `max_steps`.
//! Answer: the best-scored finished candidate across subtrees (else the best partial).
//!
//! Parameters: `width` N; `beam_width` M (default: the largest divisor of N not above 4;
//! N must be a multiple of M); `delimiter`, `step_tokens`, `max_steps`.

use super::delegate_strategy;
use super::step_beam::{beam_params, StepBeam};
use crate::params::Params;

pub struct Dvts(StepBeam);

impl Dvts {
    pub fn from_params(p: &Params) -> Result<Self, String> {
        let (n, m, steps) = beam_params(p, &[])?;
        Ok(Dvts(StepBeam::new("dvts", steps, n / m, 1, m, 0)))
    }
}

delegate_strategy!(Dvts);

#[cfg(test)]
mod tests {
    use super::super::testing::{log, policy, verifier};
    use super::*;
    use crate::sim::Simulator;

    fn run(p: Params, ends: &[&str], scores: &str) -> String {
        let mut s = Dvts::from_params(&p).unwrap();
        let out = Simulator::new(policy(ends, ""))
            .with_verifier(verifier(scores))
            .run(&mut s, "q")
            .unwrap();
        log(&out)
    }

    #[test]
    fn subtrees_keep_their_own_best_step_and_move_on_alone() {
        let p = Params::new(4).set("beam_width", 2).set("max_steps", 2);
        let scores = "a=.3 b=.6 c=.9 d=.1 ba=.7 bb=.4 ca=.2 cb=.5";
        // Subtree {a, b} is scored first and moves on before {c, d} is; depth 2 ends both
        // and the finished ba is the best candidate.
        let want = "E root:4, S a, S b, S c, S d, P a beam cut, E b:2, P d beam cut, E c:2, \
                    S ba, S bb, S ca, S cb, P ca beam cut, F ba";
        assert_eq!(run(p, &["ba"], scores), want);
    }

    #[test]
    fn all_subtrees_failing_leave_the_best_partial() {
        let p = Params::new(2).set("beam_width", 1).set("max_steps", 1);
        assert_eq!(run(p, &[], "a=0 b=.05"), "E root:2, S a, S b, F b");
    }

    #[test]
    fn rejects_bad_params() {
        assert!(Dvts::from_params(&Params::new(3).set("beam_width", 2)).is_err());
        assert!(Dvts::from_params(&Params::new(4).set("subtrees", 2)).is_err());
    }
}
