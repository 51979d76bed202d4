//! Good requests: the OpenAI response shapes, n > 1, logprobs, stop strings, streaming with
//! usage, the search endpoint, models, health and metrics.

use super::common::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_chat_and_search_answer_in_their_shapes() {
    let server = start(4 << 20, |_| {}).await;
    let addr = server.addr;

    let models = request(addr, "GET", "/v1/models", None).await.json();
    assert_eq!(models["data"][0]["id"], MODEL);

    // Completions: n = 3 with logprobs; greedy choices of one prompt agree.
    let r = post(
        addr,
        "/v1/completions",
        &json!({
            "model": MODEL, "prompt": "The tree", "max_tokens": 6, "n": 3, "temperature": 0,
            "logprobs": 2,
        }),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    let choices = v["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 3);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(
            c["text"], choices[0]["text"],
            "greedy choices share one answer"
        );
        let lp = &c["logprobs"];
        assert_eq!(lp["tokens"].as_array().map(Vec::len), Some(6));
        assert_eq!(lp["top_logprobs"][0].as_object().map(|o| o.len()), Some(2));
        assert!(lp["token_logprobs"][0].as_f64().is_some_and(|x| x <= 0.0));
    }
    assert_eq!(v["usage"]["completion_tokens"], 18);
    let prompt_tokens = v["usage"]["prompt_tokens"].as_u64().expect("usage");

    // A stop string is cut, never shown: stop at the greedy text's second character.
    let greedy = choices[0]["text"].as_str().expect("text").to_string();
    let stop: String = greedy.chars().skip(1).take(2).collect();
    if !stop.trim().is_empty() {
        let v = post(
            addr,
            "/v1/completions",
            &json!({
                "prompt": "The tree", "max_tokens": 6, "temperature": 0, "stop": [stop.clone()],
            }),
        )
        .await
        .json();
        let text = v["choices"][0]["text"].as_str().expect("text");
        assert!(!text.contains(&stop), "stop {stop:?} leaked into {text:?}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert!(greedy.starts_with(text));
        // The same through a stream.
        let r = post(addr, "/v1/completions", &json!({
            "prompt": "The tree", "max_tokens": 6, "temperature": 0, "stop": stop, "stream": true,
        })).await;
        let streamed: String = r
            .events()
            .iter()
            .filter(|e| *e != "[DONE]")
            .map(|e| {
                serde_json::from_str::<Value>(e).expect("chunk")["choices"][0]["text"]
                    .as_str()
                    .unwrap_or("")
                    .to_string()
            })
            .collect();
        assert_eq!(streamed, text);
    }

    // Chat, streamed, n = 2, with usage and logprobs.
    let r = post(addr, "/v1/chat/completions", &json!({
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "max_completion_tokens": 5, "n": 2, "seed": 7, "stream": true,
        "stream_options": {"include_usage": true}, "logprobs": true, "top_logprobs": 1,
    })).await;
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/event-stream")));
    let events = r.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("chunk"))
        .collect();
    let mut text = [String::new(), String::new()];
    let mut finish = [None, None];
    for c in &chunks[..chunks.len() - 1] {
        assert_eq!(c["object"], "chat.completion.chunk");
        let ch = &c["choices"][0];
        let i = ch["index"].as_u64().expect("index") as usize;
        text[i] += ch["delta"]["content"].as_str().unwrap_or("");
        if let Some(f) = ch["finish_reason"].as_str() {
            finish[i] = Some(f.to_string());
        }
    }
    assert_eq!(
        finish,
        [Some("length".to_string()), Some("length".to_string())]
    );
    let usage = &chunks.last().expect("usage chunk")["usage"];
    assert_eq!(usage["completion_tokens"], 10);
    // The same request unstreamed gives the same texts (seeded).
    let v = post(addr, "/v1/chat/completions", &json!({
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "max_tokens": 5, "n": 2, "seed": 7,
    })).await.json();
    for i in 0..2 {
        assert_eq!(v["choices"][i]["message"]["content"], text[i].as_str());
        assert_eq!(v["choices"][i]["message"]["role"], "assistant");
    }

    // Search: answer, candidates, accounting and the tree.
    let v = post(
        addr,
        "/v1/search",
        &json!({
            "prompt": "Pick a word", "strategy": "best-of-n", "width": 3, "verifier": "regex:a",
            "params": {"max_tokens": 8}, "include_tree": true,
        }),
    )
    .await;
    assert_eq!(v.status, 200, "{}", String::from_utf8_lossy(&v.body));
    let v = v.json();
    assert_eq!(v["strategy"], "best-of-n");
    assert_eq!(v["candidates"].as_array().map(Vec::len), Some(3));
    assert!(v["accounting"]["policy_tokens"]
        .as_u64()
        .is_some_and(|t| t > 0));
    assert!(v["tree"]["nodes"].as_array().is_some_and(|n| n.len() >= 4));
    // Streamed: one event per expansion and score, then the result, then [DONE].
    let r = post(
        addr,
        "/v1/search",
        &json!({
            "prompt": "Pick a word", "strategy": "best-of-n", "width": 3, "verifier": "regex:a",
            "params": {"max_tokens": 8}, "stream": true,
        }),
    )
    .await;
    let events = r.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let parsed: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("event"))
        .collect();
    let kinds: Vec<&str> = parsed
        .iter()
        .map(|e| {
            e["type"]
                .as_str()
                .unwrap_or(e["object"].as_str().unwrap_or(""))
        })
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "expanded").count(),
        3,
        "{kinds:?}"
    );
    assert_eq!(
        kinds.iter().filter(|k| **k == "scored").count(),
        3,
        "{kinds:?}"
    );
    assert_eq!(parsed.last().expect("result")["object"], "search.result");

    // Metrics count what happened.
    let m =
        String::from_utf8_lossy(&request(addr, "GET", "/metrics", None).await.body).into_owned();
    for name in [
        "arbor_requests_total{endpoint=\"/v1/completions\",status=\"200\"}",
        "arbor_prompt_tokens_total",
        "arbor_generation_tokens_total",
        "arbor_step_seconds_bucket",
        "arbor_kv_bytes_per_unique_token",
        "arbor_queue_depth",
    ] {
        assert!(m.contains(name), "{name} missing:\n{m}");
    }
    assert!(prompt_tokens > 0);
    let health = request(addr, "GET", "/health", None).await;
    assert_eq!(health.json()["status"], "ok");
    wait_idle(addr, std::time::Duration::from_secs(5)).await;
    server.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_with_a_loaded_reward_model() {
    let orm = format!("orm:{}", fixture().join("../reward-orm").display());
    let spec = orm.clone();
    let server = start_with(4 << 20, move |sched, cfg| {
        let m = arbor_search::spec::load_model(&spec, 1 << 20, 8, arbor_kernels::Device::Cpu)
            .expect("reward fixture");
        cfg.verifier_models
            .push((spec, sched.add_verifier_model(m)));
    })
    .await;
    let addr = server.addr;
    let body = json!({
        "prompt": "Pick a word", "strategy": "best-of-n", "width": 3, "verifier": orm,
        "params": {"max_tokens": 6},
    });
    let r = post(addr, "/v1/search", &body).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["verifiers"][0], orm.as_str());
    for c in v["candidates"].as_array().expect("candidates") {
        let s = c["score"].as_f64().expect("scored");
        assert!(s > 0.0 && s < 1.0, "{s}");
    }
    assert!(v["accounting"]["verifier_tokens"]
        .as_u64()
        .is_some_and(|t| t > 0));
    // A model spec that was not loaded is a 400 naming it.
    let body = json!({"prompt": "x", "strategy": "best-of-n", "verifier": "prm:/elsewhere"});
    let r = post(addr, "/v1/search", &body).await;
    assert_eq!(r.status, 400);
    assert!(String::from_utf8_lossy(&r.body).contains("prm:/elsewhere"));
    wait_idle(addr, std::time::Duration::from_secs(5)).await;
    server.stop().await.expect("clean stop");
}
