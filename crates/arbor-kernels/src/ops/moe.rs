//! Mixture-of-experts math, model-free: the router (softmax top-k, with or without
//! renormalising the chosen weights), grouping of rows by expert, and the CPU reference of
//! the grouped expert GEMM (each expert's rows through its SwiGLU FFN, scatter-added with
//! their routing weights).
//!
//! Conventions:
//! - Top-k picks experts by descending probability; ties go to the lower expert index
//!   (`torch.topk` leaves tie order unspecified). NaN router logits count as −∞ (the
//!   softmax's convention): a row without a finite logit gets valid experts with weight 0,
//!   never a panic.
//! - Within an expert, rows keep ascending row order, so each expert is one matmul over a
//!   contiguous gather of its rows.
//! - A row's expert outputs are summed in ascending expert index (the order transformers'
//!   `index_add_` loop uses). Each row's result depends only on that row, whatever batch it
//!   is in, as for the dense layers.

use super::softmax::softmax_inplace;
use super::swiglu::swiglu;
use crate::{KernelError, Weight};
use rayon::prelude::*;

/// Which experts each of `t` rows goes to, and with what weight.
#[derive(Clone, Debug, PartialEq)]
pub struct Routing {
    /// Experts per row.
    pub top_k: usize,
    /// `t × top_k` expert indices, each row by descending probability.
    pub experts: Vec<u32>,
    /// `t × top_k` routing weights, aligned with `experts`.
    pub weights: Vec<f32>,
}

impl Routing {
    /// Rows routed.
    pub fn rows(&self) -> usize {
        self.experts.len() / self.top_k.max(1)
    }
}

/// Routes each row of `logits` (`t × num_experts`): softmax over all experts, keep the
/// `top_k` most probable, and with `renormalize` divide their probabilities by their sum
/// (Mixtral always; Qwen2/Qwen3-MoE when `norm_topk_prob`).
pub fn route_softmax_topk(
    logits: &[f32],
    num_experts: usize,
    top_k: usize,
    renormalize: bool,
) -> Result<Routing, KernelError> {
    let t = route_rows("route_softmax_topk", logits, num_experts, top_k)?;
    let mut experts = vec![0u32; t * top_k];
    let mut weights = vec![0.0f32; t * top_k];
    experts
        .par_chunks_mut(top_k)
        .zip(weights.par_chunks_mut(top_k))
        .zip(logits.par_chunks(num_experts))
        .for_each(|((ex, w), row)| {
            let mut p = row.to_vec();
            softmax_inplace(&mut p);
            let mut taken = vec![false; num_experts];
            for (slot, wt) in ex.iter_mut().zip(w.iter_mut()) {
                // Strict `>` keeps the lower index on ties; the first free expert is the
                // starting point, so the choice stays valid whatever the values.
                let mut best: Option<usize> = None;
                for (e, (&pe, &t)) in p.iter().zip(&taken).enumerate() {
                    let better = best.is_none_or(|b| pe > p[b]);
                    if !t && better {
                        best = Some(e);
                    }
                }
                let best = best.unwrap_or(0);
                taken[best] = true;
                *slot = best as u32;
                *wt = p[best];
            }
            if renormalize {
                renormalize_row(w);
            }
        });
    Ok(Routing {
        top_k,
        experts,
        weights,
    })
}

/// Rows of `logits` after checking a routing's arguments.
fn route_rows(
    op: &'static str,
    logits: &[f32],
    num_experts: usize,
    top_k: usize,
) -> Result<usize, KernelError> {
    if num_experts == 0 || top_k == 0 || top_k > num_experts {
        return Err(KernelError::Invalid(format!(
            "cannot route to the top {top_k} of {num_experts} experts"
        )));
    }
    if !logits.len().is_multiple_of(num_experts) {
        return Err(KernelError::Shape {
            op,
            detail: format!("{} logits for {num_experts} experts", logits.len()),
        });
    }
    Ok(logits.len() / num_experts)
}

/// Divides a row's routing weights by their sum (left as they are if it is not positive).
fn renormalize_row(w: &mut [f32]) {
    let sum: f32 = w.iter().sum();
    if sum > 0.0 {
        w.iter_mut().for_each(|x| *x /= sum);
    }
}

