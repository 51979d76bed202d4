//! `beam`: token-level beam search, as in HF transformers' `num_beams` decoding.
//!
//! Each round every live beam is offered its `width` most likely next tokens (`ExpandTopK`).
//! The round's candidates (beam + token) are ranked by length-normalised cumulative logprob,
//! `score = logprob_sum / len^α` (len counts the tokens generated, EOS included). Walking
//! them best first: a finished (EOS) candidate whose rank is below `width` joins the finished
//! list, an open one becomes a beam of the next round until there are `width` beams; the
//! rest never become nodes (width² candidates, `width` kept). The kept candidates become
//! children (`Extend`), and a beam none of whose candidates is kept is pruned ("beam cut").
//! The search stops when no beam is left, when the beams reach `max_tokens` tokens, or when
//! the best finished candidate beats every live beam (a heuristic: with α > 0 a beam's score
//! may still rise). Answer: the best finished candidate, else the best live beam.
//!
//! Parameters: `width` beams (1 is greedy decoding); `length_penalty` α ≥ 0 (default 1.0:
//! mean token logprob; 0: raw sum); `max_tokens` (default 256).

use super::{check, num, prune_dead};
use crate::params::Params;
use crate::strategy::{Action, Event, Strategy, TopToken};
use crate::tree::{NodeId, SearchTree};
use std::collections::HashMap;

/// A candidate of the round: option `pick` of beam `parent`'s offer.
struct Candidate {
    parent: NodeId,
    /// `parent`'s position among the round's beams (best first): the first tie-break.
    rank: usize,
    pick: usize,
    score: f64,
    eos: bool,
}

/// Best first; ties go to the better beam, then the likelier token. A total order (no two
/// candidates share beam and pick), so any sort gives the same ranking.
fn better(a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
    (b.score.total_cmp(&a.score))
        .then(a.rank.cmp(&b.rank))
        .then(a.pick.cmp(&b.pick))
}

