"""The LoRAJob API (`lorajob.dev/v1alpha1`) as typed models: the single source of truth.

The CRD in `crds/` is generated from these models (`make crds`), the operator validates
with them and the trainer reads its config with them. This module imports neither kopf nor
torch, so both sides can depend on it.

Rules are written once, here. Where the API server can enforce a rule too, it carries it in
the schema (ranges, enums, patterns) or as a CEL rule (`x-kubernetes-validations`) attached
with `cel(...)`; the pydantic validators below mirror the CEL rules for local use
(`lora-operator plan`, `lora-trainer run --job`).
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    model_validator,
)
from pydantic.alias_generators import to_camel

GROUP = "lorajob.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "LoRAJob"
PLURAL = "lorajobs"
SINGULAR = "lorajob"
SHORT_NAMES = ["lj"]
CATEGORIES = ["ml"]
MAX_GPUS_PER_JOB = 8

# URI patterns: the schemes each location accepts (the trainer's storage layer reads them).
MODEL_URI_PATTERN = r"^(hf://[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/.*)?|file:///.*)$"
DATA_URI_PATTERN = r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/.+|https://[^\s/]+/.+|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?/.+|file:///.+)$"
OUTPUT_URI_PATTERN = r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/.*)?|file:///.*)$"
ENDPOINT_PATTERN = r"^https?://[^\s/]+(/.*)?$"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
TARGET_MODULE_PATTERN = r"^(all-linear|[A-Za-z_][A-Za-z0-9_.]*)$"
# Label syntax as the API server enforces it on pods (nodeSelector, tolerations): a key is
# an optional DNS-subdomain prefix and "/" plus a name of at most 63 characters; a value is
# empty or at most 63 alphanumerics, '-', '_' and '.', starting and ending alphanumeric.
LABEL_KEY_PATTERN = (r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                     r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
# A LoRAJob's name is at most this long, so that every child name (`<name>-trainer`,
# `<name>-a<attempt>`, and room for an 11-character suffix) fits a 63-character DNS label
# as it is: no child name is ever shortened or hashed, so two LoRAJobs can never map to
# the same child object (enforced by the CRD: ROOT_RULES).
MAX_NAME_LENGTH = 52


def cel(rule: str, message: str, *, field_path: str | None = None,
        reason: str | None = None) -> dict[str, Any]:
    """One CEL rule for `x-kubernetes-validations`, attached to a model or field schema."""
    out: dict[str, Any] = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    if reason:
        out["reason"] = reason
    return out


def _cel_quote(text: str) -> str:
    """`text` inside a single-quoted CEL string literal (a regex's backslashes doubled)."""
    return text.replace("\\", "\\\\").replace("'", "\\'")


def _validations(*rules: dict[str, Any]) -> dict[str, Any]:
    return {"x-kubernetes-validations": list(rules)}


class ApiModel(BaseModel):
    """Base for every API object: camelCase on the wire, snake_case in Python, no unknown keys.

    Unknown keys are refused (not dropped) because a misspelt field silently ignored is the
    worst kind of error for a training job that runs for hours; kubectl's strict field
    validation does the same against the CRD.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
        use_enum_values=True,
        # Strict like the API server: "yes" is not a bool and "5" is not an integer there,
        # so it is not here either. Enum fields opt out (they take their string values).
        strict=True,
    )


def _immutable(name: str) -> dict[str, Any]:
    return cel("self == oldSelf", f"spec.{name} is immutable once the job exists; "
               "delete and re-create the LoRAJob to change it")


# --------------------------------------------------------------------------- enums


class Method(str, enum.Enum):
    """How the base model is held in memory while the adapter trains."""

    LORA = "lora"
    QLORA = "qlora"
    AUTO = "auto"


class DatasetFormat(str, enum.Enum):
    AUTO = "auto"
    ALPACA = "alpaca"
    CHAT = "chat"
    COMPLETION = "completion"
    TEXT = "text"


class Scheduler(str, enum.Enum):
    COSINE = "cosine"
    LINEAR = "linear"
    CONSTANT = "constant"
    CONSTANT_WITH_WARMUP = "constant_with_warmup"


class Precision(str, enum.Enum):
    AUTO = "auto"
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"


class DeepSpeed(str, enum.Enum):
    AUTO = "auto"
    NONE = "none"
    ZERO2 = "zero2"
    ZERO3 = "zero3"
    ZERO3_OFFLOAD = "zero3-offload"


class Phase(str, enum.Enum):
    PENDING = "Pending"
    QUEUED = "Queued"
    SCHEDULING = "Scheduling"
    RUNNING = "Running"
    UPLOADING = "Uploading"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"

    @property
    def finished(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.FAILED)


class ConditionType(str, enum.Enum):
    """Condition types, each True while it holds (so `kubectl wait --for=condition=X` works)."""

    PLANNED = "Planned"
    QUEUED = "Queued"
    SCHEDULED = "Scheduled"
    RUNNING = "Running"
    UPLOADING = "Uploading"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"
    DATASET_VALIDATED = "DatasetValidated"


# --------------------------------------------------------------------------- spec parts


class ModelShape(ApiModel):
    """The few numbers of a transformer's config.json that decide its memory footprint."""

    hidden_size: int = Field(ge=1, le=65536, description="Model width (config.json hidden_size).")
    intermediate_size: int = Field(ge=1, le=1048576,
                                   description="FFN inner width (config.json intermediate_size).")
    num_hidden_layers: int = Field(ge=1, le=1024, description="Number of decoder layers.")
    num_attention_heads: int = Field(ge=1, le=1024, description="Number of query heads.")
    num_key_value_heads: int | None = Field(
        default=None, ge=1, le=1024,
        description="Number of key/value heads (grouped-query attention); defaults to numAttentionHeads.")
    vocab_size: int = Field(ge=1, le=4194304, description="Vocabulary size.")
    head_dim: int | None = Field(default=None, ge=1, le=4096,
                                 description="Per-head dimension, when not hiddenSize / numAttentionHeads.")
    tie_word_embeddings: bool = Field(default=False,
                                      description="Whether lm_head shares the embedding matrix.")
    num_experts: int | None = Field(default=None, ge=1, le=1024,
                                    description="Experts per MoE layer (absent for dense models).")


class BaseModelSpec(ApiModel):
    """Where the base model comes from."""

    uri: str = Field(pattern=MODEL_URI_PATTERN, max_length=1024, description=(
        "Base model location: hf://org/name, s3://bucket/prefix, pvc://claim/path, or "
        "file:///path (local runs). The directory holds config.json and the weights, "
        "or a GGUF file named by ggufFile."))
    revision: str | None = Field(default=None, max_length=255, pattern=r"^[A-Za-z0-9._/-]+$",
                                 description="Branch, tag or commit (hf:// only).")
    gguf_file: str | None = Field(default=None, max_length=255, pattern=r"^[^/\s][^\s]*\.gguf$",
                                  description="Load this GGUF file from the uri instead of safetensors.")
    credentials_secret: str | None = Field(
        default=None, pattern=DNS_SUBDOMAIN_PATTERN, max_length=253,
        description="Secret in the job's namespace with HF_TOKEN (hf://) or "
                    "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (s3://). Read by reference only.")
    endpoint: str | None = Field(default=None, pattern=ENDPOINT_PATTERN, max_length=512,
                                 description="S3-compatible endpoint for s3:// models; "
                                             "defaults to output.endpoint, then the operator's default.")
    trust_remote_code: bool = Field(default=False,
                                    description="Allow the model repository's own Python code to run.")
    architecture: str | None = Field(
        default=None, max_length=63, pattern=r"^[a-z0-9][a-z0-9.-]*$",
        description="Well-known architecture name (for example llama-3.1-8b) used for sizing "
                    "when config.json cannot be read.")
    shape: ModelShape | None = Field(default=None, description=(
        "Explicit model shape for sizing, used when config.json cannot be read."))

    @model_validator(mode="after")
    def _revision_only_for_hf(self) -> BaseModelSpec:
        if self.revision is not None and not self.uri.startswith("hf://"):
            raise ValueError("revision: only allowed with an hf:// uri")
        return self


BASE_MODEL_RULES = [
    cel("!has(self.revision) || self.uri.startsWith('hf://')",
        "revision is only allowed with an hf:// uri", field_path=".revision"),
]


class SplitSpec(ApiModel):
    """How a held-out split is obtained: a fraction of the training file, or its own file."""

    fraction: float | None = Field(default=None, gt=0.0, le=0.5, description=(
        "Fraction of the training rows held out (0 < fraction <= 0.5)."))
    uri: str | None = Field(default=None, pattern=DATA_URI_PATTERN, max_length=1024,
                            description="A separate file for this split.")

    @model_validator(mode="after")
    def _exactly_one(self) -> SplitSpec:
        if (self.fraction is None) == (self.uri is None):
            raise ValueError("set exactly one of fraction or uri")
        return self


SPLIT_RULES = [cel("has(self.fraction) != has(self.uri)", "set exactly one of fraction or uri")]


class TestSplitSpec(ApiModel):
    """A held-out test file used only for the final verdict."""

    uri: str = Field(pattern=DATA_URI_PATTERN, max_length=1024, description="Test file location.")


class PreflightSpec(ApiModel):
    """The dataset check a CPU-only pod runs before any GPU is requested."""

    enabled: bool = Field(default=True, description=(
        "Run the dataset preflight (lora-trainer preflight) in a CPU-only Job before the "
        "trainer Job; its report goes to status.dataset."))
    max_overlap_fraction: float = Field(default=0.1, ge=0.0, le=1.0, description=(
        "Fail when more than this fraction of the validation or test rows also appear in "
        "train (or test rows in validation), compared by normalised text (0.1 = 10 %)."))
    max_truncated_fraction: float = Field(default=1.0, ge=0.0, le=1.0, description=(
        "Fail when more than this fraction of the training rows is longer than "
        "training.maxSeqLength. A split where every row is truncated always fails."))


class DatasetSpec(ApiModel):
    """The training data."""

    uri: str = Field(pattern=DATA_URI_PATTERN, max_length=1024, description=(
        "Training file: .jsonl, .json or .parquet at s3://, https://, pvc://claim/path or file://."))
    format: DatasetFormat = Field(default=DatasetFormat.AUTO, strict=False, description=(
        "Row format: alpaca (instruction/input/output), chat (messages), completion "
        "(prompt/completion), text, or auto to detect from the columns."))
    validation: SplitSpec = Field(
        default_factory=lambda: SplitSpec(fraction=0.05),
        description="Validation split: {fraction: 0.05} or {uri: ...}.")
    test: TestSplitSpec | None = Field(default=None,
                                       description="Optional held-out test set for the final verdict.")
    credentials_secret: str | None = Field(
        default=None, pattern=DNS_SUBDOMAIN_PATTERN, max_length=253,
        description="Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY for s3:// data; "
                    "defaults to output.credentialsSecret.")
    endpoint: str | None = Field(default=None, pattern=ENDPOINT_PATTERN, max_length=512,
                                 description="S3 endpoint for s3:// data; defaults to output.endpoint.")
    preflight: PreflightSpec = Field(default_factory=PreflightSpec, description=(
        "The dataset check before any GPU is requested: rows, format, token lengths, "
        "truncation, duplicates, split overlap and refused rows."))


class LoraSpec(ApiModel):
    """The adapter's shape."""

    r: int = Field(default=16, ge=1, le=1024, description="LoRA rank: the adapter's inner dimension.")
    alpha: float = Field(default=32, gt=0, le=4096,
                         description="Scaling numerator; the update is scaled by alpha / r.")
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: list[Annotated[str, Field(pattern=TARGET_MODULE_PATTERN, max_length=128)]] = Field(
        default_factory=lambda: ["all-linear"], min_length=1, max_length=64,
        description="Modules that get adapters: [all-linear] for every linear layer except the "
                    "output head, or explicit names such as [q_proj, v_proj].")
    use_dora: bool = Field(default=False, description="Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = Field(default=False, description="Rank-stabilised scaling alpha / sqrt(r).")

    @model_validator(mode="after")
    def _all_linear_alone(self) -> LoraSpec:
        if "all-linear" in self.target_modules and len(self.target_modules) != 1:
            raise ValueError("targetModules: all-linear cannot be combined with other names")
        return self


LORA_RULES = [cel("!has(self.targetModules) || !('all-linear' in self.targetModules) || size(self.targetModules) == 1",
                  "all-linear cannot be combined with other names", field_path=".targetModules")]


class TrainingSpec(ApiModel):
    """The optimisation schedule."""

    epochs: int | None = Field(default=None, ge=1, le=1000, description=(
        "Passes over the training data; 3 when neither epochs nor maxSteps is set."))
    max_steps: int | None = Field(default=None, ge=1, le=10_000_000,
                                  description="Optimizer steps to run instead of whole epochs.")
    learning_rate: float = Field(default=2.0e-4, gt=0.0, le=1.0, description="Peak learning rate.")
    scheduler: Scheduler = Field(default=Scheduler.COSINE, strict=False, description="Learning-rate schedule.")
    warmup_ratio: float = Field(default=0.05, ge=0.0, le=0.5,
                                description="Fraction of steps spent warming the learning rate up.")
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(default=1.0, gt=0.0, le=1000.0, description="Gradient clipping norm.")
    micro_batch_size: int = Field(default=4, ge=1, le=1024,
                                  description="Sequences per GPU per forward pass.")
    gradient_accumulation_steps: int = Field(default=4, ge=1, le=4096,
                                             description="Micro-batches per optimizer step.")
    max_seq_length: int = Field(default=2048, ge=16, le=1_048_576,
                                description="Tokens per sequence; longer rows are truncated and counted.")
    packing: bool = Field(default=True, description=(
        "Pack several short rows into one sequence (no attention across rows where the "
        "attention kernel allows it)."))
    completion_only_loss: bool = Field(default=True,
                                       description="Mask prompt tokens so only answers are learned.")
    gradient_checkpointing: bool = Field(default=True,
                                         description="Recompute activations to save memory.")
    precision: Precision = Field(default=Precision.AUTO, strict=False, description=(
        "Compute precision: auto picks bf16 on GPUs that support it, fp32 on CPU."))
    seed: int = Field(default=42, ge=0, le=2**31 - 1, description="Random seed for data order and init.")
    eval_steps: int = Field(default=50, ge=1, le=10_000_000,
                            description="Evaluate on the validation split every N steps.")
    save_steps: int = Field(default=100, ge=1, le=10_000_000,
                            description="Checkpoint to storage every N steps.")
    early_stopping_patience: int | None = Field(default=None, ge=1, le=1000, description=(
        "Stop after this many evaluations without improvement."))

    @model_validator(mode="after")
    def _epochs_or_steps(self) -> TrainingSpec:
        if self.epochs is not None and self.max_steps is not None:
            raise ValueError("set either epochs or maxSteps, not both")
        return self

    @property
    def effective_epochs(self) -> int:
        return self.epochs if self.epochs is not None else 3


TRAINING_RULES = [cel("!(has(self.epochs) && has(self.maxSteps))",
                      "set either epochs or maxSteps, not both")]


LabelKey = Annotated[str, Field(max_length=317, pattern=LABEL_KEY_PATTERN)]
LabelValue = Annotated[str, Field(max_length=63, pattern=LABEL_VALUE_PATTERN)]
# Keys are checked by pydantic here and by a CEL rule in the CRD (RESOURCES_RULES): a
# structural schema has no propertyNames / patternProperties.
NodeSelector = Annotated[dict[LabelKey, LabelValue], WithJsonSchema({
    "type": "object", "maxProperties": 32,
    "additionalProperties": {"type": "string", "maxLength": 63, "pattern": LABEL_VALUE_PATTERN}})]


class Toleration(ApiModel):
    """A Kubernetes toleration, copied onto the trainer pod."""

    key: str | None = Field(default=None, max_length=317, pattern=r"^$|" + LABEL_KEY_PATTERN,
                            description="Taint key (label-key syntax); empty matches every key.")
    operator: Literal["Exists", "Equal"] | None = Field(default=None, description="Exists or Equal.")
    value: str | None = Field(default=None, max_length=63, pattern=LABEL_VALUE_PATTERN,
                              description="Taint value (label-value syntax).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate.")
    toleration_seconds: int | None = Field(default=None, ge=0,
                                           description="For NoExecute: how long the pod stays bound.")

    @model_validator(mode="after")
    def _as_kubernetes_checks(self) -> Toleration:
        """The pod-level rules the API server would otherwise refuse the Job for (the CRD
        checks the same in CEL: TOLERATION_RULES, in the same order)."""
        holds = [self.operator != "Exists" or not self.value,
                 bool(self.key) or self.operator == "Exists",
                 self.toleration_seconds is None or self.effect == "NoExecute"]
        for ok, rule in zip(holds, TOLERATION_RULES, strict=True):
            if not ok:
                raise ValueError(rule["message"])
        return self


TOLERATION_RULES = [
    cel("!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
        "value must be empty when operator is Exists", field_path=".value"),
    cel("(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
        "operator must be Exists when key is empty (a toleration of every taint)",
        field_path=".operator"),
    cel("!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
        "tolerationSeconds needs effect NoExecute", field_path=".tolerationSeconds"),
]


def _parse_gpus(value: Any) -> Any:
    """`gpus` is 'auto' or 1..8: one message whichever way the input is wrong."""
    if value == "auto":
        return "auto"
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_GPUS_PER_JOB:
        return value
    raise ValueError(f"must be 'auto' or an integer 1..{MAX_GPUS_PER_JOB} (got {value!r})")


GpuCount = Annotated[
    int | Literal["auto"],
    BeforeValidator(_parse_gpus),
    WithJsonSchema({"x-kubernetes-int-or-string": True, "pattern": "^auto$",
                    "minimum": 1, "maximum": MAX_GPUS_PER_JOB}),
]


class ResourcesSpec(ApiModel):
    """Where the job may run. `auto` lets the planner decide from the VRAM estimate."""

    gpus: GpuCount = Field(default="auto", description=(
        "GPUs on one node: auto, or 1..8 (DeepSpeed when more than 1)."))
    vram_class: str = Field(default="auto", pattern=DNS_LABEL_PATTERN, max_length=63, description=(
        "auto, or a VRAM class name from the operator's configuration (for example h100-80gb)."))
    deepspeed: DeepSpeed = Field(default=DeepSpeed.AUTO, strict=False,
                                 description="auto, none, zero2, zero3 or zero3-offload.")
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32,
                                          description="Extra tolerations for the trainer pod.")
    node_selector: NodeSelector = Field(
        default_factory=dict, max_length=32,
        description="Extra node selector for the trainer pod (label keys and values).")
    priority_class_name: str | None = Field(default=None, pattern=DNS_SUBDOMAIN_PATTERN,
                                            max_length=253,
                                            description="PriorityClass for the trainer pod.")

    @model_validator(mode="after")
    def _multi_gpu_needs_deepspeed(self) -> ResourcesSpec:
        if isinstance(self.gpus, int) and self.gpus > 1 and self.deepspeed == DeepSpeed.NONE:
            raise ValueError("gpus > 1 needs deepspeed auto, zero2, zero3 or zero3-offload")
        return self


RESOURCES_RULES = [
    cel("!has(self.nodeSelector) || self.nodeSelector.all(k, k.size() <= 317 && "
        f"k.matches('{_cel_quote(LABEL_KEY_PATTERN)}'))",
        "nodeSelector keys must be label keys: an optional DNS-subdomain prefix and '/', then "
        "a name of at most 63 letters, digits, '-', '_' or '.', starting and ending with a "
        "letter or digit", field_path=".nodeSelector"),
    cel("!(has(self.gpus) && has(self.deepspeed) && type(self.gpus) == int && self.gpus > 1 "
        "&& self.deepspeed == 'none')",
        "gpus > 1 needs deepspeed auto, zero2, zero3 or zero3-offload", field_path=".deepspeed"),
]


class OutputSpec(ApiModel):
    """Where the adapter goes."""

    uri: str = Field(pattern=OUTPUT_URI_PATTERN, max_length=1024, description=(
        "Adapter destination: s3://bucket/prefix/, pvc://claim/path or file:///path (local runs)."))
    endpoint: str | None = Field(default=None, pattern=ENDPOINT_PATTERN, max_length=512,
                                 description="S3-compatible endpoint; defaults to the operator's.")
    region: str | None = Field(default=None, pattern=r"^[a-z0-9-]+$", max_length=64,
                               description="S3 region; defaults to the operator's s3Region.")
    credentials_secret: str | None = Field(
        default=None, pattern=DNS_SUBDOMAIN_PATTERN, max_length=253,
        description="Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; "
                    "defaults to the operator's.")
    merge: bool = Field(default=False, description=(
        "Also upload a merged bf16 model (QLoRA jobs merge into a bf16 copy of the base)."))
    overwrite: bool = Field(default=False,
                            description="Replace an adapter another job already wrote at uri.")


class EvaluationSpec(ApiModel):
    """The quality gate: the adapter must beat its base model on held-out data."""

    min_improvement: float | None = Field(default=None, ge=0.0, lt=1.0, description=(
        "Required relative drop in held-out loss versus the base model (0.05 = 5 %); "
        "the job Fails when the adapter does not reach it."))
    prompts: list[Annotated[str, Field(max_length=4096)]] = Field(
        default_factory=list, max_length=8,
        description="Prompts answered by base and adapter after training, stored in metrics.json.")
    max_new_tokens: int = Field(default=64, ge=1, le=4096,
                                description="Tokens generated per evaluation prompt.")


class RunPolicy(ApiModel):
    """Retries, limits and lifetime, as in Kubernetes Jobs."""

    backoff_limit: int = Field(default=2, ge=0, le=20,
                               description="Retries after a retryable failure or out-of-memory.")
    active_deadline_seconds: int | None = Field(default=86400, ge=60, le=31_536_000,
                                                description="Fail the job after this long.")
    ttl_seconds_after_finished: int | None = Field(default=604800, ge=0, le=31_536_000, description=(
        "Delete the LoRAJob this long after it finished (its adapter stays in storage)."))
    suspend: bool = Field(default=False, description=(
        "Stop the trainer (its progress and checkpoints stay); resume by setting it false."))


class LoRAJobSpec(ApiModel):
    """What the user wants: a base model, data, a method and where the adapter goes."""

    base_model: BaseModelSpec = Field(
        description="The model to adapt.")
    dataset: DatasetSpec = Field(description="Training data and its held-out splits.")
    method: Method = Field(default=Method.AUTO, strict=False, description=(
        "lora, qlora (4-bit NF4 base), or auto: lora if it fits a configured GPU, else qlora."))
    lora: LoraSpec = Field(default_factory=LoraSpec, description="The adapter's shape.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Optimisation.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec,
                                     description="GPU count, VRAM class and scheduling.")
    output: OutputSpec = Field(description="Where the adapter goes.")
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec,
                                       description="Quality gate and sample prompts.")
    run_policy: RunPolicy = Field(default_factory=RunPolicy,
                                  description="Retries, deadline, TTL and suspension.")

    @model_validator(mode="after")
    def _merge_precision(self) -> LoRAJobSpec:
        if self.output.merge and self.method == Method.QLORA and \
                self.training.precision == Precision.FP16:
            raise ValueError("output.merge with method qlora merges into a bf16 base; "
                             "training.precision must be auto or bf16")
        return self


