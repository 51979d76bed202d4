//! Mixture of experts: the tiny mixtral, qwen2-moe and qwen3-moe fixtures (made by
//! scripts/make_fixtures.py --only moe) against transformers' logits and routing, and the
//! model-free MoE ops (routing, grouping, grouped expert GEMM) against naive loops.

use super::errors;
use arbor_kernels::ops::{self, ExpertFfn, Routing};
use arbor_kernels::quant::GgmlType;
use arbor_kernels::{KernelError, Weight};
use arbor_runtime::Model;

pub use super::fixtures::{engine_for, fixture, reference, run_chunked};

/// Logits at every position (one step and chunked + decode) within 1e-3 of transformers',
/// and the tokens per expert of the one-step runs equal to transformers' routing.
fn check_fixture(name: &str) {
    let (v, refs) = reference(name);
    let mut engine = engine_for(Model::load(&fixture(name)).expect("load fixture"));
    engine.set_expert_stats(true);
    let kinds = v["moe"]["layer_kinds"].as_array().expect("layer kinds");
    for (i, k) in kinds.iter().enumerate() {
        assert_eq!(
            engine.model.cfg.is_moe_layer(i),
            k == "moe",
            "{name} layer {i}"
        );
    }
    let mut routed = None::<arbor_runtime::model::ExpertCounts>;
    for (i, (toks, want)) in refs.iter().enumerate() {
        for chunks in [&[usize::MAX][..], &[5, 17, 3][..]] {
            let got = run_chunked(&mut engine, toks, chunks);
            let counts = engine.take_expert_counts().expect("a MoE model");
            if chunks.len() == 1 {
                routed.get_or_insert_with(Default::default).add(&counts);
            }
            let (nmse, max) = errors(&got, want);
            let how = match chunks.len() {
                1 => "one step".to_string(),
                _ => format!("chunks {chunks:?} then decode"),
            };
            println!("{name} seq {i} ({how}): NMSE {nmse:.3e}, max abs {max:.3e}");
            assert!(
                nmse <= 1e-6 && max <= 1e-3,
                "{name} seq {i} ({how}): NMSE {nmse:.3e}, max abs {max:.3e}"
            );
        }
    }
    let routed = routed.expect("counts");
    for (layer, c) in routed.layers.iter().zip(&routed.counts) {
        let want: Vec<u64> = v["moe"]["expert_tokens"][layer.to_string()]
            .as_array()
            .expect("reference counts")
            .iter()
            .map(|x| x.as_u64().expect("count"))
            .collect();
        assert_eq!(c, &want, "{name} layer {layer}: tokens per expert");
    }
    let load = routed.load();
    println!("{name}: tokens per expert {:?}, {load:?}", routed.counts);
    assert_eq!(engine.cache().allocator().num_in_use(), 0, "pages leaked");
}

#[test]
fn mixtral_matches_transformers() {
    check_fixture("mixtral");
}

#[test]
fn qwen2_moe_matches_transformers() {
    check_fixture("qwen2-moe");
}

#[test]
fn qwen3_moe_matches_transformers() {
    check_fixture("qwen3-moe");
}

#[test]
fn moe_fixture_configs_are_read() {
    let cfg = |n: &str| Model::open_source(&fixture(n)).expect("open").0;
    let (mix, q2, q3) = (cfg("mixtral"), cfg("qwen2-moe"), cfg("qwen3-moe"));
    let m = mix.moe.as_ref().expect("mixtral experts");
    assert_eq!((m.num_experts, m.experts_per_token), (8, 2));
    assert_eq!((m.moe_intermediate_size, m.norm_topk_prob), (32, true));
    let m = q2.moe.as_ref().expect("qwen2-moe experts");
    assert_eq!(
        (m.num_experts, m.experts_per_token, m.moe_intermediate_size),
        (8, 4, 32)
    );
    assert_eq!(
        (m.shared_expert_intermediate_size, m.norm_topk_prob),
        (48, false)
    );
    assert_eq!(m.mlp_only_layers, vec![1]);
    let m = q3.moe.as_ref().expect("qwen3-moe experts");
    assert_eq!((m.decoder_sparse_step, m.norm_topk_prob), (2, true));
    assert_eq!(
        (0..4).map(|i| q3.is_moe_layer(i)).collect::<Vec<_>>(),
        vec![false, true, false, true]
    );
    assert!(q3.active_param_count() < q3.param_count());
    // Dense layers are of intermediate_size, experts of moe_intermediate_size.
    assert_eq!(q2.intermediate_size, 64);
}

