//! Tree (cascade) attention on the GPU: branches forked from a shared prompt, and a deeper
//! tree (4 levels, uneven branching, prompt chunks beside decode rows), run on the GPU with
//! tree attention on and off and on the CPU. Logits agree by NMSE, greedy tokens exactly, and
//! the on and off runs take different kernels (they round differently). Skipped, with the
//! reason printed, where no GPU can be opened (`ARBOR_REQUIRE_GPU=1` makes that a failure).

use super::errors;
use super::fixtures::fixture;
use super::gpu::POSITION_NMSE;
use arbor_kernels::cuda::ops::attention::ATTENTION_HEAD_DIMS;
use arbor_kernels::kv::SeqId;
use arbor_kernels::ops::SamplingParams;
use arbor_kernels::Device;
use arbor_runtime::model::Precision;
use arbor_runtime::{Engine, EngineOptions, ForwardBatch, LogitsMode, Model, SeqStep};

/// Fixtures tried; those whose head_dim the GPU kernels lack are skipped (with a note).
const ARCHS: [&str; 3] = ["qwen3", "llama", "mistral"];

/// The CPU engine (exact f32 math), the GPU engine with tree attention on, and with it off;
/// `None` (after printing why) without a GPU or without kernels for the fixture's head_dim.
fn engines(arch: &str, page_size: usize) -> Option<[Engine; 3]> {
    let load = || {
        let mut m = Model::load(&fixture(arch)).expect("load model");
        m.precision = Precision::Exact;
        m
    };
    let hd = load().cfg.head_dim;
    if !ATTENTION_HEAD_DIMS.contains(&hd) {
        println!("{arch}: skipped (the GPU kernels have no head_dim {hd})");
        return None;
    }
    let opts = EngineOptions {
        kv_cache_bytes: 16 << 20,
        page_size,
    };
    let gpu = |tree: bool| {
        let mut e = super::gpu::on_gpu(Engine::on_device(load(), &opts, Device::Cuda(0)))?;
        e.set_tree_attention(tree);
        Some(e)
    };
    let on = gpu(true)?;
    let off = gpu(false)?;
    let cpu = Engine::new(load(), &opts).expect("CPU engine");
    Some([cpu, on, off])
}

/// What a run gave: logits of every (step, sequence) with logits asked for, in order, and
/// every stepping sequence's greedy tokens, by sequence index of the script.
#[derive(Default)]
struct Outcome {
    logits: Vec<Vec<f32>>,
    tokens: Vec<Vec<u32>>,
    /// The greedy token of every (step, sequence), in the order of `logits`.
    picks: Vec<u32>,
}

/// How a script runs.
#[derive(Clone, Default)]
struct RunOpts {
    /// Ask for logits (read back, sampled on the host) or only sample (on the device).
    logits: bool,
    /// Feed these tokens (another run's [`Outcome::tokens`]) where the script feeds a
    /// sequence its last greedy token, so that the GPU runs the CPU's inputs even where
    /// bf16 rounding tips a near tie the other way.
    follow: Option<Vec<Vec<u32>>>,
}

impl RunOpts {
    fn logits() -> Self {
        RunOpts {
            logits: true,
            follow: None,
        }
    }
}

/// Drives one engine: sequences are indices into `seqs`; each stepping sequence feeds its
/// next forced tokens, or else its last greedy token.
struct Driver<'a> {
    e: &'a mut Engine,
    seqs: Vec<SeqId>,
    next: Vec<Vec<u32>>,
    out: Outcome,
    opts: RunOpts,
    /// Every step's sparse budget.
    budget: Option<usize>,
}

impl<'a> Driver<'a> {
    fn new(e: &'a mut Engine, opts: &RunOpts) -> Self {
        Driver {
            e,
            seqs: vec![],
            next: vec![],
            out: Outcome::default(),
            opts: opts.clone(),
            budget: None,
        }
    }

