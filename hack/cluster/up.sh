#!/usr/bin/env bash
# Dev/test infrastructure: start the local cluster (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, kwok GPU fleet, SeaweedFS S3) on loopback.
# Builds the binaries first if needed. Idempotent: when the cluster is up it is a no-op.
# Writes .cluster/kubeconfig and .cluster/env; logs go to .cluster/logs/<name>.log.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
T0=$(date +%s.%N)
BIN="$(bash "$HERE/build.sh")"
"$BIN/../venv/bin/python" "$HERE/localcluster.py" up "$BIN"
python3 -c "import sys; print(f'cluster-up took {float(sys.argv[2]) - float(sys.argv[1]):.1f} s')" \
  "$T0" "$(date +%s.%N)"
