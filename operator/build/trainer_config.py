"""The trainer's configuration: spec + resolved placement + job identity, as YAML.

The trainer never re-plans: it reads what the operator decided (method, class, GPUs,
DeepSpeed stage) from this file, so the two cannot disagree. The text travels in an
annotation of the Job's pod template and reaches the pod's disk through a downwardAPI
volume (`job.volumes`): each attempt's Job carries its own placement, and no ConfigMap
(one more object, one more write per job) is needed.
"""

from __future__ import annotations

from typing import Any

import yaml

from lora_operator import api, contract
from lora_operator.build import names
from lora_operator.plan import policy
from lora_operator.settings import Settings


def trainer_config(owner: names.Owner, spec: api.LoRAJobSpec, placement: api.Placement,
                   attempt: int, settings: Settings) -> contract.TrainerConfig:
    """The typed config the trainer pod of `attempt` runs with."""
    return contract.TrainerConfig(
        job=contract.JobIdentity(name=owner.name, namespace=owner.namespace, uid=owner.uid,
                                 attempt=attempt),
        # The region resolved here: the trainer needs the operator's s3Region, not a guess.
        spec=spec.model_copy(update={"output": spec.output.model_copy(
            update={"region": spec.output.region or settings.s3_region})}),
        placement=placement,
        checkpoint_uri=contract.checkpoint_uri_for(spec.output.uri, owner.uid),
        allowed_output_prefixes=policy.allowed_prefixes(owner.namespace, settings),
    )


# libyaml's emitter (PyYAML's wheels ship it): the pure-Python one was a visible share of
# the operator's CPU per job in bursts. Same output; the Python one only where libyaml is
# missing (a PyYAML built from source without it).
_DUMPER: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def render(config: contract.TrainerConfig) -> str:
    """YAML with camelCase keys, the same shape as a LoRAJob manifest's fields."""
    data = config.model_dump(by_alias=True, exclude_none=True, mode="json")
    return yaml.dump(data, Dumper=_DUMPER, sort_keys=False, allow_unicode=False)
