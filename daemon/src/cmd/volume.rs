//! `dbqsfs volume`: create an encrypted volume and change the wrapping of its key; and what the
//! volume commands share: which volume of which cluster ([`VolumeAt`]), the connection to it
//! ([`Connection`]), the secret that opens an encrypted volume ([`KeyArgs`], [`passphrase`]) and
//! the volume's backend as the filesystem must see it ([`fs_backend`]).
//!
//! The key logic is `dbqsfs_fs::crypt`; this is the command line around it.

use anyhow::{anyhow, bail, Context, Result};
use dbqsfs_core::crypto::Keypair;
use dbqsfs_daemon::client::DbqsClient;
use dbqsfs_daemon::files::ClusterInfo;
use dbqsfs_daemon::volume::{
    hostname, valid_volume_name, BackendOptions, DbqsBackend, Lease, LeaseError, LeaseTiming,
};
use dbqsfs_fs::crypt::{self, Encrypted, KdfCost, KeyError, Secret};
use dbqsfs_fs::layout::HEAD_LABEL;
use dbqsfs_fs::Backend;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::common::{cluster_toml, UsageError};
use super::keys::{explain, passphrase, KeyArgs, NEW_PASSPHRASE_ENV};
use super::mount;

#[derive(clap::Subcommand, Debug)]
pub enum VolumeCmd {
    /// Create a volume now (a mount creates one on first use; use this for an encrypted one).
    Create {
        #[command(flatten)]
        at: VolumeAt,
        /// Encrypt the volume (needs --keyfile or --passphrase).
        #[arg(long)]
        encrypt: bool,
        #[command(flatten)]
        key: KeyArgs,
    },
    /// Show or set the volume's quota: the most bytes its files may hold.
    #[command(
        long_about = "The quota bounds the sum of the sizes of the volume's files (what \
    `df` on a mount shows as used; `df` shows the quota as the size). A write, truncation or \
    allocation that would pass it fails with EDQUOT (\"Disk quota exceeded\"), changing nothing; \
    removing files lets writes go on. A mount takes a new quota up within 5 s. Without BYTES, \
    shows the quota."
    )]
    Quota {
        #[command(flatten)]
        at: VolumeAt,
        #[command(flatten)]
        key: KeyArgs,
        /// Bytes (a number, optionally with K, M, G or T: powers of 1024), or `none`.
        bytes: Option<String>,
    },
    /// Change what opens an encrypted volume's key (the data is not rewritten).
    Rekey {
        #[command(flatten)]
        at: VolumeAt,
        /// What opens the key now.
        #[command(flatten)]
        key: KeyArgs,
        /// The new key file (at least 32 bytes).
        #[arg(long, value_name = "PATH", conflicts_with = "new_passphrase")]
        new_keyfile: Option<PathBuf>,
        /// A new passphrase (asked on the terminal, or $DBQSFS_NEW_PASSPHRASE).
        #[arg(long)]
        new_passphrase: bool,
    },
}

/// Which volume of which cluster.
#[derive(clap::Args, Debug)]
pub struct VolumeAt {
    /// The cluster's description [default: the embedded cluster of --data-dir].
    #[arg(long, value_name = "FILE")]
    pub cluster: Option<PathBuf>,
    /// The embedded cluster's data directory [default: as for `dbqsfs mount`].
    #[arg(long, value_name = "DIR", conflicts_with = "cluster")]
    pub data_dir: Option<PathBuf>,
    /// The volume.
    #[arg(long, default_value = "default")]
    pub volume: String,
}

/// A runtime and a dBQS client of a cluster, and a backend of one of its volumes.
pub struct Connection {
    pub rt: tokio::runtime::Runtime,
    pub backend: Arc<DbqsBackend>,
    pub client: DbqsClient,
    pub owner: Keypair,
    /// The cluster's description, for messages.
    pub toml: PathBuf,
    pub volume: String,
    /// The volume's lease while kept ([`Connection::keep_lease`]).
    lease: Option<(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<Lease>,
    )>,
}

const TIMEOUT: Duration = Duration::from_secs(10);

