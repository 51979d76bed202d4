//! `st-bon`: self-truncating best-of-N (Wang et al. 2025, arXiv 2503.01422).

use super::{argmax, sample_until, sample_width};
use crate::params::Params;
use crate::strategy::{Action, Event, Strategy, Until};
use crate::tree::{NodeId, SearchTree};
use std::collections::HashSet;

/// Self-truncating best-of-N: draws n = `width` samples of the prompt; once every sample
/// has `buffer` tokens past the earliest point c at which all samples differ pairwise (the
/// paper's "earliest estimation time"; as in the authors' code, c is also fixed where the
/// first sample to end ends, if that comes first), it keeps the sample most consistent with
/// the others and cuts the rest, then finishes with that one when it ends. No verifier.
///
/// Consistency of a sample is the mean, over the other samples, of the cosine similarity
/// of the samples' mean final-layer hidden states over their first c + `buffer` tokens (the
/// engine returns them on request, [`Strategy::wants_hidden`]): a one-layer form of the
/// paper's chain-of-embedding consistency. With `consistency=bigram`, or where a runner
/// reports no hidden states, it is instead the mean Jaccard similarity of the sets of token
/// bigrams of those tokens, a token-level proxy.
///
/// Samples that stop before the truncation point take part with the tokens they have; if
/// every sample stops first, the choice is made among the complete samples. Ties go to the
/// lower node id. Losers are cut (on_token returns false) and pruned with the reason;
/// losers that had already finished are simply not chosen. (The authors' code picks, for
/// each prefix length in the buffer window, the most consistent sample, and keeps the one
/// picked most often; this picks once, at the end of the window.)
///
/// Parameters: `width` (samples, ≥ 1), `buffer` (tokens past c before truncating, default
/// c itself, i.e. truncation at 2c: the authors' `tau_coeff` = 1), `window` (truncate at
/// this many tokens instead, ignoring c; default 0: off), `consistency` (`hidden`, the
/// default, or `bigram`), `max_tokens` (default 512), `stop` (default none).
#[derive(Debug)]
pub struct StBon {
    n: usize,
    until: Until,
    buffer: Option<usize>,
    window: usize,
    branches: Vec<NodeId>,
    /// For each pair (i < j) of branches: tokens known equal so far, and where they first
    /// differ once they do.
    pairs: Vec<(usize, Option<usize>)>,
    /// Tokens at which the choice is made, once known.
    cut_at: Option<usize>,
    survivor: Option<NodeId>,
    /// Losers still to prune (with their reasons), handed out with the next event.
    to_prune: Vec<(NodeId, String)>,
    done: bool,
    /// Measure consistency on hidden states (else on token bigrams).
    hidden: bool,
    /// Per branch: sum of the hidden states of its tokens inside the window, and their count.
    sums: Vec<(Vec<f64>, usize)>,
}

impl StBon {
    pub fn from_params(p: &Params) -> Result<Self, String> {
        let n = sample_width(p, &["buffer", "window", "consistency"])?;
        let hidden = match p.string("consistency", "hidden").as_str() {
            "hidden" => true,
            "bigram" => false,
            other => {
                return Err(format!(
                    "parameter consistency={other}: use hidden or bigram"
                ))
            }
        };
        let buffer = match p.usize("buffer", usize::MAX)? {
            usize::MAX => None,
            b => Some(b),
        };
        Ok(StBon {
            n,
            until: sample_until(p)?,
            buffer,
            window: p.usize("window", 0)?,
            branches: vec![],
            pairs: vec![(0, None); n * (n - 1) / 2],
            cut_at: None,
            survivor: None,
            to_prune: vec![],
            done: false,
            hidden,
            sums: vec![(Vec::new(), 0); n],
        })
    }

    fn pair(&self, i: usize, j: usize) -> usize {
        let (i, j) = (i.min(j), i.max(j));
        i * self.n - i * (i + 1) / 2 + (j - i - 1)
    }

    fn tokens(tree: &SearchTree, id: NodeId) -> &[u32] {
        tree.node(id).map_or(&[], |n| &n.tokens)
    }

    fn stopped(tree: &SearchTree, id: NodeId) -> bool {
        tree.node(id).is_none_or(|n| n.stop.is_some())
    }

