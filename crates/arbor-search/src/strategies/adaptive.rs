//! `adaptive`: compute-optimal sample counts (Snell et al. 2024, arXiv 2408.03314): spend
//! samples where they still help, within one prompt ([`Adaptive`]) and across a data set's
//! prompts ([`allocate`]).
//!
//! Both rest on the same estimate: with a pass rate p (chance that one sample is correct),
//! the N+1-th sample helps only if the first N all failed and it succeeds, so its marginal
//! gain in pass@N is p(1−p)^N. Easy prompts (p near 1) stop early; so do prompts that look
//! hopeless (p = 0 gives no gain; smooth p first if that is not wanted).

use super::{sample_until, sample_width, ScoreEach};
use crate::params::Params;
use crate::strategy::{Action, Event, Strategy, Until};
use crate::tree::SearchTree;
use std::sync::{Arc, Mutex};

/// Adaptive best-of-N for one prompt: samples `probe` candidates and has verifier 0 score
/// them; p = the fraction scoring at least `threshold`. It then draws more samples, in one
/// expansion, while the next sample's marginal gain p(1−p)^N (N = samples drawn so far) is
/// at least `min_gain` and fewer than `budget` have been drawn; each is scored, and the
/// answer is the best score over all samples (ties as in best-of-n).
///
/// Parameters: `width` (≥ 1), `budget` (most samples in all, default `width`), `probe`
/// (default min(4, budget), 1..=budget), `threshold` (score that counts as a pass, default
/// 0.5), `min_gain` (default 0.01, ≥ 0; 0 spends the whole budget), `max_tokens` (default
/// 512), `stop` (default none).
///
/// Pooled ([`Adaptive::share`]; what `arbor search --dataset` does for more than one prompt
/// unless `pooled=false`): `budget` is the mean per prompt of a [`SharedBudget`] split across
/// the data set by marginal gain, `min_gain` is not used, and one prompt may draw up to
/// `max_samples` (default 4 × budget).
#[derive(Debug)]
pub struct Adaptive {
    probe: usize,
    budget: usize,
    threshold: f64,
    min_gain: f64,
    until: Until,
    requested: usize,
    probing: bool,
    each: ScoreEach,
    /// Most samples in all when the budget is pooled.
    max_samples: usize,
    pool: Option<SharedBudget>,
}

impl Adaptive {
    pub fn from_params(p: &Params) -> Result<Self, String> {
        let width = sample_width(
            p,
            &[
                "budget",
                "probe",
                "threshold",
                "min_gain",
                "max_samples",
                "pooled",
            ],
        )?;
        let budget = p.usize("budget", width)?;
        let max_samples = p.usize("max_samples", budget.saturating_mul(4))?;
        p.bool("pooled", true)?;
        let probe = p.usize("probe", budget.min(4))?;
        let threshold = p.f64("threshold", 0.5)?;
        let min_gain = p.f64("min_gain", 0.01)?;
        if budget == 0 {
            return Err("parameter budget must be at least 1".into());
        }
        if probe == 0 || probe > budget {
            return Err(format!(
                "parameter probe={probe} must be in 1..={budget} (the budget)"
            ));
        }
        if max_samples < budget {
            return Err(format!(
                "parameter max_samples={max_samples} must be at least the budget ({budget})"
            ));
        }
        if !threshold.is_finite() {
            return Err("parameter threshold must be a number".into());
        }
        if !(min_gain >= 0.0 && min_gain.is_finite()) {
            return Err(format!("parameter min_gain={min_gain} must be at least 0"));
        }
        Ok(Adaptive {
            probe,
            budget,
            threshold,
            min_gain,
            until: sample_until(p)?,
            requested: 0,
            probing: true,
            each: ScoreEach::default(),
            max_samples,
            pool: None,
        })
    }

    /// A budget of `budget` samples per prompt, on average, for `prompts` searches of these
    /// parameters to share.
    pub fn pool_for(&self, prompts: usize) -> SharedBudget {
        SharedBudget::new(prompts, self.budget, self.probe)
    }

    /// Draws the samples after the probes from `pool` instead of this prompt's own budget.
    pub fn share(mut self, pool: &SharedBudget) -> Self {
        self.pool = Some(pool.clone());
        self
    }
}

