//! `tournament`: recursive tournament voting (seed 002, "Recursive Tournament Voting"): the
//! policy itself judges pairs of candidates until one is left.
//!
//! `width` candidates are sampled from the prompt (up to `max_tokens` each). Then, round by
//! round, the remaining candidates are paired in order (an odd one out goes through
//! unjudged) and every pair is judged by a fresh prompt, `Action::Prompt` with
//! "Question: … Answer A: … Answer B: … Which answer is correct? Reply A or B." and `judges`
//! samples of up to 8 tokens. Each judge's vote is the first standalone 'A' or 'B' in its
//! reply (a letter with no letter or digit next to it); the pair goes to the side with more
//! votes, and a tie or no vote to the candidate with the higher mean token logprob (then to
//! A). Losers are pruned ("tournament: lost to N"), and so is each judging prompt once
//! read ("tournament: judged"). The last candidate standing is the answer. The question is
//! the root's text.
//!
//! Parameters: `width` candidates; `judges` per pair (default 1); `max_tokens` per
//! candidate (default 1024).

use super::{check, path_mean_logprob};
use crate::params::Params;
use crate::strategy::{Action, Event, Strategy, Until};
use crate::tree::{NodeId, SearchTree};

pub struct Tournament {
    width: usize,
    judges: usize,
    max_tokens: usize,
    /// Candidates still in, in order (while sampling: those stopped so far).
    alive: Vec<NodeId>,
    /// The pairs of this round, in the order their prompts were sent; their judging roots
    /// once known (the roots made after node `base`, in order); replies so far per pair.
    pairs: Vec<(NodeId, NodeId)>,
    roots: Vec<NodeId>,
    base: usize,
    replies: Vec<usize>,
    /// Winners of this round, by pair; a bye is decided at once.
    winners: Vec<Option<NodeId>>,
    bye: Option<NodeId>,
    /// Judges still to reply, in all.
    waiting: usize,
}

/// The first standalone 'A' or 'B' in `reply`.
pub(crate) fn vote(reply: &str) -> Option<char> {
    let chars: Vec<char> = reply.chars().collect();
    let word = |i: Option<usize>| {
        i.and_then(|i| chars.get(i))
            .is_some_and(|c| c.is_alphanumeric())
    };
    (0..chars.len()).find_map(|i| {
        let c = chars[i];
        let alone = !word(i.checked_sub(1)) && !word(Some(i + 1));
        (matches!(c, 'A' | 'B') && alone).then_some(c)
    })
}

impl Tournament {
    pub fn from_params(p: &Params) -> Result<Self, String> {
        let width = check(p, &["judges", "max_tokens"], false)?;
        let judges = p.usize("judges", 1)?;
        if judges == 0 {
            return Err("judges must be at least 1".into());
        }
        Ok(Tournament {
            width,
            judges,
            max_tokens: p.usize("max_tokens", 1024)?,
            alive: vec![],
            pairs: vec![],
            roots: vec![],
            base: 0,
            replies: vec![],
            winners: vec![],
            bye: None,
            waiting: width,
        })
    }

    fn prompt(&self, tree: &SearchTree, a: NodeId, b: NodeId) -> Action {
        let q = tree.node(tree.root()).map_or("", |n| n.text.as_str());
        let text = format!(
            "Question: {q}\n\nAnswer A: {}\n\nAnswer B: {}\n\nWhich answer is correct? Reply A or B.",
            tree.path_text(a),
            tree.path_text(b)
        );
        Action::Prompt {
            text,
            k: self.judges,
            until: Until::tokens(8),
        }
    }

    /// Pairs the candidates left, or finishes with the last one.
    fn round(&mut self, tree: &SearchTree) -> Vec<Action> {
        if self.alive.len() <= 1 {
            let answer = self.alive.first().copied();
            return vec![Action::Finish { answer, text: None }];
        }
        self.pairs = self.alive.chunks_exact(2).map(|p| (p[0], p[1])).collect();
        self.bye = (self.alive.len() % 2 == 1).then(|| self.alive[self.alive.len() - 1]);
        self.winners = vec![None; self.pairs.len()];
        self.roots.clear();
        self.base = tree.len();
        self.replies = vec![0; self.pairs.len()];
        self.waiting = self.pairs.len() * self.judges;
        self.pairs
            .iter()
            .map(|&(a, b)| self.prompt(tree, a, b))
            .collect()
    }

    /// Pair `i` is judged: all its judges replied.
    fn judged(&mut self, tree: &SearchTree, i: usize) -> Vec<Action> {
        let (root, (a, b)) = (self.roots[i], self.pairs[i]);
        let replies = tree.node(root).map_or(vec![], |n| n.children.clone());
        let votes: Vec<char> = replies
            .iter()
            .filter_map(|&c| tree.node(c).and_then(|n| vote(&n.text)))
            .collect();
        let for_a = votes.iter().filter(|&&v| v == 'A').count();
        let for_b = votes.len() - for_a;
        let a_wins = match for_a.cmp(&for_b) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Less => false,
            std::cmp::Ordering::Equal => path_mean_logprob(tree, a) >= path_mean_logprob(tree, b),
        };
        let (win, lose) = if a_wins { (a, b) } else { (b, a) };
        self.winners[i] = Some(win);
        let mut out = vec![
            Action::Prune {
                node: lose,
                reason: format!("tournament: lost to {win}"),
            },
            Action::Prune {
                node: root,
                reason: "tournament: judged".into(),
            },
        ];
        if self.waiting == 0 {
            self.alive = self
                .winners
                .iter()
                .flatten()
                .copied()
                .chain(self.bye)
                .collect();
            out.extend(self.round(tree));
        }
        out
    }
}