    /// Brings the pairs of branch `i` up to date and sets the truncation point once c is
    /// known.
    fn update(&mut self, tree: &SearchTree, i: usize) {
        if self.cut_at.is_some() {
            return;
        }
        if self.window > 0 {
            self.cut_at = Some(self.window);
            return;
        }
        let a = Self::tokens(tree, self.branches[i]);
        if Self::stopped(tree, self.branches[i]) {
            // As in the authors' code, a sample that ends fixes c where it ends.
            return self.set_c(a.len());
        }
        for j in (0..self.branches.len()).filter(|&j| j != i) {
            let k = self.pair(i, j);
            if self.pairs[k].1.is_some() {
                continue;
            }
            let b = Self::tokens(tree, self.branches[j]);
            let common = a.len().min(b.len());
            let from = std::mem::replace(&mut self.pairs[k].0, common);
            self.pairs[k].1 = (from..common).find(|&t| a[t] != b[t]);
        }
        if self.pairs.iter().all(|p| p.1.is_some()) {
            let c = self
                .pairs
                .iter()
                .filter_map(|p| p.1)
                .max()
                .map_or(0, |d| d + 1);
            self.set_c(c);
        }
    }

    fn set_c(&mut self, c: usize) {
        self.cut_at = Some(c + self.buffer.unwrap_or(c));
    }

    /// Chooses the survivor when every branch has reached the truncation point or stopped.
    fn try_decide(&mut self, tree: &SearchTree) {
        let all_stopped = self.branches.iter().all(|&b| Self::stopped(tree, b));
        let reached = self.cut_at.is_some_and(|t| {
            self.branches
                .iter()
                .all(|&b| Self::stopped(tree, b) || Self::tokens(tree, b).len() >= t)
        });
        if self.survivor.is_some() || !(all_stopped || reached) {
            return;
        }
        let len = if reached {
            self.cut_at.unwrap_or(usize::MAX)
        } else {
            usize::MAX
        };
        let m = self.branches.len();
        let have_hidden = self.hidden && self.sums.iter().take(m).all(|s| s.1 > 0);
        let consistency = if have_hidden {
            hidden_consistency(&self.sums[..m])
        } else {
            bigram_consistency(tree, &self.branches, len)
        };
        let best = argmax((0..m).map(|i| (i, consistency[i]))).unwrap_or(0);
        let s = self.branches[best];
        self.survivor = Some(s);
        for (i, &b) in self.branches.iter().enumerate() {
            let finished = tree.node(b).is_some_and(|n| n.is_finished());
            if b != s && !finished {
                let reason = format!(
                    "st-bon: kept node {s} ({} consistency {:.3}; this one {:.3})",
                    if have_hidden {
                        "hidden-state"
                    } else {
                        "bigram"
                    },
                    consistency[best],
                    consistency[i]
                );
                self.to_prune.push((b, reason));
            }
        }
    }

    /// Adds branch `i`'s latest hidden state to its sum while it is inside the window.
    fn accumulate(&mut self, tree: &SearchTree, i: usize) {
        let Some(n) = tree.node(self.branches[i]) else {
            return;
        };
        let inside = self.cut_at.is_none_or(|t| n.tokens.len() <= t);
        if !self.hidden || n.hidden.is_empty() || !inside {
            return;
        }
        let (sum, count) = &mut self.sums[i];
        if sum.is_empty() {
            sum.resize(n.hidden.len(), 0.0);
        }
        if sum.len() == n.hidden.len() {
            sum.iter_mut()
                .zip(&n.hidden)
                .for_each(|(a, &b)| *a += f64::from(b));
            *count += 1;
        }
    }

    fn branch_index(&mut self, tree: &SearchTree, node: NodeId) -> Option<usize> {
        if self.branches.is_empty() {
            let children = tree.node(tree.root()).map_or(&[][..], |r| &r.children);
            self.branches = children.iter().copied().take(self.n).collect();
        }
        self.branches.iter().position(|&b| b == node)
    }
}

/// Mean cosine similarity of each branch's mean hidden state to the others'.
fn hidden_consistency(sums: &[(Vec<f64>, usize)]) -> Vec<f64> {
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let cos = |a: &[f64], b: &[f64]| {
        let d = norm(a) * norm(b);
        if d == 0.0 {
            0.0
        } else {
            a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>() / d
        }
    };
    // The mean's direction is the sum's: no need to divide by the counts.
    let m = sums.len();
    (0..m)
        .map(|i| {
            let others = (0..m).filter(|&j| j != i);
            others.map(|j| cos(&sums[i].0, &sums[j].0)).sum::<f64>() / (m - 1).max(1) as f64
        })
        .collect()
}

