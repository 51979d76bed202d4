//! Running a child process with input on stdin, a wall-clock limit and its stdout captured:
//! what the command and code verifiers share.

use std::io::{Read, Write};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How a child process ended.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
}

/// Starts `cmd`, writes `input` to its stdin, and waits at most `timeout`; a child still
/// running then is killed and reported as an error. Stderr is discarded.
pub fn run_with_timeout(
    mut cmd: Command,
    input: &[u8],
    timeout: Duration,
) -> Result<Finished, String> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start: {e}"))?;
    // The writer runs on its own thread so that a child which prints before reading (or never
    // reads) cannot deadlock against us on full pipes.
    let writer = child.stdin.take().map(|mut stdin| {
        let input = input.to_vec();
        std::thread::spawn(move || {
            // A child that does not read its input is fine.
            let _ = stdin.write_all(&input);
        })
    });
    let reader = child.stdout.take().map(|mut stdout| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = stdout.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        })
    });
    let t0 = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if t0.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no answer within {timeout:?}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => return Err(e.to_string()),
        }
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    let stdout = reader.and_then(|r| r.join().ok()).unwrap_or_default();
    Ok(Finished { status, stdout })
}
