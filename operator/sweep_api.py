"""The LoRASweep API (`lorajob.dev/v1alpha1`): a hyperparameter search over LoRAJobs.

A LoRASweep holds a LoRAJob spec as its template and a typed search space over the few
knobs that matter most for a LoRA fine-tune (rank, alpha, learning rate, target modules,
method). The operator turns each point of the space into a child LoRAJob named
`<sweep>-t<N>`, runs at most `parallelism` of them at once, stops losing trials early from
their live validation loss (median rule) and reports the trial whose adapter has the lowest
held-out loss.

The search space is typed field by field (not a list of `{name, values}`), so the API server
refuses an unknown parameter or a value of the wrong type from the schema alone, and the
error names the field. Like `api.py`, this module is the single source of truth for its CRD
(`make crds` writes crds/lorasweep.yaml) and imports neither kopf nor torch.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, model_validator

from lora_operator import api
from lora_operator.api import ApiModel, cel

KIND = "LoRASweep"
PLURAL = "lorasweeps"
SINGULAR = "lorasweep"
SHORT_NAMES = ["lsw"]
CATEGORIES = ["ml"]
# Trials per sweep: each one is a row in status.trials (with its eval-loss history), and the
# status must stay far below the API server's 1.5 MiB object limit.
MAX_TRIALS = 100
# A trial's LoRAJob is `<sweep>-t<N>` (N ≤ MAX_TRIALS) and must fit the LoRAJob name cap of
# 52 characters (which leaves room for the LoRAJob's own children): 52 - len("-t100").
LORAJOB_MAX_NAME_LENGTH = 52
MAX_NAME_LENGTH = LORAJOB_MAX_NAME_LENGTH - len(f"-t{MAX_TRIALS}")
# Eval-loss points kept per trial in status for the median rule (oldest dropped first).
MAX_HISTORY = 32
# The parameters a search space may vary, as dotted paths into the LoRAJob spec.
PARAMETERS = ("lora.r", "lora.alpha", "training.learningRate", "lora.targetModules", "method")

# A free-form JSON object in the CRD (a trial's parameter values: ints, floats, strings, lists).
FreeObject = Annotated[dict[str, Any], WithJsonSchema(
    {"type": "object", "x-kubernetes-preserve-unknown-fields": True})]


class Algorithm(str, enum.Enum):
    GRID = "grid"
    RANDOM = "random"


class Scale(str, enum.Enum):
    LINEAR = "linear"
    LOG = "log"


class SweepPhase(str, enum.Enum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class TrialPhase(str, enum.Enum):
    """A trial's phase; Pending means its LoRAJob is not created yet."""

    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    EARLY_STOPPED = "EarlyStopped"

    @property
    def finished(self) -> bool:
        return self in (TrialPhase.SUCCEEDED, TrialPhase.FAILED, TrialPhase.EARLY_STOPPED)


# --------------------------------------------------------------------------- search space


def _one_of_values_or_range(values: list[Any] | None, low: Any, high: Any) -> None:
    """Shared by the numeric ranges: exactly one of `values` or `min`+`max`, min < max."""
    if values is not None and (low is not None or high is not None):
        raise ValueError("set either values or min and max, not both")
    if values is None and (low is None or high is None):
        raise ValueError("set values, or both min and max")
    if low is not None and high is not None and low >= high:
        raise ValueError(f"min must be below max (got min={low}, max={high})")


RANGE_RULES = [
    cel("has(self.values) != (has(self.min) || has(self.max))",
        "set either values or min and max, not both"),
    cel("has(self.values) || (has(self.min) && has(self.max))", "set values, or both min and max"),
    cel("!(has(self.min) && has(self.max)) || self.min < self.max", "min must be below max",
        field_path=".min"),
]


class RankRange(ApiModel):
    """Values of lora.r: a list (grid or random choice) or an integer range (random only)."""

    values: list[Annotated[int, Field(ge=1, le=1024)]] | None = Field(
        default=None, min_length=1, max_length=32, description="Ranks to try, in this order.")
    min: int | None = Field(default=None, ge=1, le=1024,
                            description="Smallest rank a random draw may pick.")
    max: int | None = Field(default=None, ge=1, le=1024,
                            description="Largest rank a random draw may pick.")

    @model_validator(mode="after")
    def _shape(self) -> RankRange:
        _one_of_values_or_range(self.values, self.min, self.max)
        return self


