//! The `dbqsfs` binary: see [`cli`] for the subcommands.

mod cli;
mod mount_cmd;
mod snapshot_cmd;
mod volume_cmd;

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    if let Err(e) = cli::run(cli) {
        eprintln!("dbqsfs: error: {e:#}");
        if e.downcast_ref::<cli::UsageError>().is_some() {
            eprintln!("For more information, try '--help'.");
            std::process::exit(2);
        }
        std::process::exit(1);
    }
}
