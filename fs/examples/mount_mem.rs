//! Mounts an empty in-memory volume on DIR until it is unmounted (`umount DIR`) or the process
//! gets SIGINT/SIGTERM. For conformance runs (pjdfstest, fsx) against the real FUSE mapping.
//!
//! `cargo run -p dbqsfs-fs --example mount_mem -- DIR [--ro] [--ttl SECONDS] [--threads N] [--chunk-size BYTES]`
//!
//! The in-memory backend never frees a chunk (dBQS has no delete), so every flush of a rewritten
//! chunk adds garbage; long random-write runs (fsx) should use a small `--chunk-size`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dbqsfs_fs::{mount, MemBackend, MountOptions};

fn main() {
    let mut args = std::env::args().skip(1);
    let mut dir = None;
    let mut opts = MountOptions {
        allow_other: true,
        ..MountOptions::default()
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--ro" => opts.read_only = true,
            "--ttl" => {
                let secs: f64 = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("--ttl SECONDS");
                opts.attr_ttl = Duration::from_secs_f64(secs);
                opts.entry_ttl = opts.attr_ttl;
            }
            "--threads" => {
                opts.n_threads = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("--threads N")
            }
            "--chunk-size" => {
                opts.volume.chunk_size = Some(
                    args.next()
                        .and_then(|s| s.parse().ok())
                        .expect("--chunk-size BYTES"),
                )
            }
            _ => dir = Some(PathBuf::from(a)),
        }
    }
    let dir = dir.expect("usage: mount_mem DIR [--ro] [--ttl SECONDS] [--threads N]");
    let handle = mount(Arc::new(MemBackend::new()), &dir, opts).expect("mount");
    eprintln!(
        "mounted on {}; unmount with `umount {}`",
        dir.display(),
        dir.display()
    );
    handle.join().expect("session");
}
