//! A deterministic runner for strategies: a scripted policy and scripted verifiers stand in
//! for models, with the same event semantics as the [`crate::Scheduler`] (see the contract in
//! [`crate::strategy`]). Strategy tests use it to check the exact decisions a strategy makes.
//!
//! Time runs in ticks as in the scheduler: each tick every running child receives one token;
//! children that stop in a tick report in creation order; scores and top-k offers asked for
//! in one tick arrive in the next; `Extend` reports at once.

use crate::strategy::{Action, Event, Strategy, TopToken, Until};
use crate::tree::{NodeId, SearchTree, StopReason};
use std::collections::{HashMap, VecDeque};

/// One scripted token.
#[derive(Clone, Debug, PartialEq)]
pub struct SimToken {
    pub text: String,
    pub logprob: f32,
    pub entropy: f32,
    /// End of generation.
    pub eos: bool,
    /// The hidden state the runner reports with this token (see [`crate::tree::Node::hidden`]).
    pub hidden: Vec<f32>,
}

impl SimToken {
    /// A token of `text` with log-probability `logprob` and entropy 1.
    pub fn new(text: &str, logprob: f32) -> Self {
        SimToken {
            text: text.into(),
            logprob,
            entropy: 1.0,
            eos: false,
            hidden: vec![],
        }
    }
    /// The end-of-generation token.
    pub fn eos() -> Self {
        SimToken {
            text: String::new(),
            logprob: 0.0,
            entropy: 1.0,
            eos: true,
            hidden: vec![],
        }
    }
}

/// Splits `text` into one token per whitespace-separated word (keeping the spaces), all with
/// `logprob`, ending with EOS: the usual way to script a continuation.
pub fn words(text: &str, logprob: f32) -> Vec<SimToken> {
    let mut out: Vec<SimToken> = text
        .split_inclusive(' ')
        .map(|w| SimToken::new(w, logprob))
        .collect();
    out.push(SimToken::eos());
    out
}

/// The scripted policy: the continuation of `node` for its `i`-th child.
pub type PolicyFn<'a> = Box<dyn FnMut(&SearchTree, NodeId, usize) -> Vec<SimToken> + 'a>;
/// The scripted top-k: the `k` most likely next tokens of `node`.
pub type TopKFn<'a> = Box<dyn FnMut(&SearchTree, NodeId, usize) -> Vec<SimToken> + 'a>;
/// The scripted verifier: score of `node` by verifier number `v`.
pub type VerifyFn<'a> = Box<dyn FnMut(&SearchTree, NodeId, usize) -> f64 + 'a>;

/// What a simulated search ended with.
#[derive(Debug)]
pub struct SimOutcome {
    pub tree: SearchTree,
    pub answer: Option<NodeId>,
    pub text: Option<String>,
    /// Every action the strategy asked for, in order.
    pub actions: Vec<Action>,
    /// Ticks the search took.
    pub ticks: usize,
}

struct Running {
    node: NodeId,
    script: Vec<SimToken>,
    at: usize,
    until: Until,
    /// Length of the node's text before generation (stop texts are searched after it).
    generated: usize,
}

/// The scripted runner.
pub struct Simulator<'a> {
    policy: PolicyFn<'a>,
    topk: TopKFn<'a>,
    verify: VerifyFn<'a>,
    /// Top-k offers not yet taken up, by node.
    offers: HashMap<NodeId, Vec<SimToken>>,
    /// Gives up (with an error) after this many ticks.
    pub max_ticks: usize,
}

impl<'a> Simulator<'a> {
    /// A runner with the given policy; top-k and verifier scripts default to panicking.
    pub fn new(policy: impl FnMut(&SearchTree, NodeId, usize) -> Vec<SimToken> + 'a) -> Self {
        Simulator {
            policy: Box::new(policy),
            topk: Box::new(|_, _, _| panic!("the test scripted no top-k")),
            verify: Box::new(|_, _, _| panic!("the test scripted no verifier")),
            offers: HashMap::new(),
            max_ticks: 10_000,
        }
    }
    pub fn with_topk(
        mut self,
        f: impl FnMut(&SearchTree, NodeId, usize) -> Vec<SimToken> + 'a,
    ) -> Self {
        self.topk = Box::new(f);
        self
    }
    pub fn with_verifier(mut self, f: impl FnMut(&SearchTree, NodeId, usize) -> f64 + 'a) -> Self {
        self.verify = Box::new(f);
        self
    }

