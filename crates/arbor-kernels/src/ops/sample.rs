//! Sampling of one token per row, with per-row parameters.
//!
//! Processing order (each step sees the previous one's output):
//! 1. penalties on the tokens of `history`: the repetition penalty (HF / llama.cpp style:
//!    a positive logit is divided by it, a negative one multiplied), then OpenAI's presence
//!    and frequency penalties (`logit -= presence · [count > 0] + frequency · count`);
//! 2. temperature: `temperature ≤ 0` (or NaN) means greedy argmax;
//! 3. top-k: keep the `top_k` largest logits (tokens tied with the k-th are kept, as in HF);
//! 4. top-p: keep the smallest most-likely set whose probability, renormalised after top-k,
//!    reaches `top_p` (never fewer than one token);
//! 5. min-p: keep tokens with `p ≥ min_p · p_max`;
//! 6. draw from the kept tokens in proportion to their probability.
//!
//! Reproducibility: the draw takes one uniform number `u` from [`sample_uniform`]`(seed, step)`,
//! a counter-based hash, and returns the first kept token, in ascending token id, at which the
//! running sum of kept weights exceeds `u ·` their total. A row's token is therefore a pure
//! function of its logits, parameters, history, seed and step, whatever else is in the batch;
//! the GPU sampler uses the same scheme.
//!
//! Cost: a few vectorised passes over the vocabulary and no sort of it (top-k and top-logprobs
//! use a bounded heap, top-p a weight histogram); buffers are reused per thread.
//!
//! Reported numbers (`logprob`, `top_logprobs`, `entropy`) describe the model's raw
//! distribution, `log_softmax` of the unprocessed logits, as OpenAI's API reports them, not
//! the penalised, tempered or truncated distribution the token was drawn from.
//!
//! Non-finite logits: NaN is treated as −∞; −∞ tokens are never drawn and have logprob −∞.
//! `+∞` logits share all the probability equally.

mod penalties;
mod truncate;

use super::softmax::{exp_nonpos, lane_max, lane_sum, lane_sum2, with_wide_vectors};
use penalties::apply_penalties;
use rayon::prelude::*;
use std::cell::RefCell;
use truncate::{keep_cut, top_n, TruncateScratch};

/// Per-row sampling parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; 0 (or less, or NaN) means greedy.
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens; 0 disables top-k, 1 is greedy.
    pub top_k: usize,
    /// Nucleus mass to keep; 1.0 (or more, or NaN) disables top-p.
    pub top_p: f32,
    /// Keep tokens with `p ≥ min_p · p_max`; 0.0 (or NaN) disables min-p; values above 1 act as 1.
    pub min_p: f32,
    /// Divides positive / multiplies negative logits of tokens seen in `history`. 1.0 disables
    /// it; a value that is not finite and positive is ignored.
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token seen in `history` (OpenAI style).
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per occurrence in `history` (OpenAI style).
    pub frequency_penalty: f32,
    /// Seed of the row's random stream; the draw at `step` is [`sample_uniform`]`(seed, step)`.
    pub seed: u64,
    /// How many of the most likely tokens (of the raw distribution) to report with logprobs.
    pub top_logprobs: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
            top_logprobs: 0,
        }
    }
}

/// What sampling one row produced. All numbers describe the model's raw distribution
/// (log-softmax of the logits before penalties, temperature and truncation).
#[derive(Clone, Debug, PartialEq)]
pub struct SampleOutput {
    /// The token drawn. 0 when no token has a logit above −∞ (or the row is empty).
    pub token: u32,
    /// Natural-log probability of `token` under the raw distribution.
    pub logprob: f32,
    /// The `top_logprobs` most likely tokens of the raw distribution with their logprobs,
    /// most likely first (ties: lower token id first); shorter only when the vocabulary is.
    pub top_logprobs: Vec<(u32, f32)>,
    /// Entropy of the raw distribution, in nats.
    pub entropy: f32,
}

/// The uniform number in `[0, 1)` that the draw of `step` uses for a row seeded with `seed`:
/// splitmix64 applied to `splitmix64(seed) ^ step`, top 53 bits. Counter-based, so any step
/// can be computed independently (on the CPU or in a GPU kernel).
pub fn sample_uniform(seed: u64, step: u64) -> f64 {
    let h = splitmix64(splitmix64(seed) ^ step);
    (h >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Samples one token from `logits` (see the module documentation for the processing order
/// and what the outputs mean). `history` holds the tokens the penalties look at (ids outside
/// the vocabulary are ignored); `step` selects the draw of the row's random stream.
pub fn sample(logits: &[f32], params: &SamplingParams, history: &[u32], step: u64) -> SampleOutput {
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut s) => sample_with(&mut s, logits, params, history, step),
        Err(_) => sample_with(&mut Scratch::default(), logits, params, history, step),
    })
}

