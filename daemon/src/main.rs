//! The `dbqsfs` binary: see [`cmd`] for the subcommands.

mod cmd;

fn main() {
    let cli = match cmd::command_line() {
        Ok(Some(cli)) => cli,
        Ok(None) => return,
        Err(e) => {
            eprintln!("dbqsfs: error: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = cmd::run(cli) {
        eprintln!("dbqsfs: error: {e:#}");
        if e.downcast_ref::<cmd::UsageError>().is_some() {
            eprintln!("For more information, try '--help'.");
            std::process::exit(2);
        }
        std::process::exit(1);
    }
}
