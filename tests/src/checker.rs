//! Checkers over recorded histories.
//!
//! [`linearizable_register`] is a Wing–Gong search (with Lowe's memoisation of visited states) for a
//! single register: it looks for an order of the operations that respects real time (an operation
//! that returned before another was invoked comes first) in which every read returns the value of
//! the latest write. Operations that never returned (their client crashed) may take effect at any
//! point after their invocation, or never. Public-key blocks are independent registers, so the
//! history is checked per key (P-compositionality).

use std::collections::HashSet;

/// One register operation as observed by a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegOp {
    pub call: u64,
    /// `None`: the operation never returned.
    pub ret: Option<u64>,
    pub kind: RegKind,
    /// Who did it, for the report.
    pub label: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegKind {
    /// Wrote value `v` (values are unique per write; 0 is "no value").
    Write(u64),
    /// Read value `v` (0: none).
    Read(u64),
}

/// Whether the history of one register is linearizable. On failure, returns a short description.
pub fn linearizable_register(history: &[RegOp]) -> Result<(), String> {
    // Reads that never returned constrain nothing.
    let ops: Vec<&RegOp> = history
        .iter()
        .filter(|o| o.ret.is_some() || matches!(o.kind, RegKind::Write(_)))
        .collect();
    let n = ops.len();
    let words = n.div_ceil(64).max(1);
    let mut done = vec![0u64; words];
    let mut seen: HashSet<(Vec<u64>, u64)> = HashSet::new();
    let mut budget: u64 = 5_000_000;
    if search(&ops, &mut done, 0, &mut seen, &mut budget) {
        return Ok(());
    }
    if budget == 0 {
        // An inconclusive search is not a proof of a bug; report it so it gets looked at.
        return Err(format!(
            "linearizability search gave up after 5M steps on {n} operations"
        ));
    }
    let mut desc: Vec<String> = ops
        .iter()
        .map(|o| {
            format!(
                "  [{}, {}] {} {:?}",
                o.call,
                o.ret.map_or("never".to_string(), |r| r.to_string()),
                o.label,
                o.kind
            )
        })
        .collect();
    desc.sort();
    Err(format!(
        "no linearization of {n} operations:\n{}",
        desc.join("\n")
    ))
}

fn is_done(done: &[u64], i: usize) -> bool {
    done[i / 64] & (1 << (i % 64)) != 0
}

fn search(
    ops: &[&RegOp],
    done: &mut Vec<u64>,
    state: u64,
    seen: &mut HashSet<(Vec<u64>, u64)>,
    budget: &mut u64,
) -> bool {
    if *budget == 0 {
        return false;
    }
    *budget -= 1;
    // Finished when every operation that returned has taken effect.
    let remaining_completed = (0..ops.len()).any(|i| !is_done(done, i) && ops[i].ret.is_some());
    if !remaining_completed {
        return true;
    }
    if !seen.insert((done.clone(), state)) {
        return false;
    }
    // An operation may go next only if it was invoked before every remaining operation returned.
    let horizon = (0..ops.len())
        .filter(|&i| !is_done(done, i))
        .filter_map(|i| ops[i].ret)
        .min()
        .unwrap_or(u64::MAX);
    for i in 0..ops.len() {
        if is_done(done, i) || ops[i].call > horizon {
            continue;
        }
        let next = match ops[i].kind {
            RegKind::Write(v) => v,
            RegKind::Read(v) if v == state => state,
            RegKind::Read(_) => continue,
        };
        done[i / 64] |= 1 << (i % 64);
        if search(ops, done, next, seen, budget) {
            return true;
        }
        done[i / 64] &= !(1 << (i % 64));
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(call: u64, ret: Option<u64>, kind: RegKind) -> RegOp {
        RegOp {
            call,
            ret,
            kind,
            label: String::new(),
        }
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = [
            op(0, Some(1), RegKind::Write(1)),
            op(2, Some(3), RegKind::Read(1)),
            op(4, Some(5), RegKind::Write(2)),
            op(6, Some(7), RegKind::Read(2)),
        ];
        assert!(linearizable_register(&h).is_ok());
    }

    #[test]
    fn stale_read_after_a_completed_write_is_caught() {
        let h = [
            op(0, Some(1), RegKind::Write(1)),
            op(2, Some(3), RegKind::Write(2)),
            op(4, Some(5), RegKind::Read(1)),
        ];
        assert!(linearizable_register(&h).is_err());
    }

    #[test]
    fn new_old_inversion_is_caught() {
        // A write overlaps two reads; the first read sees the new value, the later one the old value.
        let h = [
            op(0, Some(1), RegKind::Write(1)),
            op(2, Some(20), RegKind::Write(2)),
            op(3, Some(4), RegKind::Read(2)),
            op(5, Some(6), RegKind::Read(1)),
        ];
        assert!(linearizable_register(&h).is_err());
    }

    #[test]
    fn concurrent_reads_may_see_either_value() {
        let h = [
            op(0, Some(1), RegKind::Write(1)),
            op(2, Some(20), RegKind::Write(2)),
            op(3, Some(10), RegKind::Read(2)),
            op(4, Some(11), RegKind::Read(1)),
        ];
        assert!(linearizable_register(&h).is_ok());
    }

    #[test]
    fn a_write_that_never_returned_may_or_may_not_take_effect() {
        let took = [
            op(0, None, RegKind::Write(7)),
            op(5, Some(6), RegKind::Read(7)),
        ];
        assert!(linearizable_register(&took).is_ok());
        let not = [
            op(0, None, RegKind::Write(7)),
            op(5, Some(6), RegKind::Read(0)),
        ];
        assert!(linearizable_register(&not).is_ok());
        let before_call = [
            op(5, None, RegKind::Write(7)),
            op(0, Some(1), RegKind::Read(7)),
        ];
        assert!(linearizable_register(&before_call).is_err());
    }

    #[test]
    fn reading_a_value_nobody_wrote_is_caught() {
        let h = [op(0, Some(1), RegKind::Read(9))];
        assert!(linearizable_register(&h).is_err());
    }
}
