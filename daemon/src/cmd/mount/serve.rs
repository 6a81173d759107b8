//! The mount process's work: connect, check or create the volume's key, take the lease, mount,
//! serve until unmounted, then store what is buffered and release the lease.

use super::args::Target;
use super::options::Opts;
use super::point::unmount_dir;
use crate::cmd::keys::{self, PASSPHRASE_ENV};
use anyhow::{anyhow, bail, Context, Result};
use dbqsfs_daemon::client::{DbqsClient, DbqsClientOptions};
use dbqsfs_daemon::files::ClusterInfo;
use dbqsfs_daemon::volume::{BackendOptions, DbqsBackend, Lease, LeaseError, LeaseTiming};
use dbqsfs_fs::crypt::{self, Encrypted, KdfCost, KeyError, Secret};
use dbqsfs_fs::{Backend, MountOptions};

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often a read-only mount forgets its cached inodes (so it sees a read-write mount's
/// changes within this plus the kernel's attribute timeout).
pub const RO_REFRESH: Duration = Duration::from_secs(2);

/// What opens the volume's key, as the options name it (a passphrase from $DBQSFS_PASSPHRASE,
/// the terminal, or a line of stdin: how the background mount gets it).
pub(super) fn secret_of(opts: &Opts) -> Result<Option<Secret>> {
    Ok(match (&opts.keyfile, opts.passphrase) {
        (Some(k), _) => Some(Secret::key_file(k)?),
        (None, true) => Some(Secret::Passphrase(keys::passphrase(
            PASSPHRASE_ENV,
            "volume passphrase: ",
            opts.encrypt,
        )?)),
        (None, false) => None,
    })
}

/// Connects, takes the lease, mounts, and serves until unmounted or `stop` is set (by SIGINT or
/// SIGTERM).
pub(super) fn serve(
    opts: &Opts,
    dir: &Path,
    target: &Target,
    secret: Option<Secret>,
    stop: &Arc<AtomicBool>,
) -> Result<()> {
    let info = ClusterInfo::load(&target.cluster_toml)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let handle = rt.handle().clone();
    let client = {
        let _g = rt.enter();
        DbqsClient::connect(
            info.genesis.clone(),
            info.client_key.clone(),
            mount_client_options(opts.op_timeout),
        )?
    };
    let owner = info.client_key.clone();
    let call_timeout = opts.op_timeout + Duration::from_secs(5);
    let new_backend = || {
        DbqsBackend::new(
            client.clone(),
            owner.clone(),
            &target.volume,
            handle.clone(),
            BackendOptions {
                call_timeout,
                ..BackendOptions::default()
            },
        )
    };
    let probe = Arc::new(new_backend());
    let cannot_reach = |e: &dyn std::fmt::Display| {
        anyhow!(
            "cannot reach the cluster of {} ({e}); check that its nodes run (`dbqsfs status \
             --cluster {}`)",
            target.cluster_toml.display(),
            target.cluster_toml.display()
        )
    };
    let plain_exists = probe
        .get_record(dbqsfs_fs::layout::HEAD_LABEL)
        .map_err(|e| cannot_reach(&e))?
        .is_some();
    let encrypted = crypt::is_encrypted(&*probe).map_err(|e| cannot_reach(&e))?;
    let volume_name = &target.volume;
    let key = match (encrypted, &secret) {
        (true, None) => bail!(
            "volume {volume_name:?} is encrypted: mount it with -o keyfile=PATH or -o passphrase"
        ),
        (true, Some(s)) => Some(crypt::open_key(&*probe, s).map_err(|e| match e {
            KeyError::Backend(b) => cannot_reach(&b),
            e => keys::explain(e, volume_name),
        })?),
        (false, Some(_)) if plain_exists => bail!(
            "volume {volume_name:?} exists and is not encrypted; encryption is chosen when a \
             volume is created: leave out -o keyfile/passphrase, or create a new volume with -o \
             encrypt,keyfile=PATH and copy the data over"
        ),
        (false, _) => None,
    };
    let exists = match &key {
        Some(k) => Encrypted::new(probe.clone(), k)
            .get_record(dbqsfs_fs::layout::HEAD_LABEL)
            .map_err(|e| cannot_reach(&e))?
            .is_some(),
        None => plain_exists,
    };
    if !exists && opts.read_only {
        bail!(
            "volume {:?} does not exist yet: mount it read-write once to create it",
            target.volume
        );
    }

    // The lease (read-write mounts only).
    let mut backend = new_backend().with_capacity_updates();
    let mut lease_task = None;
    if !opts.read_only {
        let holder = format!(
            "{} pid {} at {}",
            dbqsfs_daemon::volume::hostname(),
            std::process::id(),
            dir.display()
        );
        let lease = match rt.block_on(Lease::acquire(
            client.clone(),
            owner.clone(),
            &target.volume,
            holder,
            LeaseTiming::default(),
        )) {
            Ok(l) => l,
            Err(e @ LeaseError::Held { .. }) => bail!("{e}"),
            Err(e) => return Err(e.into()),
        };
        backend = backend.with_lease_deadline(lease.writable_until.clone());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let task = rt.spawn(async move {
            let mut lease = lease;
            lease.keep(stop_rx).await;
            lease
        });
        lease_task = Some((stop_tx, task));
    }
    // A new volume with a secret is created encrypted (its key first, after the lease is held).
    let key = match (key, &secret) {
        (None, Some(s)) => {
            tracing::info!(volume = target.volume, "creating the volume's key");
            // Under the lease now, so a read-write mount that created the volume unencrypted
            // since the probe above has finished and its head shows: look again first.
            let created = match backend.get_record(dbqsfs_fs::layout::HEAD_LABEL) {
                Ok(None) => crypt::create_key(&backend, s, KdfCost::default())
                    .map_err(|e| keys::explain(e, volume_name)),
                Ok(Some(_)) => Err(anyhow!(
                    "volume {volume_name:?} was just created unencrypted by another mount; \
                     nothing was changed"
                )),
                Err(e) => Err(cannot_reach(&e)),
            };
            match created {
                Ok(k) => Some(k),
                Err(e) => {
                    release_lease(&rt, lease_task);
                    return Err(e);
                }
            }
        }
        (key, _) => key,
    };
    if !exists {
        tracing::info!(
            volume = target.volume,
            encrypted = key.is_some(),
            "creating the volume"
        );
    }

    let defaults = MountOptions::default();
    let mopts = MountOptions {
        read_only: opts.read_only,
        n_threads: opts.threads.unwrap_or(defaults.n_threads),
        attr_ttl: opts.attr_ttl.unwrap_or(defaults.attr_ttl),
        entry_ttl: opts.entry_ttl.unwrap_or(defaults.entry_ttl),
        allow_other: opts.allow_other,
        kernel_flags: opts.kernel_flags.clone(),
        fsname: opts.fsname.clone().unwrap_or_else(|| match &opts.snapshot {
            Some(s) => format!("dbqsfs:{}@{s}", target.volume),
            None => format!("dbqsfs:{}", target.volume),
        }),
        volume: dbqsfs_fs::VolumeConfig {
            chunk_size: opts.chunk_size,
            sync: opts.sync,
            commit_interval: Some(opts.commit_interval),
            gc_interval: opts.gc_interval,
            snapshot: opts.snapshot.clone(),
            ..defaults.volume.clone()
        },
        ..defaults
    };
    let stats = backend.stats();
    let fs_backend: Arc<dyn Backend> = match &key {
        Some(k) => Arc::new(Encrypted::new(backend, k)),
        None => Arc::new(backend),
    };
    drop(key);
    let mounted = dbqsfs_fs::mount(fs_backend, dir, mopts);
    let mount = match mounted {
        Ok(m) => m,
        Err(e) => {
            release_lease(&rt, lease_task);
            return Err(anyhow!("{e}")).with_context(|| {
                format!(
                    "mounting on {} failed (is FUSE usable here? as a user, is fuse3 installed \
                     and /dev/fuse accessible?)",
                    dir.display()
                )
            });
        }
    };
    let volume = mount.volume().clone();
    if let Some(addr) = opts.metrics {
        let _g = rt.enter();
        match dbqsfs_daemon::metrics::serve(addr) {
            Ok(()) => {
                let weak = Arc::downgrade(&volume);
                let stats = stats.clone();
                rt.spawn(dbqsfs_daemon::metrics::sample_mount(move || {
                    let written = weak.upgrade()?.bytes_written();
                    Some((written, stats.totals()))
                }));
                tracing::info!(%addr, "serving metrics at /metrics");
            }
            Err(e) => tracing::warn!(%addr, error = %e, "cannot serve metrics; going on without"),
        }
    }
    tracing::info!(
        volume = target.volume,
        dir = %dir.display(),
        read_only = opts.read_only,
        "mounted"
    );

    // SIGINT/SIGTERM (also one that came while starting): unmount; the session then ends like
    // after an external unmount.
    let sig_dir = dir.to_path_buf();
    let stop = stop.clone();
    rt.spawn(async move {
        while !stop.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::info!("unmounting on signal");
        let d = sig_dir.clone();
        let r = tokio::task::spawn_blocking(move || {
            unmount_dir(&d, false).or_else(|_| unmount_dir(&d, true))
        })
        .await;
        if let Ok(Err(e)) = r {
            tracing::error!(error = %e, "unmount on signal failed");
        }
    });

    // Read-only: forget cached inodes every RO_REFRESH, so new versions show up.
    let (refresh_stop, refresh_rx) = std::sync::mpsc::channel::<()>();
    let refresher = (opts.read_only && opts.snapshot.is_none()).then(|| {
        let volume = volume.clone();
        std::thread::spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                refresh_rx.recv_timeout(RO_REFRESH)
            {
                if let Err(e) = volume.refresh() {
                    tracing::warn!(error = %e, "reading the volume's new head failed; retrying");
                }
            }
        })
    });

    // A writer's collector figures for `dbqsfs status`, and SIGUSR1 from `dbqsfs gc`.
    let reporter = (!opts.read_only).then(|| super::collect::Reporter::start(volume.clone()));

    let joined = mount.join();
    drop(reporter);
    drop(refresh_stop);
    if let Some(t) = refresher {
        let _ = t.join();
    }
    if let Err(e) = volume.sync_all() {
        tracing::error!(error = %e, "storing buffered data after unmount failed");
    } else if !opts.read_only && opts.gc_interval.is_some() {
        // What the last commits and the final checkpoint left behind goes now, not at the next
        // mount.
        match volume.collect_garbage(&mut |_| {}) {
            Ok(s) => tracing::info!(released = s.released, "collector: final pass"),
            Err(e) => {
                tracing::warn!(error = %e, "the final collector pass failed; the next writer does it")
            }
        }
    }
    release_lease(&rt, lease_task);
    tracing::info!(
        dir = %dir.display(),
        written_mib = volume.bytes_written() as f64 / (1 << 20) as f64,
        "unmounted; backend calls: {}",
        stats.summary()
    );
    drop(client);
    rt.shutdown_timeout(Duration::from_secs(2));
    joined.context("the FUSE session ended with an error")
}