/// Samples every row of `logits` (`rows.len() × vocab`, row-major) in parallel. Row `i` uses
/// `rows[i] = (params, history, step)`; its result equals `sample` on that row alone. A row
/// that `logits` does not fully cover is sampled as an empty row.
pub fn sample_batch(
    logits: &[f32],
    vocab: usize,
    rows: &[(&SamplingParams, &[u32], u64)],
) -> Vec<SampleOutput> {
    rows.par_iter()
        .enumerate()
        .map(|(i, &(params, history, step))| {
            let row = i
                .checked_mul(vocab)
                .and_then(|a| logits.get(a..a.checked_add(vocab)?))
                .unwrap_or(&[]);
            sample(row, params, history, step)
        })
        .collect()
}

/// The tokens `sample` can return for this row, ascending: those left after penalties,
/// temperature (greedy keeps only the argmax), top-k, top-p and min-p. The reference for the
/// GPU sampler's truncation and for tests.
pub fn sampling_candidates(logits: &[f32], params: &SamplingParams, history: &[u32]) -> Vec<u32> {
    let mut s = Scratch::default();
    s.logits.extend(logits.iter().map(|&v| clean(v)));
    let raw_max = lane_max(&s.logits);
    if raw_max == f32::NEG_INFINITY {
        return vec![];
    }
    let raw_argmax = argmax(&s.logits, raw_max);
    apply_penalties(&mut s.logits, &mut s.counts, params, history);
    let zmax = lane_max(&s.logits);
    if zmax == f32::NEG_INFINITY {
        return vec![raw_argmax as u32];
    }
    if is_greedy(params) {
        return vec![argmax(&s.logits, zmax) as u32];
    }
    fill_weights(&mut s.weights, &s.logits, zmax, 1.0 / params.temperature);
    let cut = keep_cut(&s.logits, &s.weights, &mut s.truncate, params, zmax);
    (0..s.logits.len())
        .filter(|&i| s.logits[i] > f32::NEG_INFINITY && s.logits[i] >= cut)
        .map(|i| i as u32)
        .collect()
}

/// Applies the repetition, presence and frequency penalties of `params` for the tokens of
/// `history` to `logits` in place (ids outside `logits` are ignored), exactly as `sample`
/// does before temperature. Results are cleaned as `sample` cleans logits: NaN becomes −∞ and
/// +∞ becomes `f32::MAX`.
pub fn apply_sampling_penalties(logits: &mut [f32], params: &SamplingParams, history: &[u32]) {
    apply_penalties(logits, &mut Vec::new(), params, history);
}

/// Greedy when the temperature is not positive (or NaN), when top-k is 1, or when the
/// temperature is so small that its inverse overflows.
fn is_greedy(p: &SamplingParams) -> bool {
    p.temperature.is_nan()
        || p.temperature <= 0.0
        || p.top_k == 1
        || !(1.0 / p.temperature).is_finite()
}

/// Buffers reused across calls on one thread (a decode step would otherwise allocate several
/// vocabulary-sized buffers per row).
#[derive(Default)]
struct Scratch {
    /// Cleaned, then penalised logits.
    logits: Vec<f32>,
    /// Draw weights `exp((logit − max) / temperature)`, later masked to the kept tokens.
    weights: Vec<f32>,
    /// Occurrence counts of history tokens; all zero between calls.
    counts: Vec<u32>,
    /// Sums of `weights` per block of `WALK_BLOCK` tokens.
    block_sums: Vec<f64>,
    truncate: TruncateScratch,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// NaN → −∞; +∞ → f32::MAX, so that +∞ tokens share the mass instead of producing NaN.
#[inline(always)]
fn clean(v: f32) -> f32 {
    if v.is_nan() {
        f32::NEG_INFINITY
    } else {
        v.min(f32::MAX)
    }
}

fn sample_with(
    s: &mut Scratch,
    logits: &[f32],
    params: &SamplingParams,
    history: &[u32],
    step: u64,
) -> SampleOutput {
    s.logits.clear();
    s.logits.extend(logits.iter().map(|&v| clean(v)));

    let raw = RawStats::of(&s.logits, &mut s.weights);
    if raw.max == f32::NEG_INFINITY {
        return SampleOutput {
            token: 0,
            logprob: f32::NEG_INFINITY,
            top_logprobs: vec![],
            entropy: 0.0,
        };
    }
    let top_logprobs = top_n(&s.logits, params.top_logprobs)
        .into_iter()
        .map(|(v, i)| (i, raw.logprob(v)))
        .collect();

    let penalised = apply_penalties(&mut s.logits, &mut s.counts, params, history);
    let zmax = if penalised {
        lane_max(&s.logits)
    } else {
        raw.max
    };
    // `s.weights` holds exp(logit − max) of the unpenalised logits: the draw's weights
    // themselves when nothing changed the logits and the temperature is 1.
    let weights_ready = !penalised && params.temperature == 1.0;
    let token = if zmax == f32::NEG_INFINITY {
        // Penalties pushed every token to −∞: fall back to the raw argmax.
        raw.argmax
    } else if is_greedy(params) {
        argmax(&s.logits, zmax)
    } else {
        draw(
            s,
            params,
            zmax,
            sample_uniform(params.seed, step),
            weights_ready,
        )
    };
    SampleOutput {
        token: token as u32,
        logprob: raw.logprob(clean(logits[token])),
        top_logprobs,
        entropy: raw.entropy,
    }
}

/// Max, argmax, normaliser and entropy of the raw (cleaned) logits.
struct RawStats {
    max: f32,
    argmax: usize,
    /// ln Σ exp(x − max); kept apart from `max` so that logprobs near `f32::MAX` keep it.
    ln_s: f64,
    entropy: f32,
}

impl RawStats {
    /// The statistics of `x`; leaves `e_i = exp(x_i − max)` in `e` (empty if `x` has no
    /// finite maximum).
    fn of(x: &[f32], e: &mut Vec<f32>) -> Self {
        e.clear();
        let max = lane_max(x);
        if max == f32::NEG_INFINITY {
            return RawStats {
                max,
                argmax: 0,
                ln_s: f64::INFINITY,
                entropy: 0.0,
            };
        }
        // With e_i = exp(x_i − max), s = Σ e_i and t = Σ e_i (x_i − max):
        // ln Z = max + ln s and H = −Σ p_i ln p_i = ln s − t / s.
        e.resize(x.len(), 0.0);
        let (s, t) = with_wide_vectors(
            #[inline(always)]
            || {
                for (ei, &v) in e.iter_mut().zip(x) {
                    *ei = exp_nonpos(v - max);
                }
                // e = 0 below −87; the clamp keeps 0 · (−∞) from making NaN.
                lane_sum2(e, x, |ei, v| (ei, ei * (v - max).max(-88.0)))
            },
        );
        let ln_s = s.ln();
        RawStats {
            max,
            argmax: argmax(x, max),
            ln_s,
            entropy: (ln_s - t / s).max(0.0) as f32,
        }
    }

