//! GPU cascade (tree) attention against per-sequence CPU `paged_attention`, on trees built with
//! the real `KvCache` (fork / reserve / write / commit: shared prefixes end mid-page and are
//! copied on write, as in the engine). K/V are written already rounded to bf16, so the host
//! pool and the device pool (copied from it) hold the same values; layer 1 of 2 is read.
//! The output is bf16: checked against the f32 reference (rounding bound) and against the
//! reference rounded to bf16.

use crate::common;
use crate::ops_common::*;
use arbor_kernels::cuda::kv::summary_elems_per_page;
use arbor_kernels::cuda::ops::cascade::{cascade_attention, GpuCascadePlan};
use arbor_kernels::cuda::ops::sparse::{summarise_pages, GpuSparsePlan};
use arbor_kernels::cuda::{Gpu, GpuError, GpuKvPool};
#[path = "../shared/tree_rig.rs"]
pub(crate) mod tree_rig;
use arbor_kernels::kv::{KvCache, KvLayout};
use arbor_kernels::ops::cascade::{
    cascade_attention as cpu_cascade, mark_index, select_pages, CascadePlan, PageSelection,
    PlanOptions, PlanSeq, SparseParams,
};
use arbor_kernels::ops::{paged_attention, AttentionParams};
use half::bf16;
use tree_rig::{tree, Batch, Rig};

pub(crate) const LAYER: usize = 1;

/// Bound against the bf16-rounded reference (as ATTENTION_ROUNDED in ops_attention.rs: the
/// split softmax and its merge change f32 results by ~1e-6 relative, flipping a few roundings).
const CASCADE_ROUNDED: f64 = 1e-6;

/// The device pool: the host pool's pages, as bf16 (exact: they were written rounded).
fn device_pool(gpu: &Gpu, cache: &KvCache) -> GpuKvPool {
    let (l, n) = (cache.layout(), cache.pool.num_pages);
    let mut host = vec![bf16::ZERO; l.num_layers * n * l.page_elems_per_layer()];
    let stride = l.page_size * l.head_dim;
    let dev = GpuKvPool {
        layout: l,
        num_pages: n,
        data: up(gpu, &[bf16::ZERO]),
        summaries: up(gpu, &[bf16::ZERO]),
    };
    for layer in 0..l.num_layers {
        for page in 0..n {
            for h in 0..l.num_kv_heads {
                let k = cache.pool.keys(layer, page as u32, h);
                let v = cache.pool.values(layer, page as u32, h);
                let ko = dev.offset(layer, page, 0, h, 0);
                let vo = dev.offset(layer, page, 1, h, 0);
                host[ko..ko + stride].copy_from_slice(&to_bf16(k));
                host[vo..vo + stride].copy_from_slice(&to_bf16(v));
            }
        }
    }
    let summaries = vec![bf16::ZERO; l.num_layers * n * summary_elems_per_page(&l)];
    let mut dev = GpuKvPool {
        data: up(gpu, &host),
        summaries: up(gpu, &summaries),
        ..dev
    };
    // Summaries of what each page holds (every layer is written alike).
    let filled: Vec<(u32, u32)> = (0..n as u32)
        .map(|page| (page, cache.pool.summaries().filled(0, page) as u32))
        .collect();
    summarise_pages(gpu, &mut dev, &filled).expect("summaries");
    dev
}

