//! Command-line parsing and dispatch; one file per subcommand.

mod bench;
mod chat;
mod gpu;
mod info;
mod kv_timeline;
mod model;
mod profile_kv;
mod run;
mod search;
mod serve;

use clap::{Parser, Subcommand};

/// arbor: an inference engine for test-time compute scaling.
#[derive(Parser, Debug)]
#[command(name = "arbor", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate a continuation of a prompt, streaming the text to stdout.
    Run(run::RunArgs),
    /// Chat interactively with the model's chat template.
    Chat(chat::ChatArgs),
    /// Describe the model, its quantisation, KV bytes per token and the backend.
    Info(info::InfoArgs),
    /// Run a search strategy (best-of-N, voting, beam, MCTS, …) on a prompt or a JSONL
    /// dataset; one JSON object per prompt on stdout.
    Search(search::SearchArgs),
    /// Serve an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions,
    /// /v1/models) plus /v1/search, /health and /metrics.
    Serve(serve::ServeArgs),
    /// Run a best-of-N or beam workload and report its KV memory: pages, distinct tokens,
    /// bytes per unique token against per-branch copies.
    ProfileKv(profile_kv::ProfileKvArgs),
    /// Benchmark tokens/s under search: strategy × width × prompt length × generation
    /// length, prefix sharing on and off; JSON lines, CSV and SVG plots.
    Bench(bench::BenchArgs),
}

/// Runs the chosen subcommand.
pub fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(a) => run::run(a),
        Command::Chat(a) => chat::chat(a),
        Command::Info(a) => info::info(a),
        Command::Search(a) => search::search(a),
        Command::Serve(a) => serve::serve(a),
        Command::ProfileKv(a) => profile_kv::profile_kv(a),
        Command::Bench(a) => bench::bench(a),
    }
}
