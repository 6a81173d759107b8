//! `simulate`: runs the deterministic dBQS simulator over many seeds.
//!
//! Without a mutant it exits 0 only when no seed finds a violation, and prints the first failing seed
//! otherwise. With a mutant, finding a violation is the expected outcome: it stops at the first seed
//! that catches the mutant and exits 0 only then.

use clap::{Parser, ValueEnum};
use dbqsfs_tests::runner::{mutant_name, run, SeedArgs, SeedOutcome};
use dbqsfs_tests::sim::{run_seed, Mutant, RunOptions};

#[derive(Parser)]
#[command(
    about = "Run the dbqsfs deterministic simulator: seeded Byzantine replicas, message loss, partitions, crashes, epoch changes and state transfer, checked for linearizability, integrity, placement and liveness."
)]
struct Args {
    #[command(flatten)]
    common: SeedArgs,
    /// Break the protocol on purpose; the run succeeds only if the checkers catch it.
    #[arg(long, value_enum)]
    mutant: Option<MutantArg>,
    /// The composed mode: the Membership Service's committee (the nodes' role machine, over the
    /// same faulty network) decides the epochs the replicas, clients, transfers and collections
    /// live through, instead of the test.
    #[arg(long)]
    composed: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum MutantArg {
    NoWriteBack,
    SmallQuorum,
    AcceptUnsigned,
    TransferFromOne,
    ServeBeforeTransfer,
    GcEarly,
    ReleaseUnsigned,
    DropRefsInTransfer,
    DeleteWithoutGrace,
    /// Composed mode only: a committee member restarts without its persisted agreement state.
    ForgetSignedState,
}

fn main() {
    let args = Args::parse();
    let mutant = match args.mutant {
        None => Mutant::None,
        Some(MutantArg::NoWriteBack) => Mutant::NoWriteBack,
        Some(MutantArg::SmallQuorum) => Mutant::SmallQuorum,
        Some(MutantArg::AcceptUnsigned) => Mutant::AcceptUnsigned,
        Some(MutantArg::TransferFromOne) => Mutant::TransferFromOne,
        Some(MutantArg::ServeBeforeTransfer) => Mutant::ServeBeforeTransfer,
        Some(MutantArg::GcEarly) => Mutant::GcEarly,
        Some(MutantArg::ReleaseUnsigned) => Mutant::ReleaseUnsigned,
        Some(MutantArg::DropRefsInTransfer) => Mutant::DropRefsInTransfer,
        Some(MutantArg::DeleteWithoutGrace) => Mutant::DeleteWithoutGrace,
        Some(MutantArg::ForgetSignedState) => Mutant::None,
    };
    let forget_signed_state = matches!(args.mutant, Some(MutantArg::ForgetSignedState));
    if forget_signed_state && !args.composed {
        eprintln!(
            "simulate: --mutant forget-signed-state needs --composed (the MS runs only there)"
        );
        std::process::exit(2);
    }
    let opts = RunOptions {
        f: args.common.f,
        mutant,
        composed: args.composed,
        forget_signed_state,
    };
    let seeds = args.common.seeds(
        "simulate",
        "ops",
        if args.composed { " --composed" } else { "" },
        mutant_name(args.mutant),
    );
    run(
        seeds,
        |seed, _rerun| {
            let r = run_seed(seed, &opts);
            SeedOutcome {
                count: r.ops,
                violations: r.violations,
                digest: r.digest,
                setup: r.setup,
                detail: format!(
                    "deleted={} on-demand={}/{} gone={} peer-requests={} deferred={} releases={} released-deleted={} forged-releases={} ms-epochs={} ms-lying-roles={} ms-equivocations={} ms-pieces={}/{} ms-false-epochs={} ms-fresh-under-key={}",
                    r.stats.deleted,
                    r.stats.on_demand_done,
                    r.stats.on_demand,
                    r.stats.gone,
                    r.stats.peer_requests,
                    r.stats.deferred,
                    r.stats.releases,
                    r.stats.released_deleted,
                    r.stats.forged_releases,
                    r.stats.ms_epochs,
                    r.stats.ms_lying_roles,
                    r.stats.ms_equivocations,
                    r.stats.ms_pieces_served,
                    r.stats.ms_pieces_refused,
                    r.stats.ms_false_epochs,
                    r.stats.ms_fresh_under_key
                ),
            }
        },
        || {},
    )
}