SPEC_RULES = [
    cel("!(has(self.output.merge) && self.output.merge && has(self.method) && self.method == 'qlora' "
        "&& has(self.training) && has(self.training.precision) && self.training.precision == 'fp16')",
        "output.merge with method qlora merges into a bf16 base; "
        "training.precision must be auto or bf16", field_path=".training.precision"),
]
# Fields whose change would alter a run in flight; runPolicy stays editable (suspend, TTL).
IMMUTABLE_SPEC_FIELDS = ["baseModel", "dataset", "method", "lora", "training", "resources",
                         "output", "evaluation"]


# --------------------------------------------------------------------------- status


class Condition(ApiModel):
    """A Kubernetes-style condition."""

    type: str = Field(max_length=316, description="Condition type, for example Running.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(default="", max_length=1024, description="CamelCase machine-readable reason.")
    message: str = Field(default="", max_length=32768, description="Human-readable detail.")
    last_transition_time: str | None = Field(default=None,
                                             description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(default=None, ge=0,
                                            description="The spec generation this was computed from.")


class Placement(ApiModel):
    """Where the planner put the job, decided before any pod exists."""

    method: Literal["lora", "qlora"] | None = Field(default=None, description="Resolved method.")
    vram_class: str | None = Field(default=None, description="Chosen VRAM class.")
    estimated_vram_gib: float | None = Field(default=None, alias="estimatedVramGiB",
                                              description="Estimated peak memory per GPU (GiB).")
    gpus: int | None = Field(default=None, description="GPUs on one node.")
    deepspeed: str | None = Field(default=None, description="Resolved DeepSpeed stage.")
    node: str | None = Field(default=None, description="Node the trainer pod runs on.")
    breakdown: dict[str, float] = Field(default_factory=dict,
                                        description="Estimate per component (GiB).")


class Progress(ApiModel):
    """Live training progress: the trainer prints it, the operator reads it from the pod's
    log and writes it here (at most every `progressIntervalSeconds`)."""

    step: int | None = Field(default=None, description="Optimizer steps done.")
    total_steps: int | None = Field(default=None, description="Optimizer steps planned.")
    percent: float | None = Field(default=None, description="step / totalSteps × 100.")
    epoch: float | None = Field(default=None, description="Fractional epoch.")
    loss: float | None = Field(default=None, description="Recent training loss.")
    eval_loss: float | None = Field(default=None, description="Latest validation loss.")
    tokens_per_second: float | None = Field(default=None, description="Training throughput.")
    eta_seconds: float | None = Field(default=None, description="Estimated time to finish.")
    updated_at: str | None = Field(default=None, description="When this was written (RFC 3339).")


class Result(ApiModel):
    """The verdict and where the adapter is."""

    adapter_uri: str | None = Field(default=None, description="Adapter location.")
    manifest_uri: str | None = Field(default=None, description="manifest.json location.")
    size_bytes: int | None = Field(default=None, description="Adapter size.")
    base_eval_loss: float | None = Field(default=None, description="Base model held-out loss.")
    adapter_eval_loss: float | None = Field(default=None, description="Adapter held-out loss.")
    improvement: float | None = Field(default=None,
                                      description="Relative held-out loss reduction (0.1 = 10 %).")
    base_test_loss: float | None = Field(default=None, description="Base model test-set loss.")
    adapter_test_loss: float | None = Field(default=None, description="Adapter test-set loss.")
    merged_uri: str | None = Field(default=None, description="Merged model location.")


class TokenLength(ApiModel):
    """Token counts per row with the base model's tokenizer (chat template applied)."""

    p50: int | None = Field(default=None, description="Median tokens per row.")
    p95: int | None = Field(default=None, description="95th percentile of tokens per row.")
    max: int | None = Field(default=None, description="Longest row in tokens.")


class SplitReport(ApiModel):
    """What the preflight found in one split."""

    rows: int = Field(default=0, description="Rows read (refused ones included).")
    refused: int = Field(default=0, description="Rows the trainer would refuse.")
    token_length: TokenLength | None = Field(default=None, description="Tokens per row.")
    truncated_percent: float | None = Field(default=None, description=(
        "Percent of rows longer than training.maxSeqLength."))
    duplicates: int = Field(default=0, description=(
        "Rows whose normalised text already appeared earlier in the split."))


class DatasetSplits(ApiModel):
    train: SplitReport | None = Field(default=None, description="The training split.")
    validation: SplitReport | None = Field(default=None, description="The validation split.")
    test: SplitReport | None = Field(default=None, description="The test split, when set.")


class DatasetOverlap(ApiModel):
    """Rows of a held-out split whose normalised text is also in another split."""

    train_validation: int = Field(default=0, description="Validation rows also in train.")
    train_test: int = Field(default=0, description="Test rows also in train.")
    validation_test: int = Field(default=0, description="Test rows also in validation.")
    max_fraction: float = Field(default=0.0, description=(
        "The largest of those counts as a fraction of its held-out split."))


class RefusedRow(ApiModel):
    file: str = Field(description="File the row came from.")
    line: int = Field(description="Line (jsonl) or record number (json, parquet), from 1.")
    reason: str = Field(description="Why the trainer would refuse it.")


class DatasetReport(ApiModel):
    """The dataset preflight's report (lora-trainer preflight)."""

    verdict: Literal["Passed", "Failed"] = Field(description="Passed or Failed.")
    reason: str = Field(default="", description="CamelCase reason, e.g. InvalidDataset.")
    message: str = Field(default="", description="Human-readable summary.")
    format: str | None = Field(default=None, description="Row format detected or given.")
    max_seq_length: int | None = Field(default=None, description="training.maxSeqLength used.")
    splits: DatasetSplits | None = Field(default=None, description="Per-split figures.")
    overlap: DatasetOverlap | None = Field(default=None, description="Exact overlap between splits.")
    refused: list[RefusedRow] = Field(default_factory=list, description=(
        "The first refused rows with file:line and reason."))
    checked_at: str | None = Field(default=None, description="When the report was read (RFC 3339).")


class Cost(ApiModel):
    gpu_hours: float | None = Field(default=None, description="GPU-hours used by all attempts.")
    estimated_usd: float | None = Field(default=None, alias="estimatedUSD",
                                        description="GPU-hours × the class's price.")


class LoRAJobStatus(ApiModel):
    """What the controller saw."""

    phase: Phase | None = Field(default=None, strict=False, description="Lifecycle phase.")
    conditions: list[Condition] = Field(default_factory=list, description="Current conditions.")
    observed_generation: int | None = Field(default=None,
                                            description="Spec generation last acted on.")
    placement: Placement | None = Field(default=None, description="Resolved placement.")
    progress: Progress | None = Field(default=None, description="Training progress.")
    attempts: int | None = Field(default=None, description="Trainer attempts so far.")
    result: Result | None = Field(default=None, description="Final result.")
    dataset: DatasetReport | None = Field(default=None, description="The dataset preflight's report.")
    cost: Cost | None = Field(default=None, description="GPU-hours and estimated cost.")
    start_time: str | None = Field(default=None, description="When training first started.")
    completion_time: str | None = Field(default=None, description="When the job finished.")
    message: str | None = Field(default=None, description="Latest human-readable summary.")


class ObjectMeta(BaseModel):
    """The part of metadata the project reads; everything else passes through untouched."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(default="", max_length=MAX_NAME_LENGTH, pattern=r"^$|" + DNS_LABEL_PATTERN)
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class LoRAJob(ApiModel):
    """A LoRA or QLoRA fine-tune of one base model on one dataset."""

    api_version: Literal["lorajob.dev/v1alpha1"] = "lorajob.dev/v1alpha1"
    kind: Literal["LoRAJob"] = "LoRAJob"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: LoRAJobSpec
    status: LoRAJobStatus | None = None


# Rules on the whole object (the CRD's root): the name cap that keeps child names unhashed.
ROOT_RULES = [
    cel(f"self.metadata.name.size() <= {MAX_NAME_LENGTH}",
        f"metadata.name must be at most {MAX_NAME_LENGTH} characters, so that the names of the "
        "objects made for the job (<name>-trainer, <name>-a<attempt>) fit Kubernetes' 63 "
        "without shortening", reason="FieldValueInvalid"),
]
# The CEL rules keyed by the model they attach to; the CRD generator reads this.
MODEL_RULES: dict[type[BaseModel], list[dict[str, Any]]] = {
    Toleration: TOLERATION_RULES,
    BaseModelSpec: BASE_MODEL_RULES,
    SplitSpec: SPLIT_RULES,
    LoraSpec: LORA_RULES,
    TrainingSpec: TRAINING_RULES,
    ResourcesSpec: RESOURCES_RULES,
    LoRAJobSpec: SPEC_RULES,
}


# --------------------------------------------------------------------------- validation


class SpecError(ValueError):
    """A LoRAJob that breaks a rule; `errors` holds (field path, message) pairs."""

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = errors
        super().__init__("; ".join(f"{path}: {msg}" if path else msg for path, msg in errors))


def _field_path(loc: tuple[int | str, ...]) -> str:
    """`('spec', 'lora', 'r')` → `spec.lora.r`; list indices become `[i]`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith(("function-", "literal[", "int", "str")) and out:
            continue  # pydantic's union/validator tags: not part of the user's path
        else:
            out += f".{part}" if out else part
    return out


def _message(err: Any) -> str:
    msg = str(err["msg"])
    msg = msg.removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return "unknown field (not part of the schema; check its spelling)"
    if err["type"] == "string_pattern_mismatch":
        pattern = err.get("ctx", {}).get("pattern", "")
        return f"{_pattern_hint(pattern)} (got {err.get('input')!r})"
    if "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], dict):
        msg = f"{msg} (got {err['input']!r})"
    return msg


_LABEL_KEY_HINT = ("must be a label key: an optional DNS-subdomain prefix and '/', then a name "
                   "of at most 63 letters, digits, '-', '_' or '.', starting and ending with a "
                   "letter or digit")


def _pattern_hint(pattern: str) -> str:
    hints = {
        MODEL_URI_PATTERN: "must be hf://org/name, s3://bucket/prefix, pvc://claim/path or file:///path",
        DATA_URI_PATTERN: "must be s3://bucket/key, https://host/path, pvc://claim/path or file:///path",
        OUTPUT_URI_PATTERN: "must be s3://bucket/prefix, pvc://claim/path or file:///path",
        ENDPOINT_PATTERN: "must be an http:// or https:// URL",
        DNS_LABEL_PATTERN: "must be a DNS label (lowercase letters, digits and '-')",
        DNS_SUBDOMAIN_PATTERN: "must be a Kubernetes object name (lowercase, digits, '-', '.')",
        TARGET_MODULE_PATTERN: "must be all-linear or a module name such as q_proj",
        LABEL_KEY_PATTERN: _LABEL_KEY_HINT,
        r"^$|" + LABEL_KEY_PATTERN: _LABEL_KEY_HINT,
        LABEL_VALUE_PATTERN: ("must be a label value: empty, or at most 63 letters, digits, "
                              "'-', '_' or '.', starting and ending with a letter or digit"),
    }
    return hints.get(pattern, f"must match {pattern}")


def errors_of(exc: ValidationError, prefix: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """Turn pydantic's errors into (field path, message) pairs a user can act on."""
    return [(_field_path(prefix + tuple(e["loc"])), _message(e)) for e in exc.errors()]


def parse_lorajob(obj: dict[str, Any]) -> LoRAJob:
    """Validate a LoRAJob manifest (as a dict), raising SpecError naming every bad field."""
    try:
        return LoRAJob.model_validate(obj)
    except ValidationError as exc:
        raise SpecError(errors_of(exc)) from None


def parse_spec(spec: dict[str, Any]) -> LoRAJobSpec:
    """Validate just a spec (what kopf hands a handler), paths prefixed with `spec`."""
    try:
        return LoRAJobSpec.model_validate(spec)
    except ValidationError as exc:
        raise SpecError(errors_of(exc, ("spec",))) from None


def to_manifest(job: LoRAJob) -> dict[str, Any]:
    """The job as a plain manifest: camelCase keys, unset optional fields left out."""
    return job.model_dump(by_alias=True, exclude_none=True, mode="json")


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
