//! The engine's one scheduler: plain generation requests and searches share every step.
//!
//! Each [`Scheduler::tick`] (1) lets searches react to what happened (their strategies'
//! actions become jobs), (2) packs every runnable job of every request and search into one
//! [`ForwardBatch`] under a token budget, a sequence limit and the KV pages that can be had,
//! oldest work first — preempting idle or waiting sequences, those whose dropping frees the
//! most pages, when pages run short — (3) steps the engine once and (4) hands each job its
//! output. A search's node keeps an *anchor* sequence holding its path minus the last token,
//! so children fork it and share its pages; the last token is fed by each child with its own
//! sampling. Siblings may share one anchor until they expand (a token-level beam's top-k
//! children), and the last holder takes the sequence over instead of forking it (`anchors.rs`).
//!
//! Nothing is lost: a request or search ends with a result or an error naming the cause
//! (cancelled, cannot fit in the KV cache, model error).
//!
//! Files: `pack.rs` (choosing a step's jobs, preemption), `anchors.rs` (nodes' anchor
//! sequences), `outputs.rs` (handing out a step's
//! outputs, reaping, searches reacting), `search.rs` (one search's state), `lane.rs`
//! (verifier models), `memory.rs` (KV pages moving between the policy and verifier models),
//! `group.rs` (n choices of one prompt), `progress.rs` (streaming), `job.rs` (one running
//! sequence).

mod anchors;
mod group;
mod job;
mod lane;
mod memory;
mod outputs;
mod pack;
mod progress;
mod search;

pub use lane::{Scoring, VerifierModel};
pub use progress::{Progress, SearchProgress, TokenProgress};
pub use search::{Accounting, Candidate, SearchRequest, SearchResult};

use crate::tree::StopReason;
use arbor_kernels::kv::{BlockTable, SeqId};
use arbor_kernels::ops::SamplingParams;
use arbor_runtime::{Engine, ForwardBatch, Tokenizer};
use job::{Job, JobKind};
use search::SearchState;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

/// Identifies a request or a search.
pub type RequestId = u64;

/// Limits of one step.
#[derive(Clone, Debug)]
pub struct SchedulerOptions {
    /// Most token positions one step computes (prompt chunks count in full).
    pub max_batch_tokens: usize,
    /// Most sequences in one step.
    pub max_seqs: usize,
}

impl Default for SchedulerOptions {
    fn default() -> Self {
        SchedulerOptions {
            max_batch_tokens: 2048,
            max_seqs: 256,
        }
    }
}

/// A plain generation request.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    /// Most tokens to generate (0: up to the context).
    pub max_tokens: usize,
    /// Texts that end the generation.
    pub stop: Vec<String>,
}

/// What a plain request produced.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateResult {
    pub tokens: Vec<u32>,
    pub text: String,
    pub stop: StopReason,
    pub prompt_tokens: usize,
}

/// How a request ended.
#[derive(Debug)]
pub enum Outcome {
    Generate(Result<GenerateResult, String>),
    Search(Result<Box<SearchResult>, String>),
}

/// One entry of a step's batch, for inspection (tests, metrics).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchEntry {
    pub owner: RequestId,
    pub seq: SeqId,
    pub tokens: usize,
}

enum Req {
    Generate {
        prompt_tokens: usize,
    },
    Search(Box<SearchState>),
    /// Members of a grouped request waiting for their shared prompt (see `group.rs`).
    Group(Vec<Job>),
}

/// The scheduler of one policy engine.
pub struct Scheduler {
    engine: Engine,
    tokenizer: Tokenizer,
    opts: SchedulerOptions,
    next_id: RequestId,
    reqs: BTreeMap<RequestId, Req>,
    jobs: Vec<Job>,
    done: Vec<(RequestId, Outcome)>,
    last_batch: Vec<BatchEntry>,
    ticks: u64,
    preemptions: u64,
    /// Searches waiting for room, with the pages they need.
    admit_queue: VecDeque<(RequestId, usize)>,
    /// Verifier models, stepped in every tick beside the policy.
    lanes: Vec<VerifierModel>,
    /// Sampled EOS tokens do not end a generation (see [`Scheduler::set_ignore_eos`]).
    ignore_eos: bool,
    progress: progress::ProgressLog,
    /// Sparse attention budgets (pages per row) of requests and searches that asked for one.
    sparse: HashMap<RequestId, usize>,
    /// Per lane: its configured pages and what moved between it and the policy (`memory.rs`).
    loans: Vec<memory::Loan>,
    /// The policy's configured pages.
    kv_policy_base: usize,
    kv_moves: u64,
}

