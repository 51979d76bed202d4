//! The GPU sampler against the CPU sampler (`ops::sample`), row by row: the same token (all
//! greedy rows; ≥ 99.9% of sampled rows, a mismatch being allowed only where the draw's
//! target falls within rounding of a token boundary, and even then the GPU's token must be
//! one the CPU could draw), logprobs within 1e-4, entropy within 1e-4, identical top-n ids.
//! Every mismatch is printed with its row's parameters. The case builders and [`check`] also
//! serve the emulator test (emulator.rs), which runs the same kernel on the CPU.

use crate::common;
use arbor_kernels::cuda::ops::sample::{sample as gpu_sample, SampleRow, MAX_TOP_LOGPROBS};
use arbor_kernels::cuda::{compile, find, Gpu};
use arbor_kernels::ops::{sample, sampling_candidates, SampleOutput, SamplingParams};
use std::time::Instant;

/// One row: its logits, parameters, penalty history and step.
#[derive(Clone)]
pub(crate) struct Case {
    pub logits: Vec<f32>,
    pub params: SamplingParams,
    pub history: Vec<u32>,
    pub step: u64,
}

impl Case {
    /// The row as the wrapper takes it.
    pub fn row(&self) -> SampleRow<'_> {
        SampleRow {
            params: &self.params,
            history: &self.history,
            step: self.step,
        }
    }
}

/// Runs sample.cu on one batch of rows: the GPU, or the CPU emulator (emulator.rs).
pub(crate) trait Sampler {
    fn run(&self, vocab: usize, cases: &[Case]) -> Vec<SampleOutput>;
}

impl Sampler for std::sync::Arc<Gpu> {
    fn run(&self, vocab: usize, cases: &[Case]) -> Vec<SampleOutput> {
        run_gpu(self, vocab, cases)
    }
}

/// xorshift64*, for parameters and histories.
pub(crate) struct Rng(pub u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len())]
    }
}

/// LM-like logits: a uniform ±4 body and a few spikes up to +14, so that the top tokens
/// carry most of the mass but the tail is not negligible.
pub(crate) fn lm_logits(vocab: usize, seed: u64) -> Vec<f32> {
    let mut x = common::random(vocab, seed, 4.0);
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    for _ in 0..(vocab / 500).clamp(1, 40) {
        let i = rng.below(vocab);
        x[i] = 6.0 + (rng.next() % 8000) as f32 / 1000.0;
    }
    x
}

/// Logits rounded to multiples of 0.5: many exact ties.
pub(crate) fn tied_logits(vocab: usize, seed: u64) -> Vec<f32> {
    lm_logits(vocab, seed)
        .into_iter()
        .map(|v| (v * 2.0).round() / 2.0)
        .collect()
}

/// Parameters with `temperature` and `seed`, everything else off.
pub(crate) fn params(seed: u64, temperature: f32) -> SamplingParams {
    SamplingParams {
        temperature,
        seed,
        ..SamplingParams::default()
    }
}

pub(crate) fn case(logits: Vec<f32>, params: SamplingParams, history: Vec<u32>, step: u64) -> Case {
    Case {
        logits,
        params,
        history,
        step,
    }
}

fn same_f32(a: f32, b: f32, tol: f32) -> bool {
    a == b || (a - b).abs() <= tol
}

/// Why `gpu` differs from `cpu` in a reported number, if it does.
fn stat_diff(cpu: &SampleOutput, gpu: &SampleOutput) -> Option<String> {
    if !same_f32(cpu.logprob, gpu.logprob, 1e-4) {
        return Some(format!("logprob cpu {} gpu {}", cpu.logprob, gpu.logprob));
    }
    if !same_f32(cpu.entropy, gpu.entropy, 1e-4 + 1e-5 * cpu.entropy.abs()) {
        return Some(format!("entropy cpu {} gpu {}", cpu.entropy, gpu.entropy));
    }
    let ids = |o: &SampleOutput| o.top_logprobs.iter().map(|t| t.0).collect::<Vec<_>>();
    if ids(cpu) != ids(gpu) {
        return Some(format!("top ids cpu {:?} gpu {:?}", ids(cpu), ids(gpu)));
    }
    for (c, g) in cpu.top_logprobs.iter().zip(&gpu.top_logprobs) {
        if !same_f32(c.1, g.1, 1e-4) {
            return Some(format!("top logprob of {}: cpu {} gpu {}", c.0, c.1, g.1));
        }
    }
    None
}

