//! `lookahead`: lookahead search (Snell et al. 2024, arXiv 2408.03314, §5).
//!
//! Step-level beam search as in [`super::StepBeam`] (N beams, N/M survivors expanding M ways)
//! where a candidate step is valued not by its own score but by rolling it out `lookahead`
//! more steps, one sample each (k = 1, at the runner's temperature: greedy when it is 0), and
//! scoring the end of the rollout with verifier 0; the value is attributed to the step. A
//! rollout stops early at a finished node or at `max_steps`; one that stayed open is pruned
//! once scored ("lookahead rollout"), one that finished is kept as a candidate answer with
//! its score. Finished steps, and steps at `max_steps`, are scored directly. The step's own
//! node keeps no score in the tree: its value lives in the strategy. Answer: the
//! best-valued finished candidate (else the best partial).
//!
//! Parameters: `width` N; `beam_width` M (as for step-beam); `lookahead` steps (default 2;
//! 0 is plain step-beam); `delimiter`, `step_tokens`, `max_steps`.

use super::delegate_strategy;
use super::step_beam::{beam_params, StepBeam};
use crate::params::Params;

pub struct Lookahead(StepBeam);

impl Lookahead {
    pub fn from_params(p: &Params) -> Result<Self, String> {
        let (n, m, steps) = beam_params(p, &["lookahead"])?;
        let k = p.usize("lookahead", 2)?;
        Ok(Lookahead(StepBeam::new("lookahead", steps, 1, n / m, m, k)))
    }
}

delegate_strategy!(Lookahead);

#[cfg(test)]
mod tests {
    use super::super::testing::{log, policy, verifier};
    use super::*;
    use crate::sim::Simulator;

    fn run(p: Params, ends: &[&str], scores: &str) -> String {
        let mut s = Lookahead::from_params(&p).unwrap();
        let out = Simulator::new(policy(ends, ""))
            .with_verifier(verifier(scores))
            .run(&mut s, "q")
            .unwrap();
        log(&out)
    }

    #[test]
    fn values_each_step_by_the_score_at_the_end_of_its_rollout() {
        let p = Params::new(2).set("lookahead", 1).set("max_steps", 3);
        // aa, ba and bba are rollouts (of a, b, bb). bb's rollout (0.9) beats the finished
        // bc (0.6). At max_steps the steps are scored directly; bbc is left partial and the
        // finished bc (0.6) beats bbb (0.5).
        let scores = "aa=.2 ba=.7 bc=.6 bba=.9 bbb=.5 bbc=.8";
        let want = "E root:2, E a:1, E b:1, S aa, S ba, P aa lookahead rollout, \
                    P ba lookahead rollout, P a beam cut, E b:2, E bb:1, S bc, S bba, \
                    P bba lookahead rollout, E bb:2, S bbb, S bbc, F bc";
        assert_eq!(run(p, &["bc", "bbb"], scores), want);
    }

    #[test]
    fn a_rollout_that_finishes_is_kept_as_a_candidate() {
        let p = Params::new(1).set("lookahead", 2).set("max_steps", 3);
        let want = "E root:1, E a:1, S aa, E a:1, E ab:1, S aba, P aba lookahead rollout, \
                    E ab:1, S abb, F aa";
        assert_eq!(run(p, &["aa"], "aa=.7 aba=.4 abb=.3"), want);
    }

    #[test]
    fn lookahead_zero_is_step_beam_and_bad_params_are_rejected() {
        let p = Params::new(1).set("lookahead", 0).set("max_steps", 2);
        let want = "E root:1, S a, E a:1, S aa, F aa";
        assert_eq!(run(p, &[], "a=.5 aa=.5"), want);
        assert!(Lookahead::from_params(&Params::new(2).set("lookahead", -1)).is_err());
        assert!(Lookahead::from_params(&Params::new(2).set("depth", 1)).is_err());
    }
}
