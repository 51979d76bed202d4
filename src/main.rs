//! The `arbor` command line: run, chat and inspect models (serve, search, bench and
//! profile-kv join as their issues land).

mod cli;

use clap::Parser;

fn main() {
    let args = cli::Cli::parse();
    if let Err(e) = cli::dispatch(args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
