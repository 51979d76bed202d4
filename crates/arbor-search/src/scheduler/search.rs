//! One search inside the scheduler: its tree, strategy, verifiers, anchors (the sequences
//! its nodes' children fork) and accounting. Turns the strategy's actions into jobs.

use super::anchors::Anchors;
use super::job::{Job, JobKind};
use super::RequestId;
use crate::strategy::{Action, Event, Strategy};
use crate::tree::{NodeId, NodeStatus, SearchTree, StopReason};
use crate::verifier::{Judge, Verifier};
use arbor_kernels::kv::SeqId;
use arbor_kernels::ops::SamplingParams;
use arbor_runtime::{Engine, Tokenizer};
use serde::Serialize;
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

/// A search to run.
pub struct SearchRequest {
    /// The prompt's tokens (as the policy sees them).
    pub prompt: Vec<u32>,
    /// The question as text, for verifiers and strategy-built prompts.
    pub question: String,
    pub strategy: Box<dyn Strategy>,
    /// Verifier `i` answers `Action::Score { verifier: i }`.
    pub verifiers: Vec<Verifier>,
    /// Sampling of every expansion (each child gets its own seed from `seed`).
    pub sampling: SamplingParams,
    /// Stop after this many policy tokens, answering with the best candidate so far.
    pub max_policy_tokens: Option<u64>,
    /// Stop after this long, likewise.
    pub max_wall: Option<Duration>,
}

/// What a search spent.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Accounting {
    /// Positions the policy computed for this search (prompt, branches, recomputation).
    pub policy_tokens: u64,
    /// Positions model verifiers computed.
    pub verifier_tokens: u64,
    /// Engine steps the search took part in.
    pub forward_passes: u64,
    pub wall_ms: u64,
    /// Most KV bytes the search's sequences held at once.
    pub kv_peak_bytes: u64,
}

/// One candidate of a result.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Candidate {
    pub node: NodeId,
    pub text: String,
    pub score: Option<f64>,
    /// The verifier's behaviour group, numbered 0, 1, … by first appearance among the
    /// candidates; absent where the verifier does not group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<usize>,
    /// Sum of the log-probabilities of its generated tokens under the policy.
    pub logprob: f64,
    /// How many tokens the policy generated for it (along its path).
    pub tokens: usize,
    pub finish: String,
}

/// What a search produced.
#[derive(Debug)]
pub struct SearchResult {
    pub strategy: String,
    pub verifiers: Vec<String>,
    pub answer: Option<NodeId>,
    pub answer_text: String,
    /// Finished candidates, and leaves that stopped at their token limit, in creation order.
    pub candidates: Vec<Candidate>,
    pub accounting: Accounting,
    /// Set when the search was cut short (budget) and answered with the best so far.
    pub note: Option<String>,
    pub tree: SearchTree,
}

pub(crate) struct SearchState {
    pub tree: SearchTree,
    pub strategy: Box<dyn Strategy>,
    verifiers: Vec<Verifier>,
    pub question: String,
    sampling: SamplingParams,
    /// Node → sequence holding its path minus the last token (shared by siblings).
    pub anchors: Anchors,
    /// Nodes whose anchor is being computed.
    pub prefilling: HashSet<NodeId>,
    /// The strategy has started (its root was computed once).
    started: bool,
    /// Candidates for verifier models: `(lane, node, verifier, answer)`, taken by the
    /// scheduler after each reaction.
    pub model_scores: Vec<(usize, NodeId, usize, String)>,
    /// Actions waiting for a node's anchor.
    waiting: HashMap<NodeId, Vec<Action>>,
    pub events: VecDeque<Event>,
    /// Events delivered to the strategy, kept for progress reports (drained each tick).
    pub delivered: Vec<Event>,
    pending: VecDeque<Action>,
    /// Nodes pruned since the scheduler last looked (their running jobs must stop).
    pub killed: Vec<NodeId>,
    pub outcome: Option<(Option<NodeId>, Option<String>)>,
    note: Option<String>,
    pub acct: Accounting,
    t0: Instant,
    last_tick: u64,
    children_started: u64,
    max_policy_tokens: Option<u64>,
    max_wall: Option<Duration>,
}