/// Routes each row of `logits` (`t × num_experts`) to given experts instead of its top k
/// (routing replay: `given`, `t × top_k` ids, was recorded from another run or device),
/// weighted as [`route_softmax_topk`] weights its choice: the given experts' softmax
/// probabilities, divided by their sum with `renormalize`. Each row's experts are put in
/// descending probability (ties to the lower index). Errors on an id out of range or given
/// twice in a row, or on `given` not holding `t × top_k` ids.
pub fn route_given(
    logits: &[f32],
    num_experts: usize,
    top_k: usize,
    given: &[u32],
    renormalize: bool,
) -> Result<Routing, KernelError> {
    const OP: &str = "route_given";
    let t = route_rows(OP, logits, num_experts, top_k)?;
    if given.len() != t * top_k {
        return Err(KernelError::Shape {
            op: OP,
            detail: format!("{} expert ids for {t} rows of top {top_k}", given.len()),
        });
    }
    let mut experts = vec![0u32; t * top_k];
    let mut weights = vec![0.0f32; t * top_k];
    for (r, ((ex, w), row)) in experts
        .chunks_mut(top_k)
        .zip(weights.chunks_mut(top_k))
        .zip(logits.chunks(num_experts))
        .enumerate()
    {
        let mut ids = given[r * top_k..(r + 1) * top_k].to_vec();
        ids.sort_unstable();
        if let Some(&bad) = ids.iter().find(|&&e| e as usize >= num_experts) {
            return Err(KernelError::Invalid(format!(
                "row {r} is routed to expert {bad}, out of range ({num_experts} experts)"
            )));
        }
        if let Some(d) = ids.windows(2).find(|p| p[0] == p[1]) {
            return Err(KernelError::Invalid(format!(
                "row {r} is routed to expert {} twice",
                d[0]
            )));
        }
        let mut p = row.to_vec();
        softmax_inplace(&mut p);
        // Stable sort of ascending ids: equal probabilities keep the lower index first.
        ids.sort_by(|&a, &b| p[b as usize].total_cmp(&p[a as usize]));
        for ((slot, wt), &e) in ex.iter_mut().zip(w.iter_mut()).zip(&ids) {
            *slot = e;
            *wt = p[e as usize];
        }
        if renormalize {
            renormalize_row(w);
        }
    }
    Ok(Routing {
        top_k,
        experts,
        weights,
    })
}

/// How far `routing` strays from each row's own top-k choice by `logits`: the largest, over
/// rows, of the k-th highest logit minus the lowest logit among the row's experts. 0 when
/// every row is routed to its top k (or to experts tied with them); a small value means the
/// routing differs only at near-ties. NaN logits count as −∞.
pub fn routing_regret(logits: &[f32], num_experts: usize, routing: &Routing) -> f32 {
    let k = routing.top_k;
    let finite = |x: f32| if x.is_nan() { f32::NEG_INFINITY } else { x };
    logits
        .chunks(num_experts)
        .zip(routing.experts.chunks(k.max(1)))
        .map(|(row, ex)| {
            let mut sorted: Vec<f32> = row.iter().map(|&x| finite(x)).collect();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let kth = sorted[k.clamp(1, num_experts) - 1];
            let lowest = ex
                .iter()
                .map(|&e| {
                    row.get(e as usize)
                        .map_or(f32::NEG_INFINITY, |&x| finite(x))
                })
                .fold(f32::INFINITY, f32::min);
            let gap = kth - lowest;
            if gap.is_nan() {
                0.0
            } else {
                gap.max(0.0)
            }
        })
        .fold(0.0, f32::max)
}

/// Routing assignments grouped by expert (a counting sort): expert `e`'s rows are
/// `rows[offsets[e]..offsets[e + 1]]`, ascending, with their weights alongside.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpertGroups {
    /// `num_experts + 1` offsets into `rows` and `weights`.
    pub offsets: Vec<usize>,
    pub rows: Vec<u32>,
    pub weights: Vec<f32>,
}

impl ExpertGroups {
    /// Experts grouped over.
    pub fn num_experts(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    /// Rows routed to expert `e`.
    pub fn count(&self, e: usize) -> usize {
        self.offsets[e + 1] - self.offsets[e]
    }

    /// Expert `e`'s rows and their weights.
    pub fn expert(&self, e: usize) -> (&[u32], &[f32]) {
        let r = self.offsets[e]..self.offsets[e + 1];
        (&self.rows[r.clone()], &self.weights[r])
    }
}

/// Groups `routing`'s assignments by expert. Errors on an expert index out of range.
pub fn group_by_expert(routing: &Routing, num_experts: usize) -> Result<ExpertGroups, KernelError> {
    let mut offsets = vec![0usize; num_experts + 1];
    for &e in &routing.experts {
        let slot = offsets.get_mut(e as usize + 1).ok_or_else(|| {
            KernelError::Invalid(format!(
                "expert {e} is out of range ({num_experts} experts)"
            ))
        })?;
        *slot += 1;
    }
    let mut acc = 0;
    for o in offsets.iter_mut() {
        acc += *o;
        *o = acc;
    }
    let n = routing.experts.len();
    let (mut rows, mut weights) = (vec![0u32; n], vec![0.0f32; n]);
    let mut next = offsets.clone();
    let k = routing.top_k.max(1);
    // Assignments in row order, so each expert's rows come out ascending.
    for (a, (&e, &w)) in routing.experts.iter().zip(&routing.weights).enumerate() {
        let p = &mut next[e as usize];
        rows[*p] = (a / k) as u32;
        weights[*p] = w;
        *p += 1;
    }
    Ok(ExpertGroups {
        offsets,
        rows,
        weights,
    })
}

/// One expert's SwiGLU FFN: `down · (silu(gate · x) ⊙ (up · x))`.
#[derive(Clone, Debug)]
pub struct ExpertFfn {
    /// Gate and up fused: `2·ff × hidden`, gate rows first.
    pub gate_up: Weight,
    /// `hidden × ff`.
    pub down: Weight,
}

impl ExpertFfn {
    /// The FFN width `ff`.
    pub fn ff(&self) -> usize {
        self.down.cols
    }

