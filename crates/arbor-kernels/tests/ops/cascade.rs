//! Cascade (tree) attention against per-sequence `paged_attention` on random trees built with
//! the real `KvCache` (fork / reserve / write / commit, so shared prefixes end mid-page and are
//! copied on write as in the engine): depths 1–6, widths 1–64, GQA ratios 1/3/4/7/8, head dims
//! 64 and 128, decode rows and causal prompt chunks, sliding windows, and batches that mix
//! unrelated trees with plain sequences.

#[path = "../shared/tree_rig.rs"]
mod tree_rig;
use arbor_kernels::kv::KvDtype::{self, F16, F32};
use arbor_kernels::kv::{KvCache, KvLayout, SeqId};
use arbor_kernels::ops::cascade::{
    cascade_attention, chain_attention, CascadePlan, PlanOptions, NO_PARENT,
};
use arbor_kernels::ops::{paged_attention, AttentionParams};
pub use tree_rig::{tree, Batch, Rig};

/// The layer attention reads; layer 0 holds other data that must not leak in.
pub const LAYER: usize = 1;

/// Per-sequence `paged_attention` of every row: the reference.
pub fn per_row(q: &[f32], b: &Batch, cache: &KvCache, p: &AttentionParams) -> Vec<f32> {
    let w = p.n_heads * p.head_dim;
    let mut out = vec![0.0f32; q.len()];
    for (s, rows) in &b.seqs {
        paged_attention(
            &q[rows.start * w..rows.end * w],
            &b.positions[rows.clone()],
            &cache.pool,
            LAYER,
            cache.table(*s).expect("live"),
            p,
            &mut out[rows.start * w..rows.end * w],
        );
    }
    out
}

pub fn nmse(got: &[f32], want: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    num / den.max(f64::MIN_POSITIVE)
}

/// Checks the plan's coverage: the groups of each row's entries, root to leaf, hold exactly
/// the row's pages up to its own, in order, each once.
fn check_coverage(plan: &CascadePlan, b: &Batch, cache: &KvCache) {
    let ps = plan.page_size;
    for (s, rows) in &b.seqs {
        let table = &cache.table(*s).expect("live").pages;
        for r in rows.clone() {
            let mut got = Vec::new();
            let mut up = NO_PARENT;
            for (k, &e) in plan.row_entries(r).iter().enumerate() {
                let g = plan.group_row_indptr.partition_point(|&x| x <= e) - 1;
                // Entry k lies in a level-k group whose parent holds entry k − 1.
                let level = plan.level_indptr.partition_point(|&x| x as usize <= g) - 1;
                assert_eq!((level, plan.group_parent[g]), (k, up), "row {r}: levels");
                up = g as u32;
                assert_eq!(
                    plan.group_first_page[g] as usize,
                    got.len(),
                    "row {r}: gap or overlap"
                );
                got.extend_from_slice(plan.pages(g));
            }
            let need = b.positions[r] / ps + 1;
            assert!(got.len() >= need, "row {r}: pages missing");
            assert!(got.len() <= table.len(), "row {r}: pages past its table");
            assert_eq!(&got[..need], &table[..need], "row {r}: wrong pages");
        }
    }
}

/// One random batch over `trees` trees plus `plain` unrelated sequences; returns the worst
/// NMSE of cascade vs per-row attention.
#[allow(clippy::too_many_arguments)]
fn case(
    seed: u64,
    ps: usize,
    nkv: usize,
    group: usize,
    hd: usize,
    depth: usize,
    width: usize,
    window: Option<usize>,
    chunk: usize,
    trees: usize,
    plain: usize,
    dtype: KvDtype,
) -> f64 {
    let layout = KvLayout {
        num_layers: 2,
        num_kv_heads: nkv,
        head_dim: hd,
        page_size: ps,
    };
    let mut rig = Rig::with_dtype(layout, 4096, seed, dtype);
    let mut members = Vec::new();
    for _ in 0..trees {
        let root_len = 1 + rig.rng.below(6 * ps);
        let (all, leaves) = tree(&mut rig, root_len, depth, width, 3 * ps / 2);
        // Leaves always step; some inner sequences too (a parent still decoding).
        let first_leaf = all.len() - leaves;
        for (i, &s) in all.iter().enumerate() {
            if i >= first_leaf || rig.rng.below(4) == 0 {
                members.push(s);
            }
        }
    }
    for _ in 0..plain {
        let s = rig.new_seq();
        let n = 1 + rig.rng.below(5 * ps);
        let t = rig.tokens(n);
        rig.append(s, &t);
        members.push(s);
    }
    let mut b = Batch::default();
    for &s in &members {
        let n = if chunk > 1 {
            1 + rig.rng.below(chunk)
        } else {
            1
        };
        b.add(&mut rig, s, n);
    }
    let nh = nkv * group;
    let p = AttentionParams {
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: hd,
        scale: 1.0 / (hd as f32).sqrt(),
        sliding_window: window,
    };
    let q = rig.rng.normals(b.positions.len() * nh * hd, 2.0);
    let want = per_row(&q, &b, &rig.cache, &p);
    // Small groups too, so that split runs (several groups with the same rows) are covered.
    let mut worst = 0.0f64;
    for max_group_pages in [64, 3] {
        let plan = b.plan(&rig.cache, None, &PlanOptions { max_group_pages });
        check_coverage(&plan, &b, &rig.cache);
        let mut got = vec![f32::NAN; q.len()];
        cascade_attention(&q, &plan, &rig.cache.pool, LAYER, &p, None, &mut got);
        let e = nmse(&got, &want);
        // State passing does what per-row attention does, in the same order: bit for bit.
        let mut chained = vec![f32::NAN; q.len()];
        chain_attention(&q, &plan, &rig.cache.pool, LAYER, &p, None, &mut chained);
        let differ = chained
            .iter()
            .zip(&want)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(
            differ, 0,
            "seed {seed}: chain attention differs from per-row attention"
        );
        let deepest = (0..plan.num_rows())
            .map(|r| plan.row_entries(r).len())
            .max();
        let shared = plan.group_num_seqs.iter().filter(|&&n| n > 1).count();
        STATS.with(|st| {
            let mut st = st.borrow_mut();
            st.0 += shared;
            st.1 = st.1.max(deepest.unwrap_or(0));
        });
        assert!(
            e < 1e-10,
            "seed {seed} ps {ps} kv {nkv}×{group} hd {hd} depth {depth} width {width} window {window:?}: NMSE {e:.3e}"
        );
        worst = worst.max(e);
    }
    rig.cache.check().expect("cache invariants");
    worst
}

