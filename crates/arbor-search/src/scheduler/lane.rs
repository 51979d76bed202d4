//! Verifier models: each a second [`Engine`] (its own weights and KV pool) whose scoring
//! sequences the scheduler steps in the same tick as the policy.
//!
//! A lane scores one candidate with one sequence: the candidate rendered for the verifier
//! model, run to its last token, the output row read once. Sequences are packed first come,
//! first served under the step's token and sequence limits and the lane's free pages; one
//! that does not fit waits for the next tick (scoring sequences are short-lived, so no
//! preemption), and one larger than the whole pool fails with an error naming the cause.

use super::RequestId;
use crate::tree::NodeId;
use crate::verifier::Judge;
use arbor_kernels::kv::{BlockTable, SeqId};
use arbor_runtime::{
    ChatMessage, Engine, ForwardBatch, LogitsMode, RewardHead, SeqStep, Tokenizer,
};

/// How a verifier model turns a candidate into a score.
#[derive(Clone, Debug)]
pub enum Scoring {
    /// A trained reward model ([`RewardHead`]): an outcome model scores the whole candidate
    /// at its last token; a process model scores the candidate's last step, read at the last
    /// `separator` (appended when the candidate does not end with it). Score: p(good).
    Reward { head: RewardHead, separator: String },
    /// A causal LM as judge: p(yes) / (p(yes) + p(no)) after the judging prompt.
    Judge(Judge),
}

/// A verifier model and the scoring sequences it is running.
pub struct VerifierModel {
    /// Shown in results, e.g. `orm:path/to/model`.
    pub name: String,
    engine: Engine,
    tokenizer: Tokenizer,
    scoring: Scoring,
    jobs: Vec<LaneJob>,
    /// The pool's configured pages: what it can always get back, lent or not.
    base_pages: usize,
}

struct LaneJob {
    owner: RequestId,
    node: NodeId,
    verifier: usize,
    seq: SeqId,
    feed: Vec<u32>,
    /// Judge: the yes and no tokens.
    yes_no: Option<(u32, u32)>,
}

/// A candidate's tokens for the verifier model and, for a judge, its yes and no tokens.
type Rendered = (Vec<u32>, Option<(u32, u32)>);

/// A finished scoring sequence, or positions computed for a search.
pub(crate) struct LaneOutput {
    pub owner: RequestId,
    /// `(node, verifier, score)` once the sequence has run to its end.
    pub scored: Option<(NodeId, usize, Result<f64, String>)>,
    pub computed: usize,
}

impl VerifierModel {
    /// A lane for `engine` (with its tokenizer) scoring by `scoring`. For
    /// [`Scoring::Reward`] the engine's model must carry that reward head.
    pub fn new(name: String, engine: Engine, tokenizer: Tokenizer, scoring: Scoring) -> Self {
        let base_pages = engine.kv_stats().pages_total;
        VerifierModel {
            base_pages,
            name,
            engine,
            tokenizer,
            scoring,
            jobs: Vec::new(),
        }
    }

    /// The lane's engine (KV accounting, the model).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Scoring sequences queued or running.
    pub fn pending(&self) -> usize {
        self.jobs.len()
    }

    /// Bytes of one of the lane's KV pages.
    pub(crate) fn page_bytes(&self) -> usize {
        self.engine.kv_stats().page_bytes.max(1)
    }

    /// Pages the queued sequences need beyond the lane's free pages (0 when all fit).
    pub(crate) fn pages_short(&self) -> usize {
        let need: usize = (self.jobs.iter())
            .map(|j| self.engine.pages_needed(j.seq, j.feed.len()))
            .sum();
        need.saturating_sub(self.engine.cache().available_pages())
    }

    /// Resizes the lane's KV pool (see [`Engine::resize_kv`]); the prefix cache is dropped
    /// first when shrinking, so that its pages do not pin the top of the pool.
    pub(crate) fn resize_kv(&mut self, pages: usize) -> Result<usize, String> {
        if pages < self.engine.kv_stats().pages_total {
            self.engine.clear_prefix_cache();
        }
        self.engine
            .resize_kv(pages)
            .map_err(|e| format!("verifier {}: {e}", self.name))
    }

    /// Queues the scoring of `answer` to `question` for `node` of search `owner`.
    pub(crate) fn submit(
        &mut self,
        owner: RequestId,
        node: NodeId,
        verifier: usize,
        question: &str,
        answer: &str,
    ) -> Result<(), String> {
        let (feed, yes_no) = self.render(question, answer)?;
        let cfg = &self.engine.model.cfg;
        if feed.is_empty() || feed.len() >= cfg.max_context {
            return Err(format!(
                "verifier {}: a candidate of {} tokens does not fit its context of {}",
                self.name,
                feed.len(),
                cfg.max_context
            ));
        }
        let stats = self.engine.kv_stats();
        // Pages lent to the policy come back when the lane needs them.
        let total = stats.pages_total.max(self.base_pages);
        if BlockTable::pages_for(feed.len(), stats.page_size) > total {
            return Err(format!(
                "verifier {}: a candidate of {} tokens needs more KV pages than its pool holds \
                 ({total}): raise --verifier-kv-gb",
                self.name,
                feed.len()
            ));
        }
        let seq = self.engine.new_seq();
        self.jobs.push(LaneJob {
            owner,
            node,
            verifier,
            seq,
            feed,
            yes_no,
        });
        Ok(())
    }

    /// Drops every sequence of `owner`.
    pub(crate) fn cancel(&mut self, owner: RequestId) {
        for j in self.jobs.iter().filter(|j| j.owner == owner) {
            self.engine.free_seq(j.seq);
        }
        self.jobs.retain(|j| j.owner != owner);
    }

