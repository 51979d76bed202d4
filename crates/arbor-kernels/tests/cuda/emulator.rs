//! The kernels' arithmetic without a GPU: `scripts/kernel_emu/run_all.py` compiles
//! attention.cu, cascade.cu and moe.cu as C++ with a CUDA emulator (a block's threads as fibers,
//! buffers between guard pages, every block run in two thread orders to catch missing
//! barriers) and checks them against numpy references. Needs python3 with numpy and g++;
//! without them the test prints `skipped (…)` and passes, unless `ARBOR_REQUIRE_EMU=1` (CI sets
//! it after installing numpy).

use std::path::Path;
use std::process::Command;

fn have(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn kernels_match_numpy_on_the_cpu_emulator() {
    let required = std::env::var("ARBOR_REQUIRE_EMU").is_ok_and(|v| v == "1");
    // The source tree, or the working directory (a test binary carried to a GPU machine runs
    // from a copy of the tree elsewhere).
    let script = "scripts/kernel_emu/run_all.py";
    let root = [
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."),
        std::env::current_dir().unwrap_or_default(),
    ]
    .into_iter()
    .find(|r| r.join(script).is_file());
    let missing = if root.is_none() {
        Some("scripts/kernel_emu not found")
    } else if !have("g++", &["--version"]) {
        Some("g++ not found")
    } else if !have("python3", &["-c", "import numpy"]) {
        Some("python3 with numpy not found")
    } else {
        None
    };
    let (None, Some(root)) = (missing, root) else {
        let why = missing.unwrap_or_default();
        assert!(!required, "ARBOR_REQUIRE_EMU=1, but {why}");
        eprintln!("skipped ({why}): the kernel emulator check");
        return;
    };
    let out = Command::new("python3")
        .arg(root.join(script))
        .current_dir(&root)
        .output()
        .expect("running python3");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    eprintln!("{text}");
    assert!(
        out.status.success(),
        "kernel emulator check failed:\n{text}"
    );
}
