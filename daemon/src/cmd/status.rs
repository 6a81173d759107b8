//! `dbqsfs status`: the cluster as its committee and members report it.

use super::common::connect;
use anyhow::Result;
use dbqsfs_core::config::{Configuration, Member};
use dbqsfs_core::crypto::NodeId;
use dbqsfs_daemon::client::NodeStatus;
use dbqsfs_daemon::ms::MsStatus;
use dbqsfs_daemon::transfer;
use std::path::Path;

/// What `status` says of a node's free space: nothing while it has room; "FULL" (it refuses new
/// content blocks), and the blocks it deferred, otherwise.
pub(crate) fn space_note(s: &dbqsfs_daemon::control::SpaceStatus) -> String {
    let mib = |b: u64| b >> 20;
    let mut note = String::new();
    if s.full {
        note += &format!(
            "  FULL ({} MiB free of {} MiB, {} MiB reserved): new content blocks refused",
            mib(s.free),
            mib(s.size),
            mib(s.reserve)
        );
    }
    if s.deferred > 0 {
        note += &format!(
            "  {} blocks deferred for lack of space (stored once space is freed)",
            s.deferred
        );
    }
    note
}

/// How many members answered `status`.
pub(crate) enum Answered {
    All,
    Some,
    None,
}

/// What `status` learned: the newest configuration, the MS views of the members that answered,
/// and each member's node status (or why it did not answer).
struct Report {
    config: Configuration,
    views: Vec<MsStatus>,
    nodes: Vec<(Member, Result<NodeStatus, String>)>,
}

impl Report {
    async fn gather(cluster: &Path) -> Result<Report> {
        let client = connect(cluster)?;
        let config = client.refresh().await.config().clone();
        // Every member's MS view (probes, pending changes) and node status, all at once.
        let queries: Vec<_> = config
            .members
            .iter()
            .map(|m| {
                let c = client.clone();
                let m = m.clone();
                tokio::spawn(async move {
                    let (ms, node) = tokio::join!(c.ms_status(&m), c.node_status(&m));
                    (m, ms.ok(), node.map_err(|e| e.to_string()))
                })
            })
            .collect();
        let mut views = Vec::new();
        let mut nodes = Vec::new();
        for q in queries {
            let (m, view, node) = q.await?;
            views.extend(view);
            nodes.push((m, node));
        }
        Ok(Report {
            config,
            views,
            nodes,
        })
    }

    /// The MS view of a committee member running this epoch's agreement.
    fn agreement(&self) -> Option<&MsStatus> {
        self.views
            .iter()
            .find(|v| v.in_agreement && v.epoch == self.config.epoch)
    }

    /// How many of `id`'s watchers (of those that answered) find it unresponsive, of how many.
    fn suspicion(&self, id: &NodeId) -> (usize, usize) {
        let watchers: Vec<bool> = self
            .views
            .iter()
            .filter(|v| v.epoch == self.config.epoch)
            .filter_map(|v| v.probes.iter().find(|(t, _, _)| t == id))
            .map(|(_, _, ok)| *ok)
            .collect();
        let bad = watchers.iter().filter(|ok| !**ok).count();
        (bad, watchers.len())
    }

    fn answered(&self) -> Answered {
        match self.nodes.iter().filter(|(_, r)| r.is_err()).count() {
            0 => Answered::All,
            n if n == self.nodes.len() => Answered::None,
            _ => Answered::Some,
        }
    }

    fn print_text(&self) {
        let config = &self.config;
        let p = &config.params;
        println!(
            "epoch {}  f={}  {} members  committee of {} (f_ms={})  epoch {} s, probes every {} s, evict after {} failed",
            config.epoch,
            p.f,
            config.members.len(),
            config.committee.len(),
            p.f_ms,
            p.epoch_ms / 1000,
            p.probe_ms as f64 / 1000.0,
            p.evict_after_probes,
        );
        match self.agreement() {
            Some(v) => {
                println!(
                    "agreement: view {}  primary {}  {} operations batches executed  epoch age {} s",
                    v.view,
                    v.primary.map(|p| p.short()).unwrap_or_else(|| "?".into()),
                    v.executed,
                    v.epoch_age_ms / 1000
                );
                if let Some(pending) = &v.pending {
                    let ids =
                        |xs: &[NodeId]| xs.iter().map(|x| x.short()).collect::<Vec<_>>().join(" ");
                    println!(
                        "pending for epoch {}: joins [{}]  leaves [{}]  suspected [{}]  guilty [{}]  end votes {}",
                        config.epoch + 1,
                        ids(&pending.joins),
                        ids(&pending.leaves),
                        pending
                            .suspected
                            .iter()
                            .map(|(id, n)| format!("{}×{n}", id.short()))
                            .collect::<Vec<_>>()
                            .join(" "),
                        ids(&pending.guilty),
                        pending.end_votes
                    );
                    println!(
                        "MS key: moved to this committee by {} of the {} deals needed",
                        pending.key_dealt.min(pending.key_needed),
                        pending.key_needed
                    );
                }
            }
            None => println!("agreement: no committee member answered"),
        }
        match &config.key {
            Some(k) => println!(
                "MS key {} (certificates of later epochs are one signature under it)",
                k.commitments
                    .first()
                    .map(|c| c.iter().map(|b| format!("{b:02x}")).collect::<String>())
                    .unwrap_or_default()
            ),
            None => println!("MS key: not generated yet (certificates are committee signatures)"),
        }
        println!("(C: committee member; probes: what the probes of the member's watchers, the 3f+1 members before it on the ring, say)");
        let mut transfers = Vec::new();
        for (m, r) in &self.nodes {
            let (bad, probers) = self.suspicion(&m.id);
            print!(
                "{} {:<26} ",
                if config.committee.contains(&m.id) {
                    "C"
                } else {
                    " "
                },
                if probers == 0 {
                    "probes unknown".to_string()
                } else if bad == 0 {
                    format!("probes ok ({probers} watchers)")
                } else {
                    format!("UNRESPONSIVE to {bad} of {probers}")
                },
            );
            match r {
                Ok(s) => {
                    let mut lines = transfer::status_lines(&s.transfers);
                    lines.extend(transfer::gc_line(&s.gc));
                    if !lines.is_empty() {
                        transfers.push((m.id, lines));
                    }
                    println!(
                        "{}  {}  reachable  epoch {}  {} in {} objects{}{}",
                        m.id.short(),
                        m.addr,
                        s.epoch,
                        bytesize::ByteSize(s.stored_bytes).display().iec(),
                        s.objects,
                        if s.ready {
                            ""
                        } else {
                            "  (state transfer pending)"
                        },
                        space_note(&s.space),
                    )
                }
                Err(e) => println!("{}  {}  unreachable  ({e})", m.id.short(), m.addr),
            }
        }
        let unreachable = self.nodes.iter().filter(|(_, r)| r.is_err()).count();
        if unreachable > 0 {
            println!("{unreachable} of {} members unreachable", self.nodes.len());
        }
        for (id, lines) in transfers {
            for line in lines {
                println!("{}  {line}", id.short());
            }
        }
    }

