//! Mixture of experts on the GPU (`kernels/moe.cu`) against the CPU references of
//! `ops::moe`: routing (ties, NaN and infinite logits, renormalisation on and off), grouping
//! by expert, the grouped GEMM with uneven and empty experts and odd sizes, and a whole MoE
//! block with a shared expert.
//!
//! Tolerances: routing picks the same experts exactly (the GPU computes the CPU's
//! probabilities up to summation order, and ties are exact ties on both sides); weights
//! within 2e-6 relative. Grouping is exact. The grouped GEMM multiplies bf16 values exactly in
//! f32 and sums in f32: [`NMSE_F32`] against an f64 reference. The whole block rounds the
//! SwiGLU activations to bf16 where the CPU keeps f32: [`BLOCK_NMSE`].

use crate::common::{self, Rng};
use crate::ops_common::*;
use arbor_kernels::cuda::gemm::Gemm;
use arbor_kernels::cuda::ops::activation;
use arbor_kernels::cuda::ops::moe::{
    self, ExpertStatsRow, GpuExpertGroups, GroupedInput, SharedExpertOut,
};
use arbor_kernels::cuda::Gpu;
use arbor_kernels::ops::{self, ExpertFfn, Routing};
use arbor_kernels::{KernelError, Weight};
use half::bf16;

/// bf16 rounding of the activations (2⁻⁹ relative) through the down projection: NMSE
/// ~2e-6 measured in the CPU emulation of these kernels; a wrong expert, row or weight gives
/// 1e-2 or more.
const BLOCK_NMSE: f64 = 2e-5;

/// Routing of `rows` tokens with a chosen load: expert 0 takes most tokens, expert 1 none,
/// the upper half of the experts few (each token's experts distinct).
fn uneven_routing(rows: usize, experts: usize, top_k: usize, seed: u64) -> Routing {
    let mut rng = Rng::new(seed);
    let mut ids = Vec::with_capacity(rows * top_k);
    for _ in 0..rows {
        let mut chosen: Vec<u32> = Vec::new();
        // Expert 1 stays empty whenever the others can fill top-k.
        let allowed = |c: u32| c != 1 || experts <= top_k;
        while chosen.len() < top_k {
            let c = match rng.below(10) {
                0..=4 if chosen.is_empty() => 0,
                0..=7 => rng.below((experts / 2).max(1)) as u32,
                _ => rng.below(experts) as u32,
            };
            if allowed(c) && !chosen.contains(&c) {
                chosen.push(c);
            } else if chosen.len() + 1 == top_k && rng.below(4) == 0 {
                // Avoid long rejection loops for top-k close to the expert count.
                if let Some(c) = (0..experts as u32).find(|&c| allowed(c) && !chosen.contains(&c)) {
                    chosen.push(c);
                }
            }
        }
        ids.extend(chosen);
    }
    let weights = common::random(rows * top_k, seed + 1, 1.0)
        .iter()
        .map(|w| w.abs())
        .collect();
    Routing {
        top_k,
        experts: ids,
        weights,
    }
}

fn route_on_gpu(
    gpu: &Gpu,
    logits: &[f32],
    rows: usize,
    experts: usize,
    top_k: usize,
    renormalize: bool,
) -> (Vec<u32>, Vec<f32>, Vec<f32>) {
    let mut d_logits = up(gpu, logits);
    let mut ids = zeros::<u32>(gpu, rows * top_k + 3);
    let mut w = zeros::<f32>(gpu, rows * top_k + 3);
    moe::route_softmax_topk(
        gpu,
        &mut d_logits,
        rows,
        experts,
        top_k,
        renormalize,
        None,
        &mut ids,
        &mut w,
    )
    .expect("route");
    (
        down(gpu, &ids, rows * top_k),
        down(gpu, &w, rows * top_k),
        down(gpu, &d_logits, rows * experts),
    )
}

