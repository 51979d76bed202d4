//! CUDA graphs for decode steps: a step in which every sequence decodes one token is padded to
//! a batch-size bucket (`ROW_BUCKETS` in the workspace) and its whole launch sequence, from the embedding to
//! the output head's GEMM, is captured once per (bucket, attention, workspace generation) and
//! replayed, so that small batches are not bound by the ~9 launches per layer a step makes.
//! Tree-search steps, whose sequences share pages and attend through a cascade plan, are
//! captured per (bucket, plan epoch): the plan's arrays keep their addresses while its buffer
//! is reused ([`GpuCascadePlan::epoch`]), and its counts are read from device memory. Sparse
//! rows add the plan's page selection, reused and keyed the same way ([`GpuSparsePlan::epoch`]).
//!
//! What makes a replay right: every buffer the step touches is a workspace buffer (`super::workspace`) or a
//! weight, fixed until the workspace's generation changes (then the graphs are dropped; so do
//! the MoE scratch's, for mixture-of-experts models, whose padding rows the router sends to no
//! expert, reading the real row count from the metadata); the
//! step's metadata is uploaded into the same packed buffer before each replay (outside the
//! graph), at offsets that depend on the bucket alone ([`super::meta::StepMeta::pack`]); and
//! every launch argument is the same for any step of a bucket: rows and sequences are the
//! bucket, the page-index array is the rest of the metadata buffer, and decode attention gets
//! the most warps (its result does not depend on them). Padding rows store no K/V and attend
//! nothing. Copy-on-write page copies run before the graph. Capture needs no allocation, copy
//! or synchronisation inside: the first step of a key runs eagerly (loading kernels, making
//! cuBLASLt plans, allocating cascade partials), the second is captured.
//!
//! [`GpuCascadePlan::epoch`]: arbor_kernels::cuda::ops::cascade::GpuCascadePlan::epoch
//! [`GpuSparsePlan::epoch`]: arbor_kernels::cuda::ops::sparse::GpuSparsePlan::epoch

use super::attend::StepAttention;
use super::forward::{self, HeadRows};
use super::meta::{PackedLayout, StepMeta};
use super::workspace::ROW_BUCKETS;
use super::CudaModel;
use crate::config::ModelConfig;
use crate::RuntimeError;
use arbor_kernels::cuda::cudarc::driver::CudaGraph;
use arbor_kernels::cuda::Gpu;
use std::collections::{HashMap, HashSet};

/// The largest batch a graph is captured for; larger decode steps run eagerly.
pub const MAX_GRAPH_BATCH: usize = ROW_BUCKETS[ROW_BUCKETS.len() - 1];

/// How decode steps run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GraphMode {
    /// Every step eagerly, unpadded (`ARBOR_CUDA_GRAPHS=0`).
    Off,
    /// Decode steps padded to their bucket and run eagerly: the launches a graph would
    /// replay, without capturing them (to check replays against, bit for bit).
    Padded,
    /// Decode steps padded, captured once per bucket and replayed (the default).
    Replay,
}

impl GraphMode {
    /// The mode `ARBOR_CUDA_GRAPHS` asks for: `0`, `off` or `false` turn graphs off; unset or
    /// anything else leaves them on.
    pub fn from_env() -> GraphMode {
        match std::env::var("ARBOR_CUDA_GRAPHS") {
            Ok(v) if ["0", "off", "false"].contains(&v.trim().to_ascii_lowercase().as_str()) => {
                GraphMode::Off
            }
            _ => GraphMode::Replay,
        }
    }
}

/// Counters of graph use since the model was made.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GraphStats {
    /// Graphs captured (one per bucket and workspace generation).
    pub captures: u64,
    /// Decode steps run by launching a graph (including the launch right after a capture).
    pub replays: u64,
    /// Of those, steps that attend through a cascade plan (tree search with shared pages).
    pub tree_replays: u64,
    /// Of those, steps with sparse rows (a page selection per layer).
    pub sparse_replays: u64,
    /// Decode steps padded to a bucket and run eagerly (first steps of a bucket, `Padded`
    /// mode, failed captures).
    pub eager_padded: u64,
    /// Captures that failed (that bucket then runs eagerly); the last error is kept.
    pub failures: u64,
    /// Why the last capture failed.
    pub last_failure: Option<String>,
}

impl GraphStats {
    fn count_replay(&mut self, key: Key) {
        self.replays += 1;
        self.tree_replays += u64::from(key.1.is_some());
        self.sparse_replays += u64::from(key.1.is_some_and(|(_, sparse)| sparse != 0));
    }
}

/// A captured graph. cudarc's `CudaGraph` is neither `Send` nor `Sync` (graph objects are not
/// internally synchronised).
struct Captured(CudaGraph);

// SAFETY: a graph is launched only through `&mut GraphCache` (so never from two threads at
// once), and moving it to another thread is allowed by CUDA as long as calls are serialised.
unsafe impl Send for Captured {}
// SAFETY: `&Captured` gives no access to the graph (only `GraphCache`'s `&mut self` methods
// launch it).
unsafe impl Sync for Captured {}

