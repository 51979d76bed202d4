//! `arbor bench attention`: tree (cascade) attention against per-row paged attention on
//! synthetic trees in one layer's KV pool, the microbenchmark of the tree-attention issue.
//!
//! Cells: B branches below a P-token shared prefix, each level below the prefix adding an
//! S-token run. `--levels 2` is the flat tree (B branches straight off the prefix, each with
//! S private tokens); `--levels 4` a beam-like tree (⌈B^⅓⌉, then ⌈B^⅔⌉, then B nodes per
//! level, parents spread evenly, S tokens each). One decode row per branch, at its last
//! position. K/V are random; a run that starts mid-page gets its own copy of that page
//! (copy-on-write, as the engine does).
//!
//! Per cell the cascade plan is built once (as the engine does per step; not timed), then
//! cascade attention and the paged kernel over every row's own block table are timed (median
//! of `--reps` after a warm-up), and one JSON line is printed: the times and speedup; the KV
//! bytes each kernel loads (positions loaded × K and V × KV heads × head_dim × element bytes:
//! what the kernel asks of memory, before caches serve repeats); the unique KV bytes (every
//! token of the tree once); the cascade's effective bandwidth over those unique bytes; and the
//! device's copy bandwidth (bytes read + written per second by a `--copy-mib` copy timed in
//! the same run), so `frac_of_copy_bw` tells how near the kernel comes to reading each unique
//! byte once at full speed. `max_abs_diff` compares the two kernels' outputs.
//!
//! With `--sparse-budget N`, each cell also times sparse attention with every row reading at
//! most N pages (besides its sink and local ones): the page selection plus cascade over the
//! chosen pages, reported beside dense cascade as `sparse_ms`, `sparse_speedup`, the fraction
//! of (group page, KV head) reads kept, and the output's distance from dense.
//!
//! On the CPU the CPU kernels run (f32 KV; meant for small sizes); on a GPU the CUDA kernels
//! (bf16 KV), timed with CUDA events. `scripts/bench_peers.py --sdpa-tree` times torch SDPA
//! attending per branch on the same cells.

use super::grid::numbers;
use anyhow::{bail, Context};
use arbor_kernels::kv::{BlockTable, KvDtype, KvLayout, KvPool, PageId};
use arbor_kernels::ops::cascade::{self, CascadePlan, PlanOptions, PlanSeq, SparseParams};
use arbor_kernels::ops::{paged_attention, AttentionParams};
use arbor_kernels::Device;
use clap::Args;
use rayon::prelude::*;
use std::time::Instant;

/// Most KV bytes a CPU cell may hold (the CPU path is for small sizes).
const CPU_MAX_KV_BYTES: usize = 8 << 30;

#[derive(Args, Debug)]
pub struct AttentionArgs {
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// Branches B (one decode row each), comma-separated.
    #[arg(long, default_value = "16,64,256")]
    pub branches: String,
    /// Shared prefix lengths P in tokens, comma-separated.
    #[arg(long, default_value = "1024,8192,32768")]
    pub prefix: String,
    /// Tokens S each level below the prefix adds (a branch's private suffix in a flat tree),
    /// comma-separated.
    #[arg(long, default_value = "64,1024")]
    pub suffix: String,
    /// Tree depths, comma-separated: 2 is flat (B branches off the prefix), 4 beam-like.
    #[arg(long, default_value = "2,4")]
    pub levels: String,
    /// Query heads.
    #[arg(long, default_value_t = 32)]
    pub heads: usize,
    /// KV heads (must divide --heads).
    #[arg(long, default_value_t = 8)]
    pub kv_heads: usize,
    /// Dimensions per head (a multiple of 8; the GPU kernels take 32, 64, 96, 128 and 256).
    #[arg(long, default_value_t = 128)]
    pub head_dim: usize,
    /// Token positions per KV page (8, 16 or 32).
    #[arg(long, default_value_t = 16)]
    pub page_size: usize,
    /// Most pages of one cascade group: longer shared runs are split so that they spread over
    /// blocks (threads on the CPU); the engine uses 64.
    #[arg(long, default_value_t = 64)]
    pub group_pages: usize,
    /// Timed repetitions of each kernel per cell (the median is reported).
    #[arg(long, default_value_t = 10)]
    pub reps: usize,
    /// MiB copied to measure the device's copy bandwidth (once per run).
    #[arg(long, default_value_t = 256)]
    pub copy_mib: usize,
    /// Seed of the random K/V and queries.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also time sparse attention with this many pages per row (0: off), beside dense
    /// cascade: the page selection plus cascade over the chosen pages.
    #[arg(long, default_value_t = 0)]
    pub sparse_budget: usize,
    /// K/V element type of the CPU pool: f32 or f16 (the GPU's is bf16).
    #[arg(long, default_value = "f32", value_parser = crate::cli::model::parse_kv_dtype)]
    pub kv_dtype: KvDtype,
}

