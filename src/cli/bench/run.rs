//! Runs one cell of the grid through the scheduler, timing every tick and tracking the KV
//! cache's peak.

use super::grid::Cell;
use crate::cli::gpu::GpuMem;
use arbor_kernels::ops::SamplingParams;
use arbor_runtime::model::ExpertCounts;
use arbor_runtime::{Engine, TokenKind, Tokenizer};
use arbor_search::verifier::{Judge, Verifier};
use arbor_search::{strategies, Outcome, Scheduler, SchedulerOptions, SearchRequest};
use indicatif::ProgressBar;
use std::collections::HashSet;
use std::time::Instant;

/// What one cell measured.
#[derive(Clone, Debug, Default)]
pub struct CellResult {
    /// Output tokens: Σ over each search's candidates of the tokens they generated.
    pub generated_tokens: u64,
    /// Every token the policy sampled, pruned branches included.
    pub sampled_tokens: u64,
    /// Positions the engine computed (prompts, branches, judge prompts, recomputation).
    pub processed_tokens: u64,
    pub steps: u64,
    /// Sum of the tick times.
    pub wall_s: f64,
    /// Tick times in ms.
    pub step_ms: Vec<f64>,
    pub kv_peak_pages: usize,
    pub page_bytes: usize,
    /// Distinct token positions (distinct prefixes of the sequences' cached tokens, whatever
    /// pages hold them) when the page peak was reached.
    pub unique_tokens_at_peak: usize,
    pub gpu_mem_peak_bytes: Option<u64>,
    pub preemptions: u64,
    /// Steps replayed as CUDA graphs (`None` on the CPU).
    pub graph_replays: Option<u64>,
    /// Of those, tree-search steps (cascade attention over shared pages).
    pub tree_graph_replays: Option<u64>,
    /// Searches that ended with an error, and the first error.
    pub errors: Vec<String>,
    /// MoE models: tokens routed to each expert of each MoE layer over the cell (policy and
    /// judge passes alike).
    pub expert_counts: Option<ExpertCounts>,
    /// MoE models: max ÷ mean tokens per expert of each step and MoE layer, averaged over
    /// both: how unevenly one step's expert GEMMs are loaded (1 = even).
    pub expert_step_imbalance: Option<f64>,
}

impl CellResult {
    /// The `q` quantile (0..1) of the step times, nearest rank.
    pub fn step_quantile_ms(&self, q: f64) -> f64 {
        if self.step_ms.is_empty() {
            return 0.0;
        }
        let mut v = self.step_ms.clone();
        v.sort_by(f64::total_cmp);
        let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
        v[i]
    }

    pub fn kv_peak_bytes(&self) -> u64 {
        (self.kv_peak_pages * self.page_bytes) as u64
    }

    /// Peak KV bytes ÷ distinct positions then held.
    pub fn kv_bytes_per_unique_token(&self) -> f64 {
        self.kv_peak_bytes() as f64 / self.unique_tokens_at_peak.max(1) as f64
    }
}

/// Distinct prefixes among the cached tokens of every live sequence: the positions a tree
/// holds, counted once however many pages store them.
pub fn logical_unique_tokens(e: &Engine) -> usize {
    let mut seen = HashSet::new();
    for s in e.seqs() {
        let toks = e.seq_tokens(s).unwrap_or(&[]);
        let n = e.cache().len(s).min(toks.len());
        let mut h = 0xCBF2_9CE4_8422_2325u64;
        for &t in &toks[..n] {
            h = (h ^ u64::from(t))
                .wrapping_mul(0x0000_0100_0000_01B3)
                .rotate_left(29);
            seen.insert(h);
        }
    }
    seen.len()
}

/// A prompt of exactly `len` ordinary (non-special) token ids, drawn from `seed`.
pub fn random_prompt(tok: &Tokenizer, vocab: usize, len: usize, seed: u64) -> Vec<u32> {
    let vocab = vocab.min(tok.vocab_size()).max(1) as u64;
    let mut state = seed ^ 0x2545_F491_4F6C_DD1D;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let id = (state % vocab) as u32;
        if tok.token_kind(id) == Some(TokenKind::Normal) && !tok.is_eog(id) {
            out.push(id);
        }
    }
    out
}

