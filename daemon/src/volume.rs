//! [`DbqsBackend`]: the filesystem's [`Backend`] over a dBQS cluster, and the volume [`Lease`].
//!
//! Goals:
//! - Chunks are content blocks; records are public-key blocks of the volume owner's key with the
//!   label `vol/<volume>/<fs label>`, written at exactly the version the filesystem chose.
//! - Blocking calls for the FUSE request threads, made by `Handle::block_on` on a runtime the
//!   caller owns (fuser's threads are not runtime threads, so this is allowed).
//! - Bounded failure: every call ends within [`BackendOptions::call_timeout`]. The client gives up
//!   after its operation timeout (no quorum answered → `TimedOut`); the outer timeout only guards
//!   against a stuck driver. So a system call that meets an unreachable cluster fails with
//!   `ETIMEDOUT` or `EIO` after at most one call timeout (the filesystem stops at the first failed
//!   backend call) and never hangs the mount.
//! - One read-write mount per volume: a lease public-key block `vol/<volume>/lease` names the
//!   holder and an expiry time. A read-write backend refuses writes once its lease is no longer
//!   known to be valid, so a mount cut off from the cluster for longer than the lease cannot
//!   overwrite the work of a mount that took the lease over after expiry.
//!
//! Non-goals: volume listing and deletion, garbage collection, several owners per volume.

use crate::client::{ClientError, DbqsClient, Owner};
use crate::control::SpaceStatus;
use dbqsfs_core::crypto::{Keypair, ObjectId};
use dbqsfs_core::dbqs::client::OpError;
use dbqsfs_core::dbqs::msg::Reject;
use dbqsfs_core::object::{pk_block_id, ObjectError, MAX_BLOCK};
use dbqsfs_fs::{Backend, BackendError, Capacity, ChunkId, Record};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::runtime::Handle;

/// The label prefix of every record of volume `name`.
pub fn volume_prefix(name: &str) -> Vec<u8> {
    format!("vol/{name}/").into_bytes()
}

/// Whether `name` is usable as a volume name (it becomes part of block labels and file names).
pub fn valid_volume_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && !name.starts_with('.')
}

/// Options of a [`DbqsBackend`].
#[derive(Clone, Debug)]
pub struct BackendOptions {
    /// The outer bound on one backend call. Set it a little above the client's operation timeout.
    pub call_timeout: Duration,
    /// After a call timed out (no quorum answered), calls fail at once for this long instead of
    /// each waiting out its own timeout, so a burst of system calls during an outage ends within
    /// about one timeout rather than one timeout each; the first call after the window tries again.
    pub fail_fast: Duration,
}

impl Default for BackendOptions {
    fn default() -> Self {
        BackendOptions {
            call_timeout: Duration::from_secs(20),
            fail_fast: Duration::from_secs(3),
        }
    }
}

/// Milliseconds since the Unix epoch by the local clock.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// Calls a [`DbqsBackend`] made and the time they took, by kind (for profiles and the unmount
/// log line).
#[derive(Debug, Default)]
pub struct BackendStats {
    calls: [AtomicU64; 5],
    micros: [AtomicU64; 5],
    bytes: [AtomicU64; 5],
}

const KINDS: [&str; 5] = [
    "put_chunk",
    "get_chunk",
    "get_record",
    "put_record",
    "release_chunks",
];

