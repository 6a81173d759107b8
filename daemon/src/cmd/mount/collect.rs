//! A read-write mount's collector seen from outside: its figures next to the mount's registry
//! record (for `dbqsfs status` and `dbqsfs gc`), and SIGUSR1, which asks for a pass now.

use dbqsfs_fs::{GcStats, Volume};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use super::registry::registry_dir;

/// What a mount says of its collector.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct GcReport {
    pub stats: GcStats,
    /// Passes asked for with SIGUSR1 and finished.
    pub asked_done: u64,
    /// A pass asked for is running now.
    pub running: bool,
}

pub(crate) fn report_path(pid: u32) -> PathBuf {
    registry_dir().join(format!("mount-{pid}.gc.toml"))
}

pub(crate) fn read_report(pid: u32) -> Option<GcReport> {
    dbqsfs_daemon::files::read_toml(&report_path(pid)).ok()
}

/// Written aside and renamed, so a reader never sees half of it.
fn write_report(pid: u32, r: &GcReport) {
    let path = report_path(pid);
    let tmp = path.with_extension("tmp");
    let written = dbqsfs_daemon::files::write_toml(&tmp, r)
        .map_err(|e| e.to_string())
        .and_then(|_| std::fs::rename(&tmp, &path).map_err(|e| e.to_string()));
    if let Err(e) = written {
        tracing::debug!(error = %e, "writing the collector's figures");
    }
}

/// The pid of a live read-write mount of `volume` of the cluster in `cluster_dir` on this host.
pub(crate) fn local_writer(cluster_dir: &Path, volume: &str) -> Option<u32> {
    super::registry::records()
        .into_iter()
        .find(|(r, alive)| {
            *alive && !r.read_only && r.volume == volume && same_dir(&r.cluster_dir, cluster_dir)
        })
        .map(|(r, _)| r.pid)
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// A live mount of a cluster on this host, with its collector's figures (read-write mounts).
pub(crate) struct LocalMount {
    pub pid: u32,
    pub mountpoint: PathBuf,
    pub volume: String,
    pub read_only: bool,
    pub gc: Option<GcReport>,
}

/// The live mounts of the cluster in `cluster_dir` on this host.
pub(crate) fn local_mounts(cluster_dir: &Path) -> Vec<LocalMount> {
    let mut out: Vec<LocalMount> = super::registry::records()
        .into_iter()
        .filter(|(r, alive)| *alive && same_dir(&r.cluster_dir, cluster_dir))
        .map(|(r, _)| LocalMount {
            pid: r.pid,
            gc: (!r.read_only).then(|| read_report(r.pid)).flatten(),
            mountpoint: r.mountpoint,
            volume: r.volume,
            read_only: r.read_only,
        })
        .collect();
    out.sort_by_key(|m| m.pid);
    out
}

impl LocalMount {
    /// One line for `dbqsfs status`.
    pub(crate) fn line(&self) -> String {
        let mut line = format!(
            "pid {} at {}: volume {:?} {}",
            self.pid,
            self.mountpoint.display(),
            self.volume,
            if self.read_only {
                "read-only"
            } else {
                "read-write"
            }
        );
        if let Some(r) = &self.gc {
            let s = &r.stats;
            line +=
                &format!(
                "; collector: {} passes, {} blocks released, {} pending{}, reaches {}, {} kept \
                 only for snapshots",
                s.passes,
                s.released,
                s.pending,
                if r.running { " (a pass is running)" } else { "" },
                s.reachable,
                s.kept_for_snapshots
            );
            if let Some(e) = &s.last_error {
                line += &format!(", last pass failed: {e}");
            }
        }
        line
    }
}

/// Whether `pid` still runs a `dbqsfs mount`.
pub(crate) fn mount_alive(pid: u32) -> bool {
    super::registry::mount_process_alive(pid)
}

/// How often the figures are written.
const EVERY: Duration = Duration::from_secs(1);

/// Writes the volume's collector figures every second and runs a pass when SIGUSR1 comes;
/// stops (removing the figures) when dropped.
pub(super) struct Reporter {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    pid: u32,
}

impl Reporter {
    pub(super) fn start(volume: Arc<Volume>) -> Reporter {
        let pid = std::process::id();
        let asked = Arc::new(AtomicBool::new(false));
        if let Err(e) = signal_hook::flag::register(signal_hook::consts::SIGUSR1, asked.clone()) {
            tracing::warn!(error = %e, "cannot take SIGUSR1; `dbqsfs gc` will not reach this mount");
        }
        let (stop, rx) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("dbqsfs-gc-report".into())
            .spawn(move || {
                let mut report = GcReport::default();
                for tick in 0u64.. {
                    if tick % 5 == 0 {
                        report.stats = volume.gc_stats();
                        write_report(pid, &report);
                    }
                    if asked.swap(false, Ordering::SeqCst) {
                        report.running = true;
                        write_report(pid, &report);
                        let r = volume.collect_garbage(&mut |s| {
                            report.stats = s.clone();
                            write_report(pid, &report);
                        });
                        if let Err(e) = &r {
                            tracing::warn!(error = %e, "the collector pass asked for failed");
                        }
                        report.stats = volume.gc_stats();
                        report.running = false;
                        report.asked_done += 1;
                        write_report(pid, &report);
                        continue;
                    }
                    match rx.recv_timeout(EVERY / 5) {
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        _ => return,
                    }
                }
            })
            .ok();
        Reporter {
            stop: Some(stop),
            thread,
            pid,
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(report_path(self.pid));
    }
}
