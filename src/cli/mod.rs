//! Command-line parsing and dispatch; one file per subcommand.

mod chat;
mod info;
mod model;
mod profile_kv;
mod run;
mod search;

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
    /// Run a best-of-N or beam workload and report its KV memory: pages, distinct tokens,
    /// bytes per unique token against per-branch copies.
    ProfileKv(profile_kv::ProfileKvArgs),
}

/// Runs the chosen subcommand.
pub fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(a) => run::run(a),
        Command::Chat(a) => chat::chat(a),
        Command::Info(a) => info::info(a),
        Command::Search(a) => search::search(a),
        Command::ProfileKv(a) => profile_kv::profile_kv(a),
    }
}