/// Controls: the fixtures can tell renormalised from raw top-k weights, and a missing
/// shared expert.
#[test]
fn wrong_routing_settings_are_detected() {
    for name in ["mixtral", "qwen2-moe", "qwen3-moe"] {
        let (mut cfg, src) = Model::open_source(&fixture(name)).expect("open");
        let moe = cfg.moe.as_mut().expect("experts");
        moe.norm_topk_prob = !moe.norm_topk_prob;
        let mut engine = engine_for(Model::from_source(cfg, &src).expect("load"));
        let (toks, want) = &reference(name).1[0];
        let (nmse, _) = errors(&run_chunked(&mut engine, toks, &[usize::MAX]), want);
        println!("{name} with norm_topk_prob flipped: NMSE {nmse:.3e}");
        assert!(nmse > 1e-3, "{name}: flipped norm_topk_prob still matched");
    }
    let (mut cfg, src) = Model::open_source(&fixture("qwen2-moe")).expect("open");
    cfg.moe
        .as_mut()
        .expect("experts")
        .shared_expert_intermediate_size = 0;
    let mut engine = engine_for(Model::from_source(cfg, &src).expect("load"));
    let (toks, want) = &reference("qwen2-moe").1[0];
    let (nmse, _) = errors(&run_chunked(&mut engine, toks, &[usize::MAX]), want);
    println!("qwen2-moe without its shared expert: NMSE {nmse:.3e}");
    assert!(nmse > 1e-3);
}

// ---- ops::moe against naive loops ----

/// Deterministic values in [-1, 1).
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn silu(g: f64) -> f64 {
    g / (1.0 + (-g).exp())
}

/// out[r] = Σ over r's routed experts of weight · down(silu(gate x) ⊙ up x), row by row in
/// f64 from the weights dequantised.
fn naive_moe(x: &[f32], h: usize, routing: &Routing, experts: &[ExpertFfn]) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    for r in 0..routing.rows() {
        let xr = &x[r * h..(r + 1) * h];
        for j in 0..routing.top_k {
            let e = &experts[routing.experts[r * routing.top_k + j] as usize];
            let w = routing.weights[r * routing.top_k + j] as f64;
            let (gu, down) = (e.gate_up.to_f32().expect("gu"), e.down.to_f32().expect("d"));
            let ff = e.down.cols;
            let dot = |row: &[f32], v: &[f64]| -> f64 {
                row.iter().zip(v).map(|(a, b)| *a as f64 * b).sum()
            };
            let xd: Vec<f64> = xr.iter().map(|&v| v as f64).collect();
            let act: Vec<f64> = (0..ff)
                .map(|i| {
                    silu(dot(&gu[i * h..(i + 1) * h], &xd))
                        * dot(&gu[(ff + i) * h..(ff + i + 1) * h], &xd)
                })
                .collect();
            for (o, d) in out[r * h..(r + 1) * h].iter_mut().zip(down.chunks(ff)) {
                *o += (w * dot(d, &act)) as f32;
            }
        }
    }
    out
}

/// `v` as Q8_0 blocks (rows of a multiple of 32 values).
pub fn q8_0_bytes(v: &[f32]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for b in v.chunks(32) {
        let amax = b.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let d = half::f16::from_f32(amax / 127.0);
        bytes.extend(d.to_le_bytes());
        let inv = if d.to_f32() > 0.0 {
            1.0 / d.to_f32()
        } else {
            0.0
        };
        bytes.extend(
            b.iter()
                .map(|&x| (x * inv).round().clamp(-127.0, 127.0) as i8 as u8),
        );
    }
    bytes
}

fn q8_0(rows: usize, cols: usize, v: &[f32]) -> Weight {
    Weight::from_raw(rows, cols, GgmlType::Q8_0, q8_0_bytes(v)).expect("q8_0")
}

