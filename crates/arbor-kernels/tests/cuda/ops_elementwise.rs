//! Embedding, RMSNorm, add + RMSNorm, row gather, SwiGLU and casts against their CPU
//! references (tolerances in `ops_common`).

use crate::common::{self, random};
use crate::ops_common::*;
use arbor_kernels::cuda::ops::{activation, embedding, kv, norm};
use arbor_kernels::{ops, Weight};
use half::bf16;

const HIDDENS: [usize; 4] = [576, 896, 1000, 4096];
const ROWS: [usize; 3] = [1, 7, 64];

#[test]
fn embedding_gather() {
    let Some(gpu) = common::gpu() else { return };
    let vocab = 1000;
    for hidden in HIDDENS {
        let table = round_bf16(&random(vocab * hidden, 1, 2.0));
        let w = Weight::from_f32(vocab, hidden, table.clone()).expect("table");
        let dtable = up(&gpu, &to_bf16(&table));
        for rows in ROWS {
            let tokens = random_indices(rows, vocab, rows as u64);
            let mut want = vec![0.0; rows * hidden];
            ops::embedding(&w, &tokens, &mut want).expect("cpu embedding");
            let mut out = zeros(&gpu, rows * hidden + 5);
            embedding::embedding(&gpu, &dtable, hidden, &up(&gpu, &tokens), rows, &mut out)
                .expect("embedding");
            let got = down(&gpu, &out, rows * hidden);
            check_exact(
                &format!("embedding hidden {hidden} rows {rows}"),
                &got,
                &want,
            );
        }
        // A token outside the vocabulary gives zeros (and no fault).
        let mut out = zeros(&gpu, 2 * hidden);
        let tokens = up(&gpu, &[vocab as u32, 3]);
        embedding::embedding(&gpu, &dtable, hidden, &tokens, 2, &mut out).expect("embedding");
        let got = down(&gpu, &out, 2 * hidden);
        assert!(got[..hidden].iter().all(|&x| x == 0.0), "out-of-vocab row");
        assert_eq!(&got[hidden..], &table[3 * hidden..4 * hidden]);
    }
}

#[test]
fn rms_norm_rows() {
    let Some(gpu) = common::gpu() else { return };
    for hidden in HIDDENS {
        for rows in ROWS {
            for (scale, eps) in [(1.0, 1e-6), (100.0, 1e-5), (1e-3, 1e-6)] {
                let seed = (hidden * 131 + rows) as u64;
                let x = random(rows * hidden, seed, scale);
                let w = random(hidden, seed + 1, 1.5);
                let mut want = vec![0.0; rows * hidden];
                for (xi, o) in x.chunks(hidden).zip(want.chunks_mut(hidden)) {
                    ops::rms_norm(xi, &w, eps, o);
                }
                let mut out = zeros(&gpu, rows * hidden);
                norm::rms_norm(
                    &gpu,
                    &up(&gpu, &x),
                    &up(&gpu, &w),
                    eps,
                    rows,
                    hidden,
                    &mut out,
                )
                .expect("rms_norm");
                let got = down_bf16(&gpu, &out, rows * hidden);
                check_bf16(
                    &format!("rms_norm hidden {hidden} rows {rows} scale {scale} eps {eps}"),
                    &got,
                    &want,
                );
            }
        }
    }
}

#[test]
fn add_rms_norm_rows() {
    let Some(gpu) = common::gpu() else { return };
    let eps = 1e-5;
    for hidden in HIDDENS {
        for rows in ROWS {
            let seed = (hidden * 7 + rows) as u64;
            let x = random(rows * hidden, seed, 3.0);
            let delta = random(rows * hidden, seed + 1, 1.0);
            let w = random(hidden, seed + 2, 1.5);
            let mut want_x = x.clone();
            let mut want = vec![0.0; rows * hidden];
            for ((xi, di), o) in want_x
                .chunks_mut(hidden)
                .zip(delta.chunks(hidden))
                .zip(want.chunks_mut(hidden))
            {
                ops::add_rms_norm(xi, di, &w, eps, o);
            }
            let mut dx = up(&gpu, &x);
            let mut out = zeros(&gpu, rows * hidden);
            norm::add_rms_norm(
                &gpu,
                &mut dx,
                &up(&gpu, &delta),
                &up(&gpu, &w),
                eps,
                rows,
                hidden,
                &mut out,
            )
            .expect("add_rms_norm");
            let what = format!("add_rms_norm hidden {hidden} rows {rows}");
            check_exact(
                &format!("{what} residual"),
                &down(&gpu, &dx, rows * hidden),
                &want_x,
            );
            check_bf16(&what, &down_bf16(&gpu, &out, rows * hidden), &want);
        }
    }
}

#[test]
fn add_inplace_is_the_residual_add() {
    let Some(gpu) = common::gpu() else { return };
    for hidden in HIDDENS {
        for rows in ROWS {
            let seed = (hidden * 13 + rows) as u64;
            let n = rows * hidden;
            let x = random(n + 3, seed, 3.0);
            let delta = random(n, seed + 1, 1.0);
            // The CPU reference's residual stream: what add_rms_norm leaves in its residual.
            let mut want = x.clone();
            let (w, mut normed) = (vec![1.0; hidden], vec![0.0; hidden]);
            for (xi, di) in want[..n].chunks_mut(hidden).zip(delta.chunks(hidden)) {
                ops::add_rms_norm(xi, di, &w, 1e-6, &mut normed);
            }
            let mut dx = up(&gpu, &x);
            norm::add_inplace(&gpu, &mut dx, &up(&gpu, &delta), n).expect("add_inplace");
            // Elements beyond n stay as they were.
            check_exact(
                &format!("add_inplace hidden {hidden} rows {rows}"),
                &down(&gpu, &dx, n + 3),
                &want,
            );
        }
    }
    let mut short = zeros::<f32>(&gpu, 4);
    let err = norm::add_inplace(&gpu, &mut short, &zeros(&gpu, 8), 8).expect_err("x too short");
    assert!(err.to_string().contains("add_inplace"), "{err}");
}