class FloatRange(ApiModel):
    """Values of a real parameter: a list, or a range drawn on a linear or log scale."""

    values: list[Annotated[float, Field(gt=0.0, le=4096.0)]] | None = Field(
        default=None, min_length=1, max_length=32, description="Values to try, in this order.")
    min: float | None = Field(default=None, gt=0.0, le=4096.0,
                              description="Lower bound of a random draw.")
    max: float | None = Field(default=None, gt=0.0, le=4096.0,
                              description="Upper bound of a random draw.")
    scale: Scale = Field(default=Scale.LINEAR, strict=False, description=(
        "How a random draw spreads over [min, max]: linear, or log (the usual choice for "
        "learning rates)."))

    @model_validator(mode="after")
    def _shape(self) -> FloatRange:
        _one_of_values_or_range(self.values, self.min, self.max)
        return self


ModuleList = Annotated[list[Annotated[str, Field(pattern=api.TARGET_MODULE_PATTERN, max_length=128)]],
                       Field(min_length=1, max_length=64)]


class ModulesChoice(ApiModel):
    """Values of lora.targetModules: each value is a whole list, such as [q_proj, v_proj]."""

    values: list[ModuleList] = Field(min_length=1, max_length=16, description=(
        "Target-module lists to try, for example [[q_proj, v_proj], [all-linear]]."))


class MethodChoice(ApiModel):
    """Values of method."""

    values: list[Literal["lora", "qlora"]] = Field(min_length=1, max_length=2,
                                                   description="Methods to try: lora, qlora.")


class LoraSpace(ApiModel):
    """Search over the adapter's shape."""

    r: RankRange | None = Field(default=None, description="LoRA rank (lora.r).")
    alpha: FloatRange | None = Field(default=None, description="LoRA alpha (lora.alpha).")
    target_modules: ModulesChoice | None = Field(
        default=None, description="Modules that get adapters (lora.targetModules).")


class TrainingSpace(ApiModel):
    """Search over the optimisation."""

    learning_rate: FloatRange | None = Field(
        default=None, description="Peak learning rate (training.learningRate), at most 1.")

    @model_validator(mode="after")
    def _learning_rate_at_most_one(self) -> TrainingSpace:
        lr = self.learning_rate
        if lr is not None and any(v > 1.0 for v in (lr.values or []) + [lr.max or 0.0]):
            raise ValueError("learningRate: values and max must be at most 1")
        return self


TRAINING_SPACE_RULES = [
    cel("!has(self.learningRate) || ((!has(self.learningRate.values) || "
        "self.learningRate.values.all(v, v <= 1.0)) && (!has(self.learningRate.max) || "
        "self.learningRate.max <= 1.0))",
        "learningRate: values and max must be at most 1", field_path=".learningRate"),
]


class SearchSpace(ApiModel):
    """The parameters to vary; every other field comes from the template unchanged."""

    lora: LoraSpace = Field(default_factory=LoraSpace, description="lora.r, lora.alpha, lora.targetModules.")
    training: TrainingSpace = Field(default_factory=TrainingSpace,
                                    description="training.learningRate.")
    method: MethodChoice | None = Field(default=None, description="method: lora or qlora.")

    def dimensions(self) -> dict[str, FloatRange | RankRange | ModulesChoice | MethodChoice]:
        """The set parameters by dotted path, in the fixed order of PARAMETERS (the grid's
        order: the last parameter varies fastest)."""
        found = {"lora.r": self.lora.r, "lora.alpha": self.lora.alpha,
                 "training.learningRate": self.training.learning_rate,
                 "lora.targetModules": self.lora.target_modules, "method": self.method}
        return {k: v for k, v in found.items() if v is not None}

    @model_validator(mode="after")
    def _not_empty(self) -> SearchSpace:
        if not self.dimensions():
            raise ValueError("searchSpace: set at least one of lora.r, lora.alpha, "
                             "lora.targetModules, training.learningRate, method")
        return self


SEARCH_SPACE_RULES = [
    cel("(has(self.lora) && (has(self.lora.r) || has(self.lora.alpha) || "
        "has(self.lora.targetModules))) || (has(self.training) && "
        "has(self.training.learningRate)) || has(self.method)",
        "set at least one of lora.r, lora.alpha, lora.targetModules, training.learningRate, "
        "method"),
]


# --------------------------------------------------------------------------- spec parts


class AlgorithmSpec(ApiModel):
    """How trials are chosen from the search space."""

    type: Algorithm = Field(default=Algorithm.GRID, strict=False, description=(
        "grid: every combination of the listed values, in order; random: maxTrials "
        "independent draws (values lists are sampled uniformly, ranges as their scale says)."))
    max_trials: int | None = Field(default=None, ge=1, le=MAX_TRIALS, description=(
        f"Trials to run: required for random; for grid, the first maxTrials combinations "
        f"(default all). At most {MAX_TRIALS}."))
    seed: int = Field(default=0, ge=0, le=2**31 - 1, description=(
        "Seed of the random draws: the same seed gives the same trials."))

    @model_validator(mode="after")
    def _random_needs_max(self) -> AlgorithmSpec:
        if self.type == Algorithm.RANDOM and self.max_trials is None:
            raise ValueError("maxTrials: required when type is random")
        return self


