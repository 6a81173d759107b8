#!/usr/bin/env bash
# The peer workload (../shared/bench/peers.sh) on a dbqsfs mount and on a bindfs passthrough of a
# local directory, interleaved (dbqsfs bindfs bindfs dbqsfs ...), then a table of medians and the
# dbqsfs/bindfs ratios (inverted for the `s` rows, so below 1 is slower either way).
#
#   scripts/bench-peers.sh [ROUNDS]        # default 2 rounds; root (peers.sh drops caches)
#   AGAINST=encrypted scripts/bench-peers.sh  # against an encrypted volume of the same cluster
#                                             # instead of bindfs (the cost of encryption)
#   PEERS=/path/to/peers.sh PEERS_TARBALL=x.tar.gz DBQSFS_BIN=target/release/dbqsfs
#
# dbqsfs: the embedded default cluster (4 nodes, f=1) in a temporary data directory, default
# options. bindfs: default options (single-threaded, 1 s kernel caches), as in peers-setup.sh.
# Raw outputs stay in the printed work directory. Always unmounts and stops the cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-2}
peers=${PEERS:-/work/shared/bench/peers.sh}
if [ -z "${PEERS_TARBALL:-}" ]; then
  PEERS_TARBALL=$(ls ~/.cargo/registry/cache/*/tokio-1.*.crate 2>/dev/null | tail -n 1)
  export PEERS_TARBALL
fi
[ -r "$PEERS_TARBALL" ] || { echo "bench-peers: set PEERS_TARBALL to a source tarball" >&2; exit 2; }
for p in bindfs fio; do
  command -v $p >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bindfs fio >/dev/null; }
done
if [ -z "${DBQSFS_BIN:-}" ]; then
  cargo build --release -p dbqsfs-daemon --bin dbqsfs
  DBQSFS_BIN=target/release/dbqsfs
fi
bin=$(realpath "$DBQSFS_BIN")

work=$(mktemp -d /var/tmp/dbqsfs-bench.XXXXXX)
against=${AGAINST:-bindfs}
case $against in bindfs|encrypted) ;; *) echo "bench-peers: AGAINST=bindfs or encrypted" >&2; exit 2;; esac
mkdir -p "$work/dbqsfs" "$work/bindfs" "$work/bindfs-src" "$work/encrypted" "$work/out"
bindfs_pid=
cleanup() {
  set +e
  cd /
  grep -q " $work/dbqsfs " /proc/self/mountinfo && "$bin" umount "$work/dbqsfs"
  grep -q " $work/encrypted " /proc/self/mountinfo && "$bin" umount "$work/encrypted"
  grep -q " $work/bindfs " /proc/self/mountinfo && fusermount3 -u "$work/bindfs"
  [ -n "$bindfs_pid" ] && kill "$bindfs_pid" 2>/dev/null
  [ -f "$work/data/cluster/cluster.toml" ] && "$bin" cluster down --dir "$work/data/cluster" >/dev/null
  rm -rf "$work/data" "$work/bindfs-src"
  echo "bench-peers: raw results in $work/out"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$bin" mount --data-dir "$work/data" "$work/dbqsfs"
if [ "$against" = bindfs ]; then
  bindfs -f "$work/bindfs-src" "$work/bindfs" &
  bindfs_pid=$!
  for _ in $(seq 100); do grep -q " $work/bindfs " /proc/self/mountinfo && break; sleep 0.1; done
else
  head -c 32 /dev/urandom > "$work/volume.key"
  "$bin" mount --data-dir "$work/data" --volume encrypted -o "encrypt,keyfile=$work/volume.key" "$work/encrypted"
fi

echo "tarball: $PEERS_TARBALL ($(tar -tzf "$PEERS_TARBALL" | wc -l) entries)"
for r in $(seq "$rounds"); do
  # Odd rounds run dbqsfs first, even rounds second, so neither side always follows the other.
  order="dbqsfs $against"; [ $((r % 2)) = 0 ] && order="$against dbqsfs"
  for fs in $order; do
    echo "=== round $r: $fs ($(date -Is))"
    "$peers" "$work/$fs" "$fs" > "$work/out/r$r-$fs.txt" 2> "$work/out/r$r-$fs.err"
    tr '\n' ' ' < "$work/out/r$r-$fs.txt"; echo
  done
done

python3 - "$work/out" "$rounds" "$against" <<'PY'
import sys, statistics, collections
out, rounds, other = sys.argv[1], int(sys.argv[2]), sys.argv[3]
vals = collections.defaultdict(lambda: collections.defaultdict(list))
units, order = {}, []
for r in range(1, rounds + 1):
    for fs in ("dbqsfs", other):
        for line in open(f"{out}/r{r}-{fs}.txt"):
            m, v, u = line.split()
            if m not in units:
                order.append(m)
            units[m] = u
            vals[m][fs].append(float(v))
print(f"| metric | unit | dbqsfs | {other} | dbqsfs/{other} |")
print("|---|---|---:|---:|---:|")
for m in order:
    d, b = statistics.median(vals[m]["dbqsfs"]), statistics.median(vals[m][other])
    ratio = (b / d) if units[m] == "s" else (d / b)
    fmt = lambda x: f"{x:.3f}" if units[m] == "s" else (f"{x:.1f}" if x < 1000 else f"{x:.0f}")
    print(f"| {m} | {units[m]} | {fmt(d)} | {fmt(b)} | {ratio:.3f} |")
PY
