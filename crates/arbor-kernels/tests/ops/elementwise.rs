//! Row-wise ops against f64 references: RMSNorm (plain, per row, fused add), SwiGLU,
//! softmax, log-softmax and the embedding gather.

use crate::common::{assert_close, Rng};
use arbor_kernels::ops::{
    add_rms_norm, embedding, log_softmax, rms_norm, rms_norm_rows, softmax_inplace, swiglu,
};
use arbor_kernels::quant::GgmlType;
use arbor_kernels::{KernelError, Weight};

fn rms_norm_f64(x: &[f32], w: &[f32], eps: f32) -> Vec<f64> {
    let ms = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (ms + eps as f64).sqrt();
    x.iter()
        .zip(w)
        .map(|(&v, &w)| v as f64 * inv * w as f64)
        .collect()
}

fn softmax_f64(x: &[f32]) -> Vec<f64> {
    let m = x
        .iter()
        .map(|&v| v as f64)
        .fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = x.iter().map(|&v| (v as f64 - m).exp()).collect();
    let z: f64 = e.iter().sum();
    e.iter().map(|v| v / z).collect()
}

fn log_softmax_f64(x: &[f32]) -> Vec<f64> {
    let m = x
        .iter()
        .map(|&v| v as f64)
        .fold(f64::NEG_INFINITY, f64::max);
    let lse = m + x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
    x.iter().map(|&v| v as f64 - lse).collect()
}

#[test]
fn rms_norm_matches_f64() {
    let mut rng = Rng::new(31);
    for n in [1, 7, 64, 576, 2049] {
        let x = rng.normals(n, 2.0);
        let w = rng.normals(n, 1.0);
        let mut out = vec![0.0; n];
        rms_norm(&x, &w, 1e-5, &mut out);
        assert_close(
            &out,
            &rms_norm_f64(&x, &w, 1e-5),
            1e-6,
            1e-5,
            &format!("n {n}"),
        );
    }
}

#[test]
fn rms_norm_handles_huge_tiny_and_zero_rows() {
    let w = vec![0.5f32; 8];
    let mut out = vec![0.0; 8];
    // Squares of 1e30 overflow f32; the result must still be x / rms · w.
    let huge: Vec<f32> = (0..8).map(|i| (i as f32 - 3.5) * 1e30).collect();
    rms_norm(&huge, &w, 1e-6, &mut out);
    assert_close(&out, &rms_norm_f64(&huge, &w, 1e-6), 1e-6, 1e-5, "huge");
    let tiny: Vec<f32> = (0..8).map(|i| (i as f32 - 3.5) * 1e-30).collect();
    rms_norm(&tiny, &w, 1e-6, &mut out);
    assert_close(
        &out,
        &rms_norm_f64(&tiny, &w, 1e-6),
        1e-30,
        1e-5,
        "tiny (eps dominates)",
    );
    rms_norm(&[0.0; 8], &w, 1e-6, &mut out);
    assert_eq!(out, vec![0.0; 8]);
}

#[test]
fn rms_norm_rows_normalises_each_row() {
    let mut rng = Rng::new(32);
    let (rows, d) = (6, 64);
    let x = rng.normals(rows * d, 3.0);
    let w = rng.normals(d, 1.0);
    let mut y = x.clone();
    rms_norm_rows(&mut y, &w, 1e-6);
    let want: Vec<f64> = x
        .chunks(d)
        .flat_map(|r| rms_norm_f64(r, &w, 1e-6))
        .collect();
    assert_close(&y, &want, 1e-6, 1e-5, "rows");
}

#[test]
fn add_rms_norm_updates_the_residual_and_normalises_it() {
    let mut rng = Rng::new(33);
    let n = 576;
    let r0 = rng.normals(n, 1.0);
    let x = rng.normals(n, 1.0);
    let w = rng.normals(n, 1.0);
    let mut residual = r0.clone();
    let mut out = vec![0.0; n];
    add_rms_norm(&mut residual, &x, &w, 1e-5, &mut out);
    let sum: Vec<f64> = r0
        .iter()
        .zip(&x)
        .map(|(&a, &b)| a as f64 + b as f64)
        .collect();
    assert_close(&residual, &sum, 1e-6, 1e-6, "residual");
    let sum32: Vec<f32> = sum.iter().map(|&v| v as f32).collect();
    assert_close(
        &out,
        &rms_norm_f64(&sum32, &w, 1e-5),
        1e-6,
        1e-5,
        "normalised",
    );
}

