//! The engine: one model, its KV cache and its sequences. [`Engine::step`] runs one batch of
//! any mix of prompt chunks and decode tokens (no prefill/decode phases) and samples.

use crate::backend::Backend;
use crate::model::{BatchLayout, Model};
use crate::RuntimeError;
use arbor_kernels::kv::{BlockTable, KvCache, KvLayout, KvStats, KvUsage, SeqId};
use arbor_kernels::ops::cascade::CascadeMode;
use arbor_kernels::ops::{self, SampleOutput, SamplingParams};
use arbor_kernels::Device;
use rayon::prelude::*;
use std::collections::HashMap;

/// Engine settings.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Bytes of KV cache to allocate (pages of the model's `attention.kv_dtype` on the CPU,
    /// bf16 on a GPU).
    pub kv_cache_bytes: usize,
    /// Token positions per KV page (8, 16 or 32).
    pub page_size: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            kv_cache_bytes: 512 << 20,
            page_size: 16,
        }
    }
}

/// Which logits a sequence wants back from a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LogitsMode {
    #[default]
    None,
    /// The logits after the last new token.
    Last,
    /// The logits after every new token.
    All,
}

/// One sequence's part of a step.
#[derive(Clone, Debug, Default)]
pub struct SeqStep {
    pub seq: SeqId,
    /// New tokens to append (a prompt, a prompt chunk, or one decoded token).
    pub tokens: Vec<u32>,
    /// Sample a next token after the last new token.
    pub sample: Option<SamplingParams>,
    pub logits: LogitsMode,
    /// `(i, token)`: return log p(token | sequence up to and including new token i).
    pub score: Vec<(usize, u32)>,
    /// Return [`SeqOutput::hidden`]: the final-normed hidden state after the last new token
    /// (ST-BoN's summary of a sequence). Costs nothing unless set.
    pub hidden: bool,
    /// Sparse attention: each of the step's rows reads only its best `n` KV pages by their
    /// key summaries, plus the first page and the last two up to its own, in every layer but
    /// the first two (see [`arbor_kernels::ops::cascade`] and `model.attention.sparse`).
    /// `None` (default): every page.
    pub sparse_budget: Option<usize>,
}

/// Everything one step runs.
#[derive(Clone, Debug, Default)]
pub struct ForwardBatch {
    pub seqs: Vec<SeqStep>,
}

/// What a step returns for one sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct SeqOutput {
    pub seq: SeqId,
    pub sample: Option<SampleOutput>,
    /// Requested logits, `rows × vocab` (for a reward model: head outputs,
    /// `rows × num_labels`, see [`crate::reward`]).
    pub logits: Vec<f32>,
    /// Log-probabilities of the `score` requests, in order.
    pub scores: Vec<f32>,
    /// Positions the model computed for this sequence (new tokens, plus recomputation of a
    /// preempted history, minus reuse).
    pub computed_tokens: usize,
    /// Positions attached from the prefix cache instead of computed.
    pub reused_tokens: usize,
    /// With [`SeqStep::hidden`]: the final-normed hidden state (`hidden_size` values, the
    /// vector the output head reads) after the last new token; else empty.
    pub hidden: Vec<f32>,
}

/// One model with its KV cache.
///
/// Every sequence keeps its full token history here; the cache holds the K/V of a prefix of
/// it (all of it, unless the sequence was preempted). A step first recomputes whatever the
/// cache lacks, attaching cached pages of the prefix index instead wherever they hold the
/// same tokens, so preemption and prefix reuse are invisible to callers except in
/// [`Engine::computed_tokens`] and [`SeqOutput::reused_tokens`].
pub struct Engine {
    pub model: Model,
    /// Where the model runs (the CPU, or a GPU holding its own copy of the weights).
    backend: Backend,
    cache: KvCache,
    /// Every token of each live sequence (prompt and generated) in order.
    tokens: HashMap<SeqId, Vec<u32>>,
    next_seq: SeqId,
    computed_tokens: u64,
    reused_tokens: u64,
    /// Forks share pages and steps reuse the prefix index (see [`Engine::set_prefix_sharing`]).
    sharing: bool,
}

