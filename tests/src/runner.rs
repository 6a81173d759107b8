//! The seed loop the simulators' runners share: a determinism self-test on the first seed, progress
//! on stderr, the first failing seed with the command that replays it, the mutant rule (with a
//! mutant, finding a violation is the expected outcome: stop at the first seed that does), and the one
//! closing line `NAME: seeds=N UNIT=M violations=V` with the exit code that goes with it.

use std::io::Write;
use std::time::Instant;

/// What one seed produced.
pub struct SeedOutcome {
    /// What the run counts (operations completed, requests decided...).
    pub count: u64,
    pub violations: Vec<String>,
    pub digest: [u8; 32],
    /// The parameters the seed drew, for the report of a failure.
    pub setup: String,
    /// More detail for `--verbose`.
    pub detail: String,
}

/// The arguments every simulator's command line takes (flattened into each binary's own).
#[derive(clap::Args, Clone, Debug)]
pub struct SeedArgs {
    /// Number of seeds to run (starting at --seed).
    #[arg(long, default_value_t = 100)]
    pub seeds: u64,
    /// First seed; with --seeds 1, replays exactly that seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Faults tolerated: f of every 3f+1 (replica group, committee).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=3))]
    pub f: u32,
    /// Print each seed's setup and result.
    #[arg(long, short)]
    pub verbose: bool,
}

impl SeedArgs {
    /// The runner's plan for binary `name` counting `unit`: `extra` are the replay arguments
    /// beyond `--f` (such as `--composed`), `mutant` the mutant's command-line name.
    pub fn seeds<'a>(
        &self,
        name: &'a str,
        unit: &'a str,
        extra: &str,
        mutant: Option<String>,
    ) -> Seeds<'a> {
        Seeds {
            name,
            unit,
            first: self.seed,
            count: self.seeds,
            replay_args: format!("--f {}{extra}", self.f),
            mutant,
            verbose: self.verbose,
        }
    }
}

/// A mutant's name as typed on the command line.
pub fn mutant_name<M: clap::ValueEnum>(m: Option<M>) -> Option<String> {
    m.and_then(|m| m.to_possible_value())
        .map(|v| v.get_name().to_string())
}

/// How to run the seeds.
pub struct Seeds<'a> {
    /// The binary's name, as in the closing line and the replay command.
    pub name: &'a str,
    /// What `SeedOutcome::count` counts (`ops`, `decided`).
    pub unit: &'a str,
    pub first: u64,
    pub count: u64,
    /// The arguments that reproduce the run apart from `--seeds` and `--seed` (e.g. `--f 1`).
    pub replay_args: String,
    /// The mutant's command-line name, if one is set.
    pub mutant: Option<String>,
    pub verbose: bool,
}

/// Runs the seeds, prints the summary (`summary` adds lines just before the closing one) and
/// exits the process with the code the runner's contract gives. `run_seed(seed, rerun)` runs one
/// seed; `rerun` is true for the determinism self-test's second run, which must not be counted.
pub fn run(
    seeds: Seeds,
    mut run_seed: impl FnMut(u64, bool) -> SeedOutcome,
    summary: impl FnOnce(),
) -> ! {
    let start = Instant::now();
    let (mut total, mut violations, mut ran) = (0u64, 0u64, 0u64);
    let mut first_failure: Option<u64> = None;
    for seed in seeds.first..seeds.first.saturating_add(seeds.count) {
        let report = run_seed(seed, false);
        if ran == 0 && run_seed(seed, true).digest != report.digest {
            eprintln!("\nseed {seed}: two runs gave different digests: the simulator is not deterministic");
            violations += 1;
            first_failure.get_or_insert(seed);
        }
        ran += 1;
        total += report.count;
        if seeds.verbose {
            let digest: String = report.digest[..8]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            eprintln!(
                "seed {seed}: {}={} violations={} digest={digest} {} {}",
                seeds.unit,
                report.count,
                report.violations.len(),
                report.detail,
                report.setup
            );
        }
        if !report.violations.is_empty() {
            violations += report.violations.len() as u64;
            let mutant = seeds
                .mutant
                .as_ref()
                .map_or(String::new(), |m| format!(" --mutant {m}"));
            let replay = format!(
                "cargo run --release -p dbqsfs-tests --bin {} -- --seeds 1 --seed {seed} {}{mutant}",
                seeds.name, seeds.replay_args
            );
            if first_failure.is_none() {
                first_failure = Some(seed);
                let verdict = if seeds.mutant.is_some() {
                    "caught the mutant"
                } else {
                    "FAILED"
                };
                eprintln!("\nseed {seed} {verdict} ({})", report.setup);
                for v in report.violations.iter().take(5) {
                    eprintln!("  - {v}");
                }
                eprintln!("  replay: {replay}");
            } else {
                // Every later failure gets one line, so a long run reports each seed it found.
                let first = report.violations[0].chars().take(160).collect::<String>();
                eprintln!("\nseed {seed} FAILED: {first}\n  replay: {replay}");
            }
            if seeds.mutant.is_some() {
                break;
            }
        }
        if ran % 20 == 0 || ran == seeds.count {
            let rate = ran as f64 / start.elapsed().as_secs_f64();
            eprint!(
                "\r{ran}/{} seeds, {total} {}, {violations} violations, {rate:.1} seeds/s   ",
                seeds.count, seeds.unit
            );
            let _ = std::io::stderr().flush();
        }
    }
    eprintln!();
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "{ran} seeds in {secs:.1}s: {:.1} seeds/s, {:.0} {}/s",
        ran as f64 / secs,
        total as f64 / secs,
        seeds.unit
    );
    summary();
    println!(
        "{}: seeds={ran} {}={total} violations={violations}",
        seeds.name, seeds.unit
    );
    let ok = if seeds.mutant.is_some() {
        violations > 0
    } else {
        violations == 0
    };
    if seeds.mutant.is_some() && !ok {
        eprintln!("the mutant was NOT caught in {ran} seeds");
    }
    std::process::exit(if ok { 0 } else { 1 });
}
