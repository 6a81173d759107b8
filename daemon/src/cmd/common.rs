//! What the subcommands share: usage errors, logging, the async runtime, a client of a cluster.

use anyhow::{Context, Result};
use dbqsfs_daemon::client::{DbqsClient, DbqsClientOptions};
use dbqsfs_daemon::files::ClusterInfo;
use std::io::IsTerminal;
use std::path::Path;

/// A usage error found after parsing: printed like clap's and exits with code 2.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

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