/// A sample budget shared by the adaptive searches of a data set (Snell et al.'s
/// compute-optimal split across prompts): every prompt first draws its probes; then, as
/// each finishes probing with pass rate p, it is granted extra samples by [`allocate_from`]
/// over itself and the prompts still probing (whose rate is guessed as the mean of the rates
/// reported so far), out of what is left. Grants are final, so a prompt never waits for
/// another: the split is the greedy online form of the offline allocation.
#[derive(Clone, Debug)]
pub struct SharedBudget(Arc<Mutex<Pool>>);

#[derive(Debug)]
struct Pool {
    remaining: usize,
    pending: usize,
    rates: Vec<f64>,
    granted: usize,
}

impl SharedBudget {
    /// `per_prompt` samples on average for each of `prompts` prompts, `probe` of which each
    /// draws before asking for more.
    pub fn new(prompts: usize, per_prompt: usize, probe: usize) -> Self {
        SharedBudget(Arc::new(Mutex::new(Pool {
            remaining: prompts.saturating_mul(per_prompt.saturating_sub(probe)),
            pending: prompts,
            rates: Vec::new(),
            granted: 0,
        })))
    }

    /// Extra samples for a prompt that drew `drawn` and passed at rate `p`, at most `cap`
    /// samples in all.
    pub fn grant(&self, p: f64, drawn: usize, cap: usize) -> usize {
        let mut pool = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let p = if p.is_nan() { 0.0 } else { p.clamp(0.0, 1.0) };
        pool.rates.push(p);
        let others = pool.pending.saturating_sub(1);
        let prior = pool.rates.iter().sum::<f64>() / pool.rates.len() as f64;
        let mut rates = vec![prior; others + 1];
        rates[0] = p;
        let share = allocate_from(&rates, &vec![drawn; others + 1], pool.remaining, cap)[0];
        pool.remaining -= share;
        pool.pending = others;
        pool.granted += share;
        share
    }

    /// Samples granted so far, and samples still unspent.
    pub fn totals(&self) -> (usize, usize) {
        let pool = self.0.lock().unwrap_or_else(|e| e.into_inner());
        (pool.granted, pool.remaining)
    }
}

/// Marginal gain in pass@N of one more sample after `n`: p(1−p)^n.
fn gain(p: f64, n: usize) -> f64 {
    p * (1.0 - p).powi(n.min(i32::MAX as usize) as i32)
}

/// How many samples to draw after `drawn`, with pass rate `p`: while the next one's gain is
/// at least `min_gain` and fewer than `budget` are drawn.
pub fn more_samples(p: f64, drawn: usize, budget: usize, min_gain: f64) -> usize {
    let p = if p.is_nan() { 0.0 } else { p.clamp(0.0, 1.0) };
    let mut n = drawn;
    while n < budget && gain(p, n) >= min_gain {
        n += 1;
    }
    n.saturating_sub(drawn)
}

/// Splits `budget` samples among prompts with estimated pass rates `pass_rates` (clamped to
/// 0..=1, NaN read as 0): each next sample goes to the prompt whose next sample has the
/// largest marginal gain p(1−p)^n, n = the samples it was given so far (ties: the earlier
/// prompt). A prompt at p = 1 gets one sample (gain 1, then 0) and one at p = 0 none;
/// samples with no gain anywhere are not handed out, so the total may be below `budget`.
pub fn allocate(pass_rates: &[f64], budget: usize) -> Vec<usize> {
    allocate_from(pass_rates, &vec![0; pass_rates.len()], budget, usize::MAX)
}

/// [`allocate`] for prompts that already drew `drawn[i]` samples, none ending above `cap`
/// samples in all; returns the extra samples of each.
pub fn allocate_from(pass_rates: &[f64], drawn: &[usize], budget: usize, cap: usize) -> Vec<usize> {
    let p: Vec<f64> = pass_rates
        .iter()
        .map(|&x| if x.is_nan() { 0.0 } else { x.clamp(0.0, 1.0) })
        .collect();
    let mut given = vec![0usize; p.len()];
    for _ in 0..budget {
        let mut best: Option<(usize, f64)> = None;
        for (i, &pi) in p.iter().enumerate() {
            let n = drawn.get(i).copied().unwrap_or(0) + given[i];
            let g = gain(pi, n);
            if n < cap && g > 0.0 && best.is_none_or(|(_, bg)| g > bg) {
                best = Some((i, g));
            }
        }
        match best {
            Some((i, _)) => given[i] += 1,
            None => break,
        }
    }
    given
}

impl Strategy for Adaptive {
    fn name(&self) -> &str {
        "adaptive"
    }