/// Runs the GPU cascade for `b` over `rig`'s cache (with two group sizes, so split runs are
/// covered) and checks it against per-sequence CPU attention.
fn check_batch(gpu: &Gpu, name: &str, rig: &mut Rig, b: &Batch, p: &AttentionParams) {
    let w = p.n_heads * p.head_dim;
    let rows = b.positions.len();
    let q = rig.rng.normals(rows * w, 2.0);
    let mut want = vec![0.0f32; q.len()];
    for (s, r) in &b.seqs {
        paged_attention(
            &q[r.start * w..r.end * w],
            &b.positions[r.clone()],
            &rig.cache.pool,
            LAYER,
            rig.cache.table(*s).expect("live"),
            p,
            &mut want[r.start * w..r.end * w],
        );
    }
    let pool = device_pool(gpu, &rig.cache);
    // Each plan after the first reuses the previous one's buffers (as the engine's steps do):
    // 64 → 3 cuts more groups (bigger arrays), 3 → 64 fits in what is there (the same epoch,
    // as a CUDA graph needs). The second is padded by 5 rows, as for a graph
    // bucket: padding rows come out as zeros.
    const PAD: usize = 5;
    let mut qp = q.clone();
    qp.resize((rows + PAD) * w, 0.5);
    let dq = up(gpu, &qp);
    let mut prev: Option<GpuCascadePlan> = None;
    let mut epochs = vec![];
    for (max_group_pages, pad) in [(64, 0), (3, PAD), (64, 0)] {
        let plan = b.plan(&rig.cache, None, &PlanOptions { max_group_pages });
        let shared = plan.group_num_seqs.iter().filter(|&&n| n > 1).count();
        let n = rows + pad;
        let gplan = GpuCascadePlan::upload_reusing(gpu, &plan, n, prev.take()).expect("upload");
        epochs.push(gplan.epoch());
        let mut out = zeros::<bf16>(gpu, n * w);
        cascade_attention(gpu, &dq, n, &gplan, &pool, LAYER, p, None, &mut out).expect("cascade");
        let got = down_bf16(gpu, &out, n * w);
        check_bf16_with(
            &format!(
                "{name} (max_group_pages {max_group_pages}: {} groups, {shared} shared, {rows} rows)",
                plan.num_groups()
            ),
            &got[..rows * w],
            &want,
            CASCADE_ROUNDED,
        );
        assert!(
            got[rows * w..].iter().all(|&x| x == 0.0),
            "{name}: padding rows"
        );
        prev = Some(gplan);
    }
    assert_eq!(
        epochs[1], epochs[2],
        "{name}: a plan that fits keeps the epoch"
    );
}

pub(crate) fn params(
    nkv: usize,
    group: usize,
    hd: usize,
    window: Option<usize>,
) -> AttentionParams {
    AttentionParams {
        n_heads: nkv * group,
        n_kv_heads: nkv,
        head_dim: hd,
        scale: 1.0 / (hd as f32).sqrt(),
        sliding_window: window,
    }
}

pub(crate) fn layout(nkv: usize, hd: usize, ps: usize) -> KvLayout {
    KvLayout {
        num_layers: 2,
        num_kv_heads: nkv,
        head_dim: hd,
        page_size: ps,
    }
}

#[test]
fn cascade_two_levels_shared_prompt_and_16_suffixes() {
    let Some(gpu) = common::gpu() else { return };
    for (i, &(nkv, group, hd)) in [(2, 1, 64), (2, 4, 128), (1, 7, 64), (2, 7, 128)]
        .iter()
        .enumerate()
    {
        let mut rig = Rig::bf16(layout(nkv, hd, 16), 1024, 10 + i as u64);
        // A 300-token prompt (ends mid-page), 16 branches with private suffixes of 0..40
        // tokens; each decodes one token, some a chunk of 3.
        let root = rig.new_seq();
        {
            let t = rig.tokens(300);
            rig.append(root, &t);
        }
        let mut b = Batch::default();
        for k in 0..16 {
            let c = rig.fork(root);
            let n = rig.rng.below(41);
            {
                let t = rig.tokens(n);
                rig.append(c, &t);
            }
            b.add(&mut rig, c, if k % 5 == 0 { 3 } else { 1 });
        }
        let p = params(nkv, group, hd, None);
        check_batch(
            &gpu,
            &format!("two levels kv {nkv}×{group} hd {hd}"),
            &mut rig,
            &b,
            &p,
        );
    }
}

#[test]
fn cascade_deep_uneven_trees_with_gqa_1_4_7() {
    let Some(gpu) = common::gpu() else { return };
    let mut case = 0u64;
    for &group in &[1, 4, 7] {
        for &hd in &[64, 128] {
            for &ps in &[16, 8] {
                case += 1;
                let nkv = 1 + (case as usize % 2);
                let mut rig = Rig::bf16(layout(nkv, hd, ps), 4096, 100 + case);
                let root_len = 1 + rig.rng.below(6 * ps);
                let (all, leaves) = tree(&mut rig, root_len, 4, 8, 3 * ps / 2);
                let first_leaf = all.len() - leaves;
                let mut b = Batch::default();
                for (i, &s) in all.iter().enumerate() {
                    // Leaves always step (one row or a chunk); some inner sequences too.
                    if i >= first_leaf {
                        let n = 1 + rig.rng.below(3);
                        b.add(&mut rig, s, n);
                    } else if rig.rng.below(4) == 0 {
                        b.add(&mut rig, s, 1);
                    }
                }
                let window = case.is_multiple_of(3).then_some(37);
                let p = params(nkv, group, hd, window);
                check_batch(
                    &gpu,
                    &format!("depth-4 tree kv {nkv}×{group} hd {hd} ps {ps} window {window:?}"),
                    &mut rig,
                    &b,
                    &p,
                );
            }
        }
    }
}

