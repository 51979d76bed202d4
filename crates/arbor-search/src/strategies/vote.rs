//! `vote` (self-consistency) and `weighted-vote`: n samples of the prompt; the answer most
//! samples agree on wins.

use super::{most_likely, sample_until, sample_width};
use crate::answer;
use crate::params::Params;
use crate::strategy::{Action, Event, Strategy, Until};
use crate::tree::{NodeId, SearchTree};

/// Self-consistency (Wang et al. 2022, arXiv 2203.11171): draws n = `width` samples of the
/// prompt in one expansion, extracts each one's final answer with [`answer::extract`]
/// (samples without one do not vote) and finishes with the majority answer as `text` and
/// the first sample giving it as `answer`. Ties between answers go to the larger summed
/// mean token log-probability of their samples, then to the answer given first.
///
/// `weighted-vote` (weighted majority voting, as in Li et al. 2023, arXiv 2206.02336, and
/// Snell et al. 2024): verifier 0 scores every sample that has an answer, and an answer's
/// weight is the sum of its samples' scores (scores are read as non-negative; a negative or
/// NaN score counts 0).
///
/// When no sample has an answer, both finish with the most likely sample (highest mean
/// token log-probability) and no `text`.
///
/// Parameters: `width` (samples, ≥ 1), `max_tokens` (default 512), `stop` (default none).
#[derive(Debug)]
pub struct Vote {
    n: usize,
    until: Until,
    weighted: bool,
    expanded: Vec<NodeId>,
    /// Samples with an answer, and their weight once known.
    votes: Vec<(NodeId, String, Option<f64>)>,
}

impl Vote {
    /// `vote`: one vote per sample.
    pub fn from_params(p: &Params) -> Result<Self, String> {
        Self::new(p, false)
    }

    /// `weighted-vote`: votes weighted by verifier 0.
    pub fn weighted_from_params(p: &Params) -> Result<Self, String> {
        Self::new(p, true)
    }

    fn new(p: &Params, weighted: bool) -> Result<Self, String> {
        Ok(Vote {
            n: sample_width(p, &[])?,
            until: sample_until(p)?,
            weighted,
            expanded: vec![],
            votes: vec![],
        })
    }

    fn finish(&self, tree: &SearchTree) -> Vec<Action> {
        if self.expanded.len() < self.n || self.votes.iter().any(|v| v.2.is_none()) {
            return vec![];
        }
        let votes: Vec<_> = self
            .votes
            .iter()
            .map(|(n, a, w)| (*n, a.clone(), w.unwrap_or(0.0)))
            .collect();
        vec![match tally(tree, &votes) {
            Some((text, first)) => Action::Finish {
                answer: Some(first),
                text: Some(text),
            },
            None => Action::Finish {
                answer: most_likely(tree, &self.expanded),
                text: None,
            },
        }]
    }
}

/// The winning answer of `votes` (node, answer, weight) and the lowest node giving it: the
/// largest summed weight, then the largest summed mean token log-probability, then the
/// answer whose first node is lowest. Sums within a millionth of each other are ties.
/// `None` without votes.
pub(crate) fn tally(
    tree: &SearchTree,
    votes: &[(NodeId, String, f64)],
) -> Option<(String, NodeId)> {
    let mut sorted = votes.to_vec();
    sorted.sort_by_key(|v| v.0);
    // (answer, first node, weight, summed mean logprob), in order of first node.
    let mut groups: Vec<(String, NodeId, f64, f64)> = vec![];
    for (node, ans, w) in sorted {
        let w = if w.is_nan() { 0.0 } else { w.max(0.0) };
        let lp = tree.node(node).map_or(0.0, |n| n.mean_logprob());
        match groups.iter_mut().find(|g| g.0 == ans) {
            Some(g) => {
                g.2 += w;
                g.3 += lp;
            }
            None => groups.push((ans, node, w, lp)),
        }
    }
    let same = |a: f64, b: f64| (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1.0);
    let mut best: Option<&(String, NodeId, f64, f64)> = None;
    for g in &groups {
        let better = match best {
            None => true,
            Some(b) if same(g.2, b.2) => !same(g.3, b.3) && g.3 > b.3,
            Some(b) => g.2 > b.2,
        };
        if better {
            best = Some(g);
        }
    }
    best.map(|g| (g.0.clone(), g.1))
}

