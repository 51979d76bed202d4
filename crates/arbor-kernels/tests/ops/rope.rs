//! Rotary position embeddings: layouts, partial rotary, scalings, and rotation properties.

use crate::common::{assert_close, Rng};
use arbor_kernels::ops::{RopeLayout, RopeScaling, RopeTable};

/// Maps a head in the interleaved layout onto the NEOX layout: pair `(2i, 2i+1)` goes to
/// `(i, i + rot_dim/2)`; dimensions from `rot_dim` on stay where they are.
fn interleaved_to_neox(head: &[f32], rot_dim: usize) -> Vec<f32> {
    let half = rot_dim / 2;
    let mut out = head.to_vec();
    for i in 0..half {
        out[i] = head[2 * i];
        out[i + half] = head[2 * i + 1];
    }
    out
}

/// Applies `interleaved_to_neox` to every head of `x`.
fn permute_heads(x: &[f32], head_dim: usize, rot_dim: usize) -> Vec<f32> {
    x.chunks(head_dim)
        .flat_map(|h| interleaved_to_neox(h, rot_dim))
        .collect()
}

fn table(layout: RopeLayout, rot_dim: usize) -> RopeTable {
    RopeTable::new(layout, rot_dim, 10_000.0, &RopeScaling::None)
}

#[test]
fn neox_and_interleaved_agree_under_the_pair_permutation() {
    let mut rng = Rng::new(21);
    let (n_heads, head_dim) = (3, 64);
    for rot_dim in [64, 32, 16] {
        let positions = [0, 1, 17, 500, 4095];
        let x = rng.normals(positions.len() * n_heads * head_dim, 1.0);
        let mut inter = x.clone();
        table(RopeLayout::Interleaved, rot_dim).apply(&mut inter, &positions, n_heads, head_dim);
        let mut neox = permute_heads(&x, head_dim, rot_dim);
        table(RopeLayout::Neox, rot_dim).apply(&mut neox, &positions, n_heads, head_dim);
        let want: Vec<f64> = permute_heads(&inter, head_dim, rot_dim)
            .iter()
            .map(|&v| v as f64)
            .collect();
        assert_close(&neox, &want, 1e-6, 0.0, &format!("rot_dim {rot_dim}"));
    }
}

#[test]
fn matches_the_rotation_formula() {
    // x'[i] = x[i] cos θ − x[i+h] sin θ, x'[i+h] = x[i] sin θ + x[i+h] cos θ with
    // θ = pos · base^(−2i/d), computed here in f64 from the base alone.
    let mut rng = Rng::new(22);
    let (n_heads, head_dim, base) = (2, 32, 10_000.0f64);
    let positions = [0, 3, 77, 1000];
    let x = rng.normals(positions.len() * n_heads * head_dim, 1.0);
    let mut got = x.clone();
    table(RopeLayout::Neox, head_dim).apply(&mut got, &positions, n_heads, head_dim);
    let half = head_dim / 2;
    let mut want = vec![0.0f64; x.len()];
    for (r, &pos) in positions.iter().enumerate() {
        for h in 0..n_heads {
            let o = (r * n_heads + h) * head_dim;
            for i in 0..half {
                let theta = pos as f64 * base.powf(-2.0 * i as f64 / head_dim as f64);
                let (a, b) = (x[o + i] as f64, x[o + i + half] as f64);
                want[o + i] = a * theta.cos() - b * theta.sin();
                want[o + i + half] = a * theta.sin() + b * theta.cos();
            }
        }
    }
    assert_close(&got, &want, 1e-5, 1e-5, "neox rotation");
}

#[test]
fn partial_rotary_leaves_the_other_dimensions_unchanged() {
    let mut rng = Rng::new(23);
    let (n_heads, head_dim, rot_dim) = (4, 64, 24);
    let positions = [5, 1234];
    for layout in [RopeLayout::Neox, RopeLayout::Interleaved] {
        let x = rng.normals(positions.len() * n_heads * head_dim, 1.0);
        let mut y = x.clone();
        table(layout, rot_dim).apply(&mut y, &positions, n_heads, head_dim);
        for (hx, hy) in x.chunks(head_dim).zip(y.chunks(head_dim)) {
            assert_eq!(
                &hx[rot_dim..],
                &hy[rot_dim..],
                "{layout:?}: pass-through dims changed"
            );
            assert_ne!(
                &hx[..rot_dim],
                &hy[..rot_dim],
                "{layout:?}: rotary dims unchanged"
            );
        }
    }
}

#[test]
fn position_zero_is_the_identity() {
    let mut rng = Rng::new(24);
    for layout in [RopeLayout::Neox, RopeLayout::Interleaved] {
        let x = rng.normals(3 * 64, 1.0);
        let mut y = x.clone();
        table(layout, 64).apply(&mut y, &[0], 3, 64);
        assert_eq!(x, y, "{layout:?}");
    }
}