    fn new_seq(&mut self) -> usize {
        let s = self.e.new_seq();
        self.push(s)
    }
    fn fork(&mut self, parent: usize) -> usize {
        let s = self.e.fork_seq(self.seqs[parent]).expect("fork");
        self.push(s)
    }
    /// Frees every sequence and the prefix cache, so that the next run starts afresh.
    fn finish(self) -> Outcome {
        for &s in &self.seqs {
            self.e.free_seq(s);
        }
        self.e.clear_prefix_cache();
        assert_eq!(self.e.cache().allocator().num_in_use(), 0, "pages leaked");
        self.out
    }
    fn push(&mut self, s: SeqId) -> usize {
        self.seqs.push(s);
        self.next.push(Vec::new());
        self.out.tokens.push(Vec::new());
        self.seqs.len() - 1
    }
    /// One step of `who`, each with `forced` tokens (if any; else its last sampled one).
    fn step(&mut self, who: &[(usize, Vec<u32>)]) {
        let seqs = who
            .iter()
            .map(|(i, forced)| SeqStep {
                seq: self.seqs[*i],
                tokens: match (forced.is_empty(), &self.opts.follow) {
                    (false, _) => forced.clone(),
                    (true, None) => std::mem::take(&mut self.next[*i]),
                    (true, Some(f)) => vec![f[*i][self.out.tokens[*i].len() - 1]],
                },
                sample: Some(SamplingParams::default()),
                sparse_budget: self.budget,
                logits: if self.opts.logits {
                    LogitsMode::All
                } else {
                    LogitsMode::None
                },
                ..Default::default()
            })
            .collect();
        let res = self.e.step(&ForwardBatch { seqs }).expect("step");
        self.e.cache().check().expect("KV bookkeeping");
        for ((i, _), o) in who.iter().zip(res) {
            let t = o.sample.expect("sampled").token;
            self.out.tokens[*i].push(t);
            self.out.picks.push(t);
            self.next[*i] = vec![t];
            if self.opts.logits {
                self.out.logits.push(o.logits);
            }
        }
    }
}

fn tokens(n: usize, seed: u32, vocab: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed * 97) >> 7) % vocab as u32)
        .collect()
}

/// 8 branches of a 37-token prompt (ending mid-page, so each copies its last page), decoding
/// 6 tokens each (the first forced, the rest greedy), beside an unrelated prompt chunk in the
/// first two steps.
fn forked(e: &mut Engine, opts: &RunOpts) -> Outcome {
    let vocab = e.model.cfg.vocab_size;
    let mut d = Driver::new(e, opts);
    let root = d.new_seq();
    d.step(&[(root, tokens(37, 1, vocab))]);
    let kids: Vec<usize> = (0..8).map(|_| d.fork(root)).collect();
    let other = d.new_seq();
    for round in 0..6u32 {
        let mut who: Vec<(usize, Vec<u32>)> = kids
            .iter()
            .enumerate()
            .map(|(i, &k)| {
                let forced = match round {
                    0 => vec![(i as u32 * 31 + 7) % vocab as u32],
                    _ => vec![],
                };
                (k, forced)
            })
            .collect();
        if round < 2 {
            who.push((other, tokens(9, 5 + round, vocab)));
        }
        d.step(&who);
    }
    d.finish()
}

/// A 4-level tree with uneven branching: a 21-token root; 3 children each feed a 10-token
/// chunk; they fork 3, 1 and 2 grandchildren (the second child keeps stepping beside its
/// own), which feed 10 more; the first grandchild forks 2 great-grandchildren and the others 1,
/// which feed 10 more; then every leaf decodes 4 greedy tokens. Page size 8: every level spans
/// pages of its own and shares them with everything below.
fn deep(e: &mut Engine, opts: &RunOpts) -> Outcome {
    let vocab = e.model.cfg.vocab_size;
    let mut d = Driver::new(e, opts);
    let root = d.new_seq();
    d.step(&[(root, tokens(21, 2, vocab))]);
    let chunk = |i: usize, level: u32| tokens(10, 100 * level + i as u32, vocab);
    let l1: Vec<usize> = (0..3).map(|_| d.fork(root)).collect();
    d.step(&l1.iter().map(|&s| (s, chunk(s, 1))).collect::<Vec<_>>());
    let mut l2 = Vec::new();
    for (&p, n) in l1.iter().zip([3, 1, 2]) {
        l2.extend((0..n).map(|_| d.fork(p)));
    }
    // The second child goes on beside its one grandchild.
    let mut who: Vec<(usize, Vec<u32>)> = l2.iter().map(|&s| (s, chunk(s, 2))).collect();
    who.push((l1[1], chunk(l1[1], 2)));
    d.step(&who);
    let mut l3 = Vec::new();
    for (i, &p) in l2.iter().enumerate() {
        let n = if i == 0 { 2 } else { 1 };
        l3.extend((0..n).map(|_| d.fork(p)));
    }
    d.step(&l3.iter().map(|&s| (s, chunk(s, 3))).collect::<Vec<_>>());
    let mut leaves = l3.clone();
    leaves.push(l1[1]);
    for _ in 0..4 {
        d.step(&leaves.iter().map(|&s| (s, vec![])).collect::<Vec<_>>());
    }
    d.finish()
}

