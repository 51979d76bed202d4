//! `arbor bench`: tokens/s under tree search over a grid of strategy × width × prompt length
//! × generation length, with prefix sharing on and off.
//!
//! Every cell submits `--searches` searches at once to one [`arbor_search::Scheduler`] and
//! ticks it to the end, timing each tick. Prompts are random ordinary tokens of exactly
//! `prompt_len` (fresh per cell, so no cell reuses another's prefix). EOS is ignored, so
//! sampling, best-of-n and beam branches generate exactly `gen_len` tokens; step-beam and
//! mcts take 4 steps of `ceil(gen_len / 4)` tokens (their delimiter is a text that never
//! occurs). best-of-n, step-beam and mcts score with the policy as LM judge.
//!
//! MoE models: every cell also counts the tokens routed to each expert
//! ([`arbor_runtime::Engine::take_expert_counts`] after every tick) and reports their
//! balance as `expert_load` in the JSON and `expert_load.*` columns of bench.csv; with
//! `--out`, expert_load.csv holds the per-expert totals of every cell.
//!
//! Sharing off ([`arbor_runtime::Engine::set_prefix_sharing`]): a fork gets no pages and
//! recomputes its history, the prefix index is not used, so every branch computes and
//! stores its own copy of the prompt, as separate requests in an engine without prefix
//! caching would.

mod attention;
mod grid;
mod plot;
mod report;
mod run;

use super::gpu::GpuMem;
use super::model::ModelArgs;
use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    /// Another benchmark instead of the search grid.
    #[command(subcommand)]
    pub kind: Option<BenchKind>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Strategies, comma-separated: sampling, best-of-n, beam, step-beam, mcts.
    #[arg(long, default_value = "best-of-n,beam")]
    pub strategy: String,
    /// Widths (branches, beams, samples), comma-separated.
    #[arg(long, default_value = "1,4,16")]
    pub width: String,
    /// Prompt lengths in tokens, comma-separated.
    #[arg(long, default_value = "128")]
    pub prompt_len: String,
    /// Tokens each branch generates (EOS ignored), comma-separated.
    #[arg(long, default_value = "64")]
    pub gen_len: String,
    /// Prefix sharing: on, off or on,off.
    #[arg(long, default_value = "on,off")]
    pub sharing: String,
    /// Searches run at once in each cell.
    #[arg(long, default_value_t = 1)]
    pub searches: usize,
    /// Print one JSON object per cell on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Write bench.csv and SVG plots into this directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Benchmarks other than tokens/s under search.
#[derive(Subcommand, Debug)]
pub enum BenchKind {
    /// Tree (cascade) attention against per-row paged attention on synthetic trees: time, KV
    /// bytes read, bandwidth over unique KV bytes against the device's copy bandwidth.
    Attention(attention::AttentionArgs),
}

/// Runs the grid and reports every cell.
pub fn bench(a: BenchArgs) -> anyhow::Result<()> {
    if let Some(BenchKind::Attention(x)) = a.kind {
        return attention::bench(x);
    }
    let strategies = grid::strategies(&a.strategy)?;
    let widths = grid::numbers("--width", &a.width)?;
    let prompts = grid::numbers("--prompt-len", &a.prompt_len)?;
    let gens = grid::numbers("--gen-len", &a.gen_len)?;
    let sharing = grid::sharing(&a.sharing)?;
    if a.searches == 0 {
        bail!("--searches must be at least 1");
    }
    let cells = grid::cells(&strategies, &widths, &prompts, &gens, &sharing);
    if let Some(dir) = &a.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let model_name = a.model.resolve()?.display().to_string();
    let (mut engine, mut tok, load_secs) = a.model.load()?;
    let ctx = engine.model.cfg.max_context;
    if let Some(c) = cells.iter().find(|c| c.prompt_len + c.gen_len + 1 > ctx) {
        bail!(
            "prompt {} + gen {} tokens exceed the model's context of {ctx}",
            c.prompt_len,
            c.gen_len
        );
    }
    let gpu = GpuMem::open(match a.model.device {
        arbor_kernels::Device::Cuda(i) => i as u32,
        _ => 0,
    });
    let device = format!(
        "{} ({} threads)",
        a.model.device,
        rayon::current_num_threads()
    );
    eprintln!(
        "{model_name}: loaded in {load_secs:.1} s · {} cells · GPU memory: {}",
        cells.len(),
        if gpu.available() {
            gpu.note()
        } else {
            "n/a: no GPU"
        }
    );
    let bar = ProgressBar::new(cells.len() as u64).with_style(
        ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} cells · {msg}")
            .expect("valid template"),
    );
    if !a.json {
        println!("{}", report::table_header());
    }
    // Warm-up (untimed): first touches of the weights and the KV pool.
    let warm = grid::Cell {
        strategy: "sampling".into(),
        width: 1,
        prompt_len: 8.min(ctx.saturating_sub(5)).max(1),
        gen_len: 4,
        sharing: true,
    };
    let (e, t, _) = run::run_cell(engine, tok, &warm, 1, a.seed ^ 0x5EED, &gpu, &bar)?;
    (engine, tok) = (e, t);
    let mut records = Vec::with_capacity(cells.len());
    let mut expert_cells = Vec::new();
    for (i, cell) in cells.iter().enumerate() {
        bar.set_message(format!(
            "{} w{} p{} g{} sharing {}",
            cell.strategy,
            cell.width,
            cell.prompt_len,
            cell.gen_len,
            cell.sharing_str()
        ));
        let seed = a.seed.wrapping_add((i as u64) << 20);
        let (e, t, r) = run::run_cell(engine, tok, cell, a.searches, seed, &gpu, &bar)?;
        (engine, tok) = (e, t);
        let gpu_note = if gpu.available() { "" } else { "no GPU" };
        let rec = report::record(cell, a.searches, &r, &model_name, &device, gpu_note);
        if let Some(c) = r.expert_counts {
            expert_cells.push((i, cell.clone(), c));
        }
        bar.suspend(|| {
            if a.json {
                println!("{rec}");
            } else {
                println!("{}", report::table_line(&rec));
            }
        });
        records.push(rec);
        bar.inc(1);
    }
    bar.finish_and_clear();
    if let Some(dir) = &a.out {
        let csv = dir.join("bench.csv");
        report::write_csv(&csv, &records).with_context(|| format!("writing {}", csv.display()))?;
        if !expert_cells.is_empty() {
            let path = dir.join("expert_load.csv");
            report::write_expert_csv(&path, &expert_cells)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        let plots = plot::write_plots(dir, &records, &model_name)?;
        eprintln!(
            "wrote {} and {} plots into {}",
            csv.display(),
            plots.len(),
            dir.display()
        );
    }
    Ok(())
}
