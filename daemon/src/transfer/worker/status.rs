//! Progress of the runs, published for `dbqsfs status` and the progress bar, and logged.

use super::*;

impl UnitStats {
    pub(super) fn status(&self) -> UnitStatus {
        let end = match self.phase {
            UnitPhase::Fetching => Some(Instant::now()),
            _ => self.last_fetch,
        };
        let rate = match (self.first_fetch, end) {
            (Some(a), Some(b)) if b > a => {
                (self.fetched_bytes as f64 / (b - a).as_secs_f64()) as u64
            }
            _ => 0,
        };
        UnitStatus {
            arc: self.arc,
            phase: self.phase,
            objects_done: self.objects_done,
            objects_total: self.objects_total,
            bytes_done: self.bytes_done,
            fetched_objects: self.fetched_objects,
            fetched_bytes: self.fetched_bytes,
            rate,
        }
    }
}

impl Running {
    pub(super) fn unit_of(&mut self, id: &ObjectId) -> Option<&mut UnitStats> {
        self.units.iter_mut().find(|u| u.arc.contains(id))
    }

    pub(super) fn status(&self, epoch: Epoch, complete: bool) -> TransferStatus {
        TransferStatus {
            epoch,
            complete,
            elapsed_ms: self.started.elapsed().as_millis() as u64,
            units: self.units.iter().map(UnitStats::status).collect(),
            rate_cap: None,
            yielding: false,
        }
    }
}

impl Worker {
    pub(super) fn snapshot(&self) -> Vec<TransferStatus> {
        let cap = self.cap();
        self.transfers
            .iter()
            .map(|(e, r)| TransferStatus {
                rate_cap: cap.map(|(rate, _)| rate),
                yielding: cap.is_some_and(|(_, busy)| busy),
                ..r.status(*e, false)
            })
            .chain(self.finished.iter().rev().cloned())
            .collect()
    }

    /// Publishes the status (at most every [`PUBLISH_EVERY`] unless `now`), and logs progress
    /// every [`LOG_EVERY`] while transfers run.
    pub(super) fn publish(&mut self, now: bool) {
        if self.dirty && (now || self.published_at.elapsed() >= PUBLISH_EVERY) {
            self.status.send_replace(self.snapshot());
            self.dirty = false;
            self.published_at = Instant::now();
        }
        if !self.transfers.is_empty() && self.logged_at.elapsed() >= LOG_EVERY {
            self.logged_at = Instant::now();
            for (e, r) in &self.transfers {
                let s = r.status(*e, false);
                let (objects, known, bytes, fetched) = s.totals();
                let (units_done, units) = s.units_done();
                info!(
                    epoch = e,
                    units = format!("{units_done}/{units}"),
                    objects = format!("{objects}/{known}"),
                    bytes,
                    mb_per_s = format!(
                        "{:.1}",
                        fetched as f64 / 1e6 / r.started.elapsed().as_secs_f64().max(1e-3)
                    ),
                    "state transfer in progress"
                );
            }
        }
    }
}
