"""The trainer config round-trips into contract.TrainerConfig, through the annotation of
the Job's pod template that the trainer reads as a file (downwardAPI volume)."""

from __future__ import annotations

import yaml

from lora_operator import api, contract
from lora_operator.build import job, names, trainer_config
from lora_operator.settings import load_settings

OWNER = names.Owner(name="bot", namespace="ml", uid="u-1")
SPEC = api.parse_spec({"baseModel": {"uri": "hf://Qwen/Qwen2.5-7B"},
                       "dataset": {"uri": "s3://data/train.jsonl"},
                       "output": {"uri": "s3://adapters/bot/"}})
PLACEMENT = api.Placement(method="lora", vram_class="l4-24gb", gpus=1, deepspeed="none",
                          estimated_vram_gib=17.5)


def test_rendered_config_is_a_valid_trainer_config() -> None:
    cfg = trainer_config.trainer_config(OWNER, SPEC, PLACEMENT, 2, load_settings())
    data = yaml.safe_load(trainer_config.render(cfg))
    back = contract.TrainerConfig.model_validate(data)
    assert back == cfg
    assert back.job == contract.JobIdentity(name="bot", namespace="ml", uid="u-1", attempt=2)
    assert back.placement.vram_class == "l4-24gb"
    # The region a job leaves out is the operator's s3Region, resolved for the trainer.
    assert back.spec.output.region == load_settings().s3_region
    assert back.spec == SPEC.model_copy(update={"output": SPEC.output.model_copy(
        update={"region": load_settings().s3_region})})
    assert back.checkpoint_uri == "s3://adapters/bot/.checkpoints/u-1/"
    assert "baseModel" in data["spec"]  # camelCase on the wire, like the manifest


def test_each_attempts_job_carries_its_own_config() -> None:
    """The config is an annotation of the attempt's pod template (no ConfigMap shared by
    the attempts), so a retry one class up runs with its own placement."""
    settings = load_settings()
    bigger = PLACEMENT.model_copy(update={"vram_class": "a100-40gb"})
    configs = {}
    for attempt, placement in ((1, PLACEMENT), (2, bigger)):
        inputs = job.JobInputs(attempt=attempt, placement=placement,
                               vram_class=settings.vram_class(placement.vram_class or ""),
                               spec_hash="abc")
        built = job.build_job(OWNER, SPEC, inputs, settings)
        text = built["spec"]["template"]["metadata"]["annotations"][names.CONFIG_ANNOTATION]
        configs[attempt] = contract.TrainerConfig.model_validate(yaml.safe_load(text))
        assert configs[attempt] == trainer_config.trainer_config(OWNER, SPEC, placement, attempt,
                                                                 settings)
    assert (configs[1].job.attempt, configs[1].placement.vram_class) == (1, "l4-24gb")
    assert (configs[2].job.attempt, configs[2].placement.vram_class) == (2, "a100-40gb")
