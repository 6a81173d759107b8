//! `simulate`: runs the deterministic simulator over many seeds.
//!
//! Without a mutant it exits 0 only when no seed finds a violation, and prints the first failing seed
//! otherwise. With a mutant, finding a violation is the expected outcome: it stops at the first seed
//! that catches the mutant and exits 0 only then.

use clap::{Parser, ValueEnum};
use dbqsfs_tests::sim::{run_seed, Mutant, RunOptions};
use std::io::Write;
use std::time::Instant;

#[derive(Parser)]
#[command(
    about = "Run the dbqsfs deterministic simulator: seeded Byzantine replicas, message loss, partitions, crashes and epoch changes, checked for linearizability, integrity and liveness."
)]
struct Args {
    /// Number of seeds to run (starting at --seed).
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// First seed; with --seeds 1, replays exactly that seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Faults tolerated per replica group.
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
    NoWriteBack,
    SmallQuorum,
    AcceptUnsigned,
    TransferFromOne,
    ServeBeforeTransfer,
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
    };
    let opts = RunOptions { f: args.f, mutant };
    let start = Instant::now();
    let (mut ops, mut violations, mut ran) = (0u64, 0u64, 0u64);
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
        ops += report.ops;
        if args.verbose {
            eprintln!(
                "seed {seed}: ops={} violations={} digest={} {}",
                report.ops,
                report.violations.len(),
                hex8(&report.digest),
                report.setup
            );
        }
        if !report.violations.is_empty() {
            violations += report.violations.len() as u64;
            if first_failure.is_none() {
                first_failure = Some(seed);
                let verdict = if args.mutant.is_some() {
                    "caught the mutant"
                } else {
                    "FAILED"
                };
                eprintln!("\nseed {seed} {verdict} ({})", report.setup);
                for v in report.violations.iter().take(5) {
                    eprintln!("  - {v}");
                }
                eprintln!("  replay: cargo run --release -p dbqsfs-tests --bin simulate -- --seeds 1 --seed {seed} --f {}{}", args.f, mutant_flag(args.mutant));
            }
            if args.mutant.is_some() {
                break;
            }
        }
        if ran % 20 == 0 || ran == args.seeds {
            let rate = ran as f64 / start.elapsed().as_secs_f64();
            eprint!(
                "\r{ran}/{} seeds, {ops} ops, {violations} violations, {rate:.1} seeds/s   ",
                args.seeds
            );
            let _ = std::io::stderr().flush();
        }
    }
    eprintln!();
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "{ran} seeds in {secs:.1}s: {:.1} seeds/s, {:.0} ops/s",
        ran as f64 / secs,
        ops as f64 / secs
    );
    println!("simulate: seeds={ran} ops={ops} violations={violations}");
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
        Some(MutantArg::NoWriteBack) => " --mutant no-write-back",
        Some(MutantArg::SmallQuorum) => " --mutant small-quorum",
        Some(MutantArg::AcceptUnsigned) => " --mutant accept-unsigned",
        Some(MutantArg::TransferFromOne) => " --mutant transfer-from-one",
        Some(MutantArg::ServeBeforeTransfer) => " --mutant serve-before-transfer",
    }
}

fn hex8(d: &[u8; 32]) -> String {
    d[..8].iter().map(|b| format!("{b:02x}")).collect()
}