impl Connection {
    pub fn open(at: &VolumeAt) -> Result<Connection> {
        if !valid_volume_name(&at.volume) {
            return Err(UsageError(format!(
                "volume name {:?}: use letters, digits, '-', '_' and '.'",
                at.volume
            ))
            .into());
        }
        let toml = cluster_toml(at.cluster.as_deref(), at.data_dir.as_deref())?;
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
                mount::mount_client_options(TIMEOUT),
            )?
        };
        let backend = Arc::new(DbqsBackend::new(
            client.clone(),
            info.client_key.clone(),
            &at.volume,
            rt.handle().clone(),
            BackendOptions {
                call_timeout: TIMEOUT + Duration::from_secs(5),
                ..BackendOptions::default()
            },
        ));
        Ok(Connection {
            rt,
            backend,
            client,
            owner: info.client_key.clone(),
            toml,
            volume: at.volume.clone(),
            lease: None,
        })
    }

    /// The error for a cluster that did not answer.
    pub fn unreachable(&self, e: impl std::fmt::Display) -> anyhow::Error {
        anyhow!(
            "{e}: cannot reach the cluster of {} (its nodes run while a mount of the embedded \
             cluster does; see `dbqsfs status --cluster {}`)",
            self.toml.display(),
            self.toml.display()
        )
    }

    /// The volume's backend as the filesystem must see it: through its encryption when it has a
    /// key (which `secret` must open), as it is otherwise.
    pub fn fs_backend(&self, secret: Option<&Secret>) -> Result<Arc<dyn Backend>> {
        let raw = self.backend.clone();
        let volume = &self.volume;
        let encrypted = crypt::is_encrypted(&raw).map_err(|e| self.unreachable(e))?;
        match (encrypted, secret) {
            (false, None) => Ok(raw),
            (false, Some(_)) => Err(explain(KeyError::NotEncrypted, volume)),
            (true, None) => bail!(
                "volume {volume:?} is encrypted: give its key file (--keyfile PATH, or -o \
                 keyfile=PATH for a mount) or its passphrase (--passphrase, -o passphrase)"
            ),
            (true, Some(s)) => {
                let key = crypt::open_key(&raw, s).map_err(|e| match e {
                    KeyError::Backend(b) => self.unreachable(b),
                    e => explain(e, volume),
                })?;
                Ok(Arc::new(Encrypted::new(raw, &key)))
            }
        }
    }

    /// Keeps `lease` (renewed in the background) until `close`, which releases it; writes
    /// through `backend` stop if it runs out.
    pub fn keep_lease(&mut self, lease: Lease) {
        let backend = DbqsBackend::new(
            self.client.clone(),
            self.owner.clone(),
            &self.volume,
            self.rt.handle().clone(),
            BackendOptions {
                call_timeout: TIMEOUT + Duration::from_secs(5),
                ..BackendOptions::default()
            },
        )
        .with_lease_deadline(lease.writable_until.clone());
        self.backend = Arc::new(backend);
        let (stop, stop_rx) = tokio::sync::oneshot::channel();
        let task = self.rt.spawn(async move {
            let mut lease = lease;
            lease.keep(stop_rx).await;
            lease
        });
        self.lease = Some((stop, task));
    }

    pub fn close(self) {
        drop(self.backend);
        if let Some((stop, task)) = self.lease {
            let _ = stop.send(());
            if let Ok(lease) = self.rt.block_on(task) {
                if let Err(e) = self.rt.block_on(lease.release()) {
                    eprintln!(
                        "dbqsfs: releasing the volume lease: {e} (it expires by itself in 30 s)"
                    );
                }
            }
        }
        self.rt.shutdown_timeout(Duration::from_secs(2));
    }
}

/// "10G" -> 10 GiB; "none" -> no quota.
fn parse_quota(v: &str) -> Result<Option<u64>, UsageError> {
    if v == "none" {
        return Ok(None);
    }
    let (num, shift) = match v.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => 64,
            };
            (&v[..i], shift)
        }
        _ => (v, 0),
    };
    num.parse::<u64>()
        .ok()
        .filter(|_| shift < 64)
        .and_then(|n| n.checked_mul(1u64 << shift))
        .map(Some)
        .ok_or_else(|| {
            UsageError(format!(
                "quota {v:?}: expected bytes, optionally with K, M, G or T (e.g. 10G), or none"
            ))
        })
}

