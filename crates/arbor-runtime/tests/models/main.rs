//! The transformer against HF transformers: tiny random-weight fixtures of every
//! architecture (dense and MoE), and the real default model (SmolLM2-135M-Instruct GGUF).

mod engine;
mod fixtures;
#[cfg(feature = "cuda")]
mod gpu;
#[cfg(feature = "cuda")]
mod gpu_graph;
#[cfg(feature = "cuda")]
mod gpu_moe;
#[cfg(feature = "cuda")]
mod gpu_tree;
mod kv_tree;
mod moe;
mod moe_gguf;
mod moe_replay;
mod reward;
mod smollm2;
mod sparse_accuracy;
mod tree_attention;

/// (NMSE, max abs error) of `got` against `want`.
pub fn errors(got: &[f32], want: &[f32]) -> (f64, f64) {
    assert_eq!(got.len(), want.len());
    let (mut num, mut den, mut max) = (0.0f64, 0.0f64, 0.0f64);
    for (g, w) in got.iter().zip(want) {
        let d = (*g as f64 - *w as f64).abs();
        num += d * d;
        den += (*w as f64) * (*w as f64);
        max = max.max(d);
    }
    (num / den, max)
}

/// Index of the largest value.
pub fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold(0, |b, (i, x)| if *x > v[b] { i } else { b })
}