/// Mean Jaccard similarity of each branch's set of token bigrams (first `len` tokens) to
/// the others'.
fn bigram_consistency(tree: &SearchTree, branches: &[NodeId], len: usize) -> Vec<f64> {
    let grams: Vec<HashSet<(u32, u32)>> = branches
        .iter()
        .map(|&b| {
            let t = StBon::tokens(tree, b);
            t[..t.len().min(len)]
                .windows(2)
                .map(|w| (w[0], w[1]))
                .collect()
        })
        .collect();
    let jaccard = |x: &HashSet<(u32, u32)>, y: &HashSet<(u32, u32)>| {
        let union = x.union(y).count();
        if union == 0 {
            1.0
        } else {
            x.intersection(y).count() as f64 / union as f64
        }
    };
    let m = branches.len();
    (0..m)
        .map(|i| {
            let others = (0..m).filter(|&j| j != i);
            others.map(|j| jaccard(&grams[i], &grams[j])).sum::<f64>() / (m - 1).max(1) as f64
        })
        .collect()
}

impl Strategy for StBon {
    fn name(&self) -> &str {
        "st-bon"
    }

    fn wants_hidden(&self) -> bool {
        self.hidden
    }

    fn start(&mut self, tree: &SearchTree) -> Vec<Action> {
        vec![Action::Expand {
            node: tree.root(),
            k: self.n,
            until: self.until.clone(),
        }]
    }

    fn on_token(&mut self, tree: &SearchTree, node: NodeId) -> bool {
        if self.survivor.is_none() {
            let Some(i) = self.branch_index(tree, node) else {
                return true;
            };
            self.accumulate(tree, i);
            self.update(tree, i);
            self.try_decide(tree);
        }
        self.survivor.is_none_or(|s| s == node)
    }

    fn on_event(&mut self, tree: &SearchTree, event: Event) -> Vec<Action> {
        let Event::Expanded { node, child } = event else {
            return vec![];
        };
        if self.done || node != tree.root() {
            return vec![];
        }
        if self.survivor.is_none() {
            if let Some(i) = self.branch_index(tree, child) {
                self.update(tree, i);
                self.try_decide(tree);
            }
        }
        let mut out: Vec<Action> = self
            .to_prune
            .drain(..)
            .map(|(node, reason)| Action::Prune { node, reason })
            .collect();
        if let Some(s) = self.survivor.filter(|&s| Self::stopped(tree, s)) {
            self.done = true;
            out.push(Action::finish(s));
        }
        out
    }