pub fn run(cmd: VolumeCmd) -> Result<()> {
    match cmd {
        VolumeCmd::Quota { at, key, bytes } => {
            let quota = bytes.as_deref().map(parse_quota).transpose()?;
            let secret = key.secret(false)?;
            let conn = Connection::open(&at)?;
            let backend = conn.fs_backend(secret.as_ref())?;
            let mib = |b: u64| format!("{b} bytes ({:.1} MiB)", b as f64 / (1u64 << 20) as f64);
            match quota {
                None => match dbqsfs_fs::quota::read(&*backend).map_err(|e| conn.unreachable(e))? {
                    Some(q) => println!("volume {:?}: quota {}", at.volume, mib(q)),
                    None => println!("volume {:?} has no quota", at.volume),
                },
                Some(q) => {
                    dbqsfs_fs::quota::set(&*backend, q).map_err(|e| conn.unreachable(e))?;
                    match q {
                        Some(q) => println!(
                            "volume {:?}: quota {} (a mount takes it up within 5 s)",
                            at.volume,
                            mib(q)
                        ),
                        None => println!("volume {:?}: quota removed", at.volume),
                    }
                }
            }
            drop(backend);
            conn.close();
            Ok(())
        }
        VolumeCmd::Create { at, encrypt, key } => {
            let secret = key.secret(true)?;
            if encrypt && secret.is_none() {
                return Err(
                    UsageError("--encrypt needs --keyfile PATH or --passphrase".into()).into(),
                );
            }
            if !encrypt && secret.is_some() {
                return Err(
                    UsageError("--keyfile and --passphrase go with --encrypt".into()).into(),
                );
            }
            let conn = Connection::open(&at)?;
            // Hold the volume's lease meanwhile, so no mount creates it unencrypted between
            // the check and the key.
            let holder = format!("dbqsfs volume create on {}", hostname());
            let lease = conn
                .rt
                .block_on(Lease::acquire(
                    conn.client.clone(),
                    conn.owner.clone(),
                    &at.volume,
                    holder,
                    LeaseTiming::default(),
                ))
                .map_err(|e| match e {
                    e @ LeaseError::Held { .. } => anyhow!("{e}"),
                    e => conn.unreachable(e),
                })?;
            let raw = &*conn.backend;
            let exists = raw
                .get_record(HEAD_LABEL)
                .map_err(|e| conn.unreachable(e))?
                .is_some()
                || crypt::is_encrypted(raw).map_err(|e| conn.unreachable(e))?;
            if exists {
                bail!("volume {:?} already exists", at.volume);
            }
            match secret {
                Some(s) => {
                    crypt::create_key(raw, &s, KdfCost::default())
                        .map_err(|e| explain(e, &at.volume))?;
                    println!(
                        "created encrypted volume {:?}; mount it with `dbqsfs mount --volume {} \
                         -o {} DIR` (keep the key file or passphrase: without it the data is lost)",
                        at.volume,
                        at.volume,
                        match &key.keyfile {
                            Some(p) => format!("keyfile={}", p.display()),
                            None => "passphrase".into(),
                        }
                    );
                }
                None => println!(
                    "volume {:?} is created by its first read-write mount: `dbqsfs mount \
                     --volume {} DIR`",
                    at.volume, at.volume
                ),
            }
            if let Err(e) = conn.rt.block_on(lease.release()) {
                eprintln!("dbqsfs: releasing the volume lease: {e} (it expires by itself in 30 s)");
            }
            conn.close();
            Ok(())
        }
        VolumeCmd::Rekey {
            at,
            key,
            new_keyfile,
            new_passphrase,
        } => {
            let Some(old) = key.secret(false)? else {
                return Err(UsageError(
                    "rekey needs what opens the key now: --keyfile PATH or --passphrase".into(),
                )
                .into());
            };
            let new = match (new_keyfile.as_deref(), new_passphrase) {
                (Some(p), _) => Secret::key_file(p)?,
                (None, true) => Secret::Passphrase(passphrase(
                    NEW_PASSPHRASE_ENV,
                    "new volume passphrase: ",
                    true,
                )?),
                (None, false) => {
                    return Err(UsageError(
                        "rekey needs the new secret: --new-keyfile PATH or --new-passphrase".into(),
                    )
                    .into())
                }
            };
            let conn = Connection::open(&at)?;
            crypt::rekey(&conn.backend, &old, &new, KdfCost::default()).map_err(|e| match e {
                KeyError::Backend(b) => conn.unreachable(b),
                e => explain(e, &at.volume),
            })?;
            println!(
                "volume {:?} now opens with {}",
                at.volume,
                match &new_keyfile {
                    Some(p) => format!("key file {}", p.display()),
                    None => "the new passphrase".into(),
                }
            );
            conn.close();
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_quota;

    #[test]
    fn quotas_parse_with_binary_suffixes() {
        assert_eq!(parse_quota("1000").unwrap(), Some(1000));
        assert_eq!(parse_quota("10G").unwrap(), Some(10 << 30));
        assert_eq!(parse_quota("3m").unwrap(), Some(3 << 20));
        assert_eq!(parse_quota("none").unwrap(), None);
        assert!(parse_quota("10X").is_err());
        assert!(parse_quota("G").is_err());
        assert!(parse_quota("99999999T").is_err());
    }
}
