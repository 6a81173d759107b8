//! `dbqsfs block put|get` (files as blocks) and `dbqsfs bench` (block latency and throughput).

use super::common::connect;
use anyhow::{anyhow, Context, Result};
use clap::Subcommand;
use dbqsfs_daemon::blocks::{self, FileId};
use dbqsfs_daemon::files::{self};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Subcommand, Debug)]
pub enum BlockCmd {
    /// Store a file; print its id.
    #[command(
        long_about = "Store FILE in the cluster and print its id. A file of at most 1 MiB \
        becomes one content block (id `c:<hex>`); a larger file becomes content blocks of 1 MiB \
        plus a manifest block listing them (id `m:<hex>`). Prints the id on stdout once a quorum \
        of 2f+1 replicas of every block has stored it durably. The blocks are held by the \
        cluster's client key until `dbqsfs block rm` releases them."
    )]
    Put {
        /// The cluster description (DIR/cluster.toml).
        #[arg(long)]
        cluster: PathBuf,
        /// The file to store.
        file: PathBuf,
    },
    /// Fetch a file by id and write it to OUT.
    #[command(
        long_about = "Fetch the file with id ID (as printed by `block put`) and write it to \
        OUT. Every block is verified against its hash before it is used; OUT is written to a \
        temporary name and renamed when complete, so a failed get leaves no partial OUT."
    )]
    Get {
        /// The cluster description (DIR/cluster.toml).
        #[arg(long)]
        cluster: PathBuf,
        /// The id printed by `block put` (`c:<hex>` or `m:<hex>`).
        id: FileId,
        /// Where to write the file.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Release a stored file: its blocks are deleted once nobody else holds them.
    #[command(
        long_about = "Release the client key's hold on every block of the file with id ID (as \
        printed by `block put`). Each replica deletes a block once every key that stored it \
        released it, after its grace period (`dbqsfs node --release-grace`, 30 s by default), \
        and keeps a small record of the release so that an old put replayed cannot bring it back. \
        Holds are per key, not counted: a block that another file stored with the same key \
        shares goes too (identical files, or identical 1 MiB pieces). Holds and releases are \
        numbered from the clock, so a `block put` after a `block rm` of the same content keeps \
        it (if a clock went back, the replicas say so and the put numbers ahead)."
    )]
    Rm {
        /// The cluster description (DIR/cluster.toml).
        #[arg(long)]
        cluster: PathBuf,
        /// The id printed by `block put` (`c:<hex>` or `m:<hex>`).
        id: FileId,
    },
}

pub(crate) fn progress_bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(
        Some(total),
        if std::io::stderr().is_terminal() && total > 4 * 1024 * 1024 {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
    {
        bar.set_style(style);
    }
    bar
}

pub(crate) async fn block_put(cluster: &Path, file: &Path) -> Result<()> {
    let client = connect(cluster)?;
    let data = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let bar = progress_bar(data.len() as u64);
    let id = blocks::put_file(&client, client.owner(), &data, &|n| bar.inc(n))
        .await
        .with_context(|| format!("storing {}", file.display()))?;
    client.settle(Duration::from_secs(3)).await;
    bar.finish_and_clear();
    println!("{id}");
    Ok(())
}

pub(crate) async fn block_rm(cluster: &Path, id: FileId) -> Result<()> {
    let client = connect(cluster)?;
    let n = blocks::remove_file(&client, client.owner(), id, &|_| {})
        .await
        .with_context(|| format!("releasing {id}"))?;
    // A quorum took each release; let the rest of each group hear of it too.
    client.settle(Duration::from_secs(3)).await;
    eprintln!("released {n} block(s) of {id}; the replicas delete them after their grace period");
    Ok(())
}

pub(crate) async fn block_get(cluster: &Path, id: FileId, out: &Path) -> Result<()> {
    let client = connect(cluster)?;
    let total = blocks::file_size(&client, id).await?.unwrap_or(0);
    let bar = progress_bar(total);
    let tmp = out.with_file_name(format!(
        ".{}.part",
        out.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "out".into())
    ));
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let result = blocks::get_file(&client, id, &mut |bytes| f.write_all(bytes), &|n| {
        bar.inc(n)
    })
    .await;
    bar.finish_and_clear();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("fetching {id}"));
    }
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

