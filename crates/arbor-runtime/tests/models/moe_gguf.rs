//! MoE weights in GGUF's layout: each MoE fixture converted to GGUF (experts stacked as
//! `ffn_{gate,up,down}_exps`, routers `ffn_gate_inp`, Qwen2-MoE's shared expert as
//! `ffn_*_shexp` with a 1-D `ffn_gate_inp_shexp`; Mixtral as arch `llama` with
//! `llama.expert_count` and llama.cpp's Q/K permutation) must give transformers' logits,
//! and stacked quantised experts must slice into the same weights as per-expert tensors.

use super::errors;
use super::moe::{engine_for, fixture, q8_0_bytes, reference, run_chunked};
use arbor_kernels::quant::{dequantize, GgmlType};
use arbor_runtime::gguf::{GgufWriter, MetaValue as V};
use arbor_runtime::model::{hf_names, MemTensor, Precision, TensorSource};
use arbor_runtime::safetensors::SafeTensors;
use arbor_runtime::{Arch, Model, ModelConfig};
use std::collections::HashMap;

/// A tensor under its GGUF name: shape (outer first) and f32 values.
type Named = (String, Vec<usize>, Vec<f32>);

/// llama.cpp's Q/K row permutation for interleaved RoPE (`convert_hf_to_gguf.py`'s
/// `permute`): within each head, row `j·hd/2 + i` moves to `2i + j`.
fn permute(v: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let hd = v.len() / cols / heads;
    let mut out = vec![0.0; v.len()];
    for h in 0..heads {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let (dst, src) = (h * hd + 2 * i + j, h * hd + j * hd / 2 + i);
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&v[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// The fixture's tensors under GGUF names as f32, experts stacked (`[E, rows, cols]`) or
/// per expert (`ffn_gate.E.weight`).
fn gguf_tensors(name: &str, stacked: bool) -> (ModelConfig, Vec<Named>) {
    let dir = fixture(name);
    let (cfg, _) = Model::open_source(&dir).expect("open");
    let st = SafeTensors::open_dir(&dir).expect("safetensors");
    let get = |n: &str| -> Option<(Vec<usize>, Vec<f32>)> {
        let t = hf_names(n).iter().find_map(|h| st.get(h))?;
        let mut v = vec![0.0; t.shape.iter().product()];
        dequantize(t.dtype, st.data(t), &mut v).expect("dequantize");
        Some((t.shape.clone(), v))
    };
    let req = |n: &str| get(n).unwrap_or_else(|| panic!("{name}: no {n}"));
    let llama = cfg.arch == Arch::Mixtral;
    let h = cfg.hidden_size;
    let mut out: Vec<Named> = Vec::new();
    for n in ["token_embd.weight", "output_norm.weight", "output.weight"] {
        if let Some((s, v)) = get(n) {
            out.push((n.into(), s, v));
        }
    }
    for i in 0..cfg.num_layers {
        let n = |s: &str| format!("blk.{i}.{s}");
        for part in [
            "attn_norm.weight",
            "attn_q.weight",
            "attn_k.weight",
            "attn_v.weight",
            "attn_output.weight",
            "attn_q.bias",
            "attn_k.bias",
            "attn_v.bias",
            "attn_q_norm.weight",
            "attn_k_norm.weight",
            "ffn_norm.weight",
        ] {
            let Some((s, mut v)) = get(&n(part)) else {
                continue;
            };
            if llama && part == "attn_q.weight" {
                v = permute(&v, cfg.num_heads, h);
            }
            if llama && part == "attn_k.weight" {
                v = permute(&v, cfg.num_kv_heads, h);
            }
            out.push((n(part), s, v));
        }
        let Some(moe) = cfg.moe.as_ref().filter(|_| cfg.is_moe_layer(i)) else {
            for part in ["ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"] {
                let (s, v) = req(&n(part));
                out.push((n(part), s, v));
            }
            continue;
        };
        let (ne, ff) = (moe.num_experts, moe.moe_intermediate_size);
        let (s, v) = req(&n("ffn_gate_inp.weight"));
        out.push((n("ffn_gate_inp.weight"), s, v));
        // Per expert (gate, up, down), from per-expert tensors or transformers-5 stacks.
        let fused = get(&n("ffn_gate_up_exps.weight"));
        let down_stack = get(&n("ffn_down_exps.weight"));
        let mut parts: [Vec<f32>; 3] = Default::default();
        for e in 0..ne {
            let (g, u, d) = match (&fused, &down_stack) {
                (Some((_, gu)), Some((_, dn))) => {
                    let gu = &gu[e * 2 * ff * h..(e + 1) * 2 * ff * h];
                    (
                        gu[..ff * h].to_vec(),
                        gu[ff * h..].to_vec(),
                        dn[e * h * ff..(e + 1) * h * ff].to_vec(),
                    )
                }
                _ => (
                    req(&n(&format!("ffn_gate.{e}.weight"))).1,
                    req(&n(&format!("ffn_up.{e}.weight"))).1,
                    req(&n(&format!("ffn_down.{e}.weight"))).1,
                ),
            };
            if stacked {
                parts[0].extend(g);
                parts[1].extend(u);
                parts[2].extend(d);
            } else {
                out.push((n(&format!("ffn_gate.{e}.weight")), vec![ff, h], g));
                out.push((n(&format!("ffn_up.{e}.weight")), vec![ff, h], u));
                out.push((n(&format!("ffn_down.{e}.weight")), vec![h, ff], d));
            }
        }
        if stacked {
            let [g, u, d] = parts;
            out.push((n("ffn_gate_exps.weight"), vec![ne, ff, h], g));
            out.push((n("ffn_up_exps.weight"), vec![ne, ff, h], u));
            out.push((n("ffn_down_exps.weight"), vec![ne, h, ff], d));
        }
        for part in [
            "ffn_gate_shexp.weight",
            "ffn_up_shexp.weight",
            "ffn_down_shexp.weight",
        ] {
            if let Some((s, v)) = get(&n(part)) {
                out.push((n(part), s, v));
            }
        }
        if let Some((_, v)) = get(&n("ffn_gate_inp_shexp.weight")) {
            // llama.cpp stores the shared expert's gate as a vector.
            out.push((n("ffn_gate_inp_shexp.weight"), vec![h], v));
        }
    }
    (cfg, out)
}

fn gguf_arch(cfg: &ModelConfig) -> &'static str {
    match cfg.arch {
        Arch::Mixtral => "llama",
        Arch::Qwen2Moe => "qwen2moe",
        Arch::Qwen3Moe => "qwen3moe",
        other => panic!("{other:?} is not MoE"),
    }
}

/// Writes `tensors` as a GGUF file of `cfg`'s shape; `_exps` tensors as Q8_0 if `quantise`.
fn write_gguf(
    file: &str,
    cfg: &ModelConfig,
    tensors: &[Named],
    quantise: bool,
) -> tempfile::TempPath {
    let arch = gguf_arch(cfg);
    let moe = cfg.moe.as_ref().expect("experts");
    let k = |s: &str| format!("{arch}.{s}");
    let u = |x: usize| V::U32(x as u32);
    let mut w = GgufWriter::new(3)
        .meta("general.architecture", V::String(arch.into()))
        .meta(&k("block_count"), u(cfg.num_layers))
        .meta(&k("context_length"), u(cfg.max_context))
        .meta(&k("embedding_length"), u(cfg.hidden_size))
        .meta(&k("feed_forward_length"), u(cfg.intermediate_size))
        .meta(&k("attention.head_count"), u(cfg.num_heads))
        .meta(&k("attention.head_count_kv"), u(cfg.num_kv_heads))
        .meta(&k("attention.key_length"), u(cfg.head_dim))
        .meta(&k("attention.layer_norm_rms_epsilon"), V::F32(cfg.rms_eps))
        .meta(&k("rope.freq_base"), V::F32(cfg.rope_base))
        .meta(&k("vocab_size"), u(cfg.vocab_size))
        .meta(&k("expert_count"), u(moe.num_experts))
        .meta(&k("expert_used_count"), u(moe.experts_per_token));
    // llama.cpp's Mixtral files give only feed_forward_length (the experts' width).
    if cfg.arch != Arch::Mixtral {
        w = w.meta(
            &k("expert_feed_forward_length"),
            u(moe.moe_intermediate_size),
        );
    }
    if moe.shared_expert_intermediate_size > 0 {
        w = w.meta(
            &k("expert_shared_feed_forward_length"),
            u(moe.shared_expert_intermediate_size),
        );
    }
    for (name, shape, v) in tensors {
        let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        w = if quantise && name.contains("_exps.") {
            w.tensor(name, &dims, GgmlType::Q8_0, q8_0_bytes(v))
        } else {
            w.tensor_f32(name, &dims, v)
        };
    }
    let path = tempfile::Builder::new()
        .prefix("arbor-moe-")
        .suffix(&format!("-{file}"))
        .tempfile()
        .expect("temp file")
        .into_temp_path();
    std::fs::write(&path, w.build()).expect("write gguf");
    path
}

#[test]
fn gguf_with_stacked_experts_matches_transformers() {
    for name in ["mixtral", "qwen2-moe", "qwen3-moe"] {
        let (hf_cfg, tensors) = gguf_tensors(name, true);
        let path = write_gguf(&format!("{name}.gguf"), &hf_cfg, &tensors, false);
        let model = Model::load(&path).expect("load gguf");
        let cfg = &model.cfg;
        assert_eq!(cfg.arch, hf_cfg.arch, "{name}");
        let (a, b) = (
            cfg.moe.as_ref().expect("moe"),
            hf_cfg.moe.as_ref().expect("moe"),
        );
        assert_eq!(
            (a.num_experts, a.experts_per_token, a.moe_intermediate_size),
            (b.num_experts, b.experts_per_token, b.moe_intermediate_size)
        );
        assert_eq!(
            a.shared_expert_intermediate_size,
            b.shared_expert_intermediate_size
        );
        // llama.cpp's per-architecture defaults agree with these fixtures' configs.
        assert_eq!(a.norm_topk_prob, b.norm_topk_prob, "{name}");
        let layers = |c: &ModelConfig| {
            (0..c.num_layers)
                .map(|i| c.is_moe_layer(i))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            layers(cfg),
            layers(&hf_cfg),
            "{name}: dense layers from absent routers"
        );
        let mut engine = engine_for(model);
        for (i, (toks, want)) in reference(name).1.iter().enumerate() {
            let got = run_chunked(&mut engine, toks, &[usize::MAX]);
            let (nmse, max) = errors(&got, want);
            println!("{name} GGUF (stacked experts) seq {i}: NMSE {nmse:.3e}, max abs {max:.3e}");
            assert!(nmse <= 1e-6 && max <= 1e-3, "{name} GGUF seq {i}");
        }
    }
}

#[test]
fn stacked_quantised_experts_slice_like_per_expert_tensors() {
    for name in ["mixtral", "qwen2-moe"] {
        let (hf_cfg, tensors) = gguf_tensors(name, true);
        let path = write_gguf(&format!("{name}-q8.gguf"), &hf_cfg, &tensors, true);
        let (cfg, src) = Model::open_source(&path).expect("open gguf");
        assert!(src.type_summary().contains("Q8_0"));
        let mut stacked = Model::from_source(cfg.clone(), &src).expect("load");
        // The same values per expert, dequantised, in memory under per-expert names.
        let mut mem = HashMap::new();
        for (n, shape, v) in &tensors {
            let Some((prefix, kind)) = n.rsplit_once(".ffn_") else {
                mem.insert(n.clone(), f32_tensor(shape.clone(), v.clone()));
                continue;
            };
            if !kind.contains("_exps.") {
                mem.insert(n.clone(), f32_tensor(shape.clone(), v.clone()));
                continue;
            }
            let mut q = vec![0.0; v.len()];
            dequantize(GgmlType::Q8_0, &q8_0_bytes(v), &mut q).expect("dequantize");
            let part = kind.split('_').next().expect("gate/up/down");
            let per = shape[1] * shape[2];
            for (e, chunk) in q.chunks(per).enumerate() {
                let key = format!("{prefix}.ffn_{part}.{e}.weight");
                mem.insert(key, f32_tensor(shape[1..].to_vec(), chunk.to_vec()));
            }
        }
        let mut per_expert =
            Model::from_source(cfg, &TensorSource::Memory(mem)).expect("per-expert model");
        stacked.precision = Precision::Exact;
        per_expert.precision = Precision::Exact;
        let (toks, want) = &reference(name).1[1];
        let a = run_chunked(&mut engine_for(stacked), toks, &[usize::MAX]);
        let b = run_chunked(&mut engine_for(per_expert), toks, &[usize::MAX]);
        let (nmse, max) = errors(&a, &b);
        let (q_nmse, _) = errors(&a, want);
        println!(
            "{name}: Q8_0 stacked vs per-expert: NMSE {nmse:.3e}, max abs {max:.3e}; \
             vs transformers (unquantised) NMSE {q_nmse:.3e}"
        );
        assert!(max <= 1e-4, "{name}: stacked Q8_0 experts sliced wrongly");
        assert!(q_nmse < 1e-2, "{name}: Q8_0 experts far from the reference");
    }
}

fn f32_tensor(shape: Vec<usize>, v: Vec<f32>) -> MemTensor {
    MemTensor {
        shape,
        ty: GgmlType::F32,
        bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

#[test]
fn malformed_moe_files_give_clear_errors() {
    let (cfg, tensors) = gguf_tensors("qwen2-moe", true);
    // A stacked tensor with the wrong expert count is named with both shapes.
    let bad: Vec<Named> = tensors
        .iter()
        .map(|(n, s, v)| match n.as_str() {
            "blk.0.ffn_up_exps.weight" => (n.clone(), vec![4, 2 * s[1], s[2]], v.clone()),
            _ => (n.clone(), s.clone(), v.clone()),
        })
        .collect();
    let e = Model::load(&write_gguf("bad-stack.gguf", &cfg, &bad, false))
        .err()
        .expect("error")
        .to_string();
    assert!(
        e.contains("blk.0.ffn_up_exps.weight") && e.contains("[8, 32, 64]"),
        "{e}"
    );
    // Experts missing altogether.
    let none: Vec<Named> = tensors
        .iter()
        .filter(|(n, _, _)| !n.starts_with("blk.2.ffn_") || !n.contains("_exps"))
        .cloned()
        .collect();
    let e = Model::load(&write_gguf("no-experts.gguf", &cfg, &none, false))
        .err()
        .expect("error")
        .to_string();
    assert!(
        e.contains("layer 2 experts") && e.contains("missing"),
        "{e}"
    );
    // More experts per token than experts.
    let mut over = cfg.clone();
    over.moe.as_mut().expect("moe").experts_per_token = 9;
    let e = Model::load(&write_gguf("top9.gguf", &over, &tensors, false))
        .err()
        .expect("error")
        .to_string();
    assert!(
        e.contains("9 experts per token") && e.contains("8 experts"),
        "{e}"
    );
    // config.json: missing and inconsistent MoE keys are named.
    let text = std::fs::read_to_string(fixture("qwen2-moe").join("config.json")).expect("cfg");
    let base: serde_json::Value = serde_json::from_str(&text).expect("json");
    let with = |k: &str, v: serde_json::Value| {
        let mut c = base.clone();
        let obj = c.as_object_mut().expect("object");
        match v {
            serde_json::Value::Null => obj.remove(k),
            v => obj.insert(k.into(), v),
        };
        match ModelConfig::from_hf_json(&c.to_string()) {
            Ok(_) => panic!("{k}: accepted"),
            Err(e) => e.to_string(),
        }
    };
    let e = with("moe_intermediate_size", serde_json::Value::Null);
    assert!(e.contains("'moe_intermediate_size'"), "{e}");
    let e = with("num_experts_per_tok", 12.into());
    assert!(
        e.contains("12 experts per token") && e.contains("8 experts"),
        "{e}"
    );
    let e = with("decoder_sparse_step", 0.into());
    assert!(e.contains("decoder_sparse_step"), "{e}");
    let e = with("mlp_only_layers", "1".into());
    assert!(e.contains("mlp_only_layers"), "{e}");
}