#[test]
fn swiglu_matches_f64_including_extremes() {
    let mut gate: Vec<f32> = (-400..=400).map(|i| i as f32 * 0.1).collect();
    gate.extend([
        -1e30,
        -100.0,
        -88.0,
        -87.0,
        87.0,
        100.0,
        1e30,
        f32::NEG_INFINITY,
    ]);
    let mut rng = Rng::new(34);
    let up = rng.normals(gate.len(), 2.0);
    let mut out = vec![0.0; gate.len()];
    swiglu(&gate, &up, &mut out);
    let want: Vec<f64> = gate
        .iter()
        .zip(&up)
        .map(|(&g, &u)| {
            let g = g as f64;
            let silu = if g == f64::NEG_INFINITY {
                0.0
            } else {
                g / (1.0 + (-g).exp())
            };
            silu * u as f64
        })
        .collect();
    assert_close(&out, &want, 1e-6, 1e-5, "swiglu");
    let mut nan = [0.0f32];
    swiglu(&[f32::NAN], &[1.0], &mut nan);
    assert!(nan[0].is_nan(), "a NaN gate must stay visible");
}

#[test]
fn softmax_matches_f64() {
    let mut rng = Rng::new(35);
    for (n, scale) in [(1, 1.0), (5, 1.0), (1000, 3.0), (49152, 5.0), (300, 50.0)] {
        let x = rng.normals(n, scale);
        let mut y = x.clone();
        let lse = softmax_inplace(&mut y);
        assert_close(&y, &softmax_f64(&x), 1e-8, 1e-5, &format!("softmax n {n}"));
        // log-sum-exp = x_i − log p_i for any i.
        let want_lse = x[0] as f64 - log_softmax_f64(&x)[0];
        assert!(
            (lse as f64 - want_lse).abs() < 1e-5 * (1.0 + want_lse.abs()),
            "lse n {n}: {lse} vs {want_lse}"
        );
        let mut ls = vec![0.0; n];
        log_softmax(&x, &mut ls);
        assert_close(
            &ls,
            &log_softmax_f64(&x),
            1e-5,
            1e-5,
            &format!("log_softmax n {n}"),
        );
    }
}

#[test]
fn softmax_edge_rows() {
    // All −∞ (or empty): no distribution.
    let mut x = vec![f32::NEG_INFINITY; 4];
    assert_eq!(softmax_inplace(&mut x), f32::NEG_INFINITY);
    assert_eq!(x, vec![0.0; 4]);
    let mut ls = vec![0.0; 4];
    log_softmax(&[f32::NEG_INFINITY; 4], &mut ls);
    assert_eq!(ls, vec![f32::NEG_INFINITY; 4]);
    assert_eq!(softmax_inplace(&mut []), f32::NEG_INFINITY);

    // Some −∞ and NaN entries get probability 0; the rest is a distribution.
    let row = [1.0, f32::NEG_INFINITY, 2.0, f32::NAN];
    let mut y = row;
    softmax_inplace(&mut y);
    assert_close(
        &y,
        &[0.2689414213699951, 0.0, 0.7310585786300049, 0.0],
        1e-7,
        1e-6,
        "partial",
    );
    log_softmax(&row, &mut ls);
    assert_eq!((ls[1], ls[3]), (f32::NEG_INFINITY, f32::NEG_INFINITY));
    assert!((ls[2] as f64 - 0.7310585786300049f64.ln()).abs() < 1e-6);

    // Huge values: no overflow, no cancellation of the gap between them.
    let big = [3e38f32, 3e38 - 2e32, -3e38, 1e30];
    let mut y = big;
    softmax_inplace(&mut y);
    assert_eq!(y, [1.0, 0.0, 0.0, 0.0]);
    let close = [1e30f32, 1e30 * (1.0 + f32::EPSILON)];
    log_softmax(&close, &mut ls[..2]);
    assert!(ls[..2].iter().all(|v| v.is_finite() && *v <= 0.0));

    // +∞ entries share the mass.
    let mut y = [f32::INFINITY, 0.0, f32::INFINITY];
    assert_eq!(softmax_inplace(&mut y), f32::INFINITY);
    assert_eq!(y, [0.5, 0.0, 0.5]);
    log_softmax(&[f32::INFINITY, 0.0, f32::INFINITY], &mut ls[..3]);
    assert_close(
        &ls[..3],
        &[-(2f64.ln()), f64::NEG_INFINITY, -(2f64.ln())],
        1e-7,
        0.0,
        "+inf",
    );
}

