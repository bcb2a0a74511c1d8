#!/usr/bin/env bash
# Freeze windows of `kine-rs migrate` (issue 9: <= 1 s for the CLI, <= 100 ms for a gateway
# cutover, at the 99th percentile of several runs, while a client writes 500 txns/s):
#
#   bench/migrate-freeze.sh          # FREEZE_RUNS (5) CLI moves and 5 gateway cutovers
#
# Each run: a tenant of FREEZE_KEYS (10,000) keys of 1 KiB on a fresh PostgreSQL database,
# written through a kine-rs by `kine-load refusals` at FREEZE_RATE (500) txns/s throughout;
# then moved to a fresh MariaDB database, either by `kine-rs migrate` (the CLI: the source
# kine-rs keeps serving, refusing writes from the freeze on) or by `kine-rs tenant migrate`
# on the admin socket of the mTLS gateway the client writes through (the gateway serves the
# tenant from MariaDB afterwards). Printed per run: the window the engine reports (freeze to
# target serving) and the client's (first request refused to the last refused answer; for
# the CLI only those refused as "frozen", since the source refuses as "moved" for good), then
# the 99th percentile (nearest rank) of each over the runs. (After a CLI move the source's
# kine-rs exits, as a sidecar does, so the client's later writes fail to connect: counted as
# failed, not refused.)
#
# Environment: FREEZE_RUNS, FREEZE_KEYS, FREEZE_RATE, KINE_RS_BIN, KINE_LOAD_BIN,
# KINE_BENCH_POSTGRES_URL, KINE_BENCH_MYSQL_URL (as bench/run.sh).

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
RUNS=${FREEZE_RUNS:-5}
KEYS=${FREEZE_KEYS:-10000}
RATE=${FREEZE_RATE:-500}
PG_SERVER=${KINE_BENCH_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}
MY_SERVER=${KINE_BENCH_MYSQL_URL:-mysql://root@127.0.0.1:3306/mysql}

if [ -z "${KINE_RS_BIN:-}" ] || [ -z "${KINE_LOAD_BIN:-}" ]; then
    cargo build --release --quiet -p kine-rs -p kine-bench --bins
fi
KINE_RS_BIN=${KINE_RS_BIN:-$ROOT/target/release/kine-rs}
KINE_LOAD_BIN=${KINE_LOAD_BIN:-$ROOT/target/release/kine-load}

NAME="kine_freeze_$(date +%s)_$RANDOM"
WORK=$(mktemp -d)
PIDS=()
DATABASES=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for db in "${DATABASES[@]}"; do
        psql "$PG_SERVER" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
        mysql -h 127.0.0.1 -u root -e "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# serve ENDPOINT [ARGS...]: a kine-rs on a free port; sets SERVER_PID and PORT.
serve() {
    local endpoint=$1
    shift
    PORT=$(free_port)
    "$KINE_RS_BIN" --endpoint "$endpoint" --listen-address "127.0.0.1:$PORT" --compact-interval 0 \
        "$@" >>"$WORK/kine-rs.log" 2>&1 &
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "kine-rs did not start on $endpoint" >&2
    exit 1
}

# writer ARGS...: `kine-load refusals` in the background, once its preload is done.
writer() {
    "$KINE_LOAD_BIN" refusals --rate "$RATE" --preload "$KEYS" --val-size 1024 --duration 600 \
        "$@" >"$WORK/refusals.json" 2>"$WORK/refusals.err" &
    WRITER_PID=$!
    PIDS+=("$WRITER_PID")
    until grep -q "writing at" "$WORK/refusals.err"; do
        kill -0 "$WRITER_PID" 2>/dev/null || { cat "$WORK/refusals.err" >&2; exit 1; }
        sleep 0.2
    done
    sleep 1
}

# stop_writer WINDOW: ends the writer and prints its refused window (refused_window_ms:
# frozen only; refused_or_moved_window_ms: also refused as moved).
stop_writer() {
    sleep 1
    kill -TERM "$WRITER_PID" 2>/dev/null || true
    wait "$WRITER_PID" || true
    [ -s "$WORK/refusals.json" ] || { echo "the writer stopped early:" >&2; cat "$WORK/refusals.err" >&2; exit 1; }
    python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r[sys.argv[2]], r["refused_frozen"], r["refused_moved"], r["acked"], r["failed"], r["first_error"])' "$WORK/refusals.json" "$1"
}

"$KINE_LOAD_BIN" pki --dir "$WORK/pki" --clients 1 2>/dev/null

RESULTS="$WORK/results"
: >"$RESULTS"
for run in $(seq "$RUNS"); do
    for mode in cli gateway; do
        pg="${NAME}_${mode}_${run}_a"
        my="${NAME}_${mode}_${run}_b"
        DATABASES+=("$pg" "$my")
        from="${PG_SERVER%/*}/$pg"
        to="${MY_SERVER%/*}/$my"
        if [ "$mode" = cli ]; then
            serve "$from"
            writer --endpoints "http://127.0.0.1:$PORT"
            engine=$("$KINE_RS_BIN" migrate --from "$from" --to "$to" -o json 2>>"$WORK/migrate.log" | tail -1 |
                python3 -c 'import json,sys; print(json.load(sys.stdin)["freeze_window_ms"])')
        else
            socket="$WORK/admin-$run.sock"
            serve "$from" --gateway --gateway-create-tenants \
                --server-cert-file "$WORK/pki/server.pem" --server-key-file "$WORK/pki/server-key.pem" \
                --trusted-ca-file "$WORK/pki/ca.pem" --admin-socket "$socket"
            writer --endpoints "https://127.0.0.1:$PORT" --pki-dir "$WORK/pki" --tls-domain localhost
            engine=$("$KINE_RS_BIN" tenant --admin-socket "$socket" -o json migrate tenant-0000 --to "$to" |
                python3 -c 'import json,sys; print(json.load(sys.stdin)["freeze_window_ms"])')
        fi
        if [ "$mode" = cli ]; then window=refused_window_ms; else window=refused_or_moved_window_ms; fi
        stop_writer "$window" >"$WORK/stopped"
        read -r client frozen moved acked failed first <"$WORK/stopped"
        load=$(cut -d' ' -f1-3 /proc/loadavg)
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        note=""
        [ "$failed" = 0 ] || note=": $first"
        echo "$mode run $run: engine ${engine} ms, client ${client} ms ($frozen refused as frozen, $moved as moved, $acked acknowledged, $failed failed$note); load average $load"
        echo "$mode $engine $client" >>"$RESULTS"
    done
done
python3 - "$RESULTS" <<'EOF'
import math, sys
rows = [l.split() for l in open(sys.argv[1])]
for mode in ("cli", "gateway"):
    for i, what in ((1, "engine"), (2, "client")):
        values = sorted(float(r[i]) for r in rows if r[0] == mode)
        if values:
            p99 = values[max(0, math.ceil(0.99 * len(values)) - 1)]
            print(f"{mode} {what}: p99 {p99:.0f} ms over {len(values)} runs "
                  f"(min {values[0]:.0f}, median {values[len(values) // 2]:.0f})")
EOF
