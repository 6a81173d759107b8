//! `dbqsfs gc`: a collector pass over a volume now, with a progress bar (the logic is
//! `dbqsfs_fs::Volume::collect_garbage`; a read-write mount also runs it every `-o gc` seconds).
//!
//! Only the volume's writer may release its blocks: if a mount on this host holds the volume,
//! it is asked (SIGUSR1) and followed through its figures; otherwise this command takes the
//! volume's lease and runs the pass itself.

use anyhow::{anyhow, bail, Result};
use dbqsfs_daemon::volume::{hostname, Lease, LeaseError, LeaseTiming};
use dbqsfs_fs::layout::HEAD_LABEL;
use dbqsfs_fs::{Backend, GcStats, Volume, VolumeConfig};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use super::common::cluster_toml;
use super::keys::KeyArgs;
use super::mount::collect;
use super::volume::{Connection, VolumeAt};

#[derive(clap::Args, Debug)]
pub struct GcArgs {
    #[command(flatten)]
    pub at: VolumeAt,
    #[command(flatten)]
    pub key: KeyArgs,
}

/// How long `gc` follows a mount's pass before giving up on it.
const FOLLOW_MAX: Duration = Duration::from_secs(3600);

fn bar() -> ProgressBar {
    let bar = ProgressBar::with_draw_target(
        Some(0),
        if std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    if let Ok(style) = ProgressStyle::with_template("{bar:40} {pos}/{len} blocks released {msg}") {
        bar.set_style(style);
    }
    bar
}

fn show(bar: &ProgressBar, s: &GcStats, from: u64) {
    let done = s.released.saturating_sub(from);
    bar.set_length(done + s.pending);
    bar.set_position(done);
}

fn summary(volume: &str, s: &GcStats, from: u64) -> String {
    format!(
        "volume {volume:?}: released {} blocks; it reaches {} ({} more kept for snapshots). The \
         nodes delete released blocks after their grace period (default 30 s).",
        s.released.saturating_sub(from),
        s.reachable,
        s.kept_for_snapshots
    )
}

pub fn run(args: GcArgs) -> Result<()> {
    let toml = cluster_toml(args.at.cluster.as_deref(), args.at.data_dir.as_deref())?;
    let cluster_dir = toml.parent().unwrap_or(std::path::Path::new("."));
    if let Some(pid) = collect::local_writer(cluster_dir, &args.at.volume) {
        return ask_mount(pid, &args.at.volume);
    }
    let secret = args.key.secret(false)?;
    let mut conn = Connection::open(&args.at)?;
    let holder = format!("dbqsfs gc on {} pid {}", hostname(), std::process::id());
    let lease = conn
        .rt
        .block_on(Lease::acquire(
            conn.client.clone(),
            conn.owner.clone(),
            &args.at.volume,
            holder,
            LeaseTiming::default(),
        ))
        .map_err(|e| match e {
            e @ LeaseError::Held { .. } => anyhow!(
                "{e}. A read-write mount runs the collector itself every -o gc seconds \
                 (default 5); run `dbqsfs gc` on the host of that mount to ask it for a pass now"
            ),
            e => conn.unreachable(e),
        })?;
    conn.keep_lease(lease);
    let result = (|| -> Result<GcStats> {
        let backend = conn.fs_backend(secret.as_ref())?;
        if backend
            .get_record(HEAD_LABEL)
            .map_err(|e| conn.unreachable(e))?
            .is_none()
        {
            bail!("volume {:?} does not exist yet", args.at.volume);
        }
        let volume = Volume::open_or_format(backend, VolumeConfig::default())
            .map_err(|e| conn.unreachable(e))?;
        let bar = bar();
        let stats = volume
            .collect_garbage(&mut |s| show(&bar, s, 0))
            .map_err(|e| conn.unreachable(e))?;
        bar.finish_and_clear();
        Ok(stats)
    })();
    conn.close();
    let stats = result?;
    println!("{}", summary(&args.at.volume, &stats, 0));
    Ok(())
}

/// Asks the mount process `pid` for a pass and follows it until it ends.
fn ask_mount(pid: u32, volume: &str) -> Result<()> {
    let before = collect::read_report(pid).unwrap_or_default();
    // SAFETY: kill has no memory preconditions; `pid` is a live mount process of this user.
    if unsafe { libc::kill(pid as i32, libc::SIGUSR1) } != 0 {
        bail!(
            "cannot signal the mount process {pid}: {}",
            std::io::Error::last_os_error()
        );
    }
    eprintln!("asked the mount (pid {pid}) that holds volume {volume:?} for a collector pass");
    let bar = bar();
    let started = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let Some(now) = collect::read_report(pid) else {
            if !collect::mount_alive(pid) {
                bail!("the mount process {pid} ended before its collector pass did");
            }
            continue;
        };
        show(&bar, &now.stats, before.stats.released);
        if now.asked_done > before.asked_done {
            bar.finish_and_clear();
            if let Some(e) = &now.stats.last_error {
                bail!("the mount's collector pass failed: {e} (it tries again by itself)");
            }
            println!("{}", summary(volume, &now.stats, before.stats.released));
            return Ok(());
        }
        if started.elapsed() > FOLLOW_MAX {
            bail!("the mount's collector pass has not ended after an hour; see its log");
        }
    }
}
