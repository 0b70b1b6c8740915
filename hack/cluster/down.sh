#!/usr/bin/env bash
# Dev/test infrastructure: stop every process hack/cluster/up.sh started (by recorded PID
# and process group) and drop the cluster's etcd and S3 data (keeps certificates, ports and
# S3 keys). Pass --keep-data to keep the data for the next up.sh.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${LORA_OPERATOR_CACHE:-$HOME/.cache/lora-operator}/current/venv/bin/python"
[ -x "$PY" ] || PY="$HERE/../../.venv/bin/python"
[ -x "$PY" ] || PY=python3
exec "$PY" "$HERE/localcluster.py" down "$@"
