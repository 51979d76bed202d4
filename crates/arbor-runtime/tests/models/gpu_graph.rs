//! CUDA graphs of decode steps on the fixture models (dense and mixture-of-experts): 40 decode
//! steps whose batch sizes move inside and across the graph buckets. Each step runs padded and eagerly, then replayed from
//! a graph, on the same model and cache: logits and hidden states must agree bit for bit, and
//! the counters must show the replays. A second model with graphs off (unpadded) runs the same
//! steps as a reference for the padding rows' harmlessness. Tree-search decode steps (branches
//! forked from a shared prompt, forking further as they go) run the same way through cascade
//! graphs, and so do decode steps with sparse budgets. Skipped, with the reason printed, where no GPU can be opened (`ARBOR_REQUIRE_GPU=1`
//! makes that a failure).

use super::errors;
use super::fixtures::fixture;
use arbor_kernels::cuda::Gpu;
use arbor_kernels::kv::{KvCache, KvLayout, SeqId};
use arbor_runtime::cuda::graph::GraphMode;
use arbor_runtime::cuda::CudaModel;
use arbor_runtime::model::BatchLayout;
use arbor_runtime::Model;
use std::sync::Arc;

const SEQS: usize = 48;
const PAGES: usize = 512;

/// Batch sizes of the 40 decode steps: repeats inside buckets (1, 2, 4, 8, …, 48), moves
/// across them up and down, and returns to buckets already captured.
const SIZES: [usize; 40] = [
    1, 1, 2, 3, 2, 4, 4, 5, 8, 6, 7, 8, 9, 12, 16, 16, 13, 17, 24, 20, 24, 23, 25, 32, 31, 32, 33,
    40, 48, 47, 40, 36, 1, 2, 3, 5, 9, 17, 33, 48,
];

fn gpu() -> Option<Arc<Gpu>> {
    super::gpu::on_gpu(Gpu::open(0))
}

/// A model on the GPU with its own cache.
struct Run {
    m: CudaModel,
    cache: KvCache,
}

impl Run {
    fn new(gpu: &Arc<Gpu>, model: &Model, mode: GraphMode) -> Self {
        Self::with_seqs(gpu, model, mode, SEQS)
    }

    /// A model on the GPU whose cache holds sequences `0..seqs`.
    fn with_seqs(gpu: &Arc<Gpu>, model: &Model, mode: GraphMode, seqs: usize) -> Self {
        let c = &model.cfg;
        let layout = KvLayout {
            num_layers: c.num_layers,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            page_size: 16,
        };
        let mut m = CudaModel::new(gpu.clone(), model, layout, PAGES).expect("model on the GPU");
        m.set_graph_mode(mode);
        let mut cache = KvCache::detached(layout, PAGES, 0);
        cache.set_indexing(false);
        for s in 0..seqs as SeqId {
            cache.add_seq(s);
        }
        Run { m, cache }
    }

    /// Reserves the step's positions; returns its layout.
    fn reserve(&mut self, steps: &[(SeqId, Vec<u32>)]) -> BatchLayout {
        let mut b = BatchLayout::default();
        for (s, toks) in steps {
            b.push(*s, self.cache.len(*s), toks.len());
            self.cache.reserve(*s, toks.len()).expect("reserve");
        }
        b
    }

    /// Runs a reserved step: (logits of `logit_rows`, hidden states of `hidden_rows`).
    fn forward(
        &mut self,
        model: &Model,
        b: &BatchLayout,
        tokens: &[u32],
        logit_rows: &[usize],
        hidden_rows: &[usize],
    ) -> (Vec<f32>, Vec<f32>) {
        let hidden = (self.m)
            .forward(model, &mut self.cache, tokens, b, logit_rows, hidden_rows)
            .expect("forward");
        (self.m.read_logits().expect("logits"), hidden)
    }

    /// Runs the reserved decode step `b` of `steps` padded and eagerly, then replayed from a
    /// graph, commits it, and returns the replay's logits (of every row) once they equal the
    /// eager step's bit for bit (`what` names the step in the failure).
    fn eager_then_replay(
        &mut self,
        model: &Model,
        b: &BatchLayout,
        steps: &[(SeqId, Vec<u32>)],
        what: &str,
    ) -> Vec<f32> {
        let tokens: Vec<u32> = steps.iter().map(|(_, t)| t[0]).collect();
        let rows: Vec<usize> = (0..steps.len()).collect();
        self.m.set_graph_mode(GraphMode::Padded);
        let (eager, _) = self.forward(model, b, &tokens, &rows, &[]);
        self.m.set_graph_mode(GraphMode::Replay);
        let (replay, _) = self.forward(model, b, &tokens, &rows, &[]);
        self.commit(steps);
        assert!(
            same_bits(&eager, &replay),
            "{what}: replayed logits differ from the eager step's"
        );
        replay
    }