#[test]
fn gather_rows_by_index() {
    let Some(gpu) = common::gpu() else { return };
    for (width, src_rows) in [(1000, 64), (32000, 7), (151_936, 3)] {
        let x = random(src_rows * width, width as u64, 10.0);
        let mut idx = random_indices(9, src_rows, 5);
        idx.push(src_rows as u32); // beyond x: zeros
        let n = idx.len();
        let mut want = vec![0.0; n * width];
        for (i, &s) in idx.iter().enumerate() {
            if (s as usize) < src_rows {
                want[i * width..(i + 1) * width]
                    .copy_from_slice(&x[s as usize * width..(s as usize + 1) * width]);
            }
        }
        let mut out = zeros(&gpu, n * width);
        norm::gather_rows(&gpu, &up(&gpu, &x), width, &up(&gpu, &idx), n, &mut out)
            .expect("gather_rows");
        check_exact(
            &format!("gather_rows width {width} from {src_rows} rows"),
            &down(&gpu, &out, n * width),
            &want,
        );
    }
}

#[test]
fn swiglu_rows() {
    let Some(gpu) = common::gpu() else { return };
    for inter in [576, 896, 1000, 4864] {
        for rows in ROWS {
            for scale in [4.0, 100.0] {
                let gu = random(rows * 2 * inter, (inter + rows) as u64, scale);
                let mut want = vec![0.0; rows * inter];
                for (g, o) in gu.chunks(2 * inter).zip(want.chunks_mut(inter)) {
                    ops::swiglu(&g[..inter], &g[inter..], o);
                }
                let mut out = zeros(&gpu, rows * inter);
                activation::swiglu(&gpu, &up(&gpu, &gu), rows, inter, &mut out).expect("swiglu");
                let got = down_bf16(&gpu, &out, rows * inter);
                check_bf16(
                    &format!("swiglu inter {inter} rows {rows} scale {scale}"),
                    &got,
                    &want,
                );
            }
        }
    }
    // silu(−∞) = 0, as on the CPU.
    let gu = [f32::NEG_INFINITY, -1000.0, 2.0, 3.0];
    let mut out = zeros(&gpu, 2);
    activation::swiglu(&gpu, &up(&gpu, &gu), 1, 2, &mut out).expect("swiglu");
    assert_eq!(down_bf16(&gpu, &out, 2), vec![0.0, 0.0]);
}

/// Special values and a spread of magnitudes (subnormals to near overflow).
fn cast_inputs() -> Vec<f32> {
    let mut v = random(100_003, 9, 1.0);
    for (i, x) in v.iter_mut().enumerate().take(40_000) {
        *x *= 2f32.powi((i % 250) as i32 - 130);
    }
    v.extend([
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::MAX,
        f32::MIN_POSITIVE,
        1.0e-40,
        3.39e38,                   // rounds to +∞ in bf16
        1.0 + 2f32.powi(-8),       // a tie: rounds to even (1.0)
        1.0 + 3.0 * 2f32.powi(-8), // a tie: rounds up
    ]);
    v
}

#[test]
fn cast_f32_bf16_roundtrip() {
    let Some(gpu) = common::gpu() else { return };
    let x = cast_inputs();
    let n = x.len();
    let mut b = zeros::<bf16>(&gpu, n);
    kv::cast_f32_to_bf16(&gpu, &up(&gpu, &x), n, &mut b).expect("cast to bf16");
    let got: Vec<u16> = down(&gpu, &b, n).iter().map(|v| v.to_bits()).collect();
    let want: Vec<u16> = x.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
    if let Some(i) = (0..n).find(|&i| got[i] != want[i]) {
        panic!(
            "cast_f32_to_bf16 of {}: {:#06x}, want {:#06x}",
            x[i], got[i], want[i]
        );
    }
    println!("cast_f32_to_bf16: {n} values bit-exact");
    let mut back = zeros::<f32>(&gpu, n);
    kv::cast_bf16_to_f32(&gpu, &b, n, &mut back).expect("cast to f32");
    check_exact("cast_bf16_to_f32", &down(&gpu, &back, n), &round_bf16(&x));
}

#[test]
fn elementwise_shape_errors() {
    let Some(gpu) = common::gpu() else { return };
    let x = zeros::<f32>(&gpu, 100);
    let w = zeros::<f32>(&gpu, 10);
    let mut out = zeros::<bf16>(&gpu, 100);
    let e = norm::rms_norm(&gpu, &x, &w, 1e-6, 11, 10, &mut out).expect_err("x too short");
    println!("{e}");
    assert!(e.to_string().contains("rms_norm"), "{e}");
    let e = norm::rms_norm(&gpu, &x, &w, 1e-6, 5, 20, &mut out).expect_err("weight too short");
    assert!(e.to_string().contains("weight"), "{e}");
    let e = activation::swiglu(&gpu, &x, 2, 30, &mut out).expect_err("gu too short");
    assert!(e.to_string().contains("swiglu"), "{e}");
    let mut f = zeros::<f32>(&gpu, 10);
    let e = embedding::embedding(&gpu, &out, 10, &up(&gpu, &[1u32]), 2, &mut f)
        .expect_err("tokens too short");
    assert!(e.to_string().contains("embedding"), "{e}");
}
