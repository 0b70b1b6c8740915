"""The trainer's half of tenant isolation (issue 13, item 8): it refuses outputs outside the
storage prefixes the operator rendered for its namespace, and `overwrite` replaces only an
adapter written from the same namespace."""

from __future__ import annotations

import json
from typing import Any

import pytest

from lora_operator import contract
from lora_trainer import export
from lora_trainer.errors import TrainerError

UID = "0b6a5c1e-1111-2222-3333-444455556666"


def test_trainer_refuses_outputs_outside_its_prefixes() -> None:
    export.check_output_allowed("s3://adapters/team-a/bot/",
                                contract.checkpoint_uri_for("s3://adapters/team-a/bot/", UID),
                                ["s3://adapters/team-a/"])
    with pytest.raises(TrainerError) as err:
        export.check_output_allowed("s3://adapters/team-b/bot/", "s3://adapters/team-b/bot/c/",
                                    ["s3://adapters/team-a/"])
    assert err.value.code == contract.ExitCode.CONFIG
    assert "s3://adapters/team-a/" in err.value.message


def _manifest(uid: str, namespace: str | None) -> str:
    job: dict[str, Any] = {"uid": uid, "name": "x"}
    if namespace is not None:
        job["namespace"] = namespace
    return json.dumps({"job": job, "files": {}})


def test_overwrite_replaces_only_the_same_namespaces_adapter() -> None:
    me = contract.JobIdentity(name="bot", namespace="team-b", uid=UID)
    uri = "s3://adapters/shared/bot/"
    export.refuse_replacing(_manifest("other-uid", "team-b"), uri, me, overwrite=True)
    export.refuse_replacing(_manifest(UID, "team-b"), uri, me, overwrite=False)
    for text in (_manifest("other-uid", "team-a"), _manifest("other-uid", None)):
        with pytest.raises(TrainerError) as err:
            export.refuse_replacing(text, uri, me, overwrite=True)
        assert err.value.code == contract.ExitCode.OUTPUT_CONFLICT
        assert "same namespace" in err.value.message
