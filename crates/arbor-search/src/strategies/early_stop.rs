//! `early-stop`: confidence-filtered sampling with early stopping (DeepConf-style, Fu et al.
//! 2025, arXiv 2508.15260).

use super::vote::tally;
use super::{argmax, sample_until, sample_width};
use crate::answer;
use crate::params::Params;
use crate::strategy::{Action, Event, Strategy, Until};
use crate::tree::{NodeId, SearchTree};

/// DeepConf-style online early stopping: draws n = `width` samples of the prompt at once.
/// A sample's group confidence is the mean token log-probability over its last `window`
/// tokens (higher is more confident; a stand-in for DeepConf's mean negative top-k
/// log-probability, which the runner does not report). Once `warmup` samples have finished,
/// the threshold is set at the `percentile`-th lowest (nearest rank) of their lowest group
/// confidences; from then on a running sample whose group confidence falls below it is cut
/// (on_token returns false) and pruned with the reason "low confidence: ...". A sample
/// shorter than `window` is judged on all its tokens once finished, and never cut.
///
/// The answer is the confidence-weighted majority over the answers ([`answer::extract`]) of
/// the samples that were not cut, each weighing exp(its lowest group confidence) (the
/// geometric-mean token probability of its least confident stretch); ties as in `vote`.
/// Without any answer, the most confident uncut sample wins (no `text`).
///
/// Parameters: `width` (samples, ≥ 1), `window` (tokens per group, default 32, ≥ 1),
/// `warmup` (finished samples that set the threshold, default min(4, n), 1..=n),
/// `percentile` (default 10, 0..=100; DeepConf-high keeps 90% ≈ 10, DeepConf-low ≈ 90),
/// `max_tokens` (default 512), `stop` (default none).
#[derive(Debug)]
pub struct EarlyStop {
    n: usize,
    until: Until,
    window: usize,
    warmup: usize,
    percentile: f64,
    reported: Vec<NodeId>,
    /// Samples that ended uncut, with their lowest group confidence.
    traces: Vec<(NodeId, f64)>,
    threshold: Option<f64>,
    /// Samples cut, with the group confidence that cut them.
    cut: Vec<(NodeId, f64)>,
}

impl EarlyStop {
    pub fn from_params(p: &Params) -> Result<Self, String> {
        let n = sample_width(p, &["window", "warmup", "percentile"])?;
        let window = p.usize("window", 32)?;
        let warmup = p.usize("warmup", n.min(4))?;
        let percentile = p.f64("percentile", 10.0)?;
        if window == 0 {
            return Err("parameter window must be at least 1".into());
        }
        if warmup == 0 || warmup > n {
            return Err(format!(
                "parameter warmup={warmup} must be in 1..={n} (the width)"
            ));
        }
        if !(0.0..=100.0).contains(&percentile) {
            return Err(format!(
                "parameter percentile={percentile} must be in 0..=100"
            ));
        }
        Ok(EarlyStop {
            n,
            until: sample_until(p)?,
            window,
            warmup,
            percentile,
            reported: vec![],
            traces: vec![],
            threshold: None,
            cut: vec![],
        })
    }

    /// The lowest mean over `window` consecutive log-probabilities (the mean of all of them
    /// when there are fewer; 0 for none).
    fn lowest_group(&self, lps: &[f32]) -> f64 {
        if lps.len() <= self.window {
            return mean(lps);
        }
        lps.windows(self.window)
            .map(mean)
            .fold(f64::INFINITY, f64::min)
    }

    fn finish(&self, tree: &SearchTree) -> Action {
        let votes: Vec<_> = self
            .traces
            .iter()
            .filter_map(|&(id, conf)| {
                let a = answer::extract(&tree.path_text(id))?;
                Some((id, a, conf.exp()))
            })
            .collect();
        match tally(tree, &votes) {
            Some((text, first)) => Action::Finish {
                answer: Some(first),
                text: Some(text),
            },
            None => Action::Finish {
                answer: argmax(self.traces.iter().copied()),
                text: None,
            },
        }
    }
}

fn mean(x: &[f32]) -> f64 {
    if x.is_empty() {
        0.0
    } else {
        x.iter().map(|&v| v as f64).sum::<f64>() / x.len() as f64
    }
}

