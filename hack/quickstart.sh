#!/usr/bin/env bash
# `make quickstart`: local cluster + S3 + the operator (Helm) + the dev node agent, then a real
# LoRA fine-tune of SmolLM2-135M-Instruct on CPU, followed to Succeeded, and its result.
# Leaves everything running; `make cluster-down` stops it all. DEV ONLY (the dev node agent
# runs pods as local processes; see hack/nodeagent/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
PY="$REPO/.venv/bin/python"
NS=default
JOB=quickstart
RELEASE=lora-operator
OPERATOR_NS=lora-system
TIMEOUT="${LORA_QUICKSTART_TIMEOUT:-900}"

declare -a STAGES=()
t_stage=$(date +%s.%N)
t_all=$t_stage
stage_done() {  # name
    local now; now=$(date +%s.%N)
    STAGES+=("$(printf '%-38s %6.1f s' "$1" "$(awk -v a="$now" -v b="$t_stage" 'BEGIN{print a-b}')")")
    t_stage=$now
}
say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

say "Local cluster (kube-apiserver, controller-manager, scheduler, etcd, kwok, S3)"
bash hack/cluster/up.sh
# shellcheck disable=SC1091
source .cluster/env
export PATH="$LORA_CLUSTER_BIN:$PATH"
stage_done "cluster up"

say "Dev node agent (a T4-class GPU node and a CPU node that run pods as local processes)"
"$PY" -m hack.nodeagent start
kubectl get nodes -l lorajob.dev/dev-node=true \
    -L nvidia.com/gpu.product,nvidia.com/gpu.memory,nvidia.com/gpu.count
stage_done "dev node agent"

say "SmolLM2-135M-Instruct (GGUF) and the task dataset → s3://$LORA_S3_BUCKET"
"$PY" hack/quickstart/qs.py upload
for ns in "$NS" "$OPERATOR_NS"; do
    kubectl get namespace "$ns" >/dev/null 2>&1 || kubectl create namespace "$ns" >/dev/null
    kubectl -n "$ns" create secret generic s3-creds \
        --from-literal=AWS_ACCESS_KEY_ID="$AWS_ACCESS_KEY_ID" \
        --from-literal=AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY" \
        --dry-run=client -o yaml | kubectl apply -f - >/dev/null
done
echo "  secret s3-creds in namespaces $NS and $OPERATOR_NS"
stage_done "model + data upload, secrets"

say "helm install $RELEASE (charts/lora-operator) into $OPERATOR_NS"
helm upgrade --install "$RELEASE" charts/lora-operator -n "$OPERATOR_NS" --create-namespace \
    -f hack/quickstart/values.yaml --set "config.s3Endpoint=$AWS_ENDPOINT_URL" \
    --wait --timeout 3m 2>&1 | grep -v 'found symbolic link'
kubectl -n "$OPERATOR_NS" rollout status "deployment/$RELEASE" --timeout=120s
stage_done "helm install + operator ready"

say "kubectl apply -f examples/quickstart.yaml"
# A finished quickstart job from an earlier run would make the apply a no-op: start afresh.
kubectl -n "$NS" delete lorajob "$JOB" --ignore-not-found --wait=true >/dev/null
"$REPO/.venv/bin/lora-operator" plan examples/quickstart.yaml || true
kubectl apply -f examples/quickstart.yaml
kubectl -n "$NS" get lorajobs -w &
WATCH=$!
trap 'kill $WATCH 2>/dev/null || true' EXIT
phase=""
deadline=$(( $(date +%s) + TIMEOUT ))
while [ "$(date +%s)" -lt "$deadline" ]; do
    phase=$(kubectl -n "$NS" get lorajob "$JOB" -o jsonpath='{.status.phase}' 2>/dev/null || true)
    if [ "$phase" = "Succeeded" ] || [ "$phase" = "Failed" ]; then break; fi
    sleep 2
done
sleep 1
kill $WATCH 2>/dev/null || true
wait $WATCH 2>/dev/null || true
stage_done "fine-tune (apply → $phase)"

say "Result"
rc=0
"$PY" hack/quickstart/qs.py report "$NS" "$JOB" || rc=$?
if [ "$phase" != "Succeeded" ]; then
    echo
    echo "The job did not succeed (phase: ${phase:-none} after ${TIMEOUT}s). Look at:"
    echo "  kubectl -n $NS describe lorajob $JOB"
    echo "  kubectl -n $NS logs -l lorajob.dev/job-name=$JOB --tail=50"
    echo "  kubectl -n $OPERATOR_NS logs deploy/$RELEASE --tail=50"
    rc=1
fi

say "Timings"
stage_done "report"
printf '  %s\n' "${STAGES[@]}"
printf '  %-38s %6.1f s\n' "total" "$(awk -v a="$(date +%s.%N)" -v b="$t_all" 'BEGIN{print a-b}')"

cat <<EOM

The cluster, S3, the operator and the dev node agent are still running. Explore with:
  source .cluster/env
  kubectl get lorajobs -A -o wide
  kubectl -n $NS describe lorajob $JOB
  kubectl -n $OPERATOR_NS logs deploy/$RELEASE
Stop everything (node agent and its processes included) with:
  make cluster-down
EOM
exit $rc
