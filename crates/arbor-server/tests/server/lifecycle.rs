//! A request's life beyond the happy path: the client disconnects midway, the queue is full,
//! the request times out, the server shuts down with work in flight, the API key is wrong.

use super::common::*;
use serde_json::json;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Opens a streaming request and reads until its first chunk arrived; returns the connection.
async fn open_stream(addr: std::net::SocketAddr, body: &serde_json::Value) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let req = raw_request(
        "POST",
        "/v1/completions",
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    );
    s.write_all(&req).await.expect("send");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let t0 = Instant::now();
    while !String::from_utf8_lossy(&got).contains("data: {") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("first chunk within 10 s")
            .expect("read");
        assert!(
            n > 0,
            "stream closed before its first chunk: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
        assert!(t0.elapsed() < Duration::from_secs(10));
    }
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    s
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// Long enough (16 choices to the end of the context) that it cannot finish between the first
/// chunk and the server noticing the disconnect.
fn long_stream() -> serde_json::Value {
    json!({"prompt": "Once", "max_tokens": 120, "n": 16, "temperature": 1.0, "seed": 1, "stream": true})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnected_stream_is_cancelled_and_its_pages_freed() {
    let server = start(4 << 20, |_| {}).await;
    let addr = server.addr;
    let s = open_stream(addr, &long_stream()).await;
    let (pages, _) = kv_in_use(addr).await;
    assert!(pages > 0, "the stream holds KV pages while it runs");
    drop(s);
    wait_idle(addr, Duration::from_secs(5)).await;
    let m =
        String::from_utf8_lossy(&request(addr, "GET", "/metrics", None).await.body).into_owned();
    assert_eq!(
        metric(&m, "arbor_requests_cancelled_total "),
        1.0,
        "the request was cancelled, not finished:\n{m}"
    );
    assert!(metric(&m, "arbor_generation_tokens_total ") < 16.0 * 120.0);

    // A client that leaves a non-streamed request is noticed too.
    let mut body = long_stream();
    body["stream"] = json!(false);
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let req = raw_request(
        "POST",
        "/v1/completions",
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    );
    s.write_all(&req).await.expect("send");
    tokio::time::sleep(Duration::from_millis(20)).await;
    drop(s);
    wait_idle(addr, Duration::from_secs(5)).await;
    let m =
        String::from_utf8_lossy(&request(addr, "GET", "/metrics", None).await.body).into_owned();
    assert_eq!(
        metric(&m, "arbor_requests_cancelled_total "),
        2.0,
        "the non-streamed request was cancelled, not finished:\n{m}"
    );
    server.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_and_a_timeout_504() {
    let server = start(4 << 20, |c| c.max_queue = 1).await;
    let addr = server.addr;
    // The open stream holds the only place (the client does not read on).
    let s = open_stream(addr, &long_stream()).await;
    let r = post(
        addr,
        "/v1/completions",
        &json!({"prompt": "a", "max_tokens": 2}),
    )
    .await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["type"], "rate_limit_error");
    assert!(r.header("retry-after").is_some());
    drop(s);
    wait_idle(addr, Duration::from_secs(5)).await;
    // The place is free again.
    let r = post(
        addr,
        "/v1/completions",
        &json!({"prompt": "a", "max_tokens": 2}),
    )
    .await;
    assert_eq!(r.status, 200);
    server.stop().await.expect("clean stop");

    // With a zero timeout the deadline has passed before the worker can answer.
    let server = start(4 << 20, |c| c.request_timeout = Duration::ZERO).await;
    let r = post(
        server.addr,
        "/v1/completions",
        &json!({"prompt": "a", "max_tokens": 120, "n": 32}),
    )
    .await;
    assert_eq!(r.status, 504, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"]["code"], "request_timeout");
    server.stop().await.expect("clean stop");

    // A stream accepted in time that runs past its deadline ends with an error event and
    // [DONE]. Its timeout is a quarter of what the whole stream takes on this machine (the
    // faster of two runs), so the test holds on fast and slow machines alike.
    let body = json!({"prompt": "a", "max_tokens": 120, "n": 32, "stream": true});
    let server = start(4 << 20, |_| {}).await;
    let mut full = Duration::MAX;
    for _ in 0..2 {
        let t0 = Instant::now();
        let r = post(server.addr, "/v1/completions", &body).await;
        full = full.min(t0.elapsed());
        assert_eq!(r.events().last().map(String::as_str), Some("[DONE]"));
        assert!(!r.events().iter().any(|e| e.contains("error")));
    }
    server.stop().await.expect("clean stop");
    let server = start(4 << 20, |c| c.request_timeout = full / 4).await;
    let addr = server.addr;
    let r = post(addr, "/v1/completions", &body).await;
    assert_eq!(r.status, 200, "accepted before the deadline ({full:?} / 4)");
    let ev = r.events();
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"));
    assert!(ev.iter().any(|e| e.contains("request_timeout")), "{ev:?}");
    wait_idle(addr, Duration::from_secs(5)).await;
    server.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_in_flight_streams_finish() {
    let server = start(4 << 20, |_| {}).await;
    let addr = server.addr;
    let body = json!({"prompt": "Once", "max_tokens": 60, "n": 4, "stream": true});
    let mut s = open_stream(addr, &body).await;
    let reader = tokio::spawn(async move {
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
        String::from_utf8_lossy(&rest).into_owned()
    });
    let t0 = Instant::now();
    server.stop().await.expect("graceful stop");
    let rest = reader.await.expect("reader");
    assert!(
        rest.contains("data: [DONE]"),
        "the in-flight stream was cut: {rest}"
    );
    assert!(t0.elapsed() < Duration::from_secs(10));
    // Nothing listens any more.
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_is_required_when_set() {
    let server = start(4 << 20, |c| c.api_key = Some("sekret".into())).await;
    let addr = server.addr;
    let body = json!({"prompt": "hi", "max_tokens": 2}).to_string();
    for auth in [None, Some("Bearer wrong"), Some("sekret")] {
        let mut h = vec![("Content-Type", "application/json")];
        if let Some(a) = auth {
            h.push(("Authorization", a));
        }
        let r = send_raw(
            addr,
            &raw_request("POST", "/v1/completions", &h, body.as_bytes()),
        )
        .await;
        assert_eq!(r.status, 401, "{auth:?}");
        assert_eq!(r.json()["error"]["type"], "authentication_error");
    }
    let h = [
        ("Content-Type", "application/json"),
        ("Authorization", "Bearer sekret"),
    ];
    let r = send_raw(
        addr,
        &raw_request("POST", "/v1/completions", &h, body.as_bytes()),
    )
    .await;
    assert_eq!(r.status, 200);
    // Health and metrics stay open for probes.
    assert_eq!(request(addr, "GET", "/health", None).await.status, 200);
    server.stop().await.expect("clean stop");
}
