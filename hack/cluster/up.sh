#!/usr/bin/env bash
# Dev/test infrastructure: start the local cluster (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, kwok GPU fleet, SeaweedFS S3) on loopback.
# Builds the binaries first if needed. Idempotent: when the cluster is up it is a no-op.
# Writes .cluster/kubeconfig and .cluster/env; logs go to .cluster/logs/<name>.log.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
T0=$(date +%s%N)
trap 'echo "cluster-up took $(awk -v a="$T0" -v b="$(date +%s%N)" "BEGIN{printf \"%.1f\", (b-a)/1e9}") s" >&2' EXIT
BIN="$(bash "$HERE/build.sh")"
"$BIN/../venv/bin/python" "$HERE/localcluster.py" up "$BIN"
