#!/usr/bin/env bash
# Builds the real Kubernetes programs the tests drive (recipes/go-peers.md), once per machine,
# from Go modules into a cache outside the checkout:
#
#   $KINE_PEERS_CACHE/kube-apiserver-<version>/kube-apiserver
#   $KINE_PEERS_CACHE/kubectl-<version>/kubectl
#   $KINE_PEERS_CACHE/helm-<helm version>/helm   (helm.sh/helm/v3, for the chart's tests)
#   $KINE_PEERS_CACHE/nats-server-<version>/nats-server   (newer than Debian's 2.9; it has
#     JetStream's `sync_interval: always`, which the bench uses to fsync as etcd does)
#   $KINE_PEERS_CACHE/kine-<kine version>/kine   (github.com/k3s-io/kine, the peer users switch
#                                                 from; `kine-rs migrate --from kine+...` tests)
#   $KINE_PEERS_CACHE/etcd-v3.7.3/etcd   (etcd 3.7: the oracle of its RangeStream RPC)
#   $KINE_PEERS_CACHE/apiserver-storage-<v0.MINOR.PATCH>/etcd3.test, v0.36.3 and v0.37.0   (Kubernetes' apiserver
#     storage tests, k8s.io/apiserver/pkg/storage/etcd3, serving from kine-rs: see below)
#   $KINE_PEERS_CACHE/etcd-<etcd version>/etcd   (the newest etcd server: the member of the
#     cluster whose members are killed and restarted under writes; etcd 3.5.1, the oracle,
#     can come back from that with members one revision apart, etcd-io/etcd#13766)
#
# (KINE_PEERS_CACHE defaults to $HOME/.cache/kine-rs-peers; the version to v1.36.3, override
# with KINE_PEERS_KUBE_VERSION.) A binary already there is not built again. Nothing here is
# ever written into the checkout.
#
# How: k8s.io/kubernetes cannot be `go install`ed (its go.mod replaces ~30 staging modules with
# ./staging/... paths and requires them at v0.0.0). So a scratch module (`peers`) gets one
# `replace k8s.io/NAME => k8s.io/NAME v0.MINOR.PATCH` per staging module named in kubernetes's
# own go.mod (and its `godebug` lines), then `go get -tool` the commands and `go build` them
# with CGO_ENABLED=0, -trimpath, nice, and the version ldflags (else `--version` says v0.0.0).
#
# Output: progress and build times on stderr; on stdout, lines the caller can eval:
#   export KUBE_APISERVER_BIN=/root/.cache/kine-rs-peers/kube-apiserver-v1.36.3/kube-apiserver
#   export KUBECTL_BIN=/root/.cache/kine-rs-peers/kubectl-v1.36.3/kubectl
#   export HELM_BIN=/root/.cache/kine-rs-peers/helm-v3.22.0/helm
#   export NATS_SERVER_BIN=/root/.cache/kine-rs-peers/nats-server-v2.15.2/nats-server
#   export KINE_BIN=/root/.cache/kine-rs-peers/kine-v0.17.5/kine
#   export ETCD_NEWEST_BIN=/root/.cache/kine-rs-peers/etcd-v3.6.16/etcd
#   export ETCD37_BIN=/root/.cache/kine-rs-peers/etcd-v3.7.3/etcd
#   export APISERVER_STORAGE_V036_BIN=/root/.cache/kine-rs-peers/apiserver-storage-v0.36.3/etcd3.test
#   export APISERVER_STORAGE_V037_BIN=/root/.cache/kine-rs-peers/apiserver-storage-v0.37.0/etcd3.test
# Exit status: non-zero when a program could not be built (the caller must treat that as a
# failure, not a reason to skip).

set -euo pipefail

KUBE_VERSION=${KINE_PEERS_KUBE_VERSION:-v1.36.3}
HELM_VERSION=${KINE_PEERS_HELM_VERSION:-v3.22.0}
NATS_VERSION=${KINE_PEERS_NATS_VERSION:-v2.15.2}
KINE_VERSION=${KINE_PEERS_KINE_VERSION:-v0.17.5}
ETCD_VERSION=${KINE_PEERS_ETCD_VERSION:-v3.6.16}
ETCD37_VERSION=${KINE_PEERS_ETCD37_VERSION:-v3.7.3}
STORAGE_NEWEST_VERSION=${KINE_PEERS_STORAGE_NEWEST_VERSION:-v0.37.0}
CACHE=${KINE_PEERS_CACHE:-$HOME/.cache/kine-rs-peers}

log() { printf '%s\n' "$*" >&2; }
die() {
    log "peers.sh: FAILED: $*"
    exit 1
}

command -v go >/dev/null 2>&1 || die "go is not on PATH: install Go (1.26 or newer for Kubernetes 1.36) to build kube-apiserver and kubectl"

