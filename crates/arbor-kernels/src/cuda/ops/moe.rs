//! Mixture of experts on the GPU (`kernels/moe.cu`): routing, grouping by expert, the grouped
//! expert GEMM and the weighted combine. CPU references: [`crate::ops::route_softmax_topk`],
//! [`crate::ops::group_by_expert`] and [`crate::ops::moe_experts`] (and the arbor-runtime
//! `MoeBlock::forward` for the shared expert's sigmoid gate).
//!
//! One MoE layer, all enqueued on the GPU's stream without a host round trip: every grid
//! depends only on host-known sizes (tokens, top-k, experts), never on how many tokens each
//! expert got:
//! 1. the router logits (a cuBLASLt GEMM by the caller) → [`route_softmax_topk`];
//! 2. [`GpuExpertGroups::group`]: per-expert counts, offsets, the token of each grouped row,
//!    a table of row tiles for the GEMMs, and optional per-expert token statistics;
//! 3. [`grouped_matmul_bt`] for gate/up (rows gathered from the tokens), SwiGLU
//!    ([`super::activation::swiglu`] over all assignments), [`grouped_matmul_bt`] for down;
//! 4. [`moe_combine`]: each token's weighted expert outputs summed in ascending expert order
//!    (the CPU's order), plus a gated shared expert.
//!
//! Results are deterministic: no atomics, fixed summation orders.

use super::super::{Gpu, GpuError, LaunchConfig};
use super::{int_arg, launch_error, need_len, product};
use cudarc::driver::{CudaSlice, CudaView, PushKernelArg};
use half::bf16;

/// Threads of the one block that builds offsets and tiles.
const OFFSETS_THREADS: u32 = 1024;
/// Warps (one token each) per routing block.
const ROUTE_WARPS: u32 = 4;
/// `MOE_GEMM_WARPS` in moe.cu.
const GEMM_WARPS: usize = 8;

/// Row-tile shapes of the grouped GEMM: (rows per tile, output columns per block, kernel).
/// Decode-sized tiles stream each weight once per 8 rows; prefill-sized ones reuse a weight
/// element for 32 rows.
const TILE_SMALL: (usize, usize, &str) = (8, GEMM_WARPS * 4, "moe_gemm_m8");
const TILE_LARGE: (usize, usize, &str) = (32, GEMM_WARPS * 2, "moe_gemm_m32");

/// Routes each of `rows` tokens (as [`crate::ops::route_softmax_topk`]): `logits`
/// (`rows × num_experts`, overwritten with the softmax probabilities) → the `top_k` most
/// probable experts by descending probability, ties to the lower index, into `experts` and
/// their probabilities into `weights` (`rows × top_k` each), divided by their sum when
/// `renormalize` (Mixtral; Qwen-MoE with `norm_topk_prob`). NaN logits count as −∞.
/// `valid_rows`, a device scalar, marks rows from it on as padding (a CUDA graph's): they get
/// expert id `num_experts` (no expert) and weight 0.
#[allow(clippy::too_many_arguments)]
pub fn route_softmax_topk(
    gpu: &Gpu,
    logits: &mut CudaSlice<f32>,
    rows: usize,
    num_experts: usize,
    top_k: usize,
    renormalize: bool,
    valid_rows: Option<&CudaView<u32>>,
    experts: &mut CudaSlice<u32>,
    weights: &mut CudaSlice<f32>,
) -> Result<(), GpuError> {
    const OP: &str = "route_softmax_topk";
    check_topk(OP, num_experts, top_k)?;
    if rows == 0 {
        return Ok(());
    }
    need_len(
        OP,
        "logits",
        logits.len(),
        product(OP, "rows × experts", rows, num_experts)?,
    )?;
    let a = product(OP, "rows × top_k", rows, top_k)?;
    need_len(OP, "experts", experts.len(), a)?;
    need_len(OP, "weights", weights.len(), a)?;
    if let Some(v) = valid_rows {
        need_len(OP, "valid rows", v.len(), 1)?;
    }
    let rows_i = int_arg(OP, "rows", rows)?;
    let has_valid = i32::from(valid_rows.is_some());
    let ints = [
        int_arg(OP, "experts", num_experts)?,
        int_arg(OP, "top_k", top_k)?,
        i32::from(renormalize),
    ];
    let blocks = u32::try_from(rows.div_ceil(ROUTE_WARPS as usize))
        .map_err(|_| GpuError::Invalid(format!("{OP}: {rows} rows are too many")))?;
    let f = gpu.func("moe", "moe_route_topk")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(logits).arg(&rows_i);
    // A null pointer (8 bytes, as the kernel's) where there is none: never read then.
    let null: u64 = 0;
    match valid_rows {
        Some(v) => b.arg(v),
        None => b.arg(&null),
    };
    b.arg(&has_valid);
    for i in &ints {
        b.arg(i);
    }
    b.arg(experts).arg(weights);
    // SAFETY: arguments match the kernel; lengths checked above.
    unsafe {
        b.launch(LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (ROUTE_WARPS * 32, 1, 1),
            shared_mem_bytes: 0,
        })
    }
    .map_err(launch_error(OP))?;
    Ok(())
}

