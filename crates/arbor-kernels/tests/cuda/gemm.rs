//! cuBLASLt bf16 GEMM (`out = x · wᵀ`, f32 accumulate and output) against an f64 reference
//! on the same bf16 inputs.
//!
//! Tolerance: NMSE ≤ 1e-6. Products of bf16 values are exact in f32, so the only error is
//! f32 accumulation over k ≤ 4864 terms: about √k · 2⁻²⁴ ≈ 4e-6 relative per element for
//! random signs (NMSE ~1e-11), k · 2⁻²⁴ ≈ 3e-4 in the worst case (NMSE ≤ 1e-7). 1e-6 leaves
//! room for split-K and tensor-core summation orders, while any layout mistake (a transposed
//! or shifted operand, a wrong leading dimension) gives an NMSE near 1 or 2.

use crate::common;
use arbor_kernels::cuda::gemm::Gemm;
use arbor_kernels::cuda::Gpu;
use half::bf16;
use rayon::prelude::*;
use std::sync::Arc;

const TOL: f64 = 1e-6;

fn bf16_random(n: usize, seed: u64, scale: f32) -> Vec<bf16> {
    common::random(n, seed, scale)
        .into_iter()
        .map(bf16::from_f32)
        .collect()
}

/// `x · wᵀ` in f64 for every row and the output columns `cols`, row-major `m × cols.len()`.
fn reference(x: &[bf16], w: &[bf16], m: usize, k: usize, cols: &[usize]) -> Vec<f32> {
    (0..m)
        .into_par_iter()
        .flat_map_iter(|r| {
            let xr = &x[r * k..(r + 1) * k];
            cols.iter().map(move |&c| {
                let wr = &w[c * k..(c + 1) * k];
                xr.iter()
                    .zip(wr)
                    .map(|(a, b)| a.to_f64() * b.to_f64())
                    .sum::<f64>() as f32
            })
        })
        .collect()
}

/// The columns to check: all of them, or an even spread of 2048 (plus the last) for huge n.
fn columns(n: usize) -> Vec<usize> {
    if n <= 8192 {
        (0..n).collect()
    } else {
        let mut c: Vec<usize> = (0..2048).map(|i| i * n / 2048).collect();
        c.push(n - 1);
        c
    }
}

