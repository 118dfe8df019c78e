#!/usr/bin/env bash
# Benchmarks the cache engine against a private redis-server (free loopback port, no
# persistence), side by side with a raw Redis GET in the same run. Usage:
#   bench/cache.sh [--ops N] [--concurrency N]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
ensure_packages redis-server
cargo build --release --quiet -p cascade-bench
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
dir=$(mktemp -d)
redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
trap 'kill "$(cat "$dir/redis.pid")" 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 1 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.05; done
REDIS_URL="redis://127.0.0.1:$port" "${CARGO_TARGET_DIR:-target}/release/cascade-bench" cache "$@"
