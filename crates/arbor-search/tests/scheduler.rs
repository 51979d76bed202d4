//! The scheduler on the tiny qwen2 fixture: packing of mixed work into shared steps, the
//! equivalence of a scheduled plain request with `generate`, top-k expansion, the LM judge,
//! preemption under KV pressure, and a stress run of random searches with random
//! cancellations that must leak no KV page.

use arbor_kernels::ops::SamplingParams;
use arbor_runtime::{Engine, EngineOptions, Model};
use arbor_search::verifier::{Judge, TextVerifier, Verdict, Verifier};
use arbor_search::{
    Action, Event, GenerateRequest, NodeId, Outcome, Scheduler, SchedulerOptions, SearchRequest,
    SearchTree, Strategy, Until,
};
use std::path::PathBuf;

#[path = "scheduler/sparse.rs"]
mod sparse;
#[path = "scheduler/verifier_models.rs"]
mod verifier_models;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/qwen2")
}

fn scheduler(kv_bytes: usize, opts: SchedulerOptions) -> Scheduler {
    let loaded = arbor_runtime::load(&fixture()).expect("fixture");
    let engine = Engine::new(
        loaded.model,
        &EngineOptions {
            kv_cache_bytes: kv_bytes,
            page_size: 8,
        },
    )
    .expect("engine");
    Scheduler::new(engine, loaded.tokenizer, opts)
}

/// Scores a candidate by its length, so tests know the ranking.
struct LengthVerifier;
impl TextVerifier for LengthVerifier {
    fn name(&self) -> String {
        "length".into()
    }
    fn score(&mut self, _q: &str, answer: &str) -> Result<f64, String> {
        Ok(answer.len() as f64)
    }
}

/// Expands the root `k` ways, scores every child as it stops, prunes all but the best and
/// finishes with it.
struct Probe {
    k: usize,
    tokens: usize,
    stopped: usize,
    scored: Vec<(NodeId, f64)>,
}

impl Probe {
    fn new(k: usize, tokens: usize) -> Self {
        Probe {
            k,
            tokens,
            stopped: 0,
            scored: vec![],
        }
    }
}

impl Strategy for Probe {
    fn name(&self) -> &str {
        "probe"
    }
    fn width(&self) -> usize {
        self.k
    }
    fn start(&mut self, _t: &SearchTree) -> Vec<Action> {
        vec![Action::Expand {
            node: 0,
            k: self.k,
            until: Until::tokens(self.tokens),
        }]
    }
    fn on_event(&mut self, _t: &SearchTree, e: Event) -> Vec<Action> {
        match e {
            Event::Expanded { child, .. } => {
                self.stopped += 1;
                vec![Action::Score {
                    node: child,
                    verifier: 0,
                }]
            }
            Event::Scored { node, score, .. } => {
                self.scored.push((node, score));
                if self.scored.len() < self.k {
                    return vec![];
                }
                let best = self
                    .scored
                    .iter()
                    .fold(self.scored[0], |b, &x| if x.1 > b.1 { x } else { b });
                let mut acts: Vec<Action> = self
                    .scored
                    .iter()
                    .filter(|x| x.0 != best.0)
                    .map(|x| Action::Prune {
                        node: x.0,
                        reason: "not best".into(),
                    })
                    .collect();
                acts.push(Action::finish(best.0));
                acts
            }
            Event::TopK { .. } | Event::Extended { .. } => vec![],
        }
    }
}

fn probe_search(prompt: Vec<u32>, k: usize, tokens: usize, seed: u64) -> SearchRequest {
    let verifier = Verifier::Text(Box::new(LengthVerifier));
    request(prompt, Box::new(Probe::new(k, tokens)), verifier, seed)
}

/// A search of `strategy` on `prompt` with one verifier, sampling at temperature 1.
fn request(
    prompt: Vec<u32>,
    strategy: Box<dyn Strategy>,
    verifier: Verifier,
    seed: u64,
) -> SearchRequest {
    SearchRequest {
        prompt,
        question: "q".into(),
        strategy,
        verifiers: vec![verifier],
        sampling: SamplingParams {
            temperature: 1.0,
            seed,
            ..Default::default()
        },
        max_policy_tokens: None,
        max_wall: None,
    }
}