case "$KUBE_VERSION" in
v1.*.*) ;;
*) die "KINE_PEERS_KUBE_VERSION must look like v1.MINOR.PATCH, not '$KUBE_VERSION'" ;;
esac
minor_patch=${KUBE_VERSION#v1.}           # 36.3
kube_minor=${minor_patch%%.*}             # 36
staging_version="v0.${minor_patch}"       # v0.36.3

mkdir -p "$CACHE"
# One build at a time per machine (two test runs starting together wait for each other).
exec 9>"$CACHE/.lock"
flock 9

apiserver_bin="$CACHE/kube-apiserver-$KUBE_VERSION/kube-apiserver"
kubectl_bin="$CACHE/kubectl-$KUBE_VERSION/kubectl"

# Prints the seconds since $1 (from `date +%s`).
since() { echo "$(($(date +%s) - $1))"; }

# Sets up the scratch module for k8s.io/kubernetes@$KUBE_VERSION (idempotent).
scratch_module() {
    local dir=$1 kube_gomod line name target
    mkdir -p "$dir"
    cd "$dir"
    if [ ! -f go.mod ]; then
        go mod init peers >/dev/null 2>&1 || die "go mod init in $dir"
    fi
    kube_gomod=$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/^\t"GoMod": "\(.*\)",$/\1/p')
    [ -n "$kube_gomod" ] && [ -f "$kube_gomod" ] ||
        die "go mod download k8s.io/kubernetes@$KUBE_VERSION (is the module proxy reachable? is the version served?)"

    # godebug lines (e.g. `godebug default=go1.26`), as kubernetes's own builds use them.
    while read -r line; do
        [ -n "$line" ] && go mod edit "-godebug=$line"
    done < <(awk '/^godebug \(/{b=1;next} b&&/^\)/{b=0} b{print $1} /^godebug [^(]/{print $2}' "$kube_gomod")

    # Every replace whose target starts with ./ is a staging module.
    local n=0
    while read -r name target; do
        [ -n "$name" ] || continue
        go mod edit "-replace=$name=$(staging_target "$dir" "$name")"
        n=$((n + 1))
    done < <(awk '
        /^replace \(/ { b = 1; next }
        b && /^\)/ { b = 0 }
        b && $2 == "=>" && $3 ~ /^\.\// { print $1, $3 }
        /^replace [^(]/ && $3 == "=>" && $4 ~ /^\.\// { print $2, $4 }
    ' "$kube_gomod")
    [ "$n" -gt 0 ] || die "found no staging modules in $kube_gomod"
    log "scratch module $dir: $n staging modules replaced"
}

# Prints what staging module NAME is replaced with: NAME@v0.MINOR.PATCH when the proxy serves
# it, else the newest served v0.MINOR.*, else a local stub module (kube-apiserver and kubectl
# then must not import it, or the build says so).
staging_target() {
    local dir=$1 name=$2 v
    if go mod download "$name@$staging_version" >/dev/null 2>&1; then
        echo "$name@$staging_version"
        return
    fi
    v=$(go list -m -versions "$name" 2>/dev/null | tr ' ' '\n' | grep -E "^v0\.${kube_minor}\.[0-9]+$" | sort -V | tail -1 || true)
    if [ -n "$v" ]; then
        log "  $name: $staging_version is not served, using $v"
        echo "$name@$v"
        return
    fi
    log "  $name: no v0.$kube_minor.* served, using an empty local stub"
    mkdir -p "$dir/stubs/$name"
    printf 'module %s\n\ngo 1.22\n' "$name" >"$dir/stubs/$name/go.mod"
    echo "./stubs/$name"
}

# build PACKAGE OUTPUT: go build into OUTPUT (atomically), printing the time it took.
build() {
    local pkg=$1 out=$2 t0 pkgs ldflags
    t0=$(date +%s)
    pkgs="k8s.io/client-go/pkg/version k8s.io/component-base/version"
    ldflags="-s -w"
    for p in $pkgs; do
        ldflags+=" -X $p.gitVersion=$KUBE_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$kube_minor"
        ldflags+=" -X $p.gitTreeState=clean -X $p.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    done
    mkdir -p "$(dirname "$out")"
    log "building $pkg@$KUBE_VERSION -> $out (nice, CGO_ENABLED=0, -trimpath)"
    CGO_ENABLED=0 nice -n 10 go build -trimpath -ldflags "$ldflags" -o "$out.tmp" "$pkg" ||
        die "go build $pkg@$KUBE_VERSION"
    mv -f "$out.tmp" "$out"
    log "built $(basename "$out") $KUBE_VERSION in $(since "$t0")s"
    echo "$(since "$t0")" >"$(dirname "$out")/build-seconds"
}

if [ ! -x "$apiserver_bin" ] || [ ! -x "$kubectl_bin" ]; then
    total0=$(date +%s)
    log "building kube-apiserver and kubectl $KUBE_VERSION from Go modules (once per machine; minutes)"
    scratch="$CACHE/src-kubernetes-$KUBE_VERSION"
    (
        scratch_module "$scratch"
        t0=$(date +%s)
        nice -n 10 go get -tool "k8s.io/kubernetes/cmd/kube-apiserver@$KUBE_VERSION" \
            "k8s.io/kubernetes/cmd/kubectl@$KUBE_VERSION" >&2 ||
            die "go get -tool k8s.io/kubernetes/cmd/{kube-apiserver,kubectl}@$KUBE_VERSION"
        log "go get (module downloads) took $(since "$t0")s"
        [ -x "$apiserver_bin" ] || build k8s.io/kubernetes/cmd/kube-apiserver "$apiserver_bin"
        [ -x "$kubectl_bin" ] || build k8s.io/kubernetes/cmd/kubectl "$kubectl_bin"
    ) || exit 1
    log "kube-apiserver and kubectl $KUBE_VERSION: built in $(since "$total0")s in total"
else
    log "kube-apiserver and kubectl $KUBE_VERSION: already built in $CACHE"
fi

# Check that what is there runs and says the expected version.
got=$("$apiserver_bin" --version 2>&1) || die "$apiserver_bin --version: $got"
[ "$got" = "Kubernetes $KUBE_VERSION" ] || die "$apiserver_bin --version says '$got', expected 'Kubernetes $KUBE_VERSION'"
got=$("$kubectl_bin" version --client 2>&1) || die "$kubectl_bin version --client: $got"
case "$got" in
*"Client Version: $KUBE_VERSION"*) ;;
*) die "$kubectl_bin version --client says '$got', expected Client Version: $KUBE_VERSION" ;;
esac
for b in "$apiserver_bin" "$kubectl_bin"; do
    if [ -f "$(dirname "$b")/build-seconds" ]; then
        log "$b ($KUBE_VERSION, built in $(cat "$(dirname "$b")/build-seconds")s)"
    else
        log "$b ($KUBE_VERSION)"
    fi
done

# build_tool NAME VERSION PACKAGE OUT LDFLAGS: builds Go package PACKAGE@VERSION into OUT
# from a scratch module (`go get -tool`, which works whatever replace directives the
# package's module has), unless OUT is already there. Built once, like kube-apiserver.
build_tool() {
    local name=$1 version=$2 pkg=$3 out=$4 ldflags=$5 t0 scratch
    [ -x "$out" ] && return 0
    t0=$(date +%s)
    log "building $name $version from Go modules (once per machine)"
    scratch="$CACHE/src-$name-$version"
    (
        mkdir -p "$scratch" && cd "$scratch" || exit 1
        [ -f go.mod ] || go mod init peers >/dev/null 2>&1 || die "go mod init in $scratch"
        nice -n 10 go get -tool "$pkg@$version" >&2 || die "go get -tool $pkg@$version"
        mkdir -p "$(dirname "$out")"
        CGO_ENABLED=0 nice -n 10 go build -trimpath -ldflags "$ldflags" -o "$out.tmp" "$pkg" ||
            die "go build $pkg@$version"
        mv -f "$out.tmp" "$out"
        echo "$(since "$t0")" >"$(dirname "$out")/build-seconds"
    ) || exit 1
    log "built $name $version in $(since "$t0")s"
}

# helm, for the chart's tests.
helm_bin="$CACHE/helm-$HELM_VERSION/helm"
build_tool helm "$HELM_VERSION" helm.sh/helm/v3/cmd/helm "$helm_bin" \
    "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
got=$("$helm_bin" version --short 2>&1) || die "$helm_bin version: $got"
case "$got" in
"$HELM_VERSION"*) ;;
*) die "$helm_bin version says '$got', expected $HELM_VERSION" ;;
esac
log "$helm_bin ($got)"

