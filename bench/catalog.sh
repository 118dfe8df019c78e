#!/usr/bin/env bash
# Benchmarks the catalog's cached reads against the same queries straight to PostgreSQL, in one
# run: a private redis-server (free loopback port, no persistence) and a private PostgreSQL
# (the embedded one, in a temporary directory), both removed on exit. Usage:
#   bench/catalog.sh [--assets N] [--requests N] [--concurrency N] [--hot N] | --quick
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
ensure_packages redis-server postgresql
cargo build --release --quiet -p cascade-bench
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
dir=$(mktemp -d)
chmod 755 "$dir"
redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
trap 'kill "$(cat "$dir/redis.pid")" 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 1 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.05; done
env -u DATABASE_URL -u PG_URL CASCADE_DATA_DIR="$dir/pg" REDIS_URL="redis://127.0.0.1:$port" \
    RUST_LOG="${RUST_LOG:-warn}" "${CARGO_TARGET_DIR:-target}/release/cascade-bench" catalog "$@"
