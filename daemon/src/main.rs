//! The `dbqsfs` binary: see [`cmd`] for the subcommands.

mod cmd;

use clap::Parser;

fn main() {
    let cli = cmd::Cli::parse();
    if let Err(e) = cmd::run(cli) {
        eprintln!("dbqsfs: error: {e:#}");
        if e.downcast_ref::<cmd::UsageError>().is_some() {
            eprintln!("For more information, try '--help'.");
            std::process::exit(2);
        }
        std::process::exit(1);
    }
}