# nats-server: newer than Debian's.
nats_bin="$CACHE/nats-server-$NATS_VERSION/nats-server"
build_tool nats-server "$NATS_VERSION" github.com/nats-io/nats-server/v2 "$nats_bin" "-s -w"
got=$("$nats_bin" --version 2>&1) || die "$nats_bin --version: $got"
case "$got" in
*"$NATS_VERSION"*) ;;
*) die "$nats_bin --version says '$got', expected $NATS_VERSION" ;;
esac
log "$nats_bin ($got)"

# kine, with CGO_ENABLED=0 (kine then uses its pure-Go SQLite driver).
kine_bin="$CACHE/kine-$KINE_VERSION/kine"
build_tool kine "$KINE_VERSION" github.com/k3s-io/kine "$kine_bin" \
    "-s -w -X github.com/k3s-io/kine/pkg/version.Version=$KINE_VERSION"
"$kine_bin" --help >/dev/null 2>&1 || die "$kine_bin --help failed"
log "$kine_bin ($KINE_VERSION)"

# build_etcd VERSION OUT: etcd's server (its module's main package), checked to say VERSION.
build_etcd() {
    local version=$1 out=$2 got
    build_tool etcd "$version" go.etcd.io/etcd/server/v3 "$out" "-s -w"
    got=$("$out" --version 2>&1) || die "$out --version: $got"
    case "$got" in
    *"etcd Version: ${version#v}"*) ;;
    *) die "$out --version says '$got', expected ${version#v}" ;;
    esac
    log "$out ($version)"
}
# The newest etcd 3.6, and etcd v3.7: the oracle of RangeStream (etcd 3.7's Range in chunks,
# which kube-apiserver 1.37 lists with), which etcd 3.5 and 3.6 do not have.
etcd_bin="$CACHE/etcd-$ETCD_VERSION/etcd"
build_etcd "$ETCD_VERSION" "$etcd_bin"
etcd37_bin="$CACHE/etcd-$ETCD37_VERSION/etcd"
build_etcd "$ETCD37_VERSION" "$etcd37_bin"