#[test]
fn cascade_mixed_batch_with_plain_sequences() {
    let Some(gpu) = common::gpu() else { return };
    for (i, &(group, hd)) in [(4, 128), (7, 64), (1, 64)].iter().enumerate() {
        let mut rig = Rig::bf16(layout(2, hd, 16), 4096, 300 + i as u64);
        let mut b = Batch::default();
        // A plain sequence first, a tree, another plain one prefilling a 40-row chunk.
        let s = rig.new_seq();
        {
            let t = rig.tokens(77);
            rig.append(s, &t);
        }
        b.add(&mut rig, s, 1);
        let (all, leaves) = tree(&mut rig, 53, 2, 6, 20);
        for &leaf in &all[all.len() - leaves..] {
            b.add(&mut rig, leaf, 1);
        }
        let s = rig.new_seq();
        {
            let t = rig.tokens(9);
            rig.append(s, &t);
        }
        b.add(&mut rig, s, 40);
        let p = params(2, group, hd, None);
        check_batch(
            &gpu,
            &format!("mixed batch kv 2×{group} hd {hd}"),
            &mut rig,
            &b,
            &p,
        );
    }
}

/// One layer's sparse decode step for the selection tests (GPU and emulator): a tree from the
/// real KV cache, every leaf one sparse row with `budget` pages, random queries, and the
/// CPU's selection.
pub(crate) struct SparseCase {
    pub rig: Rig,
    pub plan: CascadePlan,
    pub p: AttentionParams,
    pub sp: SparseParams,
    pub q: Vec<f32>,
    pub sel: PageSelection,
}

/// A [`SparseCase`]: `pages` pool pages, a tree of `depth` levels and `width` (see
/// `tree_rig::tree`) below a 300-token root.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sparse_case(
    seed: u64,
    nkv: usize,
    group: usize,
    hd: usize,
    budget: usize,
    pages: usize,
    depth: usize,
    width: usize,
) -> SparseCase {
    let sp = SparseParams {
        dense_layers: 0,
        ..SparseParams::default()
    };
    let mut rig = Rig::bf16(layout(nkv, hd, 16), pages, seed);
    let mut b = Batch::default();
    let (all, leaves) = tree(&mut rig, 300, depth, width, 40);
    for &s in &all[all.len() - leaves..] {
        b.add(&mut rig, s, 1);
    }
    let p = params(nkv, group, hd, None);
    let plan = b.plan(&rig.cache, Some(budget), &PlanOptions::default());
    let q = rig.rng.normals(b.positions.len() * p.n_heads * hd, 3.0);
    let sel = select_pages(&q, &plan, &rig.cache.pool, LAYER, &p, &sp).expect("sparse");
    SparseCase {
        rig,
        plan,
        p,
        sp,
        q,
        sel,
    }
}

impl SparseCase {
    /// Checks that `marks` (one byte per group page and KV head) name exactly the CPU's
    /// pages; returns (page reads kept, page reads of the dense step).
    pub fn check_marks(&self, marks: &[u8], label: &str) -> (usize, usize) {
        let nkv = self.p.n_kv_heads;
        let (mut kept, mut total) = (0, 0);
        for g in 0..self.plan.num_groups() {
            for h in 0..nkv {
                let got: Vec<u32> = (0..self.plan.pages(g).len())
                    .filter(|&j| marks[mark_index(&self.plan, nkv, g, h, j)] == 1)
                    .map(|j| j as u32)
                    .collect();
                assert_eq!(got, self.sel.pages(g, h), "{label}: group {g}, KV head {h}");
                kept += got.len();
                total += self.plan.pages(g).len();
            }
        }
        (kept, total)
    }
}

