//! Verifier models in their own engines, stepped in the same ticks as the policy: a trained
//! outcome reward model, a process reward model and another LM as judge.

use super::{assert_clean, fixture, prompt, scheduler};
use arbor_kernels::ops::SamplingParams;
use arbor_runtime::{Engine, EngineOptions, ForwardBatch, LogitsMode, SeqStep};
use arbor_search::verifier::{Judge, Verifier};
use arbor_search::{
    strategies, Outcome, Params, Scheduler, SchedulerOptions, Scoring, SearchRequest, VerifierModel,
};
use std::path::{Path, PathBuf};

fn model_dir(name: &str) -> PathBuf {
    fixture().join("..").join(name)
}

/// A lane for the model at `dir`, scoring by its reward head (or as judge when `judge`).
fn lane(dir: &Path, judge: bool) -> VerifierModel {
    lane_sized(dir, judge, 2 << 20)
}

/// [`lane`] with a KV pool of `kv_bytes`.
fn lane_sized(dir: &Path, judge: bool, kv_bytes: usize) -> VerifierModel {
    let loaded = arbor_runtime::load(dir).expect("verifier fixture");
    let scoring = match loaded.model.cfg.reward.clone() {
        Some(head) if !judge => Scoring::Reward {
            head,
            separator: "\n".into(),
        },
        _ => Scoring::Judge(Judge::default()),
    };
    let engine = Engine::new(
        loaded.model,
        &EngineOptions {
            kv_cache_bytes: kv_bytes,
            page_size: 8,
        },
    )
    .expect("engine");
    VerifierModel::new(dir.display().to_string(), engine, loaded.tokenizer, scoring)
}

fn best_of(s: &mut Scheduler, n: usize, verifier: Verifier) -> u64 {
    best_of_len(s, n, 5, verifier)
}

/// [`best_of`] with `max_tokens` new tokens per candidate.
fn best_of_len(s: &mut Scheduler, n: usize, max_tokens: usize, verifier: Verifier) -> u64 {
    let params = Params::new(n).set("max_tokens", max_tokens);
    s.submit_search(SearchRequest {
        prompt: prompt(11, 3),
        question: "q".into(),
        strategy: strategies::build("best-of-n", &params).unwrap(),
        verifiers: vec![verifier],
        sampling: SamplingParams {
            temperature: 1.0,
            seed: 11,
            ..Default::default()
        },
        max_policy_tokens: None,
        max_wall: None,
    })
}

/// What the reward model says about `answer` to "q" when run alone: the lane's rendering
/// for a tokenizer without a chat template is `question \n answer`.
fn direct_score(dir: &Path, answer: &str) -> f64 {
    let loaded = arbor_runtime::load(dir).expect("fixture");
    let head = loaded.model.cfg.reward.clone().expect("reward head");
    assert!(loaded.tokenizer.chat_template().is_none());
    let tok = &loaded.tokenizer;
    let tokens = tok
        .encode(&format!("q\n{answer}"), tok.add_bos_default(), false)
        .unwrap();
    let mut e = Engine::new(loaded.model, &EngineOptions::default()).unwrap();
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
        .unwrap();
    f64::from(head.prob(&out[0].logits))
}

/// Every candidate's score is what the reward model at `dir` gives it run alone.
fn assert_scores_are_direct(dir: &Path, candidates: &[arbor_search::scheduler::Candidate]) {
    for c in candidates {
        let want = direct_score(dir, &c.text);
        let got = c.score.expect("scored");
        assert!(
            (got - want).abs() < 1e-5,
            "{got} vs {want} for {:?}",
            c.text
        );
    }
}

#[test]
fn an_outcome_reward_model_scores_in_the_same_ticks() {
    let dir = model_dir("reward-orm");
    let mut s = scheduler(4 << 20, SchedulerOptions::default());
    let l = s.add_verifier_model(lane(&dir, false));
    let name = s.verifier_models()[l].name.clone();
    let id = best_of(
        &mut s,
        4,
        Verifier::Model {
            lane: l,
            name: name.clone(),
        },
    );
    let mut done = s.run_to_completion();
    let (got, Outcome::Search(Ok(r))) = done.remove(0) else {
        panic!("search failed")
    };
    assert_eq!(got, id);
    assert_eq!(r.verifiers, vec![name]);
    assert_eq!(r.candidates.len(), 4);
    assert!(r.accounting.verifier_tokens > 0, "{:?}", r.accounting);
    assert_scores_are_direct(&dir, &r.candidates);
    let best = r
        .candidates
        .iter()
        .map(|c| c.score.unwrap())
        .fold(f64::MIN, f64::max);
    assert_eq!(
        r.candidates[0].score,
        Some(best),
        "the answer is the best-scored"
    );
    assert_clean(&s);
    assert_eq!(s.verifier_models()[l].engine().kv_stats().pages_in_use, 0);
}

/// The policy's and lane `l`'s pools together never hold more bytes than their configured
/// sizes (`policy_pages`, `base`) did.
fn assert_one_budget(s: &Scheduler, l: usize, policy_pages: usize, base: usize) {
    let (p, v) = (
        s.engine().kv_stats(),
        s.verifier_models()[l].engine().kv_stats(),
    );
    let now = p.pages_total * p.page_bytes + v.pages_total * v.page_bytes;
    let budget = policy_pages * p.page_bytes + base * v.page_bytes;
    assert!(
        now <= budget,
        "{} + {} pages exceed the budget of {policy_pages} + {base}",
        p.pages_total,
        v.pages_total
    );
}