# Kubernetes' apiserver storage tests (k8s.io/apiserver/pkg/storage/etcd3, the suite kine runs
# as its conformance test) of two versions (the one of the kube-apiserver above, and v0.37,
# whose storage lists with etcd 3.7's RangeStream), built to run against kine-rs:
# tests/apiserver-storage/test_server.go takes the place of the package file that starts an
# embedded etcd (same package, same functions), with recorder_v0.MINOR.go beside it. Built
# again whenever those files change (their text is kept beside the binary as `sources`).
storage_sources="$(cd "$(dirname "$0")/.." && pwd)/tests/apiserver-storage"
build_storage_tests() {
    local version=$1 minor dir bin recorder t0
    minor=${version%.*}
    dir="$CACHE/apiserver-storage-$version"
    bin="$dir/etcd3.test"
    recorder="$storage_sources/recorder_$minor.go"
    [ -f "$storage_sources/test_server.go" ] || die "$storage_sources/test_server.go is missing"
    [ -f "$recorder" ] || die "$recorder is missing (k8s.io/apiserver $version)"
    if [ -x "$bin" ] && cat "$storage_sources/test_server.go" "$recorder" | cmp -s - "$dir/sources"; then
        log "$bin (k8s.io/apiserver $version)"
        return 0
    fi
    t0=$(date +%s)
    log "building k8s.io/apiserver $version's storage tests against kine-rs"
    (
        module=$(go mod download -json "k8s.io/apiserver@$version" |
            sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
        [ -d "$module" ] || die "go mod download k8s.io/apiserver@$version"
        scratch="$CACHE/src-apiserver-storage-$version"
        rm -rf "$scratch" && cp -r "$module" "$scratch" && chmod -R u+w "$scratch" ||
            die "copying k8s.io/apiserver@$version to $scratch"
        cp "$storage_sources/test_server.go" "$scratch/pkg/storage/etcd3/testserver/test_server.go"
        cp "$recorder" "$scratch/pkg/storage/etcd3/testserver/recorder.go"
        mkdir -p "$dir"
        cd "$scratch" &&
            CGO_ENABLED=0 nice -n 10 go test -c -trimpath -o "$bin.tmp" ./pkg/storage/etcd3 >&2 ||
            die "go test -c k8s.io/apiserver/pkg/storage/etcd3@$version"
        mv -f "$bin.tmp" "$bin"
        cat "$storage_sources/test_server.go" "$recorder" >"$dir/sources"
        echo "$(since "$t0")" >"$dir/build-seconds"
    ) || exit 1
    log "built k8s.io/apiserver $version's storage tests in $(since "$t0")s: $bin"
}
build_storage_tests "$staging_version"
build_storage_tests "$STORAGE_NEWEST_VERSION"

echo "export KUBE_APISERVER_BIN=$apiserver_bin"
echo "export KUBECTL_BIN=$kubectl_bin"
echo "export HELM_BIN=$helm_bin"
echo "export NATS_SERVER_BIN=$nats_bin"
echo "export KINE_BIN=$kine_bin"
echo "export ETCD_NEWEST_BIN=$etcd_bin"
echo "export ETCD37_BIN=$etcd37_bin"
echo "export APISERVER_STORAGE_V036_BIN=$CACHE/apiserver-storage-$staging_version/etcd3.test"
echo "export APISERVER_STORAGE_V037_BIN=$CACHE/apiserver-storage-$STORAGE_NEWEST_VERSION/etcd3.test"
