//! How a node's transfers and collections read on a terminal (`dbqsfs status`, the progress bar
//! of `dbqsfs node`): rendering only, from the status the node reports.

use crate::control::{GcStatus, TransferStatus, UnitPhase};
use dbqsfs_core::dbqs::transfer::Arc as RingArc;
use tokio::sync::watch;

pub(crate) fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

pub(crate) fn arc_name(arc: &RingArc) -> String {
    let hex = |b: &[u8; 32]| {
        b[..4]
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<String>()
    };
    format!("{}…–{}…", hex(&arc.start), hex(&arc.end))
}

/// Lines describing a node's transfers (as its status reports them, untrusted), for `dbqsfs
/// status`: one per transfer in progress and for the newest completed, and one per unit of a
/// transfer in progress.
pub fn status_lines(transfers: &[TransferStatus]) -> Vec<String> {
    let mut lines = Vec::new();
    let mut completed = 0;
    for t in transfers {
        // Running ones, and the newest completed (the status lists those newest first).
        if t.complete {
            completed += 1;
            if completed > 1 {
                continue;
            }
        }
        let (objects, known, bytes, fetched) = t.totals();
        let (units_done, units) = t.units_done();
        let secs = (t.elapsed_ms as f64 / 1e3).max(1e-3);
        if t.complete {
            lines.push(format!(
                "transfer into epoch {}: complete in {secs:.1} s: {units} units, {objects} objects, \
                 {:.1} MB ({:.1} MB fetched, {:.1} MB/s)",
                t.epoch,
                mb(bytes),
                mb(fetched),
                mb(fetched) / secs
            ));
            continue;
        }
        let cap = match (t.rate_cap, t.yielding) {
            (Some(c), true) => format!(" (capped at {:.1} MB/s while clients are served)", mb(c)),
            (Some(c), false) => format!(" (capped at {:.1} MB/s)", mb(c)),
            (None, _) => String::new(),
        };
        lines.push(format!(
            "transfer into epoch {}: {units_done}/{units} units done, {objects}/{known} objects known \
             so far, {:.1} MB held, {:.1} MB fetched at {:.1} MB/s{cap}, {secs:.0} s",
            t.epoch,
            mb(bytes),
            mb(fetched),
            mb(fetched) / secs
        ));
        for u in &t.units {
            let phase = match u.phase {
                UnitPhase::Listing => "listing",
                UnitPhase::Fetching => "fetching",
                UnitPhase::Done => "done",
                UnitPhase::Resumed => "done before restart",
            };
            lines.push(format!(
                "  {} {phase}: {}/{} objects, {:.1} MB ({:.1} MB fetched, {:.1} MB/s)",
                arc_name(&u.arc),
                u.objects_done,
                u.objects_total,
                mb(u.bytes_done),
                mb(u.fetched_bytes),
                mb(u.rate)
            ));
        }
    }
    lines
}

/// One line summing up a node's garbage collection (as its status reports it, untrusted), for
/// `dbqsfs status`; `None` if the node never lost a range.
pub fn gc_line(gc: &[GcStatus]) -> Option<String> {
    if gc.is_empty() {
        return None;
    }
    let (mut lost, mut collected, mut deleted) = (0u64, 0u64, 0u64);
    for g in gc {
        lost = lost.saturating_add(g.arcs_lost);
        collected = collected.saturating_add(g.arcs_collected.min(g.arcs_lost));
        deleted = deleted.saturating_add(g.objects_deleted);
    }
    let running = gc.iter().any(|g| g.running && !g.complete());
    Some(format!(
        "garbage collection: {collected}/{lost} lost arcs collected, {} pending{}, {deleted} objects \
         deleted by this process",
        lost - collected,
        if running { " (running)" } else { "" }
    ))
}

/// Shows the transfers in progress as a progress bar on stderr (for a node run on a terminal)
/// until `rx`'s worker is gone.
pub async fn show_progress(mut rx: watch::Receiver<Vec<TransferStatus>>) {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    let mut bar: Option<ProgressBar> = None;
    while rx.changed().await.is_ok() {
        let transfers: Vec<TransferStatus> = rx
            .borrow_and_update()
            .iter()
            .filter(|t| !t.complete)
            .cloned()
            .collect();
        if transfers.is_empty() {
            if let Some(b) = bar.take() {
                b.finish_and_clear();
            }
            continue;
        }
        let (mut objects, mut known, mut bytes, mut fetched) = (0u64, 0u64, 0u64, 0u64);
        let (mut units_done, mut units, mut secs) = (0, 0, 0f64);
        for t in &transfers {
            let (o, k, b, f) = t.totals();
            objects += o;
            known += k;
            bytes += b;
            fetched += f;
            let (d, n) = t.units_done();
            units_done += d;
            units += n;
            secs = secs.max(t.elapsed_ms as f64 / 1e3);
        }
        let b = bar.get_or_insert_with(|| {
            let b = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr_with_hz(4));
            if let Ok(style) =
                ProgressStyle::with_template("transfer {msg} [{bar:30}] {pos}/{len} objects")
            {
                b.set_style(style);
            }
            b
        });
        let epochs: Vec<String> = transfers.iter().map(|t| t.epoch.to_string()).collect();
        // Nothing known while listing: an empty bar, not a full one.
        b.set_length(known.max(objects).max(1));
        b.set_position(objects);
        b.set_message(format!(
            "into epoch {}: units {units_done}/{units}, {:.1} MB, {:.1} MB/s",
            epochs.join(","),
            mb(bytes),
            mb(fetched) / secs.max(1e-3)
        ));
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
}
