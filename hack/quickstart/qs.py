"""Helpers of hack/quickstart.sh (DEV ONLY): S3 uploads and the final report.

    python hack/quickstart/qs.py upload          # SmolLM2 GGUF + examples/data → local S3
    python hack/quickstart/qs.py report NS NAME  # adapter URI, losses, base vs adapter answer

Reads the S3 endpoint and keys from the environment (`source .cluster/env`). Uploads are
skipped when an object of the same size is already there, so a second quickstart is fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
from botocore.exceptions import ClientError

REPO = Path(__file__).resolve().parents[2]
BUCKET = os.environ.get("LORA_S3_BUCKET", "lora-test")
MODEL_PREFIX = "models/smollm2-135m/"
DATA_PREFIX = "data/orders/"


def s3() -> Any:
    return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"],
                        region_name=os.environ.get("AWS_REGION", "us-east-1"))


def _put(client: Any, path: Path, key: str) -> None:
    try:
        head = client.head_object(Bucket=BUCKET, Key=key)
        if head["ContentLength"] == path.stat().st_size:
            print(f"  s3://{BUCKET}/{key} (already there)")
            return
    except ClientError:
        pass
    client.upload_file(str(path), BUCKET, key)
    print(f"  s3://{BUCKET}/{key} ({path.stat().st_size / 1e6:.1f} MB)")


def upload() -> None:
    sys.path.insert(0, str(REPO))
    from lora_trainer.model import smollm2_gguf_path

    client = s3()
    gguf = smollm2_gguf_path()
    _put(client, gguf, MODEL_PREFIX + gguf.name)
    for name in ("train.jsonl", "validation.jsonl", "test.jsonl"):
        _put(client, REPO / "examples" / "data" / name, DATA_PREFIX + name)


def _kubectl_json(*args: str) -> Any:
    kubectl = os.environ.get("LORA_KUBECTL", "kubectl")
    out = subprocess.run([kubectl, *args, "-o", "json"], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout)


def report(namespace: str, name: str) -> int:
    job = _kubectl_json("-n", namespace, "get", "lorajob", name)
    status = job.get("status") or {}
    result = status.get("result") or {}
    placement = status.get("placement") or {}
    print(f"phase:           {status.get('phase')}  ({status.get('message', '')})")
    print(f"placement:       {placement.get('method')} on {placement.get('vramClass')} "
          f"(estimated {placement.get('estimatedVramGiB')} GiB), node {placement.get('node')}")
    print(f"adapter:         {result.get('adapterUri')}")
    print(f"manifest:        {result.get('manifestUri')}")
    base, adapter = result.get("baseEvalLoss"), result.get("adapterEvalLoss")
    if base is not None and adapter is not None:
        print(f"held-out loss:   base {base:.4f} -> adapter {adapter:.4f} "
              f"({(base - adapter) / base * 100:.1f} % lower)")
    if result.get("baseTestLoss") is not None and result.get("adapterTestLoss") is not None:
        print(f"test loss:       base {result['baseTestLoss']:.4f} -> adapter "
              f"{result['adapterTestLoss']:.4f}")
    uri = result.get("adapterUri")
    if uri and uri.startswith("s3://"):
        bucket, _, prefix = uri[5:].partition("/")
        key = prefix.rstrip("/") + "/metrics.json"
        try:
            body = s3().get_object(Bucket=bucket, Key=key)["Body"].read()
            metrics = json.loads(body)
        except ClientError as exc:
            print(f"(metrics.json not readable: {exc})")
            return 0
        for sample in metrics.get("samples", [])[:1]:
            print("\nprompt:")
            print("  " + sample["prompt"].replace("\n", "\n  "))
            print("base model says:")
            print("  " + (sample["base"] or "(nothing)").replace("\n", "\n  "))
            print("adapter says:")
            print("  " + (sample["adapter"] or "(nothing)").replace("\n", "\n  "))
    return 0 if status.get("phase") == "Succeeded" else 1


def main(argv: list[str]) -> int:
    if argv[1:2] == ["upload"]:
        upload()
        return 0
    if argv[1:2] == ["report"] and len(argv) == 4:
        return report(argv[2], argv[3])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
