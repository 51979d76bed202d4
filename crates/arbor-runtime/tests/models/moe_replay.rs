//! Routing replay ([`Engine::replay_routing`]): a MoE model on the CPU routing its tokens to
//! experts recorded elsewhere (per-step expert counts of single-token steps name each token's
//! experts), as the GPU tests use it to compare devices whose rounding breaks a near-tie
//! between experts differently; the replay op against the router's own weighting.

use super::errors;
use super::fixtures::{engine_for, fixture, reference};
use super::moe::values;
use arbor_kernels::ops;
use arbor_runtime::model::ExpertCounts;
use arbor_runtime::{Engine, ForwardBatch, LogitsMode, Model, SeqStep};

/// The tokens of `len` positions in steps of `chunks` (then single tokens).
pub fn spans(len: usize, chunks: &[usize]) -> Vec<std::ops::Range<usize>> {
    let mut sizes = chunks.iter().copied().chain(std::iter::repeat(1));
    let (mut out, mut at) = (Vec::new(), 0);
    while at < len {
        let n = sizes.next().expect("infinite").min(len - at);
        out.push(at..at + n);
        at += n;
    }
    out
}

/// The experts of each MoE layer in counts of one token's step.
pub fn token_routes(c: &ExpertCounts) -> Vec<Vec<u32>> {
    c.counts
        .iter()
        .map(|l| (0..l.len() as u32).filter(|&e| l[e as usize] > 0).collect())
        .collect()
}

/// Runs `toks` through a fresh sequence in steps of `chunks` with expert counting on:
/// every position's logits and each step's counts. With `replay` (a CPU engine), each step
/// first replays the routing of its tokens (`replay[t][l]`: token t's experts in MoE layer l).
pub fn run_routed(
    e: &mut Engine,
    toks: &[u32],
    chunks: &[usize],
    replay: Option<&[Vec<Vec<u32>>]>,
) -> (Vec<f32>, Vec<ExpertCounts>) {
    e.set_expert_stats(true);
    let seq = e.new_seq();
    let (mut logits, mut counts) = (Vec::new(), Vec::new());
    for span in spans(toks.len(), chunks) {
        if let Some(routes) = replay {
            let layers = routes[0].len();
            let per_layer = (0..layers)
                .map(|l| {
                    routes[span.clone()]
                        .iter()
                        .flat_map(|t| t[l].clone())
                        .collect()
                })
                .collect();
            e.replay_routing(per_layer).expect("replay");
        }
        let step = SeqStep {
            seq,
            tokens: toks[span].to_vec(),
            logits: LogitsMode::All,
            ..Default::default()
        };
        let res = e.step(&ForwardBatch { seqs: vec![step] }).expect("step");
        logits.extend_from_slice(&res[0].logits);
        counts.push(e.take_expert_counts().expect("a MoE model"));
    }
    e.free_seq(seq);
    e.set_expert_stats(false);
    (logits, counts)
}

/// Each token's experts in each MoE layer: `routes[t][l]`.
pub type Routes = Vec<Vec<Vec<u32>>>;

/// A fixture's CPU engine, its first reference sequence, that sequence's logits and its
/// routing, token by token.
fn routed(name: &str) -> (Engine, Vec<u32>, Vec<f32>, Routes) {
    let mut e = engine_for(Model::load(&fixture(name)).expect("load fixture"));
    let toks = reference(name).1.swap_remove(0).0;
    let (logits, counts) = run_routed(&mut e, &toks, &[1], None);
    let routes = counts.iter().map(token_routes).collect();
    (e, toks, logits, routes)
}

#[test]
fn replaying_a_models_own_routing_changes_nothing() {
    for name in ["mixtral", "qwen2-moe", "qwen3-moe"] {
        let (mut e, toks, want, routes) = routed(name);
        let top_k = e.model.cfg.moe.as_ref().expect("MoE").experts_per_token;
        assert!(routes.iter().flatten().all(|l| l.len() == top_k), "{name}");
        // Token by token, all at once and in chunks: bit for bit, no regret.
        for chunks in [&[1][..], &[usize::MAX][..], &[5, 17, 3][..]] {
            let (got, _) = run_routed(&mut e, &toks, chunks, Some(&routes));
            let (nmse, _) = errors(&got, &want);
            assert!(nmse < 1e-10, "{name} chunks {chunks:?}: NMSE {nmse:.2e}");
            assert_eq!(e.model.take_replay_regret(), 0.0, "{name}");
        }
    }
}

#[test]
fn replaying_other_experts_moves_the_logits_and_reports_the_regret() {
    let (mut e, toks, want, mut routes) = routed("mixtral");
    let vocab = e.model.cfg.vocab_size;
    // Token 40's first-layer experts: the first replaced by one it did not choose.
    let at = 40;
    let spare = (0..8)
        .find(|x| !routes[at][0].contains(x))
        .expect("8 experts, top 2");
    routes[at][0][0] = spare;
    let (got, _) = run_routed(&mut e, &toks, &[1], Some(&routes));
    let regret = e.model.take_replay_regret();
    assert!(regret > 0.0, "regret {regret}");
    let (before, _) = errors(&got[..at * vocab], &want[..at * vocab]);
    let (there, _) = errors(
        &got[at * vocab..(at + 1) * vocab],
        &want[at * vocab..(at + 1) * vocab],
    );
    assert!(
        before < 1e-10,
        "positions before the replayed change: NMSE {before:.2e}"
    );
    assert!(
        there > 1e-4,
        "the replayed token's logits: NMSE {there:.2e}"
    );
    println!("another expert for token {at}: regret {regret:.3}, its logits NMSE {there:.2e}");
}