fn prompt(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 31 + salt * 7 + 3) % 380)
        .collect()
}

fn assert_clean(s: &Scheduler) {
    s.engine().cache().check().expect("KV bookkeeping");
    assert_eq!(s.engine().kv_stats().pages_in_use, 0, "pages leaked");
    assert_eq!(s.engine().seqs().count(), 0, "sequences leaked");
}

#[test]
fn searches_and_plain_requests_share_steps() {
    let mut s = scheduler(8 << 20, SchedulerOptions::default());
    let a = s.submit_search(probe_search(prompt(20, 1), 4, 6, 1));
    let b = s.submit_search(probe_search(prompt(17, 2), 3, 6, 2));
    let plain: Vec<_> = (0..3)
        .map(|i| {
            s.submit_generate(GenerateRequest {
                prompt: prompt(9 + i, 10 + i as u32),
                sampling: SamplingParams::default(),
                max_tokens: 8,
                stop: vec![],
            })
        })
        .collect();
    let mut mixed = false;
    while s.active() > 0 {
        s.tick();
        let owners: std::collections::HashSet<_> = s.last_batch().iter().map(|e| e.owner).collect();
        if owners.contains(&a) && owners.contains(&b) && plain.iter().any(|p| owners.contains(p)) {
            mixed = true;
        }
    }
    assert!(mixed, "no step carried both searches and a plain request");
    let out = s.take_finished();
    assert_eq!(out.len(), 5);
    for (id, o) in out {
        match o {
            Outcome::Search(r) => {
                let r = r.expect("search ok");
                assert!(id == a || id == b);
                let best = r.answer.expect("an answer");
                let pruned = r
                    .tree
                    .nodes()
                    .iter()
                    .filter(|n| matches!(n.status, arbor_search::NodeStatus::Pruned { .. }))
                    .count();
                assert_eq!(pruned, if id == a { 3 } else { 2 });
                assert!(r.tree.node(best).is_some());
                assert!(r.accounting.policy_tokens > 0 && r.accounting.forward_passes > 0);
                assert!(r.accounting.kv_peak_bytes > 0);
            }
            Outcome::Generate(g) => assert!(g.expect("generate ok").tokens.len() <= 8),
        }
    }
    assert_clean(&s);
}

/// Scores candidates 1, 0, 1, 0, … in the order asked.
struct Alternating(u32);
impl TextVerifier for Alternating {
    fn name(&self) -> String {
        "alternating".into()
    }
    fn score(&mut self, _q: &str, _answer: &str) -> Result<f64, String> {
        self.0 += 1;
        Ok(f64::from(self.0 % 2))
    }
}

#[test]
fn a_second_expansion_of_the_root_draws_its_samples() {
    // Adaptive probes 2 samples (p = 0.5), then expands the root again for the rest of its
    // budget: the root's anchor was dropped after the probes, so it is recomputed first, and
    // that must release the waiting expansion, not restart the strategy.
    use arbor_search::{strategies, Params};
    let mut s = scheduler(4 << 20, SchedulerOptions::default());
    let params = Params::new(2)
        .set("budget", 6)
        .set("probe", 2)
        .set("min_gain", 0)
        .set("max_tokens", 4);
    let strategy = strategies::build("adaptive", &params).unwrap();
    let verifier = Verifier::Text(Box::new(Alternating(0)));
    let id = s.submit_search(request(prompt(12, 9), strategy, verifier, 5));
    let mut done = s.run_to_completion();
    let (got, Outcome::Search(Ok(r))) = done.remove(0) else {
        panic!("search failed");
    };
    assert_eq!(got, id);
    assert_eq!(r.candidates.len(), 6, "probes plus the rest of the budget");
    assert_eq!(r.tree.node(0).unwrap().children.len(), 6);
    assert_clean(&s);
}