impl SearchState {
    pub fn new(r: SearchRequest) -> Self {
        let mut tree = SearchTree::new(r.prompt);
        if let Some(n) = tree.node_mut(0) {
            n.text = r.question.clone();
        }
        SearchState {
            tree,
            strategy: r.strategy,
            verifiers: r.verifiers,
            question: r.question,
            sampling: r.sampling,
            anchors: Anchors::default(),
            prefilling: HashSet::new(),
            started: false,
            model_scores: Vec::new(),
            waiting: HashMap::new(),
            events: VecDeque::new(),
            delivered: Vec::new(),
            pending: VecDeque::new(),
            killed: Vec::new(),
            outcome: None,
            note: None,
            acct: Accounting::default(),
            t0: Instant::now(),
            last_tick: 0,
            children_started: 0,
            max_policy_tokens: r.max_policy_tokens,
            max_wall: r.max_wall,
        }
    }

    /// `node`'s path is in the cache: the first time the root's is, the strategy starts;
    /// otherwise the actions waiting for the node go ahead.
    pub fn anchored(&mut self, node: NodeId) {
        if !self.started {
            self.started = true;
            let first = self.strategy.start(&self.tree);
            self.pending.extend(first);
        } else if let Some(a) = self.waiting.remove(&node) {
            self.pending.extend(a);
        }
    }

    pub fn scored(&mut self, node: NodeId, verifier: usize, score: f64) {
        self.tree.set_score(node, score);
        self.events.push_back(Event::Scored {
            node,
            verifier,
            score,
        });
    }

    /// A generating child stopped; its sequence becomes its anchor if it stays open.
    pub fn child_stopped(&mut self, engine: &mut Engine, node: NodeId, seq: SeqId, r: StopReason) {
        let pruned = self
            .tree
            .node(node)
            .is_none_or(|n| matches!(n.status, NodeStatus::Pruned { .. }));
        if pruned || self.outcome.is_some() {
            engine.free_seq(seq);
            return;
        }
        self.tree.stop(node, r);
        if self.tree.node(node).is_some_and(|n| n.is_open()) {
            self.anchors.set(engine, node, seq);
        } else {
            engine.free_seq(seq);
        }
        let parent = self.tree.node(node).and_then(|n| n.parent).unwrap_or(0);
        self.events.push_back(Event::Expanded {
            node: parent,
            child: node,
        });
    }

    pub fn account(&mut self, computed: usize, verifier: bool, tick: u64) {
        if verifier {
            self.acct.verifier_tokens += computed as u64;
        } else {
            self.acct.policy_tokens += computed as u64;
        }
        if tick != self.last_tick {
            self.last_tick = tick;
            self.acct.forward_passes += 1;
        }
    }

    /// Why the search must stop now, if a budget is spent.
    pub fn budget_exceeded(&self) -> Option<String> {
        if self.outcome.is_some() {
            return None;
        }
        if let Some(m) = self
            .max_policy_tokens
            .filter(|&m| self.acct.policy_tokens >= m)
        {
            return Some(format!("policy token budget of {m} spent"));
        }
        if let Some(w) = self.max_wall.filter(|&w| self.t0.elapsed() >= w) {
            return Some(format!("time budget of {w:?} spent"));
        }
        None
    }

