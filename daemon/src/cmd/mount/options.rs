//! The `-o` options of `dbqsfs mount`, and the command line of mount(8)'s helper.

use crate::cmd::common::UsageError;
use anyhow::Result;

use std::path::PathBuf;
use std::time::Duration;

/// Default bound on one dBQS operation of a mount (`-o timeout=SECS` changes it).
pub const DEFAULT_OP_TIMEOUT: Duration = Duration::from_secs(15);

/// The parsed `-o` options.
#[derive(Clone, Debug)]
pub struct Opts {
    pub read_only: bool,
    pub allow_other: bool,
    pub nonempty: bool,
    pub fsname: Option<String>,
    pub attr_ttl: Option<Duration>,
    pub entry_ttl: Option<Duration>,
    pub op_timeout: Duration,
    pub threads: Option<usize>,
    /// Chunk size of a volume created by this mount.
    pub chunk_size: Option<u32>,
    /// Commit after every change (`-o sync`).
    pub sync: bool,
    /// Longest time between a change and its commit (`-o commit=MS`).
    pub commit_interval: Duration,
    /// Mount this snapshot of the volume (read-only).
    pub snapshot: Option<String>,
    /// Create the volume encrypted (`-o encrypt`; implied by a key file or passphrase).
    pub encrypt: bool,
    /// The encrypted volume's key file (`-o keyfile=PATH`).
    pub keyfile: Option<PathBuf>,
    /// Read the encrypted volume's passphrase (`-o passphrase`).
    pub passphrase: bool,
    /// Generic kernel flags (`nodev`, `noexec`, `noatime`, ...), passed to the mount.
    pub kernel_flags: Vec<String>,
    /// Serve Prometheus metrics there (`-o metrics=IP:PORT`).
    pub metrics: Option<std::net::SocketAddr>,
    /// How often the writer's collector runs (`-o gc=SECS`; `None`: only on `dbqsfs gc`).
    pub gc_interval: Option<Duration>,
}

/// Default of `-o commit=MS`.
pub const DEFAULT_COMMIT_INTERVAL: Duration = Duration::from_secs(1);

/// Default of `-o gc=SECS`: space comes back within seconds of a commit, plus the nodes' grace.
pub const DEFAULT_GC_INTERVAL: Duration = Duration::from_secs(5);

const KNOWN_OPTIONS: &str = "ro, rw, allow_other, default_permissions, nonempty, fsname=NAME, \
    attr_timeout=SECS, entry_timeout=SECS, timeout=SECS, threads=N, chunk_size=BYTES, sync, async, \
    commit=MS, gc=SECS, snapshot=NAME, encrypt, keyfile=PATH, passphrase, metrics=IP:PORT; and \
    mount(8)'s \
    generic ones: \
    defaults, dev, nodev, suid, nosuid, exec, noexec, atime, noatime, auto, noauto, user, nouser, \
    _netdev, nofail, relatime, strictatime, nodiratime, x-*, comment=*";

/// Generic options of mount(8) and fstab that mean nothing to a dbqsfs mount (they are for
/// mount(8) itself, systemd or the kernel's atime policy, which FUSE leaves to the filesystem).
const IGNORED_OPTIONS: [&str; 11] = [
    "defaults",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "_netdev",
    "nofail",
    "relatime",
    "strictatime",
    "nodiratime",
];

fn secs(name: &str, v: &str) -> Result<Duration, UsageError> {
    v.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0 && *s < 1e6)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| UsageError(format!("-o {name}={v}: expected a number of seconds")))
}

