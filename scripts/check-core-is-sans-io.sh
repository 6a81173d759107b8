#!/usr/bin/env bash
# core/ must stay sans-IO: no async runtime, sockets, transport, FUSE, disk store or OS randomness in its
# dependency tree, and no clock, file, socket or OS randomness calls in its source.
set -euo pipefail
cd "$(dirname "$0")/.."
forbidden='^(tokio|mio|socket2|quinn|quinn-proto|quinn-udp|rustls|fuser|redb|getrandom|rand|rand_core|libc|nix|async-std|smol|futures)$'
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
echo "core/ is sans-IO: $(wc -l <<<"$deps") crates in its tree, none of them I/O"