/// Gives every candidate the same score and groups them by the parity of their length.
struct ParityGroups;
impl TextVerifier for ParityGroups {
    fn name(&self) -> String {
        "parity".into()
    }
    fn score(&mut self, _q: &str, _answer: &str) -> Result<f64, String> {
        Ok(1.0)
    }
    fn verdict(&mut self, q: &str, answer: &str) -> Result<Verdict, String> {
        Ok(Verdict {
            score: self.score(q, answer)?,
            group: Some(answer.len() as u64 % 2),
        })
    }
}

#[test]
fn best_of_n_picks_the_likeliest_of_the_largest_verifier_group() {
    use arbor_search::{strategies, Params};
    for seed in 0..4 {
        let mut s = scheduler(4 << 20, SchedulerOptions::default());
        let params = Params::new(9).set("max_tokens", 5);
        let strategy = strategies::build("best-of-n", &params).unwrap();
        let verifier = Verifier::Text(Box::new(ParityGroups));
        s.submit_search(request(prompt(10, 3), strategy, verifier, seed));
        let (_, Outcome::Search(Ok(r))) = s.run_to_completion().remove(0) else {
            panic!("search failed");
        };
        assert_eq!(r.candidates.len(), 9);
        // Groups are numbered by first appearance, and follow the verifier's.
        assert_eq!(r.candidates[0].group, Some(0));
        for c in &r.candidates {
            let first = r
                .candidates
                .iter()
                .find(|o| o.text.len() % 2 == c.text.len() % 2);
            assert_eq!(c.group, first.and_then(|f| f.group));
        }
        let size = |g| r.candidates.iter().filter(|c| c.group == g).count();
        let chosen = r
            .candidates
            .iter()
            .find(|c| Some(c.node) == r.answer)
            .expect("answer");
        assert!(r
            .candidates
            .iter()
            .all(|c| size(c.group) <= size(chosen.group)));
        let mean = |c: &arbor_search::Candidate| c.logprob / c.tokens.max(1) as f64;
        for c in r.candidates.iter().filter(|c| c.group == chosen.group) {
            assert!(
                mean(c) <= mean(chosen),
                "seed {seed}: {c:?} beats {chosen:?}"
            );
        }
        assert_clean(&s);
    }
}

#[test]
fn a_scheduled_request_equals_generate() {
    let loaded = arbor_runtime::load(&fixture()).expect("fixture");
    let mut engine = Engine::new(
        Model::load(&fixture()).expect("fixture"),
        &EngineOptions {
            kv_cache_bytes: 4 << 20,
            page_size: 8,
        },
    )
    .expect("engine");
    let p = prompt(13, 5);
    let opts = arbor_runtime::GenerateOptions {
        max_tokens: 20,
        sampling: SamplingParams::default(),
        stop: vec![],
    };
    let want = arbor_runtime::generate(&mut engine, &loaded.tokenizer, &p, &opts, &mut |_| {})
        .expect("generate");
    let mut s = scheduler(4 << 20, SchedulerOptions::default());
    // Busy the scheduler with a search so the request shares steps.
    s.submit_search(probe_search(prompt(11, 9), 3, 10, 3));
    let id = s.submit_generate(GenerateRequest {
        prompt: p,
        sampling: SamplingParams::default(),
        max_tokens: 20,
        stop: vec![],
    });
    let out = s.run_to_completion();
    let got = out
        .into_iter()
        .find_map(|(i, o)| match (i == id, o) {
            (true, Outcome::Generate(g)) => Some(g.expect("ok")),
            _ => None,
        })
        .expect("result");
    assert_eq!(got.tokens, want.tokens);
    assert_clean(&s);
}

