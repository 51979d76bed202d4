//! The `sparse_budget` extension of completions, chat and search: a budget above every page
//! count gives the same tokens as none, a budget of one page reaches the engine (the
//! log-probabilities move), and 0, a negative number or a string is a 400 naming the field.

use super::common::*;
use arbor_runtime::{Engine, EngineOptions};
use arbor_search::{Scheduler, SchedulerOptions};
use arbor_server::{ServerConfig, ServerHandle};
use serde_json::{json, Value};

/// A server on the fixture whose two layers are both sparse (by default the first two layers
/// of every model stay dense, which would leave this fixture dense whatever the budget).
async fn start_sparse() -> ServerHandle {
    let mut loaded = arbor_runtime::load(&fixture()).expect("fixture model");
    loaded.model.attention.sparse.dense_layers = 0;
    let ctx = loaded.model.cfg.max_context;
    let engine = Engine::new(
        loaded.model,
        &EngineOptions {
            kv_cache_bytes: 4 << 20,
            page_size: 8,
        },
    )
    .expect("engine");
    let sched = Scheduler::new(engine, loaded.tokenizer, SchedulerOptions::default());
    ServerHandle::start(sched, ServerConfig::new(MODEL, ctx), "127.0.0.1:0")
        .await
        .expect("server starts")
}

/// `body` with `sparse_budget` set (or not).
fn with_budget(body: &Value, budget: Option<Value>) -> Value {
    let mut b = body.clone();
    if let (Some(o), Some(v)) = (b.as_object_mut(), budget) {
        o.insert("sparse_budget".into(), v);
    }
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparse_budgets_in_completions_chat_and_search() {
    let server = start_sparse().await;
    let addr = server.addr;
    // 80 prompt tokens: 10 pages of 8, more than sink + local + a budget of 1.
    let prompt: Vec<u32> = (0..80u32).map(|i| (i * 37 + 11) % 380).collect();
    let completion = json!({
        "prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 1, "n": 2,
    });
    let long = "the branches of the old tree ".repeat(3);
    let chat = json!({
        "messages": [{"role": "user", "content": long}], "max_tokens": 6, "temperature": 0,
        "logprobs": true,
    });
    let search = json!({
        "prompt": long, "strategy": "sampling", "width": 3, "params": {"max_tokens": 6},
        "seed": 3,
    });
    let ok = |r: Resp| {
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.json()
    };
    // Texts must agree exactly; log-probabilities to rounding (a later request reuses cached
    // prompt pages, computed in a batch of another size, so they may differ in the last bits).
    let summary = |v: &Value| -> (Vec<String>, Vec<f64>) {
        let (mut texts, mut lps) = (vec![], vec![]);
        let num = |x: &Value| x.as_f64().unwrap_or(f64::NAN);
        for c in v["choices"].as_array().into_iter().flatten() {
            let text = c["text"].as_str().or(c["message"]["content"].as_str());
            texts.push(text.unwrap_or_default().to_string());
            lps.extend(
                c["logprobs"]["token_logprobs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(num),
            );
            let content = c["logprobs"]["content"].as_array().into_iter().flatten();
            lps.extend(content.map(|t| num(&t["logprob"])));
        }
        for c in v["candidates"].as_array().into_iter().flatten() {
            texts.push(c["text"].as_str().unwrap_or_default().to_string());
            lps.push(num(&c["logprob"]));
        }
        (texts, lps)
    };
    let moved = |a: &(Vec<String>, Vec<f64>), b: &(Vec<String>, Vec<f64>)| {
        a.1.iter()
            .zip(&b.1)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f64, f64::max)
    };
    let huge = Some(json!(1_000_000_000_000u64));
    for (path, body) in [
        ("/v1/completions", &completion),
        ("/v1/chat/completions", &chat),
        ("/v1/search", &search),
    ] {
        let dense = summary(&ok(post(addr, path, body).await));
        assert!(
            !dense.0.is_empty() && !dense.1.is_empty(),
            "{path}: {dense:?}"
        );
        let big = summary(&ok(post(addr, path, &with_budget(body, huge.clone())).await));
        assert_eq!(big.0, dense.0, "{path}: a huge budget is dense attention");
        assert_eq!(big.1.len(), dense.1.len());
        assert!(moved(&big, &dense) < 1e-4, "{path}: {big:?}\n{dense:?}");
        let one = summary(&ok(
            post(addr, path, &with_budget(body, Some(json!(1)))).await
        ));
        assert!(
            one.0 != dense.0 || moved(&one, &dense) > 1e-3,
            "{path}: a budget of one page changed nothing"
        );
    }

    // Invalid budgets: a 400 naming the field, on every endpoint.
    for (path, body) in [
        ("/v1/completions", &completion),
        ("/v1/chat/completions", &chat),
        ("/v1/search", &search),
    ] {
        for bad in [json!(0), json!(-1), json!("many"), json!(2.5)] {
            let r = post(addr, path, &with_budget(body, Some(bad.clone()))).await;
            assert_eq!(r.status, 400, "{path} {bad}");
            let e = r.json();
            assert_eq!(e["error"]["param"], "sparse_budget", "{path} {bad}: {e}");
            let msg = e["error"]["message"].as_str().unwrap_or("");
            assert!(msg.contains("sparse_budget"), "{path} {bad}: {msg}");
        }
    }
    wait_idle(addr, std::time::Duration::from_secs(20)).await;
    server.stop().await.expect("clean stop");
}
