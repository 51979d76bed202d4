//! Starting a server on the tiny fixture model, and a raw HTTP/1.1 client: tests need to send
//! malformed bytes and drop connections midway, which ordinary clients do not allow.

use arbor_runtime::{Engine, EngineOptions};
use arbor_search::{Scheduler, SchedulerOptions};
use arbor_server::{ServerConfig, ServerHandle};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const MODEL: &str = "qwen2-fixture";

pub fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/qwen2")
}

/// A server on the fixture model with a KV cache of `kv_bytes`, `tune` applied to its config.
pub async fn start(kv_bytes: usize, tune: impl FnOnce(&mut ServerConfig)) -> ServerHandle {
    start_with(kv_bytes, |_, cfg| tune(cfg)).await
}

/// [`start`], with `prepare` given the scheduler too (to load verifier models).
pub async fn start_with(
    kv_bytes: usize,
    prepare: impl FnOnce(&mut Scheduler, &mut ServerConfig),
) -> ServerHandle {
    let loaded = arbor_runtime::load(&fixture()).expect("fixture model");
    let ctx = loaded.model.cfg.max_context;
    let engine = Engine::new(
        loaded.model,
        &EngineOptions {
            kv_cache_bytes: kv_bytes,
            page_size: 8,
        },
    )
    .expect("engine");
    let mut sched = Scheduler::new(engine, loaded.tokenizer, SchedulerOptions::default());
    let mut cfg = ServerConfig::new(MODEL, ctx);
    prepare(&mut sched, &mut cfg);
    ServerHandle::start(sched, cfg, "127.0.0.1:0")
        .await
        .expect("server starts")
}

/// A whole response.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {} body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    /// The `data:` payloads of an SSE body, in order.
    pub fn events(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.body)
            .lines()
            .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
            .collect()
    }
}

/// The request bytes: `extra` headers are written as given.
pub fn raw_request(method: &str, path: &str, extra: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for (k, v) in extra {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut bytes = r.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Sends `bytes` and reads the whole response.
pub async fn send_raw(addr: SocketAddr, bytes: &[u8]) -> Resp {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    // The server may answer (413) and close before reading a large body: ignore write errors.
    let _ = s.write_all(bytes).await;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    parse(&buf)
}

pub async fn request(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> Resp {
    let b = body.map(|v| v.to_string()).unwrap_or_default();
    let headers: &[(&str, &str)] = if body.is_some() {
        &[("Content-Type", "application/json")]
    } else {
        &[]
    };
    send_raw(addr, &raw_request(method, path, headers, b.as_bytes())).await
}

pub async fn post(addr: SocketAddr, path: &str, body: &Value) -> Resp {
    request(addr, "POST", path, Some(body)).await
}

fn parse(buf: &[u8]) -> Resp {
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(buf)));
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = buf[split + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        body = dechunk(&body);
    }
    Resp {
        status,
        headers,
        body,
    }
}

/// Decodes a chunked body (as far as it goes).
fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = std::str::from_utf8(&b[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok());
        let Some(size) = size.filter(|&s| s > 0) else {
            return out;
        };
        let start = eol + 2;
        let end = (start + size).min(b.len());
        out.extend_from_slice(&b[start..end]);
        if end + 2 > b.len() {
            return out;
        }
        b = &b[end + 2..];
    }
}

/// Reads the server's KV pages in use (and the scheduler's active count) from /metrics.
pub async fn kv_in_use(addr: SocketAddr) -> (u64, u64) {
    let r = request(addr, "GET", "/metrics", None).await;
    assert_eq!(r.status, 200);
    let text = String::from_utf8_lossy(&r.body).into_owned();
    let get = |name: &str| {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .map(|v| v.trim().parse::<f64>().unwrap_or(-1.0))
            })
            .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{text}")) as u64
    };
    (
        get("arbor_kv_pages{state=\"in_use\"} "),
        get("arbor_scheduler_active "),
    )
}

/// Waits until no KV page is in use and nothing is active; panics after `limit`.
pub async fn wait_idle(addr: SocketAddr, limit: Duration) {
    let t0 = Instant::now();
    loop {
        let (pages, active) = kv_in_use(addr).await;
        if pages == 0 && active == 0 {
            return;
        }
        assert!(
            t0.elapsed() < limit,
            "after {limit:?}: {pages} KV pages still in use, {active} requests active"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