/// What a graph is valid for within a workspace generation: the bucket, and the cascade
/// plan's and its sparse selection's epochs (`None`: the paged kernel).
type Key = (usize, Option<(u64, u64)>);

/// The graphs of one model, valid for one workspace generation.
pub(super) struct GraphCache {
    mode: GraphMode,
    /// The workspace's and the MoE scratch's generations the graphs were made in.
    generation: (u64, u64),
    graphs: HashMap<Key, Captured>,
    /// Keys run eagerly once in this generation (kernels loaded, plans made).
    warmed: HashSet<Key>,
    /// Keys whose capture failed in this generation.
    failed: HashSet<Key>,
    /// The plan epochs the cascade keys above belong to.
    epoch: Option<(u64, u64)>,
    stats: GraphStats,
}

impl GraphCache {
    pub fn new(mode: GraphMode) -> Self {
        GraphCache {
            mode,
            generation: (0, 0),
            graphs: HashMap::new(),
            warmed: HashSet::new(),
            failed: HashSet::new(),
            epoch: None,
            stats: GraphStats::default(),
        }
    }

    pub fn mode(&self) -> GraphMode {
        self.mode
    }

    pub fn set_mode(&mut self, mode: GraphMode) {
        self.mode = mode;
    }

    pub fn stats(&self) -> &GraphStats {
        &self.stats
    }

    /// Drops every graph if the workspace moved (after the stream is idle: a graph is not
    /// destroyed while it may run; `CudaModel`'s drop waits likewise).
    fn sync_generation(&mut self, gpu: &Gpu, generation: (u64, u64)) -> Result<(), RuntimeError> {
        if generation != self.generation {
            if !self.graphs.is_empty() {
                gpu.synchronize()?;
            }
            self.graphs.clear();
            self.warmed.clear();
            self.failed.clear();
            self.generation = generation;
        }
        Ok(())
    }

    /// Drops the cascade graphs of an earlier plan epoch when a step of `epoch` comes (their
    /// plan buffers may be gone); only one epoch is live at a time.
    fn sync_epoch(&mut self, gpu: &Gpu, epoch: Option<(u64, u64)>) -> Result<(), RuntimeError> {
        let Some(e) = epoch else { return Ok(()) };
        if self.epoch != Some(e) {
            let stale = |k: &Key| k.1.is_some();
            if self.graphs.keys().any(stale) {
                gpu.synchronize()?;
            }
            self.graphs.retain(|k, _| !stale(k));
            self.warmed.retain(|k| !stale(k));
            self.failed.retain(|k| !stale(k));
            self.epoch = Some(e);
        }
        Ok(())
    }
}

/// The bucket a decode step of `rows` rows pads to, if a graph serves that size.
pub fn bucket_for(rows: usize) -> Option<usize> {
    if rows == 0 || rows > MAX_GRAPH_BATCH {
        return None;
    }
    ROW_BUCKETS.iter().copied().find(|&b| b >= rows)
}

/// The bucket a step runs in as a graph step, or `None` for an eager step: graphs on, every
/// sequence one row, logits for every row in order, and a batch a bucket holds. Its attention
/// (paged, or cascade with or without sparse rows) is the key's other half.
pub(super) fn graph_bucket(
    mode: GraphMode,
    meta: &StepMeta,
    logit_rows: &[usize],
) -> Option<usize> {
    let rows = meta.positions.len();
    let eligible = mode != GraphMode::Off
        && rows > 0
        && meta.max_rows_per_seq == 1
        && meta.seq_row_indptr.len() == rows + 1
        && logit_rows.len() == rows
        && logit_rows.iter().enumerate().all(|(i, &r)| i == r);
    if eligible {
        bucket_for(rows)
    } else {
        None
    }
}

/// Runs a padded decode step of `bucket` rows whose metadata (and cascade plan, if `attn` has
/// one) is already on the device (packed with `lay`): eagerly the first time for its key,
/// captured the second, replayed after. Gives the attention back (its plan is reused).
pub(super) fn run(
    m: &mut CudaModel,
    cfg: &ModelConfig,
    bucket: usize,
    lay: &PackedLayout,
    attn: StepAttention,
) -> Result<StepAttention, RuntimeError> {
    let gpu = m.gpu.clone();
    m.graphs
        .sync_generation(&gpu, (m.ws.generation(), m.moe.generation()))?;
    let attn = attn.for_graph(lay.seqs);
    let key = (bucket, attn.graph_epoch());
    m.graphs.sync_epoch(&gpu, key.1)?;
    let mode = m.graphs.mode;
    if mode == GraphMode::Replay {
        if let Some(Captured(g)) = m.graphs.graphs.get(&key) {
            g.launch()
                .map_err(|e| gpu_err("launching a CUDA graph", e))?;
            m.graphs.stats.count_replay(key);
            return Ok(attn);
        }
        if m.graphs.warmed.contains(&key) && !m.graphs.failed.contains(&key) {
            match capture(m, cfg, &attn, lay) {
                Ok(g) => {
                    g.launch()
                        .map_err(|e| gpu_err("launching a CUDA graph", e))?;
                    m.graphs.stats.captures += 1;
                    m.graphs.stats.count_replay(key);
                    m.graphs.graphs.insert(key, Captured(g));
                    return Ok(attn);
                }
                Err(e) => {
                    // Nothing of the step ran; it runs eagerly below, and so will the key.
                    m.graphs.failed.insert(key);
                    m.graphs.stats.failures += 1;
                    m.graphs.stats.last_failure = Some(e.to_string());
                }
            }
        }
    }
    forward::layers(m, cfg, &attn, lay, HeadRows::All)?;
    m.graphs.warmed.insert(key);
    m.graphs.stats.eager_padded += 1;
    Ok(attn)
}

