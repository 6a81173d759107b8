//! `dbqsfs snapshot`: create, list and delete a volume's snapshots (the logic is
//! `dbqsfs_fs::snapshot`; this is the command line and the connection to the cluster).

use anyhow::{bail, Context, Result};
use dbqsfs_daemon::client::DbqsClient;
use dbqsfs_daemon::files::ClusterInfo;
use dbqsfs_daemon::volume::{BackendOptions, DbqsBackend};
use dbqsfs_fs::snapshot::{self, SnapshotError};
use std::path::PathBuf;
use std::time::Duration;

use crate::mount_cmd;

#[derive(clap::Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Name the volume's current committed state (instant; the volume may be mounted).
    Create {
        #[command(flatten)]
        at: VolumeAt,
        /// Letters, digits, '.', '_' and '-' (at most 100).
        name: String,
    },
    /// List the volume's snapshots.
    List {
        #[command(flatten)]
        at: VolumeAt,
    },
    /// Delete a snapshot (its data is not freed yet: dBQS has no deletion).
    Delete {
        #[command(flatten)]
        at: VolumeAt,
        name: String,
    },
}

/// Which volume of which cluster.
#[derive(clap::Args, Debug)]
pub struct VolumeAt {
    /// The cluster's description [default: the embedded cluster of --data-dir].
    #[arg(long, value_name = "FILE")]
    cluster: Option<PathBuf>,
    /// The embedded cluster's data directory [default: as for `dbqsfs mount`].
    #[arg(long, value_name = "DIR", conflicts_with = "cluster")]
    data_dir: Option<PathBuf>,
    /// The volume.
    #[arg(long, default_value = "default")]
    volume: String,
}

const TIMEOUT: Duration = Duration::from_secs(10);

pub fn run(cmd: SnapshotCmd) -> Result<()> {
    let at = match &cmd {
        SnapshotCmd::Create { at, .. }
        | SnapshotCmd::List { at }
        | SnapshotCmd::Delete { at, .. } => at,
    };
    let toml = match &at.cluster {
        Some(t) => t.clone(),
        None => mount_cmd::data_dir(at.data_dir.as_deref())?.join("cluster/cluster.toml"),
    };
    if !toml.exists() {
        bail!(
            "no cluster at {}: pass --cluster FILE, or --data-dir of the embedded cluster",
            toml.display()
        );
    }
    let info = ClusterInfo::load(&toml)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let client = {
        let _g = rt.enter();
        DbqsClient::connect(
            info.genesis.clone(),
            info.client_key.clone(),
            mount_cmd::mount_client_options(TIMEOUT),
        )?
    };
    let backend = DbqsBackend::new(
        client,
        info.client_key.clone(),
        &at.volume,
        rt.handle().clone(),
        BackendOptions {
            call_timeout: TIMEOUT + Duration::from_secs(5),
            ..BackendOptions::default()
        },
    );
    let unreachable = |e: SnapshotError| match e {
        SnapshotError::Fs(e) => anyhow::anyhow!(
            "{e}: cannot reach the cluster of {} (its nodes run while a mount of the embedded \
             cluster does; see `dbqsfs status --cluster {}`)",
            toml.display(),
            toml.display()
        ),
        e => e.into(),
    };
    match &cmd {
        SnapshotCmd::Create { name, .. } => {
            let s = snapshot::create(&backend, name).map_err(unreachable)?;
            println!(
                "snapshot {name:?} of volume {:?} (commit {}); mount it with `dbqsfs mount -o \
                 snapshot={name} DIR`",
                at.volume, s.commit
            );
        }
        SnapshotCmd::List { .. } => {
            let all = snapshot::list(&backend).map_err(|e| unreachable(e.into()))?;
            if all.is_empty() {
                println!("volume {:?} has no snapshots", at.volume);
            }
            for (name, s) in all {
                let age = std::time::SystemTime::now()
                    .duration_since(s.created.to_system())
                    .unwrap_or_default();
                println!(
                    "{name}\tcommit {}\ttaken {} ago",
                    s.commit,
                    ago(age.as_secs())
                );
            }
        }
        SnapshotCmd::Delete { name, .. } => {
            snapshot::delete(&backend, name).map_err(unreachable)?;
            println!("deleted snapshot {name:?} of volume {:?}", at.volume);
        }
    }
    drop(backend);
    rt.shutdown_timeout(Duration::from_secs(2));
    Ok(())
}

/// "3 h 5 min", "42 s".
fn ago(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs} s"),
        60..=3599 => format!("{} min", secs / 60),
        3600..=86_399 => format!("{} h {} min", secs / 3600, secs % 3600 / 60),
        _ => format!("{} d {} h", secs / 86_400, secs % 86_400 / 3600),
    }
}