/// Top-k expansion of the root, then the policy judges each child kept of the offer.
struct TopKJudge {
    /// Options of the offer kept (all when None).
    picks: Option<Vec<usize>>,
    children: Vec<NodeId>,
    scores: Vec<(NodeId, f64)>,
}
impl Strategy for TopKJudge {
    fn name(&self) -> &str {
        "topk-judge"
    }
    fn width(&self) -> usize {
        3
    }
    fn start(&mut self, _t: &SearchTree) -> Vec<Action> {
        vec![Action::ExpandTopK { node: 0, k: 3 }]
    }
    fn on_event(&mut self, _t: &SearchTree, e: Event) -> Vec<Action> {
        match e {
            Event::TopK { node, options } => vec![Action::Extend {
                node,
                picks: (self.picks.clone()).unwrap_or_else(|| (0..options.len()).collect()),
            }],
            Event::Extended { children, .. } => {
                self.children = children.clone();
                children
                    .iter()
                    .map(|&c| Action::Score {
                        node: c,
                        verifier: 0,
                    })
                    .collect()
            }
            Event::Scored { node, score, .. } => {
                self.scores.push((node, score));
                if self.scores.len() == self.children.len() {
                    vec![Action::Finish {
                        answer: Some(self.children[0]),
                        text: None,
                    }]
                } else {
                    vec![]
                }
            }
            Event::Expanded { .. } => vec![],
        }
    }
}

#[test]
fn top_k_children_are_the_most_likely_tokens_and_the_judge_scores_them() {
    let mut s = scheduler(4 << 20, SchedulerOptions::default());
    let p = prompt(10, 4);
    let id = s.submit_search(top_k_search(p.clone(), None));
    let out = s.run_to_completion();
    let r = match out.into_iter().find(|(i, _)| *i == id) {
        Some((_, Outcome::Search(r))) => r.expect("ok"),
        _ => panic!("no result"),
    };
    // The children are the 3 most likely next tokens of the prompt, in order.
    let mut e = Engine::new(
        Model::load(&fixture()).expect("fixture"),
        &EngineOptions {
            kv_cache_bytes: 4 << 20,
            page_size: 8,
        },
    )
    .expect("engine");
    let seq = e.new_seq();
    let o = e
        .step(&arbor_runtime::ForwardBatch {
            seqs: vec![arbor_runtime::SeqStep {
                seq,
                tokens: p,
                logits: arbor_runtime::LogitsMode::Last,
                ..Default::default()
            }],
        })
        .expect("step");
    let mut order: Vec<usize> = (0..o[0].logits.len()).collect();
    order.sort_by(|&a, &b| o[0].logits[b].total_cmp(&o[0].logits[a]).then(a.cmp(&b)));
    let kids = &r.tree.node(0).expect("root").children;
    assert_eq!(kids.len(), 3);
    for (i, &c) in kids.iter().enumerate() {
        let n = r.tree.node(c).expect("child");
        assert_eq!(n.tokens, vec![order[i] as u32]);
        let score = n.score.expect("judged");
        assert!(score > 0.0 && score < 1.0, "{score}");
    }
    assert!(r.accounting.verifier_tokens > 0);
    assert_eq!(r.verifiers, vec!["judge:policy".to_string()]);
    assert_clean(&s);
}

/// A search of `TopKJudge` keeping `picks` of the root's offer (all when None).
fn top_k_search(prompt: Vec<u32>, picks: Option<Vec<usize>>) -> SearchRequest {
    SearchRequest {
        prompt,
        question: "2+2?".into(),
        strategy: Box::new(TopKJudge {
            picks,
            children: vec![],
            scores: vec![],
        }),
        verifiers: vec![Verifier::Judge(Judge::default())],
        sampling: SamplingParams::default(),
        max_policy_tokens: None,
        max_wall: None,
    }
}