/// IEEE half bits of a few exactly representable values.
fn f16_bits(v: f32) -> u16 {
    match v {
        0.0 => 0x0000,
        1.0 => 0x3C00,
        -1.0 => 0xBC00,
        0.5 => 0x3800,
        2.0 => 0x4000,
        -2.0 => 0xC000,
        0.25 => 0x3400,
        _ => unreachable!("no f16 bits for {v} in this table"),
    }
}

#[test]
fn embedding_gathers_rows_of_each_stored_format() {
    // f32
    let (rows, cols) = (5, 3);
    let data: Vec<f32> = (0..rows * cols).map(|i| i as f32 * 0.5 - 1.0).collect();
    let t = Weight::from_f32(rows, cols, data.clone()).expect("f32 table");
    let tokens = [4u32, 0, 4, 2];
    let mut out = vec![0.0; tokens.len() * cols];
    embedding(&t, &tokens, &mut out).expect("gather");
    let want: Vec<f32> = tokens
        .iter()
        .flat_map(|&t| data[t as usize * cols..][..cols].to_vec())
        .collect();
    assert_eq!(out, want);

    // f16
    let vals = [[1.0, -1.0, 0.5, 2.0], [0.25, 0.0, -2.0, 1.0]];
    let bytes: Vec<u8> = vals
        .iter()
        .flatten()
        .flat_map(|&v| f16_bits(v).to_le_bytes())
        .collect();
    let t = Weight::from_raw(2, 4, GgmlType::F16, bytes).expect("f16 table");
    let mut out = vec![0.0; 8];
    embedding(&t, &[1, 0], &mut out).expect("gather f16");
    assert_eq!(out, [vals[1], vals[0]].concat());

    // Q8_0: per block of 32, an f16 scale then 32 signed bytes; value = scale · q.
    let mut bytes = Vec::new();
    for row in 0..3i32 {
        bytes.extend(f16_bits(0.5).to_le_bytes());
        bytes.extend((0..32).map(|i| (i - 16 + row) as i8 as u8));
    }
    let t = Weight::from_raw(3, 32, GgmlType::Q8_0, bytes).expect("q8_0 table");
    let mut out = vec![0.0; 64];
    embedding(&t, &[2, 0], &mut out).expect("gather q8_0");
    let want: Vec<f32> = [2, 0]
        .iter()
        .flat_map(|&r| (0..32).map(move |i| 0.5 * (i - 16 + r) as f32))
        .collect();
    assert_eq!(out, want);
}

#[test]
fn embedding_rejects_bad_input_without_writing() {
    let t = Weight::from_f32(4, 2, vec![1.0; 8]).expect("table");
    let mut out = vec![7.0; 6];
    let err = embedding(&t, &[0, 4, 1], &mut out).expect_err("token 4 is outside 4 rows");
    assert!(matches!(err, KernelError::Invalid(_)), "{err}");
    assert!(err.to_string().contains("token id 4"), "{err}");
    assert_eq!(out, vec![7.0; 6], "nothing written on error");
    let err = embedding(&t, &[u32::MAX], &mut out[..2]).expect_err("huge id");
    assert!(matches!(err, KernelError::Invalid(_)));
    let err = embedding(&t, &[0, 1], &mut out).expect_err("wrong out size");
    assert!(matches!(err, KernelError::Shape { .. }), "{err}");
    embedding(&t, &[], &mut []).expect("no tokens is fine");
}