#[test]
fn grouped_expert_gemm_matches_a_naive_loop_with_uneven_and_empty_experts() {
    let (h, ff, n_exp, t, k) = (64, 32, 6, 13, 2);
    let x = values(t * h, 1);
    // Each row's two experts: expert 0 takes most rows, 4 only row 6, 3 and 5 none.
    let pairs = [
        (0, 2),
        (0, 1),
        (2, 0),
        (0, 1),
        (1, 2),
        (0, 2),
        (4, 0),
        (0, 1),
        (2, 1),
        (0, 2),
        (1, 0),
        (0, 2),
        (2, 0),
    ];
    let routing = Routing {
        top_k: k,
        weights: values(t * k, 2).iter().map(|w| w.abs()).collect(),
        experts: pairs.iter().flat_map(|&(a, b)| [a, b]).collect(),
    };
    let groups = ops::group_by_expert(&routing, n_exp).expect("group");
    let counts: Vec<usize> = (0..n_exp).map(|e| groups.count(e)).collect();
    assert_eq!(counts, vec![11, 6, 8, 0, 1, 0]);
    for e in 0..n_exp {
        assert!(
            groups.expert(e).0.windows(2).all(|w| w[0] < w[1]),
            "rows ascending"
        );
    }
    for quantised in [false, true] {
        let experts: Vec<ExpertFfn> = (0..n_exp as u64)
            .map(|e| {
                let (gu, d) = (values(2 * ff * h, 10 + e), values(h * ff, 20 + e));
                match quantised {
                    false => ExpertFfn {
                        gate_up: Weight::from_f32(2 * ff, h, gu).expect("w"),
                        down: Weight::from_f32(h, ff, d).expect("w"),
                    },
                    true => ExpertFfn {
                        gate_up: q8_0(2 * ff, h, &gu),
                        down: q8_0(h, ff, &d),
                    },
                }
            })
            .collect();
        let want = naive_moe(&x, h, &routing, &experts);
        let mm = |x: &[f32], m: usize, w: &Weight, o: &mut [f32]| -> Result<(), KernelError> {
            ops::matmul::matmul_dequantized(x, m, w, o)
        };
        let mut got = vec![0.0f32; t * h];
        ops::moe_experts(&x, h, &groups, &experts, &mm, &mut got).expect("moe");
        let (nmse, max) = errors(&got, &want);
        println!("grouped GEMM (quantised {quantised}): NMSE {nmse:.3e}, max abs {max:.3e}");
        assert!(nmse < 1e-10 && max < 1e-4, "quantised {quantised}");
        // Rows are independent of the batch: row 4 alone gives the same values.
        let one = Routing {
            top_k: k,
            experts: routing.experts[4 * k..5 * k].to_vec(),
            weights: routing.weights[4 * k..5 * k].to_vec(),
        };
        let g1 = ops::group_by_expert(&one, n_exp).expect("group");
        let mut row = vec![0.0f32; h];
        ops::moe_experts(&x[4 * h..5 * h], h, &g1, &experts, &mm, &mut row).expect("moe");
        let (_, max) = errors(&row, &got[4 * h..5 * h]);
        assert!(max < 1e-5, "row 4 alone differs by {max:.3e}");
    }
    // Bad shapes and expert indices are errors, not panics.
    let bad = Routing {
        top_k: 1,
        experts: vec![9],
        weights: vec![1.0],
    };
    assert!(ops::group_by_expert(&bad, n_exp).is_err());
}

#[test]
fn routing_picks_the_top_k_and_renormalises_on_request() {
    let logits = [0.5f32, 2.0, -1.0, 2.0, 1.0, 0.0, 3.0, -3.0];
    // Ties (experts 1 and 3 at 2.0) go to the lower index.
    let r = ops::route_softmax_topk(&logits, 4, 2, false).expect("route");
    assert_eq!(r.experts, vec![1, 3, 2, 0]);
    let p = |row: &[f32], e: usize| {
        let z: f32 = row.iter().map(|x| x.exp()).sum();
        row[e].exp() / z
    };
    let (a, b) = (&logits[..4], &logits[4..]);
    let want = [p(a, 1), p(a, 3), p(b, 2), p(b, 0)];
    for (g, w) in r.weights.iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "{g} vs {w}");
    }
    assert!(r.weights[..2].iter().sum::<f32>() < 0.99);
    let n = ops::route_softmax_topk(&logits, 4, 2, true).expect("route");
    assert_eq!(n.experts, r.experts);
    for row in n.weights.chunks(2) {
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }
    assert!(
        (n.weights[0] - 0.5).abs() < 1e-6,
        "equal logits share equally"
    );
    // Against a naive sort on random rows, for every k.
    let (n_exp, t) = (8, 50);
    let l = values(n_exp * t, 5)
        .iter()
        .map(|x| 4.0 * x)
        .collect::<Vec<_>>();
    for k in 1..=n_exp {
        let r = ops::route_softmax_topk(&l, n_exp, k, true).expect("route");
        for (row, ex) in l.chunks(n_exp).zip(r.experts.chunks(k)) {
            let mut idx: Vec<usize> = (0..n_exp).collect();
            idx.sort_by(|&i, &j| row[j].total_cmp(&row[i]).then(i.cmp(&j)));
            let got: Vec<usize> = ex.iter().map(|&e| e as usize).collect();
            assert_eq!(got, idx[..k].to_vec());
        }
    }
    // Errors, and NaN never panics.
    assert!(ops::route_softmax_topk(&logits, 4, 5, false).is_err());
    assert!(ops::route_softmax_topk(&logits, 4, 0, false).is_err());
    assert!(ops::route_softmax_topk(&logits, 3, 1, false).is_err());
    let r = ops::route_softmax_topk(&[f32::NAN; 4], 4, 2, true).expect("route");
    assert!(r.experts.iter().all(|&e| e < 4) && r.experts[0] != r.experts[1]);
}