    /// The tokens to run and, for a judge, the yes/no tokens to compare.
    fn render(&self, question: &str, answer: &str) -> Result<Rendered, String> {
        let tok = &self.tokenizer;
        let err = |e: arbor_runtime::RuntimeError| format!("verifier {}: {e}", self.name);
        match &self.scoring {
            Scoring::Judge(j) => {
                let (prompt, yes, no) = super::search::judge_tokens(tok, j, question, answer)
                    .map_err(|e| format!("verifier {}: {e}", self.name))?;
                Ok((prompt, Some((yes, no))))
            }
            Scoring::Reward { head, separator } => {
                let process = head.kind == arbor_runtime::RewardKind::Process;
                let mut answer = answer.to_string();
                if process && !answer.ends_with(separator.as_str()) {
                    answer.push_str(separator);
                }
                let tokens = if tok.chat_template().is_some() {
                    let msgs = [
                        ChatMessage::new("user", question),
                        ChatMessage::new("assistant", answer.as_str()),
                    ];
                    let text = tok.apply_chat_template(&msgs, false).map_err(err)?;
                    tok.encode(&text, false, true).map_err(err)?
                } else {
                    tok.encode(
                        &format!("{question}\n{answer}"),
                        tok.add_bos_default(),
                        false,
                    )
                    .map_err(err)?
                };
                if !process {
                    return Ok((tokens, None));
                }
                // The last step's score is the row at its separator; later tokens (the chat
                // template's end of turn) cannot change it, so they are not run.
                let sep = tok.encode(separator, false, false).map_err(err)?;
                let end = arbor_runtime::reward::separator_positions(&tokens, &sep)
                    .last()
                    .map_or(tokens.len(), |&p| p + 1);
                Ok((tokens[..end].to_vec(), None))
            }
        }
    }

    /// Runs one step of the queued sequences under the limits; returns what finished and
    /// the positions computed for each search.
    pub(crate) fn step(&mut self, max_tokens: usize, max_seqs: usize) -> Vec<LaneOutput> {
        let mut picked: Vec<(usize, usize)> = Vec::new();
        let (mut tokens, mut pages) = (0, 0);
        for (i, j) in self.jobs.iter().enumerate() {
            if picked.len() >= max_seqs || tokens >= max_tokens {
                break;
            }
            let n = j.feed.len().min(max_tokens - tokens);
            let need = self.engine.pages_needed(j.seq, n);
            if pages + need > self.engine.cache().available_pages() {
                continue;
            }
            pages += need;
            tokens += n;
            picked.push((i, n));
        }
        if picked.is_empty() {
            return Vec::new();
        }
        let batch = ForwardBatch {
            seqs: picked
                .iter()
                .map(|&(i, n)| {
                    let j = &self.jobs[i];
                    let last = n == j.feed.len();
                    SeqStep {
                        seq: j.seq,
                        tokens: j.feed[..n].to_vec(),
                        logits: match (last, j.yes_no) {
                            (true, None) => LogitsMode::Last,
                            _ => LogitsMode::None,
                        },
                        score: match (last, j.yes_no) {
                            (true, Some((yes, no))) => vec![(n - 1, yes), (n - 1, no)],
                            _ => vec![],
                        },
                        ..Default::default()
                    }
                })
                .collect(),
        };
        let outputs = match self.engine.step(&batch) {
            Ok(o) => o,
            Err(e) => {
                // Every sequence of the step fails with the cause; the searches end with it.
                let why = format!("verifier {} step failed: {e}", self.name);
                return self.finish(&picked, |_, _| Err(why.clone()), &[], true);
            }
        };
        let computed: Vec<usize> = outputs.iter().map(|o| o.computed_tokens).collect();
        let name = self.name.clone();
        let head = match &self.scoring {
            Scoring::Reward { head, .. } => Some(head.clone()),
            Scoring::Judge(_) => None,
        };
        self.finish(
            &picked,
            |k, _| {
                let o = &outputs[k];
                match (&head, o.scores.as_slice()) {
                    (Some(h), _) => Ok(f64::from(h.prob(&o.logits))),
                    (None, [ly, ln]) => Ok(Judge::probability(f64::from(*ly), f64::from(*ln))),
                    (None, _) => Err(format!("verifier {name}: no yes/no log-probabilities")),
                }
            },
            &computed,
            false,
        )
    }

    /// Advances the picked jobs by their fed tokens; those fed in full are scored by `score`
    /// (the job's index in `picked` and the job) and removed. With `failed` (the step did not
    /// run) every picked job is scored by `score`, which reports the error, and removed.
    fn finish(
        &mut self,
        picked: &[(usize, usize)],
        score: impl Fn(usize, &LaneJob) -> Result<f64, String>,
        computed: &[usize],
        failed: bool,
    ) -> Vec<LaneOutput> {
        let mut out = Vec::new();
        let mut done = Vec::new();
        for (k, &(i, n)) in picked.iter().enumerate() {
            let j = &mut self.jobs[i];
            let last = failed || n == j.feed.len();
            j.feed.drain(..n);
            let scored = last.then(|| (j.node, j.verifier, score(k, j)));
            let errored = matches!(scored, Some((_, _, Err(_))));
            out.push(LaneOutput {
                owner: j.owner,
                scored,
                computed: computed.get(k).copied().unwrap_or(0),
            });
            if last || errored {
                done.push(i);
            }
        }
        done.sort_unstable();
        for i in done.into_iter().rev() {
            let j = self.jobs.remove(i);
            self.engine.free_seq(j.seq);
        }
        out
    }
}
