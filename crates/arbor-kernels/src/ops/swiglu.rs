//! SwiGLU gate: silu(gate) · up.

use super::softmax::{exp_nonpos, with_wide_vectors};

/// `out = silu(gate) · up` elementwise, with `silu(g) = g · sigmoid(g)`.
///
/// The sigmoid is evaluated from `e = exp(−|g|)` only (`1 / (1 + e)` for `g ≥ 0`,
/// `e / (1 + e)` below), which never overflows and vectorises; `silu(−∞) = 0`, NaN stays NaN.
pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    debug_assert!(gate.len() == up.len() && out.len() == gate.len());
    with_wide_vectors(
        #[inline(always)]
        || {
            for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
                *o = silu(g) * u;
            }
        },
    );
}

/// `g · sigmoid(g)`.
#[inline(always)]
fn silu(g: f32) -> f32 {
    let e = exp_nonpos(-g.abs());
    let sigmoid = if g >= 0.0 {
        1.0 / (1.0 + e)
    } else {
        e / (1.0 + e)
    };
    // Below −87, e is 0 and g · 0 would be NaN at −∞; silu there is below 1e−35 anyway.
    // (A NaN gate fails the test and stays NaN.)
    if sigmoid == 0.0 && g < 0.0 {
        0.0
    } else {
        g * sigmoid
    }
}