/// Parses `-o` values (each a comma-separated list).
pub fn parse_options(values: &[String]) -> Result<Opts, UsageError> {
    let mut o = Opts {
        read_only: false,
        allow_other: false,
        nonempty: false,
        fsname: None,
        attr_ttl: None,
        entry_ttl: None,
        op_timeout: DEFAULT_OP_TIMEOUT,
        threads: None,
        chunk_size: None,
        sync: false,
        commit_interval: DEFAULT_COMMIT_INTERVAL,
        snapshot: None,
        encrypt: false,
        keyfile: None,
        passphrase: false,
        kernel_flags: Vec::new(),
        metrics: None,
        gc_interval: Some(DEFAULT_GC_INTERVAL),
    };
    for item in values.iter().flat_map(|v| v.split(',')) {
        let (k, v) = match item.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (item, None),
        };
        match (k, v) {
            ("", None) => {}
            (k, None) if IGNORED_OPTIONS.contains(&k) => {}
            (k, None) if dbqsfs_fs::fuse::is_kernel_flag(k) => o.kernel_flags.push(k.into()),
            (k, _) if k.starts_with("x-") || k == "comment" => {}
            ("ro", None) => o.read_only = true,
            ("rw", None) => o.read_only = false,
            ("allow_other", None) => o.allow_other = true,
            ("default_permissions", None) => {} // always on
            ("nonempty", None) => o.nonempty = true,
            ("sync", None) => o.sync = true,
            ("async", None) => o.sync = false,
            ("commit", Some(v)) => {
                o.commit_interval = v
                    .parse::<u64>()
                    .ok()
                    .filter(|ms| (1..=3_600_000).contains(ms))
                    .map(Duration::from_millis)
                    .ok_or_else(|| {
                        UsageError(format!("-o commit={v}: expected 1..3600000 milliseconds"))
                    })?
            }
            ("gc", Some(v)) => {
                let every = secs(k, v)?;
                o.gc_interval = (!every.is_zero()).then_some(every);
            }
            ("fsname", Some(v)) if !v.is_empty() => o.fsname = Some(v.into()),
            ("snapshot", Some(v)) if !v.is_empty() => o.snapshot = Some(v.into()),
            ("encrypt", None) => o.encrypt = true,
            ("keyfile", Some(v)) if !v.is_empty() => o.keyfile = Some(v.into()),
            ("metrics", Some(v)) => {
                o.metrics = Some(
                    v.parse()
                        .map_err(|_| UsageError(format!("-o metrics={v}: expected IP:PORT")))?,
                )
            }
            ("passphrase", None) => o.passphrase = true,
            ("attr_timeout", Some(v)) => o.attr_ttl = Some(secs(k, v)?),
            ("entry_timeout", Some(v)) => o.entry_ttl = Some(secs(k, v)?),
            ("timeout", Some(v)) => {
                o.op_timeout = secs(k, v)?;
                if o.op_timeout < Duration::from_secs(1) {
                    return Err(UsageError("-o timeout must be at least 1 second".into()));
                }
            }
            ("threads", Some(v)) => {
                o.threads = Some(
                    v.parse()
                        .ok()
                        .filter(|n| (1..=64).contains(n))
                        .ok_or_else(|| UsageError(format!("-o threads={v}: expected 1..64")))?,
                )
            }
            ("chunk_size", Some(v)) => {
                o.chunk_size = Some(
                    v.parse()
                        .ok()
                        .filter(|n| (512..=1 << 20).contains(n))
                        .ok_or_else(|| {
                            UsageError(format!("-o chunk_size={v}: expected 512..1048576 bytes"))
                        })?,
                )
            }
            _ => {
                return Err(UsageError(format!(
                    "unknown or malformed mount option {item:?}; known options: {KNOWN_OPTIONS}"
                )))
            }
        }
    }
    // A snapshot never changes: it mounts read-only.
    o.read_only |= o.snapshot.is_some();
    if o.keyfile.is_some() && o.passphrase {
        return Err(UsageError(
            "-o keyfile and -o passphrase exclude each other: a volume's key is wrapped by one"
                .into(),
        ));
    }
    if o.encrypt && o.keyfile.is_none() && !o.passphrase {
        return Err(UsageError(
            "-o encrypt needs -o keyfile=PATH or -o passphrase (what will open the volume's key)"
                .into(),
        ));
    }
    Ok(o)
}

/// The names under which this program is mount(8)'s helper for `-t fuse.dbqsfs` (a symlink
/// `/sbin/mount.fuse.dbqsfs` to `dbqsfs`), so fstab lines work.
pub const HELPER_NAMES: [&str; 2] = ["mount.fuse.dbqsfs", "mount.dbqsfs"];

