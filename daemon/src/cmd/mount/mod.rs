//! `dbqsfs mount` and `dbqsfs umount`.
//!
//! Goals:
//! - `dbqsfs mount DIR` with nothing else works on a fresh machine: the embedded default is a
//!   local 4-node cluster (f=1, loopback QUIC) under the data directory, created on first use,
//!   started when no mount of it is running, stopped when the last mount of it ends.
//! - Without `-f` the command daemonizes: it starts itself with `-f` in a new session (logs
//!   appended to a file it names), waits until the mount shows up in /proc/self/mountinfo and
//!   exits 0, or reports why the mount failed and exits 1.
//! - With `-f` it stays in the foreground; SIGINT/SIGTERM unmount cleanly; an external unmount
//!   (`dbqsfs umount DIR`, `fusermount3 -u DIR`, `umount DIR`) ends it after it stored everything
//!   buffered, released the volume lease and, for the last mount of the embedded cluster,
//!   stopped its nodes.
//! - Mount processes record themselves in a per-user registry (`$XDG_RUNTIME_DIR/dbqsfs/` or
//!   `/tmp/dbqsfs-<uid>/`), which is how `dbqsfs umount DIR` finds the process to wait for and
//!   how a mount knows whether it is the last one of its cluster.
//!
//! - Run as `mount.fuse.dbqsfs` (a symlink), it is mount(8)'s helper for `-t fuse.dbqsfs`, so
//!   fstab lines work; mount(8)'s generic options are accepted.
//! - SIGINT/SIGTERM at any moment end the mount cleanly (what it started is stopped); a failed
//!   mount removes the mount point it created.
//!
//! Non-goals: clusters on other machines being started or stopped from here.

mod args;
pub(crate) mod collect;
mod embedded;
mod options;
mod point;
mod registry;
mod serve;
mod umount;

pub(crate) use args::MOUNT_HELP;
pub use args::{MountArgs, UmountArgs};
pub use options::{helper_args, HELPER_NAMES};
pub use serve::mount_client_options;
pub use umount::run_umount;

use crate::cmd::common::{init_logs, open_log, UsageError};
use crate::cmd::keys::{self, PASSPHRASE_ENV};
use anyhow::{bail, Context, Result};
use args::Target;
use dbqsfs_daemon::volume::valid_volume_name;
use dbqsfs_fs::crypt::Secret;
use embedded::{cluster_up_subprocess, ensure_embedded_cluster, stop_cluster_if_unused};
use options::{parse_options, Opts};
use point::{check_mount_point, mount_path, mounted_fstype};
use registry::{register, unregister, FileLock, MountRecord};
use serve::secret_of;
use zeroize::Zeroizing;