fn check_topk(op: &str, num_experts: usize, top_k: usize) -> Result<(), GpuError> {
    if num_experts == 0 || top_k == 0 || top_k > num_experts {
        return Err(GpuError::Invalid(format!(
            "{op}: cannot route to the top {top_k} of {num_experts} experts"
        )));
    }
    Ok(())
}

/// A per-expert token counter table on the device, `rows × num_experts` u64 (one row per MoE
/// layer), that [`GpuExpertGroups::group`] adds an expert's token count into.
pub struct ExpertStatsRow<'a> {
    /// The table.
    pub table: &'a mut CudaSlice<u64>,
    /// The row to add into.
    pub row: usize,
}

/// The routing assignments of one layer grouped by expert, on the device (the GPU form of
/// [`crate::ops::ExpertGroups`], built by [`GpuExpertGroups::group`]): grouped row `p` of
/// expert `e` (`offsets[e] ≤ p < offsets[e + 1]`) is one (token, k) assignment, tokens
/// ascending within an expert. Buffers only grow ([`GpuExpertGroups::reserve`]), so their
/// addresses stay put between steps of the same or smaller size.
pub struct GpuExpertGroups {
    /// Rank of each assignment among its expert's (scratch of `moe_count`).
    rank: CudaSlice<u32>,
    counts: CudaSlice<u32>,
    offsets: CudaSlice<u32>,
    tile_off: CudaSlice<u32>,
    /// (expert, first grouped row) per row tile.
    tiles: CudaSlice<u32>,
    ntiles: CudaSlice<u32>,
    /// The token of each grouped row.
    row_token: CudaSlice<u32>,
    /// Per token, its grouped rows and weights in ascending expert order.
    sorted_pos: CudaSlice<u32>,
    sorted_w: CudaSlice<f32>,
    /// Capacity in assignments and experts.
    cap_assign: usize,
    cap_experts: usize,
    /// Shape of the last grouping; `None` before the first.
    shape: Option<GroupShape>,
}

#[derive(Clone, Copy, Debug)]
struct GroupShape {
    rows: usize,
    top_k: usize,
    experts: usize,
    /// Tile shape the tile table was built for.
    tile: (usize, usize, &'static str),
    /// Upper bound of the tile count: the GEMMs' grid height.
    max_tiles: usize,
}

/// Upper bound of Σₑ ⌈countₑ / bm⌉ over any routing of `a` assignments to `experts`
/// experts: ⌈a / bm⌉ plus one partial tile per non-empty expert.
fn max_tiles(a: usize, experts: usize, bm: usize) -> usize {
    a.div_ceil(bm) + experts.min(a)
}

impl GpuExpertGroups {
    /// Buffers for up to `assignments` (tokens × top-k) routed to `num_experts` experts.
    pub fn new(gpu: &Gpu, assignments: usize, num_experts: usize) -> Result<Self, GpuError> {
        let a = assignments.max(1);
        let e = num_experts.max(1);
        let tiles = 2 * max_tiles(a, e, TILE_SMALL.0);
        let what = "MoE grouping buffers";
        Ok(GpuExpertGroups {
            rank: gpu.zeros(a, what)?,
            counts: gpu.zeros(e, what)?,
            offsets: gpu.zeros(e + 1, what)?,
            tile_off: gpu.zeros(e, what)?,
            tiles: gpu.zeros(tiles, what)?,
            ntiles: gpu.zeros(1, what)?,
            row_token: gpu.zeros(a, what)?,
            sorted_pos: gpu.zeros(a, what)?,
            sorted_w: gpu.zeros(a, what)?,
            cap_assign: a,
            cap_experts: e,
            shape: None,
        })
    }

