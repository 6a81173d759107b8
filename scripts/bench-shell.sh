#!/usr/bin/env bash
# Everyday shell work on a dbqsfs mount and on a bindfs passthrough of a local directory,
# interleaved (dbqsfs bindfs dbqsfs bindfs ...): cp -a of a source tree, tar c | tar x of it,
# git init + add -A + commit of it, 200 autocommit sqlite inserts, rm -rf of it all. Prints the
# medians and the time ratios (dbqsfs time / bindfs time, so above 1 is slower).
#
#   scripts/bench-shell.sh [ROUNDS]        # default 2 rounds; root
#   DBQSFS_BIN=target/release/dbqsfs       # use this binary instead of building one
#
# The tree: 18 crate sources from the cargo registry on this machine (the same ones in every
# run; the script prints their file count and size). dbqsfs: the embedded default cluster
# (4 nodes, f=1) in a temporary data directory, default options. Always unmounts and stops the
# cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-2}
for p in bindfs sqlite3 git; do
  command -v $p >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bindfs sqlite3 git >/dev/null; }
done
if [ -z "${DBQSFS_BIN:-}" ]; then
  cargo build --release -p dbqsfs-daemon --bin dbqsfs
  DBQSFS_BIN=target/release/dbqsfs
fi
bin=$(realpath "$DBQSFS_BIN")

work=$(mktemp -d /var/tmp/dbqsfs-shell.XXXXXX)
mkdir -p "$work/dbqsfs" "$work/bindfs" "$work/bindfs-src" "$work/src" "$work/out"
bindfs_pid=
cleanup() {
  set +e
  cd /
  grep -q " $work/dbqsfs " /proc/self/mountinfo && "$bin" umount "$work/dbqsfs"
  grep -q " $work/bindfs " /proc/self/mountinfo && fusermount3 -u "$work/bindfs"
  [ -n "$bindfs_pid" ] && kill "$bindfs_pid" 2>/dev/null
  [ -f "$work/data/cluster/cluster.toml" ] && "$bin" cluster down --dir "$work/data/cluster" >/dev/null
  rm -rf "$work/data" "$work/bindfs-src" "$work/src"
  echo "bench-shell: raw results in $work/out"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

registry=$(ls -d ~/.cargo/registry/src/*/ | head -n 1)
n=0
for c in tokio quinn-proto rustls redb clap_builder serde regex-syntax hashbrown syn \
    ed25519-dalek blake3 curve25519-dalek postcard tracing-subscriber fuser libc anyhow \
    tracing-core rand_core quinn sha2 thiserror-impl; do
  d=$(ls -d "$registry$c"-[0-9]* 2>/dev/null | tail -n 1) || true
  [ -n "$d" ] || continue
  cp -a "$d" "$work/src/"
  n=$((n + 1))
  [ "$n" = 18 ] && break
done
echo "tree: $n crates, $(find "$work/src" -type f | wc -l) files, $(du -sh "$work/src" | cut -f1)"

"$bin" mount --data-dir "$work/data" "$work/dbqsfs"
bindfs -f "$work/bindfs-src" "$work/bindfs" &
bindfs_pid=$!
for _ in $(seq 100); do grep -q " $work/bindfs " /proc/self/mountinfo && break; sleep 0.1; done

timed() {  # NAME CMD...: runs CMD, prints "NAME seconds"
  local name=$1; shift
  local t0 t1
  t0=$(date +%s.%N)
  "$@" >/dev/null
  t1=$(date +%s.%N)
  echo "$name $(python3 -c "print(f'{$t1 - $t0:.3f}')")"
}
inserts() {
  sqlite3 "$1" 'create table t(x integer, y text)'
  for i in $(seq 200); do echo "insert into t values($i, 'row $i');"; done | sqlite3 "$1"
}
gitrun() {
  cd "$1" && git init -q && git add -A && git -c user.name=b -c user.email=b@b commit -qm tree
}

for r in $(seq "$rounds"); do
  for fs in dbqsfs bindfs; do
    m=$work/$fs
    echo "=== round $r: $fs ($(date -Is))"
    {
      timed cp_a cp -a "$work/src" "$m/cp"
      timed tar_pipe bash -c "mkdir '$m/tar' && tar c -C '$m/cp' . | tar x -C '$m/tar'"
      timed git_add_commit bash -c "$(declare -f gitrun); gitrun '$m/cp'"
      timed sqlite_200 bash -c "$(declare -f inserts); inserts '$m/db.sqlite'"
      timed rm_rf rm -rf "$m/cp" "$m/tar" "$m/db.sqlite"
    } | tee "$work/out/r$r-$fs.txt" | tr '\n' ' '
    echo
  done
done

python3 - "$work/out" "$rounds" <<'PY'
import statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
res = {}
for r in range(1, rounds + 1):
    for fs in ("dbqsfs", "bindfs"):
        for line in open(f"{out}/r{r}-{fs}.txt"):
            k, v = line.split()
            res.setdefault(k, {}).setdefault(fs, []).append(float(v))
print("| work | dbqsfs s | bindfs s | dbqsfs/bindfs |")
print("|---|---:|---:|---:|")
for k, v in res.items():
    d, b = statistics.median(v["dbqsfs"]), statistics.median(v["bindfs"])
    print(f"| {k} | {d:.2f} | {b:.2f} | {d / b:.2f}x |")
PY
