//! The official `openai` Python client against the server (scripts/openai_client_check.py);
//! skipped with a note when python3 or the package is missing.

use super::common::*;
use std::path::PathBuf;
use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_python_client_works() {
    let has_openai = Command::new("python3")
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_openai {
        eprintln!("SKIPPED: the openai client check needs python3 with the openai package; install with pip install openai");
        return;
    }
    let server = start(4 << 20, |c| c.api_key = Some("test-key".into())).await;
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/openai_client_check.py");
    let base = format!("http://{}/v1", server.addr);
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .args([
                "--base-url",
                &base,
                "--api-key",
                "test-key",
                "--model",
                MODEL,
            ])
            .output()
    })
    .await
    .expect("join")
    .expect("python3 runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "openai_client_check.py failed:\n{text}"
    );
    eprintln!("{text}");
    wait_idle(server.addr, std::time::Duration::from_secs(5)).await;
    server.stop().await.expect("clean stop");
}
