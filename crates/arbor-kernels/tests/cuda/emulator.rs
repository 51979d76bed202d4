//! The kernels' arithmetic without a GPU, on a CUDA emulator (`scripts/kernel_emu/`: a block's
//! threads as fibers, buffers between guard pages, every block run in two thread orders to
//! catch missing barriers). Needs python3 with numpy and g++; without them each test prints
//! `skipped (…)` and passes, unless `ARBOR_REQUIRE_EMU=1` (CI sets it after installing numpy).
//! - `run_all.py` checks the kernel files against numpy references;
//! - the sampler's reference is the CPU sampler itself, so its check is here: sample.cu runs on
//!   the emulator on the GPU tests' cases (sample.rs), fewer and smaller, and is held to the
//!   same rules.

use crate::sample::{self, Case, Sampler};
use arbor_kernels::cuda::ops::sample::{SamplePlan, SampleRow};
use arbor_kernels::ops::SampleOutput;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

fn have(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The tree holding scripts/kernel_emu, once g++ and numpy are found; otherwise `None` after
/// printing why the test `what` is skipped (a panic instead when ARBOR_REQUIRE_EMU=1).
fn emulator_root(what: &str) -> Option<PathBuf> {
    let required = std::env::var("ARBOR_REQUIRE_EMU").is_ok_and(|v| v == "1");
    // The source tree, or the working directory (a test binary carried to a GPU machine runs
    // from a copy of the tree elsewhere).
    let root = [
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."),
        std::env::current_dir().unwrap_or_default(),
    ]
    .into_iter()
    .find(|r| r.join("scripts/kernel_emu/emu.py").is_file());
    let missing = if root.is_none() {
        "scripts/kernel_emu not found"
    } else if !have("g++", &["--version"]) {
        "g++ not found"
    } else if !have("python3", &["-c", "import numpy"]) {
        "python3 with numpy not found"
    } else {
        return root;
    };
    assert!(!required, "ARBOR_REQUIRE_EMU=1, but {missing}");
    eprintln!("skipped ({missing}): {what}");
    None
}

/// Runs `python3 script args…` from `root`; panics with its output if it fails.
fn python(root: &Path, script: &str, args: &[&Path]) {
    let out = Command::new("python3")
        .arg(root.join(script))
        .args(args)
        .current_dir(root)
        .output()
        .expect("running python3");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    if !text.trim().is_empty() {
        eprintln!("{text}");
    }
    assert!(out.status.success(), "{script} failed:\n{text}");
}

#[test]
fn kernels_match_numpy_on_the_cpu_emulator() {
    let Some(root) = emulator_root("the kernel emulator check") else {
        return;
    };
    python(&root, "scripts/kernel_emu/run_all.py", &[]);
}

/// sample.cu on the emulator: each batch goes through [`SamplePlan`] as on the GPU, to
/// scripts/kernel_emu/run_sample.py through files in a scratch directory.
struct Emulated {
    root: PathBuf,
    dir: PathBuf,
}

impl Emulated {
    fn new(root: PathBuf) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "sample-emu-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("creating the emulator's scratch directory");
        Emulated { root, dir }
    }

    fn write(&self, name: &str, bytes: &[u8]) {
        std::fs::write(self.dir.join(name), bytes).expect("writing emulator input");
    }
}

impl Drop for Emulated {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn le_bytes<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    v.iter().flat_map(|&x| f(x)).collect()
}

impl Sampler for Emulated {
    fn run(&self, vocab: usize, cases: &[Case]) -> Vec<SampleOutput> {
        let rows: Vec<SampleRow> = cases.iter().map(Case::row).collect();
        let plan = SamplePlan::new(vocab, &rows).expect("planning the batch");
        let logits: Vec<f32> = cases.iter().flat_map(|c| c.logits.clone()).collect();
        let (tokens, counts) = plan.history();
        let meta = format!(
            "{vocab} {} {} {}",
            cases.len(),
            plan.scratch_len(vocab),
            plan.out_len()
        );
        self.write("meta.txt", meta.as_bytes());
        self.write("logits.f32", &le_bytes(&logits, f32::to_le_bytes));
        self.write("params.bin", &plan.params_bytes());
        self.write("hist_tok.u32", &le_bytes(tokens, u32::to_le_bytes));
        self.write("hist_cnt.u32", &le_bytes(counts, u32::to_le_bytes));
        let t = std::time::Instant::now();
        python(&self.root, "scripts/kernel_emu/run_sample.py", &[&self.dir]);
        eprintln!(
            "  emulated {} rows × vocab {vocab}: {:.1} s",
            cases.len(),
            t.elapsed().as_secs_f64()
        );
        let words: Vec<u32> = std::fs::read(self.dir.join("out.u32"))
            .expect("reading the emulator's output")
            .chunks_exact(4)
            .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            .collect();
        assert_eq!(words.len(), plan.out_len(), "emulator output length");
        plan.unpack(&words)
    }
}

#[test]
fn sampler_matches_the_cpu_sampler_on_the_emulator() {
    let Some(root) = emulator_root("the sampler on the kernel emulator") else {
        return;
    };
    let emu = Emulated::new(root);
    for vocab in [1, 33, 1000, 5003] {
        sample::check(&emu, vocab, &sample::greedy_cases(vocab, 6), true, "greedy");
    }
    let (vocab, cases, want) = sample::greedy_tie_cases();
    let tokens: Vec<u32> = emu.run(vocab, &cases).iter().map(|o| o.token).collect();
    assert_eq!(tokens, want, "greedy ties pick the lowest id");
    sample::check(
        &emu,
        1000,
        &sample::temperature_cases(1000, 30),
        false,
        "temperature",
    );
    for (vocab, rows) in [(1000, 40), (32001, 6), (151936, 2)] {
        let cases = sample::truncation_cases(vocab, rows, vocab as u64, false);
        sample::check(&emu, vocab, &cases, false, "truncation");
    }
    let cases = sample::truncation_cases(1000, 24, 77, true);
    sample::check(&emu, 1000, &cases, false, "truncation (ties)");
    for vocab in [33, 1000] {
        sample::check(
            &emu,
            vocab,
            &sample::penalty_cases(vocab, 30),
            false,
            "penalties",
        );
    }
    let (vocab, cases) = sample::all_penalised_case();
    sample::check(&emu, vocab, &cases, true, "all penalised");
    let cases = sample::top_logprob_cases(1000, 12);
    sample::check(&emu, 1000, &cases, false, "top logprobs");
    let (vocab, cases) = sample::top_logprob_edge_cases();
    sample::check(&emu, vocab, &cases, false, "top logprobs (edge)");
    let (vocab, cases) = sample::non_finite_cases();
    sample::check(&emu, vocab, &cases, false, "non-finite");
    sample::check_row_independence(&emu, 1000, &sample::mixed_cases(1000, 12), &[0, 7]);
}