/// Captures the step's launches (nothing runs) into a graph.
fn capture(
    m: &mut CudaModel,
    cfg: &ModelConfig,
    attn: &StepAttention,
    lay: &PackedLayout,
) -> Result<CudaGraph, RuntimeError> {
    let gpu = m.gpu.clone();
    gpu.begin_capture()?;
    let body = forward::layers(m, cfg, attn, lay, HeadRows::All);
    // End the capture whatever happened, so the stream leaves capture mode.
    let graph = gpu.end_capture();
    body?;
    Ok(graph?)
}

fn gpu_err(what: &str, e: arbor_kernels::cuda::cudarc::driver::DriverError) -> RuntimeError {
    arbor_kernels::cuda::GpuError::driver(what, e).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::BatchLayout;
    use arbor_kernels::kv::BlockTable;

    /// `seqs` sequences of `rows` rows each at position 20, on pages of 16; sequences share
    /// their first page when `shared`.
    fn step(seqs: usize, rows: usize, shared: bool) -> StepMeta {
        let mut b = BatchLayout::default();
        let tables: Vec<BlockTable> = (0..seqs as u32)
            .map(|s| BlockTable {
                pages: vec![if shared { 0 } else { 2 * s + 1 }, 2 * s + 2],
                len: 20,
            })
            .collect();
        for s in 0..seqs {
            b.push(s as u64, 20, rows);
        }
        StepMeta::build(&b, |s| tables.get(s as usize), 16).expect("layout")
    }

    #[test]
    fn only_one_row_decode_steps_take_graphs() {
        // The model does not matter: dense or MoE, paged or cascade attention, all take graphs.
        let all = |n: usize| (0..n).collect::<Vec<usize>>();
        let m = step(3, 1, false);
        let on = GraphMode::Replay;
        assert_eq!(graph_bucket(on, &m, &all(3)), Some(4));
        assert_eq!(graph_bucket(GraphMode::Padded, &m, &all(3)), Some(4));
        assert_eq!(graph_bucket(GraphMode::Off, &m, &all(3)), None);
        // A partial or reordered head, several rows per sequence.
        assert_eq!(graph_bucket(on, &m, &[0, 2]), None);
        assert_eq!(graph_bucket(on, &m, &[1, 0, 2]), None);
        let m2 = step(3, 2, false);
        assert_eq!(graph_bucket(on, &m2, &all(6)), None);
        // Too many sequences for a bucket.
        let m3 = step(MAX_GRAPH_BATCH + 1, 1, false);
        let n = MAX_GRAPH_BATCH + 1;
        assert_eq!(graph_bucket(on, &m3, &all(n)), None);
        // Shared pages (tree search: cascade attention) take graphs.
        let ms = step(3, 1, true);
        assert_eq!(graph_bucket(on, &ms, &all(3)), Some(4));
    }

    #[test]
    fn buckets_cover_every_decode_batch_up_to_the_largest() {
        assert_eq!(bucket_for(0), None);
        assert_eq!(bucket_for(1), Some(1));
        assert_eq!(bucket_for(3), Some(4));
        assert_eq!(bucket_for(9), Some(16));
        assert_eq!(bucket_for(17), Some(24));
        assert_eq!(bucket_for(200), Some(256));
        assert_eq!(bucket_for(256), Some(256));
        assert_eq!(bucket_for(257), None);
        for n in 1..=MAX_GRAPH_BATCH {
            let b = bucket_for(n).expect("a bucket");
            assert!(b >= n && ROW_BUCKETS.contains(&b));
            // The smallest bucket that fits.
            assert!(ROW_BUCKETS.iter().all(|&c| c < n || c >= b));
        }
    }

    #[test]
    fn the_environment_turns_graphs_off() {
        // Only reads: other tests may run concurrently, so the variable is not set here.
        let m = GraphMode::from_env();
        match std::env::var("ARBOR_CUDA_GRAPHS").as_deref() {
            Ok("0") => assert_eq!(m, GraphMode::Off),
            Err(_) => assert_eq!(m, GraphMode::Replay),
            _ => {}
        }
    }
}