    /// Ends the search with the best candidate so far (finished first, by score then mean
    /// logprob; else the best open node).
    pub fn finish_best(&mut self, note: String) {
        let key = |id: NodeId| {
            let n = self.tree.node(id).expect("node");
            (
                n.is_finished(),
                n.score.unwrap_or(f64::NEG_INFINITY),
                n.mean_logprob(),
            )
        };
        let best = (1..self.tree.len()).max_by(|&a, &b| {
            key(a)
                .partial_cmp(&key(b))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        self.outcome = Some((best, None));
        self.note = Some(note);
    }

    /// Frees every anchor.
    pub fn free_all(&mut self, engine: &mut Engine) {
        self.anchors.free_all(engine);
    }

    /// Sequences the search holds beside its jobs'.
    pub fn result(&mut self, engine: &mut Engine) -> SearchResult {
        self.free_all(engine);
        self.acct.wall_ms = self.t0.elapsed().as_millis() as u64;
        let (answer, text) = self.outcome.clone().unwrap_or((None, None));
        let answer_text =
            text.unwrap_or_else(|| answer.map(|a| self.tree.path_text(a)).unwrap_or_default());
        // Candidates: finished nodes, and leaves that stopped at their token limit.
        let mut groups: Vec<u64> = vec![];
        let candidates = self
            .tree
            .nodes()
            .iter()
            .filter(|n| {
                n.is_finished()
                    || (n.is_open() && n.children.is_empty() && n.stop == Some(StopReason::Length))
            })
            .map(|n| n.id)
            .collect::<Vec<_>>()
            .into_iter()
            .map(|id| {
                let n = self.tree.node(id).expect("node");
                let group = n.group.map(|g| {
                    groups.iter().position(|&x| x == g).unwrap_or_else(|| {
                        groups.push(g);
                        groups.len() - 1
                    })
                });
                Candidate {
                    node: id,
                    text: self.tree.path_text(id),
                    score: n.score,
                    group,
                    logprob: self.tree.path_logprob(id),
                    tokens: self
                        .tree
                        .path(id)
                        .iter()
                        .filter_map(|&p| self.tree.node(p))
                        .map(|p| p.token_logprobs.len())
                        .sum(),
                    finish: n
                        .stop
                        .as_ref()
                        .map_or("".into(), |s| format!("{s:?}").to_lowercase()),
                }
            })
            .collect();
        SearchResult {
            strategy: self.strategy.name().to_string(),
            verifiers: self.verifiers.iter().map(Verifier::name).collect(),
            answer,
            answer_text,
            candidates,
            accounting: self.acct.clone(),
            note: self.note.take(),
            tree: std::mem::replace(&mut self.tree, SearchTree::new(vec![])),
        }
    }

    /// Delivers events and carries out actions until the strategy waits for the model.
    pub fn react(
        &mut self,
        engine: &mut Engine,
        tok: &Tokenizer,
        owner: RequestId,
        jobs: &mut Vec<Job>,
    ) -> Result<(), String> {
        while self.outcome.is_none() {
            if let Some(a) = self.pending.pop_front() {
                self.apply(a, engine, tok, owner, jobs)?;
            } else if let Some(e) = self.events.pop_front() {
                self.delivered.push(e.clone());
                let next = self.strategy.on_event(&self.tree, e);
                self.pending.extend(next);
            } else {
                break;
            }
        }
        Ok(())
    }

    fn apply(
        &mut self,
        a: Action,
        engine: &mut Engine,
        tok: &Tokenizer,
        owner: RequestId,
        jobs: &mut Vec<Job>,
    ) -> Result<(), String> {
        let node_of = |a: &Action| match a {
            Action::Expand { node, .. } | Action::ExpandTopK { node, .. } => Some(*node),
            _ => None,
        };
        if let Some(node) = node_of(&a) {
            if self.tree.node(node).is_none() {
                return Err(format!(
                    "strategy {} acted on unknown node {node}",
                    self.strategy.name()
                ));
            }
            if !self.anchors.contains(node) {
                // Compute (or re-attach from the prefix cache) the node's path first.
                if self.prefilling.insert(node) {
                    let path = self.tree.path_tokens(node);
                    jobs.push(Job::prefill(engine, owner, node, &path));
                }
                self.waiting.entry(node).or_default().push(a);
                return Ok(());
            }
        }
        match a {
            Action::Expand { node, k, until } => {
                let path = self.tree.path_tokens(node);
                let last = *path.last().ok_or("expansion of an empty prompt")?;
                // Only frontier nodes keep an anchor, so a long search does not pin a partial
                // page per node: the last child takes the node's (expanding the node again
                // rebuilds it, re-attaching its full pages from the prefix cache).
                for i in 0..k {
                    let child = self.tree.add_child(node, vec![], 0.0).expect("node exists");
                    self.tree.set_running(child);
                    let seq = match i + 1 == k {
                        true => self.anchors.claim(engine, node)?,
                        false => self.anchors.fork(engine, node)?,
                    };
                    let mut j = Job::new(
                        owner,
                        seq,
                        JobKind::Generate { node: Some(child) },
                        vec![last],
                    );
                    j.sampling = SamplingParams {
                        seed: self.sampling.seed.wrapping_add(self.children_started),
                        ..self.sampling.clone()
                    };
                    self.children_started += 1;
                    j.until = until.clone();
                    j.context = path.len();
                    jobs.push(j);
                }
                if k == 0 {
                    self.anchors.release(engine, node);
                }
            }
            Action::ExpandTopK { node, k } => {
                let last = *self
                    .tree
                    .path_tokens(node)
                    .last()
                    .ok_or("expansion of an empty prompt")?;
                let seq = self.anchors.claim(engine, node)?;
                jobs.push(Job::new(owner, seq, JobKind::TopK { node, k }, vec![last]));
            }
            Action::Extend { node, picks } => {
                let tree = &mut self.tree;
                let children = self.anchors.take_offer(engine, node, &picks, |t| {
                    let child = tree
                        .add_child(node, vec![], 0.0)
                        .expect("offering node exists");
                    tree.push_token(
                        child,
                        t.token,
                        &tok.decode(&[t.token], true),
                        t.logprob,
                        0.0,
                    );
                    let stop = if t.eos {
                        StopReason::Eos
                    } else {
                        StopReason::Length
                    };
                    tree.stop(child, stop);
                    (child, !t.eos)
                })?;
                self.events.push_back(Event::Extended { node, children });
            }
            Action::Score { node, verifier } => {
                if self.tree.node(node).is_none() {
                    return Err(format!("score of unknown node {node}"));
                }
                let answer = self.tree.path_text(node);
                match self.verifiers.get_mut(verifier) {
                    None => {
                        return Err(format!(
                            "strategy asked for verifier {verifier} but the search has {}",
                            self.verifiers.len()
                        ))
                    }
                    Some(Verifier::Text(v)) => {
                        let verdict = v.verdict(&self.question, &answer)?;
                        if let Some(n) = self.tree.node_mut(node) {
                            n.group = verdict.group;
                        }
                        self.scored(node, verifier, verdict.score);
                    }
                    Some(Verifier::Model { lane, .. }) => {
                        self.model_scores.push((*lane, node, verifier, answer));
                    }
                    Some(Verifier::Judge(j)) => {
                        let (prompt, yes, no) = judge_tokens(tok, j, &self.question, &answer)?;
                        if prompt.len() + 1 >= engine.model.cfg.max_context {
                            return Err("the judging prompt does not fit the context".into());
                        }
                        let seq = engine.new_seq();
                        jobs.push(Job::new(
                            owner,
                            seq,
                            JobKind::Judge {
                                node,
                                verifier,
                                yes,
                                no,
                            },
                            prompt,
                        ));
                    }
                }
            }
            Action::Prompt { text, k, until } => {
                let tokens = render(tok, &text)?;
                if tokens.len() + 1 >= engine.model.cfg.max_context {
                    return Err(format!(
                        "a strategy prompt of {} tokens does not fit the context",
                        tokens.len()
                    ));
                }
                let root = self.tree.add_root(tokens.clone(), text);
                self.prefilling.insert(root);
                jobs.push(Job::prefill(engine, owner, root, &tokens));
                self.waiting.entry(root).or_default().push(Action::Expand {
                    node: root,
                    k,
                    until,
                });
            }
            Action::Prune { node, reason } => {
                for n in self.tree.prune(node, &reason) {
                    self.anchors.release(engine, n);
                    self.killed.push(n);
                }
            }
            Action::Finish { answer, text } => self.outcome = Some((answer, text)),
        }
        Ok(())
    }
}

/// Tokenises `text` as a user turn through the chat template, or as plain text with BOS for
/// a model without one.
pub(crate) fn render(tok: &Tokenizer, text: &str) -> Result<Vec<u32>, String> {
    tok.encode_prompt(text, tok.chat_template().is_some())
        .map_err(|e| e.to_string())
}

/// The judging prompt for `answer` to `question`, and the first tokens of the judge's yes and
/// no replies (whose log-probabilities after the prompt give the score).
pub(crate) fn judge_tokens(
    tok: &Tokenizer,
    j: &Judge,
    question: &str,
    answer: &str,
) -> Result<(Vec<u32>, u32, u32), String> {
    let prompt = render(tok, &j.prompt(question, answer))?;
    let first = |t: &str| {
        tok.encode(t, false, false)
            .ok()
            .and_then(|v| v.first().copied())
            .ok_or_else(|| format!("the judge's reply '{t}' has no token"))
    };
    Ok((prompt, first(&j.yes)?, first(&j.no)?))
}