    /// The same as one JSON document (ids in hex, sizes in bytes, times in milliseconds).
    fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        let config = &self.config;
        let p = &config.params;
        let members: Vec<_> = self
            .nodes
            .iter()
            .map(|(m, r)| {
                let (bad, probers) = self.suspicion(&m.id);
                let node = match r {
                    Ok(s) => json!({
                        "reachable": true,
                        "epoch": s.epoch,
                        "stored_bytes": s.stored_bytes,
                        "objects": s.objects,
                        "ready": s.ready,
                        "space": s.space,
                        "transfers": s.transfers,
                        "gc": s.gc,
                    }),
                    Err(e) => json!({ "reachable": false, "error": e }),
                };
                json!({
                    "id": m.id.to_hex(),
                    "addr": m.addr,
                    "committee": config.committee.contains(&m.id),
                    "probes": { "unresponsive_to": bad, "probers": probers },
                    "node": node,
                })
            })
            .collect();
        let agreement = self.agreement().map(|v| {
            let ids = |xs: &[NodeId]| xs.iter().map(|x| x.to_hex()).collect::<Vec<_>>();
            json!({
                "view": v.view,
                "primary": v.primary.map(|p| p.to_hex()),
                "executed": v.executed,
                "epoch_age_ms": v.epoch_age_ms,
                "pending": v.pending.as_ref().map(|pd| json!({
                    "joins": ids(&pd.joins),
                    "leaves": ids(&pd.leaves),
                    "suspected": pd.suspected.iter().map(|(id, n)| json!([id.to_hex(), n])).collect::<Vec<_>>(),
                    "guilty": ids(&pd.guilty),
                    "end_votes": pd.end_votes,
                    "key_dealt": pd.key_dealt,
                    "key_needed": pd.key_needed,
                })),
            })
        });
        json!({
            "epoch": config.epoch,
            "params": {
                "f": p.f,
                "f_ms": p.f_ms,
                "epoch_ms": p.epoch_ms,
                "probe_ms": p.probe_ms,
                "evict_after_probes": p.evict_after_probes,
                "freshness_ms": p.freshness_ms,
            },
            "agreement": agreement,
            "ms_key": config.key.as_ref().and_then(|k| k.commitments.first()).map(|c| c.iter().map(|b| format!("{b:02x}")).collect::<String>()),
            "members": members,
        })
    }
}

/// Prints the cluster's status, as text or as one JSON document, and says how many answered.
pub(crate) async fn status(cluster: &Path, json: bool) -> Result<Answered> {
    let report = Report::gather(cluster).await?;
    let mounts = super::mount::collect::local_mounts(cluster.parent().unwrap_or(Path::new(".")));
    if json {
        let mut doc = report.to_json();
        doc["mounts_on_this_host"] = mounts
            .iter()
            .map(|m| {
                serde_json::json!({
                    "pid": m.pid,
                    "mountpoint": m.mountpoint,
                    "volume": m.volume,
                    "read_only": m.read_only,
                    "collector": m.gc.as_ref().map(|r| serde_json::json!({
                        "passes": r.stats.passes,
                        "released": r.stats.released,
                        "pending": r.stats.pending,
                        "reachable": r.stats.reachable,
                        "kept_for_snapshots": r.stats.kept_for_snapshots,
                        "running": r.running,
                        "last_error": r.stats.last_error,
                    })),
                })
            })
            .collect();
        println!("{doc:#}");
    } else {
        report.print_text();
        if !mounts.is_empty() {
            println!("mounts on this host:");
            for m in &mounts {
                println!("  {}", m.line());
            }
        }
    }
    Ok(report.answered())
}