#[test]
fn routing_matches_the_cpu_with_ties_and_non_finite_logits() {
    let Some(gpu) = common::gpu() else { return };
    for experts in [1usize, 3, 8, 60, 128, 257] {
        for rows in [1usize, 5, 33] {
            for top_k in [1usize, 2, 4, 8].into_iter().filter(|&k| k <= experts) {
                for renormalize in [false, true] {
                    let seed = (experts * 1000 + rows * 10 + top_k) as u64;
                    let mut l = common::random(rows * experts, seed, 4.0);
                    for (r, row) in l.chunks_mut(experts).enumerate() {
                        match r % 6 {
                            // Many exact ties, all ties, NaN, no finite value, several +∞.
                            1 => row.iter_mut().for_each(|x| *x = x.round()),
                            2 => row.iter_mut().for_each(|x| *x = 1.5),
                            3 => row.iter_mut().step_by(2).for_each(|x| *x = f32::NAN),
                            4 => row.iter_mut().for_each(|x| *x = f32::NEG_INFINITY),
                            5 if experts > 2 => {
                                row[experts / 2] = f32::INFINITY;
                                row[experts - 1] = f32::INFINITY;
                                row[0] = f32::NAN;
                            }
                            _ => {}
                        }
                    }
                    let what = format!("E {experts} rows {rows} top-{top_k} renorm {renormalize}");
                    let want = ops::route_softmax_topk(&l, experts, top_k, renormalize)
                        .expect("cpu route");
                    let (ids, w, probs) = route_on_gpu(&gpu, &l, rows, experts, top_k, renormalize);
                    assert_eq!(ids, want.experts, "{what}: experts");
                    for (i, (g, x)) in w.iter().zip(&want.weights).enumerate() {
                        assert!(
                            (g - x).abs() <= 2e-6 * x.abs(),
                            "{what}: weight {i} is {g}, want {x}"
                        );
                    }
                    for (pr, lr) in probs.chunks(experts).zip(l.chunks(experts)) {
                        let mut p = lr.to_vec();
                        ops::softmax_inplace(&mut p);
                        for (a, b) in pr.iter().zip(&p) {
                            assert!((a - b).abs() <= 2e-6 * b.abs(), "{what}: p {a} vs {b}");
                        }
                    }
                }
            }
        }
    }
    // Bad shapes are errors.
    let mut l = up(&gpu, &[0.0f32; 8]);
    let (mut ids, mut w) = (zeros::<u32>(&gpu, 8), zeros::<f32>(&gpu, 8));
    assert!(moe::route_softmax_topk(&gpu, &mut l, 2, 4, 5, false, None, &mut ids, &mut w).is_err());
    assert!(moe::route_softmax_topk(&gpu, &mut l, 3, 4, 1, false, None, &mut ids, &mut w).is_err());
}

/// A CUDA graph's padding rows (from the device's real row count on) are routed to no expert:
/// id `experts`, weight 0; the grouping gives them no row and counts nothing for them.
#[test]
fn padding_rows_are_routed_nowhere_and_not_counted() {
    let Some(gpu) = common::gpu() else { return };
    let (rows, real, experts, top_k) = (8usize, 5usize, 6usize, 2usize);
    let l = common::random(rows * experts, 7, 3.0);
    let want = ops::route_softmax_topk(&l[..real * experts], experts, top_k, true).expect("cpu");
    let mut d_logits = up(&gpu, &l);
    let valid = up(&gpu, &[real as u32]);
    let (mut ids, mut w) = (
        zeros::<u32>(&gpu, rows * top_k),
        zeros::<f32>(&gpu, rows * top_k),
    );
    let v = valid.slice(..);
    moe::route_softmax_topk(
        &gpu,
        &mut d_logits,
        rows,
        experts,
        top_k,
        true,
        Some(&v),
        &mut ids,
        &mut w,
    )
    .expect("route");
    let (got_ids, got_w) = (down(&gpu, &ids, rows * top_k), down(&gpu, &w, rows * top_k));
    assert_eq!(&got_ids[..real * top_k], &want.experts[..]);
    assert!(
        got_ids[real * top_k..].iter().all(|&e| e == experts as u32),
        "{got_ids:?}"
    );
    assert!(got_w[real * top_k..].iter().all(|&x| x == 0.0), "{got_w:?}");
    let mut table = zeros::<u64>(&gpu, experts);
    let mut groups = GpuExpertGroups::new(&gpu, rows * top_k, experts).expect("groups");
    let stats = Some(ExpertStatsRow {
        table: &mut table,
        row: 0,
    });
    groups
        .group(&gpu, &ids, &w, rows, top_k, experts, stats)
        .expect("group");
    let counts = down(&gpu, &table, experts);
    assert_eq!(
        counts.iter().sum::<u64>(),
        (real * top_k) as u64,
        "{counts:?}"
    );
}

