//! `best-of-n`: n samples of the prompt, each scored by the verifier; the best one wins.

use super::{sample_until, sample_width, ScoreEach};
use crate::params::Params;
use crate::strategy::{Action, Event, Strategy, Until};
use crate::tree::SearchTree;

/// Best-of-N: draws n = `width` samples of the prompt in one expansion, asks verifier 0 to
/// score each as soon as it stops, and answers with the highest score (a NaN score never wins
/// over a number). Ties go to the largest behaviour group the verifier reports (the code
/// verifier's identical outputs on the examples), then to the highest mean token
/// log-probability, then to the lower node id.
///
/// Parameters: `width` (samples, ≥ 1), `max_tokens` (default 512), `stop` (default none).
/// Every sample is scored, including one cut off by `max_tokens`.
///
/// Follows the best-of-N baseline with an outcome verifier of Cobbe et al. 2021
/// (arXiv 2110.14168) and Snell et al. 2024 (arXiv 2408.03314).
#[derive(Debug)]
pub struct BestOfN {
    n: usize,
    until: Until,
    each: ScoreEach,
}

impl BestOfN {
    pub fn from_params(p: &Params) -> Result<Self, String> {
        Ok(BestOfN {
            n: sample_width(p, &[])?,
            until: sample_until(p)?,
            each: ScoreEach::default(),
        })
    }
}

impl Strategy for BestOfN {
    fn name(&self) -> &str {
        "best-of-n"
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
            Event::Expanded { node, child } => self.each.on_expanded(tree, node, child),
            Event::Scored {
                node,
                verifier,
                score,
            } if self.each.on_scored(node, verifier, score) => {
                if self.each.scores.len() < self.n {
                    return vec![];
                }
                vec![Action::Finish {
                    answer: self.each.best(tree),
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
    use crate::sim::{words, Simulator};
    use crate::tree::NodeId;

    fn score(node: NodeId) -> Action {
        Action::Score { node, verifier: 0 }
    }

    #[test]
    fn scores_each_sample_as_it_stops_and_picks_the_best() {
        let mut s = BestOfN::from_params(&Params::new(3)).unwrap();
        let out = Simulator::new(|_, _, i| match i {
            0 => words("a b c", -1.0),
            1 => words("d", -1.0),
            _ => words("e f", -1.0),
        })
        .with_verifier(|t, n, v| {
            assert_eq!(v, 0);
            match t.node(n).unwrap().text.as_str() {
                "a b c" => 0.9,
                "d" => 0.2,
                _ => 0.5,
            }
        })
        .run(&mut s, "Q")
        .unwrap();
        assert_eq!(
            out.actions,
            vec![
                Action::Expand {
                    node: 0,
                    k: 3,
                    until: Until::tokens(512)
                },
                score(2),
                score(3),
                score(1),
                Action::finish(1),
            ]
        );
        assert_eq!(out.tree.node(1).unwrap().score, Some(0.9));
    }

    #[test]
    fn equal_scores_go_to_the_lower_id_and_nan_loses() {
        let mut s = BestOfN::from_params(&Params::new(4)).unwrap();
        let out = Simulator::new(|_, _, i| words(&"w ".repeat(4 - i), -1.0))
            .with_verifier(|_, n, _| if n == 1 { f64::NAN } else { 0.5 })
            .run(&mut s, "Q")
            .unwrap();
        // Samples stop in reverse order (4 first), all score 0.5 but node 1 (NaN).
        assert_eq!(
            &out.actions[1..5],
            &[score(4), score(3), score(2), score(1)]
        );
        assert_eq!(out.answer, Some(2));
    }

    #[test]
    fn width_one() {
        let mut s = BestOfN::from_params(&Params::new(1)).unwrap();
        let out = Simulator::new(|_, _, _| words("only", -1.0))
            .with_verifier(|_, _, _| -3.0)
            .run(&mut s, "Q")
            .unwrap();
        assert_eq!(out.actions.len(), 3);
        assert_eq!(out.answer, Some(1));
        assert!(BestOfN::from_params(&Params::new(2).set("verifier", 1)).is_err());
    }
}