/// One sequence's part of a step, as planned: the tokens to run after its cached positions.
struct Planned {
    /// Cached positions before the step (to roll back to on failure).
    old_len: usize,
    /// Tokens the model runs (history the cache lacks, then the new tokens, minus reuse).
    run: Vec<u32>,
    /// Tokens taken from the prefix index.
    reused: usize,
    /// Rows of `run` whose logits are needed, ascending.
    rows: Vec<usize>,
    /// Offset of the step's first new token in `run` (may be negative after reuse, as `isize`).
    new_at: isize,
}

impl Engine {
    /// An engine for `model`, with a KV pool of `opts.kv_cache_bytes`. Set the model's
    /// precision before this: cached K/V is keyed by the model's fingerprint.
    pub fn new(model: Model, opts: &EngineOptions) -> Result<Self, RuntimeError> {
        Self::on_device(model, opts, Device::Cpu)
    }

    /// [`Engine::new`] on `device`: on a GPU the weights are uploaded (bf16) and the KV pool
    /// of `opts.kv_cache_bytes` is allocated in device memory. Errors name what is missing
    /// (driver, device, NVRTC, memory) and suggest `--device cpu`.
    pub fn on_device(
        model: Model,
        opts: &EngineOptions,
        device: Device,
    ) -> Result<Self, RuntimeError> {
        if ![8, 16, 32].contains(&opts.page_size) {
            return Err(RuntimeError::Request(format!(
                "page size {} must be 8, 16 or 32",
                opts.page_size
            )));
        }
        let mut model = model;
        if device == Device::Cpu && model.precision == crate::model::Precision::Fast {
            model.interleave_weights();
        }
        let c = &model.cfg;
        let layout = KvLayout {
            num_layers: c.num_layers,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            page_size: opts.page_size,
        };
        let (backend, cache) = Backend::open(device, &model, layout, opts.kv_cache_bytes)?;
        Ok(Engine {
            model,
            backend,
            cache,
            tokens: HashMap::new(),
            next_seq: 0,
            computed_tokens: 0,
            reused_tokens: 0,
            sharing: true,
        })
    }

    /// The device the model runs on.
    pub fn device(&self) -> Device {
        self.backend.device()
    }

    /// The device in words (`cpu, 2 threads`, `cuda:0 NVIDIA H100 80GB HBM3 (sm_90)`).
    pub fn describe_device(&self) -> String {
        self.backend.describe()
    }

    /// With `true` (default), sequences of a step that share KV pages (forks, beams) attend
    /// through cascade attention, which reads each shared page once for all of them; with
    /// `false` each sequence attends alone (a baseline). On the CPU the default cascade mode
    /// gives bitwise the same results (set `model.attention` for another); on a GPU the
    /// cascade kernel merges partials, equal up to rounding. Sparse steps (either backend) use
    /// cascade attention either way.
    pub fn set_tree_attention(&mut self, on: bool) {
        self.model.attention.tree = on.then_some(CascadeMode::Chain);
    }

    /// Starts an empty sequence.
    pub fn new_seq(&mut self) -> SeqId {
        let id = self.next_seq;
        self.next_seq += 1;
        self.cache.add_seq(id);
        self.tokens.insert(id, Vec::new());
        id
    }

    /// With `false`, the engine works as one without prefix sharing (a benchmark baseline):
    /// a fork gets `parent`'s tokens but no pages, so its next step computes and stores its
    /// own copy of the whole history; no step attaches pages of the prefix index, and freed
    /// pages are not kept for reuse. Default `true`.
    pub fn set_prefix_sharing(&mut self, on: bool) {
        self.sharing = on;
        self.cache.set_indexing(on);
        if !on {
            self.clear_prefix_cache();
        }
    }

