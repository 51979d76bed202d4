//! Sampling on the GPU: [`sample`] runs `kernels/sample.cu`, one block per row, with the
//! semantics of the CPU sampler [`crate::ops::sample()`] (same processing order, draw rule,
//! uniform numbers and reported statistics; see its module documentation). For identical
//! logits a row draws the same token as the CPU except in the rare case where the draw's
//! target falls within float rounding of a boundary between two tokens; outputs are
//! deterministic (no order-dependent float atomics).
//!
//! The host prepares each row: its uniform number `sample_uniform(seed, step)`, the cleaned
//! parameters (greedy, top-k and top-p switched off where the CPU ignores them) and, for
//! penalties, the history as sorted (token, count) pairs with ids outside the vocabulary
//! dropped. The passes over the vocabulary are listed at the top of the kernel file.

use super::super::{Gpu, GpuError, LaunchConfig};
use crate::ops::sample::{sample_uniform, SampleOutput, SamplingParams};
use cudarc::driver::{CudaSlice, DeviceRepr, PushKernelArg};

/// The most top logprobs one row may ask for (after clamping to the vocabulary); more is an
/// error. Bounded by the kernel's shared-memory buffer (`MAX_TOP_LOGPROBS` in sample.cu).
pub const MAX_TOP_LOGPROBS: usize = 1024;

/// Threads per block (one block per row); `SAMPLE_THREADS` in sample.cu.
const THREADS: u32 = 1024;

/// One row of a batched [`sample`] call: what [`crate::ops::sample()`] takes for that row.
#[derive(Clone, Copy, Debug)]
pub struct SampleRow<'a> {
    /// The row's sampling parameters.
    pub params: &'a SamplingParams,
    /// Tokens the penalties look at (ids outside the vocabulary are ignored).
    pub history: &'a [u32],
    /// Selects the draw of the row's random stream.
    pub step: u64,
}

/// `RowParams` of sample.cu, field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct RowParams {
    u: f64,
    top_p: f64,
    ln_min_p: f64,
    temperature: f64,
    inv_t: f32,
    rep: f32,
    presence: f32,
    frequency: f32,
    top_k: u32,
    top_n: u32,
    top_off: u32,
    hist_start: u32,
    hist_len: u32,
    scratch_row: u32,
    flags: u32,
    pad: u32,
}
const _: () = assert!(std::mem::size_of::<RowParams>() == 80);

// SAFETY: plain old data with the C layout the kernel reads.
unsafe impl DeviceRepr for RowParams {}

const FLAG_GREEDY: u32 = 1;
const FLAG_PENALTIES: u32 = 2;
const FLAG_TOP_P: u32 = 4;
const FLAG_MIN_P: u32 = 8;

/// Greedy exactly when the CPU sampler is: temperature not positive (or NaN), top-k 1, or a
/// temperature whose inverse overflows.
fn is_greedy(p: &SamplingParams) -> bool {
    p.temperature.is_nan()
        || p.temperature <= 0.0
        || p.top_k == 1
        || !(1.0 / p.temperature).is_finite()
}

/// Penalty values as the CPU applies them: non-finite values (or a repetition penalty ≤ 0)
/// are off. `None` when no penalty is active.
fn penalties(p: &SamplingParams) -> Option<(f32, f32, f32)> {
    let finite_or = |v: f32, d: f32| if v.is_finite() { v } else { d };
    let rep = if p.repetition_penalty > 0.0 {
        finite_or(p.repetition_penalty, 1.0)
    } else {
        1.0
    };
    let presence = finite_or(p.presence_penalty, 0.0);
    let frequency = finite_or(p.frequency_penalty, 0.0);
    (rep != 1.0 || presence != 0.0 || frequency != 0.0).then_some((rep, presence, frequency))
}

/// Appends the distinct in-vocabulary tokens of `history` with their counts, ascending.
fn push_counts(history: &[u32], vocab: usize, tokens: &mut Vec<u32>, counts: &mut Vec<u32>) {
    let mut sorted: Vec<u32> = history
        .iter()
        .copied()
        .filter(|&t| (t as usize) < vocab)
        .collect();
    sorted.sort_unstable();
    for run in sorted.chunk_by(|a, b| a == b) {
        tokens.push(run[0]);
        counts.push(u32::try_from(run.len()).unwrap_or(u32::MAX));
    }
}

fn too_big(what: &str) -> GpuError {
    GpuError::Invalid(format!(
        "sample: {what} does not fit the kernel's 32-bit indices"
    ))
}