#[test]
fn bad_replays_are_errors() {
    let (mut e, toks, want, routes) = routed("qwen2-moe");
    // qwen2-moe has two MoE layers (layer 1 is dense) and routes to the top 4 of 8.
    let err = |r: Result<(), arbor_runtime::RuntimeError>| r.expect_err("an error").to_string();
    let one = err(e.replay_routing(vec![vec![0, 1, 2, 3]]));
    assert!(
        one.contains("1 layers") && one.contains("2 MoE layers"),
        "{one}"
    );
    let odd = err(e.replay_routing(vec![vec![0, 1, 2], vec![0, 1, 2, 3]]));
    assert!(odd.contains("multiple of top_k 4"), "{odd}");
    let range = err(e.replay_routing(vec![vec![0, 1, 2, 8], vec![0, 1, 2, 3]]));
    assert!(range.contains("no expert 8"), "{range}");
    // A replay for one token used by a step of two: that step fails in the first MoE layer,
    // nothing appended, and the later layer's entry is dropped with it: the experts of the
    // token whose last-layer choice shares least with token 0's, which a next pass of token 0
    // would show.
    let shared = |t: &Vec<Vec<u32>>| t[1].iter().filter(|x| routes[0][1].contains(x)).count();
    let other = routes.iter().min_by_key(|t| shared(t)).expect("tokens");
    e.replay_routing(other.clone()).expect("queued");
    let seq = e.new_seq();
    let step = SeqStep {
        seq,
        tokens: toks[..2].to_vec(),
        logits: LogitsMode::Last,
        ..Default::default()
    };
    let bad = e.step(&ForwardBatch { seqs: vec![step] });
    let msg = bad.expect_err("a mismatched replay").to_string();
    assert!(msg.contains("expert ids for 2 rows"), "{msg}");
    e.free_seq(seq);
    let (after, _) = run_routed(&mut e, &toks, &[1], None);
    let regret = e.model.take_replay_regret();
    assert_eq!(regret, 0.0, "a failed step's replay was left queued");
    let (nmse, _) = errors(&after, &want);
    assert!(nmse < 1e-10, "NMSE {nmse:.2e}");
    // A dense model has nothing to replay.
    let dense = engine_for(Model::load(&fixture("llama")).expect("load fixture"));
    assert!(dense.replay_routing(vec![vec![0]]).is_err());
    let _: Option<ExpertCounts> = dense.take_expert_counts();
}

#[test]
fn replayed_routing_weights_the_given_experts_as_the_router_would() {
    let (n_exp, t) = (8, 40);
    let l = values(n_exp * t, 9)
        .iter()
        .map(|x| 4.0 * x)
        .collect::<Vec<_>>();
    for (k, renorm) in [(1, true), (2, true), (4, false), (8, false)] {
        let own = ops::route_softmax_topk(&l, n_exp, k, renorm).expect("route");
        // Its own choice, given in any order, replays to the same routing with no regret.
        let mut shuffled = own.experts.clone();
        shuffled.chunks_mut(k).for_each(|r| r.reverse());
        let again = ops::route_given(&l, n_exp, k, &shuffled, renorm).expect("replay");
        assert_eq!(again, own, "k {k}");
        assert_eq!(ops::routing_regret(&l, n_exp, &own), 0.0, "k {k}");
    }
    // Another choice: weights are the router's probabilities of the given experts, and the
    // regret is the k-th best logit minus the lowest chosen one.
    let row = [0.5f32, 2.0, -1.0, 1.5];
    let r = ops::route_given(&row, 4, 2, &[0, 3], false).expect("replay");
    assert_eq!(r.experts, vec![3, 0], "descending probability");
    let z: f32 = row.iter().map(|x| x.exp()).sum();
    assert!((r.weights[0] - 1.5f32.exp() / z).abs() < 1e-6);
    assert!((r.weights[1] - 0.5f32.exp() / z).abs() < 1e-6);
    assert!((ops::routing_regret(&row, 4, &r) - 1.0).abs() < 1e-6);
    let n = ops::route_given(&row, 4, 2, &[0, 3], true).expect("replay");
    assert!((n.weights.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    // Bad replays are errors, never panics.
    assert!(
        ops::route_given(&row, 4, 2, &[0, 4], false).is_err(),
        "range"
    );
    assert!(
        ops::route_given(&row, 4, 2, &[1, 1], false).is_err(),
        "twice"
    );
    assert!(ops::route_given(&row, 4, 2, &[1], false).is_err(), "length");
    assert!(
        ops::route_given(&row, 4, 5, &[0, 1, 2, 3, 0], false).is_err(),
        "top k"
    );
}
