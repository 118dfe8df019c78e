#!/usr/bin/env bash
# Instructions per request of the request path, counted by callgrind: the same count on every
# run whatever else the machine does, so it shows what a change to the hot path costs where
# wrk's req/s swing by ±20 % (a 2-core machine shared with builds). Counts user space only
# (no kernel, no wrk), so it complements bench/run's ratios rather than replacing them.
#
# Rows: the bare axum ceiling (`cascade-bench bare`, everything it runs), `/bench/fixed/N`
# through Cascade's middleware and a hot `GET /listings/{id}` (in-process cache hits) — for
# Cascade, what its connections run (`--toggle-collect` on hyper's connection future, which
# the accept loop polls: reading, parsing, the service, writing), so startup is not counted.
# (Until issue 13's third round the toggle named hyper-util's `GracefulConnectionFuture`, which
# the accept loop stopped using with issue 17: the script counted nothing since.)
# Each row is counted after a 2-second warm-up (callgrind_control --zero): the steady state.
# Usage: bench/callgrind.sh [seconds per row, default 8]
# CASCADE_BENCH=/path/to/an/older/cascade-bench measures that build instead (the "before" column).
# CALLGRIND_KEEP=DIR keeps each row's callgrind output there, as row1.out… in table order
# (`callgrind_annotate --inclusive=yes DIR/row2.out` shows where a row's instructions go).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
ensure_packages postgresql valgrind wrk
cargo build --release --quiet -p cascade-bench -p cascade-cli
bin="$(cd "${CARGO_TARGET_DIR:-target}/release" && pwd)"
bench_bin="${CASCADE_BENCH:-$bin/cascade-bench}"
seconds="${1:-8}"
work=$(mktemp -d)
chmod 755 "$work"
trap 'pkill -f "$work" 2>/dev/null || true; sleep 1; rm -rf "$work"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# A private embedded PostgreSQL with 1,000 assets; no Redis (the in-process tier answers hits
# the same way with Redis configured).
export CASCADE_DATA_DIR="$work/data" RUST_LOG=warn RATE_LIMIT_API=off
"$bin/cascade" seed catalog --assets 1000 >/dev/null

# count NAME PATH_OR_LUA COMMAND...: runs COMMAND under callgrind on a free port, sends wrk
# at it for $seconds, prints instructions per request.
count() {
    local name=$1 what=$2
    shift 2
    local port out
    port=$(free_port)
    out="$work/callgrind.$port"
    PORT=$port HOST=127.0.0.1 valgrind --tool=callgrind --callgrind-out-file="$out" "$@" \
        >"$work/$port.log" 2>&1 &
    local pid=$!
    for _ in $(seq 1 300); do
        curl -s -o /dev/null "http://127.0.0.1:$port/" && break
        sleep 0.2
    done
    local target=()
    if [[ $what == *.lua ]]; then target+=(-s "$what" "http://127.0.0.1:$port/"); else target+=("http://127.0.0.1:$port$what"); fi
    # A warm-up (first loads of the hot set, metric handles, buffers), then counters zeroed:
    # what is counted is the steady state.
    wrk -t1 -c4 -d2s "${target[@]}" >/dev/null
    # (vgdb names its pipes after $HOST, which the server is given)
    HOST=127.0.0.1 callgrind_control --zero "$pid" >/dev/null 2>&1
    local requests
    requests=$(wrk -t1 -c4 "-d${seconds}s" "${target[@]}" | awk '/requests in/{print $1}')
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    local total
    total=$(callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/{gsub(",","",$1); print $1}')
    printf '| %s | %s | %s |\n' "$name" "$requests" "$((total / requests))"
    if [[ -n ${CALLGRIND_KEEP:-} ]]; then
        mkdir -p "$CALLGRIND_KEEP"
        rows=$((${rows:-0} + 1))
        cp "$out" "$CALLGRIND_KEEP/row$rows.out"
    fi
}

serve_port=$(free_port)
PORT=$serve_port HOST=127.0.0.1 "$bench_bin" serve >"$work/ids.log" 2>&1 &
ids_pid=$!
for _ in $(seq 1 300); do curl -s -o /dev/null "http://127.0.0.1:$serve_port/health" && break; sleep 0.2; done
curl -s "http://127.0.0.1:$serve_port/listings?limit=100" | grep -o '"versionId":"[^"]*"' | cut -d'"' -f4 >"$work/ids"
size=$(curl -s "http://127.0.0.1:$serve_port/listings/$(head -1 "$work/ids")" | wc -c)
kill "$ids_pid"
wait "$ids_pid" 2>/dev/null || true
cat >"$work/hot.lua" <<EOF
local ids = {}
for line in io.lines("$work/ids") do ids[#ids + 1] = line end
local i = 0
request = function()
  i = i + 1
  return wrk.format("GET", "/listings/" .. ids[(i % #ids) + 1])
end
EOF

# Exactly this name: a pattern that also matched a wrapper's `poll` would toggle twice.
connection='<hyper::server::conn::http1::UpgradeableConnection<I,S> as core::future::future::Future>::poll'
echo "| row ($size-byte bodies) | requests | instructions per request |"
echo "|---|---|---|"
count "ceiling: bare axum (whole process)" /fixed "$bench_bin" bare --bytes "$size"
count "/bench/fixed/$size through the middleware" "/bench/fixed/$size" \
    --toggle-collect="$connection" --collect-atstart=no "$bench_bin" serve
count "hot GET /listings/{id} (100 ids, in-process hits)" "$work/hot.lua" \
    --toggle-collect="$connection" --collect-atstart=no "$bench_bin" serve