#[test]
fn grouping_matches_the_cpu_with_uneven_and_empty_experts() {
    let Some(gpu) = common::gpu() else { return };
    // Small capacity: grouping grows the buffers as needed.
    let mut groups = GpuExpertGroups::new(&gpu, 4, 2).expect("groups");
    for (i, &(rows, experts, top_k)) in [
        (1usize, 8usize, 2usize),
        (13, 6, 2),
        (5, 128, 8),
        (300, 8, 2),
        (64, 60, 4),
        (1100, 4, 3),
        (700, 128, 8),
        (3, 1, 1),
        (9, 1093, 1),
    ]
    .iter()
    .enumerate()
    {
        let routing = uneven_routing(rows, experts, top_k, 100 + i as u64);
        let want = ops::group_by_expert(&routing, experts).expect("cpu group");
        let mut stats = up(&gpu, &vec![7u64; 3 * experts]);
        groups
            .group(
                &gpu,
                &up(&gpu, &routing.experts),
                &up(&gpu, &routing.weights),
                rows,
                top_k,
                experts,
                Some(ExpertStatsRow {
                    table: &mut stats,
                    row: 1,
                }),
            )
            .expect("group");
        let got = groups.to_host(&gpu).expect("read back");
        let what = format!("rows {rows} E {experts} top-{top_k}");
        assert_eq!(got.offsets, want.offsets, "{what}: offsets");
        assert_eq!(got.rows, want.rows, "{what}: rows");
        assert_eq!(got.weights, want.weights, "{what}: weights");
        let table = down(&gpu, &stats, 3 * experts);
        for e in 0..experts {
            assert_eq!(table[e], 7, "{what}: stats row 0");
            assert_eq!(
                table[experts + e],
                7 + want.count(e) as u64,
                "{what}: stats"
            );
            assert_eq!(table[2 * experts + e], 7, "{what}: stats row 2");
        }
        println!(
            "{what}: grouping exact; tokens of the first experts {:?}",
            (0..experts.min(8))
                .map(|e| want.count(e))
                .collect::<Vec<_>>()
        );
    }
    // A stats row beyond the table is an error.
    let mut small = zeros::<u64>(&gpu, 8);
    let r = groups.group(
        &gpu,
        &up(&gpu, &[0u32, 1]),
        &up(&gpu, &[1.0f32, 1.0]),
        1,
        2,
        8,
        Some(ExpertStatsRow {
            table: &mut small,
            row: 1,
        }),
    );
    assert!(r.is_err());
}

/// One grouped GEMM case: gathered from tokens and from grouped rows, against f64.
#[allow(clippy::too_many_arguments)]
fn check_grouped_gemm(
    gpu: &Gpu,
    groups: &mut GpuExpertGroups,
    rows: usize,
    experts: usize,
    top_k: usize,
    n: usize,
    k: usize,
    seed: u64,
) {
    let routing = uneven_routing(rows, experts, top_k, seed);
    let g = ops::group_by_expert(&routing, experts).expect("cpu group");
    groups
        .group(
            gpu,
            &up(gpu, &routing.experts),
            &up(gpu, &routing.weights),
            rows,
            top_k,
            experts,
            None,
        )
        .expect("group");
    let a = rows * top_k;
    let w = round_bf16(&common::random(experts * n * k, seed + 2, 1.0));
    let dw = up(gpu, &to_bf16(&w));
    let dot = |x: &[f32], e: usize, c: usize| -> f32 {
        let wr = &w[(e * n + c) * k..(e * n + c + 1) * k];
        x.iter()
            .zip(wr)
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum::<f64>() as f32
    };
    for input in [GroupedInput::Tokens, GroupedInput::Grouped] {
        let x_rows = if input == GroupedInput::Tokens {
            rows
        } else {
            a
        };
        let x = round_bf16(&common::random(x_rows * k, seed + 3, 1.0));
        let mut want = vec![0.0f32; a * n];
        for e in 0..experts {
            for p in g.offsets[e]..g.offsets[e + 1] {
                let src = if input == GroupedInput::Tokens {
                    g.rows[p] as usize
                } else {
                    p
                };
                for c in 0..n {
                    want[p * n + c] = dot(&x[src * k..(src + 1) * k], e, c);
                }
            }
        }
        let mut out = up(gpu, &vec![f32::NAN; a * n + 7]);
        moe::grouped_matmul_bt(
            gpu,
            &up(gpu, &to_bf16(&x)),
            input,
            groups,
            &dw,
            n,
            k,
            &mut out,
        )
        .expect("grouped gemm");
        let got = down(gpu, &out, a * n);
        let what =
            format!("grouped GEMM {input:?} rows {rows} E {experts} top-{top_k} n {n} k {k}");
        check(&what, &got, &want, NMSE_F32);
    }
}