    fn commit(&mut self, steps: &[(SeqId, Vec<u32>)]) {
        for (s, toks) in steps {
            self.cache.commit(*s, toks);
        }
    }
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

#[test]
fn graph_replays_match_eager_steps_bit_for_bit() {
    let Some(gpu) = gpu() else { return };
    for arch in [
        "llama",
        "qwen2",
        "qwen3",
        "qwen2-moe",
        "mixtral",
        "qwen3-moe",
    ] {
        let model = Model::load(&fixture(arch)).expect("load model");
        let vocab = model.cfg.vocab_size as u32;
        let mut test = Run::new(&gpu, &model, GraphMode::Replay);
        let mut reference = Run::new(&gpu, &model, GraphMode::Off);

        // Prompts of 3..=33 tokens, all in one (eager) step.
        let prompts: Vec<(SeqId, Vec<u32>)> = (0..SEQS)
            .map(|i| {
                let len = 3 + (i * 7) % 31;
                let toks = (0..len)
                    .map(|j| ((i * 131 + j * 17) as u32) % vocab)
                    .collect();
                (i as SeqId, toks)
            })
            .collect();
        let tokens: Vec<u32> = prompts.iter().flat_map(|(_, t)| t.clone()).collect();
        let mut last = Vec::new();
        for (_, t) in &prompts {
            last.push(last.last().map_or(0, |&l: &usize| l) + t.len());
        }
        let logit_rows: Vec<usize> = last.iter().map(|&l| l - 1).collect();
        for r in [&mut test, &mut reference] {
            let b = r.reserve(&prompts);
            r.forward(&model, &b, &tokens, &logit_rows, &[]);
            r.commit(&prompts);
            // Expert counts of the decode steps only (MoE models).
            r.m.set_expert_stats(true);
            r.m.take_expert_counts().expect("expert counts");
        }

        for (k, &n) in SIZES.iter().enumerate() {
            let steps: Vec<(SeqId, Vec<u32>)> = (0..n)
                .map(|j| {
                    let s = ((k * 5 + j) % SEQS) as SeqId;
                    (s, vec![((k * 31 + j * 7) as u32) % vocab])
                })
                .collect();
            let tokens: Vec<u32> = steps.iter().map(|(_, t)| t[0]).collect();
            let rows: Vec<usize> = (0..n).collect();
            let hidden: Vec<usize> = if k % 2 == 1 { vec![n - 1, 0] } else { vec![] };

            let b = test.reserve(&steps);
            test.m.set_graph_mode(GraphMode::Padded);
            let (eager, eager_h) = test.forward(&model, &b, &tokens, &rows, &hidden);
            test.m.set_graph_mode(GraphMode::Replay);
            let (replay, replay_h) = test.forward(&model, &b, &tokens, &rows, &hidden);
            test.commit(&steps);
            assert_eq!(eager.len(), n * model.cfg.out_dim(), "{arch} step {k}");
            assert!(
                same_bits(&eager, &replay),
                "{arch} step {k} ({n} rows): replayed logits differ from the eager step's"
            );
            assert!(
                same_bits(&eager_h, &replay_h),
                "{arch} step {k}: hidden states differ"
            );

            let b = reference.reserve(&steps);
            let (want, want_h) = reference.forward(&model, &b, &tokens, &rows, &hidden);
            reference.commit(&steps);
            // Only the GEMMs' row count differs from the unpadded step.
            let (nmse, max) = errors(&replay, &want);
            assert!(
                nmse < 1e-4,
                "{arch} step {k} ({n} rows): NMSE {nmse:.2e} (max {max:.2e}) against the unpadded step"
            );
            if !hidden.is_empty() {
                let (nmse, _) = errors(&replay_h, &want_h);
                assert!(nmse < 1e-4, "{arch} step {k}: hidden NMSE {nmse:.2e}");
            }
        }

        let st = test.m.graph_stats().clone();
        println!("{arch}: {st:?}");
        assert_eq!(st.failures, 0, "{arch}: {:?}", st.last_failure);
        let buckets = [1, 2, 4, 8, 16, 24, 32, 48];
        assert!(st.captures >= buckets.len() as u64, "{arch}: {st:?}");
        assert_eq!(st.replays, SIZES.len() as u64, "{arch}: {st:?}");
        assert!(
            st.replays - st.captures >= (SIZES.len() - 2 * buckets.len()) as u64,
            "{arch}: graphs were recaptured more than expected: {st:?}"
        );
        let off = reference.m.graph_stats();
        assert_eq!((off.captures, off.replays, off.eager_padded), (0, 0, 0));

        // Padding rows are routed to no expert: every layer counts exactly the real tokens'
        // assignments (the test model ran each step twice: padded eagerly, then replayed).
        if let Some(moe) = &model.cfg.moe {
            let assigned = (SIZES.iter().sum::<usize>() * moe.experts_per_token) as u64;
            for (r, times) in [(&test, 2), (&reference, 1)] {
                let c =
                    r.m.take_expert_counts()
                        .expect("counts")
                        .expect("a MoE model");
                for (layer, counts) in c.layers.iter().zip(&c.counts) {
                    let total: u64 = counts.iter().sum();
                    assert_eq!(total, times * assigned, "{arch} layer {layer}: {counts:?}");
                }
            }
        }
    }
}

/// Rows of the tree steps: the live branches rotate through them, across buckets.
const TREE_SIZES: [usize; 30] = [
    24, 24, 24, 12, 12, 5, 24, 17, 17, 24, 24, 30, 30, 30, 9, 28, 28, 28, 1, 2, 24, 24, 16, 16, 32,
    32, 32, 20, 20, 36,
];

#[test]
fn tree_decode_steps_replay_through_cascade_graphs() {
    let Some(gpu) = gpu() else { return };
    for arch in ["llama", "qwen2"] {
        let model = Model::load(&fixture(arch)).expect("load model");
        let vocab = model.cfg.vocab_size as u32;
        let mut test = Run::with_seqs(&gpu, &model, GraphMode::Replay, 1);
        let mut reference = Run::with_seqs(&gpu, &model, GraphMode::Off, 1);

        // A 45-token prompt (its last page partial, so forks copy it on write), then 24
        // branches forked from it.
        let prompt: Vec<(SeqId, Vec<u32>)> =
            vec![(0, (0..45).map(|j| (j * 13 + 5) % vocab).collect())];
        let tokens = prompt[0].1.clone();
        let mut live: Vec<SeqId> = (1..=24).collect();
        for r in [&mut test, &mut reference] {
            let b = r.reserve(&prompt);
            r.forward(&model, &b, &tokens, &[44], &[]);
            r.commit(&prompt);
            for &s in &live {
                r.cache.fork(0, s).expect("fork");
            }
        }
        let mut next: SeqId = 25;
        for (k, &n) in TREE_SIZES.iter().enumerate() {
            if k % 7 == 3 {
                // Four new branches off one live branch, as a beam or MCTS expansion makes.
                let parent = live[k % live.len()];
                for _ in 0..4 {
                    for r in [&mut test, &mut reference] {
                        r.cache.fork(parent, next).expect("fork");
                    }
                    live.push(next);
                    next += 1;
                }
            }
            let n = n.min(live.len());
            let steps: Vec<(SeqId, Vec<u32>)> = (0..n)
                .map(|j| {
                    let s = live[(k * 3 + j) % live.len()];
                    (s, vec![((k * 37 + j * 11) as u32) % vocab])
                })
                .collect();
            let tokens: Vec<u32> = steps.iter().map(|(_, t)| t[0]).collect();
            let rows: Vec<usize> = (0..n).collect();

            let b = test.reserve(&steps);
            let replay =
                test.eager_then_replay(&model, &b, &steps, &format!("{arch} tree step {k}"));

            let b = reference.reserve(&steps);
            let (want, _) = reference.forward(&model, &b, &tokens, &rows, &[]);
            reference.commit(&steps);
            let (nmse, max) = errors(&replay, &want);
            assert!(
                nmse < 1e-4,
                "{arch} tree step {k} ({n} rows): NMSE {nmse:.2e} (max {max:.2e}) against the \
                 unpadded eager step"
            );
        }

        let st = test.m.graph_stats().clone();
        println!("{arch} tree: {st:?}");
        assert_eq!(st.failures, 0, "{arch}: {:?}", st.last_failure);
        assert_eq!(st.replays, TREE_SIZES.len() as u64, "{arch}: {st:?}");
        // A one-row step shares with nobody and takes the paged kernel; every other step's
        // branches share the prompt.
        let single = TREE_SIZES.iter().filter(|&&n| n == 1).count() as u64;
        assert_eq!(st.tree_replays, st.replays - single, "{arch}: {st:?}");
        // Runs of one bucket on a plan that kept its epoch replay without a new capture.
        assert!(st.replays - st.captures >= 10, "{arch}: {st:?}");
    }
}

/// Batch sizes of the sparse decode steps (of 8 branches).
const SPARSE_SIZES: [usize; 16] = [8, 8, 8, 8, 5, 5, 8, 8, 3, 8, 8, 8, 6, 6, 8, 8];

/// Decode steps whose rows have a sparse budget take graphs too: 8 branches of a 90-token
/// prompt (pages of 16), each reading its sink, its last two pages and the best 2 of the rest
/// in every layer. Replays must equal the padded eager step bit for bit (the selection's
/// buffers and counts stay on the device), stay near the unpadded eager step, and differ from
/// dense attention (the selection ran).
#[test]
fn sparse_decode_steps_replay_through_graphs() {
    let Some(gpu) = gpu() else { return };
    for arch in ["llama", "qwen2"] {
        let mut model = Model::load(&fixture(arch)).expect("load model");
        model.attention.sparse.dense_layers = 0;
        let vocab = model.cfg.vocab_size as u32;
        let mut test = Run::with_seqs(&gpu, &model, GraphMode::Replay, 1);
        let mut reference = Run::with_seqs(&gpu, &model, GraphMode::Off, 1);
        let mut dense = Run::with_seqs(&gpu, &model, GraphMode::Replay, 1);
        let prompt: Vec<(SeqId, Vec<u32>)> =
            vec![(0, (0..90).map(|j| (j * 7 + 3) % vocab).collect())];
        let tokens = prompt[0].1.clone();
        let live: Vec<SeqId> = (1..=8).collect();
        for r in [&mut test, &mut reference, &mut dense] {
            let b = r.reserve(&prompt);
            r.forward(&model, &b, &tokens, &[89], &[]);
            r.commit(&prompt);
            for &s in &live {
                r.cache.fork(0, s).expect("fork");
            }
        }
        let sparse = |b: BatchLayout| BatchLayout {
            seqs: (b.seqs.into_iter())
                .map(|mut s| {
                    s.sparse_budget = Some(2);
                    s
                })
                .collect(),
            ..b
        };
        let mut moved = 0.0f64;
        for (k, &n) in SPARSE_SIZES.iter().enumerate() {
            let steps: Vec<(SeqId, Vec<u32>)> = (0..n)
                .map(|j| {
                    (
                        live[(k + j) % live.len()],
                        vec![((k * 31 + j * 5) as u32) % vocab],
                    )
                })
                .collect();
            let tokens: Vec<u32> = steps.iter().map(|(_, t)| t[0]).collect();
            let rows: Vec<usize> = (0..n).collect();

            let b = sparse(test.reserve(&steps));
            let what = format!("{arch} sparse step {k}");
            let replay = test.eager_then_replay(&model, &b, &steps, &what);

            let b = sparse(reference.reserve(&steps));
            let (want, _) = reference.forward(&model, &b, &tokens, &rows, &[]);
            reference.commit(&steps);
            let (nmse, max) = errors(&replay, &want);
            assert!(
                nmse < 1e-4,
                "{arch} sparse step {k} ({n} rows): NMSE {nmse:.2e} (max {max:.2e}) against \
                 the unpadded eager step"
            );
            let b = dense.reserve(&steps);
            let (full, _) = dense.forward(&model, &b, &tokens, &rows, &[]);
            dense.commit(&steps);
            moved = moved.max(errors(&replay, &full).0);
        }

        let st = test.m.graph_stats().clone();
        println!("{arch} sparse: {st:?}; largest NMSE against dense attention {moved:.2e}");
        assert_eq!(st.failures, 0, "{arch}: {:?}", st.last_failure);
        assert_eq!(
            st.sparse_replays,
            SPARSE_SIZES.len() as u64,
            "{arch}: {st:?}"
        );
        assert!(st.replays - st.captures >= 8, "{arch}: {st:?}");
        assert!(moved > 1e-6, "{arch}: budget 2 read every page anyway");
    }
}
