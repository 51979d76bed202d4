//! Shared helpers of the GPU tests.
#![allow(dead_code)]

#[path = "../shared/rng.rs"]
mod rng;
use arbor_kernels::cuda::Gpu;
pub use rng::Rng;
use std::sync::{Arc, OnceLock};

/// The GPU to test on (`ARBOR_TEST_GPU`, default 0), or `None` after printing why the test
/// is skipped. With `ARBOR_REQUIRE_GPU=1` a missing GPU fails the test instead.
pub fn gpu() -> Option<Arc<Gpu>> {
    static GPU: OnceLock<Result<Arc<Gpu>, String>> = OnceLock::new();
    let ordinal = std::env::var("ARBOR_TEST_GPU")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    match GPU.get_or_init(|| Gpu::open(ordinal).map_err(|e| e.to_string())) {
        Ok(g) => Some(g.clone()),
        Err(why) => {
            if std::env::var_os("ARBOR_REQUIRE_GPU").is_some() {
                panic!("ARBOR_REQUIRE_GPU is set but no GPU could be opened: {why}");
            }
            eprintln!("skipped (no GPU): {why}");
            None
        }
    }
}

/// Normalised mean squared error of `got` against `want`: Σ(got−want)² / Σwant².
pub fn nmse(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (g, w) in got.iter().zip(want) {
        num += (*g as f64 - *w as f64).powi(2);
        den += (*w as f64).powi(2);
    }
    if den == 0.0 {
        num
    } else {
        num / den
    }
}

/// Deterministic pseudo-random f32s in [-scale, scale).
pub fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}