#[test]
fn grouped_gemm_matches_the_cpu_with_uneven_and_empty_experts() {
    let Some(gpu) = common::gpu() else { return };
    let mut groups = GpuExpertGroups::new(&gpu, 16, 8).expect("groups");
    // (rows, experts, top-k, n, k): decode-sized (8-row tiles) and prefill-sized (32-row
    // tiles: assignments ≥ 16 × experts), k a multiple of 8 (16-byte loads) or odd, n not a
    // multiple of a block's columns, chunks of k beyond one shared-memory tile.
    for (i, &(rows, experts, top_k, n, k)) in [
        (1usize, 8usize, 2usize, 64usize, 64usize),
        (13, 6, 2, 33, 72),
        (7, 5, 3, 31, 13),
        (40, 8, 2, 100, 37),
        (5, 128, 8, 48, 64),
        (300, 8, 2, 40, 2056),
        (90, 4, 2, 17, 600),
        (2, 3, 1, 1, 8),
        (200, 3, 1, 16, 520),
        (64, 32, 8, 384, 2048),
        (512, 16, 2, 96, 4104),
    ]
    .iter()
    .enumerate()
    {
        check_grouped_gemm(&gpu, &mut groups, rows, experts, top_k, n, k, 40 + i as u64);
    }
    // Shapes that do not fit are errors.
    let x = zeros::<bf16>(&gpu, 64);
    let w = zeros::<bf16>(&gpu, 64);
    let mut out = zeros::<f32>(&gpu, 64);
    let r = moe::grouped_matmul_bt(
        &gpu,
        &x,
        GroupedInput::Tokens,
        &groups,
        &w,
        64,
        64,
        &mut out,
    );
    assert!(r.is_err());
}

