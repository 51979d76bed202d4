//! `beam`: token-level beam search, as in HF transformers' `num_beams` decoding.
//!
//! Each round every live beam asks for its `width` most likely next tokens (`ExpandTopK`).
//! The round's candidates are ranked by length-normalised cumulative logprob, `score =
//! logprob_sum / len^α` (len counts the tokens generated, EOS included). Walking them
//! best first: a finished (EOS) candidate whose rank is below `width` joins the finished
//! list, an open one becomes a beam of the next round until there are `width` beams; the
//! rest are pruned ("beam cut", with any beam left without a surviving child). The search
//! stops when no beam is left, when the beams reach `max_tokens` tokens, or when the best
//! finished candidate beats every live beam (a heuristic: with α > 0 a beam's score may
//! still rise). Answer: the best finished candidate, else the best live beam.
//!
//! Parameters: `width` beams (1 is greedy decoding); `length_penalty` α ≥ 0 (default 1.0:
//! mean token logprob; 0: raw sum); `max_tokens` (default 256).

use super::{best, check, generated, prune_dead, rank};
use crate::params::Params;
use crate::strategy::{Action, Event, Strategy};
use crate::tree::{NodeId, SearchTree};
use std::collections::HashMap;

pub struct Beam {
    width: usize,
    alpha: f64,
    max_tokens: usize,
    live: Vec<NodeId>,
    finished: Vec<NodeId>,
    /// Candidates of the round so far, and top-k expansions still to report.
    pool: Vec<NodeId>,
    waiting: usize,
}

impl Beam {
    pub fn from_params(p: &Params) -> Result<Self, String> {
        let width = check(p, &["length_penalty", "max_tokens"], false)?;
        let alpha = p.f64("length_penalty", 1.0)?;
        if !(alpha.is_finite() && alpha >= 0.0) {
            return Err(format!("length_penalty {alpha} must be a number ≥ 0"));
        }
        let max_tokens = p.usize("max_tokens", 256)?;
        if max_tokens == 0 {
            return Err("max_tokens must be at least 1".into());
        }
        Ok(Beam {
            width,
            alpha,
            max_tokens,
            live: vec![],
            finished: vec![],
            pool: vec![],
            waiting: 0,
        })
    }

    /// The length-penalised score of a path with summed log-probability `logprob` over `len`
    /// generated tokens.
    fn penalised(&self, logprob: f64, len: usize) -> f64 {
        logprob / (len.max(1) as f64).powf(self.alpha)
    }

    fn score(&self, tree: &SearchTree, id: NodeId) -> f64 {
        self.penalised(tree.path_logprob(id), generated(tree, id))
    }

    /// [`Beam::score`] of every candidate, walking each parent's path once (a round has
    /// width² candidates under width parents).
    fn scores(&self, tree: &SearchTree, cands: &[NodeId]) -> HashMap<NodeId, f64> {
        let mut parents: HashMap<NodeId, (f64, usize)> = HashMap::new();
        cands
            .iter()
            .map(|&c| {
                let Some(n) = tree.node(c) else {
                    return (c, f64::NAN);
                };
                let Some(p) = n.parent else {
                    return (c, self.score(tree, c));
                };
                let (lp, len) = *parents
                    .entry(p)
                    .or_insert_with(|| (tree.path_logprob(p), generated(tree, p)));
                (c, self.penalised(lp + n.logprob, len + n.tokens.len()))
            })
            .collect()
    }

    fn round(&mut self, tree: &SearchTree) -> Vec<Action> {
        let mut cands = std::mem::take(&mut self.pool);
        cands.sort_unstable();
        let scores = self.scores(tree, &cands);
        rank(&mut cands, |n| scores.get(&n).copied().unwrap_or(f64::NAN));
        let (mut next, mut dropped) = (vec![], vec![]);
        for (r, &c) in cands.iter().enumerate() {
            let finished = tree.node(c).is_some_and(|n| n.is_finished());
            if finished {
                if r < self.width {
                    self.finished.push(c);
                }
            } else if next.len() < self.width {
                next.push(c);
            } else {
                dropped.push(c);
            }
        }
        let mut out = prune_dead(tree, &dropped, |c| self.finished.contains(&c), "beam cut");
        self.live = next;
        let top_finished = best(self.finished.iter().copied(), |n| self.score(tree, n));
        let top_live = best(self.live.iter().copied(), |n| self.score(tree, n));
        let len = self.live.first().map_or(0, |&b| generated(tree, b));
        let beaten = match (top_finished, top_live) {
            (Some(f), Some(l)) => self.score(tree, f) > self.score(tree, l),
            _ => false,
        };
        if self.live.is_empty() || len >= self.max_tokens || beaten {
            out.push(Action::Finish {
                answer: top_finished.or(top_live),
                text: None,
            });
            return out;
        }
        self.waiting = self.live.len();
        out.extend(self.live.iter().map(|&node| Action::ExpandTopK {
            node,
            k: self.width,
        }));
        out
    }
}

impl Strategy for Beam {
    fn name(&self) -> &str {
        "beam"
    }

    fn start(&mut self, tree: &SearchTree) -> Vec<Action> {
        self.live = vec![tree.root()];
        self.waiting = 1;
        vec![Action::ExpandTopK {
            node: tree.root(),
            k: self.width,
        }]
    }

    fn on_event(&mut self, tree: &SearchTree, event: Event) -> Vec<Action> {
        let Event::ExpandedTopK { children, .. } = event else {
            return vec![];
        };
        self.pool.extend(children);
        self.waiting = self.waiting.saturating_sub(1);
        if self.waiting > 0 {
            return vec![];
        }
        self.round(tree)
    }

