#!/usr/bin/env bash
# Space coming back: what a collector pass costs and what it gives back, on the embedded default
# cluster (4 nodes, f=1) in a temporary data directory, mounted with -o gc=0 so that every pass
# is one `dbqsfs gc` the script times.
#
#   scripts/bench-space.sh                 # 1 GiB; root
#   SIZE_MB=256 scripts/bench-space.sh
#   DBQSFS_BIN=target/release/dbqsfs       # use this binary instead of building one
#
# Prints: the write rate of SIZE_MB with fsync; the time and the loopback bytes of a collector
# pass that releases it (rm -rf first), per GiB freed; the write rate of 256 MiB alone and while
# a pass releases another SIZE_MB; how long after rm -rf the nodes' block stores are back within
# 10% of SIZE_MB of where they started (the nodes' default grace, 30 s, included). Always
# unmounts and stops the cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
size=${SIZE_MB:-1024}
if [ -z "${DBQSFS_BIN:-}" ]; then
  cargo build --release -p dbqsfs-daemon --bin dbqsfs
  DBQSFS_BIN=target/release/dbqsfs
fi
bin=$(realpath "$DBQSFS_BIN")
work=$(mktemp -d /var/tmp/dbqsfs-space.XXXXXX)
mnt=$work/mnt
mkdir -p "$mnt"
cleanup() {
  set +e
  cd /
  grep -q " $mnt " /proc/self/mountinfo && "$bin" umount "$mnt"
  [ -f "$work/data/cluster/cluster.toml" ] && "$bin" cluster down --dir "$work/data/cluster" >/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The block files' bytes on all nodes (not the fan-out directories they leave behind).
blocks() { find "$work"/data/cluster/node-*/data/blocks -type f -printf '%s\n' 2>/dev/null | awk '{ s += $1 } END { printf "%.0f\n", s }'; }
lo_bytes() { awk '/^ *lo:/ { print $2 }' /proc/net/dev; }
now() { date +%s.%N; }
# Writes MB mebibytes of fresh random data to FILE with fsync; prints MB/s.
write_rate() {
  local t0 t1
  t0=$(now)
  head -c "$(( $2 << 20 ))" /dev/urandom | dd of="$1" bs=1M conv=fsync status=none iflag=fullblock
  t1=$(now)
  python3 -c "import sys; print(f'{int(sys.argv[1]) / (float(sys.argv[3]) - float(sys.argv[2])):.1f}')" "$2" "$t0" "$t1"
}
gc_pass() {  # prints "seconds loopback-bytes"
  local t0 t1 b0 b1
  b0=$(lo_bytes); t0=$(now)
  "$bin" gc --data-dir "$work/data" > "$work/gc.out"
  t1=$(now); b1=$(lo_bytes)
  python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f} {int(sys.argv[4]) - int(sys.argv[3])}')" "$t0" "$t1" "$b0" "$b1"
}

"$bin" mount --data-dir "$work/data" -o gc=0 "$mnt"
start=$(blocks)

rate_big=$(write_rate "$mnt/a" "$size")
full=$(blocks)
rm -rf "$mnt/a"
sleep 2   # the commit timer (1 s) makes the rm durable
read -r secs bytes < <(gc_pass)
released=$(grep -o 'released [0-9]*' "$work/gc.out" | grep -o '[0-9]*')
echo "write ${size} MiB with fsync: ${rate_big} MiB/s; the nodes' blocks grew $(( (full - start) >> 20 )) MiB"
python3 -c "import sys; s, b, m, r = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]; g = m / 1024; print(f'collector pass: released {r} blocks in {s:.2f} s, {b / 2**20:.2f} MiB on loopback; per GiB freed: {s / g:.2f} s, {b / g / 2**20:.2f} MiB')" "$secs" "$bytes" "$size" "$released"

alone=$(write_rate "$mnt/c" 256)
rm -f "$mnt/c"
sleep 2
"$bin" gc --data-dir "$work/data" > /dev/null
write_rate "$mnt/a2" "$size" > /dev/null
rm -rf "$mnt/a2"
sleep 2
"$bin" gc --data-dir "$work/data" > "$work/gc2.out" &
gcpid=$!
during=$(write_rate "$mnt/d" 256)
wait "$gcpid"
echo "write 256 MiB with fsync: ${alone} MiB/s alone, ${during} MiB/s while a pass released ${size} MiB ($(python3 -c "print(f'{float(\"$during\") / float(\"$alone\") * 100:.0f}')")% of alone)"
rm -f "$mnt/d"
rm_at=$(now)
sleep 2
"$bin" gc --data-dir "$work/data" > /dev/null
bound=$(( start + (size << 20) / 10 ))
while [ "$(blocks)" -gt "$bound" ]; do
  sleep 1
  if python3 -c "import sys; sys.exit(0 if float(sys.argv[2]) - float(sys.argv[1]) > 180 else 1)" "$rm_at" "$(now)"; then
    break
  fi
done
python3 -c "import sys; print(f'nodes back to {int(sys.argv[3]) / 2**20:.1f} MiB of blocks (from {int(sys.argv[4]) / 2**20:.1f} MiB; {int(sys.argv[5]) / 2**20:.1f} MiB at the start) {float(sys.argv[2]) - float(sys.argv[1]):.0f} s after the last rm')" "$rm_at" "$(now)" "$(blocks)" "$full" "$start"
