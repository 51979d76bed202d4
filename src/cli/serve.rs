//! `arbor serve`: the OpenAI-compatible HTTP API and `/v1/search` (see docs/API.md).

use super::model::ModelArgs;
use anyhow::bail;
use arbor_search::{Scheduler, SchedulerOptions};
use arbor_server::ServerConfig;
use clap::Args;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// The model id clients use (default: the model file or directory name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Require `Authorization: Bearer KEY` on /v1/* (or set ARBOR_API_KEY).
    #[arg(long)]
    pub api_key: Option<String>,
    /// Most requests held at once, running or waiting; more are answered 429.
    #[arg(long, default_value_t = 512)]
    pub max_queue: usize,
    /// Cancel a request that runs longer than this many seconds.
    #[arg(long, default_value_t = 600.0)]
    pub request_timeout_s: f64,
    /// Largest request body in bytes; larger ones are answered 413.
    #[arg(long, default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// Seconds in-flight work may finish after SIGINT/SIGTERM before it is cancelled.
    #[arg(long, default_value_t = 30.0)]
    pub shutdown_grace_s: f64,
    /// Let /v1/search use `command:CMD` and `code[:PYTHON]` verifiers, which run shell commands
    /// and candidate programs on this machine.
    #[arg(long)]
    pub allow_command_verifier: bool,
    /// Most token positions one engine step computes.
    #[arg(long, default_value_t = 2048)]
    pub max_batch_tokens: usize,
    /// Most sequences in one engine step.
    #[arg(long, default_value_t = 256)]
    pub max_seqs: usize,
    /// Load a verifier model beside the policy (`orm:DIR`, `prm:DIR` or `judge:MODEL`;
    /// repeatable); /v1/search names it by the same spec as its `verifier`.
    #[arg(long = "verifier-model")]
    pub verifier_models: Vec<String>,
    /// KV cache of each verifier model, in GB.
    #[arg(long, default_value_t = 0.25)]
    pub verifier_kv_gb: f64,
}

fn secs(name: &str, s: f64) -> anyhow::Result<Duration> {
    if !(s > 0.0 && s.is_finite()) {
        bail!("--{name} must be a positive number of seconds");
    }
    Ok(Duration::from_secs_f64(s))
}

pub fn serve(a: ServeArgs) -> anyhow::Result<()> {
    if a.max_queue == 0 || a.max_body_bytes == 0 || a.max_batch_tokens == 0 || a.max_seqs == 0 {
        bail!(
            "--max-queue, --max-body-bytes, --max-batch-tokens and --max-seqs must be at least 1"
        );
    }
    let request_timeout = secs("request-timeout-s", a.request_timeout_s)?;
    let shutdown_grace = secs("shutdown-grace-s", a.shutdown_grace_s)?;
    let path = a.model.resolve()?;
    let (engine, tokenizer, load_secs) = a.model.load()?;
    let name = a.served_model_name.clone().unwrap_or_else(|| {
        let stem = if path.is_dir() {
            path.file_name()
        } else {
            path.file_stem()
        };
        stem.map_or("arbor".into(), |s| s.to_string_lossy().into_owned())
    });
    let mut cfg = ServerConfig::new(name, engine.model.cfg.max_context);
    cfg.api_key = a
        .api_key
        .or_else(|| std::env::var("ARBOR_API_KEY").ok())
        .filter(|k| !k.is_empty());
    cfg.max_queue = a.max_queue;
    cfg.request_timeout = request_timeout;
    cfg.max_body_bytes = a.max_body_bytes;
    cfg.shutdown_grace = shutdown_grace;
    cfg.allow_command_verifier = a.allow_command_verifier;
    let mut sched = Scheduler::new(
        engine,
        tokenizer,
        SchedulerOptions {
            max_batch_tokens: a.max_batch_tokens,
            max_seqs: a.max_seqs,
        },
    );
    if !(a.verifier_kv_gb > 0.0 && a.verifier_kv_gb.is_finite()) {
        bail!("--verifier-kv-gb must be a positive number");
    }
    for spec in &a.verifier_models {
        let bytes = (a.verifier_kv_gb * 1e9) as usize;
        let m = arbor_search::spec::load_model(spec, bytes, a.model.page_size, a.model.device)
            .map_err(anyhow::Error::msg)?;
        cfg.verifier_models
            .push((spec.clone(), sched.add_verifier_model(m)));
    }
    arbor_server::run(sched, cfg, &format!("{}:{}", a.host, a.port), load_secs)?;
    Ok(())
}
