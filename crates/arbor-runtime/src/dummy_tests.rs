//! Tests of the dummy-weight models.

use super::*;
use crate::engine::{Engine, EngineOptions, ForwardBatch, LogitsMode, SeqStep};

#[test]
fn shapes_have_their_published_parameter_counts() {
    for s in SHAPES {
        let cfg = s.config().expect("valid config");
        // param_count leaves out the q/k/v biases of Qwen2.
        let bias = if s.qkv_bias() {
            (s.layers * (s.heads + 2 * s.kv_heads) * s.head_dim) as u64
        } else {
            0
        };
        assert_eq!(cfg.param_count() + bias, s.published_params, "{}", s.name);
    }
}

#[test]
fn unknown_shapes_and_types_name_the_known_ones() {
    let e = parse_spec("gpt-5").expect_err("unknown").to_string();
    assert!(
        e.contains("qwen2.5-0.5b") && e.contains("llama-3-8b"),
        "{e}"
    );
    let e = parse_spec("qwen2.5-0.5b:q3")
        .expect_err("bad type")
        .to_string();
    assert!(e.contains("q4_0"), "{e}");
    assert!(parse_spec("qwen2.5-7b:Q8_0").is_ok());
}

#[test]
fn weights_are_seeded_and_centred() {
    let s = Shape::find("smollm2-135m").expect("shape");
    let a = random_matrix(4, 64, GgmlType::Q4_0, 7);
    let b = random_matrix(4, 64, GgmlType::Q4_0, 7);
    assert_eq!(a.bytes, b.bytes);
    for ty in [GgmlType::Q4_0, GgmlType::Q8_0] {
        let t = random_matrix(64, 256, ty, 1);
        let w = arbor_kernels::Weight::from_raw(64, 256, ty, t.bytes).expect("weight");
        let v = w.to_f32().expect("f32");
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let sd = (v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32).sqrt();
        assert!(
            mean.abs() < 2e-3 && (sd - SIGMA).abs() < 2e-3,
            "{ty}: {mean} {sd}"
        );
    }
    assert_eq!(tensors(s, GgmlType::Q4_0, 0).len(), 2 + 9 * s.layers);
}

#[test]
fn smollm2_shape_forward_gives_finite_logits() {
    let m = model("smollm2-135m", 0).expect("model");
    let tok = tokenizer(m.cfg.vocab_size).expect("tokenizer");
    assert_eq!(tok.vocab_size(), 49152);
    let ids = tok.encode("Hello, world", false, false).expect("encode");
    assert_eq!(ids.len(), "Hello, world".len());
    assert_eq!(tok.decode(&ids, true), "Hello, world");
    assert!(tok.is_eog(256));
    let mut e = Engine::new(m, &EngineOptions::default()).expect("engine");
    let seq = e.new_seq();
    let out = e
        .step(&ForwardBatch {
            seqs: vec![SeqStep {
                seq,
                tokens: ids,
                logits: LogitsMode::Last,
                ..Default::default()
            }],
        })
        .expect("step");
    let logits = &out[0].logits;
    assert_eq!(logits.len(), 49152);
    assert!(logits.iter().all(|x| x.is_finite()));
    let sd = (logits.iter().map(|x| x * x).sum::<f32>() / logits.len() as f32).sqrt();
    assert!(sd > 0.05 && sd < 5.0, "logit sd {sd}");
}

/// The engine's baseline without prefix sharing, on the tiny qwen2 fixture.
#[test]
fn without_prefix_sharing_forks_compute_and_store_their_own_prompt() {
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/models/qwen2"
    );
    let prompt: Vec<u32> = (30..70).collect();
    let mut pages = vec![];
    let mut computed = vec![];
    for sharing in [true, false] {
        let m = crate::load(std::path::Path::new(dir))
            .expect("fixture")
            .model;
        let mut e = Engine::new(m, &EngineOptions::default()).expect("engine");
        e.set_prefix_sharing(sharing);
        let root = e.new_seq();
        let step = |seq, tokens: Vec<u32>| SeqStep {
            seq,
            tokens,
            ..Default::default()
        };
        e.step(&ForwardBatch {
            seqs: vec![step(root, prompt.clone())],
        })
        .expect("prompt");
        let kids: Vec<_> = (0..3).map(|_| e.fork_seq(root).expect("fork")).collect();
        e.free_seq(root);
        e.step(&ForwardBatch {
            seqs: kids.iter().map(|&k| step(k, vec![7])).collect(),
        })
        .expect("branches");
        e.cache().check().expect("consistent cache");
        pages.push(e.kv_stats().pages_in_use);
        computed.push(e.computed_tokens());
    }
    // 41 positions = 3 pages of 16: on, 2 shared full pages + 3 own last pages; off, 3 × 3.
    assert_eq!(pages, vec![5, 9]);
    assert_eq!(computed, vec![40 + 3, 40 + 3 * 41]);
}