pub struct Beam {
    width: usize,
    alpha: f64,
    max_tokens: usize,
    /// Beams of the round, best first, with their scores.
    live: Vec<(NodeId, f64)>,
    /// Tokens every live beam has generated.
    depth: usize,
    finished: Vec<(NodeId, f64)>,
    /// Candidates of the round so far.
    pool: Vec<Candidate>,
    /// Offers (then extensions) still to be reported this round.
    waiting: usize,
    /// The scores of the candidates kept of each beam's offer, in pick order.
    kept: HashMap<NodeId, Vec<f64>>,
    /// Beams of the next round, as their extensions report.
    next: Vec<(NodeId, f64)>,
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
            depth: 0,
            finished: vec![],
            pool: vec![],
            waiting: 0,
            kept: HashMap::new(),
            next: vec![],
        })
    }

    /// The length-penalised score of a path with summed log-probability `logprob` over `len`
    /// generated tokens.
    fn penalised(&self, logprob: f64, len: usize) -> f64 {
        logprob / (len.max(1) as f64).powf(self.alpha)
    }

    /// Adds beam `parent`'s offer to the round's candidates (its path walked once).
    fn offered(&mut self, tree: &SearchTree, parent: NodeId, options: &[TopToken]) {
        let lp = tree.path_logprob(parent);
        let rank = (self.live.iter().position(|b| b.0 == parent)).unwrap_or(usize::MAX);
        for (pick, o) in options.iter().enumerate() {
            let score = num(self.penalised(lp + o.logprob as f64, self.depth + 1));
            self.pool.push(Candidate {
                parent,
                rank,
                pick,
                score,
                eos: o.eos,
            });
        }
    }

    /// All offers are in: keeps the best candidates (as `Extend`s) and cuts beams left
    /// without one.
    fn select(&mut self, tree: &SearchTree) -> Vec<Action> {
        let mut cands = std::mem::take(&mut self.pool);
        // Only the best ~2·width of the width² candidates are usually walked: those are
        // selected and sorted first, the rest only if the walk gets that far (many EOS).
        let head = (2 * self.width).min(cands.len());
        if head < cands.len() {
            cands.select_nth_unstable_by(head, better);
        }
        cands[..head].sort_unstable_by(better);
        // Kept picks per beam, beams in the order of their best kept candidate.
        let mut picks: Vec<(NodeId, Vec<usize>)> = vec![];
        let mut open = 0;
        for r in 0..cands.len() {
            if open == self.width && r >= self.width {
                break;
            }
            if r == head {
                cands[head..].sort_unstable_by(better);
            }
            let c = &cands[r];
            let keep = match c.eos {
                true => r < self.width,
                false => open < self.width,
            };
            if !keep {
                continue;
            }
            open += usize::from(!c.eos);
            match picks.iter_mut().find(|(p, _)| *p == c.parent) {
                Some((_, v)) => v.push(c.pick),
                None => picks.push((c.parent, vec![c.pick])),
            }
            self.kept.entry(c.parent).or_default().push(c.score);
        }
        self.depth += 1;
        let cut: Vec<NodeId> = (self.live.iter())
            .map(|b| b.0)
            .filter(|b| !self.kept.contains_key(b))
            .collect();
        let finished: Vec<NodeId> = self.finished.iter().map(|f| f.0).collect();
        let mut out = prune_dead(tree, &cut, |c| finished.contains(&c), "beam cut");
        if picks.is_empty() {
            return self.decide(out);
        }
        self.waiting = picks.len();
        out.extend(
            picks
                .into_iter()
                .map(|(node, picks)| Action::Extend { node, picks }),
        );
        out
    }

    /// The round's beams are known: finishes, or offers them their next tokens.
    fn decide(&mut self, mut out: Vec<Action>) -> Vec<Action> {
        self.live = std::mem::take(&mut self.next);
        self.live.sort_by(|a, b| b.1.total_cmp(&a.1));
        // The best finished candidate; ties go to the earlier one.
        let top_finished = (self.finished.iter().rev())
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .copied();
        let top_live = self.live.first().copied();
        let beaten = match (top_finished, top_live) {
            (Some(f), Some(l)) => f.1 > l.1,
            _ => false,
        };
        if self.live.is_empty() || self.depth >= self.max_tokens || beaten {
            out.push(Action::Finish {
                answer: top_finished.or(top_live).map(|x| x.0),
                text: None,
            });
            return out;
        }
        self.waiting = self.live.len();
        out.extend(self.live.iter().map(|&(node, _)| Action::ExpandTopK {
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
        self.live = vec![(tree.root(), 0.0)];
        self.waiting = 1;
        vec![Action::ExpandTopK {
            node: tree.root(),
            k: self.width,
        }]
    }

    fn on_event(&mut self, tree: &SearchTree, event: Event) -> Vec<Action> {
        match event {
            Event::TopK { node, options } => {
                self.offered(tree, node, &options);
                self.waiting = self.waiting.saturating_sub(1);
                match self.waiting {
                    0 => self.select(tree),
                    _ => vec![],
                }
            }
            Event::Extended { node, children } => {
                let scores = self.kept.remove(&node).unwrap_or_default();
                for (c, s) in children.into_iter().zip(scores) {
                    match tree.node(c).is_some_and(|n| n.is_finished()) {
                        true => self.finished.push((c, s)),
                        false => self.next.push((c, s)),
                    }
                }
                self.waiting = self.waiting.saturating_sub(1);
                match self.waiting {
                    0 => self.decide(vec![]),
                    _ => vec![],
                }
            }
            _ => vec![],
        }
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
            Action::Extend { node, picks } => format!("X {}:{picks:?}", path(out, *node)),
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
        // bb and aab are never made: candidates not kept do not become nodes.
        let want = "T root:2, X root:[0, 1], T a:2, T b:2, X b:[0], X a:[1, 0], T ba:2, T aa:2, \
                    X ba:[0, 1], X aa:[0], F ba$";
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
        // Neither candidate of "a" is kept, so "a" is cut; at max_tokens with nothing
        // finished the best live beam wins.
        let want = "T root:2, X root:[0, 1], T a:2, T b:2, P a beam cut, X b:[0, 1], F ba";
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
        assert_eq!(
            log(&out),
            "T root:1, X root:[0], T b:1, X b:[0], T bc:1, X bc:[0], F bc$"
        );
        // α = 0 (sums): $ -0.6 (finished) beats bc -0.7 and bd -0.8 after round 2.
        let out = run(Params::new(2).set("length_penalty", 0), table);
        assert_eq!(log(&out), "T root:2, X root:[0, 1], T b:2, X b:[0, 1], F $");
        // α = 1 (means): bc -0.35 and bd -0.4 beat $ -0.6; in round 3 bc$ -0.267 finishes,
        // bd$ -0.933 ranks third (dropped, not kept as finished), bce -0.567 and bdf -0.933
        // go on as beams, and bc$ beats both.
        let out = run(Params::new(2), table);
        let want = "T root:2, X root:[0, 1], T b:2, X b:[0, 1], T bc:2, T bd:2, X bc:[0, 1], \
                    X bd:[1], F bc$";
        assert_eq!(log(&out), want);
    }

    #[test]
    fn a_round_makes_nodes_only_of_the_kept_candidates() {
        // Every path is offered k tokens "t0".."t{k-1}" (t_i has logprob -0.1·(i+1)), no EOS:
        // the tree holds the root and width nodes per round, not width² candidates.
        let (width, rounds) = (4, 6);
        let mut s = Beam::from_params(&Params::new(width).set("max_tokens", rounds)).unwrap();
        let offers = |_: &SearchTree, _: NodeId, k: usize| -> Vec<SimToken> {
            (0..k)
                .map(|i| SimToken::new(&format!("t{i}"), -0.1 * (i as f32 + 1.0)))
                .collect()
        };
        let out = Simulator::new(|_, _, _| panic!("beam samples nothing"))
            .with_topk(offers)
            .run(&mut s, "q")
            .unwrap();
        assert_eq!(out.tree.len(), 1 + width * rounds);
        let offered = out
            .actions
            .iter()
            .filter(|a| matches!(a, Action::ExpandTopK { .. }));
        assert_eq!(offered.count(), 1 + width * (rounds - 1));
        assert_eq!(path(&out, out.answer.unwrap()), "t0".repeat(rounds));
    }

    #[test]
    fn a_walk_past_the_presorted_head_ranks_the_rest() {
        // Beams offering two EOS tokens each (as a model with several EOS ids does): the
        // best 2·width = 8 candidates, presorted, are all EOS (4 finish, 4 rank too low), so
        // the open beams are chosen from the rest: the x of every beam, none of the y.
        const OFFER: &[(&str, f32)] = &[("$", -0.01), ("$", -0.02), ("x", -5.0), ("y", -6.0)];
        let out = run(
            Params::new(4),
            &[
                ("", &[("a", -0.1), ("b", -0.2), ("c", -0.3), ("d", -0.4)]),
                ("a", OFFER),
                ("b", OFFER),
                ("c", OFFER),
                ("d", OFFER),
            ],
        );
        let want = "T root:4, X root:[0, 1, 2, 3], T a:4, T b:4, T c:4, T d:4, \
                    X a:[0, 1, 2], X b:[0, 1, 2], X c:[2], X d:[2], F a$";
        assert_eq!(log(&out), want);
    }

    #[test]
    fn rejects_bad_params() {
        assert!(Beam::from_params(&Params::new(0)).is_err());
        assert!(Beam::from_params(&Params::new(2).set("length_penalty", -1)).is_err());
        assert!(Beam::from_params(&Params::new(2).set("max_tokens", 0)).is_err());
        assert!(Beam::from_params(&Params::new(2).set("beam_width", 2)).is_err());
    }
}
