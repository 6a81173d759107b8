//! The `dbqsfs` binary: see [`cli`] for the subcommands.

mod cli;

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    if let Err(e) = cli::run(cli) {
        eprintln!("dbqsfs: error: {e:#}");
        std::process::exit(1);
    }
}
