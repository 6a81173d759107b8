//! The agreement simulator as a test: a handful of seeds must pass, replay identically, and the
//! checkers must catch each broken protocol. `.ci/run` can run the long versions with the release
//! `simulate-agreement` binary.

use dbqsfs_tests::agreement_sim::{run_seed, Mutant, RunOptions};

fn opts(f: u32, mutant: Mutant) -> RunOptions {
    RunOptions {
        f,
        mutant,
        forget_signed_state: false,
    }
}

#[test]
fn the_same_seed_gives_the_same_digest() {
    for seed in [3, 11] {
        let a = run_seed(seed, &opts(1, Mutant::None));
        let b = run_seed(seed, &opts(1, Mutant::None));
        assert_eq!(a.digest, b.digest, "seed {seed} is not deterministic");
        assert!(a.decided > 0);
    }
}

#[test]
fn different_seeds_explore_different_runs() {
    let a = run_seed(1, &opts(1, Mutant::None));
    let b = run_seed(2, &opts(1, Mutant::None));
    assert_ne!(a.digest, b.digest);
}

#[test]
fn twenty_seeds_have_no_violation() {
    for seed in 0..20 {
        let r = run_seed(seed, &opts(1, Mutant::None));
        assert!(
            r.violations.is_empty(),
            "seed {seed} ({}): {:?}",
            r.setup,
            r.violations
        );
    }
}

#[test]
fn a_seed_with_seven_members_has_no_violation() {
    let r = run_seed(5, &opts(2, Mutant::None));
    assert!(r.violations.is_empty(), "{}: {:?}", r.setup, r.violations);
}

#[test]
fn preparing_with_f_plus_1_statements_is_caught() {
    assert!(
        caught(Mutant::PrepareQuorumF, 300),
        "prepare-quorum-f was not caught"
    );
}

#[test]
fn accepting_a_new_view_without_its_proof_is_caught() {
    assert!(
        caught(Mutant::SkipViewChangeProof, 300),
        "skip-view-change-proof was not caught"
    );
}

#[test]
fn restarting_without_the_persisted_state_is_caught() {
    let forget = RunOptions {
        forget_signed_state: true,
        ..opts(1, Mutant::None)
    };
    let first = (0..300).find(|&seed| !run_seed(seed, &forget).violations.is_empty());
    assert!(first.is_some(), "forget-signed-state was not caught");
}

fn caught(m: Mutant, seeds: u64) -> bool {
    (0..seeds).any(|seed| !run_seed(seed, &opts(1, m)).violations.is_empty())
}

#[test]
fn membership_changes_are_the_same_at_every_correct_member() {
    // Twenty seeds: the epoch ends at every correct member with one next configuration, which
    // holds the certified joiners and not the refused ones, the leavers or the dead, keeps the
    // member a Byzantine prober accuses, and is certified by the old committee.
    let (mut joined, mut refused, mut evicted, mut kept, mut rejected) = (0, 0, 0, 0, 0);
    for seed in 100..120 {
        let r = run_seed(seed, &opts(1, Mutant::None));
        assert!(
            r.violations.is_empty(),
            "seed {seed} ({}): {:?}",
            r.setup,
            r.violations
        );
        assert!(r.ms.epoch_ended, "seed {seed}: the epoch did not end");
        joined += r.ms.joined;
        refused += r.ms.refused;
        evicted += r.ms.evicted;
        kept += r.ms.kept;
        rejected += r.ms.rejected_certs;
    }
    // The seeds exercise every rule.
    assert!(joined > 0 && refused > 0 && evicted > 0 && kept > 0 && rejected > 0);
}