#[test]
fn only_the_kept_options_of_an_offer_become_nodes() {
    let mut s = scheduler(4 << 20, SchedulerOptions::default());
    let kept = s.submit_search(top_k_search(prompt(12, 5), Some(vec![2, 0])));
    let bad = s.submit_search(top_k_search(prompt(12, 5), Some(vec![1, 3])));
    for (id, o) in s.run_to_completion() {
        match o {
            Outcome::Search(Ok(r)) if id == kept => {
                let kids = &r.tree.node(0).expect("root").children;
                assert_eq!(kids.len(), 2, "offered 3, kept 2");
                let lp = |c: NodeId| r.tree.node(c).expect("child").logprob;
                // Kept in pick order: the third likeliest token, then the likeliest.
                assert!(
                    lp(kids[0]) <= lp(kids[1]),
                    "{} {}",
                    lp(kids[0]),
                    lp(kids[1])
                );
            }
            Outcome::Search(Err(e)) if id == bad => {
                assert!(e.contains("pick 3") && e.contains("3 tokens"), "{e}")
            }
            o => panic!("search {id}: {o:?}"),
        }
    }
    assert_clean(&s);
}

#[test]
fn pressure_preempts_and_every_search_still_ends() {
    // A pool of ~40 pages of 8 tokens: twelve searches of 5 branches cannot all fit at once.
    let page = 2 * 2 * 64 * 8 * 4 * 2; // generous upper bound of the fixture's page bytes
    let mut s = scheduler(40 * page, SchedulerOptions::default());
    let pages = s.engine().cache().allocator().num_total();
    assert!(pages < 200, "{pages} pages: the test wants pressure");
    let ids: Vec<_> = (0..12)
        .map(|i| s.submit_search(probe_search(prompt(30 + i, i as u32), 5, 40, i as u64)))
        .collect();
    let out = s.run_to_completion();
    assert_eq!(out.len(), ids.len());
    let mut ok = 0;
    for (_, o) in out {
        match o {
            Outcome::Search(r) => match r {
                Ok(_) => ok += 1,
                Err(e) => assert!(e.contains("--kv-cache-gb"), "{e}"),
            },
            Outcome::Generate(_) => unreachable!(),
        }
    }
    assert_eq!(
        ok,
        ids.len(),
        "every search fits alone, so every one must finish"
    );
    assert!(
        s.preemptions() > 0,
        "the pool was meant to be too small for all at once"
    );
    assert_clean(&s);
}

#[test]
fn thousands_of_random_searches_with_cancellations_leak_nothing() {
    let t0 = std::time::Instant::now();
    let mut s = scheduler(
        2 << 20,
        SchedulerOptions {
            max_batch_tokens: 512,
            max_seqs: 64,
        },
    );
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let (mut submitted, mut ended) = (0, 0);
    let mut live: Vec<u64> = vec![];
    while submitted < 2000 {
        for _ in 0..next(6) {
            let k = 1 + next(4) as usize;
            let len = 2 + next(40) as usize;
            let id = if next(4) == 0 {
                s.submit_generate(GenerateRequest {
                    prompt: prompt(len, next(1000) as u32),
                    sampling: SamplingParams {
                        temperature: 1.0,
                        seed: next(1 << 30),
                        ..Default::default()
                    },
                    max_tokens: 1 + next(10) as usize,
                    stop: vec![],
                })
            } else if next(3) == 0 {
                // Token-level beams: top-k children share their parent's sequence until
                // they expand or are pruned.
                let params = arbor_search::Params::new(k).set("max_tokens", 1 + next(6));
                let beam = arbor_search::strategies::build("beam", &params).expect("beam");
                let verifier = Verifier::Text(Box::new(LengthVerifier));
                let p = prompt(len, next(1000) as u32);
                s.submit_search(request(p, beam, verifier, next(1 << 30)))
            } else {
                s.submit_search(probe_search(
                    prompt(len, next(1000) as u32),
                    k,
                    1 + next(10) as usize,
                    next(1 << 30),
                ))
            };
            live.push(id);
            submitted += 1;
        }
        if !live.is_empty() && next(3) == 0 {
            let victim = live.swap_remove(next(live.len() as u64) as usize);
            s.cancel(victim);
        }
        s.tick();
        ended += s.take_finished().len();
    }
    ended += s.run_to_completion().len();
    assert_eq!(ended, submitted, "every request ends exactly once");
    assert_clean(&s);
    assert!(t0.elapsed().as_secs() < 120, "stress run too slow");
}

