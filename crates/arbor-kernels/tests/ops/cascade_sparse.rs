//! Sparse (Quest-style) cascade attention: a budget that covers every page gives exactly the
//! dense result, a single row picks sink + local window + its top pages by the min/max bound
//! and attends to exactly those, and a shared group reads the union of its rows' picks.

use crate::cascade::{nmse, per_row, tree, Batch, Rig, LAYER};
use arbor_kernels::kv::{KvCache, KvLayout, SeqId};
use arbor_kernels::ops::cascade::{
    cascade_attention, chain_attention, select_pages, CascadePlan, PlanOptions, SparseParams,
};
use arbor_kernels::ops::AttentionParams;
use std::collections::BTreeSet;

fn layout(nkv: usize, hd: usize, ps: usize) -> KvLayout {
    KvLayout {
        num_layers: 2,
        num_kv_heads: nkv,
        head_dim: hd,
        page_size: ps,
    }
}

fn params(nkv: usize, group: usize, hd: usize, window: Option<usize>) -> AttentionParams {
    AttentionParams {
        n_heads: nkv * group,
        n_kv_heads: nkv,
        head_dim: hd,
        scale: 1.0 / (hd as f32).sqrt(),
        sliding_window: window,
    }
}

/// The defaults, sparse in every layer (the tests use layer 1).
fn sparse_params() -> SparseParams {
    SparseParams {
        dense_layers: 0,
        ..SparseParams::default()
    }
}

fn run(q: &[f32], plan: &CascadePlan, cache: &KvCache, p: &AttentionParams) -> Vec<f32> {
    let sel = select_pages(q, plan, &cache.pool, LAYER, p, &sparse_params());
    let mut out = vec![f32::NAN; q.len()];
    cascade_attention(q, plan, &cache.pool, LAYER, p, sel.as_ref(), &mut out);
    out
}