impl BackendStats {
    fn add(&self, kind: usize, started: std::time::Instant, bytes: usize) {
        self.calls[kind].fetch_add(1, Ordering::Relaxed);
        self.micros[kind].fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        self.bytes[kind].fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Per kind of call: its name, calls, total microseconds and bytes so far.
    pub fn totals(&self) -> Vec<(&'static str, u64, u64, u64)> {
        KINDS
            .iter()
            .enumerate()
            .map(|(i, k)| {
                (
                    *k,
                    self.calls[i].load(Ordering::Relaxed),
                    self.micros[i].load(Ordering::Relaxed),
                    self.bytes[i].load(Ordering::Relaxed),
                )
            })
            .collect()
    }

    /// One line: per kind, calls, mean latency and bytes.
    pub fn summary(&self) -> String {
        KINDS
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let n = self.calls[i].load(Ordering::Relaxed);
                let us = self.micros[i].load(Ordering::Relaxed);
                let b = self.bytes[i].load(Ordering::Relaxed);
                format!(
                    "{k}: {n} calls, mean {:.2} ms, {:.1} MiB",
                    if n == 0 {
                        0.0
                    } else {
                        us as f64 / n as f64 / 1000.0
                    },
                    b as f64 / (1 << 20) as f64
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// The filesystem's view of one volume of a dBQS cluster.
pub struct DbqsBackend {
    stats: Arc<BackendStats>,
    client: DbqsClient,
    owner: Keypair,
    /// The volume's key as the holder of the volume's chunks (`dbqs::refs`).
    holder: Owner,
    prefix: Vec<u8>,
    handle: Handle,
    opts: BackendOptions,
    /// For a read-write mount: writes are refused at and after this time (Unix ms), which the
    /// lease keeper moves forward on each renewal. `None`: no lease check (tests, read-only).
    writable_until: Option<Arc<AtomicU64>>,
    /// Calls fail at once until this time (Unix ms) after a call timed out.
    fail_fast_until: AtomicU64,
    /// What the cluster can hold, as last learned ([`DbqsBackend::with_capacity_updates`]).
    capacity: Arc<std::sync::Mutex<Option<Capacity>>>,
}

/// How many releases one `release_chunks` call keeps in flight.
const RELEASES_IN_FLIGHT: usize = 64;

/// How often a mount asks the members for their space (for `df`).
const CAPACITY_EVERY: Duration = Duration::from_secs(10);

/// What a cluster of `n` members with groups of `3f+1` can still hold for clients, from the
/// members' `spaces` (at least `2f+1` answers, else `None`). Blocks spread evenly over the ring
/// and each lives on the `3f+1` members of its group, so the cluster holds `n/(3f+1)` times what
/// one member holds, and it is full when its fullest member is: the answer scales a member's room
/// above its reserve. Of the answers it takes the `(f+1)`-th smallest, so `f` lying members cannot
/// move it below or above what correct members report.
pub fn capacity_of(spaces: &[SpaceStatus], f: usize, n: usize) -> Option<Capacity> {
    if spaces.len() < 2 * f + 1 || n == 0 {
        return None;
    }
    let pick = |mut v: Vec<u64>| {
        v.sort_unstable();
        v[f]
    };
    let free = pick(
        spaces
            .iter()
            .map(|s| s.free.saturating_sub(s.reserve))
            .collect(),
    );
    let size = pick(
        spaces
            .iter()
            .map(|s| s.size.saturating_sub(s.reserve))
            .collect(),
    );
    let scale = |x: u64| (u128::from(x) * n as u128 / (3 * f as u128 + 1)) as u64;
    Some(Capacity {
        total: scale(size),
        available: scale(free).min(scale(size)),
    })
}

/// Asks every member of the newest configuration for its space (each within 3 s).
pub async fn cluster_capacity(client: &DbqsClient) -> Option<Capacity> {
    let chain = client.chain();
    let config = chain.config();
    let mut asks = tokio::task::JoinSet::new();
    for m in config.members.clone() {
        let client = client.clone();
        asks.spawn(async move {
            tokio::time::timeout(Duration::from_secs(3), client.node_status(&m))
                .await
                .ok()?
                .ok()
                .map(|s| s.space)
        });
    }
    let mut spaces = Vec::new();
    while let Some(r) = asks.join_next().await {
        if let Ok(Some(s)) = r {
            spaces.push(s);
        }
    }
    capacity_of(&spaces, config.params.f as usize, config.members.len())
}

impl DbqsBackend {
    /// The backend of volume `volume` owned by `owner`, running calls on `handle`.
    pub fn new(
        client: DbqsClient,
        owner: Keypair,
        volume: &str,
        handle: Handle,
        opts: BackendOptions,
    ) -> DbqsBackend {
        DbqsBackend {
            stats: Arc::default(),
            client,
            holder: Owner::new(owner.clone()),
            owner,
            prefix: volume_prefix(volume),
            handle,
            opts,
            writable_until: None,
            fail_fast_until: AtomicU64::new(0),
            capacity: Arc::default(),
        }
    }

    /// Keeps [`Backend::capacity`] current: asks the members for their space now and every
    /// [`CAPACITY_EVERY`], in the background, while this backend lives.
    pub fn with_capacity_updates(self) -> DbqsBackend {
        let cache = Arc::downgrade(&self.capacity);
        let client = self.client.clone();
        self.handle.spawn(async move {
            loop {
                let got = cluster_capacity(&client).await;
                let Some(cache) = cache.upgrade() else { return };
                if got.is_some() {
                    *cache.lock().unwrap_or_else(|p| p.into_inner()) = got;
                }
                drop(cache);
                tokio::time::sleep(CAPACITY_EVERY).await;
            }
        });
        self
    }

    /// Makes writes depend on a lease: refused once `until` (Unix ms) has passed.
    pub fn with_lease_deadline(mut self, until: Arc<AtomicU64>) -> DbqsBackend {
        self.writable_until = Some(until);
        self
    }

    /// The call statistics of this backend.
    pub fn stats(&self) -> Arc<BackendStats> {
        self.stats.clone()
    }

    fn label(&self, label: &[u8]) -> Vec<u8> {
        let mut l = self.prefix.clone();
        l.extend_from_slice(label);
        l
    }

    /// Runs call `fut` of kind `KINDS[kind]` to its end or the call timeout, counting it in
    /// the metrics.
    fn block<T>(
        &self,
        kind: usize,
        fut: impl std::future::Future<Output = Result<T, ClientError>>,
    ) -> Result<T, BackendError> {
        let started = std::time::Instant::now();
        let result = self.block_inner(fut);
        let failure = result.as_ref().err().map(|e| match e {
            BackendError::Unavailable(_) => "unavailable",
            BackendError::TimedOut => "timed_out",
            BackendError::NoSpace => "no_space",
            BackendError::NotFound => "not_found",
            BackendError::Corrupt(_) => "corrupt",
            BackendError::TooLarge { .. } => "too_large",
        });
        crate::metrics::backend_call(KINDS[kind], started, failure);
        result
    }

    fn block_inner<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, ClientError>>,
    ) -> Result<T, BackendError> {
        if unix_ms() < self.fail_fast_until.load(Ordering::Relaxed) {
            return Err(BackendError::TimedOut);
        }
        let timeout = self.opts.call_timeout;
        let result = match self
            .handle
            .block_on(async move { tokio::time::timeout(timeout, fut).await })
        {
            Ok(r) => r.map_err(|e| map_error(&e)),
            Err(_) => Err(BackendError::TimedOut),
        };
        match &result {
            Err(BackendError::TimedOut) => {
                let until = unix_ms() + self.opts.fail_fast.as_millis() as u64;
                self.fail_fast_until.store(until, Ordering::Relaxed);
            }
            Ok(_) => self.fail_fast_until.store(0, Ordering::Relaxed),
            Err(_) => {}
        }
        result
    }

    fn check_writable(&self) -> Result<(), BackendError> {
        match &self.writable_until {
            Some(until) if unix_ms() >= until.load(Ordering::SeqCst) => Err(
                BackendError::Unavailable("the volume lease is not held (expired or lost)".into()),
            ),
            _ => Ok(()),
        }
    }
}

/// Maps a client failure onto the filesystem's backend errors.
pub fn map_error(e: &ClientError) -> BackendError {
    match e {
        ClientError::Op(OpError::Timeout) => BackendError::TimedOut,
        ClientError::Op(OpError::NoSpace) | ClientError::Op(OpError::Refused(Reject::NoSpace)) => {
            BackendError::NoSpace
        }
        ClientError::Op(OpError::Refused(Reject::TooLarge))
        | ClientError::Op(OpError::Invalid(ObjectError::TooLarge { .. })) => {
            BackendError::TooLarge {
                size: 0,
                limit: MAX_BLOCK,
            }
        }
        ClientError::Op(OpError::Refused(r)) => {
            BackendError::Unavailable(format!("replicas refused the request: {r:?}"))
        }
        other => BackendError::Unavailable(other.to_string()),
    }
}

impl Backend for DbqsBackend {
    fn put_chunk(&self, data: &[u8]) -> Result<ChunkId, BackendError> {
        self.check_writable()?;
        if data.len() > MAX_BLOCK {
            return Err(BackendError::TooLarge {
                size: data.len(),
                limit: MAX_BLOCK,
            });
        }
        let t = std::time::Instant::now();
        let id = self.block(0, self.client.put_as(&self.holder, data.to_vec()))?;
        self.stats.add(0, t, data.len());
        Ok(id.0)
    }

    fn get_chunk(&self, id: &ChunkId) -> Result<Vec<u8>, BackendError> {
        let t = std::time::Instant::now();
        match self.block(1, self.client.get_content(ObjectId(*id)))? {
            Some(data) => {
                self.stats.add(1, t, data.len());
                Ok(data)
            }
            None => Err(BackendError::NotFound),
        }
    }

    fn get_record(&self, label: &[u8]) -> Result<Option<Record>, BackendError> {
        let id = pk_block_id(&self.owner.public(), &self.label(label));
        let t = std::time::Instant::now();
        let rec = self.block(2, self.client.get_pk(id))?.map(|b| Record {
            version: b.version,
            value: b.value,
        });
        self.stats
            .add(2, t, rec.as_ref().map_or(0, |r| r.value.len()));
        Ok(rec)
    }

    fn put_record(&self, label: &[u8], version: u64, value: &[u8]) -> Result<(), BackendError> {
        self.check_writable()?;
        if value.len() > MAX_BLOCK {
            return Err(BackendError::TooLarge {
                size: value.len(),
                limit: MAX_BLOCK,
            });
        }
        let label = self.label(label);
        let t = std::time::Instant::now();
        self.block(
            3,
            self.client
                .put_pk(&self.owner, &label, value.to_vec(), Some(version)),
        )?;
        self.stats.add(3, t, value.len());
        Ok(())
    }

    /// Releases in parallel (a bounded number in flight); the first failure is the answer,
    /// after every release was tried (a release is idempotent, so the caller simply retries).
    fn release_chunks(&self, ids: &[ChunkId]) -> Result<(), BackendError> {
        self.check_writable()?;
        let t = std::time::Instant::now();
        let (client, holder) = (self.client.clone(), self.holder.clone());
        let ids = ids.to_vec();
        self.block(4, async move {
            let mut tasks = tokio::task::JoinSet::new();
            let mut first = Ok(());
            for id in ids {
                if tasks.len() >= RELEASES_IN_FLIGHT {
                    if let Some(Ok(Err(e))) = tasks.join_next().await {
                        first = first.and(Err(e));
                    }
                }
                let (client, holder) = (client.clone(), holder.clone());
                tasks.spawn(async move { client.release_as(&holder, ObjectId(id)).await });
            }
            while let Some(r) = tasks.join_next().await {
                if let Ok(Err(e)) = r {
                    first = first.and(Err(e));
                }
            }
            first
        })?;
        self.stats.add(4, t, 0);
        Ok(())
    }

    fn capacity(&self) -> Option<Capacity> {
        *self.capacity.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn max_block(&self) -> usize {
        MAX_BLOCK
    }
}

/// The value of the lease block of a volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseValue {
    /// Who holds it, for people: "HOST pid PID at DIR".
    pub holder: String,
    pub host: String,
    pub pid: u32,
    /// Unix ms after which the lease is free; 0 once released.
    pub expires_ms: u64,
    /// Random per mount process, so a holder recognises its own lease.
    pub nonce: u64,
}

const LEASE_MAGIC: &[u8] = b"dbqsfs-lease-v1";

impl LeaseValue {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = LEASE_MAGIC.to_vec();
        v.extend(postcard::to_stdvec(self).expect("leases encode"));
        v
    }

    pub fn decode(bytes: &[u8]) -> Option<LeaseValue> {
        postcard::from_bytes(bytes.strip_prefix(LEASE_MAGIC)?).ok()
    }
}

/// Why a lease could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(
        "volume {volume:?} is mounted read-write by {holder} (lease valid for another {secs} s). \
         Unmount it there first, or mount read-only with `-o ro`; a lease whose holder died \
         expires by itself"
    )]
    Held {
        volume: String,
        holder: String,
        secs: u64,
    },
    #[error("cannot reach the cluster to take the volume lease: {0}")]
    Cluster(#[from] ClientError),
    #[error("the lease block of volume {0:?} does not decode (written by something else?)")]
    Undecodable(String),
}