    /// A new sequence sharing all of `parent`'s KV pages and tokens.
    pub fn fork_seq(&mut self, parent: SeqId) -> Result<SeqId, RuntimeError> {
        let toks = self
            .tokens
            .get(&parent)
            .cloned()
            .ok_or_else(|| unknown(parent))?;
        let id = self.next_seq;
        if self.sharing {
            self.cache.fork(parent, id)?;
        } else {
            self.cache.add_seq(id);
        }
        self.next_seq += 1;
        self.tokens.insert(id, toks);
        Ok(id)
    }

    /// Ends a sequence and releases its pages (its full pages stay cached for reuse).
    pub fn free_seq(&mut self, seq: SeqId) {
        self.cache.free_seq(seq);
        self.tokens.remove(&seq);
    }

    /// Drops the K/V pages of `seq` but keeps its tokens: its next step recomputes them (or
    /// reattaches whatever of them is still cached). Returns the pages this released (shared
    /// pages release nothing while another sequence holds them).
    pub fn preempt(&mut self, seq: SeqId) -> Result<usize, RuntimeError> {
        if !self.tokens.contains_key(&seq) {
            return Err(unknown(seq));
        }
        let freed = self.cache.usage(&[seq]).freeable_pages;
        self.cache.free_seq(seq);
        self.cache.add_seq(seq);
        Ok(freed)
    }

    /// Rolls `seq` back to its first `len` tokens (a rejected draft or branch suffix).
    pub fn truncate_seq(&mut self, seq: SeqId, len: usize) -> Result<(), RuntimeError> {
        let toks = self.tokens.get_mut(&seq).ok_or_else(|| unknown(seq))?;
        toks.truncate(len);
        self.cache.truncate(seq, len);
        Ok(())
    }

    /// Tokens of a live sequence.
    pub fn seq_tokens(&self, seq: SeqId) -> Option<&[u32]> {
        self.tokens.get(&seq).map(Vec::as_slice)
    }

    /// Live sequence ids.
    pub fn seqs(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.tokens.keys().copied()
    }

    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// Grows the KV cache to `pages` pages, or shrinks it towards `pages` over the free pages
    /// at its top (pages in use or kept for prefix reuse stay); returns the pages it now has.
    /// Used to move KV memory between the engines of one scheduler as their demand shifts.
    pub fn resize_kv(&mut self, pages: usize) -> Result<usize, RuntimeError> {
        self.backend.resize_kv(&mut self.cache, pages)
    }

    /// Decode steps replayed as CUDA graphs so far, and of those the tree-search steps that
    /// attend through a cascade plan (`None` on the CPU; see docs/GPU.md).
    pub fn graph_replays(&self) -> Option<(u64, u64)> {
        self.backend.graph_replays()
    }

    /// Page and token counts of the KV cache.
    pub fn kv_stats(&self) -> KvStats {
        self.cache.stats()
    }

    /// What `seqs` hold together, and what dropping them would free.
    pub fn kv_usage(&self, seqs: &[SeqId]) -> KvUsage {
        self.cache.usage(seqs)
    }

    /// Drops every cached (unheld) page: the next requests compute their prefixes afresh.
    pub fn clear_prefix_cache(&mut self) {
        self.cache.evict(usize::MAX);
    }

    /// Pages a step with `new_tokens` more tokens for `seq` would allocate at most (without
    /// prefix reuse, with recomputation of a preempted sequence).
    pub fn pages_needed(&self, seq: SeqId, new_tokens: usize) -> usize {
        let pending = self
            .tokens
            .get(&seq)
            .map_or(0, |t| t.len() - self.cache.len(seq));
        self.cache.pages_needed(seq, pending + new_tokens)
    }

    /// Token positions computed by the model since the engine started (prefix reuse lowers it).
    pub fn computed_tokens(&self) -> u64 {
        self.computed_tokens
    }

    /// Token positions taken from the prefix cache instead of computed, since the start.
    pub fn reused_tokens(&self) -> u64 {
        self.reused_tokens
    }

