"""End-to-end fixtures: the real local cluster, the dev node agent, S3, a tiny model and the
operator (a local `lora-operator run` subprocess; the quickstart uses the Helm chart).

Everything here is real: kube-apiserver/controller-manager/scheduler from hack/cluster, the
Job controller creating pods, the dev node agent (hack/nodeagent) running them as processes,
SeaweedFS as S3. Session-scoped and reused: a cluster or agent that is already up stays up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
_HACK = REPO / "hack" / "cluster"
if str(_HACK) not in sys.path:
    sys.path.insert(0, str(_HACK))

import localcluster  # noqa: E402  (dev/test infrastructure, found through sys.path above)

PY = sys.executable
QUICKSTART_RELEASE = ("lora-system", "lora-operator")


def kubectl(ci: Any, *args: str, check: bool = True, input: str | None = None,
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ci.kubectl), "--kubeconfig", str(ci.kubeconfig), *args],
                          capture_output=True, text=True, check=check, input=input)


def kubectl_json(ci: Any, *args: str) -> Any:
    out = kubectl(ci, *args, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


@pytest.fixture(scope="session")
def cluster() -> Iterator[Any]:
    started_here = not localcluster.is_up()
    ci = localcluster.up()
    try:
        yield ci
    finally:
        if started_here and not os.environ.get("LORA_KEEP_CLUSTER"):
            localcluster.stop()


@pytest.fixture(scope="session")
def node_agent(cluster: Any) -> Iterator[None]:
    """The dev node agent (idempotent start; stopped at the end only if started here)."""
    state = str(cluster.state_dir)
    was_running = subprocess.run([PY, "-m", "hack.nodeagent", "status", "--state-dir", state],
                                 cwd=REPO, capture_output=True).returncode == 0
    subprocess.run([PY, "-m", "hack.nodeagent", "start", "--state-dir", state], cwd=REPO,
                   check=True)
    yield
    if not was_running:
        subprocess.run([PY, "-m", "hack.nodeagent", "stop", "--state-dir", state], cwd=REPO)


@pytest.fixture(scope="session")
def s3(cluster: Any) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=cluster.s3_endpoint, region_name=cluster.s3_region,
                        aws_access_key_id=cluster.s3_access_key,
                        aws_secret_access_key=cluster.s3_secret_key)


@dataclass
class TinyModel:
    uri: str
    local: Path


@pytest.fixture(scope="session")
def tiny_model(cluster: Any, s3: Any, tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """A tiny random Llama (safetensors) with SmolLM2's tokenizer, uploaded to S3."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lora_trainer.model import smollm2_gguf_path

    out = tmp_path_factory.mktemp("tiny-llama")
    gguf = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    prefix = f"e2e/{uuid.uuid4().hex[:8]}/tiny-llama/"
    for f in sorted(out.iterdir()):
        if f.is_file():
            s3.upload_file(str(f), cluster.s3_bucket, prefix + f.name)
    return TinyModel(uri=f"s3://{cluster.s3_bucket}/{prefix}", local=out)


@pytest.fixture(scope="session")
def dataset(cluster: Any, s3: Any) -> dict[str, str]:
    prefix = "e2e/data/orders/"
    out = {}
    for name in ("train", "validation", "test"):
        s3.upload_file(str(REPO / "examples" / "data" / f"{name}.jsonl"), cluster.s3_bucket,
                       f"{prefix}{name}.jsonl")
        out[name] = f"s3://{cluster.s3_bucket}/{prefix}{name}.jsonl"
    return out


@pytest.fixture(scope="session")
def namespace(cluster: Any) -> Iterator[str]:
    ns = f"e2e-{uuid.uuid4().hex[:6]}"
    kubectl(cluster, "create", "namespace", ns)
    kubectl(cluster, "-n", ns, "create", "secret", "generic", "s3-creds",
            f"--from-literal=AWS_ACCESS_KEY_ID={cluster.s3_access_key}",
            f"--from-literal=AWS_SECRET_ACCESS_KEY={cluster.s3_secret_key}")
    yield ns
    kubectl(cluster, "delete", "namespace", ns, "--wait=false", check=False)


