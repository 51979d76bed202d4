//! `sampling`: n independent samples of the prompt; the answer is the most likely one.

use super::{most_likely, sample_until, sample_width};
use crate::params::Params;
use crate::strategy::{Action, Event, Strategy, Until};
use crate::tree::{NodeId, SearchTree};

/// Plain sampling: draws n = `width` samples of the prompt in one expansion and answers
/// with the one of highest mean token log-probability (the model's own most likely sample;
/// no verifier). A sample without tokens ranks last; ties go to the earlier sample.
///
/// Parameters: `width` (samples, ≥ 1), `max_tokens` (default 512), `stop` (default none).
/// Every sample counts, including one cut off by `max_tokens`.
///
/// The baseline of the test-time scaling papers (e.g. Snell et al. 2024, arXiv 2408.03314).
#[derive(Debug)]
pub struct Sampling {
    n: usize,
    until: Until,
    done: Vec<NodeId>,
}

impl Sampling {
    pub fn from_params(p: &Params) -> Result<Self, String> {
        Ok(Sampling {
            n: sample_width(p, &[])?,
            until: sample_until(p)?,
            done: vec![],
        })
    }
}

impl Strategy for Sampling {
    fn name(&self) -> &str {
        "sampling"
    }

    fn start(&mut self, tree: &SearchTree) -> Vec<Action> {
        vec![Action::Expand {
            node: tree.root(),
            k: self.n,
            until: self.until.clone(),
        }]
    }

    fn on_event(&mut self, tree: &SearchTree, event: Event) -> Vec<Action> {
        match event {
            Event::Expanded { node, child }
                if node == tree.root() && !self.done.contains(&child) =>
            {
                self.done.push(child);
                if self.done.len() < self.n {
                    return vec![];
                }
                vec![Action::Finish {
                    answer: most_likely(tree, &self.done),
                    text: None,
                }]
            }
            _ => vec![],
        }
    }

    fn width(&self) -> usize {
        self.n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{words, SimToken, Simulator};

    fn run(
        p: &Params,
        policy: impl FnMut(&SearchTree, NodeId, usize) -> Vec<SimToken>,
    ) -> crate::sim::SimOutcome {
        let mut s = Sampling::from_params(p).unwrap();
        Simulator::new(policy).run(&mut s, "Q").unwrap()
    }

    #[test]
    fn picks_the_highest_mean_logprob() {
        // Sample 2 has the lowest total but the highest mean.
        let out = run(&Params::new(3), |_, _, i| match i {
            0 => words("a b", -1.0),
            1 => words("a b c d e f", -0.4),
            _ => words("x", -0.5),
        });
        assert_eq!(
            out.actions,
            vec![
                Action::Expand {
                    node: 0,
                    k: 3,
                    until: Until::tokens(512)
                },
                Action::finish(2),
            ]
        );
        assert_eq!(out.text, None);
        assert_eq!(out.tree.finished(), vec![1, 2, 3]);
    }

    #[test]
    fn ties_go_to_the_earlier_sample_and_empty_samples_rank_last() {
        let out = run(&Params::new(3), |_, _, i| match i {
            0 => vec![SimToken::eos()],
            1 => words("p q", -2.0),
            _ => words("r s", -2.0),
        });
        assert_eq!(out.answer, Some(2));
    }

    #[test]
    fn width_one_and_truncated_samples() {
        let p = Params::new(1).set("max_tokens", 2).set("stop", "STOP");
        let out = run(&p, |_, _, _| words("a b c", -1.0));
        assert_eq!(out.answer, Some(1));
        assert_eq!(out.tree.node(1).unwrap().text, "a b ");
        let Action::Expand { until, .. } = &out.actions[0] else {
            panic!("no expand first")
        };
        assert_eq!(until.stop, vec!["STOP".to_string()]);
        assert!(Sampling::from_params(&Params::new(2).set("window", 3)).is_err());
        assert!(Sampling::from_params(&Params::new(0)).is_err());
    }
}
