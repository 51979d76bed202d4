//! A single-sequence generation loop over [`Engine::step`]: prompt, then decode until EOS, a
//! stop string or the token limit, streaming text as it becomes final.

use crate::engine::{Engine, ForwardBatch, SeqStep};
use crate::stop::StopMatcher;
use crate::tokenizer::{IncrementalDecoder, Tokenizer};
use crate::RuntimeError;
use arbor_kernels::ops::SamplingParams;
use std::time::Instant;

/// Prompt tokens run per step (bounds activation memory on long prompts).
const PROMPT_CHUNK: usize = 512;

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` or the context limit.
    Length,
}

/// Counts and timings of one generation.
#[derive(Clone, Debug)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prompt_secs: f64,
    pub decode_secs: f64,
    pub finish: FinishReason,
    /// The generated token ids.
    pub tokens: Vec<u32>,
}

impl GenerationStats {
    pub fn prompt_tok_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prompt_secs.max(1e-9)
    }
    /// Decode rate over the tokens after the first (the first comes from the prompt step).
    pub fn decode_tok_per_s(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64 / self.decode_secs.max(1e-9)
    }
}

/// Generates from `prompt` on a fresh sequence, calling `on_text` with each piece of final text.
pub fn generate(
    engine: &mut Engine,
    tok: &Tokenizer,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_text: &mut dyn FnMut(&str),
) -> Result<GenerationStats, RuntimeError> {
    if prompt.is_empty() {
        return Err(RuntimeError::Request("the prompt is empty".into()));
    }
    let ctx = engine.model.cfg.max_context;
    if prompt.len() >= ctx {
        return Err(RuntimeError::ContextOverflow {
            tokens: prompt.len(),
            context: ctx,
        });
    }
    let seq = engine.new_seq();
    let result = run(engine, tok, seq, prompt, opts, on_text);
    engine.free_seq(seq);
    result
}

fn run(
    engine: &mut Engine,
    tok: &Tokenizer,
    seq: u64,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_text: &mut dyn FnMut(&str),
) -> Result<GenerationStats, RuntimeError> {
    let t0 = Instant::now();
    let mut next = None;
    let chunks: Vec<&[u32]> = prompt.chunks(PROMPT_CHUNK).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let last = i + 1 == chunks.len();
        let step = SeqStep {
            seq,
            tokens: chunk.to_vec(),
            sample: last.then(|| opts.sampling.clone()),
            ..Default::default()
        };
        next = engine
            .step(&ForwardBatch { seqs: vec![step] })?
            .remove(0)
            .sample;
    }
    let prompt_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut dec = IncrementalDecoder::new(tok);
    let mut stop = StopMatcher::new(&opts.stop);
    let mut tokens = Vec::new();
    let mut finish = FinishReason::Length;
    let ctx = engine.model.cfg.max_context;
    while let Some(s) = next.take() {
        if tok.is_eog(s.token) {
            finish = FinishReason::Stop;
            break;
        }
        tokens.push(s.token);
        let (text, stopped) = stop.push(&dec.push(s.token));
        on_text(&text);
        if stopped {
            finish = FinishReason::Stop;
            break;
        }
        if tokens.len() >= opts.max_tokens || prompt.len() + tokens.len() >= ctx {
            break;
        }
        let step = SeqStep {
            seq,
            tokens: vec![s.token],
            sample: Some(opts.sampling.clone()),
            ..Default::default()
        };
        next = engine
            .step(&ForwardBatch { seqs: vec![step] })?
            .remove(0)
            .sample;
    }
    // Flush bytes held for an incomplete character and text held for a possible stop string.
    let (text, _) = stop.push(&dec.finish());
    on_text(&text);
    on_text(&stop.finish());
    Ok(GenerationStats {
        prompt_tokens: prompt.len(),
        generated_tokens: tokens.len(),
        prompt_secs,
        decode_secs: t1.elapsed().as_secs_f64(),
        finish,
        tokens,
    })
}
