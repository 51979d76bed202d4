//! Repetition, presence and frequency penalties on the tokens a row has seen.

use super::{clean, SamplingParams};

/// Applies the penalties of `p` for the tokens of `history` to `logits`: for each distinct
/// token seen `n > 0` times, the repetition penalty (a positive logit divided by it, a
/// negative one multiplied) and then `presence + frequency · n` subtracted. Ids outside
/// `logits` are ignored, −∞ logits stay −∞, and non-finite parameters (or a repetition
/// penalty ≤ 0) count as disabled. Returns whether any logit may have changed.
///
/// `counts` is scratch, grown to the vocabulary and left all zero: one pass counts, a second
/// applies each token once and clears its count, so no pass touches the whole vocabulary.
pub(super) fn apply_penalties(
    logits: &mut [f32],
    counts: &mut Vec<u32>,
    p: &SamplingParams,
    history: &[u32],
) -> bool {
    let finite_or = |v: f32, default: f32| if v.is_finite() { v } else { default };
    let rep = if p.repetition_penalty > 0.0 {
        finite_or(p.repetition_penalty, 1.0)
    } else {
        1.0
    };
    let presence = finite_or(p.presence_penalty, 0.0);
    let frequency = finite_or(p.frequency_penalty, 0.0);
    if history.is_empty() || (rep == 1.0 && presence == 0.0 && frequency == 0.0) {
        return false;
    }
    let vocab = logits.len();
    if counts.len() < vocab {
        counts.resize(vocab, 0);
    }
    for &t in history {
        if (t as usize) < vocab {
            counts[t as usize] = counts[t as usize].saturating_add(1);
        }
    }
    for &t in history {
        let t = t as usize;
        if t >= vocab || counts[t] == 0 {
            continue;
        }
        let n = std::mem::take(&mut counts[t]);
        let l = logits[t];
        if l == f32::NEG_INFINITY {
            continue;
        }
        let l = if l > 0.0 { l / rep } else { l * rep };
        logits[t] = clean(l - (presence + frequency * n as f32));
    }
    true
}