impl AttentionArgs {
    /// The one-layer KV layout of the benchmark's pool (CPU and GPU alike).
    fn kv_layout(&self) -> KvLayout {
        KvLayout {
            num_layers: 1,
            num_kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            page_size: self.page_size,
        }
    }
}

/// The sparse settings of the benchmark: one layer, sparse (no dense layers).
fn sparse_params() -> SparseParams {
    SparseParams {
        dense_layers: 0,
        ..SparseParams::default()
    }
}

/// One cell of the grid.
#[derive(Clone, Copy, Debug)]
struct Cell {
    b: usize,
    p: usize,
    s: usize,
    levels: usize,
}

/// A synthetic tree's block tables and decode rows.
struct Tree {
    /// Block table of each branch (leaf), covering its row's position.
    tables: Vec<Vec<PageId>>,
    /// Position of each branch's decode row (its last token).
    positions: Vec<usize>,
    /// Pages allocated (ids `0..pages`).
    pages: usize,
    /// Tokens of the tree, each counted once.
    unique_tokens: usize,
}

/// Nodes per level: 1 (the prefix), then ⌈B^(k/(L−1))⌉ for the levels between, B at the last.
fn level_sizes(b: usize, levels: usize) -> Vec<usize> {
    let mut v = vec![1];
    for k in 1..levels {
        let n = if k == levels - 1 {
            b
        } else {
            // A hair below the power, so exact roots (64^⅓ = 4) do not round up.
            ((b as f64).powf(k as f64 / (levels - 1) as f64) - 1e-9).ceil() as usize
        };
        v.push(n.clamp(1, b));
    }
    v
}

impl Tree {
    fn build(c: Cell, page_size: usize) -> Tree {
        let mut next: PageId = 0;
        // A node's table: its parent's pages up to the page it starts in, a copy of that page
        // if it starts mid-page, then fresh pages.
        let mut node = |parent: &[PageId], start: usize, len: usize| -> Vec<PageId> {
            let (first, last) = (start / page_size, (start + len - 1) / page_size);
            let mut t = parent[..first].to_vec();
            for _ in first..=last {
                t.push(next);
                next += 1;
            }
            t
        };
        let sizes = level_sizes(c.b, c.levels);
        let mut level = vec![(node(&[], 0, c.p), c.p)];
        for w in sizes.windows(2) {
            let (m, n) = (w[0], w[1]);
            level = (0..n)
                .map(|i| {
                    let (t, end) = &level[i * m / n];
                    (node(t, *end, c.s), end + c.s)
                })
                .collect();
        }
        Tree {
            positions: level.iter().map(|(_, end)| end - 1).collect(),
            tables: level.into_iter().map(|(t, _)| t).collect(),
            pages: next as usize,
            unique_tokens: c.p + sizes[1..].iter().sum::<usize>() * c.s,
        }
    }

    /// The cascade plan of the tree's rows, each with `budget` sparse pages (`None`: dense).
    fn plan(
        &self,
        page_size: usize,
        group_pages: usize,
        budget: Option<usize>,
    ) -> anyhow::Result<CascadePlan> {
        let seqs: Vec<PlanSeq> = self
            .tables
            .iter()
            .enumerate()
            .map(|(i, t)| PlanSeq {
                pages: t,
                rows: i..i + 1,
                sparse_budget: budget,
            })
            .collect();
        let opts = PlanOptions {
            max_group_pages: group_pages,
        };
        Ok(CascadePlan::build(
            &seqs,
            &self.positions,
            page_size,
            &opts,
        )?)
    }
}

