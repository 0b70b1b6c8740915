"""Shared LoRAJob test cases: one valid manifest and the invalid variants of it.

The unit tests check each invalid case against the pydantic model and the generated CRD
schema; the cluster tests send the same cases to the real API server. One table, so the
two can never disagree about what is invalid.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

DELETE = object()


def valid_manifest(name: str = "support-bot") -> dict[str, Any]:
    return {
        "apiVersion": "lorajob.dev/v1alpha1",
        "kind": "LoRAJob",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": "hf://Qwen/Qwen2.5-7B-Instruct"},
            "dataset": {"uri": "s3://data/support/train.jsonl"},
            "output": {"uri": "s3://adapters/support-bot/"},
        },
    }


def patched(patch: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Deep-merge `patch` into a copy of the valid manifest; DELETE removes a key."""
    out = copy.deepcopy(base if base is not None else valid_manifest())

    def merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
        for key, value in src.items():
            if value is DELETE:
                dst.pop(key, None)
            elif isinstance(value, dict) and isinstance(dst.get(key), dict):
                merge(dst[key], value)
            else:
                dst[key] = copy.deepcopy(value)

    merge(out, patch)
    return out


@dataclass(frozen=True)
class Invalid:
    """A spec that must be refused, where (field path), and by whom.

    `schema` is True when the CRD's OpenAPI schema alone refuses it; `cel` when a CEL rule
    does (the API server refuses both; a JSON-schema validator only the first).
    """

    name: str
    patch: dict[str, Any]
    path: str
    schema: bool = True
    cel: bool = False
    message: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)

    def manifest(self) -> dict[str, Any]:
        return patched(self.patch)


def _spec(**kw: Any) -> dict[str, Any]:
    return {"spec": kw}


