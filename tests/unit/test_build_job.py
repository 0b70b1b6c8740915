"""The trainer Job: placement on the right GPU nodes, restricted security, secrets by
reference, and a Pod failure policy generated from the trainer's exit-code table."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from lora_operator import api, contract
from lora_operator.build import job, names
from lora_operator.settings import Settings, load_settings

SETTINGS = load_settings()
OWNER = names.Owner(name="bot", namespace="ml", uid="u-1",
                    annotations={"kwok.lorajob.dev/exit-code": "0", "other/annotation": "x"})


def make_spec(**over: Any) -> api.LoRAJobSpec:
    spec: dict[str, Any] = {"baseModel": {"uri": "hf://Qwen/Qwen2.5-7B"},
                            "dataset": {"uri": "s3://data/train.jsonl"},
                            "output": {"uri": "s3://adapters/bot/"}}
    spec.update(over)
    return api.parse_spec(spec)


def build(spec: api.LoRAJobSpec | None = None, *, cls: str | None = "l4-24gb", gpus: int = 1,
          owner: names.Owner = OWNER, settings: Settings = SETTINGS, **kw: Any) -> dict[str, Any]:
    vram = settings.vram_class(cls) if cls else None
    placement = api.Placement(method="lora", vram_class=cls, gpus=gpus, deepspeed="none")
    inputs = job.JobInputs(attempt=kw.pop("attempt", 1), placement=placement, vram_class=vram,
                           spec_hash="abc", **kw)
    return job.build_job(owner, spec or make_spec(), inputs, settings)


def pod_spec(j: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = j["spec"]["template"]["spec"]
    return out


def container(j: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = pod_spec(j)["containers"][0]
    return out


# ------------------------------------------------------------------ Pod Security "restricted"

ALLOWED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                        "persistentVolumeClaim", "projected", "secret"}


def restricted_violations(spec: dict[str, Any]) -> list[str]:
    """The checks of the Pod Security Standard "restricted" profile (v1.30)."""
    bad: list[str] = []
    psc = spec.get("securityContext") or {}
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(flag):
            bad.append(flag)
    for vol in spec.get("volumes") or []:
        kinds = set(vol) - {"name"}
        if not kinds <= ALLOWED_VOLUME_TYPES:
            bad.append(f"volume {vol['name']}: {kinds}")
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            bad.append("privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append("allowPrivilegeEscalation")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            bad.append("capabilities.drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            bad.append("capabilities.add")
        if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
            bad.append("runAsNonRoot")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            bad.append("runAsUser 0")
        if (sc.get("seccompProfile") or {}).get("type", pod_seccomp) not in (
                "RuntimeDefault", "Localhost"):
            bad.append("seccompProfile")
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                bad.append("hostPort")
    return bad


def test_pod_passes_restricted() -> None:
    assert restricted_violations(pod_spec(build())) == []


def test_restricted_checker_catches_a_bad_pod() -> None:
    spec = pod_spec(build())
    spec["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    spec["volumes"].append({"name": "h", "hostPath": {"path": "/"}})
    assert len(restricted_violations(spec)) == 2


def test_read_only_root_with_writable_tmp_and_scratch() -> None:
    c = container(build())
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert {"/tmp", job.SCRATCH_DIR, contract.CONFIG_DIR, "/dev/shm"} <= set(mounts)
    assert mounts[contract.CONFIG_DIR]["readOnly"] is True
    vols = {v["name"]: v for v in pod_spec(build())["volumes"]}
    assert vols["tmp"] == {"name": "tmp", "emptyDir": {"sizeLimit": "100Gi"}}


def test_config_is_the_pods_own_annotation_read_as_a_file() -> None:
    """No ConfigMap: the downwardAPI volume turns the pod template's config annotation
    into `CONFIG_DIR/CONFIG_KEY`, the file the trainer is pointed at."""
    j = build(attempt=2)
    vols = {v["name"]: v for v in pod_spec(j)["volumes"]}
    assert vols["config"] == {"name": "config", "downwardAPI": {"items": [{
        "path": contract.CONFIG_KEY,
        "fieldRef": {"fieldPath": f"metadata.annotations['{names.CONFIG_ANNOTATION}']"}}]}}
    mount = next(m for m in container(j)["volumeMounts"] if m["name"] == "config")
    env = {e["name"]: e for e in container(j)["env"]}
    assert env[contract.CONFIG_ENV]["value"] == f"{mount['mountPath']}/{contract.CONFIG_KEY}"
    text = j["spec"]["template"]["metadata"]["annotations"][names.CONFIG_ANNOTATION]
    cfg = contract.TrainerConfig.model_validate(yaml.safe_load(text))
    assert cfg.job == contract.JobIdentity(name="bot", namespace="ml", uid="u-1", attempt=2)
    assert cfg.placement.vram_class == "l4-24gb"
    assert "configMap" not in str(pod_spec(j))


def test_local_disk_is_bounded() -> None:
    """Issue 13: a job cannot fill the node's disk or memory through its scratch volumes;
    the pod asks the scheduler for the disk it may use, and is evicted past it."""
    custom = SETTINGS.model_copy(update={"trainer_ephemeral_storage": "250Gi",
                                         "trainer_shm_size": "2Gi"})
    for settings, disk, shm in ((SETTINGS, "100Gi", "8Gi"), (custom, "250Gi", "2Gi")):
        j = build(settings=settings)
        vols = {v["name"]: v["emptyDir"] for v in pod_spec(j)["volumes"] if "emptyDir" in v}
        assert vols == {"tmp": {"sizeLimit": disk}, "scratch": {"sizeLimit": disk},
                        "dshm": {"medium": "Memory", "sizeLimit": shm}}
        resources = container(j)["resources"]
        assert resources["requests"]["ephemeral-storage"] == disk
        assert resources["limits"]["ephemeral-storage"] == disk


# ------------------------------------------------------------------ placement


def test_gpu_limit_and_affinity_for_class() -> None:
    j = build(cls="l4-24gb", gpus=2)
    assert container(j)["resources"]["limits"]["nvidia.com/gpu"] == "2"
    aff = pod_spec(j)["affinity"]["nodeAffinity"]
    req = aff["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
    assert req["matchExpressions"] == [{"key": "nvidia.com/gpu.memory", "operator": "Gt",
                                        "values": ["23033"]}]
    pref = aff["preferredDuringSchedulingIgnoredDuringExecution"][0]
    assert pref["weight"] == 100
    # The next class up in the default table is a100-40gb (40960 MiB).
    assert pref["preference"]["matchExpressions"] == [
        {"key": "nvidia.com/gpu.memory", "operator": "Lt", "values": ["40960"]}]


def test_biggest_class_has_no_preference() -> None:
    aff = pod_spec(build(cls="h200-141gb"))["affinity"]["nodeAffinity"]
    assert "preferredDuringSchedulingIgnoredDuringExecution" not in aff


def test_no_gpu_no_affinity_no_gpu_toleration() -> None:
    ps = pod_spec(build(cls=None, gpus=0))
    assert "affinity" not in ps
    assert ps["tolerations"] == []
    assert "nvidia.com/gpu" not in container(build(cls=None, gpus=0))["resources"]["limits"]


def test_tolerations_gpu_then_spec() -> None:
    spec = make_spec(resources={"tolerations": [
        {"key": "spot", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]})
    assert pod_spec(build(spec))["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "spot", "operator": "Exists", "effect": "NoSchedule"},
    ]


def test_node_selectors_merge_class_then_spec() -> None:
    data = SETTINGS.model_dump(by_alias=True)
    for c in data["vramClasses"]:
        if c["name"] == "l4-24gb":
            c["nodeSelector"] = {"pool": "l4", "zone": "a"}
    settings = Settings.model_validate(data)
    spec = make_spec(resources={"nodeSelector": {"zone": "b"}, "priorityClassName": "train"})
    ps = pod_spec(build(spec, settings=settings))
    assert ps["nodeSelector"] == {"pool": "l4", "zone": "b"}
    assert ps["priorityClassName"] == "train"


# ------------------------------------------------------------------ credentials


def test_credentials_only_by_secret_reference() -> None:
    spec = make_spec(baseModel={"uri": "hf://org/model", "credentialsSecret": "hf"},
                     output={"uri": "s3://adapters/bot/", "credentialsSecret": "s3-creds",
                             "endpoint": "http://minio:9000"})
    env = {e["name"]: e for e in container(build(spec))["env"]}
    for name, secret in (("AWS_ACCESS_KEY_ID", "s3-creds"), ("AWS_SECRET_ACCESS_KEY", "s3-creds"),
                         ("HF_TOKEN", "hf")):
        assert "value" not in env[name]
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": name}
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio:9000"
    assert env[contract.CONFIG_ENV]["value"] == f"{contract.CONFIG_DIR}/{contract.CONFIG_KEY}"
    for e in env.values():
        if any(w in e["name"] for w in ("KEY", "TOKEN", "SECRET", "PASSWORD")):
            assert "secretKeyRef" in e.get("valueFrom", {}), e


def test_default_credentials_and_endpoint_from_settings() -> None:
    settings = SETTINGS.model_copy(update={"s3_credentials_secret": "default-s3",
                                           "s3_endpoint": "http://s3.local:8333"})
    env = {e["name"]: e for e in container(build(settings=settings))["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "default-s3"
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://s3.local:8333"
    assert "HF_TOKEN" not in env


def test_model_and_dataset_secrets_get_their_own_prefixed_keys() -> None:
    spec = make_spec(baseModel={"uri": "s3://models/qwen/", "credentialsSecret": "model-keys"},
                     dataset={"uri": "https://host/train.jsonl", "credentialsSecret": "data-keys",
                              "test": {"uri": "s3://data/test.jsonl"}},
                     output={"uri": "s3://adapters/bot/", "credentialsSecret": "out-keys"})
    env = {e["name"]: e for e in container(build(spec))["env"]}
    for prefix, secret in ((contract.MODEL_CREDENTIALS_PREFIX, "model-keys"),
                           (contract.DATASET_CREDENTIALS_PREFIX, "data-keys"), ("", "out-keys")):
        for key in contract.S3_SECRET_KEYS:
            assert env[prefix + key]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": key}
    assert "HF_TOKEN" not in env


def test_hf_secret_is_not_taken_for_s3_keys() -> None:
    spec = make_spec(baseModel={"uri": "hf://org/model", "credentialsSecret": "hf"},
                     dataset={"uri": "file:///data/train.jsonl", "credentialsSecret": "unused"})
    names_ = {e["name"] for e in container(build(spec))["env"]}
    assert "HF_TOKEN" in names_
    assert not any(n.startswith((contract.MODEL_CREDENTIALS_PREFIX, contract.DATASET_CREDENTIALS_PREFIX))
                   for n in names_)


def test_no_secret_configured_means_no_credential_env() -> None:
    env = {e["name"] for e in container(build())["env"]}
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN"} & env


# ------------------------------------------------------------------ failure policy and Job


def test_pod_failure_policy_matches_exit_code_table() -> None:
    rules = build()["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore",
                        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    fail = rules[1]
    assert fail["action"] == "FailJob"
    assert fail["onExitCodes"]["containerName"] == job.CONTAINER
    assert fail["onExitCodes"]["operator"] == "In"
    values = set(fail["onExitCodes"]["values"])
    for code in contract.ExitCode:
        if code.permanent or code == contract.ExitCode.OUT_OF_MEMORY:
            assert code in values, code
        else:
            assert code not in values, code  # OK, INTERNAL, STORAGE, PREEMPTED: retried
    assert 0 not in values


@pytest.mark.parametrize("attempt", [1, 3])
def test_job_shape(attempt: int) -> None:
    j = build(attempt=attempt, backoff_limit=2, active_deadline_seconds=3600)
    assert j["apiVersion"] == "batch/v1"
    assert j["metadata"]["name"] == f"bot-a{attempt}"
    spec = j["spec"]
    assert (spec["parallelism"], spec["completions"], spec["backoffLimit"]) == (1, 1, 2)
    assert spec["activeDeadlineSeconds"] == 3600
    assert spec["suspend"] is False
    ps = pod_spec(j)
    assert ps["restartPolicy"] == "Never"
    # No API identity: the namespace's default ServiceAccount, its token not mounted.
    assert "serviceAccountName" not in ps
    assert ps["automountServiceAccountToken"] is False
    c = container(j)
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert c["terminationMessagePath"] == contract.TERMINATION_MESSAGE_PATH
    assert c["image"] == SETTINGS.trainer_image
    labels = j["spec"]["template"]["metadata"]["labels"]
    assert labels["lorajob.dev/job-name"] == "bot"
    assert labels["lorajob.dev/attempt"] == str(attempt)
    assert labels["app.kubernetes.io/managed-by"] == "lora-operator"
    assert j["metadata"]["ownerReferences"][0]["kind"] == "LoRAJob"
    assert j["metadata"]["annotations"][names.SPEC_HASH_ANNOTATION] == "abc"


DEV = SETTINGS.model_copy(update={"dev_mode": True})


def test_kwok_annotations_copied_to_pod_only() -> None:
    ann = build(settings=DEV)["spec"]["template"]["metadata"]["annotations"]
    assert ann["kwok.lorajob.dev/exit-code"] == "0"
    assert "other/annotation" not in ann


def test_kwok_annotations_never_copied_outside_dev_mode() -> None:
    """A job's author cannot steer simulated pods (or fake a result) on a real cluster."""
    ann = build()["spec"]["template"]["metadata"]["annotations"]
    assert not any(k.startswith("kwok.lorajob.dev/") for k in ann)