/// Latencies, microseconds, to 3 significant digits.
fn latencies() -> hdrhistogram::Histogram<u64> {
    hdrhistogram::Histogram::new(3).expect("3 significant digits are allowed")
}

fn at(h: &hdrhistogram::Histogram<u64>, q: f64) -> Duration {
    Duration::from_micros(h.value_at_quantile(q))
}

pub(crate) async fn bench(cluster: &Path, ops: usize) -> Result<()> {
    let client = connect(cluster)?;
    let owner = files::random_key().map_err(|e| anyhow!("OS randomness: {e}"))?;
    let mut lat = latencies();
    for i in 0..ops {
        let t = Instant::now();
        client
            .put_pk(
                &owner,
                b"bench",
                format!("v{i}").into_bytes(),
                Some(i as u64 + 1),
            )
            .await?;
        lat.saturating_record(t.elapsed().as_micros() as u64);
    }
    println!(
        "pk write (version known): p50 {:?}  p99 {:?}",
        at(&lat, 0.5),
        at(&lat, 0.99)
    );
    let id = dbqsfs_core::object::pk_block_id(&owner.public(), b"bench");
    lat.reset();
    for _ in 0..ops {
        let t = Instant::now();
        client.get_pk(id).await?;
        lat.saturating_record(t.elapsed().as_micros() as u64);
    }
    println!("pk read: p50 {:?}  p99 {:?}", at(&lat, 0.5), at(&lat, 0.99));
    for size in [4096usize, 1 << 20] {
        let n = if size > 65536 { ops.min(64) } else { ops };
        for inflight in [1usize, 16] {
            let blocks: Vec<Vec<u8>> = (0..n)
                .map(|_| {
                    let mut b = vec![0u8; size];
                    getrandom::fill(&mut b).map(|()| b)
                })
                .collect::<Result<_, _>>()
                .map_err(|e| anyhow!("OS randomness: {e}"))?;
            let t = Instant::now();
            let ids = run_parallel(inflight, blocks, {
                let c = client.clone();
                move |b| {
                    let c = c.clone();
                    async move { c.put_content(b).await }
                }
            })
            .await?;
            let w = t.elapsed();
            let t = Instant::now();
            run_parallel(inflight, ids, {
                let c = client.clone();
                move |id| {
                    let c = c.clone();
                    async move { c.get_content(id).await }
                }
            })
            .await?;
            let r = t.elapsed();
            let mb = (n * size) as f64 / 1e6;
            println!(
                "content {:>7} B x{n:<4} in flight {inflight:>2}: write {:8.1} MB/s ({:7.0} ops/s)  read {:8.1} MB/s ({:7.0} ops/s)",
                size,
                mb / w.as_secs_f64(),
                n as f64 / w.as_secs_f64(),
                mb / r.as_secs_f64(),
                n as f64 / r.as_secs_f64()
            );
        }
    }
    Ok(())
}

/// Runs `f` over `items` with at most `inflight` at once; results in input order.
pub(crate) async fn run_parallel<T, R, F, Fut, E>(
    inflight: usize,
    items: Vec<T>,
    f: F,
) -> Result<Vec<R>>
where
    T: Send + 'static,
    R: Send + 'static,
    E: std::error::Error + Send + Sync + 'static,
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = std::result::Result<R, E>> + Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    let mut out: Vec<Option<R>> = (0..items.len()).map(|_| None).collect();
    let mut items = items.into_iter().enumerate();
    loop {
        while set.len() < inflight {
            let Some((i, item)) = items.next() else { break };
            let fut = f(item);
            set.spawn(async move { (i, fut.await) });
        }
        let Some(r) = set.join_next().await else {
            break;
        };
        let (i, r) = r?;
        out[i] = Some(r?);
    }
    Ok(out.into_iter().flatten().collect())
}
