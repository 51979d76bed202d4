//! Rotary position embeddings in both layouts, with the frequency scalings models use.

/// Which dimensions form a rotated pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeLayout {
    /// Pairs (i, i + rot_dim/2): HF llama-family safetensors, GGUF qwen2 ("rotate half").
    Neox,
    /// Pairs (2i, 2i + 1): GGUF llama weights, which llama.cpp's converter permutes.
    Interleaved,
}

/// How base frequencies are rescaled for long contexts.
#[derive(Clone, Debug, PartialEq, Default)]
pub enum RopeScaling {
    #[default]
    None,
    /// Positions divided by `factor`.
    Linear { factor: f32 },
    /// Llama 3's piecewise scaling of low frequencies.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position: usize,
    },
    /// Explicit per-pair divisors (GGUF `rope_freqs.weight`).
    Factors(Vec<f32>),
}

/// Precomputed inverse frequencies for one model.
#[derive(Clone, Debug)]
pub struct RopeTable {
    /// Which dimensions pair up.
    pub layout: RopeLayout,
    /// Rotated dimensions per head (≤ head_dim; the rest pass through).
    pub rot_dim: usize,
    inv_freq: Vec<f32>,
}

impl RopeTable {
    /// The table for `rot_dim` rotated dimensions per head (pairs `i < rot_dim / 2`) with
    /// inverse frequencies `base^(−2i / rot_dim)`, rescaled by `scaling` as HF transformers'
    /// `rope_scaling` does (`Llama3` follows `_compute_llama3_parameters`).
    pub fn new(layout: RopeLayout, rot_dim: usize, base: f32, scaling: &RopeScaling) -> Self {
        let half = rot_dim / 2;
        let mut inv_freq: Vec<f32> = (0..half)
            .map(|i| (1.0 / (base as f64).powf(2.0 * i as f64 / rot_dim as f64)) as f32)
            .collect();
        match scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => inv_freq.iter_mut().for_each(|f| *f /= factor),
            RopeScaling::Factors(fs) => {
                for (f, s) in inv_freq.iter_mut().zip(fs) {
                    *f /= s;
                }
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position,
            } => {
                let old = *original_max_position as f32;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    if wavelen > low_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_wavelen {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
        }
        RopeTable {
            layout,
            rot_dim,
            inv_freq,
        }
    }

    /// The inverse frequency of each rotated pair, after scaling (`rot_dim / 2` values).
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// Rotates each head of each row of `x` (`rows × n_heads × head_dim`) by its row's position
    /// (`positions[r]` for row `r`; rows without a position are left as they are). Pair `i` of
    /// a head turns by the angle `position · inv_freq[i]`, computed in f64. Dimensions from
    /// `rot_dim` on pass through; a `rot_dim` above `head_dim` rotates only the pairs that fit.
    pub fn apply(&self, x: &mut [f32], positions: &[usize], n_heads: usize, head_dim: usize) {
        let row_len = n_heads * head_dim;
        if row_len == 0 {
            return;
        }
        let half = self.rot_dim.min(head_dim) / 2;
        let mut cos = vec![0.0f32; half];
        let mut sin = vec![0.0f32; half];
        for (row, &pos) in x.chunks_mut(row_len).zip(positions) {
            for i in 0..half {
                let (s, c) = (pos as f64 * self.inv_freq[i] as f64).sin_cos();
                cos[i] = c as f32;
                sin[i] = s as f32;
            }
            for head in row.chunks_exact_mut(head_dim) {
                match self.layout {
                    RopeLayout::Neox => {
                        let (lo, hi) = head[..2 * half].split_at_mut(half);
                        rotate(lo, hi, &cos, &sin);
                    }
                    RopeLayout::Interleaved => {
                        for ((pair, &c), &s) in
                            head[..2 * half].chunks_exact_mut(2).zip(&cos).zip(&sin)
                        {
                            let (x0, x1) = (pair[0], pair[1]);
                            pair[0] = x0 * c - x1 * s;
                            pair[1] = x0 * s + x1 * c;
                        }
                    }
                }
            }
        }
    }
}

/// Rotates each pair `(a[i], b[i])` by the angle whose cosine and sine are `cos[i]`, `sin[i]`.
fn rotate(a: &mut [f32], b: &mut [f32], cos: &[f32], sin: &[f32]) {
    for (((x0, x1), &c), &s) in a.iter_mut().zip(b.iter_mut()).zip(cos).zip(sin) {
        let (u, v) = (*x0, *x1);
        *x0 = u * c - v * s;
        *x1 = u * s + v * c;
    }
}