def test_per_attempt_kwok_annotations() -> None:
    owner = names.Owner(name="bot", namespace="ml", uid="u", annotations={
        "kwok.lorajob.dev/exit-code": "42", "kwok.lorajob.dev/attempt-2.exit-code": "0"})
    first = build(owner=owner, settings=DEV)["spec"]["template"]["metadata"]["annotations"]
    second = build(owner=owner, attempt=2, settings=DEV)["spec"]["template"]["metadata"][
        "annotations"]
    assert first["kwok.lorajob.dev/exit-code"] == "42"
    assert second["kwok.lorajob.dev/exit-code"] == "0"
    assert not any("attempt-" in k for k in first | second)


def test_kueue_label_and_suspend() -> None:
    owner = names.Owner(name="bot", namespace="ml", uid="u",
                        labels={"kueue.x-k8s.io/queue-name": "team-a"})
    j = build(owner=owner, suspend=True)
    assert j["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert j["spec"]["suspend"] is True
    assert "kueue.x-k8s.io/queue-name" not in build()["metadata"]["labels"]


def test_spec_hash_ignores_run_policy() -> None:
    base = {"baseModel": {"uri": "hf://a/b"}, "runPolicy": {"suspend": False}}
    assert job.spec_hash(base) == job.spec_hash({**base, "runPolicy": {"suspend": True}})
    assert job.spec_hash(base) != job.spec_hash({**base, "baseModel": {"uri": "hf://a/c"}})
