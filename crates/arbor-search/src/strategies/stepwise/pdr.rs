//! `pdr`: parallel-distill-refine (seed 002, "Parallel-Distill-Refine"): draft in parallel,
//! distil the drafts into a short summary, refine from the summary, repeat.
//!
//! `width` drafts are sampled from the prompt. Each of `rounds` rounds then (1) distils the
//! current drafts: one `Action::Prompt` holding the question and every draft, asking for "a
//! concise summary of what they agree on and where they differ" (k = 1, up to
//! `summary_tokens`); and (2) refines: one `Action::Prompt` holding the question and the
//! summary, k = `width` (up to `max_tokens` each), whose replies are the next drafts. A
//! prompt root whose replies were used is pruned ("pdr: distilled" for a drafts' root other
//! than the search's prompt, "pdr: summarised" for a summary's root). Answer: the final
//! drafts' best by mean token logprob, or with `verify=true` by verifier 0 (each final draft
//! is scored). The question is the root's text.
//!
//! Parameters: `width` drafts; `rounds` (default 2; 0 keeps the first drafts); `verify`
//! (default false); `max_tokens` per draft (default 1024); `summary_tokens` (default 512).

use super::{best, check, path_mean_logprob, score};
use crate::params::Params;
use crate::strategy::{Action, Event, Strategy, Until};
use crate::tree::{NodeId, SearchTree};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Stage {
    Drafting,
    Distilling,
    Scoring,
}

pub struct Pdr {
    width: usize,
    rounds: usize,
    verify: bool,
    max_tokens: usize,
    summary_tokens: usize,
    round: usize,
    stage: Stage,
    drafts: Vec<NodeId>,
    waiting: usize,
}

impl Pdr {
    pub fn from_params(p: &Params) -> Result<Self, String> {
        let known = ["rounds", "verify", "max_tokens", "summary_tokens"];
        let width = check(p, &known, false)?;
        Ok(Pdr {
            width,
            rounds: p.usize("rounds", 2)?,
            verify: p.bool("verify", false)?,
            max_tokens: p.usize("max_tokens", 1024)?,
            summary_tokens: p.usize("summary_tokens", 512)?,
            round: 0,
            stage: Stage::Drafting,
            drafts: vec![],
            waiting: width,
        })
    }

    fn question(tree: &SearchTree) -> &str {
        tree.node(tree.root()).map_or("", |n| n.text.as_str())
    }

    /// The drafts are in: distil them, or pick the answer.
    fn drafted(&mut self, tree: &SearchTree) -> Vec<Action> {
        self.drafts.sort_unstable();
        if self.round == self.rounds {
            if self.verify {
                self.stage = Stage::Scoring;
                self.waiting = self.drafts.len();
                let score = |&node| Action::Score { node, verifier: 0 };
                return self.drafts.iter().map(score).collect();
            }
            let answer = best(self.drafts.iter().copied(), |n| path_mean_logprob(tree, n));
            return vec![Action::Finish { answer, text: None }];
        }
        let mut text = format!(
            "Question: {}\n\nHere are candidate solutions:",
            Self::question(tree)
        );
        for (i, &d) in self.drafts.iter().enumerate() {
            text += &format!("\n\nSolution {}:\n{}", i + 1, tree.path_text(d));
        }
        text += "\n\nWrite a concise summary of what they agree on and where they differ.";
        self.stage = Stage::Distilling;
        self.waiting = 1;
        let mut out = vec![Action::Prompt {
            text,
            k: 1,
            until: Until::tokens(self.summary_tokens),
        }];
        let root = self.drafts.first().map_or(0, |&d| tree.root_of(d));
        if root != tree.root() {
            out.push(Action::Prune {
                node: root,
                reason: "pdr: distilled".into(),
            });
        }
        out
    }

    /// The summary `s` is in: refine from it.
    fn distilled(&mut self, tree: &SearchTree, s: NodeId) -> Vec<Action> {
        let summary = tree.node(s).map_or("", |n| n.text.as_str());
        let text = format!(
            "Question: {}\n\nSummary of earlier attempts:\n{summary}\n\nUsing the summary, write \
             a complete and correct solution.",
            Self::question(tree)
        );
        self.round += 1;
        self.stage = Stage::Drafting;
        self.drafts.clear();
        self.waiting = self.width;
        vec![
            Action::Prompt {
                text,
                k: self.width,
                until: Until::tokens(self.max_tokens),
            },
            Action::Prune {
                node: tree.root_of(s),
                reason: "pdr: summarised".into(),
            },
        ]
    }
}

