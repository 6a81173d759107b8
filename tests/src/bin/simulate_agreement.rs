//! `simulate-agreement`: runs the deterministic simulator of the MS agreement over many seeds.
//!
//! Without a mutant it exits 0 only when no seed finds a violation, and prints the first failing seed
//! with the command that replays it. With a mutant, finding a violation is the expected outcome: it
//! stops at the first seed that catches the mutant and exits 0 only then.

use clap::{Parser, ValueEnum};
use dbqsfs_tests::agreement_sim::{run_seed, Mutant, RunOptions};
use dbqsfs_tests::runner::{mutant_name, run, SeedArgs, SeedOutcome};
use std::cell::RefCell;

#[derive(Parser)]
#[command(
    about = "Run the deterministic simulator of the MS agreement (PBFT) and the Membership Service on top of it: Byzantine committee members (equivocating, withholding, forging primaries, lying probers), message loss, partitions and crashes, joins, leaves, evictions and one epoch end, checked for safety and liveness."
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
    PrepareQuorumF,
    SkipViewChangeProof,
    /// The driver restarts a crashed member without what it persisted.
    ForgetSignedState,
}

fn main() {
    let args = Args::parse();
    let mutant = match args.mutant {
        None | Some(MutantArg::ForgetSignedState) => Mutant::None,
        Some(MutantArg::PrepareQuorumF) => Mutant::PrepareQuorumF,
        Some(MutantArg::SkipViewChangeProof) => Mutant::SkipViewChangeProof,
    };
    let opts = RunOptions {
        f: args.common.f,
        mutant,
        forget_signed_state: matches!(args.mutant, Some(MutantArg::ForgetSignedState)),
    };
    // Coverage: seeds that changed view, states installed, evidence returned; and of the MS: epochs
    // ended, joins, refused joins, leaves, evictions, live members kept, early Byzantine EndEpochs
    // outvoted, forged certificates refused.
    let coverage = RefCell::new([0u64; 3]);
    let ms = RefCell::new([0u64; 10]);
    let seeds = args.common.seeds(
        "simulate-agreement",
        "decided",
        "",
        mutant_name(args.mutant),
    );
    run(
        seeds,
        |seed, rerun| {
            let r = run_seed(seed, &opts);
            let detail = format!(
                "max_view={} state_installs={} evidence={} ms={:?}",
                r.max_view, r.state_installs, r.evidence, r.ms
            );
            let outcome = SeedOutcome {
                count: r.decided,
                violations: r.violations,
                digest: r.digest,
                setup: r.setup,
                detail,
            };
            if rerun {
                return outcome;
            }
            let mut c = coverage.borrow_mut();
            c[0] += u64::from(r.max_view > 0);
            c[1] += r.state_installs;
            c[2] += r.evidence;
            let m = &r.ms;
            let counts = [
                u64::from(m.epoch_ended),
                m.joined,
                m.refused,
                m.left,
                m.evicted,
                m.kept,
                u64::from(m.early_end),
                m.rejected_certs,
                m.certified,
                m.freshness,
            ];
            for (acc, v) in ms.borrow_mut().iter_mut().zip(counts) {
                *acc += v;
            }
            outcome
        },
        || {
            let c = coverage.borrow();
            eprintln!(
                "coverage: {} seeds changed view, {} states installed, {} pieces of evidence",
                c[0], c[1], c[2]
            );
            let ms = ms.borrow();
            eprintln!(
                "membership: {} epochs ended, {} joins, {} joins refused, {} leaves, {} dead evicted, {} live kept against a Byzantine prober, {} early Byzantine EndEpochs outvoted, {} forged certificates refused, {} certificates assembled by members from each other's shares, {} freshness certificates",
                ms[0], ms[1], ms[2], ms[3], ms[4], ms[5], ms[6], ms[7], ms[8], ms[9]
            );
        },
    )
}
