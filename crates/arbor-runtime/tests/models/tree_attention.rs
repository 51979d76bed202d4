//! Cascade (tree) attention through the engine: a forked batch (8 branches of one prompt, then
//! a second level of forks, beside an unrelated prompt chunk) gives bitwise the same logits
//! through the default cascade mode (state passing) as through per-sequence attention, and
//! within rounding through merged partials; a sparse budget that covers every page changes
//! nothing at all.

use super::errors;
use arbor_kernels::kv::SeqId;
use arbor_kernels::ops::cascade::CascadeMode;
use arbor_runtime::{Engine, EngineOptions, ForwardBatch, LogitsMode, Model, SeqStep};
use std::path::PathBuf;

fn engine(tree: Option<CascadeMode>) -> Engine {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/llama");
    let mut e = Engine::new(
        Model::load(&dir).expect("fixture"),
        &EngineOptions {
            kv_cache_bytes: 4 << 20,
            page_size: 8,
        },
    )
    .expect("engine");
    e.model.attention.tree = tree;
    // The fixture has two layers, both dense by default: make sparse budgets bite.
    e.model.attention.sparse.dense_layers = 0;
    e
}

/// Runs the scenario; returns the logits of every branch at every step, in order.
fn scenario(tree: Option<CascadeMode>, sparse_budget: Option<usize>) -> Vec<Vec<f32>> {
    let mut e = engine(tree);
    let step = |e: &mut Engine, seqs: Vec<(SeqId, Vec<u32>)>| {
        let out = e
            .step(&ForwardBatch {
                seqs: seqs
                    .into_iter()
                    .map(|(seq, tokens)| SeqStep {
                        seq,
                        tokens,
                        logits: LogitsMode::Last,
                        sparse_budget,
                        ..Default::default()
                    })
                    .collect(),
            })
            .expect("step");
        e.cache().check().expect("KV bookkeeping");
        out.into_iter().map(|o| o.logits).collect::<Vec<_>>()
    };
    let root = e.new_seq();
    // 37 tokens: the shared prompt ends mid-page (page size 8), so every branch copies it.
    let prompt: Vec<u32> = (0..37).map(|i| (i * 29 + 3) % 384).collect();
    let mut logits = step(&mut e, vec![(root, prompt)]);
    let mut branches: Vec<SeqId> = (0..8).map(|_| e.fork_seq(root).expect("fork")).collect();
    let other = e.new_seq();
    for t in 0..5u32 {
        if t == 2 {
            // A second level: the first three branches fork twice each (uneven).
            for b in 0..3 {
                for _ in 0..2 {
                    let c = e.fork_seq(branches[b]).expect("fork");
                    branches.push(c);
                }
            }
        }
        let mut seqs: Vec<(SeqId, Vec<u32>)> = branches
            .iter()
            .enumerate()
            .map(|(i, &s)| (s, vec![(i as u32 * 31 + t * 7 + 11) % 384]))
            .collect();
        if t < 2 {
            // An unrelated prompt chunk in the same batch.
            seqs.push((other, (0..9).map(|i| (i * 13 + t * 5 + 1) % 384).collect()));
        }
        logits.extend(step(&mut e, seqs));
    }
    logits
}

fn bitwise(a: &[Vec<f32>], b: &[Vec<f32>]) -> bool {
    a.len() == b.len()
        && a.iter()
            .flatten()
            .zip(b.iter().flatten())
            .all(|(x, y)| x.to_bits() == y.to_bits())
}

#[test]
fn forked_batch_gives_the_same_logits_with_cascade_attention() {
    let per_seq = scenario(None, None);
    // The engine's default (state passing) is per-sequence attention, bit for bit.
    assert!(bitwise(&scenario(Some(CascadeMode::Chain), None), &per_seq));
    // Merged partials agree up to rounding, and do take another path (they round differently).
    let merged = scenario(Some(CascadeMode::Merge), None);
    let worst = merged
        .iter()
        .zip(&per_seq)
        .map(|(a, b)| errors(a, b).0)
        .fold(0.0, f64::max);
    println!("merged cascade vs per-sequence attention, engine logits: worst NMSE {worst:.3e}");
    assert!(worst < 1e-10, "NMSE {worst:.3e}");
    assert!(!bitwise(&merged, &per_seq), "was the merge path taken?");
    // A budget above every sequence's page count reads every page in the same order.
    assert!(bitwise(
        &scenario(Some(CascadeMode::Merge), Some(1000)),
        &merged
    ));
    assert!(bitwise(&scenario(None, Some(1000)), &per_seq));
}

#[test]
fn sparse_budgets_on_a_short_context() {
    // Contexts of at most 6 pages: sink + 2 local pages + a budget of 2 is every page, so the
    // logits are those of dense attention bit for bit; a budget of 1 drops a page for some
    // rows (on this random-weight fixture that moves logits a lot: accuracy is measured on
    // SmolLM2, see docs/BENCHMARKS.md).
    let dense = scenario(None, None);
    assert!(bitwise(&scenario(None, Some(2)), &dense));
    let sparse = scenario(None, Some(1));
    assert!(sparse.iter().flatten().all(|x| x.is_finite()));
    let moved = sparse.iter().zip(&dense).filter(|(a, b)| a != b).count();
    assert!(moved > 0, "a budget of 1 changed nothing");
    // The prompt step: the union of the rows' picks in the one group covers every page.
    assert_eq!(sparse[0], dense[0]);
}