INVALID: list[Invalid] = [
    Invalid("missing base model", _spec(baseModel=DELETE), "spec.baseModel"),
    Invalid("missing dataset", _spec(dataset=DELETE), "spec.dataset"),
    Invalid("missing output", _spec(output=DELETE), "spec.output"),
    Invalid("base uri scheme", _spec(baseModel={"uri": "ftp://x/y"}), "spec.baseModel.uri",
            message="hf://org/name"),
    Invalid("base uri hf without name", _spec(baseModel={"uri": "hf://justorg"}),
            "spec.baseModel.uri"),
    Invalid("base uri empty", _spec(baseModel={"uri": ""}), "spec.baseModel.uri"),
    Invalid("gguf file not gguf", _spec(baseModel={"ggufFile": "model.bin"}),
            "spec.baseModel.ggufFile"),
    Invalid("revision on s3", _spec(baseModel={"uri": "s3://models/qwen", "revision": "main"}),
            "spec.baseModel", schema=False, cel=True, message="revision"),
    Invalid("bad credentials secret name", _spec(baseModel={"credentialsSecret": "Bad_Name"}),
            "spec.baseModel.credentialsSecret"),
    Invalid("unknown base field", _spec(baseModel={"revison": "main"}),
            "spec.baseModel.revison", schema=False, message="unknown field"),
    Invalid("dataset uri scheme", _spec(dataset={"uri": "http://insecure/data.jsonl"}),
            "spec.dataset.uri"),
    Invalid("dataset format", _spec(dataset={"format": "csv"}), "spec.dataset.format"),
    Invalid("validation fraction zero", _spec(dataset={"validation": {"fraction": 0}}),
            "spec.dataset.validation.fraction"),
    Invalid("validation fraction too big", _spec(dataset={"validation": {"fraction": 0.9}}),
            "spec.dataset.validation.fraction"),
    Invalid("validation both", _spec(dataset={"validation": {
        "fraction": 0.1, "uri": "s3://data/support/val.jsonl"}}),
        "spec.dataset.validation", schema=False, cel=True, message="exactly one"),
    Invalid("test without uri", _spec(dataset={"test": {}}), "spec.dataset.test.uri"),
    Invalid("method", _spec(method="full"), "spec.method"),
    Invalid("lora r zero", _spec(lora={"r": 0}), "spec.lora.r"),
    Invalid("lora r huge", _spec(lora={"r": 4096}), "spec.lora.r"),
    Invalid("lora alpha zero", _spec(lora={"alpha": 0}), "spec.lora.alpha"),
    Invalid("lora dropout one", _spec(lora={"dropout": 1.0}), "spec.lora.dropout"),
    Invalid("target modules empty", _spec(lora={"targetModules": []}), "spec.lora.targetModules"),
    Invalid("target module name", _spec(lora={"targetModules": ["q proj"]}),
            "spec.lora.targetModules[0]"),
    Invalid("all-linear mixed", _spec(lora={"targetModules": ["all-linear", "q_proj"]}),
            "spec.lora", schema=False, cel=True, message="all-linear"),
    Invalid("epochs and maxSteps", _spec(training={"epochs": 2, "maxSteps": 100}),
            "spec.training", schema=False, cel=True, message="not both"),
    Invalid("epochs zero", _spec(training={"epochs": 0}), "spec.training.epochs"),
    Invalid("learning rate zero", _spec(training={"learningRate": 0}),
            "spec.training.learningRate"),
    Invalid("learning rate negative", _spec(training={"learningRate": -1e-4}),
            "spec.training.learningRate"),
    Invalid("scheduler", _spec(training={"scheduler": "exponential"}), "spec.training.scheduler"),
    Invalid("warmup ratio", _spec(training={"warmupRatio": 0.9}), "spec.training.warmupRatio"),
    Invalid("micro batch zero", _spec(training={"microBatchSize": 0}),
            "spec.training.microBatchSize"),
    Invalid("grad accumulation zero", _spec(training={"gradientAccumulationSteps": 0}),
            "spec.training.gradientAccumulationSteps"),
    Invalid("seq length tiny", _spec(training={"maxSeqLength": 8}), "spec.training.maxSeqLength"),
    Invalid("precision", _spec(training={"precision": "int8"}), "spec.training.precision"),
    Invalid("seed negative", _spec(training={"seed": -1}), "spec.training.seed"),
    Invalid("eval steps zero", _spec(training={"evalSteps": 0}), "spec.training.evalSteps"),
    Invalid("save steps zero", _spec(training={"saveSteps": 0}), "spec.training.saveSteps"),
    Invalid("packing not bool", _spec(training={"packing": "yes"}), "spec.training.packing"),
    Invalid("gpus zero", _spec(resources={"gpus": 0}), "spec.resources.gpus"),
    Invalid("gpus nine", _spec(resources={"gpus": 9}), "spec.resources.gpus"),
    Invalid("gpus word", _spec(resources={"gpus": "many"}), "spec.resources.gpus"),
    Invalid("multi gpu without deepspeed", _spec(resources={"gpus": 4, "deepspeed": "none"}),
            "spec.resources", schema=False, cel=True, message="deepspeed"),
    Invalid("deepspeed stage", _spec(resources={"deepspeed": "zero1"}),
            "spec.resources.deepspeed"),
    Invalid("vram class name", _spec(resources={"vramClass": "H100_80GB"}),
            "spec.resources.vramClass"),
    Invalid("toleration operator", _spec(resources={"tolerations": [{"operator": "Maybe"}]}),
            "spec.resources.tolerations[0].operator"),
    Invalid("node selector value", _spec(resources={"nodeSelector": {"zone": 3}}),
            "spec.resources.nodeSelector.zone"),
    Invalid("output uri https", _spec(output={"uri": "https://bucket/x"}), "spec.output.uri"),
    Invalid("output endpoint scheme", _spec(output={"endpoint": "minio:9000"}),
            "spec.output.endpoint"),
    Invalid("output region", _spec(output={"region": "US East"}), "spec.output.region"),
    Invalid("merge qlora fp16", _spec(method="qlora", output={"merge": True},
                                      training={"precision": "fp16"}),
            "spec", schema=False, cel=True, message="bf16"),
    Invalid("min improvement negative", _spec(evaluation={"minImprovement": -0.1}),
            "spec.evaluation.minImprovement"),
    Invalid("min improvement one", _spec(evaluation={"minImprovement": 1.0}),
            "spec.evaluation.minImprovement"),
    Invalid("too many prompts", _spec(evaluation={"prompts": ["q"] * 9}),
            "spec.evaluation.prompts"),
    Invalid("backoff limit", _spec(runPolicy={"backoffLimit": 100}), "spec.runPolicy.backoffLimit"),
    Invalid("deadline too short", _spec(runPolicy={"activeDeadlineSeconds": 5}),
            "spec.runPolicy.activeDeadlineSeconds"),
    Invalid("ttl negative", _spec(runPolicy={"ttlSecondsAfterFinished": -1}),
            "spec.runPolicy.ttlSecondsAfterFinished"),
    Invalid("shape hidden zero", _spec(baseModel={"shape": {
        "hiddenSize": 0, "intermediateSize": 1, "numHiddenLayers": 1, "numAttentionHeads": 1,
        "vocabSize": 1}}), "spec.baseModel.shape.hiddenSize"),
    Invalid("shape missing vocab", _spec(baseModel={"shape": {
        "hiddenSize": 8, "intermediateSize": 1, "numHiddenLayers": 1, "numAttentionHeads": 1}}),
        "spec.baseModel.shape.vocabSize"),
]