#[test]
fn rotation_preserves_each_pair_norm() {
    let mut rng = Rng::new(25);
    let (n_heads, head_dim) = (2, 128);
    let positions = [1, 100, 8191, 131_071];
    let scaling = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position: 8192,
    };
    for layout in [RopeLayout::Neox, RopeLayout::Interleaved] {
        let t = RopeTable::new(layout, head_dim, 500_000.0, &scaling);
        let x = rng.normals(positions.len() * n_heads * head_dim, 3.0);
        let mut y = x.clone();
        t.apply(&mut y, &positions, n_heads, head_dim);
        let pair = |h: &[f32], i: usize| match layout {
            RopeLayout::Neox => (h[i] as f64, h[i + head_dim / 2] as f64),
            RopeLayout::Interleaved => (h[2 * i] as f64, h[2 * i + 1] as f64),
        };
        for (hx, hy) in x.chunks(head_dim).zip(y.chunks(head_dim)) {
            for i in 0..head_dim / 2 {
                let (a, b) = pair(hx, i);
                let (c, d) = pair(hy, i);
                let (n0, n1) = ((a * a + b * b).sqrt(), (c * c + d * d).sqrt());
                assert!(
                    (n0 - n1).abs() <= 1e-5 * (1.0 + n0),
                    "{layout:?} pair {i}: {n0} → {n1}"
                );
            }
        }
    }
}

#[test]
fn llama3_inverse_frequencies_follow_transformers() {
    // _compute_llama3_parameters for factor 8, low 1, high 4, original_max 8192, base 500000,
    // head_dim 128, evaluated here in f64.
    let (factor, low, high, old, base, dim) =
        (8.0f64, 1.0f64, 4.0f64, 8192.0f64, 500_000.0f64, 128);
    let low_wavelen = old / low;
    let high_wavelen = old / high;
    let want: Vec<f64> = (0..dim / 2)
        .map(|i| {
            let f = 1.0 / base.powf(2.0 * i as f64 / dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / f;
            if wavelen < high_wavelen {
                f
            } else if wavelen > low_wavelen {
                f / factor
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                (1.0 - smooth) * f / factor + smooth * f
            }
        })
        .collect();
    let scaling = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position: 8192,
    };
    let t = RopeTable::new(RopeLayout::Neox, dim, 500_000.0, &scaling);
    assert_close(t.inv_freq(), &want, 0.0, 1e-5, "llama3 inv_freq");
    // All three regimes occur: kept, divided by the factor, and smoothed in between.
    let unscaled = RopeTable::new(RopeLayout::Neox, dim, 500_000.0, &RopeScaling::None);
    let ratios: Vec<f32> = t
        .inv_freq()
        .iter()
        .zip(unscaled.inv_freq())
        .map(|(a, b)| b / a)
        .collect();
    assert!((ratios[0] - 1.0).abs() < 1e-6);
    assert!((ratios[dim / 2 - 1] - 8.0).abs() < 1e-4);
    assert!(
        ratios.iter().any(|&r| r > 1.01 && r < 7.99),
        "no smoothed frequencies: {ratios:?}"
    );
}

#[test]
fn linear_and_factor_scalings_divide_the_frequencies() {
    let unscaled = table(RopeLayout::Neox, 64);
    let linear = RopeTable::new(
        RopeLayout::Neox,
        64,
        10_000.0,
        &RopeScaling::Linear { factor: 4.0 },
    );
    let want: Vec<f64> = unscaled
        .inv_freq()
        .iter()
        .map(|&f| f as f64 / 4.0)
        .collect();
    assert_close(linear.inv_freq(), &want, 0.0, 1e-6, "linear");
    // Linear scaling at position 4p equals no scaling at position p.
    let mut rng = Rng::new(26);
    let x = rng.normals(2 * 64, 1.0);
    let (mut a, mut b) = (x.clone(), x.clone());
    linear.apply(&mut a, &[40], 2, 64);
    unscaled.apply(&mut b, &[10], 2, 64);
    let b64: Vec<f64> = b.iter().map(|&v| v as f64).collect();
    assert_close(&a, &b64, 1e-6, 1e-6, "linear at 4p vs none at p");

    let divisors: Vec<f32> = (0..32).map(|i| 1.0 + i as f32 * 0.5).collect();
    let factors = RopeTable::new(
        RopeLayout::Neox,
        64,
        10_000.0,
        &RopeScaling::Factors(divisors.clone()),
    );
    let want: Vec<f64> = unscaled
        .inv_freq()
        .iter()
        .zip(&divisors)
        .map(|(&f, &d)| f as f64 / d as f64)
        .collect();
    assert_close(factors.inv_freq(), &want, 0.0, 1e-6, "factors");
}

#[test]
fn every_head_of_a_row_turns_by_the_row_position() {
    let mut rng = Rng::new(27);
    let (n_heads, head_dim) = (5, 16);
    let head = rng.normals(head_dim, 1.0);
    let x: Vec<f32> = (0..2 * n_heads).flat_map(|_| head.clone()).collect();
    let mut y = x.clone();
    let t = table(RopeLayout::Interleaved, head_dim);
    t.apply(&mut y, &[7, 300], n_heads, head_dim);
    for (r, pos) in [7usize, 300].into_iter().enumerate() {
        let mut single = head.clone();
        t.apply(&mut single, &[pos], 1, head_dim);
        for h in 0..n_heads {
            assert_eq!(
                &y[(r * n_heads + h) * head_dim..][..head_dim],
                &single[..],
                "row {r} head {h}"
            );
        }
    }
}

#[test]
fn odd_shapes_do_not_panic() {
    let t = table(RopeLayout::Neox, 128);
    let mut x = vec![1.0f32; 2 * 64];
    // rot_dim above head_dim rotates what fits; missing positions leave rows alone.
    t.apply(&mut x, &[3], 2, 64);
    assert!(x.iter().all(|v| v.is_finite()));
    assert_eq!(x[..64], x[64..], "both heads turn alike");
    assert_ne!(x[..64], [1.0; 64]);
    t.apply(&mut x, &[], 2, 64);
    t.apply(&mut x, &[1, 2], 0, 64);
    t.apply(&mut [], &[1], 2, 64);
}
