#!/usr/bin/env bash
# Throughput of a live mount while one node of four is faulty, against the same cluster healthy.
#
#   scripts/bench-faults.sh [MODE...]     # default: healthy killed silent garbage corrupt stale equivocate full healthy
#
# For each mode: a fresh 4-node cluster (f=1) on loopback, node 3 started with `--fault MODE`
# (`killed`: started healthy and killed with kill -9 before the writes; `full`: node 3's directory
# on a 12 MiB tmpfs with a 4 MiB reserve, so that it is full after a few blocks). A read-write mount copies a
# generated tree (TREE_FILES files, default 300, of 1 KiB to 256 KiB: about 15 MB) in and unmounts (the unmount
# returns once everything is stored): write throughput. Then a fresh read-only mount reads every
# file back and checks it against the source's SHA-256 sums: read throughput, and the count of
# wrong reads (must be 0). Prints a table of MB/s and percentages of the mean of the healthy runs.
# Builds `dbqsfs` with --features fault-injection. Root is needed for the mounts. Always unmounts
# and stops its nodes.
set -euo pipefail
cd "$(dirname "$0")/.."
modes=("$@")
[ ${#modes[@]} -gt 0 ] || modes=(healthy killed silent garbage corrupt stale equivocate full healthy)
files=${TREE_FILES:-300}

cargo build --release --locked -p dbqsfs-daemon --features fault-injection --bin dbqsfs >&2
bin=$(realpath target/release/dbqsfs)
work=$(mktemp -d /var/tmp/dbqsfs-faults.XXXXXX)
pids=()
cleanup() {
  set +e
  for m in "$work"/mnt-*; do
    grep -q " $m " /proc/self/mountinfo && "$bin" umount "$m"
  done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
  grep -q " $work/c/node-3 " /proc/self/mountinfo && umount "$work/c/node-3"
  rm -rf "$work/c" "$work/tree"
  echo "bench-faults: results in $work/results.txt" >&2
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The tree, the same for every mode.
python3 - "$work/tree" "$files" <<'PY'
import os, random, sys
root, n = sys.argv[1], int(sys.argv[2])
rng = random.Random(7)
for i in range(n):
    d = os.path.join(root, f"d{i % 17}", f"e{i % 5}")
    os.makedirs(d, exist_ok=True)
    size = int(1024 * 2 ** rng.uniform(0, 8))
    with open(os.path.join(d, f"f{i}.bin"), "wb") as f:
        f.write(rng.randbytes(size))
PY
(cd "$work/tree" && find . -type f -print0 | sort -z | xargs -0 sha256sum) > "$work/sums"
bytes=$(du -sb "$work/tree" | cut -f1)
echo "tree: $files files, $bytes bytes" >&2

now() { date +%s.%N; }
mbps() { awk -v b="$bytes" -v s="$1" 'BEGIN { printf "%.1f", b / s / 1e6 }'; }

run_mode() {
  local mode=$1 c="$work/c" port=$(( 20000 + RANDOM % 30000 ))
  rm -rf "$c"
  "$bin" cluster init --nodes 4 --dir "$c" --base-port "$port" >/dev/null
  if [ "$mode" = full ]; then
    mv "$c/node-3" "$c/node-3.init" && mkdir "$c/node-3"
    mount -t tmpfs -o size=12M tmpfs "$c/node-3"
    cp -a "$c/node-3.init/." "$c/node-3/"
  fi
  pids=()
  for i in 0 1 2 3; do
    local extra=()
    case "$i/$mode" in
      3/healthy|3/killed) ;;
      3/full) extra=(--reserve 4) ;;
      3/*) extra=(--fault "$mode") ;;
    esac
    "$bin" node --dir "$c/node-$i" "${extra[@]}" > "$c/node-$i.log" 2>&1 &
    pids+=($!)
  done
  sleep 2
  local mnt="$work/mnt-$mode"
  "$bin" mount --cluster "$c/cluster.toml" --volume v "$mnt" >/dev/null
  if [ "$mode" = killed ]; then kill -9 "${pids[3]}"; fi
  local t0 t1 t2 t3
  t0=$(now)
  cp -a "$work/tree" "$mnt/t"
  "$bin" umount "$mnt"
  t1=$(now)
  "$bin" mount --cluster "$c/cluster.toml" --volume v -o ro "$mnt" >/dev/null
  t2=$(now)
  local wrong
  wrong=$( (cd "$mnt/t" && sha256sum --quiet -c "$work/sums" 2>&1 || true) | grep -c FAILED || true)
  t3=$(now)
  "$bin" umount "$mnt"
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
  if [ "$mode" = full ]; then
    echo "node 3: $(grep -c 'store full' "$c/node-3.log" || true) 'store full' lines, $(grep -c 'goes on without' "$c/node-3.log" || true) transfers that deferred blocks" >&2
    umount "$c/node-3"
  fi
  local ws rs
  ws=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
  rs=$(awk -v a="$t2" -v b="$t3" 'BEGIN { print b - a }')
  echo "$mode $(mbps "$ws") $(mbps "$rs") $wrong"
}

: > "$work/results.txt"
for mode in "${modes[@]}"; do
  echo "=== $mode ($(date -Is))" >&2
  run_mode "$mode" | tee -a "$work/results.txt" >&2
done

# The baseline: the mean of the healthy rows (the machine is noisy; their spread shows how much).
awk '
  { rows[NR] = $0 }
  $1 == "healthy" { w0 += $2; r0 += $3; h++ }
  END {
    w0 /= h; r0 /= h
    print "| node 3 of 4 | write MB/s | % of healthy | read MB/s (fresh ro mount) | % of healthy | wrong reads |"
    print "|---|---:|---:|---:|---:|---:|"
    for (i = 1; i <= NR; i++) {
      split(rows[i], f, " ")
      printf "| %s | %s | %.0f%% | %s | %.0f%% | %s |\n", f[1], f[2], 100 * f[2] / w0, f[3], 100 * f[3] / r0, f[4]
    }
  }' "$work/results.txt"
