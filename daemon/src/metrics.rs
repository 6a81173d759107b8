//! Prometheus metrics of a node (`dbqsfs node --metrics IP:PORT`) and of a mount (`-o
//! metrics=IP:PORT`): an HTTP endpoint at `http://IP:PORT/metrics` in the text format.
//!
//! Goals: what an operator graphs and alerts on, cheaply, all registered here: requests served by
//! kind of peer and protocol and their latency (histograms), replies refused as Byzantine (by what
//! was wrong), the Membership Service as this node sees it (view, agreement, probes), and the
//! node's state sampled every few seconds (epoch, readiness, stored bytes, free space, deferred
//! blocks, transfer and garbage-collection progress). A mount: its calls to the cluster by kind,
//! their latency, bytes and failures (timeouts, no space). Names start with `dbqsfs_`.
//! Non-goals: per-object or per-client labels (unbounded cardinality); a push gateway.

use crate::control::StatusParts;
use dbqsfs_core::ms::wire::MsStatus;
use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::PrometheusBuilder;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// How often the sampled gauges are refreshed.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// Starts the endpoint on `addr` (on the current tokio runtime). One per process: a second call
/// fails (the recorder is global).
pub fn serve(addr: SocketAddr) -> Result<(), String> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets(&SECONDS_BUCKETS)
        .map_err(|e| e.to_string())?
        .install()
        .map_err(|e| e.to_string())
}

/// Histogram buckets of latencies, seconds: from a local request to a stuck quorum.
const SECONDS_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0,
];

/// Counts one request served, by the kind of peer and the protocol it spoke.
pub fn request(peer: &'static str, protocol: &'static str) {
    counter!("dbqsfs_requests_total", "peer" => peer, "protocol" => protocol).increment(1);
}

/// The time a request of `protocol` took to handle, from its arrival to its answer.
pub fn request_done(protocol: &'static str, started: Instant) {
    histogram!("dbqsfs_request_seconds", "protocol" => protocol)
        .record(started.elapsed().as_secs_f64());
}

/// Content blocks whose data the node deleted because every owner released them.
pub fn released_deleted(blocks: u64) {
    counter!("dbqsfs_released_blocks_deleted_total").increment(blocks);
}

/// A client's request refused for a signature that does not verify (a forged hold or release).
pub fn forged_request() {
    counter!("dbqsfs_forged_requests_total").increment(1);
}

/// A replica's answer refused as Byzantine (`what` says how it was wrong).
pub fn misbehaviour(what: &'static str) {
    counter!("dbqsfs_byzantine_evidence_total", "what" => what).increment(1);
}

/// A mount's call to the cluster of `kind`, begun at `started`, ended: `failure` names its error
/// (`timed_out`, `no_space`, ...).
pub fn backend_call(kind: &'static str, started: Instant, failure: Option<&'static str>) {
    histogram!("dbqsfs_mount_backend_call_seconds", "kind" => kind)
        .record(started.elapsed().as_secs_f64());
    if let Some(error) = failure {
        counter!("dbqsfs_mount_backend_errors_total", "kind" => kind, "error" => error)
            .increment(1);
    }
}

/// The Membership Service as this node's MS task sees it.
pub fn ms(s: &MsStatus) {
    gauge!("dbqsfs_ms_in_agreement").set(if s.in_agreement { 1.0 } else { 0.0 });
    gauge!("dbqsfs_ms_view").set(s.view as f64);
    gauge!("dbqsfs_ms_executed").set(s.executed as f64);
    gauge!("dbqsfs_ms_epoch_age_seconds").set(s.epoch_age_ms as f64 / 1000.0);
    gauge!("dbqsfs_ms_probed_members").set(s.probes.len() as f64);
    gauge!("dbqsfs_ms_unresponsive_members").set(s.probes.iter().filter(|p| !p.2).count() as f64);
    gauge!("dbqsfs_ms_probe_failures_max")
        .set(s.probes.iter().map(|p| p.1).max().unwrap_or(0) as f64);
}

/// How often the MS task samples itself into [`ms`].
pub const MS_SAMPLE_EVERY: Duration = SAMPLE_EVERY;

/// A mount's figures: the bytes written to it, and its calls to the cluster by kind (kind,
/// calls, microseconds, bytes).
pub type MountFigures = (u64, Vec<(&'static str, u64, u64, u64)>);

/// Samples a mount's figures every [`SAMPLE_EVERY`] while `figures` answers.
pub async fn sample_mount(figures: impl Fn() -> Option<MountFigures>) {
    let mut every = tokio::time::interval(SAMPLE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some((w, totals)) = figures() else { return };
        counter!("dbqsfs_mount_written_bytes_total").absolute(w);
        for (kind, calls, micros, bytes) in totals {
            counter!("dbqsfs_mount_backend_calls_total", "kind" => kind).absolute(calls);
            counter!("dbqsfs_mount_backend_seconds_total", "kind" => kind)
                .absolute(micros / 1_000_000);
            counter!("dbqsfs_mount_backend_bytes_total", "kind" => kind).absolute(bytes);
        }
    }
}

/// Samples the node's state into gauges every [`SAMPLE_EVERY`] while `parts` gives it (blocking:
/// it runs on the blocking pool; `None` once the node is gone).
pub async fn sample(parts: impl Fn() -> Option<StatusParts> + Clone + Send + 'static) {
    let mut every = tokio::time::interval(SAMPLE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let parts = parts.clone();
        let Ok(s) = tokio::task::spawn_blocking(parts).await else {
            continue;
        };
        let Some(s) = s else { return };
        gauge!("dbqsfs_epoch").set(s.epoch as f64);
        gauge!("dbqsfs_ready").set(if s.ready { 1.0 } else { 0.0 });
        gauge!("dbqsfs_store_content_bytes").set(s.stored_bytes as f64);
        gauge!("dbqsfs_store_free_bytes").set(s.space.free as f64);
        gauge!("dbqsfs_store_size_bytes").set(s.space.size as f64);
        gauge!("dbqsfs_store_reserve_bytes").set(s.space.reserve as f64);
        gauge!("dbqsfs_store_full").set(if s.space.full { 1.0 } else { 0.0 });
        gauge!("dbqsfs_deferred_blocks").set(s.space.deferred as f64);
        gauge!("dbqsfs_transfers_running")
            .set(s.transfers.iter().filter(|t| !t.complete).count() as f64);
        let units = s.transfers.iter().flat_map(|t| &t.units);
        let (done, total, fetched) = units.fold((0, 0, 0), |(d, t, f), u| {
            (d + u.objects_done, t + u.objects_total, f + u.fetched_bytes)
        });
        gauge!("dbqsfs_transfer_objects_done").set(done as f64);
        gauge!("dbqsfs_transfer_objects_total").set(total as f64);
        gauge!("dbqsfs_transfer_fetched_bytes").set(fetched as f64);
        let (lost, collected, deleted) = s.gc.iter().fold((0, 0, 0), |(l, c, d), g| {
            (l + g.arcs_lost, c + g.arcs_collected, d + g.objects_deleted)
        });
        gauge!("dbqsfs_gc_arcs_lost").set(lost as f64);
        gauge!("dbqsfs_gc_arcs_collected").set(collected as f64);
        gauge!("dbqsfs_gc_objects_deleted").set(deleted as f64);
        gauge!("dbqsfs_members").set(s.members as f64);
    }
}
