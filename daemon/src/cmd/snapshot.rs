//! `dbqsfs snapshot`: create, list and delete a volume's snapshots (the logic is
//! `dbqsfs_fs::snapshot`; this is the command line and the connection to the cluster).

use anyhow::Result;
use dbqsfs_fs::snapshot::{self, SnapshotError};

use super::keys::KeyArgs;
use super::volume::{Connection, VolumeAt};

#[derive(clap::Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Name the volume's current committed state (instant; the volume may be mounted).
    Create {
        #[command(flatten)]
        at: VolumeAt,
        #[command(flatten)]
        key: KeyArgs,
        /// Letters, digits, '.', '_' and '-' (at most 100).
        name: String,
    },
    /// List the volume's snapshots.
    List {
        #[command(flatten)]
        at: VolumeAt,
        #[command(flatten)]
        key: KeyArgs,
    },
    /// Delete a snapshot (the volume's writer frees what only it kept).
    Delete {
        #[command(flatten)]
        at: VolumeAt,
        #[command(flatten)]
        key: KeyArgs,
        name: String,
    },
}

pub fn run(cmd: SnapshotCmd) -> Result<()> {
    let (at, key) = match &cmd {
        SnapshotCmd::Create { at, key, .. }
        | SnapshotCmd::List { at, key }
        | SnapshotCmd::Delete { at, key, .. } => (at, key),
    };
    let secret = key.secret(false)?;
    let conn = Connection::open(at)?;
    let unreachable = |e: SnapshotError| match e {
        SnapshotError::Fs(e) => conn.unreachable(e),
        e => e.into(),
    };
    let backend = conn.fs_backend(secret.as_ref())?;
    match &cmd {
        SnapshotCmd::Create { name, .. } => {
            let s = snapshot::create(&*backend, name).map_err(unreachable)?;
            println!(
                "snapshot {name:?} of volume {:?} (commit {}); mount it with `dbqsfs mount -o \
                 snapshot={name} DIR`",
                at.volume, s.commit
            );
        }
        SnapshotCmd::List { .. } => {
            let all = snapshot::list(&*backend).map_err(|e| unreachable(e.into()))?;
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
            snapshot::delete(&*backend, name).map_err(unreachable)?;
            println!("deleted snapshot {name:?} of volume {:?}", at.volume);
        }
    }
    drop(backend);
    conn.close();
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