/// The whole MoE block: cuBLASLt router and shared expert, routing, grouping, grouped GEMMs,
/// SwiGLU and the combine, against `MoeBlock::forward`'s math on the same bf16 values.
#[allow(clippy::too_many_arguments)]
fn check_block(
    gpu: &std::sync::Arc<Gpu>,
    gemm: &Gemm,
    rows: usize,
    h: usize,
    ff: usize,
    experts: usize,
    top_k: usize,
    renormalize: bool,
    shared: usize,
    seed: u64,
) {
    let xn = round_bf16(&common::random(rows * h, seed, 2.0));
    let router = round_bf16(&common::random(experts * h, seed + 1, 0.3));
    let gu: Vec<Vec<f32>> = (0..experts)
        .map(|e| round_bf16(&common::random(2 * ff * h, seed + 10 + e as u64, 0.2)))
        .collect();
    let dn: Vec<Vec<f32>> = (0..experts)
        .map(|e| round_bf16(&common::random(h * ff, seed + 500 + e as u64, 0.2)))
        .collect();
    let d_xn = up(gpu, &to_bf16(&xn));
    // Router logits from cuBLASLt; the CPU routes the same logits.
    let mut logits = zeros::<f32>(gpu, rows * experts);
    gemm.matmul_bt(
        &d_xn,
        rows,
        &up(gpu, &to_bf16(&router)),
        experts,
        h,
        &mut logits,
    )
    .expect("router gemm");
    let host_logits = down(gpu, &logits, rows * experts);
    let routing =
        ops::route_softmax_topk(&host_logits, experts, top_k, renormalize).expect("route");
    let cpu_groups = ops::group_by_expert(&routing, experts).expect("group");
    let ffns: Vec<ExpertFfn> = (0..experts)
        .map(|e| ExpertFfn {
            gate_up: Weight::from_f32(2 * ff, h, gu[e].clone()).expect("w"),
            down: Weight::from_f32(h, ff, dn[e].clone()).expect("w"),
        })
        .collect();
    let mm = |x: &[f32], m: usize, w: &Weight, o: &mut [f32]| -> Result<(), KernelError> {
        ops::matmul::matmul_dequantized(x, m, w, o)
    };
    let mut want = vec![0.0f32; rows * h];
    ops::moe_experts(&xn, h, &cpu_groups, &ffns, &mm, &mut want).expect("cpu moe");
    let shared_w = (shared > 0).then(|| {
        let gu = round_bf16(&common::random(2 * shared * h, seed + 900, 0.2));
        let dn = round_bf16(&common::random(h * shared, seed + 901, 0.2));
        (gu, dn, common::random(h, seed + 902, 0.5))
    });
    if let Some((gu, dn, gate)) = &shared_w {
        let f = ExpertFfn {
            gate_up: Weight::from_f32(2 * shared, h, gu.clone()).expect("w"),
            down: Weight::from_f32(h, shared, dn.clone()).expect("w"),
        };
        let mut y = vec![0.0f32; rows * h];
        f.forward(&xn, rows, &mm, &mut y).expect("shared");
        for t in 0..rows {
            let z: f32 = xn[t * h..(t + 1) * h]
                .iter()
                .zip(gate)
                .map(|(a, b)| a * b)
                .sum();
            let g = 1.0 / (1.0 + (-z).exp());
            for c in 0..h {
                want[t * h + c] += g * y[t * h + c];
            }
        }
    }

    // The GPU pipeline, as the runtime runs it.
    let a = rows * top_k;
    let (mut ids, mut w) = (zeros::<u32>(gpu, a), zeros::<f32>(gpu, a));
    moe::route_softmax_topk(
        gpu,
        &mut logits,
        rows,
        experts,
        top_k,
        renormalize,
        None,
        &mut ids,
        &mut w,
    )
    .expect("route");
    let mut groups = GpuExpertGroups::new(gpu, a, experts).expect("groups");
    groups
        .group(gpu, &ids, &w, rows, top_k, experts, None)
        .expect("group");
    let stack = |m: &[Vec<f32>]| up(gpu, &to_bf16(&m.concat()));
    let mut gate_up = zeros::<f32>(gpu, a * 2 * ff);
    moe::grouped_matmul_bt(
        gpu,
        &d_xn,
        GroupedInput::Tokens,
        &groups,
        &stack(&gu),
        2 * ff,
        h,
        &mut gate_up,
    )
    .expect("gate/up");
    let mut act = zeros::<bf16>(gpu, a * ff);
    activation::swiglu(gpu, &gate_up, a, ff, &mut act).expect("swiglu");
    let mut y = zeros::<f32>(gpu, a * h);
    moe::grouped_matmul_bt(
        gpu,
        &act,
        GroupedInput::Grouped,
        &groups,
        &stack(&dn),
        h,
        ff,
        &mut y,
    )
    .expect("down");
    let mut out = up(gpu, &vec![f32::NAN; rows * h]);
    match &shared_w {
        None => moe::moe_combine(gpu, &y, &groups, h, None, &mut out).expect("combine"),
        Some((gu, dn, gate)) => {
            let mut sgu = zeros::<f32>(gpu, rows * 2 * shared);
            gemm.matmul_bt(&d_xn, rows, &up(gpu, &to_bf16(gu)), 2 * shared, h, &mut sgu)
                .expect("shared gate/up");
            let mut sact = zeros::<bf16>(gpu, rows * shared);
            activation::swiglu(gpu, &sgu, rows, shared, &mut sact).expect("shared swiglu");
            let mut sy = zeros::<f32>(gpu, rows * h);
            gemm.matmul_bt(&sact, rows, &up(gpu, &to_bf16(dn)), h, shared, &mut sy)
                .expect("shared down");
            let gate = up(gpu, gate);
            let sh = SharedExpertOut {
                y: &sy,
                xn: &d_xn,
                gate: &gate,
            };
            moe::moe_combine(gpu, &y, &groups, h, Some(sh), &mut out).expect("combine");
        }
    }
    let got = down(gpu, &out, rows * h);
    let what = format!(
        "MoE block rows {rows} h {h} ff {ff} E {experts} top-{top_k} renorm {renormalize} shared {shared}"
    );
    check(&what, &got, &want, BLOCK_NMSE);
}

#[test]
fn moe_block_matches_the_cpu() {
    let Some(gpu) = common::gpu() else { return };
    let gemm = Gemm::new(&gpu).expect("cuBLASLt");
    check_block(&gpu, &gemm, 7, 64, 32, 8, 2, true, 0, 1);
    check_block(&gpu, &gemm, 45, 64, 32, 8, 4, false, 48, 2);
    check_block(&gpu, &gemm, 3, 96, 40, 16, 4, true, 0, 4);
    check_block(&gpu, &gemm, 160, 72, 24, 8, 2, false, 20, 5);
    // Qwen3-30B-A3B's routing (128 experts, top-8) at decode and prefill sizes, narrower.
    check_block(&gpu, &gemm, 16, 256, 128, 128, 8, true, 0, 6);
    check_block(&gpu, &gemm, 300, 256, 128, 128, 8, true, 0, 7);
}