@pytest.fixture(scope="session")
def operator(cluster: Any, node_agent: None, namespace: str,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen[bytes]]:
    """`lora-operator run` watching only the test namespace, as a local subprocess.

    A Helm-installed operator (from `make quickstart`) would reconcile the same LoRAJobs, so
    it is scaled to 0 for the session and scaled back afterwards.
    """
    ns_op, name_op = QUICKSTART_RELEASE
    helm_replicas = kubectl(cluster, "-n", ns_op, "get", "deployment", name_op, "-o",
                            "jsonpath={.spec.replicas}", check=False).stdout.strip()
    if helm_replicas and helm_replicas != "0":
        kubectl(cluster, "-n", ns_op, "scale", "deployment", name_op, "--replicas=0")
    settings = yaml.safe_load((REPO / "operator" / "config" / "default.yaml").read_text())
    settings.update(s3Endpoint=cluster.s3_endpoint, s3CredentialsSecret="s3-creds",
                    trainerCpu="1", trainerMemory="2Gi", progressIntervalSeconds=1,
                    namespaces=[namespace])
    cfg = tmp_path_factory.mktemp("operator") / "config.yaml"
    cfg.write_text(yaml.safe_dump(settings))
    log = (Path(cluster.state_dir) / "logs" / f"e2e-operator-{namespace}.log").open("ab")
    env = {**os.environ, **cluster.env, "KUBECONFIG": str(cluster.kubeconfig)}
    proc = subprocess.Popen([str(REPO / ".venv" / "bin" / "lora-operator"), "run",
                             f"--config={cfg}", f"--namespace={namespace}", "--standalone",
                             "--metrics-port=0"], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    time.sleep(3)
    assert proc.poll() is None, f"operator exited early; see {log.name}"
    yield proc
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
    if helm_replicas and helm_replicas != "0":
        kubectl(cluster, "-n", ns_op, "scale", "deployment", name_op,
                f"--replicas={helm_replicas}", check=False)


def tiny_job(name: str, namespace: str, model: TinyModel, data: dict[str, str], bucket: str,
             max_steps: int, save_steps: int, backoff_limit: int = 2) -> dict[str, Any]:
    """A LoRAJob for the tiny model on the dev GPU node: seconds per step on a CPU."""
    return {
        "apiVersion": "lorajob.dev/v1alpha1", "kind": "LoRAJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "baseModel": {"uri": model.uri, "shape": {
                "hiddenSize": 32, "intermediateSize": 64, "numHiddenLayers": 2,
                "numAttentionHeads": 4, "numKeyValueHeads": 2, "vocabSize": 49152,
                "tieWordEmbeddings": True}},
            "dataset": {"uri": data["train"], "format": "chat",
                        "validation": {"uri": data["validation"]}, "test": {"uri": data["test"]}},
            "method": "lora",
            "lora": {"r": 4, "alpha": 8},
            "training": {"maxSteps": max_steps, "learningRate": 5e-3, "microBatchSize": 2,
                         "gradientAccumulationSteps": 1, "maxSeqLength": 128,
                         "gradientCheckpointing": False, "evalSteps": max_steps,
                         "saveSteps": save_steps, "warmupRatio": 0.0},
            "resources": {"nodeSelector": {"lorajob.dev/dev-node": "true"},
                          "tolerations": [{"key": "lorajob.dev/dev-node", "operator": "Exists",
                                           "effect": "NoSchedule"}]},
            "evaluation": {"prompts": ["Extract the order: 2 mugs to Oslo."], "maxNewTokens": 8},
            "output": {"uri": f"s3://{bucket}/e2e/adapters/{namespace}/{name}/",
                       "credentialsSecret": "s3-creds", "overwrite": True},
            "runPolicy": {"backoffLimit": backoff_limit},
        },
    }


def write_job(job: dict[str, Any], tmp_path: Path) -> Path:
    """The LoRAJob as a file, for `kubectl apply -f` as a user would run it."""
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(job))
    return manifest


def trainer_pods(ci: Any, ns: str, name: str) -> list[dict[str, Any]]:
    """The LoRAJob's trainer pods, oldest first (the preflight pod has no attempt label)."""
    pods = kubectl_json(ci, "-n", ns, "get", "pods", "-l",
                        f"lorajob.dev/job-name={name},lorajob.dev/attempt")
    return sorted((pods or {}).get("items", []), key=lambda p: p["metadata"]["creationTimestamp"])


def trainer_pid(ci: Any, pod: dict[str, Any]) -> int:
    """The trainer process of a pod the dev node agent runs (it leads its process group)."""
    return int((Path(ci.state_dir) / "nodeagent" / "pods" / pod["metadata"]["uid"] /
                "containers" / "trainer" / "pid").read_text())


def wait_for_step(ci: Any, ns: str, name: str, at_least: int, what: str,
                  timeout: float = 600) -> int:
    """Poll status.progress until training reaches `at_least` steps; the job must not have
    finished before (that would mean the test missed its moment)."""
    deadline = time.monotonic() + timeout
    step = 0
    while time.monotonic() < deadline:
        status = (kubectl_json(ci, "-n", ns, "get", "lorajob", name) or {}).get("status") or {}
        assert status.get("phase") not in ("Failed", "Succeeded"), status
        step = int((status.get("progress") or {}).get("step") or 0)
        if step >= at_least:
            return step
        time.sleep(0.5)
    raise AssertionError(what)