ALGORITHM_RULES = [
    cel("!has(self.type) || self.type != 'random' || has(self.maxTrials)",
        "maxTrials is required when type is random", field_path=".maxTrials"),
]


class ObjectiveSpec(ApiModel):
    """What 'best' means: the adapter's held-out loss, lowest wins."""

    metric: Literal["adapterEvalLoss"] = Field(default="adapterEvalLoss", description=(
        "The trial's status.result.adapterEvalLoss (the adapter's loss on the validation split)."))
    goal: Literal["minimize"] = Field(default="minimize", description="Lower is better.")


class EarlyStoppingSpec(ApiModel):
    """The median stopping rule, on the live validation loss of running trials."""

    rule: Literal["median"] = Field(default="median", description=(
        "median: stop a running trial whose validation loss at step s is worse than the "
        "median of the other trials' validation loss at the same step."))
    min_trials: int = Field(default=2, ge=1, le=MAX_TRIALS, description=(
        "Other trials that must have reached step s before the rule may stop anyone."))
    start_step: int = Field(default=0, ge=0, le=10_000_000, description=(
        "No trial is stopped before this optimizer step."))


class TrialTemplateMeta(ApiModel):
    """Labels and annotations every child LoRAJob gets."""

    labels: dict[str, Annotated[str, Field(max_length=63)]] = Field(
        default_factory=dict, description="Labels for each trial's LoRAJob.")
    annotations: dict[str, str] = Field(
        default_factory=dict, description="Annotations for each trial's LoRAJob.")


class TrialTemplate(ApiModel):
    """The LoRAJob each trial runs, before the search space's values are applied."""

    metadata: TrialTemplateMeta = Field(default_factory=TrialTemplateMeta, description=(
        "Labels and annotations for the trials (names are <sweep>-t<N>)."))
    spec: api.LoRAJobSpec = Field(description=(
        "A LoRAJob spec; each trial's output.uri gets the trial's name appended."))


class LoRASweepSpec(ApiModel):
    """What the user wants: a template, the space to search, and how to search it."""

    template: TrialTemplate = Field(description="The LoRAJob every trial starts from.")
    search_space: SearchSpace = Field(description="The parameters to vary and their values.")
    algorithm: AlgorithmSpec = Field(default_factory=AlgorithmSpec,
                                     description="grid or random, with maxTrials and seed.")
    parallelism: int = Field(default=1, ge=1, le=MAX_TRIALS,
                             description="Trials running at the same time (each one a trainer pod).")
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec,
                                     description="How the best trial is chosen.")
    early_stopping: EarlyStoppingSpec | None = Field(default=None, description=(
        "Stop losing trials early (median rule); absent: every trial runs to the end."))

    @model_validator(mode="after")
    def _grid_needs_values(self) -> LoRASweepSpec:
        if self.algorithm.type == Algorithm.GRID:
            ranged = [k for k, v in self.search_space.dimensions().items()
                      if isinstance(v, RankRange | FloatRange) and v.values is None]
            if ranged:
                raise ValueError(f"searchSpace: grid needs values lists, not min/max ranges "
                                 f"({', '.join(ranged)}); use algorithm.type random for ranges")
        return self


def _grid_rule() -> dict[str, Any]:
    """CEL twin of `_grid_needs_values`: with grid, every numeric parameter lists values."""
    ranged = " || ".join(
        f"(has(self.searchSpace.{group}) && has(self.searchSpace.{group}.{name}) && "
        f"!has(self.searchSpace.{group}.{name}.values))"
        for group, name in (("lora", "r"), ("lora", "alpha"), ("training", "learningRate")))
    return cel(f"(has(self.algorithm) && has(self.algorithm.type) && "
               f"self.algorithm.type == 'random') || !({ranged})",
               "grid needs values lists, not min/max ranges; use algorithm.type random for ranges",
               field_path=".searchSpace")


SWEEP_SPEC_RULES = [_grid_rule()]
# Changing these mid-sweep would renumber the trials; parallelism and earlyStopping stay editable.
IMMUTABLE_SPEC_FIELDS = ["template", "searchSpace", "algorithm", "objective"]


# --------------------------------------------------------------------------- status


class EvalPoint(ApiModel):
    step: int = Field(description="Optimizer step at which the loss was seen.")
    eval_loss: float = Field(description="Validation loss at that step.")


