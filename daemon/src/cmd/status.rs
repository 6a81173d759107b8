//! `dbqsfs status`: the cluster as its committee and members report it.

use super::common::connect;
use anyhow::Result;
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

pub(crate) async fn status(cluster: &Path) -> Result<Answered> {
    let client = connect(cluster)?;
    let chain = client.refresh().await;
    let config = chain.config().clone();
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
    // The MS view of every member: the committee members' probes and pending changes.
    let ms_queries: Vec<_> = config
        .members
        .iter()
        .map(|m| {
            let c = client.clone();
            let m = m.clone();
            tokio::spawn(async move { c.ms_status(&m).await.ok() })
        })
        .collect();
    let mut views = Vec::new();
    for h in ms_queries {
        if let Some(v) = h.await? {
            views.push(v);
        }
    }
    // Probe state: how many committee members (of those that answered) report each member
    // unresponsive.
    let suspicion = |id: &dbqsfs_core::crypto::NodeId| -> (usize, usize) {
        let probers: Vec<_> = views
            .iter()
            .filter(|v| v.in_agreement && v.epoch == config.epoch)
            .collect();
        let bad = probers
            .iter()
            .filter(|v| v.probes.iter().any(|(t, _, ok)| t == id && !ok))
            .count();
        (bad, probers.len())
    };
    if let Some(v) = views
        .iter()
        .find(|v| v.in_agreement && v.epoch == config.epoch)
    {
        println!(
            "agreement: view {}  primary {}  {} operations batches executed  epoch age {} s",
            v.view,
            v.primary.map(|p| p.short()).unwrap_or_else(|| "?".into()),
            v.executed,
            v.epoch_age_ms / 1000
        );
        if let Some(pending) = &v.pending {
            let ids = |xs: &[dbqsfs_core::crypto::NodeId]| {
                xs.iter().map(|x| x.short()).collect::<Vec<_>>().join(" ")
            };
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
        }
    } else {
        println!("agreement: no committee member answered");
    }
    let queries = config.members.iter().map(|m| {
        let c = client.clone();
        let m = m.clone();
        tokio::spawn(async move {
            let r = c.node_status(&m).await;
            (m, r)
        })
    });
    let handles: Vec<_> = queries.collect();
    println!("(C: committee member; probes: what the committee's probes of the member say)");
    let mut unreachable = 0;
    let mut transfers = Vec::new();
    for h in handles {
        let (m, r) = h.await?;
        let (bad, probers) = suspicion(&m.id);
        // "C" marks committee members; then what the committee's probes say.
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
                format!("probes ok ({probers} probers)")
            } else {
                format!("UNRESPONSIVE to {bad} of {probers}")
            },
        );
        if let Ok(s) = &r {
            let mut lines = transfer::status_lines(&s.transfers);
            lines.extend(transfer::gc_line(&s.gc));
            if !lines.is_empty() {
                transfers.push((m.id, lines));
            }
        }
        match r {
            Ok(s) => println!(
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
            ),
            Err(e) => {
                unreachable += 1;
                println!("{}  {}  unreachable  ({e})", m.id.short(), m.addr)
            }
        }
    }
    if unreachable > 0 {
        println!(
            "{unreachable} of {} members unreachable",
            config.members.len()
        );
    }
    for (id, lines) in transfers {
        for line in lines {
            println!("{}  {line}", id.short());
        }
    }
    Ok(match unreachable {
        0 => Answered::All,
        n if n == config.members.len() => Answered::None,
        _ => Answered::Some,
    })
}