fn pick(out: &[f32], n: usize, m: usize, cols: &[usize]) -> Vec<f32> {
    (0..m)
        .flat_map(|r| cols.iter().map(move |&c| out[r * n + c]))
        .collect()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Checks `matmul_bt` (and `matmul_bt_acc` onto a prefilled output) for n × k weights and
/// each m, with buffers one row longer than needed whose extra row must stay untouched.
fn check_shape(gpu: &Arc<Gpu>, gemm: &Gemm, n: usize, k: usize, ms: &[usize]) {
    let max_m = ms.iter().copied().max().unwrap_or(1);
    let w = bf16_random(n * k, (n * 31 + k) as u64, 1.0);
    let x = bf16_random((max_m + 1) * k, (n + k) as u64, 1.0);
    let w_dev = gpu.upload(&w, "w").expect("upload w");
    let x_dev = gpu.upload(&x, "x").expect("upload x");
    let cols = columns(n);
    let mut failures = Vec::new();
    for &m in ms {
        let want = reference(&x, &w, m, k, &cols);
        const SENTINEL: f32 = 12345.0;
        let prefill: Vec<f32> = common::random((m + 1) * n, m as u64 + 7, 2.0);
        let mut out_host = prefill.clone();
        out_host[m * n..].fill(SENTINEL);
        let mut out = gpu.upload(&out_host, "out").expect("upload out");

        gemm.matmul_bt(&x_dev, m, &w_dev, n, k, &mut out)
            .expect("matmul_bt");
        let got = gpu.download(&out, "out").expect("download");
        let picked = pick(&got, n, m, &cols);
        let e = common::nmse(&picked, &want);
        eprintln!(
            "  n={n} k={k} m={m}: nmse {e:.3e}, max |err| {:.3e}",
            max_abs(&picked, &want)
        );
        if e.is_nan() || e > TOL {
            failures.push(format!("matmul_bt n={n} k={k} m={m}: nmse {e:.3e}"));
        }
        if got[m * n..].iter().any(|&v| v != SENTINEL) {
            failures.push(format!("matmul_bt n={n} k={k} m={m} wrote past row m"));
        }
        // Same shape again (the cached plan): the same bits.
        gemm.matmul_bt(&x_dev, m, &w_dev, n, k, &mut out)
            .expect("matmul_bt again");
        if gpu.download(&out, "out").expect("download") != got {
            failures.push(format!("matmul_bt n={n} k={k} m={m}: a second run differs"));
        }

        // Accumulate onto the prefill.
        let mut acc = gpu.upload(&out_host, "acc").expect("upload acc");
        gemm.matmul_bt_acc(&x_dev, m, &w_dev, n, k, &mut acc)
            .expect("matmul_bt_acc");
        let got = gpu.download(&acc, "acc").expect("download");
        let base = pick(&prefill, n, m, &cols);
        let want_acc: Vec<f32> = want.iter().zip(&base).map(|(a, b)| a + b).collect();
        let e = common::nmse(&pick(&got, n, m, &cols), &want_acc);
        if e.is_nan() || e > TOL {
            failures.push(format!("matmul_bt_acc n={n} k={k} m={m}: nmse {e:.3e}"));
        }
        if got[m * n..].iter().any(|&v| v != SENTINEL) {
            failures.push(format!("matmul_bt_acc n={n} k={k} m={m} wrote past row m"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn gemm_for(gpu: &Arc<Gpu>) -> Gemm {
    Gemm::new(gpu).unwrap_or_else(|e| panic!("a GPU is present but cuBLASLt is not usable: {e}"))
}

const MS: &[usize] = &[1, 7, 64, 300];

#[test]
fn gemm_square_576() {
    let Some(gpu) = common::gpu() else { return };
    let gemm = gemm_for(&gpu);
    check_shape(&gpu, &gemm, 576, 576, MS);
}

#[test]
fn gemm_1536x576() {
    let Some(gpu) = common::gpu() else { return };
    let gemm = gemm_for(&gpu);
    check_shape(&gpu, &gemm, 1536, 576, MS);
}

#[test]
fn gemm_896x4864() {
    let Some(gpu) = common::gpu() else { return };
    let gemm = gemm_for(&gpu);
    check_shape(&gpu, &gemm, 896, 4864, MS);
    check_shape(&gpu, &gemm, 4864, 896, MS);
}

#[test]
fn gemm_lm_head_151936x896() {
    let Some(gpu) = common::gpu() else { return };
    let gemm = gemm_for(&gpu);
    check_shape(&gpu, &gemm, 151936, 896, MS);
}

#[test]
fn gemm_odd_sizes() {
    let Some(gpu) = common::gpu() else { return };
    let gemm = gemm_for(&gpu);
    for (n, k) in [(1, 1), (3, 1), (17, 7), (1000, 333), (4097, 129), (5, 4099)] {
        check_shape(&gpu, &gemm, n, k, &[1, 3, 7, 64, 300]);
    }
}

#[test]
fn gemm_rejects_short_buffers() {
    let Some(gpu) = common::gpu() else { return };
    let gemm = gemm_for(&gpu);
    let x = gpu
        .upload(&bf16_random(8 * 16, 1, 1.0), "x")
        .expect("upload");
    let w = gpu
        .upload(&bf16_random(4 * 16, 2, 1.0), "w")
        .expect("upload");
    let mut out = gpu.zeros::<f32>(8 * 4, "out").expect("alloc");
    assert!(
        gemm.matmul_bt(&x, 9, &w, 4, 16, &mut out).is_err(),
        "x too short"
    );
    assert!(
        gemm.matmul_bt(&x, 8, &w, 5, 16, &mut out).is_err(),
        "w too short"
    );
    assert!(gemm.matmul_bt(&x, 8, &w, 4, 0, &mut out).is_err(), "k = 0");
    let mut small = gpu.zeros::<f32>(8 * 4 - 1, "out").expect("alloc");
    assert!(
        gemm.matmul_bt(&x, 8, &w, 4, 16, &mut small).is_err(),
        "out too short"
    );
    gemm.matmul_bt(&x, 0, &w, 4, 16, &mut out)
        .expect("m = 0 is a no-op");
    gemm.matmul_bt(&x, 8, &w, 4, 16, &mut out).expect("fits");
}