/// Positions the cascade kernel loads per KV head: for every task of `task_rows` entries of a
/// group and every pass of `pass_rows` of them, the span of the group those rows read.
fn cascade_positions(plan: &CascadePlan, task_rows: usize, pass_rows: usize) -> u64 {
    let ps = plan.page_size;
    let mut total = 0u64;
    for g in 0..plan.num_groups() {
        let lo = plan.group_first_page[g] as usize * ps;
        let hi = lo + plan.pages(g).len() * ps;
        let rows = &plan.group_rows[plan.entries(g)];
        for task in rows.chunks(task_rows.max(1)) {
            for pass in task.chunks(pass_rows.max(1)) {
                let end = pass
                    .iter()
                    .map(|&r| (plan.row_pos[r as usize] as usize + 1).min(hi))
                    .max()
                    .unwrap_or(lo);
                total += end.saturating_sub(lo) as u64;
            }
        }
    }
    total
}

/// What one cell measured.
struct Timing {
    cascade_ms: f64,
    paged_ms: f64,
    max_abs_diff: f64,
    /// Positions loaded per KV head by the cascade kernel (see [`cascade_positions`]).
    cascade_positions: u64,
    sparse: Option<SparseTiming>,
}

/// Sparse attention in one cell: selection plus cascade over the chosen pages.
struct SparseTiming {
    ms: f64,
    /// The page selection alone.
    select_ms: f64,
    /// (group page, KV head) reads kept, and all there are.
    marked: usize,
    total: usize,
    /// Largest difference from the dense cascade's output.
    max_abs_diff: f64,
}

/// Median of `v` (non-empty).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A small deterministic generator (xorshift*) for K/V and queries.
struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// Uniform in [−1, 1).
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
        x as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

/// Runs the grid and prints one JSON line per cell.
pub fn bench(a: AttentionArgs) -> anyhow::Result<()> {
    let branches = numbers("--branches", &a.branches)?;
    let prefixes = numbers("--prefix", &a.prefix)?;
    let suffixes = numbers("--suffix", &a.suffix)?;
    let levels = numbers("--levels", &a.levels)?;
    if levels.iter().any(|&l| l < 2) {
        bail!("--levels: a tree has at least 2 levels (the prefix and the branches)");
    }
    if a.kv_heads == 0 || !a.heads.is_multiple_of(a.kv_heads) {
        bail!("--kv-heads {} must divide --heads {}", a.kv_heads, a.heads);
    }
    if a.head_dim == 0 || !a.head_dim.is_multiple_of(8) {
        bail!("--head-dim must be a positive multiple of 8");
    }
    if ![8, 16, 32].contains(&a.page_size) {
        bail!("--page-size must be 8, 16 or 32");
    }
    if a.group_pages == 0 || a.reps == 0 || a.copy_mib == 0 {
        bail!("--group-pages, --reps and --copy-mib must be at least 1");
    }
    let p = AttentionParams {
        n_heads: a.heads,
        n_kv_heads: a.kv_heads,
        head_dim: a.head_dim,
        scale: 1.0 / (a.head_dim as f32).sqrt(),
        sliding_window: None,
    };
    let mut cells = Vec::new();
    for &l in &levels {
        for &b in &branches {
            for &pre in &prefixes {
                for &s in &suffixes {
                    cells.push(Cell {
                        b,
                        p: pre,
                        s,
                        levels: l,
                    });
                }
            }
        }
    }
    let mut dev = Backend::open(a.device, a.copy_mib, a.reps, a.kv_dtype)?;
    eprintln!(
        "{}: copy bandwidth {:.1} GB/s (read + write, {} MiB); {} cells",
        dev.describe(),
        dev.copy_bw_gbs(),
        a.copy_mib,
        cells.len()
    );
    for (i, &c) in cells.iter().enumerate() {
        let tree = Tree::build(c, a.page_size);
        let plan = tree.plan(a.page_size, a.group_pages, None)?;
        let sparse = match a.sparse_budget {
            0 => None,
            n => Some(tree.plan(a.page_size, a.group_pages, Some(n))?),
        };
        let seed = a.seed.wrapping_add(i as u64);
        let t = dev
            .run(&tree, &plan, sparse.as_ref(), &p, &a, seed)
            .with_context(|| format!("cell B={} P={} S={} levels={}", c.b, c.p, c.s, c.levels))?;
        let rec = record(&a, c, &tree, &plan, &t, &dev);
        eprintln!(
            "B={} P={} S={} levels={}: cascade {:.3} ms, paged {:.3} ms ({:.2}×), {:.0}% of copy bandwidth",
            c.b,
            c.p,
            c.s,
            c.levels,
            t.cascade_ms,
            t.paged_ms,
            t.paged_ms / t.cascade_ms,
            100.0 * rec["frac_of_copy_bw"].as_f64().unwrap_or(0.0)
        );
        if let Some(sp) = &t.sparse {
            eprintln!(
                "  sparse budget {}: {:.3} ms (selection {:.3} ms; {:.2}× dense cascade), {:.1}% of page reads",
                a.sparse_budget,
                sp.ms,
                sp.select_ms,
                t.cascade_ms / sp.ms,
                100.0 * sp.marked as f64 / sp.total.max(1) as f64
            );
        }
        println!("{rec}");
    }
    Ok(())
}