    /// Grows the buffers (never shrinks them) to hold `assignments` routed to `num_experts`.
    pub fn reserve(
        &mut self,
        gpu: &Gpu,
        assignments: usize,
        num_experts: usize,
    ) -> Result<(), GpuError> {
        if assignments > self.cap_assign || num_experts > self.cap_experts {
            let shape = self.shape;
            *self = Self::new(
                gpu,
                assignments.max(self.cap_assign),
                num_experts.max(self.cap_experts),
            )?;
            self.shape = shape;
        }
        Ok(())
    }

    /// Groups the `rows × top_k` assignments of `experts`/`weights` (as from
    /// [`route_softmax_topk`]) by expert, as [`crate::ops::group_by_expert`]; with `stats`,
    /// adds each expert's count into that row of the table. Grows the buffers if needed.
    /// Expert ids ≥ `num_experts` (never from the router) get no grouped row and add nothing
    /// to the combine.
    #[allow(clippy::too_many_arguments)]
    pub fn group(
        &mut self,
        gpu: &Gpu,
        experts: &CudaSlice<u32>,
        weights: &CudaSlice<f32>,
        rows: usize,
        top_k: usize,
        num_experts: usize,
        stats: Option<ExpertStatsRow>,
    ) -> Result<(), GpuError> {
        const OP: &str = "GpuExpertGroups::group";
        // A failed grouping leaves none behind for the GEMMs to misread.
        self.shape = None;
        check_topk(OP, num_experts, top_k)?;
        let a = product(OP, "rows × top_k", rows, top_k)?;
        need_len(OP, "experts", experts.len(), a)?;
        need_len(OP, "weights", weights.len(), a)?;
        self.reserve(gpu, a, num_experts)?;
        if a == 0 {
            self.shape = Some(GroupShape {
                rows,
                top_k,
                experts: num_experts,
                tile: TILE_SMALL,
                max_tiles: 0,
            });
            return Ok(());
        }
        // Mostly decode (few rows per expert): 8-row tiles; prefill: 32-row tiles.
        let tile = if a >= num_experts.saturating_mul(16) {
            TILE_LARGE
        } else {
            TILE_SMALL
        };
        let bound = max_tiles(a, num_experts, tile.0);
        let (stats_row, stats_on) = match &stats {
            Some(s) => {
                let need = product(OP, "stats rows × experts", s.row + 1, num_experts)?;
                need_len(OP, "stats table", s.table.len(), need)?;
                (int_arg(OP, "stats row", s.row)?, 1i32)
            }
            None => (0, 0),
        };
        let ints = [
            int_arg(OP, "rows", rows)?,
            int_arg(OP, "top_k", top_k)?,
            int_arg(OP, "experts", num_experts)?,
            int_arg(OP, "tile rows", tile.0)?,
            int_arg(OP, "tile bound", bound)?,
        ];
        let (a_i, e_i) = (int_arg(OP, "assignments", a)?, ints[2]);
        let e_blocks = u32::try_from(num_experts)
            .map_err(|_| GpuError::Invalid(format!("{OP}: too many experts")))?;

        let f = gpu.func("moe", "moe_count")?;
        let mut b = gpu.stream().launch_builder(&f);
        b.arg(experts)
            .arg(&a_i)
            .arg(&e_i)
            .arg(&mut self.rank)
            .arg(&mut self.counts);
        // SAFETY: arguments match the kernel; ids and rank hold `a` elements, counts
        // `num_experts` (reserved above).
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (e_blocks, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(launch_error("moe_count"))?;

        let f = gpu.func("moe", "moe_offsets")?;
        let mut b = gpu.stream().launch_builder(&f);
        b.arg(experts)
            .arg(weights)
            .arg(&self.rank)
            .arg(&self.counts);
        for i in &ints {
            b.arg(i);
        }
        b.arg(&mut self.offsets)
            .arg(&mut self.tile_off)
            .arg(&mut self.tiles)
            .arg(&mut self.ntiles)
            .arg(&mut self.row_token)
            .arg(&mut self.sorted_pos)
            .arg(&mut self.sorted_w);
        let mut stats = stats;
        match &mut stats {
            Some(s) => b.arg(&mut *s.table),
            // Never read with stats_on = 0; any valid pointer stands in.
            None => b.arg(&self.counts),
        };
        b.arg(&stats_row).arg(&stats_on);
        // SAFETY: arguments match the kernel; every buffer was reserved for `a` assignments,
        // `num_experts` experts and `bound` tiles (bound ≤ the capacity: the tile table is
        // sized for the smaller tile), the stats row checked above.
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (OFFSETS_THREADS, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(launch_error("moe_offsets"))?;
        self.shape = Some(GroupShape {
            rows,
            top_k,
            experts: num_experts,
            tile,
            max_tiles: bound,
        });
        Ok(())
    }

    /// Tokens × top-k of the last grouping (0 before the first).
    pub fn assignments(&self) -> usize {
        self.shape.map_or(0, |s| s.rows * s.top_k)
    }

    fn shape(&self, op: &str) -> Result<GroupShape, GpuError> {
        self.shape.ok_or_else(|| {
            GpuError::Invalid(format!(
                "{op}: no routing was grouped yet (call GpuExpertGroups::group first)"
            ))
        })
    }

    /// The last grouping read back as [`crate::ops::ExpertGroups`] (for tests and debugging;
    /// waits for the stream). Assignments to out-of-range experts are left out.
    pub fn to_host(&self, gpu: &Gpu) -> Result<crate::ops::ExpertGroups, GpuError> {
        let s = self.shape("GpuExpertGroups::to_host")?;
        let a = s.rows * s.top_k;
        let offsets: Vec<usize> = gpu.download(&self.offsets, "MoE offsets")?[..=s.experts]
            .iter()
            .map(|&o| o as usize)
            .collect();
        let n = offsets[s.experts];
        let mut rows = gpu.download(&self.row_token, "MoE grouped rows")?;
        rows.truncate(n);
        let pos = gpu.download(&self.sorted_pos, "MoE grouped positions")?;
        let w = gpu.download(&self.sorted_w, "MoE grouped weights")?;
        let mut weights = vec![0.0f32; n];
        for (&p, &w) in pos[..a].iter().zip(&w[..a]) {
            if let Some(slot) = weights.get_mut(p as usize) {
                *slot = w;
            }
        }
        Ok(crate::ops::ExpertGroups {
            offsets,
            rows,
            weights,
        })
    }
}

/// Where the grouped GEMM's input rows come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupedInput {
    /// `x` holds one row per token; grouped row `p` reads the row of its token (the gate/up
    /// projection of the normed hidden states).
    Tokens,
    /// `x` holds one row per grouped row, in grouped order (the down projection of the
    /// activations).
    Grouped,
}

/// The grouped expert GEMM (the matmuls of [`crate::ops::moe_experts`]): for every grouped
/// row `p` of the last [`GpuExpertGroups::group`], expert `e`'s
/// `out[p][..n] = x_row(p) · w[e]ᵀ`, with `w` the experts' `n × k` weights stacked
/// (`num_experts × n × k` bf16, each row-major like a Linear weight), f32 accumulation and
/// output (`assignments × n`). One launch for all experts; empty experts cost nothing.
#[allow(clippy::too_many_arguments)]
pub fn grouped_matmul_bt(
    gpu: &Gpu,
    x: &CudaSlice<bf16>,
    input: GroupedInput,
    groups: &GpuExpertGroups,
    w: &CudaSlice<bf16>,
    n: usize,
    k: usize,
    out: &mut CudaSlice<f32>,
) -> Result<(), GpuError> {
    const OP: &str = "grouped_matmul_bt";
    let s = groups.shape(OP)?;
    let a = s.rows * s.top_k;
    if a == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        return Err(GpuError::Invalid(format!("{OP}: k = 0")));
    }
    let x_rows = match input {
        GroupedInput::Tokens => s.rows,
        GroupedInput::Grouped => a,
    };
    need_len(OP, "x", x.len(), product(OP, "x rows × k", x_rows, k)?)?;
    let per_expert = product(OP, "n × k", n, k)?;
    need_len(
        OP,
        "stacked weights",
        w.len(),
        product(OP, "experts × n × k", s.experts, per_expert)?,
    )?;
    need_len(OP, "out", out.len(), product(OP, "assignments × n", a, n)?)?;
    let (_, bn, kernel) = s.tile;
    let grid_x = u32::try_from(n.div_ceil(bn)).ok();
    let grid_y = u32::try_from(s.max_tiles).ok().filter(|&t| t <= 65_535);
    let (Some(gx), Some(gy)) = (grid_x, grid_y) else {
        return Err(GpuError::Invalid(format!(
            "{OP}: {a} assignments over {} experts need {} row tiles (at most 65535)",
            s.experts, s.max_tiles
        )));
    };
    let (n_i, k_i) = (int_arg(OP, "n", n)?, int_arg(OP, "k", k)?);
    let gather = i32::from(input == GroupedInput::Tokens);
    let f = gpu.func("moe", kernel)?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(x)
        .arg(&gather)
        .arg(&groups.row_token)
        .arg(w)
        .arg(&n_i)
        .arg(&k_i)
        .arg(&groups.tiles)
        .arg(&groups.ntiles)
        .arg(&groups.offsets)
        .arg(out);
    // SAFETY: arguments match the kernel; x, w and out were checked for the grouping's
    // shape, whose tile table and offsets the kernel reads (rows within the assignments).
    unsafe {
        b.launch(LaunchConfig {
            grid_dim: (gx, gy, 1),
            block_dim: ((GEMM_WARPS * 32) as u32, 1, 1),
            shared_mem_bytes: 0,
        })
    }
    .map_err(launch_error(OP))?;
    Ok(())
}

/// Qwen2-MoE's shared expert for [`moe_combine`]: its output rows and the sigmoid gate.
pub struct SharedExpertOut<'a> {
    /// The shared expert's FFN output, `rows × hidden` f32.
    pub y: &'a CudaSlice<f32>,
    /// The layer's normed input, `rows × hidden` bf16 (the gate reads it).
    pub xn: &'a CudaSlice<bf16>,
    /// The gate's weight vector, `hidden` f32.
    pub gate: &'a CudaSlice<f32>,
}

