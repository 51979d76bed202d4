//! Accuracy of sparse (Quest-style) attention on SmolLM2-135M: a natural text is prefilled
//! densely to 2K, 4K and ~8K tokens; from each context a fork decodes the next 64 tokens of the
//! text (teacher forcing) densely, and one fork per budget decodes them with that sparse
//! budget. Printed: logit NMSE against dense, top-1 agreement, and the change in the mean
//! negative log-likelihood of the text's next tokens. A few minutes on 2 cores, hence ignored:
//!
//! `cargo test -p arbor-runtime --test models sparse_accuracy -- --ignored --nocapture`
//!
//! The text is README.md and docs/API.md, or the files named (`:`-separated, relative to the
//! workspace root or absolute) by `ARBOR_SPARSE_TEXT`, repeated until long enough.

use super::{argmax, errors, smollm2};
use arbor_kernels::kv::SeqId;
use arbor_kernels::ops::cascade::CascadeMode;
use arbor_runtime::{Engine, EngineOptions, ForwardBatch, LogitsMode, SeqStep};
use std::path::PathBuf;
use std::time::Instant;

const DECODE: usize = 64;
const BUDGETS: [usize; 4] = [8, 16, 32, 64];

fn text() -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let files = std::env::var("ARBOR_SPARSE_TEXT").unwrap_or("README.md:docs/API.md".into());
    files
        .split(':')
        .map(|f| std::fs::read_to_string(root.join(f)).expect("text file"))
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// Logits after each of `tokens`, decoded one per step by a fork of `parent`.
fn decode(e: &mut Engine, parent: SeqId, tokens: &[u32], budget: Option<usize>) -> Vec<Vec<f32>> {
    let s = e.fork_seq(parent).expect("fork");
    let mut out = Vec::with_capacity(tokens.len());
    for &t in tokens {
        let step = SeqStep {
            seq: s,
            tokens: vec![t],
            logits: LogitsMode::Last,
            sparse_budget: budget,
            ..Default::default()
        };
        out.push(
            e.step(&ForwardBatch { seqs: vec![step] })
                .expect("step")
                .remove(0)
                .logits,
        );
    }
    e.free_seq(s);
    out
}

/// −log p(target) under `logits`.
fn nll(logits: &[f32], target: u32) -> f64 {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = logits.iter().map(|&x| (x as f64 - m).exp()).sum();
    -(logits[target as usize] as f64 - m - z.ln())
}

#[test]
#[ignore = "minutes on a CPU; run with --ignored --nocapture"]
fn sparse_accuracy() {
    let (engine, tok) = smollm2::engine(Default::default());
    let model = engine.model;
    let max_ctx = model.cfg.max_context;
    let mut e = Engine::new(
        model,
        &EngineOptions {
            kv_cache_bytes: 640 << 20,
            page_size: 16,
        },
    )
    .expect("engine");
    let once = tok.encode(&text(), false, false).expect("encode");
    let top = (8192 - DECODE).min(max_ctx - DECODE - 1);
    let mut ids = Vec::new();
    while ids.len() < top + DECODE + 1 {
        ids.extend_from_slice(&once);
    }
    println!(
        "text: {} tokens, repeated to {}; model context {max_ctx}",
        once.len(),
        ids.len()
    );
    println!(
        "| context | budget (pages) | dense layers | pages read / row / KV head | logit NMSE mean | logit NMSE max | top-1 agree | ΔNLL (nats) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let main = e.new_seq();
    let mut done = 0;
    for ctx in [2048, 4096, top] {
        let t0 = Instant::now();
        for chunk in ids[done..ctx].chunks(512) {
            let step = SeqStep {
                seq: main,
                tokens: chunk.to_vec(),
                ..Default::default()
            };
            e.step(&ForwardBatch { seqs: vec![step] }).expect("prefill");
        }
        let prefill_s = t0.elapsed().as_secs_f64();
        done = ctx;
        let next = &ids[ctx..ctx + DECODE];
        let targets = &ids[ctx + 1..ctx + DECODE + 1];
        let t1 = Instant::now();
        let dense = decode(&mut e, main, next, None);
        let dense_s = t1.elapsed().as_secs_f64();
        let dense_nll: f64 = dense
            .iter()
            .zip(targets)
            .map(|(l, &t)| nll(l, t))
            .sum::<f64>()
            / DECODE as f64;
        let pages = ctx.div_ceil(16);
        // First the noise floor: every page read, but through merged partials, which round
        // differently (the fast path's 8-bit activations amplify that); then each budget with
        // the first two layers dense (the default, as Quest) and with every layer sparse.
        let mut runs = vec![("all (merged)".to_string(), CascadeMode::Merge, 1 << 20, 0)];
        for b in BUDGETS {
            runs.push((b.to_string(), CascadeMode::Chain, b, 2));
            runs.push((b.to_string(), CascadeMode::Chain, b, 0));
        }
        for (name, mode, b, dense_layers) in runs {
            e.model.attention.tree = Some(mode);
            e.model.attention.sparse.dense_layers = dense_layers;
            let t2 = Instant::now();
            let sparse = decode(&mut e, main, next, Some(b));
            let sparse_s = t2.elapsed().as_secs_f64();
            let nmse: Vec<f64> = sparse
                .iter()
                .zip(&dense)
                .map(|(s, d)| errors(s, d).0)
                .collect();
            let agree = sparse
                .iter()
                .zip(&dense)
                .filter(|(s, d)| argmax(s) == argmax(d))
                .count();
            let s_nll: f64 = sparse
                .iter()
                .zip(targets)
                .map(|(l, &t)| nll(l, t))
                .sum::<f64>()
                / DECODE as f64;
            println!(
                "| {ctx} | {name} | {dense_layers} | ≤ {} of {pages} | {:.2e} | {:.2e} | {agree}/{DECODE} | {:+.4} |",
                (b + 3).min(pages),
                nmse.iter().sum::<f64>() / DECODE as f64,
                nmse.iter().copied().fold(0.0, f64::max),
                s_nll - dense_nll,
            );
            eprintln!("  ctx {ctx} budget {name}: {sparse_s:.1} s for {DECODE} steps");
        }
        e.model.attention = Default::default();
        eprintln!(
            "  ctx {ctx}: prefill {prefill_s:.1} s, {DECODE} dense steps {dense_s:.1} s, dense NLL {dense_nll:.3}"
        );
    }
}
