//! Tests of weights interleaved in groups of eight rows (`quant::interleave`): the layout
//! keeps every value, and its kernels agree with the reference, with each other bit for bit,
//! and across batch sizes.

use super::matmul_tests::{check_against_reference, isas, random_weight, Rng};
use super::*;
use crate::quant::GgmlType;

const TYPES: [GgmlType; 8] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
];

fn bits(o: &[f32]) -> Vec<u32> {
    o.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn interleaving_keeps_every_value_and_raw_row() {
    let mut rng = Rng(101);
    for ty in TYPES {
        for (rows, nblocks) in [(8, 1), (24, 3), (136, 10)] {
            let cols = nblocks * ty.block_size();
            let w = random_weight(ty, rows, cols, &mut rng);
            let wi = w.clone().interleaved();
            assert!(matches!(wi.data, WeightData::Interleaved { .. }), "{ty}");
            let stored = crate::quant::interleave::row_bytes(ty, cols).unwrap();
            assert_eq!(wi.nbytes(), rows * stored, "{ty}");
            assert_eq!(
                bits(&wi.to_f32().unwrap()),
                bits(&w.to_f32().unwrap()),
                "{ty}"
            );
            let rb = ty.bytes_for(cols).unwrap();
            let (mut a, mut b) = (vec![0u8; 3 * rb], vec![0u8; 3 * rb]);
            for r0 in [0, 5, rows - 3] {
                w.raw_rows(r0, 3, &mut a).unwrap();
                wi.raw_rows(r0, 3, &mut b).unwrap();
                assert_eq!(a, b, "{ty} rows {r0}..+3");
            }
            assert!(
                wi.raw_rows(rows - 2, 3, &mut b).is_err(),
                "rows past the end"
            );
        }
    }
    // No interleaved form: other types, and row counts that are not whole groups.
    for (ty, rows) in [
        (GgmlType::Q8_1, 8),
        (GgmlType::Q3K, 8),
        (GgmlType::Q4_1, 12),
    ] {
        let w = random_weight(ty, rows, 256, &mut rng).interleaved();
        assert!(matches!(w.data, WeightData::Raw { .. }), "{ty} x{rows}");
    }
}

#[test]
fn interleaved_matmul_matches_reference_on_every_isa() {
    let mut rng = Rng(103);
    for ty in TYPES {
        // 1000 rows make several tasks even for m = 1; 8 rows are one group.
        for (rows, nblocks) in [(8, 1), (48, 3), (1000, 10)] {
            let cols = nblocks * ty.block_size();
            let w = random_weight(ty, rows, cols, &mut rng).interleaved();
            for m in [1, 3, 4, 6, 17] {
                let x = rng.vec(m * cols, 2.0);
                for isa in isas() {
                    let mut out = vec![f32::NAN; m * rows];
                    matmul_with(isa, &x, m, &w, &mut out).unwrap();
                    check_against_reference(ty, &w, &x, m, &out, 1e-5, &format!("{isa:?}"));
                }
            }
        }
    }
}

/// Every instruction set gives the same bits, and a row's result does not depend on the
/// other rows of its batch (tiles of 4, 3, 2 and 1 activation rows).
#[test]
fn interleaved_kernels_agree_bit_for_bit_across_isas_and_batches() {
    let mut rng = Rng(107);
    for ty in TYPES {
        let (rows, cols) = (136, 3 * 256);
        let w = random_weight(ty, rows, cols, &mut rng).interleaved();
        let m = 17;
        let x = rng.vec(m * cols, 3.0);
        let mut first: Option<Vec<u32>> = None;
        for isa in isas() {
            let mut all = vec![0.0f32; m * rows];
            matmul_with(isa, &x, m, &w, &mut all).unwrap();
            match &first {
                Some(f) => assert_eq!(f, &bits(&all), "{ty} {isa:?} against {:?}", isas()[0]),
                None => first = Some(bits(&all)),
            }
            for i in 0..m {
                let mut one = vec![0.0f32; rows];
                matmul_with(isa, &x[i * cols..(i + 1) * cols], 1, &w, &mut one).unwrap();
                assert_eq!(
                    bits(&one),
                    bits(&all[i * rows..(i + 1) * rows]),
                    "{ty} {isa:?} row {i}"
                );
            }
        }
    }
}

/// `--exact` multiplies dequantised weights: the same numbers whichever layout holds them.
#[test]
fn dequantized_matmul_reads_interleaved_weights() {
    let mut rng = Rng(109);
    for ty in TYPES {
        let cols = 2 * ty.block_size();
        let w = random_weight(ty, 40, cols, &mut rng);
        let wi = w.clone().interleaved();
        let x = rng.vec(5 * cols, 2.0);
        let (mut a, mut b) = (vec![0.0f32; 5 * 40], vec![0.0f32; 5 * 40]);
        matmul_dequantized(&x, 5, &w, &mut a).unwrap();
        assert!(matches!(wi.data, WeightData::Interleaved { .. }), "{ty}");
        matmul_dequantized(&x, 5, &wi, &mut b).unwrap();
        assert_eq!(bits(&a), bits(&b), "{ty}");
    }
}

#[test]
fn inconsistent_interleaved_weights_are_errors() {
    let mut rng = Rng(113);
    let w = random_weight(GgmlType::Q4_1, 16, 64, &mut rng).interleaved();
    let x = vec![0.5f32; 2 * 64];
    let mut out = vec![0.0f32; 2 * 16];
    assert!(matmul(&x, 2, &w, &mut out).is_ok());
    let WeightData::Interleaved { bytes, .. } = &w.data else {
        unreachable!()
    };
    let cases = [
        (
            12,
            GgmlType::Q4_1,
            bytes[..12 * 40].to_vec(),
            "rows not whole groups",
        ),
        (
            16,
            GgmlType::Q8_1,
            bytes.clone(),
            "type without an interleaved form",
        ),
        (16, GgmlType::Q4_1, bytes[1..].to_vec(), "truncated bytes"),
    ];
    for (rows, ty, bytes, what) in cases {
        let bad = Weight {
            rows,
            cols: 64,
            data: WeightData::Interleaved { ty, bytes },
        };
        let mut o = vec![0.0f32; 2 * rows];
        assert!(matmul(&x, 2, &bad, &mut o).is_err(), "{what}");
    }
    let acts = QuantizedActs::new(GgmlType::Q4_1, &x, 2, 64).unwrap();
    let isa = Isa::Scalar;
    let dt = crate::quant::dot_tile_interleaved;
    assert!(dt(isa, &bytes[..8 * 40], &acts, &mut out[..16], 8).is_ok());
    assert!(
        dt(isa, &bytes[..4 * 40], &acts, &mut out[..16], 8).is_err(),
        "half a group"
    );
    assert!(
        dt(isa, &bytes[..8 * 40], &acts, &mut out[..15], 8).is_err(),
        "short out"
    );
    let k = QuantizedActs::new(GgmlType::Q3K, &vec![0.0; 256], 1, 256).unwrap();
    assert!(
        dt(isa, &bytes[..8 * 40], &k, &mut out[..8], 8).is_err(),
        "a type without an interleaved form"
    );
}

/// Exact block sums scaled once per block round less than row-major's eight partial sums per
/// block: against the exact product of the same operands (dequantised weights times the
/// 8-bit activations, in f64), the interleaved kernels' squared error is the smaller.
#[test]
fn interleaved_sums_round_less_than_row_major() {
    let mut rng = Rng(127);
    for ty in TYPES {
        let (rows, cols, m) = (512, 768, 8);
        let w = random_weight(ty, rows, cols, &mut rng);
        let wi = w.clone().interleaved();
        let x = rng.vec(m * cols, 1.0);
        let acts = QuantizedActs::new(ty, &x, m, cols).unwrap();
        let xq: Vec<f64> = match acts.blocks() {
            crate::quant::ActBlocks::Q8(blocks) => blocks
                .iter()
                .flat_map(|b| b.qs.map(|q| b.d as f64 * q as f64))
                .collect(),
            crate::quant::ActBlocks::Q8K(blocks) => blocks
                .iter()
                .flat_map(|b| b.qs.map(|q| b.d as f64 * q as f64))
                .collect(),
        };
        let wf = w.to_f32().unwrap();
        let exact: Vec<f64> = (0..m * rows)
            .map(|k| {
                let (i, r) = (k / rows, k % rows);
                (0..cols)
                    .map(|c| wf[r * cols + c] as f64 * xq[i * cols + c])
                    .sum()
            })
            .collect();
        let err = |w: &Weight| {
            let mut got = vec![0.0f32; m * rows];
            matmul(&x, m, w, &mut got).unwrap();
            got.iter()
                .zip(&exact)
                .map(|(g, e)| (*g as f64 - e).powi(2))
                .sum::<f64>()
        };
        let (row_major, interleaved) = (err(&w), err(&wi));
        println!(
            "{ty}: squared rounding error row-major {row_major:.4e}, interleaved {interleaved:.4e}"
        );
        assert!(
            interleaved < row_major,
            "{ty}: {interleaved:.4e} >= {row_major:.4e}"
        );
    }
}

/// Matrices of different storage stacked by rows multiply part by part: the same bits as each
/// part alone, placed in its columns, in either layout.
#[test]
fn stacked_parts_multiply_in_their_own_types() {
    let mut rng = Rng(131);
    let cols = 512;
    let parts = vec![
        random_weight(GgmlType::Q4K, 24, cols, &mut rng),
        random_weight(GgmlType::Q6K, 8, cols, &mut rng),
        random_weight(GgmlType::Q8_0, 5, cols, &mut rng),
    ];
    let w = Weight::stacked(parts.clone()).unwrap();
    assert_eq!(
        (w.rows, w.nbytes()),
        (37, parts.iter().map(Weight::nbytes).sum())
    );
    let m = 3;
    let x = rng.vec(m * cols, 1.0);
    for (w, inter) in [(w.clone(), false), (w.clone().interleaved(), true)] {
        let mut all = vec![0.0f32; m * 37];
        matmul(&x, m, &w, &mut all).unwrap();
        let mut col = 0;
        for p in &parts {
            let p = if inter {
                p.clone().interleaved()
            } else {
                p.clone()
            };
            let mut one = vec![0.0f32; m * p.rows];
            matmul(&x, m, &p, &mut one).unwrap();
            for i in 0..m {
                assert_eq!(
                    bits(&one[i * p.rows..(i + 1) * p.rows]),
                    bits(&all[i * 37 + col..i * 37 + col + p.rows])
                );
            }
            col += p.rows;
        }
        let mut want = vec![0.0f32; m * 37];
        matmul_reference(&x, m, &w, &mut want).unwrap();
        let mut exact = vec![0.0f32; m * 37];
        matmul_dequantized(&x, m, &w, &mut exact).unwrap();
        let err = exact
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(err < 1e-3, "dequantized stacked: {err}");
    }
    let mut row = vec![0.0f32; cols];
    w.row_to_f32(30, &mut row).unwrap();
    let mut want = vec![0.0f32; cols];
    parts[1].row_to_f32(6, &mut want).unwrap();
    assert_eq!(bits(&row), bits(&want));
    assert!(w.row_to_f32(37, &mut row).is_err());
    let narrow = random_weight(GgmlType::Q8_0, 8, 256, &mut rng);
    assert!(Weight::stacked(vec![parts[0].clone(), narrow]).is_err());
}