impl Strategy for Tournament {
    fn name(&self) -> &str {
        "tournament"
    }

    fn start(&mut self, tree: &SearchTree) -> Vec<Action> {
        vec![Action::Expand {
            node: tree.root(),
            k: self.width,
            until: Until::tokens(self.max_tokens),
        }]
    }

    fn on_event(&mut self, tree: &SearchTree, event: Event) -> Vec<Action> {
        let Event::Expanded { node, child } = event else {
            return vec![];
        };
        self.waiting = self.waiting.saturating_sub(1);
        if node == tree.root() {
            self.alive.push(child);
            if self.waiting > 0 {
                return vec![];
            }
            self.alive.sort_unstable();
            return self.round(tree);
        }
        if self.roots.len() < self.pairs.len() {
            // Each judging prompt became a root, in the order the prompts were sent.
            let made = tree.nodes().get(self.base..).unwrap_or(&[]);
            let roots = made.iter().filter(|n| n.parent.is_none()).map(|n| n.id);
            self.roots = roots.take(self.pairs.len()).collect();
        }
        let Some(i) = self.roots.iter().position(|&r| r == node) else {
            return vec![];
        };
        self.replies[i] += 1;
        if self.replies[i] < self.judges {
            return vec![];
        }
        self.judged(tree, i)
    }

    fn width(&self) -> usize {
        self.width.max(self.width / 2 * self.judges)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::log;
    use super::*;
    use crate::sim::{SimOutcome, SimToken, Simulator};

    /// Candidates x, y, z (mean logprobs -1, -0.5, -2); judges answer by `judge(prompt, i)`.
    fn run(p: Params, judge: impl Fn(&str, usize) -> &'static str) -> SimOutcome {
        let mut s = Tournament::from_params(&p).unwrap();
        let cands = [("x", -1.0), ("y", -0.5), ("z", -2.0)];
        Simulator::new(move |t: &SearchTree, n, i| match n {
            0 => vec![SimToken::new(cands[i].0, cands[i].1)],
            _ => vec![SimToken::new(judge(&t.node(n).unwrap().text, i), -0.1)],
        })
        .run(&mut s, "2+2?")
        .unwrap()
    }

    fn prompts(out: &SimOutcome) -> Vec<String> {
        let texts = out.actions.iter().filter_map(|a| match a {
            Action::Prompt { text, k, until } => {
                assert_eq!(until, &Until::tokens(8));
                Some(format!("{k} {text}"))
            }
            _ => None,
        });
        texts.collect()
    }

    #[test]
    fn pairs_are_judged_round_by_round_until_one_is_left() {
        let out = run(Params::new(3), |prompt, _| {
            if prompt.contains("Answer A: x") {
                "Answer: B"
            } else {
                "I think A."
            }
        });
        let want = "E root:3, Q 1, P x tournament: lost to 2, P root tournament: judged, \
                    Q 1, P z tournament: lost to 2, P root tournament: judged, F y";
        assert_eq!(log(&out), want);
        let q = "Which answer is correct? Reply A or B.";
        assert_eq!(
            prompts(&out),
            [
                format!("1 Question: 2+2?\n\nAnswer A: x\n\nAnswer B: y\n\n{q}"),
                format!("1 Question: 2+2?\n\nAnswer A: y\n\nAnswer B: z\n\n{q}"),
            ]
        );
    }

    #[test]
    fn split_or_unreadable_verdicts_go_to_the_likelier_candidate() {
        // Two judges split A / B: y (mean logprob -0.5) beats x (-1).
        let out = run(Params::new(2).set("judges", 2), |_, i| ["A", "B"][i]);
        let want = "E root:2, Q 2, P x tournament: lost to 2, P root tournament: judged, F y";
        assert_eq!(log(&out), want);
        let out = run(Params::new(2), |_, _| "ABBA, no idea");
        assert_eq!(out.answer, Some(2));
    }

    #[test]
    fn one_candidate_needs_no_judge() {
        let out = run(Params::new(1), |_, _| panic!("nothing to judge"));
        assert_eq!(log(&out), "E root:1, F x");
    }

    #[test]
    fn reads_votes_and_rejects_bad_params() {
        assert_eq!(vote("B"), Some('B'));
        assert_eq!(vote("Answer A is right"), Some('A'));
        assert_eq!(vote("(B)."), Some('B'));
        assert_eq!(vote("ABBA"), None);
        assert!(Tournament::from_params(&Params::new(2).set("judges", 0)).is_err());
        assert!(Tournament::from_params(&Params::new(2).set("max_steps", 3)).is_err());
    }
}
