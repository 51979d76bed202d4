//! Options shared by every command that loads a model, and the loading itself.

use anyhow::{bail, Context};
use arbor_kernels::kv::KvDtype;
use arbor_kernels::Device;
use arbor_runtime::fetch::DEFAULT_MODEL;
use arbor_runtime::{Engine, EngineOptions, LoadedModel};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A .gguf file or an HF model directory (config.json, safetensors, tokenizer.json).
    /// Default: SmolLM2-135M-Instruct, fetched on first use into the cache (ARBOR_CACHE).
    #[arg(long, short = 'm')]
    pub model: Option<PathBuf>,
    /// Instead of a model file: random weights of a published shape, `SHAPE[:q4_0|q8_0|q4_k]`
    /// (smollm2-135m, qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-7b, llama-3.2-1b, llama-3-8b), with
    /// a synthetic byte-level tokenizer; for benchmarks of models not at hand.
    #[arg(long, value_name = "SHAPE", conflicts_with = "model")]
    pub dummy_weights: Option<String>,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// CPU threads (default: all cores).
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
    /// KV cache size in GiB.
    #[arg(long, default_value_t = 0.5, conflicts_with = "kv_cache_fraction")]
    pub kv_cache_gb: f64,
    /// KV cache size as a fraction (0..1] of the device's free memory after the weights load
    /// (instead of --kv-cache-gb).
    #[arg(long)]
    pub kv_cache_fraction: Option<f64>,
    /// Token positions per KV page (8, 16 or 32).
    #[arg(long, default_value_t = 16)]
    pub page_size: usize,
    /// Multiply quantised weights with f32 activations (as transformers does on a dequantised
    /// GGUF) instead of 8-bit ones: slower, for validation.
    #[arg(long)]
    pub exact: bool,
    /// How the CPU's KV cache stores K and V: f16 (the default: half the memory per token of
    /// f32, so twice the tokens in --kv-cache-gb, and faster to read) or f32 (the reference,
    /// and the default with --exact). A GPU stores bf16 either way.
    #[arg(long, value_parser = parse_kv_dtype)]
    pub kv_dtype: Option<KvDtype>,
}

/// `f32` or `f16`.
pub fn parse_kv_dtype(s: &str) -> Result<KvDtype, String> {
    match s {
        "f32" => Ok(KvDtype::F32),
        "f16" => Ok(KvDtype::F16),
        _ => Err(format!("unknown KV dtype '{s}': f32 or f16")),
    }
}

impl ModelArgs {
    /// The CPU's KV element type: --kv-dtype, else f32 for --exact (validation) and f16
    /// otherwise.
    pub fn kv_dtype(&self) -> KvDtype {
        self.kv_dtype.unwrap_or(if self.exact {
            KvDtype::F32
        } else {
            KvDtype::F16
        })
    }

    /// The model path: `--model`, or the default model (fetched if not cached).
    pub fn resolve(&self) -> anyhow::Result<PathBuf> {
        if let Some(d) = &self.dummy_weights {
            return Ok(PathBuf::from(format!("dummy:{d}")));
        }
        if let Some(p) = &self.model {
            return Ok(p.clone());
        }
        let cached = DEFAULT_MODEL.cached_path();
        if cached.is_file() {
            return Ok(cached);
        }
        eprintln!(
            "Fetching the default model {} {} into {}",
            DEFAULT_MODEL.package,
            DEFAULT_MODEL.version,
            cached.display()
        );
        let bar = ProgressBar::new(0).with_style(
            ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} ({bytes_per_sec}, {eta})")
                .expect("valid template"),
        );
        let progress = |done: u64, total: Option<u64>| {
            if let Some(t) = total {
                bar.set_length(t);
            }
            bar.set_position(done);
        };
        let path = DEFAULT_MODEL.ensure(&progress)?;
        bar.finish_and_clear();
        Ok(path)
    }

    /// Bytes for the KV pool: --kv-cache-fraction of the memory left free once the weights
    /// (`weight_bytes` on a GPU, where they are uploaded after this) are in place, or
    /// --kv-cache-gb.
    fn kv_cache_bytes(&self, weight_bytes: u64) -> anyhow::Result<usize> {
        let Some(f) = self.kv_cache_fraction else {
            return Ok((self.kv_cache_gb * (1u64 << 30) as f64) as usize);
        };
        if !(f > 0.0 && f <= 1.0) {
            bail!("--kv-cache-fraction must be in (0, 1]");
        }
        let free = self.device.available_memory().with_context(|| {
            format!(
                "cannot tell the free memory of {}: use --kv-cache-gb instead",
                self.device
            )
        })?;
        let free = match self.device {
            Device::Cpu => free,
            // Weights go up after this, and activations need room too (1 GiB).
            Device::Cuda(_) => free.saturating_sub(weight_bytes + (1 << 30)),
        };
        Ok((free as f64 * f) as usize)
    }

    /// Sets up threads and the device, and loads the model into an engine.
    pub fn load(&self) -> anyhow::Result<(Engine, arbor_runtime::Tokenizer, f64)> {
        if let Some(n) = self.threads {
            if n == 0 {
                bail!("--threads must be at least 1");
            }
            // Fails only if the pool was already built, which happens nowhere before this.
            let _ = rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build_global();
        }
        if !(self.kv_cache_gb > 0.0 && self.kv_cache_gb.is_finite()) {
            bail!("--kv-cache-gb must be a positive number of GiB");
        }
        let LoadedModel {
            mut model,
            tokenizer,
            load_secs,
        } = match &self.dummy_weights {
            Some(spec) => dummy(spec)?,
            None => {
                let path = self.resolve()?;
                arbor_runtime::load(&path).with_context(|| format!("loading {}", path.display()))?
            }
        };
        if self.exact {
            model.precision = arbor_runtime::model::Precision::Exact;
        }
        model.attention.kv_dtype = self.kv_dtype();
        let bf16_weights = model.cfg.param_count() * 2;
        let opts = EngineOptions {
            kv_cache_bytes: self.kv_cache_bytes(bf16_weights)?,
            page_size: self.page_size,
        };
        let engine = Engine::on_device(model, &opts, self.device)
            .with_context(|| format!("starting the model on {}", self.device))?;
        Ok((engine, tokenizer, load_secs))
    }
}

/// Builds the random-weight model of `spec` and its synthetic tokenizer.
fn dummy(spec: &str) -> anyhow::Result<LoadedModel> {
    let t0 = std::time::Instant::now();
    let (shape, _) = arbor_runtime::dummy::parse_spec(spec)?;
    eprintln!(
        "Building {} with random weights ({:.2} B parameters)",
        shape.name,
        shape.published_params as f64 / 1e9
    );
    let model = arbor_runtime::dummy::model(spec, 0)?;
    let tokenizer = arbor_runtime::dummy::tokenizer(model.cfg.vocab_size)?;
    Ok(LoadedModel {
        model,
        tokenizer,
        load_secs: t0.elapsed().as_secs_f64(),
    })
}