/// The JSON record of one cell.
fn record(
    a: &AttentionArgs,
    c: Cell,
    tree: &Tree,
    plan: &CascadePlan,
    t: &Timing,
    dev: &Backend,
) -> serde_json::Value {
    // Bytes of K and V of one position over every KV head.
    let per_pos = (2 * a.kv_heads * a.head_dim * dev.elem_bytes()) as u64;
    let paged_positions: u64 = tree.positions.iter().map(|&p| p as u64 + 1).sum();
    let unique = tree.unique_tokens as u64 * per_pos;
    let unique_bw = unique as f64 / (t.cascade_ms * 1e-3) / 1e9;
    let sp = t.sparse.as_ref();
    serde_json::json!({
        "sparse_budget": sp.map(|_| a.sparse_budget),
        "sparse_ms": sp.map(|s| s.ms),
        "sparse_select_ms": sp.map(|s| s.select_ms),
        "sparse_speedup": sp.map(|s| t.cascade_ms / s.ms),
        "sparse_reads_frac": sp.map(|s| s.marked as f64 / s.total.max(1) as f64),
        "sparse_max_abs_diff": sp.map(|s| s.max_abs_diff),
        "b": c.b,
        "p": c.p,
        "s": c.s,
        "levels": c.levels,
        "cascade_ms": t.cascade_ms,
        "paged_ms": t.paged_ms,
        "speedup": t.paged_ms / t.cascade_ms,
        "kv_bytes_read": t.cascade_positions * per_pos,
        "paged_kv_bytes_read": paged_positions * per_pos,
        "unique_kv_bytes": unique,
        "unique_bw_gbs": unique_bw,
        "copy_bw_gbs": dev.copy_bw_gbs(),
        "frac_of_copy_bw": unique_bw / dev.copy_bw_gbs(),
        "max_abs_diff": t.max_abs_diff,
        "rows": tree.positions.len(),
        "groups": plan.num_groups(),
        "pages": tree.pages,
        "heads": a.heads,
        "kv_heads": a.kv_heads,
        "head_dim": a.head_dim,
        "page_size": a.page_size,
        "group_pages": a.group_pages,
        "reps": a.reps,
        "device": dev.describe(),
    })
}

/// Where the kernels run, with the copy bandwidth measured there at the start.
enum Backend {
    Cpu {
        copy_bw: f64,
        /// Bytes per K/V element of the pool.
        elem: usize,
    },
    #[cfg(feature = "cuda")]
    Cuda(gpu::GpuBench),
}