/// Runs `cases` (all of `vocab` logits) as one GPU batch.
fn run_gpu(gpu: &Gpu, vocab: usize, cases: &[Case]) -> Vec<SampleOutput> {
    let flat: Vec<f32> = cases
        .iter()
        .flat_map(|c| c.logits.iter().copied())
        .collect();
    let dev = gpu.upload(&flat, "test logits").expect("upload");
    let rows: Vec<SampleRow> = cases.iter().map(Case::row).collect();
    let t = Instant::now();
    let out = gpu_sample(gpu, &dev, vocab, &rows).expect("gpu sample");
    eprintln!(
        "  {} rows × vocab {vocab}: {:.2} ms (incl. transfers)",
        cases.len(),
        t.elapsed().as_secs_f64() * 1e3
    );
    out
}

/// Compares every case with the CPU sampler. Greedy cases (and all cases when `exact`) must
/// draw the same token; otherwise at most 0.1% of rows may differ, each only to a token the
/// CPU could have drawn. Panics listing every failure.
pub(crate) fn check(s: &dyn Sampler, vocab: usize, cases: &[Case], exact: bool, label: &str) {
    let out = s.run(vocab, cases);
    assert_eq!(out.len(), cases.len());
    let (mut failures, mut differ) = (Vec::new(), 0usize);
    for (i, (c, g)) in cases.iter().zip(&out).enumerate() {
        let cpu = sample(&c.logits, &c.params, &c.history, c.step);
        let what = || {
            format!(
                "{label} row {i} (vocab {vocab}, step {}, {:?}, history {} tokens)",
                c.step,
                c.params,
                c.history.len()
            )
        };
        if let Some(d) = stat_diff(&cpu, g) {
            failures.push(format!("{}: {d}", what()));
        }
        if cpu.token != g.token {
            differ += 1;
            let greedy =
                c.params.temperature.is_nan() || c.params.temperature <= 0.0 || c.params.top_k == 1;
            let allowed = sampling_candidates(&c.logits, &c.params, &c.history);
            let note = format!(
                "token cpu {} (logit {}) gpu {} (logit {}); gpu token a candidate: {} of {}",
                cpu.token,
                c.logits
                    .get(cpu.token as usize)
                    .copied()
                    .unwrap_or(f32::NAN),
                g.token,
                c.logits.get(g.token as usize).copied().unwrap_or(f32::NAN),
                allowed.contains(&g.token),
                allowed.len()
            );
            eprintln!("  differs: {}: {note}", what());
            if exact || greedy || !allowed.contains(&g.token) {
                failures.push(format!("{}: {note}", what()));
            }
        }
    }
    let allowed = cases.len() / 1000;
    eprintln!(
        "{label}: vocab {vocab}: {}/{} tokens agree",
        cases.len() - differ,
        cases.len()
    );
    if differ > allowed {
        failures.push(format!(
            "{label}: {differ} of {} tokens differ (allowed {allowed})",
            cases.len()
        ));
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

const VOCABS: &[usize] = &[1000, 32001, 49152, 151936];

#[test]
fn sample_kernel_compiles_for_every_arch() {
    if !find::nvrtc_available() {
        eprintln!("skipped (no NVRTC)");
        return;
    }
    for arch in compile::TARGET_ARCHS {
        if let Err(e) = compile::compile_nvrtc("sample", arch) {
            panic!("sample.cu does not compile for {arch}: {e}");
        }
    }
}

/// Greedy rows: temperature 0 or NaN, or top-k 1.
pub(crate) fn greedy_cases(vocab: usize, rows: u64) -> Vec<Case> {
    (0..rows)
        .map(|r| {
            let mut p = params(r, [0.0, 0.8, f32::NAN][r as usize % 3]);
            p.top_k = (r % 3 == 1) as usize;
            case(lm_logits(vocab, 100 + r), p, vec![], r)
        })
        .collect()
}

#[test]
fn greedy_matches_cpu_exactly() {
    let Some(gpu) = common::gpu() else { return };
    for &vocab in [1, 2, 31, 32, 33, 1025].iter().chain(VOCABS) {
        check(&gpu, vocab, &greedy_cases(vocab, 24), true, "greedy");
    }
}

/// The vocabulary and three greedy rows whose maximum is tied three ways; the lowest ids
/// of the ties are the expected tokens.
pub(crate) fn greedy_tie_cases() -> (usize, Vec<Case>, [u32; 3]) {
    let vocab = 5000;
    let cases: Vec<Case> = [[4999, 3000, 2048], [7, 1031, 4000], [1024, 1023, 2047]]
        .iter()
        .map(|ids| {
            let mut logits = common::random(vocab, ids[0] as u64, 3.0);
            for &i in ids {
                logits[i] = 9.5;
            }
            case(logits, params(0, 0.0), vec![], 0)
        })
        .collect();
    (vocab, cases, [2048, 7, 1023])
}

#[test]
fn greedy_ties_pick_the_lowest_id() {
    let Some(gpu) = common::gpu() else { return };
    let (vocab, cases, want) = greedy_tie_cases();
    let tokens: Vec<u32> = run_gpu(&gpu, vocab, &cases)
        .iter()
        .map(|o| o.token)
        .collect();
    assert_eq!(tokens, want);
    check(&gpu, vocab, &cases, true, "greedy ties");
}

/// Plain temperature draws over 20 logit rows.
pub(crate) fn temperature_cases(vocab: usize, rows: u64) -> Vec<Case> {
    (0..rows)
        .map(|r| {
            let t = [0.3, 0.7, 1.0, 1.5, 3.0][r as usize % 5];
            case(
                lm_logits(vocab, r % 20),
                params(r * 7 + 1, t),
                vec![],
                r / 3,
            )
        })
        .collect()
}

#[test]
fn temperature_draws_match_cpu() {
    let Some(gpu) = common::gpu() else { return };
    for &vocab in VOCABS {
        check(
            &gpu,
            vocab,
            &temperature_cases(vocab, 200),
            false,
            "temperature",
        );
    }
}

/// Random truncation parameters (top-k, top-p, min-p, alone and combined) on LM-like, flat
/// or (with `tied`) tied logits.
pub(crate) fn truncation_cases(vocab: usize, rows: u64, seed: u64, tied: bool) -> Vec<Case> {
    let mut rng = Rng(seed | 1);
    (0..rows)
        .map(|r| {
            let mut p = params(rng.next(), rng.pick(&[0.5, 0.8, 1.0, 1.3, 3.0]));
            let ks = [0, 2, 5, 40, 100, 999, vocab - 1, vocab, vocab + 5];
            let ps = [1.0, 0.0, 1e-6, 0.1, 0.5, 0.9, 0.95, 0.999, f32::NAN, -0.5];
            let mins = [0.0, 0.001, 0.05, 0.1, 0.5, 1.0, 2.0, f32::NAN, -1.0];
            match r % 4 {
                0 => p.top_k = rng.pick(&ks),
                1 => p.top_p = rng.pick(&ps),
                2 => p.min_p = rng.pick(&mins),
                _ => (p.top_k, p.top_p, p.min_p) = (rng.pick(&ks), rng.pick(&ps), rng.pick(&mins)),
            }
            let logits = match (tied, r % 3) {
                (true, _) => tied_logits(vocab, seed + r),
                (false, 0) => common::random(vocab, seed + r, 3.0),
                _ => lm_logits(vocab, seed + r),
            };
            case(logits, p, vec![], rng.next() % 1000)
        })
        .collect()
}

#[test]
fn truncations_match_cpu() {
    let Some(gpu) = common::gpu() else { return };
    for &vocab in VOCABS {
        check(
            &gpu,
            vocab,
            &truncation_cases(vocab, 240, vocab as u64, false),
            false,
            "truncation",
        );
    }
}

#[test]
fn truncations_with_ties_match_cpu() {
    let Some(gpu) = common::gpu() else { return };
    for &vocab in &[1000, 49152] {
        check(
            &gpu,
            vocab,
            &truncation_cases(vocab, 240, 77, true),
            false,
            "truncation (ties)",
        );
    }
}

/// Random penalties (including values the CPU ignores) over histories with repeats and ids
/// beyond the vocabulary; a third of the rows greedy.
pub(crate) fn penalty_cases(vocab: usize, rows: u64) -> Vec<Case> {
    let mut rng = Rng(vocab as u64 * 31 + 1);
    let spikes: Vec<u32> = (3..vocab as u32).step_by(97).collect();
    (0..rows)
        .map(|r| {
            let mut p = params(rng.next(), if r % 3 == 0 { 0.0 } else { 0.9 });
            p.repetition_penalty = rng.pick(&[1.0, 0.7, 1.3, 2.0, f32::NAN, -1.0, f32::INFINITY]);
            p.presence_penalty = rng.pick(&[0.0, 0.5, -1.0, 3.0, f32::NAN]);
            p.frequency_penalty = rng.pick(&[0.0, 0.3, 2.0, -0.5, f32::INFINITY]);
            p.top_k = rng.pick(&[0, 0, 10]);
            p.top_logprobs = rng.pick(&[0, 5]);
            let len = rng.below(300);
            let history = (0..len)
                .map(|_| match rng.below(4) {
                    0 => (vocab + rng.below(10)) as u32,
                    1 if !spikes.is_empty() => rng.pick(&spikes),
                    _ => rng.below(vocab.min(50)) as u32,
                })
                .collect();
            case(lm_logits(vocab, r), p, history, r)
        })
        .collect()
}

#[test]
fn penalties_match_cpu() {
    let Some(gpu) = common::gpu() else { return };
    for &vocab in &[33, 1000, 151936] {
        check(&gpu, vocab, &penalty_cases(vocab, 240), false, "penalties");
    }
}

/// One row (vocabulary 40) whose penalties push every token to −∞.
pub(crate) fn all_penalised_case() -> (usize, Vec<Case>) {
    let vocab = 40;
    let mut p = params(3, 1.0);
    p.frequency_penalty = f32::MAX;
    let history: Vec<u32> = (0..vocab as u32).flat_map(|t| [t, t]).collect();
    (vocab, vec![case(lm_logits(vocab, 5), p, history, 0)])
}

#[test]
fn penalties_pushing_every_token_to_minus_infinity_fall_back_to_raw_argmax() {
    let Some(gpu) = common::gpu() else { return };
    let (vocab, cases) = all_penalised_case();
    check(&gpu, vocab, &cases, true, "all penalised");
}

/// Rows asking for 1 to MAX_TOP_LOGPROBS top logprobs, a third of them on tied logits.
pub(crate) fn top_logprob_cases(vocab: usize, rows: u64) -> Vec<Case> {
    (0..rows)
        .map(|r| {
            let mut p = params(r, (r % 2) as f32);
            p.top_logprobs = [1, 5, 20, 100, MAX_TOP_LOGPROBS, 3][r as usize % 6];
            let logits = if r % 3 == 0 {
                tied_logits(vocab, r)
            } else {
                lm_logits(vocab, r)
            };
            case(logits, p, vec![], r)
        })
        .collect()
}

/// Vocabulary 1000: the whole vocabulary as top logprobs, and more than there are finite
/// logits (−∞ tokens by id).
pub(crate) fn top_logprob_edge_cases() -> (usize, Vec<Case>) {
    let vocab = 1000;
    let mut sparse = vec![f32::NEG_INFINITY; vocab];
    for i in (0..vocab).step_by(97) {
        sparse[i] = (i % 7) as f32;
    }
    let cases = [
        (tied_logits(vocab, 9), 1000),
        (sparse.clone(), 20),
        (sparse, 1000),
    ]
    .into_iter()
    .map(|(logits, n)| {
        let p = SamplingParams {
            top_logprobs: n,
            ..params(1, 1.0)
        };
        case(logits, p, vec![], 0)
    })
    .collect();
    (vocab, cases)
}

#[test]
fn top_logprobs_match_cpu() {
    let Some(gpu) = common::gpu() else { return };
    for &vocab in VOCABS {
        check(
            &gpu,
            vocab,
            &top_logprob_cases(vocab, 60),
            false,
            "top logprobs",
        );
    }
    let (vocab, cases) = top_logprob_edge_cases();
    check(&gpu, vocab, &cases, false, "top logprobs (edge)");
}

/// Vocabulary 3000: rows with NaN, ±∞, nothing finite, one finite token, and huge values,
/// each under greedy, temperature, top-p and top-k.
pub(crate) fn non_finite_cases() -> (usize, Vec<Case>) {
    let vocab = 3000;
    let mut rows: Vec<Vec<f32>> = Vec::new();
    let mut x = lm_logits(vocab, 1);
    for i in (0..vocab).step_by(7) {
        x[i] = f32::NAN;
    }
    for i in (3..vocab).step_by(11) {
        x[i] = f32::NEG_INFINITY;
    }
    rows.push(x.clone());
    x[1500] = f32::INFINITY;
    x[2] = f32::INFINITY;
    rows.push(x);
    rows.push(vec![f32::NEG_INFINITY; vocab]);
    rows.push(vec![f32::NAN; vocab]);
    let mut one = vec![f32::NEG_INFINITY; vocab];
    one[2999] = -5.0;
    rows.push(one);
    let mut huge = lm_logits(vocab, 2)
        .iter()
        .map(|v| v * 1e37)
        .collect::<Vec<_>>();
    huge[10] = f32::MAX;
    huge[20] = -f32::MAX;
    rows.push(huge);
    let mut cases = Vec::new();
    for (r, logits) in rows.iter().enumerate() {
        for (j, t) in [0.0, 0.7, 1.0, 2.0].into_iter().enumerate() {
            let mut p = params(r as u64 * 10 + j as u64, t);
            p.top_logprobs = 8;
            p.top_k = if j == 3 { 50 } else { 0 };
            p.top_p = if j == 2 { 0.9 } else { 1.0 };
            cases.push(case(logits.clone(), p, vec![5, 2, 2], j as u64));
        }
    }
    (vocab, cases)
}

#[test]
fn non_finite_rows_match_cpu() {
    let Some(gpu) = common::gpu() else { return };
    let (vocab, cases) = non_finite_cases();
    check(&gpu, vocab, &cases, false, "non-finite");
}

/// Truncations, top logprobs and penalties mixed in one batch.
pub(crate) fn mixed_cases(vocab: usize, rows: u64) -> Vec<Case> {
    let mut cases = truncation_cases(vocab, rows, 5, false);
    for (i, c) in cases.iter_mut().enumerate() {
        c.params.top_logprobs = i % 4;
        c.params.presence_penalty = if i % 5 == 0 { 0.7 } else { 0.0 };
        c.history = vec![(i * 13) as u32, 1, 1];
    }
    cases
}

/// `cases` checked, run twice (identical results), and rows `singles` each alone (identical
/// to the same row in the batch).
pub(crate) fn check_row_independence(
    s: &dyn Sampler,
    vocab: usize,
    cases: &[Case],
    singles: &[usize],
) {
    check(s, vocab, cases, false, "mixed");
    let a = s.run(vocab, cases);
    let b = s.run(vocab, cases);
    assert_eq!(a, b, "two runs of one batch differ");
    for &i in singles {
        let single = s.run(vocab, &cases[i..i + 1]);
        assert_eq!(
            single[0], a[i],
            "row {i} alone differs from row {i} in the batch"
        );
    }
}

#[test]
fn mixed_batches_are_row_independent_and_deterministic() {
    let Some(gpu) = common::gpu() else { return };
    let vocab = 49152;
    check_row_independence(&gpu, vocab, &mixed_cases(vocab, 64), &[0, 17, 63]);
}

#[test]
fn a_large_batch_matches_cpu() {
    let Some(gpu) = common::gpu() else { return };
    let vocab = 151936;
    let cases = truncation_cases(vocab, 300, 11, false);
    check(&gpu, vocab, &cases, false, "large batch");
}

#[test]
fn bad_requests_are_errors() {
    let Some(gpu) = common::gpu() else { return };
    let vocab = 5000;
    let dev = gpu.upload(&lm_logits(vocab, 1), "logits").expect("upload");
    let p = SamplingParams {
        top_logprobs: MAX_TOP_LOGPROBS + 1,
        ..params(0, 1.0)
    };
    let row = [SampleRow {
        params: &p,
        history: &[],
        step: 0,
    }];
    assert!(
        gpu_sample(&gpu, &dev, vocab, &row).is_err(),
        "too many top logprobs"
    );
    let ok = params(0, 1.0);
    let two = [SampleRow {
        params: &ok,
        history: &[],
        step: 0,
    }; 2];
    assert!(
        gpu_sample(&gpu, &dev, vocab, &two).is_err(),
        "logits too short"
    );
    assert!(gpu_sample(&gpu, &dev, vocab, &[])
        .expect("no rows")
        .is_empty());
    let empty = gpu_sample(&gpu, &dev, 0, &two).expect("empty vocabulary");
    assert!(empty
        .iter()
        .all(|o| o.token == 0 && o.logprob == f32::NEG_INFINITY));
}