impl Strategy for Vote {
    fn name(&self) -> &str {
        if self.weighted {
            "weighted-vote"
        } else {
            "vote"
        }
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
                if node == tree.root() && !self.expanded.contains(&child) =>
            {
                self.expanded.push(child);
                let mut out = vec![];
                if let Some(a) = answer::extract(&tree.path_text(child)) {
                    let weight = if self.weighted {
                        out.push(Action::Score {
                            node: child,
                            verifier: 0,
                        });
                        None
                    } else {
                        Some(1.0)
                    };
                    self.votes.push((child, a, weight));
                }
                out.extend(self.finish(tree));
                out
            }
            Event::Scored {
                node,
                verifier: 0,
                score,
            } => match self.votes.iter_mut().find(|v| v.0 == node && v.2.is_none()) {
                Some(v) => {
                    v.2 = Some(score);
                    self.finish(tree)
                }
                None => vec![],
            },
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
    use crate::sim::{words, SimOutcome, SimToken, Simulator};

    fn finish(node: NodeId, text: &str) -> Action {
        Action::Finish {
            answer: Some(node),
            text: Some(text.into()),
        }
    }

    fn vote(
        n: usize,
        policy: impl FnMut(&SearchTree, NodeId, usize) -> Vec<SimToken>,
    ) -> SimOutcome {
        let mut s = Vote::from_params(&Params::new(n)).unwrap();
        Simulator::new(policy).run(&mut s, "Q").unwrap()
    }

    #[test]
    fn majority_of_extracted_answers() {
        let out = vote(5, |_, _, i| match i {
            0 => words("so \\boxed{7}", -1.0),
            1 => words("The answer is 12.", -0.1),
            2 => words("I think 7.0", -1.0),
            3 => words("no idea", -0.1),
            _ => words("answer: $1,2$", -0.1),
        });
        assert_eq!(out.actions.len(), 2, "{:?}", out.actions);
        assert_eq!(out.actions[1], finish(1, "7"));
    }

    #[test]
    fn ties_go_to_the_more_likely_group_then_the_first() {
        // 12 and 7 each have two votes; 12's samples are more likely.
        let out = vote(4, |_, _, i| match i {
            0 => words("7", -2.0),
            1 => words("12", -1.0),
            2 => words("7", -2.0),
            _ => words("12", -1.0),
        });
        assert_eq!(out.actions[1], finish(2, "12"));
        // Equal likelihood too: the answer given first (node 1).
        let out = vote(2, |_, _, i| words(["x 7", "y 12"][i], -1.0));
        assert_eq!(out.actions[1], finish(1, "7"));
    }

    #[test]
    fn no_extractable_answer_falls_back_to_the_most_likely_sample() {
        let out = vote(3, |_, _, i| {
            words(["no", "answer here", "none"][i], [-1.0, -0.5, -0.7][i])
        });
        assert_eq!(
            out.actions[1],
            Action::Finish {
                answer: Some(2),
                text: None
            }
        );
        let out = vote(1, |_, _, _| words("just 3", -1.0));
        assert_eq!(out.actions[1], finish(1, "3"));
    }

    #[test]
    fn weighted_vote_scores_answered_samples_and_sums_scores() {
        let mut s = Vote::weighted_from_params(&Params::new(4)).unwrap();
        assert_eq!(s.name(), "weighted-vote");
        let out = Simulator::new(|_, _, i| match i {
            0 => words("a 5", -1.0),
            1 => words("b c 9", -1.0),
            2 => words("d e f 5", -1.0),
            _ => words("nothing", -1.0),
        })
        .with_verifier(|t, n, _| match t.node(n).unwrap().text.as_str() {
            "b c 9" => 0.9,
            _ => 0.4,
        })
        .run(&mut s, "Q")
        .unwrap();
        let score = |node| Action::Score { node, verifier: 0 };
        // "5" has 0.8 against "9"'s 0.9; the unanswered sample 4 is never scored.
        assert_eq!(
            out.actions[1..],
            [score(1), score(2), score(3), finish(2, "9")]
        );
    }

    #[test]
    fn weighted_vote_with_equal_scores_is_a_majority() {
        let mut s = Vote::weighted_from_params(&Params::new(3)).unwrap();
        let out = Simulator::new(|_, _, i| words(["1", "2", "2"][i], -1.0))
            .with_verifier(|_, _, _| 0.5)
            .run(&mut s, "Q")
            .unwrap();
        assert_eq!(out.actions.last(), Some(&finish(2, "2")));
        // Negative scores count 0: a tie, broken by likelihood.
        let mut s = Vote::weighted_from_params(&Params::new(2)).unwrap();
        let out = Simulator::new(|_, _, i| words(["1", "2"][i], [-2.0, -1.0][i]))
            .with_verifier(|_, _, _| -1.0)
            .run(&mut s, "Q")
            .unwrap();
        assert_eq!(out.actions.last(), Some(&finish(2, "2")));
    }
}