impl Backend {
    fn open(
        device: Device,
        copy_mib: usize,
        reps: usize,
        kv_dtype: KvDtype,
    ) -> anyhow::Result<Backend> {
        match device {
            Device::Cpu => Ok(Backend::Cpu {
                copy_bw: cpu_copy_bw(copy_mib, reps),
                elem: kv_dtype.bytes(),
            }),
            #[cfg(feature = "cuda")]
            Device::Cuda(i) => Ok(Backend::Cuda(gpu::GpuBench::open(i, copy_mib, reps)?)),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => bail!("this build of arbor has no CUDA backend: use --device cpu"),
        }
    }

    fn describe(&self) -> String {
        match self {
            Backend::Cpu { .. } => format!("cpu, {} threads", rayon::current_num_threads()),
            #[cfg(feature = "cuda")]
            Backend::Cuda(g) => g.describe(),
        }
    }

    /// Bytes per K/V element (--kv-dtype on the CPU, bf16 on a GPU).
    fn elem_bytes(&self) -> usize {
        match self {
            Backend::Cpu { elem, .. } => *elem,
            #[cfg(feature = "cuda")]
            Backend::Cuda(_) => 2,
        }
    }

    fn copy_bw_gbs(&self) -> f64 {
        match self {
            Backend::Cpu { copy_bw, .. } => *copy_bw,
            #[cfg(feature = "cuda")]
            Backend::Cuda(g) => g.copy_bw,
        }
    }

    /// Times a cell: `plan` dense, and `sparse` (the same tree with budgets) if given.
    fn run(
        &mut self,
        tree: &Tree,
        plan: &CascadePlan,
        sparse: Option<&CascadePlan>,
        p: &AttentionParams,
        a: &AttentionArgs,
        seed: u64,
    ) -> anyhow::Result<Timing> {
        match self {
            Backend::Cpu { .. } => run_cpu(tree, plan, sparse, p, a, seed),
            #[cfg(feature = "cuda")]
            Backend::Cuda(g) => g.run(tree, plan, sparse, p, a, seed),
        }
    }
}

