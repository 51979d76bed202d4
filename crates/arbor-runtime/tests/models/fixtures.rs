//! Tiny random-weight llama, mistral, qwen2 and qwen3 fixtures (made by
//! scripts/make_fixtures.py) must give transformers' logits at every position.

use super::errors;
use arbor_kernels::ops::RopeLayout;
use arbor_runtime::safetensors::SafeTensors;
use arbor_runtime::{Engine, EngineOptions, ForwardBatch, LogitsMode, Model, SeqStep};
use serde_json::Value;
use std::path::PathBuf;

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

/// (token ids, reference logits [T × vocab]) of each reference sequence.
pub type Seqs = Vec<(Vec<u32>, Vec<f32>)>;

/// reference.json, and the reference sequences.
pub fn reference(name: &str) -> (Value, Seqs) {
    let dir = fixture(name);
    let text = std::fs::read_to_string(dir.join("reference.json")).expect("reference.json");
    let v: Value = serde_json::from_str(&text).expect("reference is JSON");
    let st = SafeTensors::open_files(&[dir.join("logits.safetensors")]).expect("logits");
    let seqs = v["input_ids"]
        .as_array()
        .expect("input_ids")
        .iter()
        .enumerate()
        .map(|(i, seq)| {
            let toks = seq
                .as_array()
                .expect("ids")
                .iter()
                .map(|t| t.as_u64().expect("id") as u32)
                .collect();
            let t = st.get(&format!("logits.{i}")).expect("logits tensor");
            let logits = st
                .data(t)
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (toks, logits)
        })
        .collect();
    (v, seqs)
}

pub fn engine_for(model: Model) -> Engine {
    let opts = EngineOptions {
        kv_cache_bytes: 16 << 20,
        page_size: 16,
    };
    Engine::new(model, &opts).expect("engine")
}

/// Runs `tokens` through a fresh sequence in chunks of the given sizes (then single tokens);
/// returns the logits of every position.
pub fn run_chunked(engine: &mut Engine, tokens: &[u32], chunks: &[usize]) -> Vec<f32> {
    let seq = engine.new_seq();
    let (mut out, mut at) = (Vec::new(), 0);
    let mut sizes = chunks.iter().copied().chain(std::iter::repeat(1));
    while at < tokens.len() {
        let n = sizes.next().expect("infinite").min(tokens.len() - at);
        let step = SeqStep {
            seq,
            tokens: tokens[at..at + n].to_vec(),
            logits: LogitsMode::All,
            ..Default::default()
        };
        let res = engine
            .step(&ForwardBatch { seqs: vec![step] })
            .expect("step");
        out.extend_from_slice(&res[0].logits);
        at += n;
    }
    engine.free_seq(seq);
    out
}

fn check_arch(arch: &str) {
    let mut engine = engine_for(Model::load(&fixture(arch)).expect("load fixture"));
    for (i, (toks, want)) in reference(arch).1.iter().enumerate() {
        // Whole prompt in one step, then as chunks followed by single-token decode steps.
        for chunks in [&[usize::MAX][..], &[5, 17, 3][..]] {
            let how = if chunks.len() == 1 {
                "one step".to_string()
            } else {
                format!("chunks {chunks:?} then decode")
            };
            let got = run_chunked(&mut engine, toks, chunks);
            let (nmse, max) = errors(&got, want);
            println!("{arch} seq {i} ({how}): NMSE {nmse:.3e}, max abs {max:.3e}");
            assert!(
                nmse <= 1e-6 && max <= 1e-3,
                "{arch} seq {i}: NMSE {nmse:.3e}, max abs {max:.3e}"
            );
        }
    }
    assert_eq!(engine.cache().allocator().num_in_use(), 0, "pages leaked");
}

#[test]
fn llama_matches_transformers() {
    check_arch("llama");
}

#[test]
fn mistral_matches_transformers() {
    check_arch("mistral");
}

#[test]
fn qwen2_matches_transformers() {
    check_arch("qwen2");
}

#[test]
fn qwen3_matches_transformers() {
    check_arch("qwen3");
}

/// Control: the same check with the wrong RoPE layout must fail, so the fixtures can tell.
#[test]
fn wrong_rope_layout_is_detected() {
    for arch in ["llama", "qwen2"] {
        let (mut cfg, src) = Model::open_source(&fixture(arch)).expect("open");
        cfg.rope_layout = RopeLayout::Interleaved;
        let mut engine = engine_for(Model::from_source(cfg, &src).expect("load"));
        let (toks, want) = &reference(arch).1[0];
        let (nmse, _) = errors(&run_chunked(&mut engine, toks, &[usize::MAX]), want);
        println!("{arch} with interleaved RoPE: NMSE {nmse:.3e}");
        assert!(
            nmse > 1e-3,
            "{arch}: wrong RoPE layout still matched (NMSE {nmse:.3e})"
        );
    }
}

/// `--kv-dtype f16`: K and V rounded to f16 in the pages move the logits a little (measured
/// and printed), and the same bytes of cache hold twice the pages.
#[test]
fn f16_kv_pages_stay_near_transformers() {
    for arch in ["llama", "qwen2", "qwen3"] {
        let load = |dtype| {
            let mut m = Model::load(&fixture(arch)).expect("load fixture");
            m.attention.kv_dtype = dtype;
            engine_for(m)
        };
        let f32_pages = load(arbor_kernels::kv::KvDtype::F32).cache().pool.num_pages;
        let mut engine = load(arbor_kernels::kv::KvDtype::F16);
        let pages = engine.cache().pool.num_pages;
        assert!(
            pages >= 2 * f32_pages,
            "{arch}: {pages} f16 pages, {f32_pages} f32"
        );
        for (i, (toks, want)) in reference(arch).1.iter().enumerate() {
            let got = run_chunked(&mut engine, toks, &[5, 17, 3]);
            let (nmse, max) = errors(&got, want);
            println!("{arch} seq {i}, f16 KV: NMSE {nmse:.3e}, max abs {max:.3e}");
            assert!(nmse <= 1e-4, "{arch} seq {i}: NMSE {nmse:.3e}");
        }
        assert_eq!(engine.cache().allocator().num_in_use(), 0, "pages leaked");
    }
}
