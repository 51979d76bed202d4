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
    for ty in [GgmlType::Q4_0, GgmlType::Q8_0, GgmlType::Q4K] {
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
    let logits = last_logits(m, ids);
    assert_eq!(logits.len(), 49152);
    assert!(logits.iter().all(|x| x.is_finite()));
    let sd = (logits.iter().map(|x| x * x).sum::<f32>() / logits.len() as f32).sqrt();
    assert!(sd > 0.05 && sd < 5.0, "logit sd {sd}");
}

/// Last-position logits of `tokens` on a fresh engine for `m`.
fn last_logits(m: Model, tokens: Vec<u32>) -> Vec<f32> {
    let mut e = Engine::new(m, &EngineOptions::default()).expect("engine");
    let seq = e.new_seq();
    let out = e
        .step(&ForwardBatch {
            seqs: vec![SeqStep {
                seq,
                tokens,
                logits: LogitsMode::Last,
                ..Default::default()
            }],
        })
        .expect("step");
    out[0].logits.clone()
}

/// Every dummy weight type runs on the CPU engine's fast path (its interleaved matmuls for
/// Q4_0, Q8_0 and Q4_K) and lands near the exact path (dequantised rows, f32 activations).
#[test]
fn every_dummy_type_runs_fast_near_exact() {
    for (name, _) in TYPES {
        let spec = format!("smollm2-135m:{name}");
        let fast = last_logits(model(&spec, 3).expect("model"), (300..312).collect());
        let mut m = model(&spec, 3).expect("model");
        m.precision = crate::model::Precision::Exact;
        let exact = last_logits(m, (300..312).collect());
        let err: f64 = fast
            .iter()
            .zip(&exact)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum();
        let norm: f64 = exact.iter().map(|b| (*b as f64).powi(2)).sum();
        let nmse = err / norm;
        println!("{name}: fast vs exact NMSE {nmse:.3e}");
        assert!(
            fast.iter().all(|x| x.is_finite()) && nmse < 1e-3,
            "{name}: NMSE {nmse:.3e}"
        );
    }
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

#[test]
fn moe_shapes_have_their_published_active_parameter_counts() {
    let mut seen = 0;
    for s in SHAPES {
        let Some(m) = &s.moe else { continue };
        seen += 1;
        let cfg = s.config().expect("valid config");
        let moe = cfg.moe.as_ref().expect("a MoE config");
        assert_eq!(moe.num_experts, m.experts, "{}", s.name);
        assert_eq!(moe.experts_per_token, m.top_k, "{}", s.name);
        assert_eq!(moe.moe_intermediate_size, m.expert_ff, "{}", s.name);
        assert_eq!(
            moe.shared_expert_intermediate_size, m.shared_ff,
            "{}",
            s.name
        );
        assert_eq!(moe.norm_topk_prob, m.norm_topk_prob, "{}", s.name);
        assert!((0..s.layers).all(|i| cfg.is_moe_layer(i)), "{}", s.name);
        let bias = if s.qkv_bias() {
            (s.layers * (s.heads + 2 * s.kv_heads) * s.head_dim) as u64
        } else {
            0
        };
        assert_eq!(
            cfg.active_param_count() + bias,
            m.active_params,
            "{}",
            s.name
        );
    }
    assert_eq!(seen, 3);
    // The published headline numbers, rounded.
    let billions = |name: &str| {
        let s = Shape::find(name).expect("shape");
        let cfg = s.config().expect("config");
        let r = |x: u64| (x as f64 / 1e8).round() / 10.0;
        (r(cfg.param_count()), r(cfg.active_param_count()))
    };
    assert_eq!(billions("qwen3-30b-a3b"), (30.5, 3.4));
    assert_eq!(billions("qwen1.5-moe-a2.7b"), (14.3, 2.7));
    assert_eq!(billions("mixtral-8x7b"), (46.7, 12.9));
}

/// A tiny shape of a MoE family: 2 layers, 8 experts, top-2 (Qwen2-MoE with a shared expert).
fn tiny_moe(arch: Arch) -> Shape {
    Shape {
        name: "tiny-moe",
        arch,
        hidden: 64,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 16,
        intermediate: 96,
        vocab: 300,
        max_context: 256,
        rope_base: 1e6,
        rms_eps: 1e-6,
        tied: false,
        llama3_rope_factor: 0.0,
        published_params: 0,
        moe: Some(MoeShape {
            experts: 8,
            top_k: 2,
            expert_ff: if arch == Arch::Mixtral { 96 } else { 32 },
            shared_ff: if arch == Arch::Qwen2Moe { 64 } else { 0 },
            norm_topk_prob: arch != Arch::Qwen2Moe,
            active_params: 0,
        }),
    }
}

#[test]
fn tiny_moe_shapes_run_and_count_expert_tokens() {
    for arch in [Arch::Mixtral, Arch::Qwen2Moe, Arch::Qwen3Moe] {
        let shape = tiny_moe(arch);
        let cfg = shape.config().expect("config");
        let src = TensorSource::Memory(tensors(&shape, GgmlType::Q8_0, 3));
        let m = Model::from_source(cfg, &src).expect("model");
        let mut e = Engine::new(m, &EngineOptions::default()).expect("engine");
        assert_eq!(e.take_expert_counts().expect("MoE").counts[0], vec![0; 8]);
        e.set_expert_stats(true);
        let seq = e.new_seq();
        let out = e
            .step(&ForwardBatch {
                seqs: vec![SeqStep {
                    seq,
                    tokens: (10..30).collect(),
                    logits: LogitsMode::All,
                    ..Default::default()
                }],
            })
            .expect("step");
        assert_eq!(out[0].logits.len(), 20 * 300);
        assert!(out[0].logits.iter().all(|x| x.is_finite()), "{arch:?}");
        let counts = e.take_expert_counts().expect("MoE");
        assert_eq!(counts.layers, vec![0, 1]);
        for c in &counts.counts {
            assert_eq!(c.iter().sum::<u64>(), 20 * 2, "{arch:?}: {c:?}");
        }
        let load = counts.load();
        assert_eq!(load.assignments, 80);
        assert!(load.imbalance >= 1.0 && load.max_layer_imbalance <= 8.0);
        let again = e.take_expert_counts().expect("MoE");
        assert!(again.counts.iter().flatten().all(|&c| c == 0));
    }
}