class TrialStatus(ApiModel):
    """One trial as the sweep last saw it (kept after its LoRAJob is gone)."""

    name: str = Field(description="The trial's LoRAJob.")
    index: int = Field(description="Trial number N in <sweep>-t<N>.")
    params: FreeObject = Field(default_factory=dict,
                               description="The parameter values of this trial, by dotted path.")
    phase: TrialPhase = Field(default=TrialPhase.PENDING, strict=False, description="Trial phase.")
    step: int | None = Field(default=None, description="Latest optimizer step seen.")
    eval_loss: float | None = Field(default=None, description="Latest live validation loss.")
    adapter_eval_loss: float | None = Field(default=None,
                                            description="Final held-out loss of the adapter.")
    adapter_uri: str | None = Field(default=None, description="Where the adapter is.")
    message: str | None = Field(default=None, description="Why it ended, when it did not succeed.")
    history: list[EvalPoint] = Field(default_factory=list, description=(
        f"Validation loss by step as the sweep saw it (last {MAX_HISTORY}), for the median rule."))


class BestTrial(ApiModel):
    name: str = Field(description="The winning trial's LoRAJob.")
    params: FreeObject = Field(default_factory=dict, description="Its parameter values.")
    adapter_eval_loss: float = Field(description="Its adapter's held-out loss.")
    adapter_uri: str | None = Field(default=None, description="Where its adapter is.")


class LoRASweepStatus(ApiModel):
    """What the controller saw."""

    phase: SweepPhase | None = Field(default=None, strict=False, description="Sweep phase.")
    conditions: list[api.Condition] = Field(default_factory=list, description="Current conditions.")
    observed_generation: int | None = Field(default=None, description="Spec generation last acted on.")
    trial_progress: str | None = Field(default=None, description="Finished trials / all trials.")
    trials_total: int | None = Field(default=None, description="Trials in this sweep.")
    trials_succeeded: int | None = Field(default=None, description="Trials that succeeded.")
    trials_failed: int | None = Field(default=None, description="Trials that failed.")
    trials_early_stopped: int | None = Field(default=None, description="Trials stopped early.")
    trials_running: int | None = Field(default=None, description="Trials running now.")
    trials: list[TrialStatus] = Field(default_factory=list, description="Every trial, in order.")
    best_trial: BestTrial | None = Field(default=None,
                                         description="The trial with the lowest adapterEvalLoss.")
    start_time: str | None = Field(default=None, description="When the sweep started.")
    completion_time: str | None = Field(default=None, description="When the sweep finished.")
    message: str | None = Field(default=None, description="Latest human-readable summary.")


class LoRASweep(ApiModel):
    """A hyperparameter search: child LoRAJobs from a template and a search space."""

    model_config = ConfigDict(title="LoRASweep")

    api_version: Literal["lorajob.dev/v1alpha1"] = "lorajob.dev/v1alpha1"
    kind: Literal["LoRASweep"] = "LoRASweep"
    metadata: api.ObjectMeta = Field(default_factory=api.ObjectMeta)
    spec: LoRASweepSpec
    status: LoRASweepStatus | None = None


ROOT_RULES = [
    cel(f"self.metadata.name.size() <= {MAX_NAME_LENGTH}",
        f"metadata.name must be at most {MAX_NAME_LENGTH} characters, so that every trial's "
        f"LoRAJob (<name>-t<N>) fits the LoRAJob name limit of {LORAJOB_MAX_NAME_LENGTH}",
        reason="FieldValueInvalid"),
]
MODEL_RULES: dict[type[BaseModel], list[dict[str, Any]]] = {
    RankRange: RANGE_RULES,
    FloatRange: RANGE_RULES,
    TrainingSpace: TRAINING_SPACE_RULES,
    SearchSpace: SEARCH_SPACE_RULES,
    AlgorithmSpec: ALGORITHM_RULES,
    LoRASweepSpec: SWEEP_SPEC_RULES,
}


def parse_sweep_spec(spec: dict[str, Any]) -> LoRASweepSpec:
    """Validate a sweep's spec, raising api.SpecError naming every bad field (`spec.…`)."""
    try:
        return LoRASweepSpec.model_validate(spec)
    except ValidationError as exc:
        raise api.SpecError(api.errors_of(exc, ("spec",))) from None


def parse_sweep(obj: dict[str, Any]) -> LoRASweep:
    """Validate a whole LoRASweep manifest."""
    try:
        return LoRASweep.model_validate(obj)
    except ValidationError as exc:
        raise api.SpecError(api.errors_of(exc)) from None
