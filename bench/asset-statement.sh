#!/usr/bin/env bash
# PostgreSQL's time for the batched read of assets (`queries::assets`, nine ids a statement,
# as the miss-heavy walk's batches hold about nine), in its two spellings side by side:
# `json` has PostgreSQL build each body (`json_build_object` and two `to_char`, the catalog's
# `asset_json!`, still used by pages and bundles), `columns` selects the row's columns for the
# server to build the same bytes (`queries::asset_body`, what `GET /listings/{id}` runs).
# pgbench with one client, prepared statements, alternating 3-second runs on a private
# PostgreSQL (a temp dir, a free port) holding 100,000 assets shaped as `cascade seed`
# makes them. Prints each run's statements/s, then the median of each spelling.
# Usage: bench/asset-statement.sh [rounds, default 8]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
ensure_packages postgresql
rounds="${1:-8}"
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
work=$(mktemp -d)
chmod 755 "$work"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" = 0 ] && chown postgres "$work"
trap 'as_pg "$bin/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
as_pg "$bin/initdb" -D "$work/data" -A trust -U postgres >/dev/null
as_pg "$bin/pg_ctl" -D "$work/data" -l "$work/log" -w \
    -o "-p $port -k $work -c listen_addresses=''" start >/dev/null
sql() { "$bin/psql" -h "$work" -p "$port" -U postgres -d postgres -q -v ON_ERROR_STOP=1 "$@"; }
sql <<'EOF'
CREATE TABLE assets (
    version_id  TEXT PRIMARY KEY,
    producer_id TEXT NOT NULL,
    name        TEXT NOT NULL,
    metadata    JSONB NOT NULL DEFAULT '{}',
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
INSERT INTO assets
SELECT 'v' || lpad(i::text, 7, '0'), 'producer-' || lpad((i % 50)::text, 4, '0'),
       'Curated weather observations ' || i,
       jsonb_build_object('description', 'Curated weather observations for Lisbon, version ' || i % 7,
                          'format', 'parquet', 'region', 'Lisbon', 'rows', i * 37 % 50000000,
                          'tags', jsonb_build_array('weather', 'Lisbon')),
       now() - i * interval '300 seconds', now() - i * interval '300 seconds'
FROM generate_series(1, 100000) i;
-- The catalog's asset_json! (pgbench would take the format's colons for its variables).
CREATE VIEW built AS SELECT json_build_object('versionId', a.version_id,
    'producerId', a.producer_id, 'name', a.name, 'metadata', a.metadata,
    'createdAt', to_char(a.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
    'updatedAt', to_char(a.updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))::text
    AS body, a.version_id FROM assets a;
VACUUM ANALYZE assets;
EOF
ids=$(python3 -c 'print(", ".join(f"'"'"'v'"'"' || lpad((:a + {i})::text, 7, '"'"'0'"'"')" for i in range(9)))')
printf '\\set a random(1, 99990)\nSELECT body, version_id FROM built a WHERE a.version_id = ANY(ARRAY[%s]);\n' "$ids" >"$work/json.sql"
printf '\\set a random(1, 99990)\nSELECT a.version_id, a.producer_id, a.name, a.metadata, a.created_at, a.updated_at FROM assets a WHERE a.version_id = ANY(ARRAY[%s]);\n' "$ids" >"$work/columns.sql"
for _ in $(seq 1 "$rounds"); do
    for form in json columns; do
        tps=$("$bin/pgbench" -h "$work" -p "$port" -U postgres -n -M prepared -c 1 -T 3 \
            -f "$work/$form.sql" postgres 2>/dev/null | awk '/^tps/{printf "%d", $3}')
        echo "$form $tps"
    done
done | tee "$work/runs" >&2
for form in json columns; do
    awk -v f="$form" '$1 == f {print $2}' "$work/runs" | sort -n |
        awk -v f="$form" '{v[NR]=$1} END {printf "%s: median %d statements/s (%d runs, %d–%d)\n", f, (NR % 2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2), NR, v[1], v[NR]}'
done
