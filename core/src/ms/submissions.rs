//! A node's submissions to the Membership Service: what it wants executed (a join, a leave, probe
//! verdicts, evidence, the end of an epoch), sent one at a time as signed requests and sent again
//! until executed.
//!
//! The agreement executes a client's requests only in the order of their sequence numbers and
//! never one at or below a number it already executed, so a node keeps one request outstanding:
//! a later one overtaking it would void it. Operations name their epoch and are void in any other,
//! so entering an epoch drops those queued for another one (the driver queues again what it still
//! wants). What is queued is kept small: a newer probe verdict about a member replaces a queued
//! one, one end of the epoch, one join and one leave are enough, and an operation already queued
//! or outstanding is not queued twice. The MS key's operations (deals, complaints) go before the
//! others: the epoch cannot end without them.
//!
//! Both the node's MS driver and the simulator drive this type; neither keeps its own queue.

use super::app::op_epoch;
use super::membership::MsOp;
use super::pbft::Request;
use crate::config::Epoch;
use crate::crypto::Keypair;
use std::collections::VecDeque;

/// The request in flight: its operation, the signed request, when it was last sent.
#[derive(Clone, Debug)]
struct Outstanding {
    op: MsOp,
    req: Request,
    sent: Option<u64>,
}

/// A node's queue of MS operations and its one outstanding request.
#[derive(Clone, Debug)]
pub struct Submissions {
    queue: VecDeque<MsOp>,
    outstanding: Option<Outstanding>,
    last_seq: u64,
    resubmit_ms: u64,
}

impl Submissions {
    /// An empty queue whose outstanding request is sent again every `resubmit_ms` until executed.
    pub fn new(resubmit_ms: u64) -> Submissions {
        Submissions {
            queue: VecDeque::new(),
            outstanding: None,
            last_seq: 0,
            resubmit_ms,
        }
    }

    /// Queues `op`; `false` if it is not needed (see the module's rules). A probe verdict replaces
    /// a queued verdict about the same member.
    pub fn push(&mut self, op: MsOp) -> bool {
        let same_kind = |o: &MsOp| std::mem::discriminant(o) == std::mem::discriminant(&op);
        let once = matches!(
            op,
            MsOp::EndEpoch { .. } | MsOp::Join { .. } | MsOp::Leave { .. }
        );
        if self.pending().any(|o| *o == op || (once && same_kind(o))) {
            return false;
        }
        if let MsOp::Probe { target, .. } = &op {
            let target = *target;
            self.queue
                .retain(|o| !matches!(o, MsOp::Probe { target: t, .. } if *t == target));
        }
        if matches!(op, MsOp::Key { .. }) {
            // The epoch ends only once the key moved: the key's operations go before the others
            // (in the order they came), not behind probe verdicts.
            let at = self
                .queue
                .iter()
                .position(|o| !matches!(o, MsOp::Key { .. }))
                .unwrap_or(self.queue.len());
            self.queue.insert(at, op);
        } else {
            self.queue.push_back(op);
        }
        true
    }

    /// The node entered `epoch`: what was queued or outstanding for another epoch is void.
    pub fn enter_epoch(&mut self, epoch: Epoch) {
        let current = |op: &MsOp| op_epoch(op).is_none_or(|e| e == epoch);
        self.queue.retain(current);
        if self.outstanding.as_ref().is_some_and(|o| !current(&o.op)) {
            self.outstanding = None;
        }
    }

    /// Whether an operation matching `f` is queued or outstanding.
    pub fn has(&self, f: impl Fn(&MsOp) -> bool) -> bool {
        self.pending().any(f)
    }

    /// The operations not executed yet: the outstanding one first, then the queue.
    pub fn pending(&self) -> impl Iterator<Item = &MsOp> {
        self.outstanding.iter().map(|o| &o.op).chain(&self.queue)
    }

    /// The outstanding request, if any.
    pub fn outstanding(&self) -> Option<&Request> {
        self.outstanding.as_ref().map(|o| &o.req)
    }

    /// These requests were executed: `true` if the outstanding one is among them (it is done, and
    /// the next one may go).
    pub fn executed(&mut self, requests: &[Request]) -> bool {
        let done = self
            .outstanding
            .as_ref()
            .is_some_and(|o| requests.iter().any(|r| r.key() == o.req.key()));
        if done {
            self.outstanding = None;
        }
        done
    }

    /// When [`Submissions::poll`] has something to send: now (`Some(0)`) if a request is waiting
    /// to go for the first time, the end of the resubmission period of the outstanding one, or
    /// `None` with nothing to send.
    pub fn next_timer(&self) -> Option<u64> {
        match &self.outstanding {
            Some(o) => Some(o.sent.map_or(0, |t| t.saturating_add(self.resubmit_ms))),
            None => (!self.queue.is_empty()).then_some(0),
        }
    }

    /// The request to send now, if any: the next operation signed as a new request when none is
    /// outstanding, or the outstanding one again once `resubmit_ms` passed since it was last
    /// sent. Sequence numbers rise; `seq_floor` must be above every number an earlier run of this
    /// node may have used (the node takes its wall clock in milliseconds shifted left by 10).
    pub fn poll(&mut self, now_ms: u64, key: &Keypair, seq_floor: u64) -> Option<Request> {
        if self.outstanding.is_none() {
            let op = self.queue.pop_front()?;
            let seq = seq_floor.max(self.last_seq + 1);
            self.last_seq = seq;
            let payload = postcard::to_allocvec(&op).expect("MS operations always encode");
            let req = Request::sign(key, seq, payload);
            self.outstanding = Some(Outstanding {
                op,
                req,
                sent: None,
            });
        }
        let o = self.outstanding.as_mut()?;
        if o.sent
            .is_some_and(|t| now_ms < t.saturating_add(self.resubmit_ms))
        {
            return None;
        }
        o.sent = Some(now_ms);
        Some(o.req.clone())
    }
}