/// 4 branches of a 115-token prompt (pages of 8: 15 pages; the fixtures' context is 128), 6
/// decode steps, every step with sparse budget `budget` (the prompt too).
fn sparse_run(e: &mut Engine, budget: Option<usize>, follow: Option<Vec<Vec<u32>>>) -> Outcome {
    let vocab = e.model.cfg.vocab_size;
    let opts = RunOpts {
        logits: true,
        follow,
    };
    let mut d = Driver::new(e, &opts);
    d.budget = budget;
    let root = d.new_seq();
    d.step(&[(root, tokens(115, 3, vocab))]);
    let kids: Vec<usize> = (0..4).map(|_| d.fork(root)).collect();
    for round in 0..6u32 {
        let who: Vec<(usize, Vec<u32>)> = (kids.iter().enumerate())
            .map(|(i, &k)| match round {
                0 => (k, vec![(i as u32 * 17 + 3) % vocab as u32]),
                _ => (k, vec![]),
            })
            .collect();
        d.step(&who);
    }
    d.finish()
}

/// Sparse attention on the GPU (both layers sparse): a budget above every page gives the
/// dense GPU run's decode logits (every page marked: the same reads; ≤ 1e-8 NMSE allows for a
/// plan cut otherwise); a budget of 2 pages changes them, and stays near the CPU's sparse run
/// (the CPU ranks pages by f32 keys, the GPU by bf16 ones, so a choice near a tie may differ:
/// the bound is loose and the NMSE is printed). The ops test `sparse_selection_and_attention_
/// match_the_cpu` checks the selection itself page for page.
#[test]
fn sparse_attention_on_the_gpu() {
    let (mut ran, mut changed) = (0, false);
    for arch in ARCHS {
        let Some([mut cpu, mut on, _]) = engines(arch, 8) else {
            continue;
        };
        ran += 1;
        for e in [&mut cpu, &mut on] {
            e.model.attention.sparse.dense_layers = 0;
        }
        // Decode steps only: the prompt step runs another kernel without a budget.
        let decode = |o: &Outcome| o.logits[1..].to_vec();
        let worst = |a: &[Vec<f32>], b: &[Vec<f32>]| {
            assert_eq!(a.len(), b.len());
            (a.iter().zip(b))
                .map(|(g, w)| errors(g, w).0)
                .fold(0.0f64, f64::max)
        };
        // Every GPU run feeds the CPU's greedy tokens: the same inputs throughout.
        let cpu_run = sparse_run(&mut cpu, Some(2), None);
        let follow = || Some(cpu_run.tokens.clone());
        let want = decode(&cpu_run);
        let dense = decode(&sparse_run(&mut on, None, follow()));
        let all = decode(&sparse_run(&mut on, Some(1000), follow()));
        let e_all = worst(&all, &dense);
        let small = decode(&sparse_run(&mut on, Some(2), follow()));
        let (e_dense, e_cpu) = (worst(&small, &dense), worst(&small, &want));
        println!(
            "{arch} sparse on the GPU: budget 1000 vs dense {e_all:.2e}; budget 2 vs dense \
             {e_dense:.2e}, vs the CPU's budget 2 {e_cpu:.2e}"
        );
        assert!(
            e_all <= 1e-8,
            "{arch}: a budget above every page must equal dense"
        );
        // Mistral's 24-token window holds only the sink, local and budget pages: no change.
        changed |= e_dense > 0.0;
        // Measured on the CPU emulator of the GPU (scripts/fake_cuda): qwen3 1.7e-3, llama
        // 1.8e-2 (its positions move most under bf16, see POSITION_NMSE); budget 2 against
        // dense is ~2.
        assert!(e_cpu < 5e-2, "{arch}: sparse vs CPU NMSE {e_cpu:.2e}");
    }
    if ran > 0 {
        assert!(changed, "budget 2 read every page anyway on every fixture");
    }
}

/// A script of steps, run on one engine.
type Scenario = fn(&mut Engine, &RunOpts) -> Outcome;