    fn width(&self) -> usize {
        self.n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{words, SimOutcome, Simulator};

    fn run(p: Params, scripts: &[&str]) -> SimOutcome {
        let mut s = StBon::from_params(&p).unwrap();
        Simulator::new(|_, _, i| words(scripts[i], -1.0))
            .run(&mut s, "Q")
            .unwrap()
    }

    fn prune(node: NodeId, kept: &str, this: &str) -> Action {
        Action::Prune {
            node,
            reason: format!("st-bon: kept node 1 (bigram consistency {kept}; this one {this})"),
        }
    }

    #[test]
    fn keeps_the_most_consistent_sample_c_tokens_past_divergence() {
        // All pairs differ by token 3 (c = 3): the choice is made at 6 tokens.
        let out = run(
            Params::new(3),
            &[
                "the cat sat on the mat ok",
                "the cat ran far away fast ok",
                "the dog sat on the mat ok",
            ],
        );
        // Bigram Jaccard: 1-2 1/9, 1-3 3/7, 2-3 0.
        assert_eq!(
            out.actions[1..],
            [
                prune(2, "0.270", "0.056"),
                prune(3, "0.270", "0.214"),
                Action::finish(1)
            ]
        );
        // Node 3 was cut after its 6th token; node 2 was pruned before its 7th.
        let t = &out.tree;
        assert_eq!(t.node(3).unwrap().tokens.len(), 6);
        assert_eq!(t.node(2).unwrap().tokens.len(), 6);
        assert_eq!(t.node(1).unwrap().text, "the cat sat on the mat ok");
        assert_eq!(t.finished(), vec![1]);
    }

    #[test]
    fn a_fixed_window_and_a_loser_that_already_finished() {
        let p = Params::new(3).set("window", 3);
        let out = run(p, &["x y ", "p q r s ", "p q r t "]);
        // Node 1 finished before the choice: it is not chosen, and not pruned.
        let reason = "st-bon: kept node 2 (bigram consistency 0.500; this one 0.500)";
        assert_eq!(
            out.actions[1..],
            [
                Action::Prune {
                    node: 3,
                    reason: reason.into()
                },
                Action::finish(2)
            ]
        );
        assert_eq!(out.tree.node(3).unwrap().stop, Some(crate::StopReason::Cut));
    }

    #[test]
    fn the_first_sample_to_end_fixes_c() {
        // Sample 1 ends after 2 tokens: c = 2, cut at 4 tokens, where {a b} shares a bigram
        // with 3's {a b, b d, d e} (1/3), and 2's {a c, c d, d e} shares one with 3 (1/5).
        let out = run(Params::new(3), &["a b ", "a c d e f ", "a b d e f "]);
        let reason = "st-bon: kept node 3 (bigram consistency 0.267; this one 0.100)";
        assert_eq!(
            out.actions[1..],
            [
                Action::Prune {
                    node: 2,
                    reason: reason.into()
                },
                Action::finish(3)
            ]
        );
        // Identical samples never differ and all end together: the first one.
        let out = run(Params::new(2), &["same text ", "same text "]);
        assert_eq!(out.actions[1..], [Action::finish(1)]);
    }

    #[test]
    fn width_one_and_params() {
        let out = run(Params::new(1), &["just one "]);
        assert_eq!(out.actions[1..], [Action::finish(1)]);
        let out = run(Params::new(2).set("buffer", 0), &["a b c ", "a d e "]);
        // Differ at token 2, cut at 2 tokens: {a b} vs {a d} share nothing; a tie.
        assert_eq!(
            out.actions[1..],
            [
                Action::Prune {
                    node: 2,
                    reason: "st-bon: kept node 1 (bigram consistency 0.000; this one 0.000)".into()
                },
                Action::finish(1)
            ]
        );
        assert!(StBon::from_params(&Params::new(2).set("window", "x")).is_err());
        assert!(StBon::from_params(&Params::new(2).set("percentile", 5)).is_err());
        assert!(StBon::from_params(&Params::new(0)).is_err());
    }

    #[test]
    fn hidden_states_decide_when_the_runner_reports_them() {
        // Bigrams favour sample 1 (as in the first test); the hidden states say samples 2
        // and 3 agree and 1 is the odd one out: hidden-state consistency keeps 2.
        let scripts = [
            "the cat sat on the mat ok",
            "the cat ran far away fast ok",
            "the dog sat on the mat ok",
        ];
        let dirs = [[1.0, 0.0], [0.2, 1.0], [0.0, 1.0]];
        let mut s = StBon::from_params(&Params::new(3)).unwrap();
        assert!(s.wants_hidden());
        let out = Simulator::new(|_, _, i| {
            words(scripts[i], -1.0)
                .into_iter()
                .map(|mut t| {
                    t.hidden = dirs[i].to_vec();
                    t
                })
                .collect()
        })
        .run(&mut s, "Q")
        .unwrap();
        let reason = |this: &str| Action::Prune {
            node: if this == "0.098" { 1 } else { 3 },
            reason: format!(
                "st-bon: kept node 2 (hidden-state consistency 0.588; this one {this})"
            ),
        };
        assert_eq!(
            out.actions[1..],
            [reason("0.098"), reason("0.490"), Action::finish(2)]
        );
        // consistency=bigram ignores them.
        let mut s = StBon::from_params(&Params::new(3).set("consistency", "bigram")).unwrap();
        assert!(!s.wants_hidden());
        let out = Simulator::new(|_, _, i| words(scripts[i], -1.0))
            .run(&mut s, "Q")
            .unwrap();
        assert_eq!(out.answer, Some(1));
        assert!(StBon::from_params(&Params::new(3).set("consistency", "vibes")).is_err());
    }
}
