#!/usr/bin/env bash
# Soak the deterministic simulators far past the seeds CI runs (as TigerBeetle's VOPR does).
#
#   scripts/soak.sh HOURS                        # every simulator, random starting seeds, every core
#   scripts/soak.sh --seeds N [--sim S] [--f F]  # exactly N seeds of one simulator and f, every core
#
# Simulators (S): simulate (dBQS: replicas, clients, state transfer, GC), simulate-agreement (the
# MS agreement and membership) and simulate-key (the MS's threshold key). Without --sim, HOURS mode
# rotates over simulate f=1, simulate f=2, simulate-agreement f=1 and simulate-key f=1. Each worker runs chunks of CHUNK seeds (default 500) from a random start;
# every seed draws its own swarm of faults. Every failing seed is printed with the command that
# replays it, and the run ends with one summary line:
#   soak: seeds=N violations=V failing=K
# It exits 1 when any seed failed. Logs of each chunk stay in SOAK_DIR (default target/soak).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
hours="" total="" sim="" f=1
while [ $# -gt 0 ]; do
  case "$1" in
    --seeds) total=${2:?}; shift 2 ;;
    --sim) sim=${2:?}; shift 2 ;;
    --f) f=${2:?}; shift 2 ;;
    -h|--help) usage ;;
    *) [ -z "$hours" ] && [[ "$1" =~ ^[0-9]+([.][0-9]+)?$ ]] || usage; hours=$1; shift ;;
  esac
done
[ -n "$hours" ] || [ -n "$total" ] || usage
case "$sim" in ""|simulate|simulate-agreement|simulate-key) ;; *) echo "unknown simulator: $sim" >&2; usage ;; esac
[ -n "$total" ] && [ -z "$sim" ] && sim=simulate

chunk=${CHUNK:-500}
jobs=${JOBS:-$(nproc)}
dir=${SOAK_DIR:-target/soak}
mkdir -p "$dir"
rm -f "$dir"/chunk-*.log

cargo build --release --locked -p dbqsfs-tests --bins >&2
# Run a copy, so that a rebuild during a long soak does not change the binary under it.
bin="$dir/bin"
mkdir -p "$bin"
cp target/release/simulate target/release/simulate-agreement target/release/simulate-key "$bin/"

random_seed() { od -An -N5 -tu8 /dev/urandom | tr -d ' '; }

# One chunk: NAME F FIRST COUNT, its log kept as chunk-<name>-f<f>-<first>.log.
run_chunk() {
  local name=$1 ff=$2 first=$3 count=$4
  local log="$dir/chunk-$name-f$ff-$first.log"
  "$bin/$name" --f "$ff" --seed "$first" --seeds "$count" >"$log" 2>&1 || true
  grep -E '^seed [0-9]+ FAILED|replay:' "$log" | sed "s/^/[$name f=$ff] /" || true
}

# Worker W of JOBS: in --seeds mode the chunks i with i % JOBS == W of one range from a random start;
# in HOURS mode chunks from fresh random starts, rotating over the simulators, until the deadline.
worker() {
  local w=$1 i=0
  if [ -n "$total" ]; then
    local n
    for (( i = w; i * chunk < total; i += jobs )); do
      n=$(( total - i * chunk < chunk ? total - i * chunk : chunk ))
      run_chunk "$sim" "$f" $(( base + i * chunk )) "$n"
    done
  else
    local kinds=("simulate 1" "simulate 2" "simulate-agreement 1" "simulate-key 1")
    [ -n "$sim" ] && kinds=("$sim $f")
    while [ "$(date +%s)" -lt "$deadline" ]; do
      # shellcheck disable=SC2086
      run_chunk ${kinds[(i + w) % ${#kinds[@]}]} "$(random_seed)" "$chunk"
      i=$(( i + 1 ))
    done
  fi
}

echo "soak: $jobs workers, chunks of $chunk seeds, logs in $dir" >&2
start=$(date +%s)
base=$(random_seed)
[ -n "$hours" ] && deadline=$(( start + $(awk -v h="$hours" 'BEGIN { printf "%d", h * 3600 }') ))
for (( w = 0; w < jobs; w++ )); do worker "$w" & done
wait

seeds=0 violations=0
for log in "$dir"/chunk-*.log; do
  [ -e "$log" ] || continue
  line=$(grep -E '^simulate(-agreement|-key)?: seeds=' "$log" || true)
  if [ -z "$line" ]; then
    echo "no closing line in $log (the simulator crashed?):" >&2; tail -5 "$log" >&2
    violations=$(( violations + 1 )); continue
  fi
  s=$(sed -E 's/.* seeds=([0-9]+).*/\1/' <<<"$line")
  v=$(sed -E 's/.* violations=([0-9]+).*/\1/' <<<"$line")
  seeds=$(( seeds + s )); violations=$(( violations + v ))
done
failing=$(cat "$dir"/chunk-*.log 2>/dev/null | grep -cE '^seed [0-9]+ (FAILED|caught)' || true)
for name in simulate simulate-agreement simulate-key; do
  for ff in 1 2 3; do
    n=0
    for log in "$dir"/chunk-$name-f$ff-*.log; do
      [ -e "$log" ] || continue
      n=$(( n + $(grep -E "^$name: seeds=" "$log" | sed -E 's/.* seeds=([0-9]+).*/\1/' || echo 0) ))
    done
    [ "$n" -gt 0 ] && echo "  $name f=$ff: $n seeds" >&2
  done
done
echo "  in $(( $(date +%s) - start )) s" >&2
echo "soak: seeds=$seeds violations=$violations failing=$failing"
[ "$violations" -eq 0 ]