    /// Switches counting of tokens per expert on or off (MoE models; off by default).
    pub fn set_expert_stats(&self, on: bool) {
        self.backend.set_expert_stats(&self.model, on);
    }

    /// Tokens routed to each expert of each MoE layer since the last call (while counting
    /// is on), resetting the counts; `None` for a dense model. Call it after every step for
    /// per-step counts. On a GPU the counts are kept on the device and read back here (one
    /// small copy; `None` if the device cannot be read).
    pub fn take_expert_counts(&self) -> Option<crate::model::ExpertCounts> {
        self.backend.take_expert_counts(&self.model)
    }

    /// Routing replay for the next step (see [`Model::replay_routing`]): each MoE layer
    /// sends the rows the step computes to the given experts instead of its router's top k.
    /// Those rows are the step's new tokens in batch order, plus any history a preempted
    /// sequence recomputes, less any prefix taken from the cache (none when the first new
    /// token's logits are asked for). A failed step drops what was queued. CPU engines only
    /// (an error on a GPU, whose router kernels do not take a replay).
    pub fn replay_routing(&self, per_layer: Vec<Vec<u32>>) -> Result<(), RuntimeError> {
        if self.backend.device() != Device::Cpu {
            return Err(RuntimeError::Request(
                "routing replay runs on the CPU backend only; open the engine on the CPU".into(),
            ));
        }
        self.model.replay_routing(per_layer)
    }

    /// Runs one batch: appends each sequence's new tokens, then samples and returns what each
    /// asked for. On error nothing is appended.
    pub fn step(&mut self, batch: &ForwardBatch) -> Result<Vec<SeqOutput>, RuntimeError> {
        self.validate(batch)
            .inspect_err(|_| self.model.drop_routing_replay())?;
        let mut plans = Vec::with_capacity(batch.seqs.len());
        for s in &batch.seqs {
            plans.push(self.plan(s));
        }
        let result = self.run(batch, &plans);
        if result.is_err() {
            for (s, p) in batch.seqs.iter().zip(&plans) {
                self.cache.truncate(s.seq, p.old_len);
            }
            self.model.drop_routing_replay();
        }
        result
    }