/// The client options of a mount. A node killed without closing its connections (kill -9, a
/// crash, a cut cable) leaves the client holding a connection that the restarted node no longer
/// knows; it is dropped (and re-dialled) only once nothing was received on it for the idle
/// timeout. Keep-alives every second and a 5 s idle timeout make a mount use a restarted node
/// again within seconds instead of the transport's default 30 s.
pub fn mount_client_options(op_timeout: Duration) -> DbqsClientOptions {
    let defaults = DbqsClientOptions::default();
    DbqsClientOptions {
        op_timeout,
        transport: dbqsfs_net::TransportOptions {
            idle_timeout: Duration::from_secs(5),
            keep_alive_interval: Duration::from_secs(1),
            ..defaults.transport.clone()
        },
        ..defaults
    }
}

type LeaseTask = (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Lease>,
);

fn release_lease(rt: &tokio::runtime::Runtime, task: Option<LeaseTask>) {
    let Some((stop, task)) = task else { return };
    let _ = stop.send(());
    match rt.block_on(task) {
        Ok(lease) => {
            if let Err(e) = rt.block_on(lease.release()) {
                tracing::warn!(error = %e, "releasing the volume lease failed; it expires by itself");
            }
        }
        Err(e) => tracing::warn!(error = %e, "the lease keeper failed"),
    }
}