/// Runs `scenario` on the CPU and on the GPU with tree attention on and off, and compares.
fn check(name: &str, page_size: usize, scenario: Scenario) {
    let (mut ran, mut differed) = (0, false);
    for arch in ARCHS {
        let Some([mut cpu, mut on, mut off]) = engines(arch, page_size) else {
            continue;
        };
        ran += 1;
        let vocab = cpu.model.cfg.vocab_size;
        let want = scenario(&mut cpu, &RunOpts::logits());
        // The GPU runs feed the CPU's greedy tokens (see RunOpts::follow).
        let follow = |logits| RunOpts {
            logits,
            follow: Some(want.tokens.clone()),
        };
        let got_on = scenario(&mut on, &follow(true));
        let got_off = scenario(&mut off, &follow(true));
        assert_eq!(want.logits.len(), got_on.logits.len());
        let worst = |got: &Outcome| {
            got.logits
                .iter()
                .zip(&want.logits)
                .map(|(g, w)| errors(g, w).0)
                .fold(0.0f64, f64::max)
        };
        let (nmse_on, nmse_off) = (worst(&got_on), worst(&got_off));
        let on_off = got_on
            .logits
            .iter()
            .zip(&got_off.logits)
            .map(|(a, b)| errors(a, b).0)
            .fold(0.0f64, f64::max);
        println!(
            "{arch} {name}: worst NMSE vs CPU: tree on {nmse_on:.2e}, off {nmse_off:.2e}; on vs off {on_off:.2e}"
        );
        // bf16 weights and K/V against f32 ones, one position at a time (as gpu.rs); on and
        // off share all of that.
        assert!(
            nmse_on < POSITION_NMSE,
            "{arch} {name}: tree on, NMSE {nmse_on:.2e}"
        );
        assert!(
            nmse_off < POSITION_NMSE,
            "{arch} {name}: tree off, NMSE {nmse_off:.2e}"
        );
        assert!(on_off < 1e-4, "{arch} {name}: on vs off, NMSE {on_off:.2e}");
        let bitwise = got_on
            .logits
            .iter()
            .flatten()
            .zip(got_off.logits.iter().flatten())
            .all(|(a, b)| a.to_bits() == b.to_bits());
        // Cascade sums in another order than the paged kernel, but attention's bf16 output
        // can round that away entirely on a small model (llama's 2 layers do): at least one
        // fixture must differ (below), proving the cascade kernel ran.
        differed |= !bitwise;
        // Greedy tokens, sampled on the host (logits read back) and on the device: the CPU's,
        // but for near ties.
        let dev_on = scenario(&mut on, &follow(false));
        let dev_off = scenario(&mut off, &follow(false));
        for (got, logits, how) in [
            // Device-sampling runs read no logits back: their ties are judged on the logits
            // of the same configuration's host-sampled run.
            (&got_on, &got_on, "tree on"),
            (&got_off, &got_off, "tree off"),
            (&dev_on, &got_on, "device sampling, tree on"),
            (&dev_off, &got_off, "device sampling, tree off"),
        ] {
            assert_eq!(got.picks.len(), want.picks.len(), "{arch} {name}: {how}");
            for (k, (&g, &c)) in got.picks.iter().zip(&want.picks).enumerate() {
                if g != c {
                    let last = |l: &[f32]| l[l.len() - vocab..].to_vec();
                    let (cl, gl) = (last(&want.logits[k]), last(&logits.logits[k]));
                    let what = format!("{arch} {name}: {how}, pick {k}");
                    super::gpu::assert_tie(&cl, &gl, c as usize, g as usize, &what);
                }
            }
        }
    }
    if ran == 0 {
        println!("{name}: no fixture ran on the GPU");
    } else {
        assert!(differed, "{name}: tree on and off agree bit for bit on every fixture: was the cascade kernel used?");
    }
}

#[test]
fn gpu_tree_forked_branches_match_the_cpu() {
    check("forked branches", 16, forked);
}

#[test]
fn gpu_tree_deep_uneven_tree_matches_the_cpu() {
    check("deep tree", 8, deep);
}

/// The same scripts on the CPU alone (they run everywhere): state-passing cascade attention is
/// per-sequence attention bit for bit, merged partials agree to rounding.
#[test]
fn tree_scripts_on_the_cpu() {
    use arbor_kernels::ops::cascade::CascadeMode;
    for (arch, page_size, scenario) in [
        ("qwen3", 16, forked as Scenario),
        ("llama", 8, deep),
        ("mistral", 8, deep),
    ] {
        let run = |tree: Option<CascadeMode>| {
            let mut e = Engine::new(
                Model::load(&fixture(arch)).expect("load model"),
                &EngineOptions {
                    kv_cache_bytes: 16 << 20,
                    page_size,
                },
            )
            .expect("engine");
            e.model.attention.tree = tree;
            scenario(&mut e, &RunOpts::logits())
        };
        let (off, chain, merge) = (
            run(None),
            run(Some(CascadeMode::Chain)),
            run(Some(CascadeMode::Merge)),
        );
        assert_eq!(off.tokens, chain.tokens, "{arch}");
        assert!(
            off.logits
                .iter()
                .flatten()
                .zip(chain.logits.iter().flatten())
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{arch}: chain is not per-sequence attention"
        );
        let worst = merge
            .logits
            .iter()
            .zip(&off.logits)
            .map(|(a, b)| errors(a, b).0)
            .fold(0.0f64, f64::max);
        println!("{arch}: merged cascade vs per-sequence attention, worst NMSE {worst:.2e}");
        assert!(worst < 1e-10, "{arch}: NMSE {worst:.2e}");
        assert_eq!(merge.tokens, off.tokens, "{arch}");
        assert!(
            off.tokens.iter().any(|t| t.len() > 1),
            "{arch}: nothing decoded"
        );
    }
}