    /// Bytes of weights held.
    pub fn nbytes(&self) -> usize {
        self.gate_up.nbytes() + self.down.nbytes()
    }

    /// `out (m × hidden) = FFN(x (m × hidden))`, with `matmul` computing `y = x · Wᵀ`.
    pub fn forward<M>(
        &self,
        x: &[f32],
        m: usize,
        matmul: &M,
        out: &mut [f32],
    ) -> Result<(), KernelError>
    where
        M: Fn(&[f32], usize, &Weight, &mut [f32]) -> Result<(), KernelError>,
    {
        let ff = self.ff();
        if self.gate_up.rows != 2 * ff || self.down.rows != self.gate_up.cols {
            return Err(KernelError::Shape {
                op: "ExpertFfn::forward",
                detail: format!(
                    "gate_up {}x{} and down {}x{} do not form a SwiGLU FFN",
                    self.gate_up.rows, self.gate_up.cols, self.down.rows, self.down.cols
                ),
            });
        }
        let mut gu = vec![0.0f32; m * 2 * ff];
        matmul(x, m, &self.gate_up, &mut gu)?;
        let mut act = vec![0.0f32; m * ff];
        act.par_chunks_mut(ff.max(1))
            .zip(gu.par_chunks(2 * ff.max(1)))
            .for_each(|(a, g)| swiglu(&g[..ff], &g[ff..], a));
        matmul(&act, m, &self.down, out)
    }
}

/// The grouped expert GEMM: for every expert with rows in `groups`, gathers those rows of
/// `x` (`t × hidden`) into one block, runs the expert's FFN on it (one `matmul` per weight,
/// experts in parallel), and adds each output row times its routing weight into `out`
/// (`t × hidden`, accumulated into, not overwritten). Empty experts cost nothing.
pub fn moe_experts<M>(
    x: &[f32],
    hidden: usize,
    groups: &ExpertGroups,
    experts: &[ExpertFfn],
    matmul: &M,
    out: &mut [f32],
) -> Result<(), KernelError>
where
    M: Fn(&[f32], usize, &Weight, &mut [f32]) -> Result<(), KernelError> + Sync,
{
    let n_rows = x.len() / hidden.max(1);
    if groups.num_experts() != experts.len()
        || x.len() != n_rows * hidden
        || out.len() != x.len()
        || groups.rows.iter().any(|&r| r as usize >= n_rows)
    {
        return Err(KernelError::Shape {
            op: "moe_experts",
            detail: format!(
                "x {} and out {} values of width {hidden}, {} experts grouped for {} weights",
                x.len(),
                out.len(),
                groups.num_experts(),
                experts.len()
            ),
        });
    }
    // Every expert's output rows, in grouped order (the same layout as `groups.rows`).
    let active: Vec<usize> = (0..experts.len())
        .filter(|&e| groups.count(e) > 0)
        .collect();
    let outputs = active
        .par_iter()
        .map(|&e| {
            let (rows, _) = groups.expert(e);
            let mut xe = Vec::with_capacity(rows.len() * hidden);
            for &r in rows {
                xe.extend_from_slice(&x[r as usize * hidden..(r as usize + 1) * hidden]);
            }
            let mut ye = vec![0.0f32; rows.len() * hidden];
            experts[e].forward(&xe, rows.len(), matmul, &mut ye)?;
            Ok(ye)
        })
        .collect::<Result<Vec<_>, KernelError>>()?;
    // Where each row's assignments landed, ascending (= ascending expert).
    let mut per_row: Vec<Vec<(usize, usize)>> = vec![Vec::new(); n_rows];
    for (i, &e) in active.iter().enumerate() {
        let (rows, _) = groups.expert(e);
        for (j, &r) in rows.iter().enumerate() {
            per_row[r as usize].push((i, j));
        }
    }
    out.par_chunks_mut(hidden.max(1))
        .zip(per_row.par_iter())
        .for_each(|(o, slots)| {
            for &(i, j) in slots {
                let w = groups.weights[groups.offsets[active[i]] + j];
                let y = &outputs[i][j * hidden..(j + 1) * hidden];
                o.iter_mut().zip(y).for_each(|(a, b)| *a += w * b);
            }
        });
    Ok(())
}