/// Every strategy, all sixteen at once in one scheduler on the real default model, with the
/// policy as its own judge: each must end with an answer, and they must share steps.
#[test]
fn every_strategy_runs_to_a_result_on_smollm2() {
    use arbor_search::{strategies, Params};
    let path = arbor_runtime::fetch::DEFAULT_MODEL
        .ensure(&|_, _| {})
        .expect("fetch the default model (network needed once)");
    let loaded = arbor_runtime::load(&path).expect("load SmolLM2");
    let engine = Engine::new(
        loaded.model,
        &EngineOptions {
            kv_cache_bytes: 256 << 20,
            page_size: 16,
        },
    )
    .expect("engine");
    let mut s = Scheduler::new(engine, loaded.tokenizer, SchedulerOptions::default());
    let question = "What is 12 times 3?";
    let prompt = s.render_prompt(question).expect("prompt");
    let mut ids = Vec::new();
    for (i, name) in strategies::NAMES.iter().enumerate() {
        let items: Vec<String> = match *name {
            "beam" => vec!["max_tokens=6".into()],
            "step-beam" | "dvts" | "lookahead" | "rebase" | "backtrack" => {
                vec!["step_tokens=6".into(), "max_steps=2".into()]
            }
            "mcts" => vec![
                "step_tokens=6".into(),
                "max_steps=2".into(),
                "simulations=3".into(),
            ],
            "pdr" => vec![
                "max_tokens=8".into(),
                "summary_tokens=8".into(),
                "rounds=1".into(),
            ],
            _ => vec!["max_tokens=8".into()],
        };
        let params = Params::parse(2, &items).expect("params");
        let strategy = strategies::build(name, &params).unwrap_or_else(|e| panic!("{name}: {e}"));
        let id = s.submit_search(SearchRequest {
            prompt: prompt.clone(),
            question: question.into(),
            strategy,
            verifiers: vec![Verifier::Judge(Judge::default())],
            sampling: SamplingParams {
                temperature: 0.8,
                seed: i as u64,
                ..Default::default()
            },
            max_policy_tokens: None,
            max_wall: None,
        });
        ids.push((id, *name));
    }
    let mut widest = 0;
    while s.active() > 0 {
        s.tick();
        let owners: std::collections::HashSet<_> = s.last_batch().iter().map(|e| e.owner).collect();
        widest = widest.max(owners.len());
    }
    assert!(
        widest >= 8,
        "searches should share steps; at most {widest} did"
    );
    let out = s.take_finished();
    for (id, name) in ids {
        let r = match out.iter().find(|(i, _)| *i == id) {
            Some((_, Outcome::Search(r))) => r.as_ref().unwrap_or_else(|e| panic!("{name}: {e}")),
            _ => panic!("{name}: no outcome"),
        };
        assert!(!r.answer_text.trim().is_empty(), "{name}: empty answer");
        assert!(r.accounting.policy_tokens > 0, "{name}");
    }
    assert_clean(&s);
}

#[test]
fn st_bon_gets_hidden_states_from_the_engine() {
    use arbor_search::{strategies, Params};
    let mut s = scheduler(4 << 20, SchedulerOptions::default());
    let params = Params::new(3).set("window", 4).set("max_tokens", 8);
    s.submit_search(SearchRequest {
        prompt: prompt(9, 5),
        question: "q".into(),
        strategy: strategies::build("st-bon", &params).unwrap(),
        verifiers: vec![],
        sampling: SamplingParams {
            temperature: 1.0,
            seed: 3,
            ..Default::default()
        },
        max_policy_tokens: None,
        max_wall: None,
    });
    let (_, o) = s.run_to_completion().remove(0);
    let Outcome::Search(Ok(r)) = o else {
        panic!("{o:?}")
    };
    let json = r.tree.to_json().to_string();
    assert!(
        json.contains("hidden-state consistency"),
        "losers must be cut by hidden-state consistency: {json}"
    );
    assert_clean(&s);
}