/// Lease timing.
#[derive(Clone, Copy, Debug)]
pub struct LeaseTiming {
    /// How long a lease lasts without renewal.
    pub duration: Duration,
    /// How often the holder renews it.
    pub renew_every: Duration,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        LeaseTiming {
            duration: Duration::from_secs(30),
            renew_every: Duration::from_secs(10),
        }
    }
}

/// The read-write lease of one volume, held by this process.
pub struct Lease {
    client: DbqsClient,
    owner: Keypair,
    volume: String,
    label: Vec<u8>,
    value: LeaseValue,
    version: u64,
    timing: LeaseTiming,
    /// Writes are allowed until this time (Unix ms): the expiry of the last renewal that was
    /// stored, measured from when that renewal started.
    pub writable_until: Arc<AtomicU64>,
}

/// Whether process `pid` on this host is alive (a zombie counts as gone).
fn local_pid_alive(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
}

/// This machine's host name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

impl Lease {
    /// The label of the lease block of `volume`.
    pub fn label(volume: &str) -> Vec<u8> {
        let mut l = volume_prefix(volume);
        l.extend_from_slice(b"lease");
        l
    }

    /// Reads the current lease of `volume`, if any.
    pub async fn read(
        client: &DbqsClient,
        owner: &Keypair,
        volume: &str,
    ) -> Result<Option<(u64, LeaseValue)>, LeaseError> {
        let id = pk_block_id(&owner.public(), &Self::label(volume));
        match client.get_pk(id).await? {
            None => Ok(None),
            Some(b) => match LeaseValue::decode(&b.value) {
                Some(v) => Ok(Some((b.version, v))),
                None => Err(LeaseError::Undecodable(volume.into())),
            },
        }
    }