use std::io::{Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long `dbqsfs mount` waits for the background mount to appear.
const MOUNT_WAIT: Duration = Duration::from_secs(120);

/// Entry point of `dbqsfs mount`.
pub fn run_mount(args: MountArgs) -> Result<()> {
    let opts = parse_options(&args.options)?;
    if !valid_volume_name(&args.volume) {
        return Err(UsageError(format!(
            "volume name {:?}: use letters, digits, '-', '_' and '.' (at most 128, not starting with '.')",
            args.volume
        ))
        .into());
    }
    let dir = mount_path(&args.dir).map_err(|e| UsageError(format!("{e:#}")))?;
    let mut created = false;
    let result = mount_on(&args, &opts, &dir, &mut created);
    if result.is_err() && created {
        // Only if still empty: a mount point this command made is not left behind.
        if std::fs::remove_dir(&dir).is_ok() {
            eprintln!("dbqsfs: removed the mount point {} again", dir.display());
        }
    }
    result
}

fn mount_on(args: &MountArgs, opts: &Opts, dir: &Path, created: &mut bool) -> Result<()> {
    check_mount_point(dir, opts, created)?;
    let target = Target::resolve(args)?;
    // Check the key file now, so a wrong path fails here and not in the background.
    if let Some(k) = &opts.keyfile {
        Secret::key_file(k).map_err(|e| UsageError(format!("-o keyfile: {e}")))?;
    }
    if args.foreground {
        init_logs("warn,fuser::mnt=error,dbqsfs=info,dbqsfs_daemon=info,dbqsfs_fs=info");
        foreground(args, opts, dir, &target)
    } else {
        // The background process cannot ask: the passphrase goes to it on its stdin.
        let pass = match opts.passphrase {
            true => Some(keys::passphrase(
                PASSPHRASE_ENV,
                "volume passphrase: ",
                opts.encrypt,
            )?),
            false => None,
        };
        daemonize(args, dir, &target, pass)
    }
}

/// Starts `dbqsfs mount ... -f` in a new session and waits for the mount to appear.
fn daemonize(
    args: &MountArgs,
    dir: &Path,
    target: &Target,
    pass: Option<Zeroizing<Vec<u8>>>,
) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("finding the dbqsfs executable")?;
    let log = open_log(&target.log)?;
    let start_offset = log.metadata().map(|m| m.len()).unwrap_or(0);
    // The same mount in the foreground, from the parsed arguments (this process may have been
    // called as mount(8)'s helper, with another command line).
    let mut child_args: Vec<std::ffi::OsString> = vec!["mount".into(), "--foreground".into()];
    if let Some(d) = &args.data_dir {
        child_args.extend(["--data-dir".into(), d.into()]);
    }
    if let Some(c) = &args.cluster {
        child_args.extend(["--cluster".into(), c.into()]);
    }
    if let Some(p) = args.base_port {
        child_args.extend(["--base-port".into(), p.to_string().into()]);
    }
    child_args.extend(["--volume".into(), args.volume.clone().into()]);
    for o in &args.options {
        child_args.extend(["-o".into(), o.into()]);
    }
    child_args.push(dir.into());
    let mut cmd = std::process::Command::new(exe);
    cmd.args(&child_args)
        .env("DBQSFS_DAEMON_LOG", &target.log)
        .env_remove(PASSPHRASE_ENV)
        .stdin(match pass {
            Some(_) => std::process::Stdio::piped(),
            None => std::process::Stdio::null(),
        })
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the mount process")?;
    if let (Some(p), Some(mut stdin)) = (pass, child.stdin.take()) {
        use std::io::Write;
        // A child that failed early has closed its stdin; its log says why (below).
        let _ = stdin.write_all(&p).and_then(|_| stdin.write_all(b"\n"));
    }
    let start = Instant::now();
    loop {
        if let Some(t) = mounted_fstype(dir) {
            if t.starts_with("fuse") {
                println!(
                    "mounted volume {:?} on {} (process {}); logs: {}",
                    target.volume,
                    dir.display(),
                    child.id(),
                    target.log.display()
                );
                println!("unmount with: {} umount {}", self_name(), dir.display());
                return Ok(());
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut text = String::new();
            if let Ok(mut f) = std::fs::File::open(&target.log) {
                let _ = f.seek(std::io::SeekFrom::Start(start_offset));
                let _ = f.read_to_string(&mut text);
            }
            let text = text.trim();
            // The child printed the error; its last line is the useful one.
            let msg = text
                .lines()
                .rev()
                .find(|l| l.starts_with("dbqsfs: error:"))
                .map(|l| l.trim_start_matches("dbqsfs: error:").trim().to_string())
                .unwrap_or_else(|| format!("the mount process exited with {status}"));
            eprintln!(
                "dbqsfs: the mount failed; its log is {}",
                target.log.display()
            );
            bail!("{msg}");
        }
        if start.elapsed() > MOUNT_WAIT {
            // SAFETY: kill(2) of the child we started.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            bail!(
                "{} was not mounted after {:?}; stopped the mount process. See {}",
                dir.display(),
                MOUNT_WAIT,
                target.log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How to call this program: `dbqsfs` when that is what PATH finds, else its full path.
fn self_name() -> String {
    let exe = std::env::current_exe().ok();
    let on_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("dbqsfs"))
            .find(|c| c.is_file())
    });
    match (exe, on_path) {
        (Some(e), Some(p)) if std::fs::canonicalize(&p).ok() == Some(e.clone()) => "dbqsfs".into(),
        (Some(e), _) => e.display().to_string(),
        (None, _) => "dbqsfs".into(),
    }
}

/// What a foreground mount must undo when it ends, in this order: the registry entry, then
/// (embedded, last mount) the nodes. Runs on every path out of `foreground`.
struct Cleanup {
    pid: u32,
    cluster_dir: PathBuf,
    embedded: Option<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        match &self.embedded {
            Some(data) => {
                let _lock = FileLock::take(&data.join("lock"));
                unregister(self.pid);
                stop_cluster_if_unused(&self.cluster_dir, self.pid);
            }
            None => unregister(self.pid),
        }
    }
}

fn foreground(args: &MountArgs, opts: &Opts, dir: &Path, target: &Target) -> Result<()> {
    let pid = std::process::id();
    let record = MountRecord {
        pid,
        mountpoint: dir.to_path_buf(),
        cluster_dir: target.cluster_dir.clone(),
        embedded: target.embedded.is_some(),
        volume: target.volume.clone(),
        read_only: opts.read_only,
        log: std::env::var_os("DBQSFS_DAEMON_LOG").map(PathBuf::from),
    };
    // SIGINT or SIGTERM at any moment from here on ends the mount cleanly: what was started is
    // stopped (a second one ends the process at once).
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, stop.clone())
            .and_then(|_| signal_hook::flag::register(sig, stop.clone()))
            .context("installing the signal handlers")?;
    }
    let interrupted = |what: &str| -> Result<()> {
        match stop.load(Ordering::SeqCst) {
            true => bail!("interrupted {what}; stopped what the mount had started"),
            false => Ok(()),
        }
    };
    let cleanup = match &target.embedded {
        Some(data) => {
            let _lock = FileLock::take(&data.join("lock"))?;
            ensure_embedded_cluster(data, args.base_port)?;
            let cleanup = Cleanup {
                pid,
                cluster_dir: target.cluster_dir.clone(),
                embedded: Some(data.clone()),
            };
            register(&record)?;
            cluster_up_subprocess(&target.cluster_dir)?;
            cleanup
        }
        None => {
            register(&record)?;
            Cleanup {
                pid,
                cluster_dir: target.cluster_dir.clone(),
                embedded: None,
            }
        }
    };
    let result = interrupted("while starting the cluster")
        .and_then(|_| secret_of(opts))
        .and_then(|secret| serve::serve(opts, dir, target, secret, &stop));
    drop(cleanup);
    result
}
