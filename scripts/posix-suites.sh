#!/usr/bin/env bash
# pjdfstest and fsx on a REAL dbqsfs mount: the embedded default cluster (4 nodes, f=1, loopback
# QUIC) in a temporary data directory. Needs root and /dev/fuse (pjdfstest switches users).
#
#   scripts/posix-suites.sh                 # pjdfstest, its erofs cases, fsx with 10,000 operations
#   FSX_OPS=100000 scripts/posix-suites.sh  # the full fsx run
#   SKIP_PJDFSTEST=1 / SKIP_FSX=1           # run only one of the suites
#   DBQSFS_BIN=path/to/dbqsfs               # use this binary instead of building a release one
#   ENCRYPT=1                               # both volumes encrypted (-o keyfile=, a random key)
#   FSX_SPACE_WAIT=SECS                     # after fsx, wait until the nodes deleted what the
#                                           # volume released (their grace: 30 s by default)
#
# Installs what is missing: fuse3 (apt-get), pjdfstest and fsx (cargo install --locked), the
# `tests` user pjdfstest needs. Always unmounts and stops the cluster, also on failure or ctrl-c.
# Prints the pjdfstest summary lines and fsx's verdict; exits non-zero if any suite failed.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
FSX_OPS=${FSX_OPS:-10000}
FSX_SEED=${FSX_SEED:-42}

if [ "$(id -u)" != 0 ]; then
  echo "posix-suites: run as root (pjdfstest changes users and remounts)" >&2
  exit 2
fi
if ! command -v fusermount3 >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3 >/dev/null
fi
if [ -z "${SKIP_PJDFSTEST:-}" ] && ! command -v pjdfstest >/dev/null 2>&1; then
  cargo install pjdfstest --version 0.2.2 --locked
fi
if [ -z "${SKIP_FSX:-}" ] && ! command -v fsx >/dev/null 2>&1; then
  cargo install fsx --version 0.3.2 --locked
fi
id tests >/dev/null 2>&1 || printf 'tests:x:::pjdfstest dummy:/:/usr/sbin/nologin\n' | newusers

if [ -z "${DBQSFS_BIN:-}" ]; then
  cargo build --release -p dbqsfs-daemon --bin dbqsfs
  DBQSFS_BIN=$repo/target/release/dbqsfs
fi
bin=$(realpath "$DBQSFS_BIN")

work=$(mktemp -d /tmp/dbqsfs-posix.XXXXXX)
chmod 755 "$work"   # pjdfstest's dummy users must reach the mount point
data=$work/data
mnt=$work/mnt
fsxmnt=$work/fsx
other=$work/other
mkdir -p "$mnt" "$fsxmnt" "$other"
# Extra mount options: with ENCRYPT=1 both volumes are created encrypted with a random key file.
keyopt=
if [ -n "${ENCRYPT:-}" ]; then
  head -c 32 /dev/urandom > "$work/volume.key"
  keyopt=",keyfile=$work/volume.key"
  echo "posix-suites: encrypted volumes (key file $work/volume.key)"
fi

