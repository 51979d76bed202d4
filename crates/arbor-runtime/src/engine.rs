//! The engine: one model, its KV cache and its sequences. [`Engine::step`] runs one batch of
//! any mix of prompt chunks and decode tokens (no prefill/decode phases) and samples.

use crate::model::{BatchLayout, Model};
use crate::RuntimeError;
use arbor_kernels::kv::{BlockTable, KvCache, KvLayout, SeqId};
use arbor_kernels::ops::{self, SampleOutput, SamplingParams};
use std::collections::HashMap;

/// Engine settings.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Bytes of KV cache to allocate (f32 on the CPU).
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
    /// Requested logits, `rows × vocab`.
    pub logits: Vec<f32>,
    /// Log-probabilities of the `score` requests, in order.
    pub scores: Vec<f32>,
}

/// One model with its KV cache.
pub struct Engine {
    pub model: Model,
    cache: KvCache,
    /// Every token of each live sequence (prompt and generated) in order.
    tokens: HashMap<SeqId, Vec<u32>>,
    next_seq: SeqId,
    computed_tokens: u64,
}

impl Engine {
    pub fn new(model: Model, opts: &EngineOptions) -> Result<Self, RuntimeError> {
        if ![8, 16, 32].contains(&opts.page_size) {
            return Err(RuntimeError::Request(format!(
                "page size {} must be 8, 16 or 32",
                opts.page_size
            )));
        }
        let c = &model.cfg;
        let layout = KvLayout {
            num_layers: c.num_layers,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            page_size: opts.page_size,
        };
        let num_pages = opts.kv_cache_bytes / layout.bytes_per_page(4);
        if num_pages == 0 {
            return Err(RuntimeError::Request(format!(
                "a KV cache of {} bytes holds no page of {} bytes: raise --kv-cache-gb",
                opts.kv_cache_bytes,
                layout.bytes_per_page(4)
            )));
        }
        Ok(Engine {
            model,
            cache: KvCache::new(layout, num_pages),
            tokens: HashMap::new(),
            next_seq: 0,
            computed_tokens: 0,
        })
    }

    /// Starts an empty sequence.
    pub fn new_seq(&mut self) -> SeqId {
        let id = self.next_seq;
        self.next_seq += 1;
        self.cache.add_seq(id);
        self.tokens.insert(id, Vec::new());
        id
    }

    /// A new sequence sharing all of `parent`'s KV pages and tokens.
    pub fn fork_seq(&mut self, parent: SeqId) -> Result<SeqId, RuntimeError> {
        let toks = self
            .tokens
            .get(&parent)
            .cloned()
            .ok_or_else(|| unknown(parent))?;
        let id = self.next_seq;
        self.cache.fork(parent, id)?;
        self.next_seq += 1;
        self.tokens.insert(id, toks);
        Ok(id)
    }

    /// Ends a sequence and releases its pages.
    pub fn free_seq(&mut self, seq: SeqId) {
        self.cache.free_seq(seq);
        self.tokens.remove(&seq);
    }

    /// Tokens of a live sequence.
    pub fn seq_tokens(&self, seq: SeqId) -> Option<&[u32]> {
        self.tokens.get(&seq).map(Vec::as_slice)
    }

    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// Token positions computed by the model since the engine started (prefix reuse lowers it).
    pub fn computed_tokens(&self) -> u64 {
        self.computed_tokens
    }

    /// Runs one batch: appends each sequence's new tokens, then samples and returns what each
    /// asked for. On error nothing is appended.
    pub fn step(&mut self, batch: &ForwardBatch) -> Result<Vec<SeqOutput>, RuntimeError> {
        let cfg = &self.model.cfg;
        let ps = self.cache.layout().page_size;
        let mut pages_needed = 0;
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
                .find(|(i, t)| *i >= s.tokens.len() || *t as usize >= cfg.vocab_size)
            {
                return Err(RuntimeError::Request(format!(
                    "score request ({i}, {t}) is out of range"
                )));
            }
            if !seen.insert(s.seq) {
                return Err(RuntimeError::Request(format!(
                    "sequence {} appears twice in one step",
                    s.seq
                )));
            }
            pages_needed += self.cache.pages_needed(s.seq, new_len);
            if BlockTable::pages_for(new_len, ps) > self.cache.allocator().num_total() {
                return Err(RuntimeError::Request(format!(
                    "a sequence of {new_len} tokens needs more KV pages than the whole cache holds ({}): raise --kv-cache-gb",
                    self.cache.allocator().num_total()
                )));
            }
        }
        let free = self.cache.allocator().num_free();
        if pages_needed > free {
            return Err(arbor_kernels::KernelError::KvFull {
                needed: pages_needed,
                free,
                total: self.cache.allocator().num_total(),
            }
            .into());
        }

        // Lay out rows and the rows whose logits are needed.
        let mut layout = BatchLayout::default();
        let mut all_tokens = Vec::new();
        let mut logit_rows = Vec::new();
        // Per sequence: (index into logit_rows of its first requested row, rows requested).
        let mut wanted: Vec<Vec<usize>> = Vec::new();
        for s in &batch.seqs {
            let pos0 = self.tokens[&s.seq].len();
            self.cache.reserve(s.seq, pos0 + s.tokens.len())?;
            let start = all_tokens.len();
            layout.push(s.seq, pos0, s.tokens.len());
            all_tokens.extend_from_slice(&s.tokens);
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
            logit_rows.extend(rows.iter().map(|r| start + r));
            wanted.push(rows);
        }
        // Run inside the rayon pool: every op's parallel loop then starts from a worker
        // instead of paying a hand-off from this thread (~10 µs × ~150 calls per step).
        let (model, cache) = (&self.model, &mut self.cache);
        let logits = rayon::scope(|_| model.forward(cache, &all_tokens, &layout, &logit_rows))?;
        self.computed_tokens += all_tokens.len() as u64;

        let vocab = cfg.vocab_size;
        let mut outputs = Vec::with_capacity(batch.seqs.len());
        let mut base = 0;
        for (s, rows) in batch.seqs.iter().zip(&wanted) {
            let hist = self.tokens.get_mut(&s.seq).expect("checked above");
            hist.extend_from_slice(&s.tokens);
            let row_logits = |i: usize| {
                let k = base + rows.binary_search(&i).expect("row was requested");
                &logits[k * vocab..(k + 1) * vocab]
            };
            let sample = s
                .sample
                .as_ref()
                .map(|p| ops::sample(row_logits(s.tokens.len() - 1), p, hist, hist.len() as u64));
            let scores = s
                .score
                .iter()
                .map(|&(i, t)| {
                    let l = row_logits(i);
                    let mut lp = vec![0.0; vocab];
                    ops::log_softmax(l, &mut lp);
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
            outputs.push(SeqOutput {
                seq: s.seq,
                sample,
                logits: out_logits,
                scores,
            });
            base += rows.len();
        }
        Ok(outputs)
    }
}

fn unknown(seq: SeqId) -> RuntimeError {
    RuntimeError::Request(format!("unknown sequence {seq}"))
}
