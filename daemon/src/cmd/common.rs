//! What the subcommands share: usage errors, logging, the async runtime, a client of a cluster.

use anyhow::{bail, Context, Result};
use dbqsfs_daemon::client::{DbqsClient, DbqsClientOptions};
use dbqsfs_daemon::files::ClusterInfo;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

/// A usage error found after parsing: printed like clap's and exits with code 2.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// A log file past this size is moved aside (to `NAME.1`, replacing the one before) when a
/// process starts writing to it, so logs take at most about twice this per file.
pub(crate) const LOG_ROTATE_BYTES: u64 = 64 << 20;

/// Opens a log file for appending, first rotating it if it grew past [`LOG_ROTATE_BYTES`].
pub(crate) fn open_log(path: &Path) -> Result<std::fs::File> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() > LOG_ROTATE_BYTES) {
        let mut old = path.as_os_str().to_owned();
        old.push(".1");
        std::fs::rename(path, &old)
            .with_context(|| format!("rotating the log file {}", path.display()))?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening the log file {}", path.display()))
}

/// Sets up logging on stderr with RUST_LOG, defaulting to `default`.
pub fn init_logs(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub(crate) fn connect(cluster: &Path) -> Result<DbqsClient> {
    let info = ClusterInfo::load(cluster)?;
    Ok(DbqsClient::connect(
        info.genesis,
        info.client_key,
        DbqsClientOptions::default(),
    )?)
}

/// Where the embedded default keeps its data: `--data-dir`, `$XDG_DATA_HOME/dbqsfs`,
/// `~/.local/share/dbqsfs`.
pub(crate) fn data_dir(arg: Option<&Path>) -> Result<PathBuf> {
    if let Some(d) = arg {
        return Ok(d.to_path_buf());
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(x).join("dbqsfs"));
    }
    match std::env::var_os("HOME").filter(|x| !x.is_empty()) {
        Some(h) => Ok(PathBuf::from(h).join(".local/share/dbqsfs")),
        None => bail!("neither --data-dir, XDG_DATA_HOME nor HOME is set: pass --data-dir DIR"),
    }
}

/// The cluster a command talks to: `--cluster FILE`, else the embedded default's under
/// `--data-dir` (or its default place), which must exist.
pub(crate) fn cluster_toml(cluster: Option<&Path>, data_dir_arg: Option<&Path>) -> Result<PathBuf> {
    if let Some(c) = cluster {
        if !c.exists() {
            bail!(
                "--cluster {}: no such file (cluster.toml of `dbqsfs cluster init`)",
                c.display()
            );
        }
        return Ok(c.to_path_buf());
    }
    let toml = data_dir(data_dir_arg)?.join("cluster/cluster.toml");
    if !toml.exists() {
        bail!(
            "no embedded cluster at {} (a first `dbqsfs mount DIR` creates it): pass --cluster \
             FILE for a cluster of `dbqsfs cluster init`, or --data-dir DIR",
            toml.display()
        );
    }
    Ok(toml)
}