cleanup() {
  set +e
  cd /
  for m in "$fsxmnt" "$mnt"; do
    if grep -q " $m " /proc/self/mountinfo; then
      "$bin" umount "$m" || "$bin" umount --lazy "$m" || fusermount3 -uz "$m"
    fi
  done
  if [ -f "$data/cluster/cluster.toml" ]; then
    "$bin" cluster down --dir "$data/cluster" >/dev/null
  fi
  if [ -z "${KEEP_WORK:-}" ]; then rm -rf "$work"; else echo "posix-suites: kept $work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

status=0
start=$(date +%s)
# pjdfstest runs as root and as the dummy users: allow_other lets them in.
"$bin" mount --data-dir "$data" -o "allow_other$keyopt" "$mnt"

if [ -z "${SKIP_PJDFSTEST:-}" ]; then
  # The config with expected_failures from the list kept in the repo.
  expected=$(sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' \
    "$repo/fs/conformance/pjdfstest-expected-failures.txt" | sed 's/.*/"&"/' | paste -sd, -)
  sed "s/^expected_failures = .*/expected_failures = [$expected]/" \
    "$repo/fs/conformance/pjdfstest.toml" > "$work/pjdfstest.toml"
  sed 's/^allow_remount = false/allow_remount = true/' "$work/pjdfstest.toml" > "$work/pjdfstest-erofs.toml"

  echo "=== pjdfstest on $mnt"
  t=$(date +%s)
  (cd "$mnt" && pjdfstest -c "$work/pjdfstest.toml" -p "$mnt" -s "$other" -v) > "$work/pjdfstest.log" 2>&1 || status=1
  grep 'FAILED$' "$work/pjdfstest.log" || true
  echo "pjdfstest: $(grep '^Summary:' "$work/pjdfstest.log" || echo 'no summary: see the log')  ($(( $(date +%s) - t )) s)"

  # The read-only remount cases, on their own, with a `mount` that skips the mount.fuse helper.
  mkdir -p "$work/wrap"
  printf '#!/bin/sh\nexec /usr/bin/mount -i "$@"\n' > "$work/wrap/mount"
  chmod +x "$work/wrap/mount"
  echo "=== pjdfstest erofs cases on $mnt"
  t=$(date +%s)
  (cd "$mnt" && PATH="$work/wrap:$PATH" pjdfstest -c "$work/pjdfstest-erofs.toml" -p "$mnt" -v erofs) \
    > "$work/pjdfstest-erofs.log" 2>&1 || status=1
  grep 'FAILED$' "$work/pjdfstest-erofs.log" || true
  echo "pjdfstest erofs: $(grep '^Summary:' "$work/pjdfstest-erofs.log" || echo 'no summary: see the log')  ($(( $(date +%s) - t )) s)"
fi

if [ -z "${SKIP_FSX:-}" ]; then
  # Its own volume (default chunk size, 1 MiB unless FSX_CHUNK_SIZE says otherwise). What a run
  # stores stays on the nodes until the collector releases it and the nodes' grace passes: the
  # step reports how much that was, and with FSX_SPACE_WAIT what is left against the live file.
  node_bytes() { du -sb "$data"/cluster/node-*/ | awk '{ s += $1 } END { printf "%.0f\n", s }'; }
  before=$(node_bytes)
  "$bin" mount --data-dir "$data" --volume fsx -o "rw${FSX_CHUNK_SIZE:+,chunk_size=$FSX_CHUNK_SIZE}$keyopt" "$fsxmnt"
  echo "=== fsx: $FSX_OPS operations, seed $FSX_SEED, on $fsxmnt"
  t=$(date +%s)
  mkdir -p "$work/fsx-artifacts"
  if fsx -q -N "$FSX_OPS" -S "$FSX_SEED" -f "$repo/fs/conformance/fsx.toml" -P "$work/fsx-artifacts" \
      "$fsxmnt/fsx.testfile" > "$work/fsx.log" 2>&1; then
    echo "fsx: $(tail -n 1 "$work/fsx.log")  ($FSX_OPS ops, $(( $(date +%s) - t )) s)"
  else
    status=1
    tail -n 30 "$work/fsx.log"
    echo "fsx: FAILED ($FSX_OPS ops, $(( $(date +%s) - t )) s)"
  fi
  "$bin" umount "$fsxmnt"
  # Bytes the mount received in write calls (its unmount log line), against what the nodes
  # stored meanwhile (every replica counted, as on the disks).
  line=$(grep -h 'written_mib=' "$data"/*.log 2>/dev/null | tail -n 1)
  written=$(sed 's/.*written_mib=\([0-9.]*\).*/\1/' <<< "$line")
  blocks=$(sed -n 's/.*put_chunk: [0-9]* calls, mean [0-9.]* ms, \([0-9.]*\) MiB.*/\1/p' <<< "$line")
  grown=$(( $(node_bytes) - before ))
  python3 -c "import sys; w=float(sys.argv[1] or 0)*2**20; g=int(sys.argv[2]); b=float(sys.argv[3] or 0)*2**20; print(f'fsx: wrote {w/2**20:.1f} MiB; the mount stored {b/2**20:.1f} MiB of blocks ({b/w if w else 0:.1f}x per replica); the nodes grew by {g/2**20:.1f} MiB ({g/w if w else 0:.1f}x, 4 replicas counted)')" "${written:-0}" "$grown" "${blocks:-0}"
  if [ -n "${FSX_SPACE_WAIT:-}" ]; then
    # The block files' bytes (not the fan-out directories they leave behind).
    blocks_bytes() { find "$data"/cluster/node-*/data/blocks -type f -printf '%s\n' | awk '{ s += $1 } END { printf "%.0f\n", s }'; }
    # The nodes run while a mount does: mount again (no writes) and wait out their grace.
    "$bin" mount --data-dir "$data" --volume fsx -o "ro$keyopt" "$fsxmnt"
    live=$(stat -c %s "$fsxmnt/fsx.testfile")
    sleep "$FSX_SPACE_WAIT"
    held=$(blocks_bytes)
    "$bin" umount "$fsxmnt"
    python3 -c "import sys; l=int(sys.argv[1]); h=int(sys.argv[2]); print(f'fsx: after {sys.argv[3]} s the nodes hold {h/2**20:.1f} MiB of blocks for a live file of {l/2**20:.1f} MiB: {h/l if l else 0:.1f}x the live data, {h/(4*l) if l else 0:.2f}x its 4 replicas')" "$live" "$held" "$FSX_SPACE_WAIT"
  fi
fi

echo "posix-suites: done in $(( $(date +%s) - start )) s, status $status"
exit $status
