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
    Llama3 { factor: f32, low_freq_factor: f32, high_freq_factor: f32, original_max_position: usize },
    /// Explicit per-pair divisors (GGUF `rope_freqs.weight`).
    Factors(Vec<f32>),
}

/// Precomputed inverse frequencies for one model.
#[derive(Clone, Debug)]
pub struct RopeTable {
    pub layout: RopeLayout,
    /// Rotated dimensions per head (≤ head_dim; the rest pass through).
    pub rot_dim: usize,
    inv_freq: Vec<f32>,
}

impl RopeTable {
    pub fn new(layout: RopeLayout, rot_dim: usize, base: f32, scaling: &RopeScaling) -> Self {
        let half = rot_dim / 2;
        let mut inv_freq: Vec<f32> =
            (0..half).map(|i| 1.0 / (base as f64).powf(2.0 * i as f64 / rot_dim as f64) as f32).collect();
        match scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => inv_freq.iter_mut().for_each(|f| *f /= factor),
            RopeScaling::Factors(fs) => {
                for (f, s) in inv_freq.iter_mut().zip(fs) {
                    *f /= s;
                }
            }
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position } => {
                let old = *original_max_position as f32;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    if wavelen > low_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_wavelen {
                        let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
        }
        RopeTable { layout, rot_dim, inv_freq }
    }

    /// Rotates each head of each row of `x` (`rows × n_heads × head_dim`) by its row's position.
    pub fn apply(&self, x: &mut [f32], positions: &[usize], n_heads: usize, head_dim: usize) {
        let half = self.rot_dim / 2;
        let mut cos = vec![0.0f32; half];
        let mut sin = vec![0.0f32; half];
        for (row, &pos) in x.chunks_mut(n_heads * head_dim).zip(positions) {
            for i in 0..half {
                let (s, c) = (pos as f64 * self.inv_freq[i] as f64).sin_cos();
                cos[i] = c as f32;
                sin[i] = s as f32;
            }
            for head in row.chunks_mut(head_dim) {
                for i in 0..half {
                    let (a, b) = match self.layout {
                        RopeLayout::Neox => (i, i + half),
                        RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                    };
                    let (x0, x1) = (head[a], head[b]);
                    head[a] = x0 * cos[i] - x1 * sin[i];
                    head[b] = x0 * sin[i] + x1 * cos[i];
                }
            }
        }
    }
}