/// Copy bandwidth of host memory (bytes read + written per second, all threads), median of
/// `reps` copies of `mib` MiB.
fn cpu_copy_bw(mib: usize, reps: usize) -> f64 {
    let n = mib * (1 << 20) / 4;
    let src = vec![1.0f32; n];
    let mut dst = vec![0.0f32; n];
    let chunk = 1 << 16;
    let mut times = Vec::new();
    for rep in 0..=reps.max(3) {
        let t0 = Instant::now();
        dst.par_chunks_mut(chunk)
            .zip(src.par_chunks(chunk))
            .for_each(|(d, s)| d.copy_from_slice(s));
        if rep > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    std::hint::black_box(&dst);
    (2 * n * 4) as f64 / median(times) / 1e9
}

/// The cell on the CPU kernels: cascade (partials merged by LSE, as on the GPU) against
/// `paged_attention` of each row over its own block table.
fn run_cpu(
    tree: &Tree,
    plan: &CascadePlan,
    sparse: Option<&CascadePlan>,
    p: &AttentionParams,
    a: &AttentionArgs,
    seed: u64,
) -> anyhow::Result<Timing> {
    let layout = a.kv_layout();
    let bytes = layout.bytes_per_page(a.kv_dtype.bytes()) * tree.pages;
    if bytes > CPU_MAX_KV_BYTES {
        bail!(
            "{:.1} GiB of KV is too much for the CPU path: use smaller --branches/--prefix/--suffix, or --device cuda",
            bytes as f64 / (1u64 << 30) as f64
        );
    }
    let mut rng = Rng::new(seed);
    let mut pool = KvPool::with_dtype(layout, tree.pages, a.kv_dtype);
    let kvd = a.kv_heads * a.head_dim;
    for page in 0..tree.pages as PageId {
        for slot in 0..a.page_size {
            let (k, v) = (rng.vec(kvd), rng.vec(kvd));
            pool.write(0, page, slot, &k, &v);
        }
    }
    let w = a.heads * a.head_dim;
    let rows = tree.positions.len();
    let q = rng.vec(rows * w);
    let tables: Vec<BlockTable> = tree
        .tables
        .iter()
        .zip(&tree.positions)
        .map(|(t, &pos)| BlockTable {
            pages: t.clone(),
            len: pos + 1,
        })
        .collect();
    let mut out_c = vec![0.0f32; rows * w];
    let mut out_p = vec![0.0f32; rows * w];
    let time = |f: &mut dyn FnMut()| {
        f(); // warm-up
        median(
            (0..a.reps)
                .map(|_| {
                    let t0 = Instant::now();
                    f();
                    t0.elapsed().as_secs_f64() * 1e3
                })
                .collect(),
        )
    };
    let cascade_ms = time(&mut || {
        cascade::cascade_attention(&q, plan, &pool, 0, p, None, &mut out_c);
    });
    let paged_ms = time(&mut || {
        for (i, (t, &pos)) in tables.iter().zip(&tree.positions).enumerate() {
            let r = i * w..(i + 1) * w;
            paged_attention(&q[r.clone()], &[pos], &pool, 0, t, p, &mut out_p[r]);
        }
    });
    let sparse = match sparse {
        None => None,
        Some(sp_plan) => {
            let sp = sparse_params();
            let mut out_s = vec![0.0f32; rows * w];
            let mut marked = 0;
            // Once per step in the engine, like the GPU's upload: outside the layer's time.
            let start = cascade::selection_start(sp_plan, p, &sp);
            let ms = time(&mut || {
                let sel = cascade::select_pages_from(&q, sp_plan, &start, &pool, 0, p, &sp);
                marked = sel.as_ref().map_or(0, |s| s.pages_read());
                cascade::cascade_attention(&q, sp_plan, &pool, 0, p, sel.as_ref(), &mut out_s);
            });
            let select_ms = time(&mut || {
                std::hint::black_box(cascade::select_pages_from(
                    &q, sp_plan, &start, &pool, 0, p, &sp,
                ));
            });
            Some(SparseTiming {
                ms,
                select_ms,
                marked,
                total: sp_plan.pages_read() * a.kv_heads,
                max_abs_diff: max_abs_diff(&out_s, &out_c),
            })
        }
    };
    Ok(Timing {
        cascade_ms,
        paged_ms,
        max_abs_diff: max_abs_diff(&out_c, &out_p),
        cascade_positions: cascade_positions(plan, cascade::ROWS_PER_TASK, usize::MAX),
        sparse,
    })
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .fold(0.0, f64::max)
}

/// The CUDA side: the pool in device memory, kernels timed with CUDA events.
#[cfg(feature = "cuda")]
mod gpu;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_sizes_grow_to_the_branches() {
        assert_eq!(level_sizes(16, 2), vec![1, 16]);
        assert_eq!(level_sizes(64, 4), vec![1, 4, 16, 64]);
        assert_eq!(level_sizes(16, 4), vec![1, 3, 7, 16]);
        assert_eq!(level_sizes(1, 4), vec![1, 1, 1, 1]);
    }

    #[test]
    fn trees_share_prefixes_and_copy_partial_pages() {
        // Page-aligned: 4 branches share the prefix's 4 pages, one page of their own each.
        let t = Tree::build(
            Cell {
                b: 4,
                p: 64,
                s: 16,
                levels: 2,
            },
            16,
        );
        assert_eq!(t.pages, 4 + 4);
        assert_eq!(t.unique_tokens, 64 + 4 * 16);
        assert!(t.positions.iter().all(|&p| p == 79));
        assert!(t.tables.iter().all(|x| x[..4] == [0, 1, 2, 3]));
        // Mid-page: each branch copies the prefix's last page.
        let t = Tree::build(
            Cell {
                b: 2,
                p: 20,
                s: 4,
                levels: 2,
            },
            16,
        );
        assert_eq!(t.pages, 2 + 2);
        assert_eq!(t.tables, vec![vec![0, 2], vec![0, 3]]);
        let plan = t.plan(16, 64, None).expect("plan");
        assert!(plan.has_sharing());
        // The shared page once per task, then each branch's own page up to its row.
        assert_eq!(cascade_positions(&plan, 32, usize::MAX), 16 + 2 * 8);
        // Passes of one row read the shared page once per row.
        assert_eq!(cascade_positions(&plan, 32, 1), 2 * 16 + 2 * 8);
    }
}
