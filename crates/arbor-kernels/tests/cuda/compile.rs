//! NVRTC compile check (no GPU needed): every embedded kernel file compiles for every target
//! architecture, and every `extern "C" __global__` kernel keeps its unmangled name in the PTX.
//! Where NVRTC cannot be loaded the tests print `skipped (no NVRTC): …` and pass, unless
//! `ARBOR_REQUIRE_NVRTC=1` (CI sets it after installing the PyPI wheels).

use arbor_kernels::cuda::compile;
use arbor_kernels::cuda::ops::attention::ATTENTION_HEAD_DIMS;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Whether NVRTC is there; panics without it when `ARBOR_REQUIRE_NVRTC=1`.
fn nvrtc_present() -> bool {
    match compile::nvrtc_version() {
        Ok(_) => true,
        Err(e) => {
            if std::env::var("ARBOR_REQUIRE_NVRTC").is_ok_and(|v| v == "1") {
                panic!("ARBOR_REQUIRE_NVRTC=1, but NVRTC could not be loaded: {e}");
            }
            eprintln!("skipped (no NVRTC): {e}");
            false
        }
    }
}

/// Names of the `extern "C" __global__` kernels a source declares by name; those a macro
/// pastes together (`name##x`) are skipped here and listed by [`macro_kernels`].
fn declared_kernels(src: &str) -> Vec<String> {
    src.split("extern \"C\" __global__ void")
        .skip(1)
        .filter_map(|rest| {
            let mut rest = rest.trim_start();
            if let Some(r) = rest.strip_prefix("__launch_bounds__") {
                // Skip the balanced parentheses of the bounds.
                let mut depth = 0;
                let end = r.char_indices().find_map(|(i, c)| {
                    depth += match c {
                        '(' => 1,
                        ')' => -1,
                        _ => 0,
                    };
                    (depth == 0 && c == ')').then_some(i + 1)
                })?;
                rest = r[end..].trim_start_matches(|c: char| c.is_whitespace() || c == '\\');
            }
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let pasted = rest[name.len()..].starts_with('#');
            (!name.is_empty() && !pasted).then_some(name)
        })
        .collect()
}

/// Kernels that macros generate, which the wrappers look up by name.
fn macro_kernels(file: &str) -> Vec<String> {
    match file {
        "attention" => ATTENTION_HEAD_DIMS
            .iter()
            .flat_map(|hd| {
                [1, 2, 4, 8]
                    .iter()
                    .map(move |g| format!("attn_decode_h{hd}_g{g}"))
                    .chain([format!("attn_prefill_h{hd}")])
            })
            .collect(),
        _ => Vec::new(),
    }
}

type Outcome = (&'static str, &'static str, Result<String, String>, Duration);

#[test]
fn every_kernel_compiles_for_every_arch() {
    if !nvrtc_present() {
        return;
    }
    let (major, minor) = compile::nvrtc_version().unwrap_or_default();
    let jobs: Vec<(&'static str, &'static str)> = compile::KERNELS
        .iter()
        .flat_map(|(name, _)| compile::TARGET_ARCHS.iter().map(move |arch| (*name, *arch)))
        .collect();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(4);
    println!(
        "NVRTC {major}.{minor}: {} kernel files × {:?} on {threads} threads",
        compile::KERNELS.len(),
        compile::TARGET_ARCHS
    );
    let next = AtomicUsize::new(0);
    let done: Mutex<Vec<Outcome>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let Some(&(name, arch)) = jobs.get(next.fetch_add(1, Ordering::Relaxed)) else {
                    return;
                };
                let t = Instant::now();
                let r = compile::compile_nvrtc(name, arch).map_err(|e| e.to_string());
                let out = (name, arch, r, t.elapsed());
                done.lock().unwrap_or_else(|p| p.into_inner()).push(out);
            });
        }
    });
    let mut done = done.into_inner().unwrap_or_else(|p| p.into_inner());
    done.sort_by_key(|(n, a, _, _)| (*n, *a));
    let mut failures = Vec::new();
    for (name, arch, r, dt) in &done {
        match r {
            Ok(ptx) => {
                let src = compile::source(name).unwrap_or_default();
                let missing: Vec<String> = declared_kernels(&src)
                    .into_iter()
                    .chain(macro_kernels(name))
                    .filter(|k| !ptx.contains(&format!(".entry {k}(")))
                    .collect();
                let entries = ptx.matches(".entry ").count();
                println!(
                    "compiled {name}.cu for {arch}: {entries} kernels, {} KiB PTX, {:.1} s",
                    ptx.len() / 1024,
                    dt.as_secs_f64()
                );
                if !missing.is_empty() {
                    failures.push(format!(
                        "{name}.cu for {arch}: no PTX entry for {missing:?}"
                    ));
                }
            }
            Err(log) => {
                println!("FAILED {name}.cu for {arch}:\n{log}");
                failures.push(format!("{name}.cu for {arch}:\n{log}"));
            }
        }
    }
    assert_eq!(done.len(), jobs.len(), "some compile jobs did not report");
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Set in the child process of [`ptx_disk_cache_roundtrip`].
const CACHE_CHILD: &str = "ARBOR_TEST_PTX_CACHE_CHILD";

/// `compile::ptx_cached` writes PTX under `$ARBOR_CACHE/kernels` and reads it back. Runs in a
/// child process of this test binary, so that setting `ARBOR_CACHE` cannot race with other
/// tests reading the environment.
#[test]
fn ptx_disk_cache_roundtrip() {
    if std::env::var_os(CACHE_CHILD).is_some() {
        return ptx_cache_child();
    }
    if !nvrtc_present() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("arbor-ptx-cache-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let exe = std::env::current_exe().expect("the test binary's path");
    let out = std::process::Command::new(exe)
        .args([
            "compile::ptx_disk_cache_roundtrip",
            "--exact",
            "--nocapture",
        ])
        .env(CACHE_CHILD, "1")
        .env("ARBOR_CACHE", &dir)
        .output()
        .expect("running the child test");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
    println!("{text}");
    assert!(out.status.success(), "child test failed:\n{text}");
    assert!(
        text.contains("ptx cache ok"),
        "the child did not run:\n{text}"
    );
}

fn ptx_cache_child() {
    let dir = std::path::PathBuf::from(std::env::var_os("ARBOR_CACHE").expect("ARBOR_CACHE"))
        .join("kernels");
    let (name, arch) = ("embedding", compile::TARGET_ARCHS[0]);
    let first = compile::ptx_cached(name, arch).expect("compiling into the cache");
    let files: Vec<_> = std::fs::read_dir(&dir)
        .expect("the cache directory exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    let file = files
        .iter()
        .find(|p| {
            p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n.starts_with(&format!("{name}-{arch}-")) && n.ends_with(".ptx")
            })
        })
        .unwrap_or_else(|| panic!("no cached PTX in {files:?}"));
    assert_eq!(
        std::fs::read_to_string(file).expect("reading the cache"),
        first
    );
    // A second call reads the file rather than compiling: a marked file comes back as is.
    let marked = format!("{first}\n// read from the cache\n");
    std::fs::write(file, &marked).expect("marking the cached file");
    assert_eq!(compile::ptx_cached(name, arch).expect("cached PTX"), marked);
    // Another architecture is another entry.
    let other = compile::ptx_cached(name, compile::TARGET_ARCHS[1]).expect("second arch");
    assert_ne!(other, marked);
    println!("ptx cache ok: {}", file.display());
}