thread_local! {
    /// (shared groups seen, most entries of one row) over the cases run on this thread.
    static STATS: std::cell::RefCell<(usize, usize)> = const { std::cell::RefCell::new((0, 0)) };
}

#[test]
fn cascade_equals_per_row_attention_on_random_trees() {
    let mut worst = 0.0f64;
    let mut n = 0;
    let groups = [1, 3, 4, 7, 8];
    let widths = [1, 2, 5, 16, 64];
    for depth in 1..=6usize {
        for (i, &width) in widths.iter().enumerate() {
            let seed = (depth * 10 + i) as u64;
            let group = groups[(depth + i) % 5];
            let hd = [64, 128][(depth + i) % 2];
            let ps = [16, 8][i % 2];
            let nkv = 1 + (depth + 2 * i) % 2;
            let window = [None, None, Some(37), None, Some(200)][(depth * 3 + i) % 5];
            let chunk = [1, 1, 4][(depth + i) % 3];
            let (trees, plain) = [(1, 0), (2, 3), (1, 2)][(depth + 2 * i) % 3];
            // Keep the widest deep trees in the seconds range.
            let width = if depth >= 4 { width.min(16) } else { width };
            let e = case(
                seed, ps, nkv, group, hd, depth, width, window, chunk, trees, plain, F32,
            );
            worst = worst.max(e);
            n += 1;
        }
    }
    let (shared, deepest) = STATS.with(|st| *st.borrow());
    println!(
        "cascade vs per-row attention: {n} random batches, worst NMSE {worst:.3e} \
         ({shared} shared groups, up to {deepest} partials per row)"
    );
    // The trees must really share pages at several levels for the test to mean anything.
    assert!(
        shared >= 50 && deepest >= 6,
        "{shared} shared groups, {deepest} levels"
    );
}

#[test]
fn wide_and_deep_trees_with_every_gqa_ratio() {
    let mut worst = 0.0f64;
    for (i, &group) in [1, 3, 4, 7, 8].iter().enumerate() {
        // 64 branches of one prompt (best-of-N), then a deep uneven beam-like tree.
        worst = worst.max(case(
            100 + i as u64,
            16,
            2,
            group,
            64,
            1,
            64,
            None,
            1,
            1,
            1,
            F32,
        ));
        worst = worst.max(case(
            200 + i as u64,
            16,
            1,
            group,
            128,
            6,
            8,
            None,
            3,
            2,
            2,
            F32,
        ));
    }
    println!("wide/deep trees: worst NMSE {worst:.3e}");
}

/// f16 pages (`--kv-dtype f16`): cascade and chain attention read them as paged attention
/// does (the same conversion of the same stored values): chain bit for bit, cascade within
/// rounding of the merge.
#[test]
fn f16_pages_cascade_equals_per_row_attention() {
    let mut worst = 0.0f64;
    for (i, &group) in [1, 3, 8].iter().enumerate() {
        let s = 300 + i as u64;
        worst = worst.max(case(s, 16, 2, group, 64, 1, 16, None, 1, 1, 1, F16));
        worst = worst.max(case(s + 10, 8, 1, group, 128, 4, 4, Some(37), 3, 2, 1, F16));
    }
    println!("f16 pages: worst NMSE {worst:.3e}");
}

#[test]
fn plan_of_a_two_level_tree_reads_the_prompt_once() {
    // A 100-token prompt (6 full pages + 4 slots at page size 16) forked 8 ways; each branch
    // decodes one token, so it copies the partial page on write.
    let layout = KvLayout {
        num_layers: 2,
        num_kv_heads: 1,
        head_dim: 8,
        page_size: 16,
    };
    let mut rig = Rig::new(layout, 64, 5);
    let root = rig.new_seq();
    let t = rig.tokens(100);
    rig.append(root, &t);
    let kids: Vec<SeqId> = (0..8).map(|_| rig.fork(root)).collect();
    let mut b = Batch::default();
    for &k in &kids {
        b.add(&mut rig, k, 1);
    }
    let plan = b.plan(&rig.cache, None, &PlanOptions::default());
    // One shared group of the 6 full pages, then 8 private one-page groups.
    assert_eq!(plan.num_groups(), 9);
    assert_eq!(plan.pages(0).len(), 6);
    assert_eq!(plan.group_num_seqs[0], 8);
    assert_eq!(plan.pages_read(), 6 + 8);
    assert!(plan.has_sharing() && !plan.has_sparse());
    for r in 0..8 {
        assert_eq!(plan.row_entries(r).len(), 2);
    }
}
