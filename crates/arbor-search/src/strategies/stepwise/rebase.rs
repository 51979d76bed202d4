//! `rebase`: reward-balanced search (Wu et al. 2024, "Inference Scaling Laws: An Empirical
//! Analysis of Compute-Optimal Inference for Problem-Solving with Language Models",
//! arXiv 2408.00724).
//!
//! The root is expanded `width` = N ways by one step and every step is scored by verifier
//! 0. Then, depth by depth: finished candidates are set aside and each one spends a unit of
//! the budget, leaving B = N − (finished so far); B expansions are shared among the depth's
//! open nodes in proportion to `softmax(score / temperature)` (largest-remainder rounding,
//! ties to the earlier node, so exactly B are given out); each node is expanded as many
//! times as it was given, and a node given none is pruned ("rebase: no budget", with any
//! parent left without a wanted child; unscored or NaN scores weigh 0). The search
//! ends when the budget is spent, no open node is left, or the open nodes are `max_steps`
//! deep. Answer: the best-scored finished candidate, or with `vote=true` the answer with the
//! highest total score (negative scores count 0) among the finished candidates that have an
//! answer ([`answer::extract`]); the chosen node is that answer's best-scored candidate and
//! the finish text the answer. When nothing finished (or, voting, nothing has an answer):
//! the best-scored open node.
//!
//! Parameters: `width` N; `temperature` (default 0.2, > 0); `vote` (default false);
//! `delimiter`, `step_tokens`, `max_steps`.

use super::{best, check, num, prune_dead, score, Steps};
use crate::answer;
use crate::params::Params;
use crate::strategy::{Action, Event, Strategy};
use crate::tree::{NodeId, SearchTree};

pub struct Rebase {
    steps: Steps,
    width: usize,
    temperature: f64,
    vote: bool,
    /// Steps of the current depth, and how many are yet to stop or be scored.
    cands: Vec<NodeId>,
    waiting: usize,
    finished: Vec<NodeId>,
    /// The last depth's open nodes (the fallback answer).
    open: Vec<NodeId>,
}

/// Shares `budget` among `weights` in proportion (largest remainders, ties to the earlier).
pub(crate) fn allocate(budget: usize, weights: &[f64]) -> Vec<usize> {
    let sum: f64 = weights.iter().sum();
    if weights.is_empty() || sum.is_nan() || sum <= 0.0 {
        return vec![0; weights.len()];
    }
    let exact: Vec<f64> = weights.iter().map(|w| budget as f64 * w / sum).collect();
    let mut out: Vec<usize> = exact.iter().map(|x| x.floor() as usize).collect();
    let mut order: Vec<usize> = (0..weights.len()).collect();
    let frac = |i: usize| exact[i] - exact[i].floor();
    order.sort_by(|&a, &b| frac(b).total_cmp(&frac(a)));
    let given: usize = out.iter().sum();
    for &i in order.iter().take(budget.saturating_sub(given)) {
        out[i] += 1;
    }
    out
}

impl Rebase {
    pub fn from_params(p: &Params) -> Result<Self, String> {
        let width = check(p, &["temperature", "vote"], true)?;
        let temperature = p.f64("temperature", 0.2)?;
        if !(temperature.is_finite() && temperature > 0.0) {
            return Err(format!("temperature {temperature} must be a number > 0"));
        }
        Ok(Rebase {
            steps: Steps::from_params(p)?,
            width,
            temperature,
            vote: p.bool("vote", false)?,
            cands: vec![],
            waiting: 0,
            finished: vec![],
            open: vec![],
        })
    }

    fn expand(&self, node: NodeId, k: usize) -> Action {
        Action::Expand {
            node,
            k,
            until: self.steps.until(),
        }
    }

    /// The depth is scored: share out the budget left.
    fn step(&mut self, tree: &SearchTree) -> Vec<Action> {
        let cands = std::mem::take(&mut self.cands);
        let (done, open): (Vec<NodeId>, Vec<NodeId>) = cands
            .into_iter()
            .partition(|&c| tree.node(c).is_some_and(|n| n.is_finished()));
        self.finished.extend(done);
        self.open = open;
        let budget = self.width.saturating_sub(self.finished.len());
        let deep = self
            .open
            .first()
            .is_some_and(|&n| tree.depth(n) >= self.steps.max_steps);
        if budget == 0 || self.open.is_empty() || deep {
            return vec![self.finish(tree)];
        }
        // Unscored or NaN scores weigh nothing; if nothing weighs anything, all weigh alike.
        let s = |n: NodeId| num(score(tree, n));
        let top = self
            .open
            .iter()
            .map(|&n| s(n))
            .fold(f64::NEG_INFINITY, f64::max);
        let mut weights: Vec<f64> = (self.open.iter())
            .map(|&n| num(((s(n) - top) / self.temperature).exp()).max(0.0))
            .collect();
        if weights.iter().all(|&w| w == 0.0) {
            weights.fill(1.0);
        }
        let shares = allocate(budget, &weights);
        let zero: Vec<NodeId> = (self.open.iter().zip(&shares))
            .filter(|&(_, &k)| k == 0)
            .map(|(&n, _)| n)
            .collect();
        let mut out = prune_dead(tree, &zero, |_| true, "rebase: no budget");
        for (&node, &k) in self.open.iter().zip(&shares) {
            if k > 0 {
                out.push(self.expand(node, k));
            }
        }
        self.waiting = 2 * shares.iter().sum::<usize>();
        out
    }