/// The host half of a [`sample`] call: every row's kernel parameters and the penalty
/// histories, ready to upload, and the reader of the kernel's output words. [`sample`] uploads
/// and launches it; it is public so that another executor of sample.cu (the CPU emulator
/// test) runs the kernel on exactly the inputs the GPU gets.
#[derive(Clone, Debug)]
pub struct SamplePlan {
    params: Vec<RowParams>,
    hist_tokens: Vec<u32>,
    hist_counts: Vec<u32>,
    scratch_rows: usize,
    top_total: usize,
}

impl SamplePlan {
    /// Prepares `rows` for a vocabulary of `vocab` (≥ 1) logits per row. Errors: a
    /// vocabulary, row count or history of 2^32 or more, or a row asking for more than
    /// [`MAX_TOP_LOGPROBS`] top logprobs (after clamping to the vocabulary).
    pub fn new(vocab: usize, rows: &[SampleRow]) -> Result<Self, GpuError> {
        u32::try_from(vocab).map_err(|_| too_big("the vocabulary"))?;
        u32::try_from(rows.len()).map_err(|_| too_big("the number of rows"))?;
        let mut plan = SamplePlan {
            params: Vec::with_capacity(rows.len()),
            hist_tokens: Vec::new(),
            hist_counts: Vec::new(),
            scratch_rows: 0,
            top_total: 0,
        };
        for (i, row) in rows.iter().enumerate() {
            let rp = plan.row(i, row, vocab)?;
            plan.params.push(rp);
        }
        if plan.hist_tokens.len() > u32::MAX as usize {
            return Err(too_big("the history"));
        }
        Ok(plan)
    }

    /// Row `i`'s parameters; appends its history and claims its top-logprob slots.
    fn row(&mut self, i: usize, row: &SampleRow, vocab: usize) -> Result<RowParams, GpuError> {
        let p = row.params;
        let top_n = p.top_logprobs.min(vocab);
        if top_n > MAX_TOP_LOGPROBS {
            return Err(GpuError::Invalid(format!(
                "sample: row {i} asks for {top_n} top logprobs; at most {MAX_TOP_LOGPROBS} are supported"
            )));
        }
        let mut rp = RowParams {
            u: sample_uniform(p.seed, row.step),
            temperature: p.temperature as f64,
            inv_t: 1.0 / p.temperature,
            rep: 1.0,
            top_n: top_n as u32,
            top_off: u32::try_from(self.top_total).map_err(|_| too_big("the top-logprob total"))?,
            ..RowParams::default()
        };
        self.top_total += top_n;
        if is_greedy(p) {
            rp.flags |= FLAG_GREEDY;
        }
        if p.top_k > 0 && p.top_k < vocab {
            rp.top_k = p.top_k as u32;
        }
        if p.top_p < 1.0 {
            rp.flags |= FLAG_TOP_P;
            rp.top_p = p.top_p.max(0.0) as f64;
        }
        if p.min_p > 0.0 {
            rp.flags |= FLAG_MIN_P;
            rp.ln_min_p = (p.min_p.min(1.0) as f64).ln();
        }
        if let Some((rep, presence, frequency)) = penalties(p) {
            let start = self.hist_tokens.len();
            push_counts(
                row.history,
                vocab,
                &mut self.hist_tokens,
                &mut self.hist_counts,
            );
            // A history with no token in the vocabulary changes nothing.
            if self.hist_tokens.len() > start {
                rp.flags |= FLAG_PENALTIES;
                (rp.rep, rp.presence, rp.frequency) = (rep, presence, frequency);
                rp.hist_start = u32::try_from(start).map_err(|_| too_big("the history"))?;
                rp.hist_len = (self.hist_tokens.len() - start) as u32;
                rp.scratch_row = self.scratch_rows as u32;
                self.scratch_rows += 1;
            }
        }
        Ok(rp)
    }