    /// Takes the lease of `volume` for this process (described by `holder`), if it is absent,
    /// released, expired, ours, or held by a dead process of this host. Writes it, then reads it
    /// back: of two mounts racing for it, exactly one finds its own value.
    pub async fn acquire(
        client: DbqsClient,
        owner: Keypair,
        volume: &str,
        holder: String,
        timing: LeaseTiming,
    ) -> Result<Lease, LeaseError> {
        let mut nonce = [0u8; 8];
        let _ = getrandom::fill(&mut nonce);
        let host = hostname();
        let value = LeaseValue {
            holder,
            host: host.clone(),
            pid: std::process::id(),
            expires_ms: 0,
            nonce: u64::from_le_bytes(nonce),
        };
        let current = Self::read(&client, &owner, volume).await?;
        let version = match &current {
            None => 0,
            Some((v, cur)) => {
                let now = unix_ms();
                let free = cur.expires_ms <= now
                    || cur.nonce == value.nonce
                    || (cur.host == host && !local_pid_alive(cur.pid));
                if !free {
                    return Err(LeaseError::Held {
                        volume: volume.into(),
                        holder: cur.holder.clone(),
                        secs: (cur.expires_ms - now).div_ceil(1000),
                    });
                }
                *v
            }
        };
        let mut lease = Lease {
            client,
            owner,
            volume: volume.into(),
            label: Self::label(volume),
            value,
            version,
            timing,
            writable_until: Arc::new(AtomicU64::new(0)),
        };
        lease.renew().await?;
        match Self::read(&lease.client, &lease.owner, volume).await? {
            Some((_, v)) if v.nonce == lease.value.nonce => Ok(lease),
            Some((_, v)) => Err(LeaseError::Held {
                volume: volume.into(),
                secs: v.expires_ms.saturating_sub(unix_ms()).div_ceil(1000),
                holder: v.holder,
            }),
            None => Err(LeaseError::Undecodable(volume.into())),
        }
    }