    /// log-softmax of the cleaned logit `v`.
    fn logprob(&self, v: f32) -> f32 {
        ((v as f64 - self.max as f64) - self.ln_s) as f32
    }
}

/// Index of the first element equal to `max` (0 if none). Whole runs of 64 are tested with a
/// branch-free loop that vectorises; only the run holding `max` is searched element by element.
fn argmax(x: &[f32], max: f32) -> usize {
    const RUN: usize = 64;
    for (r, run) in x.chunks(RUN).enumerate() {
        if run.iter().fold(false, |hit, &v| hit | (v == max)) {
            return r * RUN + run.iter().position(|&v| v == max).unwrap_or(0);
        }
    }
    0
}

/// `weights[i] = exp((logits[i] − zmax) · inv_t)`.
fn fill_weights(weights: &mut Vec<f32>, logits: &[f32], zmax: f32, inv_t: f32) {
    weights.resize(logits.len(), 0.0);
    with_wide_vectors(
        #[inline(always)]
        || {
            for (w, &v) in weights.iter_mut().zip(logits) {
                *w = exp_nonpos((v - zmax) * inv_t);
            }
        },
    );
}

/// Tokens per block of the draw's walk: the block holding the target is found from block
/// sums, then walked token by token.
const WALK_BLOCK: usize = 1024;

/// Draws a token from those `keep_cut` keeps, in proportion to their tempered probability.
/// `s.logits` holds the penalised logits, with maximum `zmax > −∞`.
/// `weights_ready`: `s.weights` already holds `exp((logit − zmax) / temperature)`.
fn draw(s: &mut Scratch, p: &SamplingParams, zmax: f32, u: f64, weights_ready: bool) -> usize {
    if !weights_ready {
        fill_weights(&mut s.weights, &s.logits, zmax, 1.0 / p.temperature);
    }
    let cut = keep_cut(&s.logits, &s.weights, &mut s.truncate, p, zmax);
    s.block_sums.clear();
    with_wide_vectors(
        #[inline(always)]
        || {
            if cut > f32::NEG_INFINITY {
                for (w, &v) in s.weights.iter_mut().zip(&s.logits) {
                    *w = if v >= cut { *w } else { 0.0 };
                }
            }
            for block in s.weights.chunks(WALK_BLOCK) {
                s.block_sums.push(lane_sum(block, |w| w));
            }
        },
    );
    let target = u * s.block_sums.iter().sum::<f64>();

    let mut acc = 0.0f64;
    let mut last = None;
    for (b, &m) in s.block_sums.iter().enumerate() {
        if m > 0.0 && acc + m > target {
            let start = b * WALK_BLOCK;
            for (i, &w) in s.weights[start..].iter().take(WALK_BLOCK).enumerate() {
                if w > 0.0 {
                    acc += w as f64;
                    last = Some(start + i);
                    if acc > target {
                        return start + i;
                    }
                }
            }
            // Rounding: the walk fell short of the block's sum; take its last kept token.
            break;
        }
        acc += m;
        if m > 0.0 {
            last = s.weights[b * WALK_BLOCK..]
                .iter()
                .take(WALK_BLOCK)
                .rposition(|&w| w > 0.0)
                .map(|i| b * WALK_BLOCK + i);
        }
    }
    // The maximum always has weight 1, so some token is kept.
    last.unwrap_or_else(|| argmax(&s.logits, zmax))
}