impl Scheduler {
    pub fn new(engine: Engine, tokenizer: Tokenizer, opts: SchedulerOptions) -> Self {
        let kv_policy_base = engine.kv_stats().pages_total;
        Scheduler {
            engine,
            tokenizer,
            opts,
            next_id: 1,
            reqs: BTreeMap::new(),
            jobs: Vec::new(),
            done: Vec::new(),
            last_batch: Vec::new(),
            ticks: 0,
            preemptions: 0,
            admit_queue: VecDeque::new(),
            lanes: Vec::new(),
            ignore_eos: false,
            progress: Default::default(),
            sparse: HashMap::new(),
            loans: Vec::new(),
            kv_policy_base,
            kv_moves: 0,
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
    /// The batch of the last step.
    pub fn last_batch(&self) -> &[BatchEntry] {
        &self.last_batch
    }
    /// Steps run so far.
    pub fn ticks(&self) -> u64 {
        self.ticks
    }
    /// Sequences preempted (pages dropped, to be recomputed) so far.
    pub fn preemptions(&self) -> u64 {
        self.preemptions
    }
    /// Requests and searches not yet ended.
    pub fn active(&self) -> usize {
        self.reqs.len()
    }

    /// With `true`, a sampled or top-k EOS token is kept as an ordinary token, so every
    /// generation runs to its token limit (benchmarks of fixed lengths). Default `false`.
    pub fn set_ignore_eos(&mut self, on: bool) {
        self.ignore_eos = on;
    }

    /// Ends the scheduler and gives back its engine and tokenizer (call when nothing is
    /// active: whatever still runs is dropped with its sequences still held).
    pub fn into_parts(self) -> (Engine, Tokenizer) {
        (self.engine, self.tokenizer)
    }

    /// Adds a verifier model (its own engine and KV pool); searches name it as
    /// `Verifier::Model { lane, .. }` with the returned lane.
    pub fn add_verifier_model(&mut self, model: VerifierModel) -> usize {
        self.loans.push(memory::Loan {
            base: model.engine().kv_stats().pages_total,
            ..Default::default()
        });
        self.lanes.push(model);
        self.lanes.len() - 1
    }

    /// The verifier models, by lane.
    pub fn verifier_models(&self) -> &[VerifierModel] {
        &self.lanes
    }

    /// Tokenises `text` as a user turn through the chat template (or plain, with BOS, for a
    /// model without one).
    pub fn render_prompt(&self, text: &str) -> Result<Vec<u32>, String> {
        search::render(&self.tokenizer, text)
    }

    /// Queues a plain request.
    pub fn submit_generate(&mut self, r: GenerateRequest) -> RequestId {
        let id = self.fresh_id();
        if let Err(e) = self.check_prompt(&r.prompt) {
            self.done.push((id, Outcome::Generate(Err(e))));
            return id;
        }
        let seq = self.engine.new_seq();
        let mut job = Job::new(id, seq, JobKind::Generate { node: None }, r.prompt.clone());
        job.sampling = r.sampling;
        job.context = r.prompt.len();
        job.until = crate::Until {
            max_tokens: r.max_tokens,
            stop: r.stop,
            delimiters: vec![],
        };
        self.jobs.push(job);
        self.reqs.insert(
            id,
            Req::Generate {
                prompt_tokens: r.prompt.len(),
            },
        );
        id
    }

    /// Queues a search; its strategy starts once the prompt is in the KV cache.
    pub fn submit_search(&mut self, r: SearchRequest) -> RequestId {
        let id = self.fresh_id();
        if let Err(e) = self.check_prompt(&r.prompt) {
            self.done.push((id, Outcome::Search(Err(e))));
            return id;
        }
        let need = self.admission_pages(r.prompt.len(), r.strategy.width());
        let total = self.engine.cache().allocator().num_total();
        if need > total {
            self.done.push((
                id,
                Outcome::Search(Err(format!(
                    "a search of width {} on a {}-token prompt needs {need} KV pages, the cache holds {total}: raise --kv-cache-gb or lower the width",
                    r.strategy.width(),
                    r.prompt.len()
                ))),
            ));
            return id;
        }
        self.reqs
            .insert(id, Req::Search(Box::new(SearchState::new(r))));
        self.admit_queue.push_back((id, need));
        id
    }

    /// Pages a search must be able to get before it starts: its prompt plus one page per
    /// branch (each branch's first own page).
    fn admission_pages(&self, prompt: usize, width: usize) -> usize {
        let ps = self.engine.cache().layout().page_size;
        BlockTable::pages_for(prompt + 1, ps) + width.max(1)
    }

    /// Starts queued searches, oldest first, while the pages they need (beside those
    /// reserved for searches started this tick) can be had.
    fn admit(&mut self) {
        let mut reserved = 0;
        while let Some(&(id, need)) = self.admit_queue.front() {
            let idle = self.jobs.is_empty();
            if !idle && reserved + need > self.engine.cache().available_pages() {
                break;
            }
            self.admit_queue.pop_front();
            reserved += need;
            let Some(Req::Search(state)) = self.reqs.get_mut(&id) else {
                continue; // cancelled while queued
            };
            state.prefilling.insert(0);
            let prompt = &state.tree.node(0).expect("root").tokens;
            self.jobs
                .push(Job::prefill(&mut self.engine, id, 0, prompt));
        }
    }

    /// Sparse attention for the request or search `id` (as a submit returned it): every row
    /// its sequences run on the policy engine reads at most `budget` KV pages picked by their
    /// key summaries, beside its sink and local pages (see `SeqStep::sparse_budget`); `None`
    /// reads every page (the default). Both backends run it. An id that has already ended is
    /// left alone.
    pub fn set_sparse_budget(&mut self, id: RequestId, budget: Option<usize>) {
        match budget {
            Some(b) if self.reqs.contains_key(&id) => {
                self.sparse.insert(id, b);
            }
            _ => {
                self.sparse.remove(&id);
            }
        }
    }

    /// The sparse budget of the jobs `owner` runs: its own, or for a group's shared prompt
    /// that of its members (one request's choices, so they agree).
    pub(super) fn sparse_budget_of(&self, owner: RequestId) -> Option<usize> {
        if let Some(&b) = self.sparse.get(&owner) {
            return Some(b);
        }
        match self.reqs.get(&owner) {
            Some(Req::Group(members)) => members
                .iter()
                .find_map(|m| self.sparse.get(&m.owner).copied()),
            _ => None,
        }
    }

    /// Ends a request or search now, freeing all it holds; it reports "cancelled".
    pub fn cancel(&mut self, id: RequestId) {
        self.fail(id, "cancelled".into());
    }

    /// Takes the outcomes of ended requests.
    pub fn take_finished(&mut self) -> Vec<(RequestId, Outcome)> {
        for (id, _) in &self.done {
            self.sparse.remove(id);
        }
        std::mem::take(&mut self.done)
    }

    /// Runs ticks until nothing is active; returns every outcome.
    pub fn run_to_completion(&mut self) -> Vec<(RequestId, Outcome)> {
        while self.active() > 0 {
            self.tick();
        }
        self.take_finished()
    }

    fn fresh_id(&mut self) -> RequestId {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn check_prompt(&self, prompt: &[u32]) -> Result<(), String> {
        let cfg = &self.engine.model.cfg;
        if prompt.is_empty() {
            return Err("the prompt is empty".into());
        }
        if let Some(t) = prompt.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(format!(
                "token id {t} is outside the vocabulary of {}",
                cfg.vocab_size
            ));
        }
        if prompt.len() >= cfg.max_context {
            return Err(format!(
                "the prompt of {} tokens leaves no room in the context of {}",
                prompt.len(),
                cfg.max_context
            ));
        }
        let ps = self.engine.cache().layout().page_size;
        let total = self.engine.cache().allocator().num_total();
        if BlockTable::pages_for(prompt.len() + 1, ps) > total {
            return Err(format!(
                "the prompt of {} tokens needs more KV pages than the cache holds ({total}): raise --kv-cache-gb",
                prompt.len()
            ));
        }
        Ok(())
    }

    /// Ends `id` with an error, freeing its sequences.
    fn fail(&mut self, id: RequestId, why: String) {
        let Some(req) = self.reqs.remove(&id) else {
            return;
        };
        self.admit_queue.retain(|(q, _)| *q != id);
        for lane in &mut self.lanes {
            lane.cancel(id);
        }
        for j in self.jobs.iter().filter(|j| j.owner == id) {
            self.engine.free_seq(j.seq);
        }
        self.jobs.retain(|j| j.owner != id);
        let outcome = match req {
            Req::Generate { .. } => Outcome::Generate(Err(why)),
            Req::Search(mut s) => {
                s.free_all(&mut self.engine);
                Outcome::Search(Err(why))
            }
            Req::Group(members) => return self.fail_group(members, &why),
        };
        self.done.push((id, outcome));
    }

    /// One scheduling step: searches react, a batch is packed and run, outputs are handed
    /// out; then KV pages move to verifier models that wait for them, or back from idle ones
    /// (`memory.rs`). Returns the number of sequences stepped.
    pub fn tick(&mut self) -> usize {
        let stepped = self.step_once();
        self.rebalance_kv();
        stepped
    }

    fn step_once(&mut self) -> usize {
        self.admit();
        let verified = self.step_lanes();
        self.react();
        let picked = self.pack();
        self.last_batch.clear();
        if picked.is_empty() {
            if let Some(j) = self.jobs.first() {
                // Work exists but none fits even after preemption: the oldest cannot run.
                let owner = j.owner;
                self.fail(
                    owner,
                    "the KV cache cannot hold this request beside nothing else: raise --kv-cache-gb or shorten it"
                        .into(),
                );
            }
            return verified;
        }
        let batch = ForwardBatch {
            seqs: picked.iter().map(|(i, s)| self.step_for(*i, s)).collect(),
        };
        self.ticks += 1;
        match self.engine.step(&batch) {
            Ok(outputs) => {
                for ((i, n), out) in picked.iter().zip(outputs) {
                    self.last_batch.push(BatchEntry {
                        owner: self.jobs[*i].owner,
                        seq: out.seq,
                        tokens: *n,
                    });
                    self.absorb(*i, *n, out);
                }
            }
            Err(e) => {
                let owners: HashSet<RequestId> =
                    picked.iter().map(|(i, _)| self.jobs[*i].owner).collect();
                for o in owners {
                    self.fail(o, format!("model step failed: {e}"));
                }
                return verified;
            }
        }
        self.reap();
        self.measure_kv();
        picked.len() + verified
    }

    /// Steps every verifier model once and hands the scores to their searches; returns the
    /// sequences stepped.
    fn step_lanes(&mut self) -> usize {
        let mut stepped = 0;
        for l in 0..self.lanes.len() {
            let outs = self.lanes[l].step(self.opts.max_batch_tokens, self.opts.max_seqs);
            stepped += outs.len();
            for o in outs {
                let Some(Req::Search(s)) = self.reqs.get_mut(&o.owner) else {
                    continue;
                };
                s.account(o.computed, true, self.ticks);
                match o.scored {
                    Some((node, verifier, Ok(score))) => s.scored(node, verifier, score),
                    Some((_, _, Err(e))) => self.fail(o.owner, e),
                    None => {}
                }
            }
        }
        stepped
    }

    /// Queues the candidates a search sent to verifier models.
    fn send_to_lanes(&mut self, id: RequestId) -> Result<(), String> {
        let Some(Req::Search(s)) = self.reqs.get_mut(&id) else {
            return Ok(());
        };
        for (lane, node, verifier, answer) in std::mem::take(&mut s.model_scores) {
            let Some(model) = self.lanes.get_mut(lane) else {
                return Err(format!(
                    "verifier model {lane} is not loaded (the scheduler has {})",
                    self.lanes.len()
                ));
            };
            model.submit(id, node, verifier, &s.question, &answer)?;
        }
        Ok(())
    }

    /// Updates each search's peak of KV bytes held.
    fn measure_kv(&mut self) {
        let page_bytes = self.engine.cache().pool.page_bytes() as u64;
        let mut seqs: BTreeMap<RequestId, Vec<SeqId>> = BTreeMap::new();
        for j in &self.jobs {
            seqs.entry(j.owner).or_default().push(j.seq);
        }
        for (id, r) in &mut self.reqs {
            if let Req::Search(s) = r {
                let mut v = seqs.remove(id).unwrap_or_default();
                v.extend(s.anchors.seqs());
                let bytes = self.engine.kv_usage(&v).pages as u64 * page_bytes;
                s.acct.kv_peak_bytes = s.acct.kv_peak_bytes.max(bytes);
            }
        }
    }
}