#[test]
fn budget_covering_every_page_is_bitwise_dense() {
    // The selection then lists every page of every group in order, so each task does the
    // same arithmetic in the same order as the dense path: equal bit for bit.
    for (seed, group, window) in [(1, 3, None), (2, 8, Some(40)), (3, 1, None)] {
        let mut rig = Rig::new(layout(2, 64, 16), 2048, seed);
        let mut b = Batch::default();
        for _ in 0..2 {
            let (all, leaves) = tree(&mut rig, 150, 3, 6, 20);
            for &s in &all[all.len() - leaves..] {
                b.add(&mut rig, s, 1 + (s as usize % 3));
            }
        }
        let p = params(2, group, 64, window);
        let q = rig.rng.normals(b.positions.len() * p.n_heads * 64, 2.0);
        let opts = PlanOptions::default();
        let dense = run(&q, &b.plan(&rig.cache, None, &opts), &rig.cache, &p);
        let sparse_plan = b.plan(&rig.cache, Some(1_000_000), &opts);
        assert!(sparse_plan.has_sparse());
        let sparse = run(&q, &sparse_plan, &rig.cache, &p);
        assert!(dense
            .iter()
            .zip(&sparse)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        // The same through state passing, which also equals per-row attention bitwise.
        let sel = select_pages(
            &q,
            &sparse_plan,
            &rig.cache.pool,
            LAYER,
            &p,
            &sparse_params(),
        );
        let mut chained = vec![f32::NAN; q.len()];
        chain_attention(
            &q,
            &sparse_plan,
            &rig.cache.pool,
            LAYER,
            &p,
            sel.as_ref(),
            &mut chained,
        );
        let want = per_row(&q, &b, &rig.cache, &p);
        assert!(chained
            .iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        let e = nmse(&dense, &per_row(&q, &b, &rig.cache, &p));
        assert!(e < 1e-10, "dense cascade vs per-row NMSE {e:.3e}");
    }
}

/// Per-channel min/max of the keys of `head` in `page`'s first `slots` slots, from the pool.
pub fn min_max(cache: &KvCache, page: u32, head: usize, slots: usize) -> (Vec<f32>, Vec<f32>) {
    let hd = cache.layout().head_dim;
    let keys = cache.pool.keys(LAYER, page, head);
    let mut mn = vec![f32::INFINITY; hd];
    let mut mx = vec![f32::NEG_INFINITY; hd];
    for k in keys[..slots * hd].chunks_exact(hd) {
        for c in 0..hd {
            mn[c] = mn[c].min(k[c]);
            mx[c] = mx[c].max(k[c]);
        }
    }
    (mn, mx)
}

#[test]
fn one_row_reads_sink_local_and_its_top_pages_only() {
    let (ps, nkv, group, hd, budget) = (8, 2, 4, 32, 5);
    let mut rig = Rig::new(layout(nkv, hd, ps), 256, 7);
    let s = rig.new_seq();
    let t = rig.tokens(301);
    rig.append(s, &t);
    let mut b = Batch::default();
    b.add(&mut rig, s, 1); // position 301, page 37
    let p = params(nkv, group, hd, None);
    let q = rig.rng.normals(p.n_heads * hd, 3.0);
    let plan = b.plan(&rig.cache, Some(budget), &PlanOptions::default());
    let sel = select_pages(&q, &plan, &rig.cache.pool, LAYER, &p, &sparse_params())
        .expect("a sparse row");
    let table = rig.cache.table(s).expect("live").pages.clone();
    let (pos, last) = (301usize, 301 / ps);
    for h in 0..nkv {
        // Naive Quest: bound from min/max recomputed out of the pool, max over the group's heads.
        let mut scored: Vec<(f32, usize)> = (1..last - 1)
            .map(|a| {
                let (mn, mx) = min_max(&rig.cache, table[a], h, ps);
                let b = (0..group)
                    .map(|g| {
                        let qh = &q[(h * group + g) * hd..][..hd];
                        (0..hd)
                            .map(|c| (qh[c] * mn[c]).max(qh[c] * mx[c]))
                            .sum::<f32>()
                    })
                    .fold(f32::NEG_INFINITY, f32::max);
                (b, a)
            })
            .collect();
        scored.sort_by(|x, y| y.0.total_cmp(&x.0));
        let mut want: BTreeSet<usize> = [0, last - 1, last].into();
        want.extend(scored[..budget].iter().map(|&(_, a)| a));
        let mut got = BTreeSet::new();
        for g in 0..plan.num_groups() {
            let first = plan.group_first_page[g] as usize;
            got.extend(sel.pages(g, h).iter().map(|&j| first + j as usize));
        }
        assert_eq!(got, want, "KV head {h}");
        // The output of each query head equals f64 attention over exactly those positions.
        let mut out = vec![0.0f32; q.len()];
        cascade_attention(&q, &plan, &rig.cache.pool, LAYER, &p, Some(&sel), &mut out);
        let mut chained = vec![0.0f32; q.len()];
        chain_attention(
            &q,
            &plan,
            &rig.cache.pool,
            LAYER,
            &p,
            Some(&sel),
            &mut chained,
        );
        assert!(nmse(&chained, &out) < 1e-10);
        for hq in h * group..(h + 1) * group {
            let want_o = attend_over(&rig.cache, &table, h, &q[hq * hd..][..hd], &p, &want, pos);
            let e = nmse(&out[hq * hd..][..hd], &want_o);
            assert!(e < 1e-10, "head {hq}: NMSE {e:.3e}");
        }
    }
}

/// f64 attention of query `qh` (KV head `h`) over positions `..= pos` of the pages `pages`
/// (indices into `table`).
fn attend_over(
    cache: &KvCache,
    table: &[u32],
    h: usize,
    qh: &[f32],
    p: &AttentionParams,
    pages: &BTreeSet<usize>,
    pos: usize,
) -> Vec<f32> {
    let (ps, hd) = (cache.layout().page_size, p.head_dim);
    let slots: Vec<(u32, usize)> = pages
        .iter()
        .flat_map(|&a| (a * ps..((a + 1) * ps).min(pos + 1)).map(move |t| (a, t % ps)))
        .map(|(a, slot)| (table[a], slot))
        .collect();
    let scores: Vec<f64> = slots
        .iter()
        .map(|&(page, slot)| {
            let k = &cache.pool.keys(LAYER, page, h)[slot * hd..][..hd];
            qh.iter()
                .zip(k)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum::<f64>()
                * p.scale as f64
        })
        .collect();
    let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
    let mut o = vec![0.0f64; hd];
    for (&(page, slot), s) in slots.iter().zip(&scores) {
        let v = &cache.pool.values(LAYER, page, h)[slot * hd..][..hd];
        for c in 0..hd {
            o[c] += (s - m).exp() / z * v[c] as f64;
        }
    }
    o.into_iter().map(|x| x as f32).collect()
}

#[test]
fn a_shared_group_reads_the_union_of_its_rows_picks() {
    let (ps, nkv, group, hd, budget) = (16, 2, 3, 64, 4);
    let mut rig = Rig::new(layout(nkv, hd, ps), 512, 9);
    let root = rig.new_seq();
    let t = rig.tokens(700);
    rig.append(root, &t);
    let kids: Vec<SeqId> = (0..8).map(|_| rig.fork(root)).collect();
    let mut b = Batch::default();
    for &k in &kids {
        b.add(&mut rig, k, 1);
    }
    let p = params(nkv, group, hd, None);
    let w = p.n_heads * hd;
    let q = rig.rng.normals(kids.len() * w, 3.0);
    let sp = sparse_params();
    let opts = PlanOptions {
        max_group_pages: 1000,
    };
    let plan = b.plan(&rig.cache, Some(budget), &opts);
    let sel = select_pages(&q, &plan, &rig.cache.pool, LAYER, &p, &sp).expect("sparse");
    assert_eq!(plan.group_num_seqs[0], 8);
    let shared = plan.pages(0).to_vec();
    for h in 0..nkv {
        let got: BTreeSet<u32> = sel
            .pages(0, h)
            .iter()
            .map(|&j| shared[j as usize])
            .collect();
        // Each branch alone, as a one-sequence batch: its picks among the shared pages.
        let mut want = BTreeSet::new();
        for (i, &k) in kids.iter().enumerate() {
            let one = Batch {
                seqs: vec![(k, 0..1)],
                positions: vec![b.positions[i]],
            };
            let plan1 = one.plan(&rig.cache, Some(budget), &opts);
            let qi = &q[i * w..(i + 1) * w];
            let sel1 = select_pages(qi, &plan1, &rig.cache.pool, LAYER, &p, &sp).expect("sparse");
            for g in 0..plan1.num_groups() {
                let pages = plan1.pages(g);
                want.extend(
                    sel1.pages(g, h)
                        .iter()
                        .map(|&j| pages[j as usize])
                        .filter(|pg| shared.contains(pg)),
                );
            }
        }
        assert_eq!(got, want, "KV head {h}");
        // Several branches, one read: fewer than 8 × (budget + sink + local) pages.
        assert!(got.len() < 8 * (budget + 3) && got.len() > budget);
        // Every branch attends to the whole union (its own picks and its siblings') plus its
        // own private pages' picks.
        let mut out = vec![0.0f32; q.len()];
        cascade_attention(&q, &plan, &rig.cache.pool, LAYER, &p, Some(&sel), &mut out);
        let mut chained = vec![0.0f32; q.len()];
        chain_attention(
            &q,
            &plan,
            &rig.cache.pool,
            LAYER,
            &p,
            Some(&sel),
            &mut chained,
        );
        assert!(nmse(&chained, &out) < 1e-10);
        for (i, &k) in kids.iter().enumerate() {
            let table = rig.cache.table(k).expect("live").pages.clone();
            let mut pages = BTreeSet::new();
            for e in plan.row_entries(i) {
                let g = plan.group_row_indptr.partition_point(|&x| x <= *e) - 1;
                let first = plan.group_first_page[g] as usize;
                pages.extend(sel.pages(g, h).iter().map(|&j| first + j as usize));
            }
            for hq in h * group..(h + 1) * group {
                let qh = &q[i * w + hq * hd..][..hd];
                let want_o = attend_over(&rig.cache, &table, h, qh, &p, &pages, b.positions[i]);
                let e = nmse(&out[i * w + hq * hd..][..hd], &want_o);
                assert!(e < 1e-10, "branch {i} head {hq}: NMSE {e:.3e}");
            }
        }
    }
}

#[test]
fn dense_layers_select_nothing() {
    let mut rig = Rig::new(layout(1, 16, 8), 64, 4);
    let s = rig.new_seq();
    let t = rig.tokens(100);
    rig.append(s, &t);
    let mut b = Batch::default();
    b.add(&mut rig, s, 1);
    let p = params(1, 2, 16, None);
    let q = rig.rng.normals(2 * 16, 1.0);
    let plan = b.plan(&rig.cache, Some(2), &PlanOptions::default());
    let sp = SparseParams::default();
    assert_eq!(sp.dense_layers, 2);
    assert!(select_pages(&q, &plan, &rig.cache.pool, LAYER, &p, &sp).is_none());
    assert!(select_pages(&q, &plan, &rig.cache.pool, LAYER, &p, &sparse_params()).is_some());
}
