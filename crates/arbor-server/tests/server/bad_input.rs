//! Malformed and out-of-range requests: each gets its 4xx with an OpenAI-style error naming
//! the field, and the server still serves a good request afterwards.

use super::common::*;
use serde_json::json;

struct Case {
    name: &'static str,
    method: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, &'static str)>,
    body: Vec<u8>,
    status: u16,
    kind: &'static str,
    param: Option<&'static str>,
}

fn case(
    name: &'static str,
    path: &'static str,
    body: serde_json::Value,
    status: u16,
    param: Option<&'static str>,
) -> Case {
    Case {
        name,
        method: "POST",
        path,
        headers: vec![("Content-Type", "application/json")],
        body: body.to_string().into_bytes(),
        status,
        kind: if status == 404 {
            "not_found_error"
        } else {
            "invalid_request_error"
        },
        param,
    }
}

const C: &str = "/v1/completions";
const CHAT: &str = "/v1/chat/completions";
const S: &str = "/v1/search";

fn cases() -> Vec<Case> {
    let hi = json!([{"role": "user", "content": "hi"}]);
    let mut v = vec![
        case(
            "wrong type max_tokens",
            C,
            json!({"prompt": "a", "max_tokens": "ten"}),
            400,
            Some("max_tokens"),
        ),
        case(
            "negative max_tokens",
            C,
            json!({"prompt": "a", "max_tokens": -5}),
            400,
            Some("max_tokens"),
        ),
        case(
            "huge max_tokens",
            C,
            json!({"prompt": "a", "max_tokens": 1e30}),
            400,
            Some("max_tokens"),
        ),
        case(
            "max_tokens past the context",
            C,
            json!({"prompt": "a", "max_tokens": 100000}),
            400,
            Some("max_tokens"),
        ),
        case(
            "zero max_tokens",
            C,
            json!({"prompt": "a", "max_tokens": 0}),
            400,
            Some("max_tokens"),
        ),
        case("n zero", C, json!({"prompt": "a", "n": 0}), 400, Some("n")),
        case(
            "n huge",
            C,
            json!({"prompt": "a", "n": 100000}),
            400,
            Some("n"),
        ),
        case(
            "n negative",
            CHAT,
            json!({"messages": hi, "n": -1}),
            400,
            Some("n"),
        ),
        case(
            "temperature negative",
            C,
            json!({"prompt": "a", "temperature": -1}),
            400,
            Some("temperature"),
        ),
        case(
            "temperature huge",
            CHAT,
            json!({"messages": hi, "temperature": 1e300}),
            400,
            Some("temperature"),
        ),
        case(
            "top_p above 1",
            CHAT,
            json!({"messages": hi, "top_p": 1.5}),
            400,
            Some("top_p"),
        ),
        case(
            "top_p zero",
            C,
            json!({"prompt": "a", "top_p": 0}),
            400,
            Some("top_p"),
        ),
        case(
            "top_logprobs huge",
            CHAT,
            json!({"messages": hi, "logprobs": true, "top_logprobs": 1000}),
            400,
            Some("top_logprobs"),
        ),
        case(
            "top_logprobs without logprobs",
            CHAT,
            json!({"messages": hi, "top_logprobs": 2}),
            400,
            Some("top_logprobs"),
        ),
        case(
            "completion logprobs huge",
            C,
            json!({"prompt": "a", "logprobs": 99}),
            400,
            Some("logprobs"),
        ),
        case(
            "empty messages",
            CHAT,
            json!({"messages": []}),
            400,
            Some("messages"),
        ),
        case(
            "missing messages",
            CHAT,
            json!({"model": MODEL}),
            400,
            Some("messages"),
        ),
        case(
            "bad role",
            CHAT,
            json!({"messages": [{"role": "wizard", "content": "x"}]}),
            400,
            Some("messages[0].role"),
        ),
        case(
            "content wrong type",
            CHAT,
            json!({"messages": [{"role": "user", "content": 5}]}),
            400,
            Some("messages[0].content"),
        ),
        case(
            "missing prompt",
            C,
            json!({"max_tokens": 3}),
            400,
            Some("prompt"),
        ),
        case(
            "prompt wrong type",
            C,
            json!({"prompt": {"a": 1}}),
            400,
            Some("prompt"),
        ),
        case(
            "token outside vocabulary",
            C,
            json!({"prompt": [1, 2, 99999]}),
            400,
            Some("prompt"),
        ),
        case(
            "empty stop string",
            C,
            json!({"prompt": "a", "stop": [""]}),
            400,
            Some("stop"),
        ),
        case(
            "unknown model",
            C,
            json!({"prompt": "a", "model": "gpt-17"}),
            404,
            Some("model"),
        ),
        case(
            "unknown model in chat",
            CHAT,
            json!({"messages": hi, "model": "gpt-17"}),
            404,
            Some("model"),
        ),
        case(
            "search unknown strategy",
            S,
            json!({"prompt": "a", "strategy": "telepathy"}),
            400,
            Some("strategy"),
        ),
        case(
            "search zero width",
            S,
            json!({"prompt": "a", "strategy": "best-of-n", "width": 0}),
            400,
            Some("width"),
        ),
        case(
            "search bad param",
            S,
            json!({"prompt": "a", "strategy": "best-of-n", "params": {"nope": 1}}),
            400,
            Some("params"),
        ),
        case(
            "search nested param",
            S,
            json!({"prompt": "a", "strategy": "best-of-n", "params": {"max_tokens": [1]}}),
            400,
            Some("params.max_tokens"),
        ),
        case(
            "search command verifier off",
            S,
            json!({"prompt": "a", "strategy": "best-of-n", "verifier": "command:true"}),
            400,
            Some("verifier"),
        ),
        case(
            "search code verifier off",
            S,
            json!({"prompt": "a", "strategy": "best-of-n", "verifier": "code"}),
            400,
            Some("verifier"),
        ),
        case(
            "search unknown verifier",
            S,
            json!({"prompt": "a", "strategy": "best-of-n", "verifier": "oracle"}),
            400,
            Some("verifier"),
        ),
        case(
            "search without prompt",
            S,
            json!({"strategy": "best-of-n"}),
            400,
            Some("prompt"),
        ),
    ];
    let raw = |name, body: &[u8], headers: Vec<(&'static str, &'static str)>, status, param| Case {
        name,
        method: "POST",
        path: C,
        headers,
        body: body.to_vec(),
        status,
        kind: "invalid_request_error",
        param,
    };
    let ct = || vec![("Content-Type", "application/json")];
    v.push(raw(
        "malformed JSON",
        b"{\"prompt\": \"a\",",
        ct(),
        400,
        None,
    ));
    v.push(raw(
        "trailing garbage",
        b"{\"prompt\": \"a\"} xyz",
        ct(),
        400,
        None,
    ));
    v.push(raw(
        "invalid UTF-8",
        b"{\"prompt\": \"a\xff\xfe\"}",
        ct(),
        400,
        None,
    ));
    v.push(raw("not an object", b"[1, 2]", ct(), 400, None));
    v.push(raw(
        "missing content type",
        b"{\"prompt\": \"a\"}",
        vec![],
        400,
        None,
    ));
    v.push(raw(
        "text content type",
        b"{\"prompt\": \"a\"}",
        vec![("Content-Type", "text/plain")],
        400,
        None,
    ));
    let mut big = b"{\"prompt\": \"".to_vec();
    big.extend(std::iter::repeat_n(b'a', 70_000));
    big.extend_from_slice(b"\"}");
    v.push(raw("oversized body", &big, ct(), 413, None));
    v.push(Case {
        name: "wrong method",
        method: "GET",
        path: C,
        headers: vec![],
        body: vec![],
        status: 405,
        kind: "invalid_request_error",
        param: None,
    });
    v.push(Case {
        name: "unknown route",
        method: "GET",
        path: "/v2/nothing",
        headers: vec![],
        body: vec![],
        status: 404,
        kind: "not_found_error",
        param: None,
    });
    v.push(Case {
        name: "unknown model id",
        method: "GET",
        path: "/v1/models/gpt-17",
        headers: vec![],
        body: vec![],
        status: 404,
        kind: "not_found_error",
        param: Some("model"),
    });
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors_and_the_server_keeps_serving() {
    let server = start(4 << 20, |c| c.max_body_bytes = 64 * 1024).await;
    let addr = server.addr;
    let mut failures = Vec::new();
    for c in cases() {
        let r = send_raw(addr, &raw_request(c.method, c.path, &c.headers, &c.body)).await;
        let body: serde_json::Value = match serde_json::from_slice(&r.body) {
            Ok(b) => b,
            Err(_) => {
                failures.push(format!(
                    "{}: body is not JSON: {}",
                    c.name,
                    String::from_utf8_lossy(&r.body)
                ));
                continue;
            }
        };
        let e = &body["error"];
        let param = e["param"].as_str();
        if r.status != c.status
            || e["type"] != c.kind
            || param != c.param
            || !e["message"].is_string()
        {
            failures.push(format!(
                "{}: want {} {} param {:?}, got {} {}",
                c.name, c.status, c.kind, c.param, r.status, body
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // The server still serves.
    let r = post(
        addr,
        C,
        &json!({"prompt": "hello", "max_tokens": 4, "temperature": 0}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["choices"][0]["finish_reason"], "length");
    wait_idle(addr, std::time::Duration::from_secs(5)).await;
    server.stop().await.expect("clean stop");
}