    fn finish(&self, tree: &SearchTree) -> Action {
        let by_score = |n: NodeId| score(tree, n);
        if !self.vote {
            let answer = best(self.finished.iter().copied(), by_score)
                .or_else(|| best(self.open.iter().copied(), by_score));
            return Action::Finish { answer, text: None };
        }
        // Weighted vote: total score per answer, in order of first appearance.
        let mut tally: Vec<(String, f64, NodeId)> = vec![];
        for &n in &self.finished {
            let Some(key) = answer::extract(&tree.path_text(n)) else {
                continue;
            };
            let s = num(by_score(n)).max(0.0);
            match tally.iter_mut().find(|t| t.0 == key) {
                Some(t) => {
                    t.1 += s;
                    if by_score(n) > by_score(t.2) {
                        t.2 = n;
                    }
                }
                None => tally.push((key, s, n)),
            }
        }
        let i = best(0..tally.len(), |i| tally[i].1);
        match i {
            Some(i) => Action::Finish {
                answer: Some(tally[i].2),
                text: Some(tally[i].0.clone()),
            },
            None => Action::Finish {
                answer: best(self.open.iter().copied(), by_score),
                text: None,
            },
        }
    }
}

impl Strategy for Rebase {
    fn name(&self) -> &str {
        "rebase"
    }

    fn start(&mut self, tree: &SearchTree) -> Vec<Action> {
        self.waiting = 2 * self.width;
        vec![self.expand(tree.root(), self.width)]
    }

    fn on_event(&mut self, tree: &SearchTree, event: Event) -> Vec<Action> {
        // Each step counts twice: when it stops and when its score arrives.
        let out = match event {
            Event::Expanded { child, .. } => {
                self.cands.push(child);
                vec![Action::Score {
                    node: child,
                    verifier: 0,
                }]
            }
            Event::Scored { .. } => vec![],
            Event::TopK { .. } | Event::Extended { .. } => return vec![],
        };
        self.waiting = self.waiting.saturating_sub(1);
        if self.waiting > 0 {
            return out;
        }
        self.step(tree)
    }

    fn width(&self) -> usize {
        self.width
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{log, policy, verifier};
    use super::*;
    use crate::sim::{SimOutcome, SimToken, Simulator};

    #[test]
    fn allocates_exactly_the_budget() {
        assert_eq!(allocate(4, &[1.0, 1.0, 1.0]), vec![2, 1, 1]);
        assert_eq!(allocate(3, &[0.7, 0.2, 0.1]), vec![2, 1, 0]);
        assert_eq!(allocate(5, &[0.0, 0.0]), vec![0, 0]);
        assert_eq!(allocate(0, &[1.0]), vec![0]);
    }

    fn run(p: Params, ends: &[&str], scores: &str) -> SimOutcome {
        let mut s = Rebase::from_params(&p).unwrap();
        Simulator::new(policy(ends, ""))
            .with_verifier(verifier(scores))
            .run(&mut s, "q")
            .unwrap()
    }

    #[test]
    fn shares_the_budget_by_softmaxed_scores_and_spends_it_on_finished_ones() {
        let p = Params::new(4).set("max_steps", 3);
        let scores = "a=.9 b=.7 c=.1 d=.5 aa=.6 ab=.8 ba=.6 aaa=.3 baa=.95";
        // Depth 1: d finished, budget 3; weights e^0, e^-1, e^-4 → exact 2.16, 0.80, 0.04.
        // Depth 2: ab finished, budget 2, shared evenly by aa and ba (both 0.6). Depth 3 is
        // max_steps; baa is the best-scored finished candidate.
        let want = "E root:4, S a, S b, S c, S d, P c rebase: no budget, E a:2, E b:1, \
                    S aa, S ab, S ba, E aa:1, E ba:1, S aaa, S baa, F baa";
        assert_eq!(log(&run(p, &["d", "ab", "baa"], scores)), want);
    }

    fn vote(p: Params) -> SimOutcome {
        let texts = ["so \\boxed{2}", "\\boxed{3}", "it is \\boxed{2}"];
        let mut s = Rebase::from_params(&p).unwrap();
        Simulator::new(move |_: &SearchTree, _, i| vec![SimToken::new(texts[i], -1.0)])
            .with_verifier(|_: &SearchTree, n, _| [0.0, 0.5, 0.9, 0.5][n])
            .run(&mut s, "q")
            .unwrap()
    }

    #[test]
    fn votes_by_total_score_when_asked() {
        // All three finish at once (the budget is spent): 2 has 1.0 in all, 3 has 0.9.
        let out = vote(Params::new(3).set("vote", true));
        assert_eq!((out.answer, out.text.as_deref()), (Some(1), Some("2")));
        let out = vote(Params::new(3));
        assert_eq!((out.answer, out.text), (Some(2), None));
    }

    #[test]
    fn width_one_and_nothing_finished_answers_the_best_open_node() {
        let p = Params::new(1).set("max_steps", 2).set("vote", true);
        let out = run(p, &[], "a=.2 aa=.1");
        assert_eq!(log(&out), "E root:1, S a, E a:1, S aa, F aa");
        assert_eq!(out.text, None);
    }

    #[test]
    fn unusable_scores_share_the_budget_evenly() {
        let out = run(
            Params::new(2).set("max_steps", 2),
            &[],
            "a=NaN b=NaN aa=NaN ba=NaN",
        );
        let want = "E root:2, S a, S b, E a:1, E b:1, S aa, S ba, F aa";
        assert_eq!(log(&out), want);
    }

    #[test]
    fn rejects_bad_params() {
        assert!(Rebase::from_params(&Params::new(2).set("temperature", 0)).is_err());
        assert!(Rebase::from_params(&Params::new(2).set("vote", "maybe")).is_err());
        assert!(Rebase::from_params(&Params::new(2).set("beam_width", 2)).is_err());
    }
}
