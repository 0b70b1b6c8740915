"""Hostile and broken inputs to the trainer: each fails fast with the exit code of the
contract table (contract.ExitCode), a message that says what is wrong, and no secret.

The trainer is driven through its CLI entry point (`lora_trainer.cli.main(["run", ...])`,
in this process: one import of torch for the whole table instead of one per case) against
the real local S3. A unique planted secret is the S3 secret key in every case; the wrong-
credentials case plants a different unique one; neither may appear in the termination
message, the log or stdout.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.reliability.conftest import DATA, s3_env, tiny_cli_job

pytestmark = [pytest.mark.cluster]

PLANTED = f"planted-secret-{uuid.uuid4().hex}"


def _write(path: Path, content: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return f"file://{path}"


def _chat(n: int, text: str = "Extract the order: 2 mugs to Oslo.") -> bytes:
    row = {"messages": [{"role": "user", "content": text},
                        {"role": "assistant", "content": "ORDER item=mug; qty=2"}]}
    return b"\n".join(json.dumps(row).encode() for _ in range(n)) + b"\n"


def _corrupt_model(src: Path, dst: Path, what: str) -> str:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    if what == "weights":
        (dst / "model.safetensors").write_bytes(b"\x00garbage, not a safetensors header" * 100)
    elif what == "config":
        (dst / "config.json").write_text("{not json")
    elif what == "truncated":
        data = (src / "model.safetensors").read_bytes()
        (dst / "model.safetensors").write_bytes(data[: len(data) // 3])
    return f"file://{dst}"


# Each case: (id, mutate(job, tmp, ctx) -> env overrides, exit code, words in the message)
Mutate = Callable[[dict[str, Any], Path, Any], dict[str, str] | None]


def data_case(content: bytes, suffix: str = ".jsonl") -> Mutate:
    def mutate(job: dict[str, Any], tmp: Path, ctx: Any) -> None:
        job["spec"]["dataset"]["uri"] = _write(tmp / f"train{suffix}", content)
        job["spec"]["dataset"]["validation"] = {"fraction": 0.25}
        job["spec"]["dataset"]["format"] = "auto"
        job["spec"]["dataset"].pop("test")
    return mutate


def model_case(what: str) -> Mutate:
    def mutate(job: dict[str, Any], tmp: Path, ctx: Any) -> None:
        job["spec"]["baseModel"]["uri"] = _corrupt_model(ctx.tiny_model.local, tmp / "m", what)
    return mutate


def set_uri(*path: str, value: str, endpoint: str | None = None) -> Mutate:
    def mutate(job: dict[str, Any], tmp: Path, ctx: Any) -> None:
        node = job["spec"]
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value.format(bucket=ctx.ci.s3_bucket, tiny=ctx.tiny_model.uri)
        if endpoint:
            node["endpoint"] = endpoint
    return mutate


def wrong_credentials(job: dict[str, Any], tmp: Path, ctx: Any) -> dict[str, str]:
    job["spec"]["baseModel"]["uri"] = ctx.tiny_model.uri
    return {"AWS_SECRET_ACCESS_KEY": PLANTED + "-wrong"}


def unknown_key(job: dict[str, Any], tmp: Path, ctx: Any) -> dict[str, str]:
    job["spec"]["baseModel"]["uri"] = ctx.tiny_model.uri
    return {"AWS_ACCESS_KEY_ID": "AKIA" + uuid.uuid4().hex[:16].upper(),
            "AWS_SECRET_ACCESS_KEY": PLANTED + "-wrong"}


HUGE = "word " * 400_000  # a 2 MB line
CASES: list[tuple[str, Mutate, int, tuple[str, ...]]] = [
    ("data-bad-json", data_case(_chat(8) + b'{"messages": [oops\n' + _chat(4)), 3, ("invalid JSON", ":9")),
    ("data-json-not-array", data_case(b'{"a": 1}', ".json"), 3, ("expected",)),
    ("data-json-truncated", data_case(b'[{"messages": ', ".json"), 3, ("invalid JSON",)),
    ("data-wrong-columns", data_case(b'{"foo": "bar", "baz": 1}\n' * 10), 3, ("columns", "foo")),
    ("data-chat-wrong-shape", data_case(b'{"messages": "not a list"}\n' * 10), 3, ("messages",)),
    ("data-empty", data_case(b""), 3, ("empty",)),
    ("data-blank-lines", data_case(b"\n\n   \n"), 3, ("empty",)),
    ("data-non-utf8", data_case(_chat(3) + b'{"text": "caf\xe9 \xff\xfe"}\n'), 3, ("UTF-8",)),
    ("data-huge-lines", data_case(_chat(6, HUGE)), 3, ("truncated",)),
    ("data-not-an-object", data_case(b"[1, 2, 3]\n" * 5), 3, ("object",)),
    ("data-deeply-nested", data_case(_chat(4) + b'{"messages": ' + b"[" * 200_000 + b"]" * 200_000
                                     + b"}\n"), 3, ("nested too deeply", ":5")),
    ("data-unsupported-type", data_case(b"a,b\n1,2\n", ".csv"), 3, ("unsupported",)),
    ("data-missing", set_uri("dataset", "uri", value="file:///nonexistent/train.jsonl"), 3, ("train.jsonl",)),
    ("data-s3-missing", set_uri("dataset", "uri", value="s3://{bucket}/reliability/none/train.jsonl"),
     3, ("not found",)),
    ("model-corrupt-weights", model_case("weights"), 4, ("cannot load the model",)),
    ("model-truncated-weights", model_case("truncated"), 4, ("cannot load the model",)),
    ("model-corrupt-config", model_case("config"), 4, ("config",)),
    ("model-missing", set_uri("baseModel", "uri", value="file:///nonexistent/model"), 4, ("no such file",)),
    ("model-s3-missing", set_uri("baseModel", "uri", value="s3://{bucket}/reliability/no-model/"), 4, ("not found",)),
    ("traversal-file-dataset", set_uri("dataset", "uri", value="file:///tmp/../etc/passwd.jsonl"), 2, ("..",)),
    ("traversal-s3-model", set_uri("baseModel", "uri", value="s3://{bucket}/models/../../secret/"), 2, ("..",)),
    ("traversal-s3-output", set_uri("output", "uri", value="s3://{bucket}/a/../../b/"), 2, ("..",)),
    ("traversal-encoded", set_uri("dataset", "uri", value="s3://{bucket}/a/%2e%2e/%2e%2e/x.jsonl"), 2, ("..",)),
    ("metadata-output-endpoint", set_uri("output", "uri", value="s3://{bucket}/x/",
                                         endpoint="http://169.254.169.254"), 2, ("link-local",)),
    ("metadata-model-endpoint", set_uri("baseModel", "uri", value="{tiny}",
                                        endpoint="http://169.254.169.254:80/"), 2, ("link-local",)),
    ("metadata-https-dataset", set_uri("dataset", "uri",
                                       value="https://169.254.169.254/latest/meta-data/x.jsonl"), 2, ("link-local",)),
    ("metadata-ipv6-mapped", set_uri("dataset", "uri",
                                     value="https://[::ffff:169.254.169.254]/latest/x.jsonl"), 2, ("link-local",)),
    ("metadata-aws-ipv6", set_uri("dataset", "uri", value="https://[fd00:ec2::254]/x.jsonl"), 2, ("link-local",)),
]


class Ctx:
    def __init__(self, ci: Any, tiny_model: Any) -> None:
        self.ci, self.tiny_model = ci, tiny_model


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_fails_with_reason(case: tuple[str, Mutate, int, tuple[str, ...]],
                                         local_cluster: Any, tiny_model: Any, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch,
                                         capfd: pytest.CaptureFixture[str],
                                         caplog: pytest.LogCaptureFixture) -> None:
    from lora_trainer import cli

    name, mutate, want_code, words = case
    ci = local_cluster
    job = tiny_cli_job(name, f"file://{tiny_model.local}",
                       f"s3://{ci.s3_bucket}/reliability/hostile/{name}-{uuid.uuid4().hex[:6]}/")
    env = {**s3_env(ci), "AWS_ACCESS_KEY_ID": ci.s3_access_key}
    env.update(mutate(job, tmp_path, Ctx(ci, tiny_model)) or {})
    for k, v in {**env, "LORA_TERMINATION_MESSAGE_PATH": str(tmp_path / "result"),
                 "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(k, v)
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(job))

    code = cli.main(["run", "--job", str(manifest), "--device", "cpu"])

    out, err = capfd.readouterr()
    result = json.loads((tmp_path / "result").read_text())
    text = "\n".join([out, err, caplog.text, json.dumps(result)])
    assert code == want_code, f"{name}: exit {code}: {result}"
    assert result["exitCode"] == want_code and result["reason"] == _reason(want_code)
    for word in words:
        assert word in result["message"], f"{name}: {word!r} not in {result['message']!r}"
    assert "Traceback" not in text, f"{name}: unexpected traceback"
    for secret in (ci.s3_secret_key, PLANTED):
        assert secret not in text, f"{name}: a secret leaked"
    RESULTS.append((name, code, result["message"][:160]))


def _reason(code: int) -> str:
    from lora_operator.contract import ExitCode

    return ExitCode(code).reason


RESULTS: list[tuple[str, int, str]] = []


def test_cases_cover_every_input_class() -> None:
    classes = {c[0].split("-")[0] for c in CASES}
    assert classes == {"data", "model", "traversal", "metadata"}
    assert len(CASES) >= 25
    assert DATA.is_dir()


CREDENTIAL_CASES = [("creds-wrong-secret", wrong_credentials), ("creds-unknown-key", unknown_key)]


def test_wrong_credentials_fail_auth_without_leaking(local_cluster: Any, tiny_model: Any,
                                                     tmp_path: Path) -> None:
    """Refused S3 credentials: exit 5 (Unauthorized, permanent), and the planted secret is in
    neither the output nor the termination message. A separate process per case (boto3
    caches the credentials it resolved first, so this cannot share the process above)."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.reliability.conftest import run_trainer

    ci = local_cluster

    def one(case: tuple[str, Mutate]) -> tuple[str, Any]:
        name, mutate = case
        job = tiny_cli_job(name, f"file://{tiny_model.local}",
                           f"file://{tmp_path / name / 'out'}/")
        env = {**s3_env(ci), **(mutate(job, tmp_path / name, Ctx(ci, tiny_model)) or {})}
        return name, run_trainer(job, tmp_path / name, env=env, timeout=300)

    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(one, CREDENTIAL_CASES))
    for name, run in runs:
        assert run.code == 5, f"{name}: {run.code} {run.result} {run.output[-2000:]}"
        assert run.result["reason"] == "Unauthorized"
        assert "refused the credentials" in run.result["message"]
        text = run.output + json.dumps(run.result)
        assert PLANTED not in text and ci.s3_secret_key not in text, name
        assert "Traceback" not in run.output
        RESULTS.append((name, run.code, run.result["message"][:160]))
