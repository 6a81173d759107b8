//! `simulate-key`: runs the deterministic simulator of the MS's threshold key over many seeds: a
//! key generation and four redistributions to changing committees per seed, with Byzantine
//! dealers, receivers and signers.
//!
//! Without a mutant it exits 0 only when no seed finds a violation, and prints the first failing
//! seed with the command that replays it. With a mutant, finding a violation is the expected
//! outcome: it stops at the first seed that catches the mutant and exits 0 only then.

use clap::{Parser, ValueEnum};
use dbqsfs_tests::key_sim::{run_seed, Mutant, RunOptions, Stats};
use dbqsfs_tests::runner::{mutant_name, run, SeedArgs, SeedOutcome};
use std::cell::RefCell;

#[derive(Parser)]
#[command(
    about = "Run the deterministic simulator of the MS's threshold key: a distributed key generation, then the key's shares redistributed to six changing committees, with up to f Byzantine members in every old and new committee (bad, withheld, late, equivocated or malformed deals, false complaints, wrong signature shares), checked: the key never changes, every correct member ends with a valid share, a signature of 2f+1 members verifies under the key, and no coalition ever holds 2f+1 shares of one sharing."
)]
struct Args {
    #[command(flatten)]
    common: SeedArgs,
    /// Break the protocol on purpose; the run succeeds only if the checkers catch it.
    #[arg(long, value_enum)]
    mutant: Option<MutantArg>,
}

#[derive(Clone, Copy, ValueEnum)]
enum MutantArg {
    /// New members take their sub-shares without checking them against the commitments.
    ReshareUnverified,
    /// Old members never erase their shares, and sign with what they hold.
    KeepOldShares,
}

fn main() {
    let args = Args::parse();
    let opts = RunOptions {
        f: args.common.f as usize,
        mutant: match args.mutant {
            None => Mutant::None,
            Some(MutantArg::ReshareUnverified) => Mutant::ReshareUnverified,
            Some(MutantArg::KeepOldShares) => Mutant::KeepOldShares,
        },
    };
    let totals = RefCell::new(Stats::default());
    let seeds = args
        .common
        .seeds("simulate-key", "rounds", "", mutant_name(args.mutant));
    run(
        seeds,
        |seed, rerun| {
            let r = run_seed(seed, &opts);
            if !rerun {
                let mut t = totals.borrow_mut();
                t.deals += r.stats.deals;
                t.refused += r.stats.refused;
                t.disproven += r.stats.disproven;
                t.late_complaints += r.stats.late_complaints;
                t.signatures += r.stats.signatures;
                t.culprits_named += r.stats.culprits_named;
            }
            SeedOutcome {
                count: r.rounds,
                violations: r.violations,
                digest: r.digest,
                detail: format!("{:?}", r.stats),
                setup: r.setup,
            }
        },
        || {
            let t = totals.borrow();
            eprintln!(
                "key: {} deals ordered, {} operations refused (Byzantine), {} dealers disproven by complaints ({} after they qualified), {} signatures verified under the key, {} wrong signature shares named",
                t.deals, t.refused, t.disproven, t.late_complaints, t.signatures, t.culprits_named
            );
        },
    )
}