/// Sparse cascade: the GPU selection marks exactly the pages the CPU's `select_pages` picks
/// (same summaries from the same bf16 keys, same bound, same tie rule), and the GPU cascade
/// over them matches the CPU's sparse cascade.
#[test]
fn sparse_selection_and_attention_match_the_cpu() {
    let Some(gpu) = common::gpu() else { return };
    for (seed, nkv, group, hd, budget) in [(1, 2, 3, 64, 3), (2, 1, 7, 128, 1), (3, 4, 1, 64, 6)] {
        let c = sparse_case(seed, nkv, group, hd, budget, 2048, 3, 5);
        let (rig, plan, p, sp, q, sel) = (&c.rig, &c.plan, &c.p, &c.sp, &c.q, &c.sel);
        let rows = plan.num_rows();
        let mut want = vec![0.0f32; q.len()];
        cpu_cascade(q, plan, &rig.cache.pool, LAYER, p, Some(sel), &mut want);

        let pool = device_pool(&gpu, &rig.cache);
        let gplan = GpuCascadePlan::upload(&gpu, plan).expect("upload");
        let mut gsp = GpuSparsePlan::upload(&gpu, plan, p, sp)
            .expect("upload")
            .expect("sparse rows");
        let dq = up(&gpu, q);
        let marks = (gsp.select(&gpu, &dq, &pool, LAYER, p))
            .expect("select")
            .expect("a sparse layer");
        c.check_marks(&down(&gpu, marks, marks.len()), &format!("seed {seed}"));
        let mut out = zeros::<bf16>(&gpu, q.len());
        cascade_attention(
            &gpu,
            &dq,
            rows,
            &gplan,
            &pool,
            LAYER,
            p,
            Some(marks),
            &mut out,
        )
        .expect("cascade");
        let got = down_bf16(&gpu, &out, q.len());
        check_bf16_with(
            &format!("sparse seed {seed} (budget {budget}, {rows} rows)"),
            &got,
            &want,
            CASCADE_ROUNDED,
        );
        // Marks shorter than the plan's pages × KV heads are refused.
        let short = zeros::<u8>(&gpu, 1);
        let e = cascade_attention(
            &gpu,
            &dq,
            rows,
            &gplan,
            &pool,
            LAYER,
            p,
            Some(&short),
            &mut out,
        );
        assert!(matches!(e, Err(GpuError::Invalid(_))), "{e:?}");
    }
}

#[test]
fn cascade_takes_sparse_plans_and_rejects_bad_shapes() {
    let Some(gpu) = common::gpu() else { return };
    let mut rig = Rig::bf16(layout(1, 64, 16), 64, 7);
    let s = rig.new_seq();
    {
        let t = rig.tokens(20);
        rig.append(s, &t);
    }
    let mut b = Batch::default();
    b.add(&mut rig, s, 1);
    let tbl = rig.cache.table(s).expect("live").pages.clone();
    let seqs = [PlanSeq {
        pages: &tbl,
        rows: 0..1,
        sparse_budget: Some(1),
    }];
    let sparse =
        CascadePlan::build(&seqs, &b.positions, 16, &PlanOptions::default()).expect("plan");
    assert!(GpuCascadePlan::upload(&gpu, &sparse).is_ok());
    let plan = b.plan(&rig.cache, None, &PlanOptions::default());
    let gplan = GpuCascadePlan::upload(&gpu, &plan).expect("upload");
    let pool = device_pool(&gpu, &rig.cache);
    let p = params(1, 2, 64, None);
    let q = zeros::<f32>(&gpu, 128);
    let mut out = zeros::<bf16>(&gpu, 128);
    // Two rows asked of a one-row plan; a short q.
    let e = cascade_attention(&gpu, &q, 2, &gplan, &pool, LAYER, &p, None, &mut out);
    assert!(matches!(e, Err(GpuError::Invalid(_))), "{e:?}");
    let short = zeros::<f32>(&gpu, 64);
    let e = cascade_attention(&gpu, &short, 1, &gplan, &pool, LAYER, &p, None, &mut out);
    assert!(matches!(e, Err(GpuError::Invalid(_))), "{e:?}");
}