    /// The kernel's `params` argument: one 80-byte `RowParams` per row, little-endian.
    pub fn params_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.params.len() * 80);
        for p in &self.params {
            for v in [p.u, p.top_p, p.ln_min_p, p.temperature] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            for v in [p.inv_t, p.rep, p.presence, p.frequency] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            let words = [
                p.top_k,
                p.top_n,
                p.top_off,
                p.hist_start,
                p.hist_len,
                p.scratch_row,
                p.flags,
                p.pad,
            ];
            for v in words {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        out
    }

    /// The kernel's `hist_tok` and `hist_cnt` arguments: every penalised row's distinct
    /// history tokens, ascending, and their counts.
    pub fn history(&self) -> (&[u32], &[u32]) {
        (&self.hist_tokens, &self.hist_counts)
    }

    /// Length in floats of the kernel's `scratch` argument (penalised rows × vocabulary).
    pub fn scratch_len(&self, vocab: usize) -> usize {
        self.scratch_rows * vocab
    }

    /// Length in words of the kernel's `out` argument.
    pub fn out_len(&self) -> usize {
        self.params.len() * 4 + self.top_total * 2
    }

    /// Launch shape: (blocks, threads per block), one block of 1024 threads per row.
    pub fn grid_and_block(&self) -> (u32, u32) {
        (self.params.len() as u32, THREADS)
    }

    /// Reads the kernel's output (`out_len()` words): 4 per row (token, logprob, entropy, top
    /// count), then 2 per top-logprob slot (token, logprob).
    pub fn unpack(&self, words: &[u32]) -> Vec<SampleOutput> {
        unpack(words, &self.params)
    }
}

/// Samples one token per row of `logits` (`rows.len() × vocab`, row-major; a longer buffer
/// is fine) with row `i` using `rows[i]`; returns what [`crate::ops::sample()`] returns for
/// each row. Errors: `logits` too short, or what [`SamplePlan::new`] rejects.
pub fn sample(
    gpu: &Gpu,
    logits: &CudaSlice<f32>,
    vocab: usize,
    rows: &[SampleRow],
) -> Result<Vec<SampleOutput>, GpuError> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let needed = rows.len().checked_mul(vocab);
    if needed.is_none_or(|n| n > logits.len()) {
        return Err(GpuError::Invalid(format!(
            "sample: {} rows × vocabulary {vocab} need more than the {} logits given",
            rows.len(),
            logits.len()
        )));
    }
    if vocab == 0 {
        let empty = SampleOutput {
            token: 0,
            logprob: f32::NEG_INFINITY,
            top_logprobs: vec![],
            entropy: 0.0,
        };
        return Ok(vec![empty; rows.len()]);
    }
    let plan = SamplePlan::new(vocab, rows)?;
    let vocab32 = vocab as u32;
    let params_dev = gpu.upload(&plan.params, "sampling parameters")?;
    let tokens_dev = gpu.upload(&plan.hist_tokens, "penalty histories")?;
    let counts_dev = gpu.upload(&plan.hist_counts, "penalty counts")?;
    let mut scratch = gpu.zeros::<f32>(plan.scratch_len(vocab), "penalised logits")?;
    let mut out = gpu.zeros::<u32>(plan.out_len(), "sampling outputs")?;
    let f = gpu.func("sample", "sample_rows")?;
    let mut launch = gpu.stream().launch_builder(&f);
    launch
        .arg(logits)
        .arg(&vocab32)
        .arg(&params_dev)
        .arg(&tokens_dev)
        .arg(&counts_dev)
        .arg(&mut scratch)
        .arg(&mut out);
    let (grid, block) = plan.grid_and_block();
    let cfg = LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: argument types and order match `sample_rows`; every buffer is at least as long
    // as the kernel indexes it (rows × vocab logits, scratch_rows × vocab scratch, 4 words per
    // row plus 2 per top-logprob slot of output).
    unsafe { launch.launch(cfg) }.map_err(|e| GpuError::driver("launching sample_rows", e))?;
    let host = gpu.download(&out, "sampling outputs")?;
    Ok(plan.unpack(&host))
}

/// Reads the kernel's output: 4 words per row (token, logprob, entropy, top count), then 2
/// per top-logprob slot (token, logprob). Words missing from a short buffer read as zero.
fn unpack(host: &[u32], params: &[RowParams]) -> Vec<SampleOutput> {
    let word = |i: usize| host.get(i).copied().unwrap_or(0);
    let tops = host.get(params.len() * 4..).unwrap_or(&[]);
    params
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let count = (word(i * 4 + 3) as usize).min(p.top_n as usize);
            let off = p.top_off as usize;
            let top_logprobs = (off..off + count)
                .filter_map(|s| tops.get(2 * s..2 * s + 2))
                .map(|w| (w[0], f32::from_bits(w[1])))
                .collect();
            SampleOutput {
                token: word(i * 4),
                logprob: f32::from_bits(word(i * 4 + 1)),
                top_logprobs,
                entropy: f32::from_bits(word(i * 4 + 2)),
            }
        })
        .collect()
}