/// The combine of [`crate::ops::moe_experts`] (and the shared expert of `MoeBlock::forward`):
/// `out[t] = Σ weight · y[grouped row]` over token `t`'s experts in ascending expert order,
/// with `y` the down projection (`assignments × hidden`, grouped order), then
/// `+ sigmoid(xn[t] · gate) · shared.y[t]` with a shared expert. Overwrites `out`'s first
/// `rows × hidden` values.
pub fn moe_combine(
    gpu: &Gpu,
    y: &CudaSlice<f32>,
    groups: &GpuExpertGroups,
    hidden: usize,
    shared: Option<SharedExpertOut>,
    out: &mut CudaSlice<f32>,
) -> Result<(), GpuError> {
    const OP: &str = "moe_combine";
    let s = groups.shape(OP)?;
    if s.rows == 0 || hidden == 0 {
        return Ok(());
    }
    let a = s.rows * s.top_k;
    let n = product(OP, "rows × hidden", s.rows, hidden)?;
    need_len(
        OP,
        "y",
        y.len(),
        product(OP, "assignments × hidden", a, hidden)?,
    )?;
    need_len(OP, "out", out.len(), n)?;
    if let Some(sh) = &shared {
        need_len(OP, "shared expert output", sh.y.len(), n)?;
        need_len(OP, "normed input", sh.xn.len(), n)?;
        need_len(OP, "shared expert gate", sh.gate.len(), hidden)?;
    }
    let ints = [
        int_arg(OP, "rows", s.rows)?,
        int_arg(OP, "top_k", s.top_k)?,
        i32::from(shared.is_some()),
    ];
    let hidden_i = int_arg(OP, "hidden", hidden)?;
    let blocks = u32::try_from(s.rows)
        .map_err(|_| GpuError::Invalid(format!("{OP}: {} rows are too many", s.rows)))?;
    let f = gpu.func("moe", "moe_combine")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(y)
        .arg(&hidden_i)
        .arg(&groups.sorted_pos)
        .arg(&groups.sorted_w);
    for i in &ints {
        b.arg(i);
    }
    // Without a shared expert the kernel never reads these; valid pointers stand in.
    match &shared {
        Some(sh) => b.arg(sh.y).arg(sh.xn).arg(sh.gate),
        None => b.arg(y).arg(&groups.row_token).arg(y),
    };
    b.arg(out);
    // SAFETY: arguments match the kernel (the stand-in pointers are never dereferenced with
    // has_shared = 0); lengths checked above; grouped positions lie below `a`.
    unsafe {
        b.launch(LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        })
    }
    .map_err(launch_error(OP))?;
    Ok(())
}
