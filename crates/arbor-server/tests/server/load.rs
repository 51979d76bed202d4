//! Bounded loopback load: hundreds of concurrent streams and a few searches on a KV cache too
//! small for all of them at once. Requests told to retry (503, 429) do so, as Retry-After
//! says, until served; every one must end up complete and every page free.

use super::common::*;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Posts until the server accepts (retrying 503/429, which must carry Retry-After); returns
/// the final response and how often it was told to retry.
async fn until_served(addr: SocketAddr, path: &str, body: &Value) -> (Resp, usize) {
    let t0 = Instant::now();
    let mut retries = 0;
    loop {
        let r = post(addr, path, body).await;
        if r.status != 503 && r.status != 429 {
            return (r, retries);
        }
        assert!(
            r.header("retry-after").is_some(),
            "{} without Retry-After",
            r.status
        );
        assert!(t0.elapsed() < Duration::from_secs(30), "never served");
        retries += 1;
        // Shorter than Retry-After says, to keep the test quick.
        tokio::time::sleep(Duration::from_millis(10 + (retries as u64 % 7) * 5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_streams_complete_and_free_every_page() {
    // 320 pages of 8 tokens: the requests below need more than that at once, so some are
    // answered 503 (deliberately) and retry.
    let server = start(320 * 4096, |_| {}).await;
    let addr = server.addr;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..200usize {
        tasks.push(tokio::spawn(async move {
            let (path, body) = if i % 2 == 0 {
                let msgs = json!([{"role": "user", "content": format!("Tell me {i}")}]);
                let body = json!({"messages": msgs, "max_tokens": 24, "stream": true,
                                  "n": 1 + i % 3, "seed": i});
                ("/v1/chat/completions", body)
            } else {
                let body = json!({"prompt": format!("Story {i}:"), "max_tokens": 24,
                                  "stream": true, "seed": i});
                ("/v1/completions", body)
            };
            let (r, retries) = until_served(addr, path, &body).await;
            (r.status, retries, r.events())
        }));
    }
    for i in 0..4usize {
        tasks.push(tokio::spawn(async move {
            let strategy = ["best-of-n", "vote", "beam", "sampling"][i];
            let stream = i % 2 == 0;
            let body = json!({"prompt": format!("Question {i}"), "strategy": strategy, "width": 3,
                "verifier": "regex:e", "params": {"max_tokens": 12}, "stream": stream});
            let (r, retries) = until_served(addr, "/v1/search", &body).await;
            let events = if stream {
                r.events()
            } else {
                vec![
                    String::from_utf8_lossy(&r.body).into_owned(),
                    "[DONE]".into(),
                ]
            };
            (r.status, retries, events)
        }));
    }
    let mut retries = 0;
    for t in tasks {
        let (status, n, events) = t.await.expect("task");
        retries += n;
        assert_eq!(status, 200, "{events:?}");
        assert_eq!(
            events.last().map(String::as_str),
            Some("[DONE]"),
            "incomplete stream: {events:?}"
        );
        assert!(
            !events.iter().any(|e| e.contains("\"error\"")),
            "stream failed: {events:?}"
        );
    }
    eprintln!(
        "load: 204 requests complete after {retries} retries (503/429), in {:?}",
        t0.elapsed()
    );
    wait_idle(addr, Duration::from_secs(5)).await;
    server.stop().await.expect("clean stop");
}
