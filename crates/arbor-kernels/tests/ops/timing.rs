//! Rough timings of the hot ops, printed rather than asserted (timing is not a test):
//! `cargo test -p arbor-kernels --test ops timing -- --ignored --nocapture`.

use crate::common::Rng;
use arbor_kernels::kv::{KvCache, KvDtype, KvLayout};
use arbor_kernels::ops::{
    log_softmax, paged_attention, sample, sample_batch, softmax_inplace, AttentionParams,
    SamplingParams,
};
use std::time::Instant;

/// Fastest wall time of `f` over `iters` runs, in µs (the minimum is the statistic least
/// disturbed by other processes on a shared machine).
pub fn min_us(iters: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut times: Vec<f64> = (0..iters)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[0]
}

#[test]
#[ignore = "timing; run with --ignored --nocapture"]
fn timing_sample() {
    let vocab = 49152;
    let mut rng = Rng::new(1);
    let logits = rng.normals(vocab, 3.0);
    let history: Vec<u32> = (0..1024).map(|_| rng.below(vocab) as u32).collect();
    let base = SamplingParams {
        temperature: 0.8,
        seed: 3,
        ..SamplingParams::default()
    };
    let cases = [
        (
            "greedy",
            SamplingParams {
                temperature: 0.0,
                ..base.clone()
            },
        ),
        ("temperature only", base.clone()),
        (
            "temperature 1 (the draw reuses the statistics' exponentials)",
            SamplingParams {
                temperature: 1.0,
                ..base.clone()
            },
        ),
        (
            "top_k 50",
            SamplingParams {
                top_k: 50,
                ..base.clone()
            },
        ),
        (
            "top_p 0.9",
            SamplingParams {
                top_p: 0.9,
                ..base.clone()
            },
        ),
        (
            "min_p 0.05",
            SamplingParams {
                min_p: 0.05,
                ..base.clone()
            },
        ),
        (
            "top_k 40 + top_p 0.95 + min_p 0.05",
            SamplingParams {
                top_k: 40,
                top_p: 0.95,
                min_p: 0.05,
                ..base.clone()
            },
        ),
        (
            "top_p 0.9 + penalties (1024 history) + 5 logprobs",
            SamplingParams {
                top_p: 0.9,
                repetition_penalty: 1.1,
                frequency_penalty: 0.2,
                presence_penalty: 0.2,
                top_logprobs: 5,
                ..base.clone()
            },
        ),
    ];
    for (name, p) in &cases {
        let mut step = 0;
        let us = min_us(500, || {
            step += 1;
            std::hint::black_box(sample(&logits, p, &history, step));
        });
        println!("sample, vocab {vocab}, {name}: {us:.1} µs");
    }
    let rows = 64;
    let batch_logits = rng.normals(rows * vocab, 3.0);
    let p = SamplingParams { top_p: 0.9, ..base };
    let row_args: Vec<(&SamplingParams, &[u32], u64)> =
        (0..rows).map(|i| (&p, &history[..], i as u64)).collect();
    let us = min_us(20, || {
        std::hint::black_box(sample_batch(&batch_logits, vocab, &row_args));
    });
    println!(
        "sample_batch, {rows} rows × vocab {vocab}, top_p 0.9: {us:.0} µs ({:.1} µs/row)",
        us / rows as f64
    );
}

#[test]
#[ignore = "timing; run with --ignored --nocapture"]
fn timing_softmax() {
    let vocab = 49152;
    let x = Rng::new(2).normals(vocab, 3.0);
    let mut y = x.clone();
    let us = min_us(500, || {
        y.copy_from_slice(&x);
        std::hint::black_box(softmax_inplace(&mut y));
    });
    println!("softmax_inplace, {vocab}: {us:.1} µs");
    let us = min_us(500, || log_softmax(&x, &mut y));
    println!("log_softmax, {vocab}: {us:.1} µs");
}

#[test]
#[ignore = "timing; run with --ignored --nocapture"]
fn timing_attention() {
    // SmolLM2-135M's shape: 9 query heads sharing 3 KV heads of 64 dims; one layer. Decode
    // (one row), a few rows, a prompt chunk; f32 and f16 pages; two context lengths.
    let (nh, nkv, hd) = (9, 3, 64);
    for (ctx, dtype) in [
        (512, KvDtype::F32),
        (4096, KvDtype::F32),
        (4096, KvDtype::F16),
    ] {
        let mut rng = Rng::new(3);
        let layout = KvLayout {
            num_layers: 1,
            num_kv_heads: nkv,
            head_dim: hd,
            page_size: 16,
        };
        let mut cache = KvCache::with_dtype(layout, ctx / 16 + 1, 0, dtype);
        cache.add_seq(1);
        cache.reserve(1, ctx).expect("pages");
        for pos in 0..ctx {
            let k = rng.normals(nkv * hd, 1.0);
            let v = rng.normals(nkv * hd, 1.0);
            cache.write(0, 1, pos, &k, &v);
        }
        let table = cache.table(1).expect("live");
        let p = AttentionParams {
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
            scale: 0.125,
            sliding_window: None,
        };
        // ROWS=n times only that row count.
        let only: Option<usize> = std::env::var("ROWS").ok().and_then(|r| r.parse().ok());
        for rows in [1, 8, 512]
            .into_iter()
            .filter(|r| only.is_none_or(|o| o == *r))
        {
            let positions: Vec<usize> = (ctx - rows..ctx).collect();
            let q = rng.normals(rows * nh * hd, 1.0);
            let mut out = vec![0.0; q.len()];
            let us = min_us(if rows > 8 { 20 } else { 300 }, || {
                paged_attention(&q, &positions, &cache.pool, 0, table, &p, &mut out);
            });
            println!("paged_attention {nh}x{hd} (kv {nkv}), {dtype:?} pages, context {ctx}, {rows} rows ending there: {us:.1} µs");
        }
    }
}
