//! The kernels' arithmetic without a GPU, on a CUDA emulator (`scripts/kernel_emu/`: a block's
//! threads as fibers, buffers between guard pages, every block run in two thread orders to
//! catch missing barriers). Needs python3 with numpy and g++; without them each test prints
//! `skipped (…)` and passes, unless `ARBOR_REQUIRE_EMU=1` (CI sets it after installing numpy).
//! - `run_all.py` checks the kernel files against numpy references;
//! - the sampler's reference is the CPU sampler itself, so its check is here: sample.cu runs on
//!   the emulator on the GPU tests' cases (sample.rs), fewer and smaller, and is held to the
//!   same rules;
//! - likewise sparse page selection (sparse.cu): the host half made by `SparseHostPlan` from a
//!   real cascade plan, the summaries and the selection on the emulator, against the pages the
//!   CPU's `select_pages` picks.

use crate::ops_cascade::{sparse_case, LAYER};
use crate::ops_common::{flat_pool, to_bf16};
use crate::sample::{self, Case, Sampler};
use arbor_kernels::cuda::ops::sample::{SamplePlan, SampleRow};
use arbor_kernels::cuda::ops::sparse::SparseHostPlan;
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

/// A scratch directory for an emulator run's input and output files, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(what: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "{what}-emu-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("creating the emulator's scratch directory");
        Scratch(dir)
    }

    fn write(&self, name: &str, bytes: &[u8]) {
        std::fs::write(self.0.join(name), bytes).expect("writing emulator input");
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.0.join(name)).expect("reading the emulator's output")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// sample.cu on the emulator: each batch goes through [`SamplePlan`] as on the GPU, to
/// scripts/kernel_emu/run_sample.py through files in a scratch directory.
struct Emulated {
    root: PathBuf,
    dir: Scratch,
}

impl Emulated {
    fn new(root: PathBuf) -> Self {
        Emulated {
            root,
            dir: Scratch::new("sample"),
        }
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
        let d = &self.dir;
        d.write("meta.txt", meta.as_bytes());
        d.write("logits.f32", &le_bytes(&logits, f32::to_le_bytes));
        d.write("params.bin", &plan.params_bytes());
        d.write("hist_tok.u32", &le_bytes(tokens, u32::to_le_bytes));
        d.write("hist_cnt.u32", &le_bytes(counts, u32::to_le_bytes));
        let t = std::time::Instant::now();
        python(&self.root, "scripts/kernel_emu/run_sample.py", &[&d.0]);
        eprintln!(
            "  emulated {} rows × vocab {vocab}: {:.1} s",
            cases.len(),
            t.elapsed().as_secs_f64()
        );
        let words: Vec<u32> = (d.read("out.u32").chunks_exact(4))
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

/// sparse.cu on the emulator against the CPU's selection: trees from the real KV cache (shared
/// prefixes ending mid-page, copy-on-write), every leaf one sparse decode row; the summaries
/// of every page (each layer) and the selection run on the emulator from what
/// `SparseHostPlan` makes of the plan, and the marks must name exactly the pages
/// `select_pages` picks for every (group, KV head).
#[test]
fn sparse_selection_matches_the_cpu_on_the_emulator() {
    let Some(root) = emulator_root("sparse selection on the kernel emulator") else {
        return;
    };
    // (seed, KV heads, query heads per KV head, head_dim, budget)
    for (seed, nkv, group, hd, budget) in [(1, 2, 3, 64, 3), (2, 1, 7, 128, 1), (3, 4, 1, 32, 6)] {
        let c = sparse_case(seed, nkv, group, hd, budget, 320, 3, 4);
        let (p, q) = (&c.p, &c.q);
        let rows = c.plan.num_rows();
        let host = SparseHostPlan::new(&c.plan, p, &c.sp)
            .expect("host plan")
            .expect("sparse rows");

        let pool = &c.rig.cache.pool;
        let l = pool.layout;
        let bits: Vec<u16> = to_bf16(&flat_pool(pool))
            .iter()
            .map(|x| x.to_bits())
            .collect();
        let pairs: Vec<u32> = (0..pool.num_pages as u32)
            .flat_map(|pg| [pg, pool.summaries().filled(LAYER, pg) as u32])
            .collect();
        let d = Scratch::new("sparse");
        let meta = format!(
            "{} {} {nkv} {} {hd} {} {LAYER} {} {} {} {}",
            l.num_layers,
            pool.num_pages,
            l.page_size,
            p.n_heads,
            host.selections.len(),
            host.candidates.len(),
            host.init_marks.len(),
            pool.num_pages
        );
        d.write("meta.txt", meta.as_bytes());
        d.write("pool.u16", &le_bytes(&bits, u16::to_le_bytes));
        d.write("pairs.u32", &le_bytes(&pairs, u32::to_le_bytes));
        d.write("q.f32", &le_bytes(q, f32::to_le_bytes));
        let sel_w: Vec<u32> = host.selections.iter().flatten().copied().collect();
        let cand_w: Vec<u32> = host.candidates.iter().flatten().copied().collect();
        d.write("sel.u32", &le_bytes(&sel_w, u32::to_le_bytes));
        d.write("cand.u32", &le_bytes(&cand_w, u32::to_le_bytes));
        d.write("init.u8", &host.init_marks);
        python(&root, "scripts/kernel_emu/run_sparse.py", &[&d.0]);
        let marks = d.read("marks.u8");
        assert_eq!(marks.len(), host.init_marks.len(), "marks length");
        let (kept, total) = c.check_marks(&marks, &format!("seed {seed}"));
        eprintln!(
            "sparse seed {seed}: {rows} rows, {} ranked choices over {} candidates, {kept} of {total} page reads kept: marks equal the CPU's",
            host.selections.len(),
            host.candidates.len()
        );
        assert!(
            !host.selections.is_empty() && kept < total,
            "seed {seed}: nothing was ranked"
        );
    }
}