/// Runs `searches` searches of `cell` at once on `engine`; gives the engine back.
pub fn run_cell(
    engine: Engine,
    tok: Tokenizer,
    cell: &Cell,
    searches: usize,
    seed: u64,
    gpu: &GpuMem,
    bar: &ProgressBar,
) -> anyhow::Result<(Engine, Tokenizer, CellResult)> {
    let mut engine = engine;
    engine.set_prefix_sharing(cell.sharing);
    engine.set_expert_stats(true);
    let _ = engine.take_expert_counts(); // start from zero
    let vocab = engine.model.cfg.vocab_size;
    let computed0 = engine.computed_tokens();
    let replays0 = engine.graph_replays();
    let page_bytes = engine.cache().pool.page_bytes();
    let params = cell.params()?;
    let mut prompts = Vec::with_capacity(searches);
    for i in 0..searches {
        // A fresh prompt per search and cell: nothing is reused from earlier cells.
        prompts.push(random_prompt(
            &tok,
            vocab,
            cell.prompt_len,
            seed.wrapping_add(i as u64),
        ));
    }
    let mut sched = Scheduler::new(engine, tok, SchedulerOptions::default());
    sched.set_ignore_eos(true);
    for (i, prompt) in prompts.into_iter().enumerate() {
        let verifiers = if cell.needs_verifier() {
            vec![Verifier::Judge(Judge::default())]
        } else {
            vec![]
        };
        sched.submit_search(SearchRequest {
            prompt,
            // A short stand-in question: the judge prompt does not grow with the prompt.
            question: "a benchmark prompt".into(),
            strategy: strategies::build(&cell.strategy, &params).map_err(anyhow::Error::msg)?,
            verifiers,
            sampling: SamplingParams {
                temperature: 1.0,
                seed: seed.wrapping_add(1000 + i as u64),
                ..Default::default()
            },
            max_policy_tokens: None,
            max_wall: None,
        });
    }
    let mut r = CellResult {
        page_bytes,
        ..Default::default()
    };
    let mut finished = Vec::new();
    // (sum, count) of per-step expert imbalance ratios.
    let mut step_imbalance = (0.0f64, 0u64);
    while sched.active() > 0 {
        let t0 = Instant::now();
        let n = sched.tick();
        let dt = t0.elapsed().as_secs_f64();
        r.wall_s += dt;
        if n > 0 {
            r.steps += 1;
            r.step_ms.push(dt * 1e3);
        }
        if let Some(c) = sched.engine().take_expert_counts() {
            let load = c.load();
            if load.assignments > 0 {
                step_imbalance.0 += load.imbalance;
                step_imbalance.1 += 1;
            }
            r.expert_counts.get_or_insert_with(Default::default).add(&c);
        }
        let in_use = sched.engine().cache().allocator().num_in_use();
        if in_use > r.kv_peak_pages {
            r.kv_peak_pages = in_use;
            r.unique_tokens_at_peak = logical_unique_tokens(sched.engine());
        }
        if let Some(b) = gpu.used_bytes() {
            r.gpu_mem_peak_bytes = Some(r.gpu_mem_peak_bytes.unwrap_or(0).max(b));
        }
        finished.extend(sched.take_finished());
        bar.tick();
    }
    finished.extend(sched.take_finished());
    let replays = sched.engine().graph_replays();
    let (all0, tree0) = replays0.unwrap_or_default();
    r.graph_replays = replays.map(|(all, _)| all - all0);
    r.tree_graph_replays = replays.map(|(_, tree)| tree - tree0);
    for (_, outcome) in finished {
        match outcome {
            Outcome::Search(Ok(res)) => {
                let tree = &res.tree;
                for c in &res.candidates {
                    let len = tree.path_tokens(c.node).len();
                    r.generated_tokens += len.saturating_sub(cell.prompt_len) as u64;
                }
                r.sampled_tokens += tree
                    .nodes()
                    .iter()
                    .filter(|n| n.parent.is_some())
                    .map(|n| n.tokens.len() as u64)
                    .sum::<u64>();
            }
            Outcome::Search(Err(e)) => r.errors.push(e),
            Outcome::Generate(_) => {}
        }
    }
    r.preemptions = sched.preemptions();
    if r.expert_counts.is_some() {
        r.expert_step_imbalance = Some(step_imbalance.0 / step_imbalance.1.max(1) as f64);
    }
    let (mut engine, tok) = sched.into_parts();
    engine.set_expert_stats(false);
    r.processed_tokens = engine.computed_tokens() - computed0;
    engine.set_prefix_sharing(true);
    Ok((engine, tok, r))
}