#[test]
fn a_small_policy_pool_borrows_an_idle_verifier_pool_and_gives_it_back() {
    let dir = model_dir("reward-orm");
    // A policy pool of 10 pages: a search of 8 branches on an 11-token prompt is admitted,
    // but its branches do not all fit beside each other as they grow.
    let probe = scheduler(1 << 20, SchedulerOptions::default());
    let pb = probe.engine().kv_stats().page_bytes;
    let mut s = scheduler(10 * pb, SchedulerOptions::default());
    let policy_pages = s.engine().kv_stats().pages_total;
    let l = s.add_verifier_model(lane_sized(&dir, false, 2 << 20));
    let base = s.verifier_models()[l].engine().kv_stats().pages_total;
    let name = s.verifier_models()[l].name.clone();
    // 12 new tokens: each branch grows past its copied prompt page into two more.
    best_of_len(&mut s, 8, 12, Verifier::Model { lane: l, name });
    let (mut most, mut least) = (policy_pages, base);
    while s.active() > 0 {
        s.tick();
        most = most.max(s.engine().kv_stats().pages_total);
        least = least.min(s.verifier_models()[l].engine().kv_stats().pages_total);
        assert_one_budget(&s, l, policy_pages, base);
    }
    let (_, out) = s.take_finished().remove(0);
    let Outcome::Search(Ok(r)) = out else {
        panic!("search failed: {out:?}")
    };
    assert_eq!(r.candidates.len(), 8);
    assert_scores_are_direct(&dir, &r.candidates);
    assert!(
        most > policy_pages,
        "the policy never grew ({policy_pages} pages)"
    );
    assert!(least < base, "the lane never lent ({base} pages)");
    // The lane took its pool back to score the candidates.
    assert!(s.kv_moves() >= 2, "{} moves", s.kv_moves());
    assert_clean(&s);
}

#[test]
fn a_small_verifier_pool_borrows_the_policys_spare_pages_and_gives_them_back() {
    let dir = model_dir("reward-orm");
    let mut s = scheduler(4 << 20, SchedulerOptions::default());
    let policy_pages = s.engine().kv_stats().pages_total;
    // Room for about one candidate at a time.
    let l = s.add_verifier_model(lane_sized(&dir, false, 12 << 10));
    let base = s.verifier_models()[l].engine().kv_stats().pages_total;
    assert!((2..=4).contains(&base), "{base} pages");
    let name = s.verifier_models()[l].name.clone();
    best_of(&mut s, 8, Verifier::Model { lane: l, name });
    let mut most = base;
    while s.active() > 0 {
        s.tick();
        most = most.max(s.verifier_models()[l].engine().kv_stats().pages_total);
        assert_one_budget(&s, l, policy_pages, base);
    }
    let (_, Outcome::Search(Ok(r))) = s.take_finished().remove(0) else {
        panic!("search failed")
    };
    assert_eq!(r.candidates.len(), 8);
    assert_scores_are_direct(&dir, &r.candidates);
    assert!(most > base, "the lane never grew ({base} pages)");
    assert!(s.kv_moves() >= 2, "{} moves", s.kv_moves());
    // Everything is given back once the lane is idle.
    assert_eq!(s.engine().kv_stats().pages_total, policy_pages);
    assert_eq!(s.verifier_models()[l].engine().kv_stats().pages_total, base);
    assert_clean(&s);
}

#[test]
fn a_process_reward_model_and_a_second_lm_judge_share_a_tick() {
    let mut s = scheduler(4 << 20, SchedulerOptions::default());
    let prm = s.add_verifier_model(lane(&model_dir("reward-prm"), false));
    let judge = s.add_verifier_model(lane(&model_dir("llama"), true));
    let a = best_of(
        &mut s,
        3,
        Verifier::Model {
            lane: prm,
            name: "prm".into(),
        },
    );
    let b = best_of(
        &mut s,
        3,
        Verifier::Model {
            lane: judge,
            name: "judge".into(),
        },
    );
    // Cancelling a search frees its scoring sequences too.
    let c = best_of(
        &mut s,
        2,
        Verifier::Model {
            lane: judge,
            name: "judge".into(),
        },
    );
    let mut both_lanes_busy = false;
    let mut ticks = 0;
    while s.active() > 0 {
        both_lanes_busy |= s.verifier_models().iter().all(|m| m.pending() > 0);
        s.tick();
        ticks += 1;
        if ticks == 4 {
            s.cancel(c);
        }
        assert!(ticks < 10_000);
    }
    assert!(
        both_lanes_busy,
        "the two verifier models never had work in the same tick"
    );
    let done = s.take_finished();
    for (id, o) in done {
        match o {
            Outcome::Search(Ok(r)) if id == a || id == b => {
                assert_eq!(r.candidates.len(), 3);
                for c in &r.candidates {
                    let x = c.score.expect("scored");
                    assert!(x > 0.0 && x < 1.0, "{x}");
                }
            }
            Outcome::Search(Err(e)) if id == c => assert!(e.contains("cancelled"), "{e}"),
            other => panic!("{id}: {other:?}"),
        }
    }
    assert_clean(&s);
    for m in s.verifier_models() {
        assert_eq!(
            m.engine().kv_stats().pages_in_use,
            0,
            "{} leaked pages",
            m.name
        );
    }
}

#[test]
fn a_missing_lane_is_a_clear_error() {
    let mut s = scheduler(4 << 20, SchedulerOptions::default());
    best_of(
        &mut s,
        2,
        Verifier::Model {
            lane: 3,
            name: "nope".into(),
        },
    );
    let (_, o) = s.run_to_completion().remove(0);
    let Outcome::Search(Err(e)) = o else {
        panic!("{o:?}")
    };
    assert!(e.contains("verifier model 3 is not loaded"), "{e}");
    assert_clean(&s);
}