    fn start(&mut self, tree: &SearchTree) -> Vec<Action> {
        self.requested = self.probe;
        vec![Action::Expand {
            node: tree.root(),
            k: self.probe,
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
                if self.each.scores.len() < self.requested {
                    return vec![];
                }
                if self.probing {
                    self.probing = false;
                    let passes = self
                        .each
                        .scores
                        .iter()
                        .filter(|s| s.1 >= self.threshold)
                        .count();
                    let p = passes as f64 / self.probe as f64;
                    let more = match &self.pool {
                        Some(pool) => pool.grant(p, self.probe, self.max_samples),
                        None => more_samples(p, self.probe, self.budget, self.min_gain),
                    };
                    if more > 0 {
                        self.requested += more;
                        return vec![Action::Expand {
                            node: tree.root(),
                            k: more,
                            until: self.until.clone(),
                        }];
                    }
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
        let most = if self.pool.is_some() {
            self.max_samples
        } else {
            self.budget
        };
        self.probe.max(most - self.probe)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{words, SimOutcome, Simulator};
    use crate::tree::NodeId;

    /// Sample i is "s<i>" and scores `scores[i]`.
    fn run(p: Params, scores: &[f64]) -> SimOutcome {
        let mut s = Adaptive::from_params(&p).unwrap();
        Simulator::new(|_, _, i| words(&format!("s{i}"), -1.0))
            .with_verifier(|t, n, _| {
                let i: usize = t.node(n).unwrap().text[1..].parse().unwrap();
                scores[i]
            })
            .run(&mut s, "Q")
            .unwrap()
    }

    fn expand(k: usize) -> Action {
        Action::Expand {
            node: 0,
            k,
            until: Until::tokens(512),
        }
    }

    fn scores(nodes: std::ops::RangeInclusive<NodeId>) -> Vec<Action> {
        nodes
            .map(|node| Action::Score { node, verifier: 0 })
            .collect()
    }

    #[test]
    fn an_easy_prompt_stops_after_the_probes() {
        let out = run(Params::new(16), &[0.9, 0.7, 0.95, 0.6]);
        let mut want = vec![expand(4)];
        want.extend(scores(1..=4));
        want.push(Action::finish(3));
        assert_eq!(out.actions, want);
    }

    #[test]
    fn a_middling_prompt_draws_until_the_gain_is_small() {
        // p = 0.5: gains after 4 and 5 samples are 0.031 and 0.016; after 6, 0.008 < 0.01.
        let out = run(Params::new(16), &[0.9, 0.1, 0.6, 0.2, 0.3, 0.95]);
        let mut want = vec![expand(4)];
        want.extend(scores(1..=4));
        want.push(expand(2));
        want.extend(scores(5..=6));
        want.push(Action::finish(6));
        assert_eq!(out.actions, want);
    }

    #[test]
    fn the_budget_caps_and_a_hopeless_prompt_stops() {
        // p = 0.25 would want 8 more; the budget of 6 leaves 2.
        let p = Params::new(16).set("budget", 6);
        let out = run(p, &[0.1, 0.2, 0.3, 0.6, 0.1, 0.1]);
        assert_eq!(out.actions[5], expand(2));
        assert_eq!(out.answer, Some(4));
        // p = 0: no gain, no more samples; equal scores go to the first.
        let out = run(Params::new(8), &[0.1; 4]);
        assert_eq!(out.actions.len(), 6);
        assert_eq!(out.answer, Some(1));
        // Width 1: one probe, the whole budget.
        let out = run(Params::new(1), &[0.0]);
        assert_eq!(
            out.actions,
            vec![expand(1), scores(1..=1)[0].clone(), Action::finish(1)]
        );
    }

    #[test]
    fn params() {
        let s = Adaptive::from_params(&Params::new(2)).unwrap();
        assert_eq!((s.probe, s.budget, s.width()), (2, 2, 2));
        let s = Adaptive::from_params(&Params::new(10).set("probe", 3)).unwrap();
        assert_eq!(s.width(), 7);
        let s = Adaptive::from_params(&Params::new(4).set("min_gain", 0).set("threshold", 0.8));
        assert_eq!(s.map(|s| (s.min_gain, s.threshold)), Ok((0.0, 0.8)));
        for bad in [
            Params::new(4).set("probe", 5),
            Params::new(4).set("probe", 0),
            Params::new(4).set("budget", 0),
            Params::new(4).set("min_gain", -1),
            Params::new(4).set("threshold", "inf"),
            Params::new(4).set("max_samples", 3),
            Params::new(4).set("pooled", "maybe"),
            Params::new(4).set("samples", 3),
        ] {
            assert!(Adaptive::from_params(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn more_samples_follows_the_marginal_gain() {
        assert_eq!(more_samples(0.5, 4, 100, 0.01), 2);
        assert_eq!(more_samples(0.25, 4, 100, 0.01), 8);
        assert_eq!(more_samples(1.0, 4, 100, 0.01), 0);
        assert_eq!(more_samples(0.0, 4, 100, 0.01), 0);
        assert_eq!(more_samples(0.0, 4, 10, 0.0), 6);
        assert_eq!(more_samples(f64::NAN, 0, 10, 0.01), 0);
    }

    #[test]
    fn allocate_gives_each_sample_the_largest_marginal_gain() {
        // Gains: 1 then 0 for p = 1; 0.5, 0.25, 0.125, 0.0625 for p = 0.5; 0.1, 0.09, 0.081
        // for p = 0.1; always 0 for p = 0.
        assert_eq!(allocate(&[0.5, 0.1, 1.0, 0.0], 6), vec![3, 2, 1, 0]);
        assert_eq!(allocate(&[0.5, 0.1, 1.0, 0.0], 7), vec![3, 3, 1, 0]);
        assert_eq!(allocate(&[0.5, 0.5], 3), vec![2, 1]);
        assert_eq!(allocate(&[0.9, 0.2], 0), vec![0, 0]);
        assert_eq!(allocate(&[], 5), Vec::<usize>::new());
        // Nothing gains after one sample of a sure prompt: the rest is not handed out.
        assert_eq!(allocate(&[1.0, 0.0, f64::NAN], 4), vec![1, 0, 0]);
        assert_eq!(allocate(&[1.5, -0.5], 4), vec![1, 0]);
        let a = allocate(&[0.3, 0.6, 0.05], 50);
        assert_eq!(a.iter().sum::<usize>(), 50);
        assert!(
            a[2] > a[1],
            "the hardest prompt that still gains gets the most: {a:?}"
        );
    }

    #[test]
    fn allocation_from_drawn_samples_respects_the_cap() {
        // p = 0.5 after 4 drawn: gain 0.031; p = 0.2 after 4: 0.082; so 0.2 goes first.
        assert_eq!(allocate_from(&[0.5, 0.2], &[4, 4], 1, 100), vec![0, 1]);
        assert_eq!(allocate_from(&[0.5, 0.2], &[4, 4], 6, 6), vec![2, 2]);
        assert_eq!(allocate(&[0.5, 0.0, 1.0], 3), vec![2, 0, 1]);
    }

    #[test]
    fn a_pooled_budget_goes_where_it_helps_most() {
        // Three prompts, 8 samples each on average, 4 probes each: 12 extra to share.
        let pool = SharedBudget::new(3, 8, 4);
        // Solved prompt: no gain, nothing granted; its unspent share stays in the pool.
        assert_eq!(pool.grant(1.0, 4, 32), 0);
        // A hard prompt (p = 0.25) against one pending prompt guessed at the mean, 0.625.
        let hard = pool.grant(0.25, 4, 32);
        assert!(hard >= 6, "{hard}");
        // The last prompt takes what is left, up to its cap.
        let last = pool.grant(0.5, 4, 8);
        assert_eq!(last, (12 - hard).min(4));
        assert_eq!(pool.totals(), (hard + last, 12 - hard - last));
    }

    #[test]
    fn pooled_searches_draw_their_grant() {
        let p = Params::new(4).set("budget", 8);
        let pool = Adaptive::from_params(&p).unwrap().pool_for(2);
        let mut s = Adaptive::from_params(&p).unwrap().share(&pool);
        assert_eq!(s.width(), 28);
        let scores = [
            0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1,
        ];
        let out = Simulator::new(|_, _, i| words(&format!("s{i}"), -1.0))
            .with_verifier(|t, n, _| {
                let i: usize = t.node(n).unwrap().text[1..].parse().unwrap();
                scores[i]
            })
            .run(&mut s, "Q")
            .unwrap();
        // p = 0.25 with one more prompt pending, guessed at the same rate: the pool's 8
        // extra samples are split evenly and this prompt draws its half.
        let granted = pool.totals().0;
        assert_eq!(out.actions[5], expand(granted));
        assert!(granted > 0);
        assert_eq!(out.answer, Some(1));
    }
}
