//! Exact merge of partial attention results by their log-sum-exp.
//!
//! Attention of one query over a set of keys split into disjoint parts `i` gives per part a
//! normalised output `o_i = Σ_j softmax_i(s)_j v_j` and `lse_i = ln Σ_j e^{s_j}` (natural log,
//! scores already scaled). The attention over the union is
//! `o = Σ_i e^{lse_i − lse} o_i` with `lse = ln Σ_i e^{lse_i}`. A part with no keys has
//! `lse = −∞` (and any `o`): it drops out. A CUDA kernel that keeps `log2` LSEs must convert
//! (`lse = lse2 · ln 2`) before it mixes with these.

/// Merges the state `(o2, lse2)` into `(o1, lse1)`.
pub fn merge_state(o1: &mut [f32], lse1: &mut f32, o2: &[f32], lse2: f32) {
    debug_assert_eq!(o1.len(), o2.len());
    if lse2 == f32::NEG_INFINITY {
        return;
    }
    if *lse1 == f32::NEG_INFINITY {
        o1.copy_from_slice(o2);
        *lse1 = lse2;
        return;
    }
    let m = lse1.max(lse2);
    let (w1, w2) = ((*lse1 - m).exp(), (lse2 - m).exp());
    let s = w1 + w2;
    let (a, b) = (w1 / s, w2 / s);
    for (x, &y) in o1.iter_mut().zip(o2) {
        *x = a * *x + b * y;
    }
    *lse1 = m + s.ln();
}

/// Writes the merge of `parts` (`(o_i, lse_i)`, each `o_i` as long as `out`) into `out` and
/// returns the merged LSE; no parts, or only empty ones, give zeros and −∞ (as attention over
/// no keys does). One part is copied unchanged.
pub fn merge_states<'a, I>(parts: I, out: &mut [f32]) -> f32
where
    I: Iterator<Item = (&'a [f32], f32)> + Clone,
{
    let m = parts
        .clone()
        .map(|(_, l)| l)
        .fold(f32::NEG_INFINITY, f32::max);
    if m == f32::NEG_INFINITY {
        out.fill(0.0);
        return m;
    }
    let mut live = parts.filter(|&(_, l)| l != f32::NEG_INFINITY);
    let mut s = 0.0f32;
    let mut first = true;
    for (o, l) in &mut live {
        let w = (l - m).exp();
        s += w;
        if first {
            out.iter_mut().zip(o).for_each(|(a, &b)| *a = w * b);
            first = false;
        } else {
            out.iter_mut().zip(o).for_each(|(a, &b)| *a += w * b);
        }
    }
    let inv = 1.0 / s;
    out.iter_mut().for_each(|a| *a *= inv);
    m + s.ln()
}