/// The `p`-th percentile of `values` by nearest rank (p = 0: the lowest).
fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = (p / 100.0 * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

impl Strategy for EarlyStop {
    fn name(&self) -> &str {
        "early-stop"
    }

    fn start(&mut self, tree: &SearchTree) -> Vec<Action> {
        vec![Action::Expand {
            node: tree.root(),
            k: self.n,
            until: self.until.clone(),
        }]
    }

    fn on_token(&mut self, tree: &SearchTree, node: NodeId) -> bool {
        let (Some(t), Some(n)) = (self.threshold, tree.node(node)) else {
            return true;
        };
        let lps = &n.token_logprobs;
        if n.parent != Some(tree.root()) || lps.len() < self.window {
            return true;
        }
        let conf = mean(&lps[lps.len() - self.window..]);
        if conf >= t {
            return true;
        }
        self.cut.push((node, conf));
        false
    }

    fn on_event(&mut self, tree: &SearchTree, event: Event) -> Vec<Action> {
        let Event::Expanded { node, child } = event else {
            return vec![];
        };
        if node != tree.root() || self.reported.contains(&child) {
            return vec![];
        }
        self.reported.push(child);
        let mut out = vec![];
        match self.cut.iter().find(|c| c.0 == child) {
            Some(&(_, conf)) => out.push(Action::Prune {
                node: child,
                reason: format!(
                    "low confidence: {conf:.3} < threshold {:.3}",
                    self.threshold.unwrap_or(f64::NAN)
                ),
            }),
            None => {
                let lps = tree.node(child).map_or(&[][..], |n| &n.token_logprobs);
                self.traces.push((child, self.lowest_group(lps)));
                if self.threshold.is_none() && self.traces.len() >= self.warmup {
                    let confs: Vec<f64> = self.traces.iter().map(|t| t.1).collect();
                    self.threshold = Some(percentile(&confs, self.percentile));
                }
            }
        }
        if self.reported.len() == self.n {
            out.push(self.finish(tree));
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
    use crate::sim::{SimOutcome, SimToken, Simulator};

    /// Words with their log-probabilities, then EOS.
    fn toks(ws: &[(&str, f32)]) -> Vec<SimToken> {
        let mut v: Vec<_> = ws.iter().map(|&(w, lp)| SimToken::new(w, lp)).collect();
        v.push(SimToken::eos());
        v
    }

    fn run(p: Params, scripts: Vec<Vec<SimToken>>) -> SimOutcome {
        let mut s = EarlyStop::from_params(&p).unwrap();
        Simulator::new(move |_, _, i| scripts[i].clone())
            .run(&mut s, "Q")
            .unwrap()
    }

    fn finish(node: NodeId, text: &str) -> Action {
        Action::Finish {
            answer: Some(node),
            text: Some(text.into()),
        }
    }

    #[test]
    fn cuts_below_the_warmup_threshold_and_weighs_votes_by_confidence() {
        let p = Params::new(5).set("window", 2).set("warmup", 2);
        let out = run(
            p,
            vec![
                toks(&[("a ", -0.5), ("5 ", -0.5)]),
                toks(&[("b ", -1.0), ("5 ", -1.0)]),
                // Falls to -2 over its last two tokens after the threshold (-1) is set.
                toks(&[
                    ("c ", -0.5),
                    ("d ", -0.5),
                    ("e ", -2.0),
                    ("f ", -2.0),
                    ("7 ", -0.1),
                ]),
                toks(&[("g ", -0.8), ("7 ", -0.8), ("h ", -0.8), ("7 ", -0.8)]),
                toks(&[("y ", -0.1), ("z ", -0.1), ("7 ", -0.1)]),
            ],
        );
        // "5": e^-0.5 + e^-1 = 0.97; "7": e^-0.8 + e^-0.1 = 1.35, first given by node 4.
        assert_eq!(
            out.actions[1..],
            [
                Action::Prune {
                    node: 3,
                    reason: "low confidence: -2.000 < threshold -1.000".into()
                },
                finish(4, "7"),
            ]
        );
        assert_eq!(out.tree.node(3).unwrap().text, "c d e f ");
    }

    #[test]
    fn a_high_percentile_cuts_more_and_nothing_is_cut_during_warmup() {
        // percentile 100: the threshold is the best warm-up trace's lowest group (-0.5).
        let p = Params::new(3)
            .set("window", 1)
            .set("warmup", 2)
            .set("percentile", 100);
        let out = run(
            p,
            vec![
                toks(&[("1 ", -0.5)]),
                toks(&[("-3 ", -0.9), ("x ", -0.2)]),
                toks(&[
                    ("q ", -3.0),
                    ("r ", -0.4),
                    ("s ", -0.4),
                    ("t ", -0.6),
                    ("1 ", -0.1),
                ]),
            ],
        );
        // Node 3's -3 came before the threshold; its -0.6 at token 4 is cut.
        assert_eq!(
            out.actions[1..],
            [
                Action::Prune {
                    node: 3,
                    reason: "low confidence: -0.600 < threshold -0.500".into()
                },
                finish(1, "1"),
            ]
        );
    }

    #[test]
    fn no_answers_fall_back_to_the_most_confident_trace() {
        let out = run(
            Params::new(3).set("window", 4),
            vec![
                toks(&[("no ", -1.0), ("yes ", -0.2)]),
                toks(&[("maybe ", -0.3)]),
                toks(&[("so ", -0.6), ("so ", -0.6)]),
            ],
        );
        assert_eq!(
            out.actions[1..],
            [Action::Finish {
                answer: Some(2),
                text: None
            }]
        );
        // Width one: warm-up of one, nothing left to cut.
        let out = run(Params::new(1), vec![toks(&[("42 ", -5.0)])]);
        assert_eq!(out.actions[1..], [finish(1, "42")]);
    }

    #[test]
    fn params_and_percentiles() {
        let ok = EarlyStop::from_params(&Params::new(3)).unwrap();
        assert_eq!((ok.window, ok.warmup, ok.percentile), (32, 3, 10.0));
        for bad in [
            Params::new(3).set("window", 0),
            Params::new(3).set("warmup", 0),
            Params::new(3).set("warmup", 4),
            Params::new(3).set("percentile", 101),
            Params::new(3).set("percentile", "high"),
            Params::new(3).set("threshold", 1),
        ] {
            assert!(EarlyStop::from_params(&bad).is_err(), "{bad:?}");
        }
        let v = [-3.0, -1.0, -2.0, -4.0];
        assert_eq!(percentile(&v, 0.0), -4.0);
        assert_eq!(percentile(&v, 10.0), -4.0);
        assert_eq!(percentile(&v, 50.0), -3.0);
        assert_eq!(percentile(&v, 100.0), -1.0);
        let s = EarlyStop::from_params(&Params::new(1).set("window", 2)).unwrap();
        assert_eq!(s.lowest_group(&[-1.0, -3.0, -1.0, -0.5]), -2.0);
        assert_eq!(s.lowest_group(&[-0.5]), -0.5);
        assert_eq!(s.lowest_group(&[]), 0.0);
    }
}