    fn width(&self) -> usize {
        self.width
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{SimOutcome, SimToken, Simulator};
    use crate::tree::StopReason;

    type Table = &'static [(&'static str, &'static [(&'static str, f32)])];

    /// Top-k script: the next tokens after each path text, as (token, logprob); "$" is EOS.
    fn topk(table: Table) -> impl FnMut(&SearchTree, NodeId, usize) -> Vec<SimToken> {
        move |t, n, _| {
            let path = t.path_text(n);
            let row = table.iter().find(|r| r.0 == path);
            let row = row.unwrap_or_else(|| panic!("no top-k after '{path}'"));
            row.1
                .iter()
                .map(|&(tok, lp)| match tok {
                    "$" => SimToken {
                        logprob: lp,
                        ..SimToken::eos()
                    },
                    _ => SimToken::new(tok, lp),
                })
                .collect()
        }
    }

    fn run(p: Params, table: Table) -> SimOutcome {
        let mut s = Beam::from_params(&p).unwrap();
        Simulator::new(|_, _, _| panic!("beam samples nothing"))
            .with_topk(topk(table))
            .run(&mut s, "q")
            .unwrap()
    }

    /// A node by its path ("$" marks EOS, "root" the root).
    fn path(out: &SimOutcome, n: NodeId) -> String {
        let eos = out.tree.node(n).unwrap().stop == Some(StopReason::Eos);
        match out.tree.path_text(n) + if eos { "$" } else { "" } {
            p if p.is_empty() => "root".into(),
            p => p,
        }
    }

    /// The actions: `T path` top-k, `P path` prune, `F path` finish.
    fn log(out: &SimOutcome) -> String {
        let line = |a: &Action| match a {
            Action::ExpandTopK { node, k } => format!("T {}:{k}", path(out, *node)),
            Action::Prune { node, reason } => format!("P {} {reason}", path(out, *node)),
            Action::Finish { answer, .. } => format!("F {}", path(out, answer.unwrap())),
            a => panic!("beam asked for {a:?}"),
        };
        out.actions.iter().map(line).collect::<Vec<_>>().join(", ")
    }

    #[test]
    fn keeps_the_best_beams_and_stops_when_a_finished_one_wins() {
        // Mean logprobs, round 2: ba -0.1, a$ -0.15 (finished), aa -1.05, bb -1.6 (cut);
        // round 3: ba$ -0.1 (finished), bab -0.4, aaa -0.733, aab -0.767 (cut). ba$ beats
        // every live beam.
        let out = run(
            Params::new(2),
            &[
                ("", &[("a", -0.1), ("b", -0.2)]),
                ("a", &[("a", -2.0), ("$", -0.2)]),
                ("b", &[("a", 0.0), ("b", -3.0)]),
                ("ba", &[("$", -0.1), ("b", -1.0)]),
                ("aa", &[("a", -0.1), ("b", -0.2)]),
            ],
        );
        let want = "T root:2, T a:2, T b:2, P bb beam cut, T ba:2, T aa:2, P aab beam cut, F ba$";
        assert_eq!(log(&out), want);
    }

    #[test]
    fn a_beam_with_no_surviving_child_is_cut_itself() {
        let out = run(
            Params::new(2).set("max_tokens", 2),
            &[
                ("", &[("a", -0.1), ("b", -0.2)]),
                ("a", &[("a", -3.0), ("b", -3.0)]),
                ("b", &[("a", -0.1), ("b", -0.2)]),
            ],
        );
        // Both children of "a" are cut, so "a" goes in their place; at max_tokens with
        // nothing finished the best live beam wins.
        let want = "T root:2, T a:2, T b:2, P a beam cut, F ba";
        assert_eq!(log(&out), want);
    }

    #[test]
    fn width_one_is_greedy_and_length_penalty_changes_the_ranking() {
        let table: Table = &[
            ("", &[("b", -0.5), ("$", -0.6)]),
            ("b", &[("c", -0.2), ("d", -0.3)]),
            ("bc", &[("$", -0.1), ("e", -1.0)]),
            ("bd", &[("$", -2.0), ("f", -2.0)]),
        ];
        let out = run(Params::new(1), table);
        assert_eq!(log(&out), "T root:1, T b:1, T bc:1, F bc$");
        // α = 0 (sums): $ -0.6 (finished) beats bc -0.7 and bd -0.8 after round 2.
        let out = run(Params::new(2).set("length_penalty", 0), table);
        assert_eq!(log(&out), "T root:2, T b:2, F $");
        // α = 1 (means): bc -0.35 and bd -0.4 beat $ -0.6; in round 3 bc$ -0.267 finishes,
        // bd$ -0.833 ranks third (dropped, not kept as finished), bce -0.567 and bdf -0.833
        // go on as beams, and bc$ beats both.
        let out = run(Params::new(2), table);
        assert_eq!(log(&out), "T root:2, T b:2, T bc:2, T bd:2, F bc$");
    }

    #[test]
    fn rejects_bad_params() {
        assert!(Beam::from_params(&Params::new(0)).is_err());
        assert!(Beam::from_params(&Params::new(2).set("length_penalty", -1)).is_err());
        assert!(Beam::from_params(&Params::new(2).set("max_tokens", 0)).is_err());
        assert!(Beam::from_params(&Params::new(2).set("beam_width", 2)).is_err());
    }
}
