//! Per-page key summaries (min/max per channel, for sparse attention) stay right through
//! writes, copy-on-write, truncation, prefix-cache deduplication and page reuse: checked
//! against min/max recomputed from the pool.

use crate::cascade::{Rig, LAYER};
use crate::cascade_sparse::min_max;
use arbor_kernels::kv::{BlockTable, KvCache, KvLayout, SeqId};

fn layout(ps: usize) -> KvLayout {
    KvLayout {
        num_layers: 2,
        num_kv_heads: 2,
        head_dim: 8,
        page_size: ps,
    }
}

#[test]
fn key_summaries_follow_writes_copy_on_write_truncation_and_reuse() {
    for seed in 0..6u64 {
        let ps = [8, 16][seed as usize % 2];
        let mut rig = Rig::new(layout(ps), 96, seed);
        let mut live: Vec<SeqId> = Vec::new();
        let mut prev: Vec<u32> = Vec::new();
        for step in 0..300 {
            let pick = |rig: &mut Rig, live: &[SeqId]| live[rig.rng.below(live.len())];
            let op = if live.is_empty() { 0 } else { rig.rng.below(6) };
            let mut wrote = None;
            match op {
                0 => {
                    let s = rig.new_seq();
                    let n = 1 + rig.rng.below(3 * ps);
                    let t = rig.tokens(n);
                    if rig.cache.pages_needed(s, n) <= rig.cache.available_pages() {
                        rig.append(s, &t);
                        live.push(s);
                        wrote = Some(s);
                    } else {
                        rig.cache.free_seq(s);
                    }
                }
                1 => {
                    let parent = pick(&mut rig, &live);
                    live.push(rig.fork(parent));
                }
                2 | 3 => {
                    let s = pick(&mut rig, &live);
                    let n = 1 + rig.rng.below(ps + 3);
                    // Op 3 repeats the last appended tokens: forks of one parent then write
                    // the same chains, and the prefix index swaps duplicate full pages.
                    let t = match op {
                        3 if !prev.is_empty() => prev.clone(),
                        _ => rig.tokens(n),
                    };
                    if rig.cache.pages_needed(s, t.len()) <= rig.cache.available_pages() {
                        rig.append(s, &t);
                        wrote = Some(s);
                        prev = t;
                    }
                }
                4 => {
                    let s = pick(&mut rig, &live);
                    let len = rig.cache.len(s);
                    let keep = rig.rng.below(len + 1);
                    rig.cache.truncate(s, keep);
                }
                _ => {
                    let i = rig.rng.below(live.len());
                    rig.cache.free_seq(live.swap_remove(i));
                }
            }
            check_summaries(
                &rig.cache,
                &live,
                wrote,
                &format!("seed {seed} step {step}"),
            );
        }
    }
}

/// Every page of a live sequence: its summary equals the min/max recomputed from the pool over
/// the slots it claims, which cover at least the sequence's valid slots, exactly so for the
/// sequence that just wrote.
fn check_summaries(cache: &KvCache, live: &[SeqId], wrote: Option<SeqId>, what: &str) {
    let ps = cache.layout().page_size;
    let sums = cache.pool.summaries();
    for &s in live {
        let table = cache.table(s).expect("live");
        let len = cache.len(s);
        for (i, &page) in table.pages[..BlockTable::pages_for(len, ps)]
            .iter()
            .enumerate()
        {
            let valid = (len - i * ps).min(ps);
            for layer in 0..2 {
                let filled = sums.filled(layer, page);
                assert!(
                    filled >= valid,
                    "{what}: seq {s} page {i}: {filled} < {valid} slots"
                );
                if wrote == Some(s) {
                    assert_eq!(filled, valid, "{what}: seq {s} page {i} after a write");
                }
                if layer == LAYER {
                    for h in 0..2 {
                        let (mn, mx) = sums.min_max(layer, page, h);
                        let (wmn, wmx) = min_max(cache, page, h, filled);
                        assert!(
                            mn == wmn.as_slice() && mx == wmx.as_slice(),
                            "{what}: page {page}"
                        );
                    }
                }
            }
        }
    }
    cache.check().expect("cache invariants");
}

#[test]
fn copy_on_write_copies_the_summary_of_the_copied_slots() {
    // In the cache a write always follows a copy (and would repair a wrong summary), so the
    // copy is checked on the pool directly.
    let l = layout(16);
    let mut pool = arbor_kernels::kv::KvPool::new(l, 8);
    let mut rng = crate::common::Rng::new(3);
    for layer in 0..2 {
        for slot in 0..12 {
            let (k, v) = (rng.normals(16, 1.0), rng.normals(16, 1.0));
            pool.write(layer, 3, slot, &k, &v);
        }
    }
    pool.copy_page(3, 5, 7);
    for layer in 0..2 {
        assert_eq!(pool.summaries().filled(layer, 5), 7);
        for h in 0..2 {
            let keys = pool.keys(layer, 5, h);
            let (mn, mx) = pool.summaries().min_max(layer, 5, h);
            for c in 0..8 {
                let col = keys[..7 * 8].chunks_exact(8).map(|k| k[c]);
                assert_eq!(mn[c], col.clone().fold(f32::INFINITY, f32::min));
                assert_eq!(mx[c], col.fold(f32::NEG_INFINITY, f32::max));
            }
        }
    }
}
