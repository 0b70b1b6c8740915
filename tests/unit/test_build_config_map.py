"""The trainer config ConfigMap round-trips into contract.TrainerConfig."""

from __future__ import annotations

import yaml

from lora_operator import api, contract
from lora_operator.build import config_map, names
from lora_operator.settings import load_settings

OWNER = names.Owner(name="bot", namespace="ml", uid="u-1")
SPEC = api.parse_spec({"baseModel": {"uri": "hf://Qwen/Qwen2.5-7B"},
                       "dataset": {"uri": "s3://data/train.jsonl"},
                       "output": {"uri": "s3://adapters/bot/"}})
PLACEMENT = api.Placement(method="lora", vram_class="l4-24gb", gpus=1, deepspeed="none",
                          estimated_vram_gib=17.5)


def test_config_map_holds_a_valid_trainer_config() -> None:
    cfg = config_map.trainer_config(OWNER, SPEC, PLACEMENT, 2, load_settings())
    cm = config_map.config_map(OWNER, cfg)
    assert cm["metadata"]["name"] == "bot-trainer"
    assert cm["metadata"]["labels"]["lorajob.dev/attempt"] == "2"
    data = yaml.safe_load(cm["data"][contract.CONFIG_KEY])
    back = contract.TrainerConfig.model_validate(data)
    assert back.job == contract.JobIdentity(name="bot", namespace="ml", uid="u-1", attempt=2)
    assert back.placement.vram_class == "l4-24gb"
    # The region a job leaves out is the operator's s3Region, resolved for the trainer.
    assert back.spec.output.region == load_settings().s3_region
    assert back.spec == SPEC.model_copy(update={"output": SPEC.output.model_copy(
        update={"region": load_settings().s3_region})})
    assert back.checkpoint_uri == "s3://adapters/bot/.checkpoints/u-1/"
    assert "baseModel" in data["spec"]  # camelCase on the wire, like the manifest