/// The `dbqsfs mount` command line for a helper call `mount.fuse.dbqsfs SOURCE DIR [-o OPTIONS]
/// [-n] [-s] [-f] [-v]`, as mount(8) makes it. SOURCE is the volume (`VOLUME` or
/// `dbqsfs:VOLUME`); the options `cluster=FILE` and `data_dir=DIR` pick the cluster as
/// `--cluster` and `--data-dir` do; the rest are mount options. `None` for `-f` (mount(8)'s
/// "fake": do nothing).
pub fn helper_args(
    args: &[std::ffi::OsString],
) -> Result<Option<Vec<std::ffi::OsString>>, UsageError> {
    let usage = || {
        UsageError(
            "usage: mount.fuse.dbqsfs [dbqsfs:]VOLUME DIR [-o OPTIONS] (as mount(8) calls it; \
             OPTIONS may hold cluster=FILE or data_dir=DIR and any `dbqsfs mount` option)"
                .into(),
        )
    };
    let mut positional = Vec::new();
    let mut options: Vec<String> = Vec::new();
    let mut rest = args.iter().skip(1);
    while let Some(a) = rest.next() {
        match a.to_str() {
            Some("-o") => {
                let o = rest.next().and_then(|o| o.to_str()).ok_or_else(usage)?;
                options.extend(o.split(',').map(str::to_string));
            }
            Some("-f") => return Ok(None),
            Some("-n" | "-s" | "-v") => {}
            Some(x) if x.starts_with('-') => return Err(usage()),
            _ => positional.push(a.clone()),
        }
    }
    let [source, dir] = &positional[..] else {
        return Err(usage());
    };
    let source = source.to_str().ok_or_else(usage)?;
    let volume = source.strip_prefix("dbqsfs:").unwrap_or(source);
    let mut cmd: Vec<std::ffi::OsString> = vec!["dbqsfs".into(), "mount".into()];
    let mut kept = Vec::new();
    for o in options {
        match o.split_once('=') {
            Some(("cluster", f)) => cmd.extend(["--cluster".into(), f.into()]),
            Some(("data_dir", d)) => cmd.extend(["--data-dir".into(), d.into()]),
            _ => kept.push(o),
        }
    }
    cmd.extend(["--volume".into(), volume.into()]);
    if !kept.is_empty() {
        cmd.extend(["-o".into(), kept.join(",").into()]);
    }
    cmd.push(dir.clone());
    Ok(Some(cmd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_options_parse_and_refuse_unknown_ones() {
        let o =
            parse_options(&["ro,allow_other".into(), "timeout=3,attr_timeout=0".into()]).unwrap();
        assert!(o.read_only && o.allow_other);
        assert_eq!(o.op_timeout, Duration::from_secs(3));
        assert_eq!(o.attr_ttl, Some(Duration::ZERO));
        assert!(parse_options(&["bogus".into()]).is_err());
        assert!(parse_options(&["timeout=x".into()]).is_err());
        assert!(parse_options(&["threads=0".into()]).is_err());
        let o = parse_options(&["sync,commit=250".into()]).unwrap();
        assert!(o.sync);
        assert_eq!(o.commit_interval, Duration::from_millis(250));
        assert!(parse_options(&["commit=0".into()]).is_err());
        assert_eq!(parse_options(&["gc=0".into()]).unwrap().gc_interval, None);
        assert_eq!(
            parse_options(&["gc=2.5".into()]).unwrap().gc_interval,
            Some(Duration::from_millis(2500))
        );
        assert!(parse_options(&["gc=x".into()]).is_err());
        let o = parse_options(&["encrypt,keyfile=/k".into()]).unwrap();
        assert!(o.encrypt && o.keyfile == Some(PathBuf::from("/k")) && !o.passphrase);
        assert!(parse_options(&["passphrase".into()]).unwrap().passphrase);
        assert!(
            parse_options(&["encrypt".into()]).is_err(),
            "encrypt needs a secret"
        );
        assert!(parse_options(&["keyfile=/k,passphrase".into()]).is_err());
        assert!(parse_options(&["keyfile=".into()]).is_err());
        let helper = |a: &[&str]| {
            let a: Vec<std::ffi::OsString> = a.iter().map(Into::into).collect();
            helper_args(&a).map(|c| c.map(|c| c.join(std::ffi::OsStr::new(" "))))
        };
        assert_eq!(
            helper(&[
                "mount.fuse.dbqsfs",
                "dbqsfs:v",
                "/m",
                "-o",
                "rw,data_dir=/d,noatime"
            ])
            .unwrap()
            .unwrap(),
            "dbqsfs mount --data-dir /d --volume v -o rw,noatime /m"
        );
        assert_eq!(
            helper(&["mount.fuse.dbqsfs", "v", "/m", "-f"]).unwrap(),
            None
        );
        assert!(helper(&["mount.fuse.dbqsfs", "v"]).is_err());
        let o =
            parse_options(&["defaults,_netdev,nofail,noatime,nodev,x-systemd.automount".into()])
                .unwrap();
        assert_eq!(o.kernel_flags, vec!["noatime", "nodev"]);
    }
}