    /// Checks a batch without changing anything.
    fn validate(&self, batch: &ForwardBatch) -> Result<(), RuntimeError> {
        let cfg = &self.model.cfg;
        let ps = self.cache.layout().page_size;
        let mut seen = std::collections::HashSet::with_capacity(batch.seqs.len());
        for s in &batch.seqs {
            let have = self.tokens.get(&s.seq).ok_or_else(|| unknown(s.seq))?.len();
            let new_len = have + s.tokens.len();
            if s.tokens.is_empty() {
                return Err(RuntimeError::Request(format!(
                    "sequence {} has no new tokens in this step",
                    s.seq
                )));
            }
            if new_len > cfg.max_context {
                return Err(RuntimeError::ContextOverflow {
                    tokens: new_len,
                    context: cfg.max_context,
                });
            }
            if let Some(&t) = s.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                return Err(RuntimeError::Request(format!(
                    "token id {t} is outside the vocabulary of {}",
                    cfg.vocab_size
                )));
            }
            if let Some(&(i, t)) = s
                .score
                .iter()
                .find(|(i, t)| *i >= s.tokens.len() || *t as usize >= cfg.out_dim())
            {
                return Err(RuntimeError::Request(format!(
                    "score request ({i}, {t}) is out of range"
                )));
            }
            if s.sample.is_some() && cfg.reward.is_some() {
                return Err(RuntimeError::Request(format!(
                    "sequence {}: a reward model scores sequences, it cannot sample tokens",
                    s.seq
                )));
            }
            if !seen.insert(s.seq) {
                return Err(RuntimeError::Request(format!(
                    "sequence {} appears twice in one step",
                    s.seq
                )));
            }
            if BlockTable::pages_for(new_len, ps) > self.cache.allocator().num_total() {
                return Err(RuntimeError::Request(format!(
                    "a sequence of {new_len} tokens needs more KV pages than the whole cache holds ({}): raise --kv-cache-gb",
                    self.cache.allocator().num_total()
                )));
            }
        }
        Ok(())
    }

    /// Decides what `s` runs: the history its cache lacks plus its new tokens, with the
    /// longest cached prefix of those attached from the prefix index (never past the first
    /// row whose logits are wanted).
    fn plan(&mut self, s: &SeqStep) -> Planned {
        let old_len = self.cache.len(s.seq);
        let hist = &self.tokens[&s.seq];
        let mut run: Vec<u32> = hist[old_len..].to_vec();
        let pending = run.len();
        run.extend_from_slice(&s.tokens);
        let mut rows: Vec<usize> = match s.logits {
            LogitsMode::All => (0..s.tokens.len()).collect(),
            LogitsMode::Last => vec![s.tokens.len() - 1],
            LogitsMode::None => vec![],
        };
        if s.sample.is_some() {
            rows.push(s.tokens.len() - 1);
        }
        rows.extend(s.score.iter().map(|(i, _)| *i));
        rows.sort_unstable();
        rows.dedup();
        // The last new token always runs: its K/V is what the next step attends to, and the
        // step must do some work for the sequence.
        let first_needed = rows.first().copied().unwrap_or(s.tokens.len() - 1);
        let reused = if self.sharing {
            self.cache.reuse_prefix(s.seq, &run, pending + first_needed)
        } else {
            0
        };
        run.drain(..reused);
        let new_at = pending as isize - reused as isize;
        Planned {
            old_len,
            run,
            reused,
            rows: rows
                .iter()
                .map(|&r| (new_at + r as isize) as usize)
                .collect(),
            new_at,
        }
    }

    /// Reserves pages, runs the model and builds the outputs.
    fn run(
        &mut self,
        batch: &ForwardBatch,
        plans: &[Planned],
    ) -> Result<Vec<SeqOutput>, RuntimeError> {
        let steps: Vec<(SeqId, usize)> = batch
            .seqs
            .iter()
            .zip(plans)
            .map(|(s, p)| (s.seq, p.run.len()))
            .collect();
        let needed = self.cache.pages_needed_batch(&steps);
        let available = self.cache.available_pages();
        if needed > available {
            return Err(arbor_kernels::KernelError::KvFull {
                needed,
                free: available,
                total: self.cache.allocator().num_total(),
            }
            .into());
        }
        let mut layout = BatchLayout::default();
        let mut all_tokens = Vec::new();
        let mut logit_rows = Vec::new();
        let mut hidden_rows = Vec::new();
        for (s, p) in batch.seqs.iter().zip(plans) {
            let pos0 = self.cache.len(s.seq);
            self.cache.reserve(s.seq, p.run.len())?;
            logit_rows.extend(p.rows.iter().map(|r| all_tokens.len() + r));
            if s.hidden {
                // The last new token always runs (see `plan`).
                hidden_rows.push(all_tokens.len() + p.run.len() - 1);
            }
            layout.push_sparse(s.seq, pos0, p.run.len(), s.sparse_budget);
            all_tokens.extend_from_slice(&p.run);
        }
        // On a GPU, a step that only samples keeps its logits on the device and samples
        // there; any other request reads them back and is served as on the CPU.
        let device_sampling = self.backend.samples_on_device()
            && batch
                .seqs
                .iter()
                .all(|s| s.logits == LogitsMode::None && s.score.is_empty());
        let (logits, hidden) = self.backend.forward(
            &self.model,
            &mut self.cache,
            &all_tokens,
            &layout,
            &logit_rows,
            &hidden_rows,
            !device_sampling,
        )?;
        self.computed_tokens += all_tokens.len() as u64;

        let vocab = self.model.cfg.out_dim();
        let h = self.model.cfg.hidden_size;
        // Bookkeeping first (it needs `&mut self`), then each sequence's sampling, scores and
        // logits in parallel: a sampled row costs ~0.1 ms over a 49K vocabulary, too much to
        // leave the pool idle for while one thread walks a wide batch.
        let mut bases = Vec::with_capacity(batch.seqs.len());
        let mut base = 0;
        for (s, p) in batch.seqs.iter().zip(plans) {
            self.cache.commit(s.seq, &p.run);
            self.reused_tokens += p.reused as u64;
            let hist = self.tokens.get_mut(&s.seq).expect("validated");
            hist.extend_from_slice(&s.tokens);
            bases.push(base);
            base += p.rows.len();
        }
        let tokens = &self.tokens;
        let mut outputs: Vec<SeqOutput> = batch
            .seqs
            .par_iter()
            .zip(plans)
            .zip(bases)
            .map(|((s, p), base)| {
                let hist = &tokens[&s.seq];
                // Logits after new token `i` of the step.
                let row_logits = |i: usize| {
                    let r = (p.new_at + i as isize) as usize;
                    let k = base + p.rows.binary_search(&r).expect("row was requested");
                    &logits[k * vocab..(k + 1) * vocab]
                };
                let sample = match device_sampling {
                    true => None, // filled in below
                    false => s.sample.as_ref().map(|sp| {
                        ops::sample(row_logits(s.tokens.len() - 1), sp, hist, hist.len() as u64)
                    }),
                };
                let scores = s
                    .score
                    .iter()
                    .map(|&(i, t)| {
                        let mut lp = vec![0.0; vocab];
                        ops::log_softmax(row_logits(i), &mut lp);
                        lp[t as usize]
                    })
                    .collect();
                let out_logits = match s.logits {
                    LogitsMode::None => vec![],
                    LogitsMode::Last => row_logits(s.tokens.len() - 1).to_vec(),
                    LogitsMode::All => (0..s.tokens.len())
                        .flat_map(|i| row_logits(i).to_vec())
                        .collect(),
                };
                SeqOutput {
                    seq: s.seq,
                    sample,
                    logits: out_logits,
                    scores,
                    computed_tokens: p.run.len(),
                    reused_tokens: p.reused,
                    hidden: Vec::new(),
                }
            })
            .collect();
        let mut hidden_rows = hidden.chunks_exact(h);
        for (o, s) in outputs.iter_mut().zip(&batch.seqs) {
            if s.hidden {
                o.hidden = hidden_rows.next().expect("one row per request").to_vec();
            }
        }
        if device_sampling {
            if let Err(e) = self.sample_on_device(batch, &mut outputs) {
                // Undo the step's tokens; `step` rolls the cache back.
                for s in &batch.seqs {
                    if let Some(hist) = self.tokens.get_mut(&s.seq) {
                        hist.truncate(hist.len() - s.tokens.len());
                    }
                }
                return Err(e);
            }
        }
        Ok(outputs)
    }

    /// Samples every sequence of `batch` that asked for it, on the device, from the step's
    /// logits (one row per sampling sequence, in batch order), with the same histories and
    /// random streams as the host sampler.
    fn sample_on_device(
        &self,
        batch: &ForwardBatch,
        outputs: &mut [SeqOutput],
    ) -> Result<(), RuntimeError> {
        let rows: Vec<_> = batch
            .seqs
            .iter()
            .filter_map(|s| {
                let hist = self.tokens.get(&s.seq)?;
                Some((s.sample.as_ref()?, hist.as_slice(), hist.len() as u64))
            })
            .collect();
        if rows.is_empty() {
            return Ok(());
        }
        let mut samples = self
            .backend
            .sample(self.model.cfg.out_dim(), &rows)?
            .into_iter();
        for (s, out) in batch.seqs.iter().zip(outputs) {
            if s.sample.is_some() {
                out.sample = samples.next();
            }
        }
        Ok(())
    }
}

fn unknown(seq: SeqId) -> RuntimeError {
    RuntimeError::Request(format!("unknown sequence {seq}"))
}
