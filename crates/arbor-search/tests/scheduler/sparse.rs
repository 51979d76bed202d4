//! Per-request sparse attention budgets reach the engine: a budget above every page count
//! changes nothing, a budget of one page moves the log-probabilities, for a plain request,
//! the grouped choices of one prompt and a search; the budget of an ended request is dropped.

use super::{assert_clean, probe_search, prompt};
use arbor_kernels::ops::SamplingParams;
use arbor_runtime::{Engine, EngineOptions};
use arbor_search::scheduler::Progress;
use arbor_search::{GenerateRequest, Outcome, Scheduler, SchedulerOptions};

fn scheduler() -> Scheduler {
    let mut loaded = arbor_runtime::load(&super::fixture()).expect("fixture");
    // The fixture has two layers, both dense by default: make budgets bite.
    loaded.model.attention.sparse.dense_layers = 0;
    let engine = Engine::new(
        loaded.model,
        &EngineOptions {
            kv_cache_bytes: 8 << 20,
            page_size: 8,
        },
    )
    .expect("engine");
    Scheduler::new(engine, loaded.tokenizer, SchedulerOptions::default())
}

/// Log-probabilities of every token of a plain request, of the 3 grouped choices of another
/// prompt, and of a search's candidates, each run with `budget`.
fn run(budget: Option<usize>) -> Vec<Vec<f64>> {
    let mut s = scheduler();
    s.set_progress(true);
    let req = |p| GenerateRequest {
        prompt: p,
        sampling: SamplingParams::default(),
        max_tokens: 6,
        stop: vec![],
    };
    let mut ids = vec![s.submit_generate(req(prompt(70, 1)))];
    ids.extend(s.submit_generate_n(req(prompt(60, 2)), 3));
    let search = s.submit_search(probe_search(prompt(65, 3), 3, 5, 4));
    ids.push(search);
    for &id in &ids {
        s.set_sparse_budget(id, budget);
    }
    let mut lps: Vec<Vec<f64>> = vec![Vec::new(); ids.len()];
    while s.active() > 0 {
        s.tick();
        for (id, p) in s.take_progress() {
            if let (Some(i), Progress::Token(t)) = (ids.iter().position(|&x| x == id), p) {
                lps[i].push(t.logprob as f64);
            }
        }
    }
    for (id, outcome) in s.take_finished() {
        match outcome {
            Outcome::Search(r) => {
                let r = r.expect("search");
                let i = ids.iter().position(|&x| x == id).expect("ours");
                lps[i].extend(r.candidates.iter().map(|c| c.logprob));
            }
            Outcome::Generate(r) => assert_eq!(r.expect("generate").tokens.len(), 6),
        }
    }
    // Set after the end: nothing to do, and no error.
    s.set_sparse_budget(ids[0], budget);
    assert_clean(&s);
    lps
}

#[test]
fn request_budgets_reach_the_engine() {
    let dense = run(None);
    assert!(dense.iter().all(|v| !v.is_empty()), "{dense:?}");
    assert_eq!(run(Some(1 << 20)), dense, "a budget above every page count");
    let sparse = run(Some(1));
    for (i, (a, b)) in sparse.iter().zip(&dense).enumerate() {
        assert!(a.iter().all(|x| x.is_finite()));
        assert_ne!(a, b, "entry {i}: a budget of one page changed nothing");
    }
}
