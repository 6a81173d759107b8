//! `simulate-agreement`: runs the deterministic simulator of the MS agreement over many seeds.
//!
//! Without a mutant it exits 0 only when no seed finds a violation, and prints the first failing seed
//! with the command that replays it. With a mutant, finding a violation is the expected outcome: it
//! stops at the first seed that catches the mutant and exits 0 only then.

use clap::{Parser, ValueEnum};
use dbqsfs_tests::agreement_sim::{run_seed, Mutant, RunOptions};
use std::io::Write;
use std::time::Instant;

#[derive(Parser)]
#[command(
    about = "Run the deterministic simulator of the MS agreement (PBFT) and the Membership Service on top of it: Byzantine committee members (equivocating, withholding, forging primaries, lying probers), message loss, partitions and crashes, joins, leaves, evictions and one epoch end, checked for safety and liveness."
)]
struct Args {
    /// Number of seeds to run (starting at --seed).
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// First seed; with --seeds 1, replays exactly that seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Faults tolerated by the committee (3f+1 members).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=3))]
    f: u32,
    /// Break the protocol on purpose; the run succeeds only if the checkers catch it.
    #[arg(long, value_enum)]
    mutant: Option<MutantArg>,
    /// Print each seed's setup and result.
    #[arg(long, short)]
    verbose: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum MutantArg {
    PrepareQuorumF,
    SkipViewChangeProof,
}

fn main() {
    let args = Args::parse();
    let mutant = match args.mutant {
        None => Mutant::None,
        Some(MutantArg::PrepareQuorumF) => Mutant::PrepareQuorumF,
        Some(MutantArg::SkipViewChangeProof) => Mutant::SkipViewChangeProof,
    };
    let opts = RunOptions { f: args.f, mutant };
    let start = Instant::now();
    let (mut decided, mut violations, mut ran) = (0u64, 0u64, 0u64);
    // Coverage: seeds that changed view, states installed, evidence returned.
    let (mut changed_view, mut installs, mut evidence) = (0u64, 0u64, 0u64);
    // MS coverage: epochs ended, joins, refused joins, leaves, evictions, live members kept,
    // early Byzantine EndEpochs outvoted, forged certificates refused.
    let mut ms = [0u64; 8];
    let mut first_failure: Option<u64> = None;
    for seed in args.seed..args.seed.saturating_add(args.seeds) {
        let report = run_seed(seed, &opts);
        if ran == 0 {
            // Determinism self-test on the first seed of every run: the same seed, the same digest.
            let again = run_seed(seed, &opts);
            if again.digest != report.digest {
                eprintln!("\nseed {seed}: two runs gave different digests: the simulator is not deterministic");
                violations += 1;
                first_failure.get_or_insert(seed);
            }
        }
        ran += 1;
        decided += report.decided;
        changed_view += u64::from(report.max_view > 0);
        installs += report.state_installs;
        evidence += report.evidence;
        let m = &report.ms;
        for (acc, v) in ms.iter_mut().zip([
            u64::from(m.epoch_ended),
            m.joined,
            m.refused,
            m.left,
            m.evicted,
            m.kept,
            u64::from(m.early_end),
            m.rejected_certs,
        ]) {
            *acc += v;
        }
        if args.verbose {
            eprintln!(
                "seed {seed}: decided={} max_view={} state_installs={} evidence={} ms={:?} violations={} digest={} {}",
                report.decided,
                report.max_view,
                report.state_installs,
                report.evidence,
                report.ms,
                report.violations.len(),
                hex8(&report.digest),
                report.setup
            );
        }
        if !report.violations.is_empty() {
            violations += report.violations.len() as u64;
            if first_failure.is_none() {
                first_failure = Some(seed);
                eprintln!("\nseed {seed} FAILED ({})", report.setup);
                for v in report.violations.iter().take(5) {
                    eprintln!("  - {v}");
                }
                eprintln!(
                    "  replay: cargo run --release -p dbqsfs-tests --bin simulate-agreement -- --seeds 1 --seed {seed} --f {}{}",
                    args.f,
                    mutant_flag(args.mutant)
                );
            }
            if args.mutant.is_some() {
                break;
            }
        }
        if ran % 20 == 0 || ran == args.seeds {
            let rate = ran as f64 / start.elapsed().as_secs_f64();
            eprint!(
                "\r{ran}/{} seeds, {decided} decided, {violations} violations, {rate:.1} seeds/s   ",
                args.seeds
            );
            let _ = std::io::stderr().flush();
        }
    }
    eprintln!();
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "{ran} seeds in {secs:.1}s: {:.1} seeds/s, {:.0} decided/s",
        ran as f64 / secs,
        decided as f64 / secs
    );
    eprintln!(
        "coverage: {changed_view} seeds changed view, {installs} states installed, {evidence} pieces of evidence"
    );
    eprintln!(
        "membership: {} epochs ended, {} joins, {} joins refused, {} leaves, {} dead evicted, {} live kept against a Byzantine prober, {} early Byzantine EndEpochs outvoted, {} forged certificates refused",
        ms[0], ms[1], ms[2], ms[3], ms[4], ms[5], ms[6], ms[7]
    );
    println!("simulate-agreement: seeds={ran} decided={decided} violations={violations}");
    let ok = if args.mutant.is_some() {
        violations > 0
    } else {
        violations == 0
    };
    if args.mutant.is_some() && !ok {
        eprintln!("the mutant was NOT caught in {ran} seeds");
    }
    std::process::exit(if ok { 0 } else { 1 });
}

fn mutant_flag(m: Option<MutantArg>) -> &'static str {
    match m {
        None => "",
        Some(MutantArg::PrepareQuorumF) => " --mutant prepare-quorum-f",
        Some(MutantArg::SkipViewChangeProof) => " --mutant skip-view-change-proof",
    }
}

fn hex8(d: &[u8; 32]) -> String {
    d[..8].iter().map(|b| format!("{b:02x}")).collect()
}
