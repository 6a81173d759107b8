#!/usr/bin/env bash
# core/ must stay sans-IO and deterministic: no async runtime, sockets, transport, FUSE, disk store or
# OS randomness in its dependency tree; no clock, file, socket, environment, process or OS
# randomness calls in its source; and no std HashMap/HashSet (their default hasher is seeded per
# process, so iterating one can differ between two runs of one seed: use BTreeMap/BTreeSet).
set -euo pipefail
cd "$(dirname "$0")/.."
# rand_core is allowed: it is the generator traits only (the MS key's FROST signing and dealing take
# a generator the driver passes in); getrandom, the OS source behind it, is not.
forbidden='^(tokio|mio|socket2|quinn|quinn-proto|quinn-udp|rustls|fuser|redb|getrandom|rand|libc|nix|async-std|smol|futures)$'
deps=$(cargo tree -p dbqsfs-core -e normal --prefix none --format '{p}' | awk '{print $1}' | sort -u)
bad=$(grep -E "$forbidden" <<<"$deps" || true)
if [ -n "$bad" ]; then
  echo "core/ depends on I/O crates: $bad" >&2
  exit 1
fi
calls=$(grep -rn -E 'tokio::|quinn::|fuser::|std::fs|std::net|std::thread|SystemTime::now|Instant::now|thread_rng|OsRng|getrandom' core/src || true)
if [ -n "$calls" ]; then
  echo "core/ does I/O, reads a clock or OS randomness:" >&2
  echo "$calls" >&2
  exit 1
fi
nondet=$(grep -rn -E '\b(HashMap|HashSet|RandomState)\b|std::env|std::process|env!\(|option_env!\(' core/src || true)
if [ -n "$nondet" ]; then
  echo "core/ uses something nondeterministic (a std hash map or set, the environment, processes):" >&2
  echo "$nondet" >&2
  exit 1
fi
echo "core/ is sans-IO and deterministic: $(wc -l <<<"$deps") crates in its tree, none of them I/O"
