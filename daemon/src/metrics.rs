//! Prometheus metrics of a node (`dbqsfs node --metrics IP:PORT`) and of a mount (`-o
//! metrics=IP:PORT`): an HTTP endpoint at `http://IP:PORT/metrics` in the text format.
//!
//! Goals: what an operator graphs and alerts on, cheaply: requests served by kind of peer and
//! protocol (counters, counted where requests are dispatched), and the node's state sampled
//! every few seconds (epoch, readiness, stored bytes, free space, deferred blocks, transfers
//! running). Names start with `dbqsfs_`.
//! Non-goals: per-object or per-client labels (unbounded cardinality); a push gateway.

use crate::node::Shared;
use metrics::{counter, gauge};
use metrics_exporter_prometheus::PrometheusBuilder;
use std::net::SocketAddr;
use std::sync::Weak;
use std::time::Duration;

/// How often the sampled gauges are refreshed.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// Starts the endpoint on `addr` (on the current tokio runtime). One per process: a second call
/// fails (the recorder is global).
pub fn serve(addr: SocketAddr) -> Result<(), String> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|e| e.to_string())
}

/// Counts one request served, by the kind of peer and the protocol it spoke.
pub fn request(peer: &'static str, protocol: &'static str) {
    counter!("dbqsfs_requests_total", "peer" => peer, "protocol" => protocol).increment(1);
}

/// Samples a mount's calls to the cluster (by kind: calls, time, bytes) every [`SAMPLE_EVERY`],
/// and the bytes written to it, while `written` answers.
pub async fn sample_mount(
    stats: std::sync::Arc<crate::volume::BackendStats>,
    written: impl Fn() -> Option<u64>,
) {
    let mut every = tokio::time::interval(SAMPLE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(w) = written() else { return };
        counter!("dbqsfs_mount_written_bytes_total").absolute(w);
        for (kind, calls, micros, bytes) in stats.totals() {
            counter!("dbqsfs_mount_backend_calls_total", "kind" => kind).absolute(calls);
            counter!("dbqsfs_mount_backend_seconds_total", "kind" => kind)
                .absolute(micros / 1_000_000);
            counter!("dbqsfs_mount_backend_bytes_total", "kind" => kind).absolute(bytes);
        }
    }
}

/// Samples the node's state into gauges every [`SAMPLE_EVERY`] while the node lives.
pub async fn sample(shared: Weak<Shared>) {
    let mut every = tokio::time::interval(SAMPLE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let s = tokio::task::spawn_blocking(move || shared.status_parts())
            .await
            .ok();
        let Some(s) = s else { continue };
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
        gauge!("dbqsfs_members").set(s.members as f64);
    }
}