    /// Runs `strategy` on a prompt until it finishes; errors if it stalls (no work and no
    /// finish) or exceeds `max_ticks`.
    pub fn run(&mut self, strategy: &mut dyn Strategy, prompt: &str) -> Result<SimOutcome, String> {
        let mut tree = SearchTree::new(vec![]);
        if let Some(n) = tree.node_mut(0) {
            n.text = prompt.to_string();
        }
        let mut log = Vec::new();
        let mut running: Vec<Running> = Vec::new();
        // Work that reports in the next tick.
        let mut later: VecDeque<Event> = VecDeque::new();
        let mut events: VecDeque<Event> = VecDeque::new();
        let mut pending: VecDeque<Action> = strategy.start(&tree).into();
        for tick in 0..self.max_ticks {
            loop {
                while let Some(a) = pending.pop_front() {
                    log.push(a.clone());
                    if let Action::Finish { answer, text } = a {
                        return Ok(SimOutcome {
                            tree,
                            answer,
                            text,
                            actions: log,
                            ticks: tick,
                        });
                    }
                    self.apply(a, &mut tree, &mut running, &mut later, &mut events)?;
                }
                let Some(e) = events.pop_front() else { break };
                pending.extend(strategy.on_event(&tree, e));
            }
            if running.is_empty() && later.is_empty() {
                return Err(format!(
                    "strategy {} stalled at tick {tick}: nothing running and no Finish",
                    strategy.name()
                ));
            }
            events.extend(later.drain(..));
            // One token for every running child.
            let mut still = Vec::new();
            for mut r in running.drain(..) {
                if tree
                    .node(r.node)
                    .is_none_or(|n| !n.status.eq(&crate::NodeStatus::Running))
                {
                    continue; // pruned
                }
                let stop = step(&mut tree, &mut r);
                let stop = match stop {
                    None if !strategy.on_token(&tree, r.node) => Some(StopReason::Cut),
                    s => s,
                };
                match stop {
                    Some(reason) => {
                        tree.stop(r.node, reason);
                        let parent = tree.node(r.node).and_then(|n| n.parent).unwrap_or(0);
                        events.push_back(Event::Expanded {
                            node: parent,
                            child: r.node,
                        });
                    }
                    None => still.push(r),
                }
            }
            running = still;
        }
        Err(format!(
            "strategy {} ran past {} ticks",
            strategy.name(),
            self.max_ticks
        ))
    }

    fn apply(
        &mut self,
        a: Action,
        tree: &mut SearchTree,
        running: &mut Vec<Running>,
        later: &mut VecDeque<Event>,
        now: &mut VecDeque<Event>,
    ) -> Result<(), String> {
        match a {
            Action::Expand { node, k, until } => self.expand(tree, running, node, k, until)?,
            Action::Prompt { text, k, until } => {
                let root = tree.add_root(vec![], text);
                self.expand(tree, running, root, k, until)?;
            }
            Action::ExpandTopK { node, k } => {
                exists(tree, node)?;
                let mut script = (self.topk)(tree, node, k);
                script.truncate(k);
                let options = script
                    .iter()
                    .map(|t| TopToken {
                        token: intern(&t.text),
                        logprob: t.logprob,
                        eos: t.eos,
                    })
                    .collect();
                self.offers.insert(node, script);
                later.push_back(Event::TopK { node, options });
            }
            Action::Extend { node, picks } => {
                let script = self
                    .offers
                    .remove(&node)
                    .ok_or_else(|| format!("extend of node {node}, which has no offer"))?;
                let mut children = Vec::new();
                for p in picks {
                    let t = script
                        .get(p)
                        .ok_or_else(|| format!("pick {p} of {} offered", script.len()))?;
                    let c = tree.add_child(node, vec![], 0.0).expect("node exists");
                    tree.push_token(c, intern(&t.text), &t.text, t.logprob, t.entropy);
                    let stop = if t.eos {
                        StopReason::Eos
                    } else {
                        StopReason::Length
                    };
                    tree.stop(c, stop);
                    children.push(c);
                }
                now.push_back(Event::Extended { node, children });
            }
            Action::Score { node, verifier } => {
                exists(tree, node)?;
                let score = (self.verify)(tree, node, verifier);
                tree.set_score(node, score);
                later.push_back(Event::Scored {
                    node,
                    verifier,
                    score,
                });
            }
            Action::Prune { node, reason } => {
                exists(tree, node)?;
                for n in tree.prune(node, &reason) {
                    self.offers.remove(&n);
                }
            }
            Action::Finish { .. } => unreachable!("handled by run"),
        }
        Ok(())
    }

    fn expand(
        &mut self,
        tree: &mut SearchTree,
        running: &mut Vec<Running>,
        node: NodeId,
        k: usize,
        until: Until,
    ) -> Result<(), String> {
        exists(tree, node)?;
        for _ in 0..k {
            let i = tree.node(node).map_or(0, |n| n.children.len());
            let script = (self.policy)(tree, node, i);
            let c = tree.add_child(node, vec![], 0.0).expect("node exists");
            tree.set_running(c);
            running.push(Running {
                node: c,
                script,
                at: 0,
                until: until.clone(),
                generated: 0,
            });
        }
        Ok(())
    }
}

fn exists(tree: &SearchTree, node: NodeId) -> Result<(), String> {
    tree.node(node)
        .map(|_| ())
        .ok_or_else(|| format!("action on unknown node {node}"))
}

/// A stable id for a token text (the simulator has no vocabulary).
fn intern(text: &str) -> u32 {
    text.bytes()
        .fold(2166136261u32, |h, b| (h ^ b as u32).wrapping_mul(16777619))
}

/// Gives `r` its next scripted token; returns why it stopped, if it did.
fn step(tree: &mut SearchTree, r: &mut Running) -> Option<StopReason> {
    let Some(t) = r.script.get(r.at).cloned() else {
        return Some(StopReason::Eos);
    };
    r.at += 1;
    if t.eos {
        return Some(StopReason::Eos);
    }
    tree.set_hidden(r.node, t.hidden.clone());
    tree.push_token(r.node, intern(&t.text), &t.text, t.logprob, t.entropy);
    let n = tree.node(r.node).expect("running node exists");
    let tail = &n.text[r.generated..];
    if r.until
        .stop
        .iter()
        .any(|s| !s.is_empty() && tail.contains(s.as_str()))
    {
        return Some(StopReason::Stop);
    }
    if r.until
        .delimiters
        .iter()
        .any(|s| !s.is_empty() && tail.contains(s.as_str()))
    {
        return Some(StopReason::Delimiter);
    }
    if r.until.max_tokens > 0 && n.tokens.len() >= r.until.max_tokens {
        return Some(StopReason::Length);
    }
    None
}
