//! Helpers shared by the op tests: a seeded random source and comparisons.

#[path = "../shared/rng.rs"]
mod rng;
pub use rng::Rng;

/// Asserts `|got − want| ≤ atol + rtol·|want|` elementwise, naming the first bad index.
#[track_caller]
pub fn assert_close(got: &[f32], want: &[f64], atol: f64, rtol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = if w.is_infinite() {
            g as f64 == w
        } else {
            (g as f64 - w).abs() <= atol + rtol * w.abs()
        };
        assert!(ok, "{what}: index {i}: got {g}, want {w}");
    }
}