impl Strategy for Pdr {
    fn name(&self) -> &str {
        "pdr"
    }

    fn start(&mut self, tree: &SearchTree) -> Vec<Action> {
        vec![Action::Expand {
            node: tree.root(),
            k: self.width,
            until: Until::tokens(self.max_tokens),
        }]
    }

    fn on_event(&mut self, tree: &SearchTree, event: Event) -> Vec<Action> {
        match (self.stage, event) {
            (Stage::Drafting, Event::Expanded { child, .. }) => {
                self.drafts.push(child);
                self.waiting = self.waiting.saturating_sub(1);
                if self.waiting == 0 {
                    return self.drafted(tree);
                }
                vec![]
            }
            (Stage::Distilling, Event::Expanded { child, .. }) => self.distilled(tree, child),
            (Stage::Scoring, Event::Scored { .. }) => {
                self.waiting = self.waiting.saturating_sub(1);
                if self.waiting > 0 {
                    return vec![];
                }
                let answer = best(self.drafts.iter().copied(), |n| score(tree, n));
                vec![Action::Finish { answer, text: None }]
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
    use super::super::testing::log;
    use super::*;
    use crate::sim::{SimOutcome, SimToken, Simulator};

    /// Drafts of round r are `r<i>` (logprob -1 for i = 0, -0.5 for i = 1); a summary is
    /// `sum` followed by the drafts it saw.
    fn run(p: Params) -> SimOutcome {
        let mut s = Pdr::from_params(&p).unwrap();
        let mut summaries = 0;
        Simulator::new(move |t: &SearchTree, n, i| {
            let prompt = t.node(n).unwrap().text.clone();
            if prompt.contains("Write a concise summary") {
                summaries += 1;
                let seen: Vec<&str> = prompt.lines().filter(|l| l.starts_with('r')).collect();
                return vec![SimToken::new(
                    &format!("sum{summaries}({})", seen.join(",")),
                    -0.1,
                )];
            }
            let lp = [-1.0, -0.5][i];
            vec![SimToken::new(&format!("r{}{i}", summaries), lp)]
        })
        .with_verifier(|t: &SearchTree, n, _| {
            if t.node(n).unwrap().text == "r00" {
                0.9
            } else {
                0.1
            }
        })
        .run(&mut s, "q?")
        .unwrap()
    }

    #[test]
    fn drafts_distils_and_refines_each_round() {
        let out = run(Params::new(2));
        let want = "E root:2, Q 1, Q 2, P root pdr: summarised, Q 1, P root pdr: distilled, \
                    Q 2, P root pdr: summarised, F r21";
        assert_eq!(log(&out), want);
        let prompts: Vec<&str> = out
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::Prompt { text, .. } => Some(text.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(
            prompts[0],
            "Question: q?\n\nHere are candidate solutions:\n\nSolution 1:\nr00\n\nSolution 2:\n\
             r01\n\nWrite a concise summary of what they agree on and where they differ."
        );
        assert_eq!(
            prompts[1],
            "Question: q?\n\nSummary of earlier attempts:\nsum1(r00,r01)\n\nUsing the summary, \
             write a complete and correct solution."
        );
        assert!(prompts[2].contains("Solution 1:\nr10\n\nSolution 2:\nr11"));
        assert!(prompts[3].contains("sum2(r10,r11)"));
    }

    #[test]
    fn zero_rounds_and_verify_pick_among_the_first_drafts() {
        assert_eq!(
            log(&run(Params::new(2).set("rounds", 0))),
            "E root:2, F r01"
        );
        let out = run(Params::new(2).set("rounds", 0).set("verify", true));
        assert_eq!(log(&out), "E root:2, S r00, S r01, F r00");
        let out = run(Params::new(1).set("rounds", 1));
        let want = "E root:1, Q 1, Q 1, P root pdr: summarised, F r10";
        assert_eq!(log(&out), want);
    }

    #[test]
    fn rejects_bad_params() {
        assert!(Pdr::from_params(&Params::new(2).set("verify", "2")).is_err());
        assert!(Pdr::from_params(&Params::new(2).set("rounds", -1)).is_err());
        assert!(Pdr::from_params(&Params::new(2).set("judges", 1)).is_err());
    }
}
