//! Sampling on the GPU: [`sample`] runs `kernels/sample.cu`, one block per row, with the
//! semantics of the CPU sampler [`crate::ops::sample`] (same processing order, draw rule,
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

/// One row of a batched [`sample`] call: what [`crate::ops::sample`] takes for that row.
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

/// Samples one token per row of `logits` (`rows.len() × vocab`, row-major; a longer buffer
/// is fine) with row `i` using `rows[i]`; returns what [`crate::ops::sample`] returns for
/// each row. Errors: `logits` too short, a vocabulary of 2^32 or more, or a row asking for
/// more than [`MAX_TOP_LOGPROBS`] top logprobs (after clamping to the vocabulary).
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
    let vocab32 = u32::try_from(vocab).map_err(|_| too_big("the vocabulary"))?;
    let grid = u32::try_from(rows.len()).map_err(|_| too_big("the number of rows"))?;

    let mut params = Vec::with_capacity(rows.len());
    let (mut tokens, mut counts) = (Vec::new(), Vec::new());
    let (mut top_total, mut scratch_rows) = (0usize, 0u32);
    for (i, row) in rows.iter().enumerate() {
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
            top_off: u32::try_from(top_total).map_err(|_| too_big("the top-logprob total"))?,
            ..RowParams::default()
        };
        top_total += top_n;
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
            let start = tokens.len();
            push_counts(row.history, vocab, &mut tokens, &mut counts);
            // A history with no token in the vocabulary changes nothing.
            if tokens.len() > start {
                rp.flags |= FLAG_PENALTIES;
                (rp.rep, rp.presence, rp.frequency) = (rep, presence, frequency);
                rp.hist_start = u32::try_from(start).map_err(|_| too_big("the history"))?;
                rp.hist_len = (tokens.len() - start) as u32;
                rp.scratch_row = scratch_rows;
                scratch_rows += 1;
            }
        }
        params.push(rp);
    }
    if tokens.len() > u32::MAX as usize {
        return Err(too_big("the history"));
    }

    let params_dev = gpu.upload(&params, "sampling parameters")?;
    let tokens_dev = gpu.upload(&tokens, "penalty histories")?;
    let counts_dev = gpu.upload(&counts, "penalty counts")?;
    let mut scratch = gpu.zeros::<f32>(scratch_rows as usize * vocab, "penalised logits")?;
    let out_len = rows.len() * 4 + top_total * 2;
    let mut out = gpu.zeros::<u32>(out_len, "sampling outputs")?;
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
    let cfg = LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: argument types and order match `sample_rows`; every buffer is at least as long
    // as the kernel indexes it (rows × vocab logits, scratch_rows × vocab scratch, 4 words per
    // row plus 2 per top-logprob slot of output).
    unsafe { launch.launch(cfg) }.map_err(|e| GpuError::driver("launching sample_rows", e))?;
    let host = gpu.download(&out, "sampling outputs")?;
    Ok(unpack(&host, &params))
}

/// Reads the kernel's output: 4 words per row (token, logprob, entropy, top count), then 2
/// per top-logprob slot (token, logprob).
fn unpack(host: &[u32], params: &[RowParams]) -> Vec<SampleOutput> {
    let tops = host.get(params.len() * 4..).unwrap_or(&[]);
    params
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let o = &host[i * 4..i * 4 + 4];
            let count = (o[3] as usize).min(p.top_n as usize);
            let off = p.top_off as usize;
            let top_logprobs = (off..off + count)
                .filter_map(|s| tops.get(2 * s..2 * s + 2))
                .map(|w| (w[0], f32::from_bits(w[1])))
                .collect();
            SampleOutput {
                token: o[0],
                logprob: f32::from_bits(o[1]),
                top_logprobs,
                entropy: f32::from_bits(o[2]),
            }
        })
        .collect()
}