    /// Stores the lease with a new expiry; on success, writes are allowed until then.
    pub async fn renew(&mut self) -> Result<(), ClientError> {
        let started = unix_ms();
        let mut value = self.value.clone();
        value.expires_ms = started + self.timing.duration.as_millis() as u64;
        self.version += 1;
        self.client
            .put_pk(&self.owner, &self.label, value.encode(), Some(self.version))
            .await?;
        self.value = value;
        self.writable_until
            .store(self.value.expires_ms, Ordering::SeqCst);
        Ok(())
    }

    /// Checks that the stored lease is still ours (nobody took it over after an expiry).
    pub async fn still_ours(&self) -> Result<bool, LeaseError> {
        Ok(matches!(
            Self::read(&self.client, &self.owner, &self.volume).await?,
            Some((_, v)) if v.nonce == self.value.nonce
        ))
    }

    /// Renews the lease every `renew_every` until `stop` resolves. A failed renewal is retried
    /// at the next tick; writes stop on their own once the lease runs out. If the lease turns
    /// out to belong to someone else, writes stop at once.
    pub async fn keep(&mut self, mut stop: tokio::sync::oneshot::Receiver<()>) {
        let mut tick = tokio::time::interval(self.timing.renew_every);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tick.tick() => {}
            }
            match self.still_ours().await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::error!(
                        volume = self.volume,
                        "the volume lease was taken over by another mount; refusing further writes"
                    );
                    self.writable_until.store(0, Ordering::SeqCst);
                    return;
                }
                Err(e) => {
                    tracing::warn!(volume = self.volume, error = %e, "cannot check the volume lease");
                    continue;
                }
            }
            if let Err(e) = self.renew().await {
                tracing::warn!(volume = self.volume, error = %e, "lease renewal failed; retrying");
            }
        }
    }

    /// Gives the lease up (expiry 0), so the next mount need not wait.
    pub async fn release(mut self) -> Result<(), ClientError> {
        self.writable_until.store(0, Ordering::SeqCst);
        let mut value = self.value.clone();
        value.expires_ms = 0;
        self.version += 1;
        self.client
            .put_pk(&self.owner, &self.label, value.encode(), Some(self.version))
            .await?;
        self.value = value;
        Ok(())
    }

    pub fn holder(&self) -> &str {
        &self.value.holder
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_is_the_scaled_room_of_a_member_liars_cannot_move() {
        let gib = 1u64 << 30;
        let space = |free: u64| SpaceStatus {
            free: free * gib,
            size: 100 * gib,
            reserve: gib,
            ..SpaceStatus::default()
        };
        // 8 members, groups of 4: the cluster holds twice what one member holds.
        let honest: Vec<_> = [50, 51, 52, 53, 54, 55, 56].map(space).to_vec();
        let c = capacity_of(&honest, 1, 8).unwrap();
        assert_eq!(c.available, 2 * 50 * gib); // 51 GiB free less the 1 GiB reserve, doubled
        assert_eq!(c.total, 2 * 99 * gib);
        // One liar claiming nothing free, or everything: the answer stays among honest ones.
        let mut low = honest.clone();
        low[6] = space(0);
        let lo = capacity_of(&low, 1, 8).unwrap().available;
        let mut high = honest.clone();
        high[0] = space(1 << 20);
        let hi = capacity_of(&high, 1, 8).unwrap().available;
        assert!((2 * 49 * gib..=2 * 55 * gib).contains(&lo), "{lo}");
        assert!((2 * 49 * gib..=2 * 55 * gib).contains(&hi), "{hi}");
        // Too few answers to outvote f liars: unknown.
        assert_eq!(capacity_of(&honest[..2], 1, 8), None);
    }

    #[test]
    fn lease_values_round_trip_and_reject_foreign_bytes() {
        let v = LeaseValue {
            holder: "h pid 1 at /mnt".into(),
            host: "h".into(),
            pid: 1,
            expires_ms: 123,
            nonce: 9,
        };
        assert_eq!(LeaseValue::decode(&v.encode()), Some(v));
        assert_eq!(LeaseValue::decode(b"junk"), None);
    }

    #[test]
    fn volume_names() {
        assert!(valid_volume_name("default"));
        assert!(valid_volume_name("my-vol_2.x"));
        assert!(!valid_volume_name(""));
        assert!(!valid_volume_name(".hidden"));
        assert!(!valid_volume_name("a/b"));
        assert!(!valid_volume_name("sp ace"));
    }

    #[test]
    fn timeouts_and_full_nodes_map_to_their_errors() {
        assert_eq!(
            map_error(&ClientError::Op(OpError::Timeout)),
            BackendError::TimedOut
        );
        assert_eq!(
            map_error(&ClientError::Op(OpError::NoSpace)),
            BackendError::NoSpace
        );
        assert_eq!(
            map_error(&ClientError::Op(OpError::Refused(Reject::NoSpace))),
            BackendError::NoSpace
        );
        assert!(matches!(
            map_error(&ClientError::Closed),
            BackendError::Unavailable(_)
        ));
    }
}
