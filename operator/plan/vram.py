"""Peak GPU memory of one LoRA/QLoRA training step, from the model's shape and the job's spec.

Pure arithmetic: no torch, no I/O, so the operator (which must not need torch) can size a job
before any pod exists, and a unit test can check every term.

What the number means. `Estimate.total_gib` is the peak memory *one GPU's process* holds:
the tensors PyTorch allocates at the worst moment of a step, plus the CUDA context and an
allocator fragmentation term, i.e. what `nvidia-smi` shows for the process. It does *not*
include `Settings.safety_margin`: placement applies that to the class's capacity
(`memory × (1 − margin)`), so one margin is set in one place, by the cluster admin.

Where the peak is. A step's memory is static (weights, adapter and optimizer state, context)
plus dynamic (activations, logits). With gradient checkpointing the peak comes at the start
of backward: every layer's saved input is alive and the loss's logits have just been
materialised; the per-layer recompute happens later, after the logits are freed, so the two
transients do not add up and the larger one counts. Without checkpointing every layer's
activations are alive when the logits are made, so they add.

Every constant is in the block below, with where it comes from. `bench/vram_accuracy.py`
measures real steps on a GPU and compares them with this module; tune the constants there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from lora_operator.api import DeepSpeed, LoRAJobSpec, ModelShape, Precision

GIB = 1024**3

# --------------------------------------------------------------------------- constants

# Weights. bf16/fp16 store 2 bytes per parameter, fp32 4 (PyTorch dtype sizes).
BYTES_16BIT = 2.0
BYTES_FP32 = 4.0
# NF4 (QLoRA paper, Dettmers et al. 2023, §3): 4 bits per quantized weight ...
NF4_BYTES_PER_PARAM = 0.5
# ... plus quantization constants: one fp32 absmax per 64 weights = 0.5 bit/param; with
# double quantization (8-bit constants, fp32 second-level per 256) 0.127 bit/param (paper §3).
NF4_CONSTANTS_BITS_SINGLE = 0.5
NF4_CONSTANTS_BITS_DOUBLE = 0.127
# The trainer loads QLoRA with bnb_4bit_use_double_quant=True (as every PEFT/TRL recipe does).
NF4_DOUBLE_QUANT = True

# Adapter state per trainable parameter: fp32 weight 4 + fp32 grad 4 + Adam m 4 + Adam v 4
# (PEFT keeps adapters in fp32, `autocast_adapter_dtype=True`), plus 2 for the bf16 copy
# torch.autocast caches for each fp32 weight during the forward pass.
LORA_STATE_BYTES = 16.0
AUTOCAST_COPY_BYTES = 2.0

# Logits and loss, per logit element (tokens × vocab), unchunked, as transformers computes
# it: bf16 logits 2 (kept in the model output) + fp32 upcast 4 (`logits.float()` in
# ForCausalLMLoss) + fp32 log-softmax saved for backward 4 + fp32 gradient of it in
# backward 4 + bf16 gradient 2 → ~16 (DESIGN §3 "~16 B unless the loss is chunked").
LOGIT_BYTES_UNCHUNKED = 16.0
# Chunked loss (torchtune CEWithChunkedOutputLoss, Liger/TRL chunked NLL): bf16 logits 2 and
# the fp32 log-softmax 4 of every chunk stay saved; the rest is live for one chunk at a time.
LOGIT_BYTES_CHUNKED_SAVED = 6.0

# Activations per token per decoder layer, in units of the activation dtype's bytes unless
# said otherwise; derived from the autograd graph of transformers' Llama/Qwen2/Mistral layers
# with sdpa/flash attention (no seq² score matrix; flash keeps only a logsumexp per head):
# - RMSNorm upcasts its input to fp32 and saves it: 4 bytes × hidden, twice per layer.
RMSNORM_SAVED_FP32_BYTES = 4.0
# - each norm's output (the input of q/k/v and of gate/up, saved by the LoRA branches);
# - attention: q and k after RoPE, v, the attention output, and o_proj's (contiguous) input;
# - MLP (SwiGLU): gate out, SiLU out, up out, and their product (down_proj's input).
MLP_SAVED_TENSORS = 4
# - LoRA dropout (p > 0) makes its own copy of each targeted module's input (PEFT applies
#   dropout per module) plus a 1-byte mask per element.
DROPOUT_MASK_BYTES = 1.0
# With gradient checkpointing each layer keeps only its input (one hidden-size tensor); in
# backward one layer is recomputed and its gradients live beside it: the recomputed layer's
# activations × this factor (1 for the activations, 0.5 for the largest gradients alive).
LAYER_BACKWARD_FACTOR = 1.5
# A few hidden-size tensors outside the layers: embedding output, final norm in/out, the
# residual-stream gradient.
RESIDUAL_STREAM_TENSORS = 4
# Mixture of experts: tokens go through top-k experts (Mixtral/Qwen-MoE use k = 2).
MOE_TOP_K = 2

# QLoRA: bitsandbytes dequantizes one quantized weight at a time to the compute dtype for the
# matmul (and again in backward); the largest one is a transient buffer.
DEQUANT_BUFFERS = 1

# DeepSpeed. ZeRO-3 gathers a layer's weights before using it and prefetches the next one:
# two layers' worth of gathered parameters (stage3_prefetch_bucket_size / max_live_parameters
# as HF Trainer's "auto" config sets them). ZeRO-2 keeps reduce + allgather buckets of ~2e8
# elements each (DeepSpeed's documented defaults are 5e8; HF examples use 2e8).
ZERO3_GATHERED_LAYERS = 2
ZERO2_BUCKET_ELEMENTS = 2 * 200_000_000
# NCCL's communicator buffers and streams for data parallel runs (measured ~0.3-0.6 GiB per
# process on 8-GPU nodes with default NCCL_BUFFSIZE).
NCCL_BUFFERS_GIB = 0.5

# CUDA context + cuBLAS/cuDNN workspaces that never appear in torch.cuda.memory_reserved:
# ~0.5 GiB on Ampere/Hopper with CUDA 12 lazy module loading, up to ~1 GiB without it.
CUDA_CONTEXT_GIB = 0.75
# The caching allocator's reserved-but-unallocated share of the memory that churns within a
# step (activations, logits, gathers, optimizer state). Weights are allocated once in large
# blocks and fragment little. PyTorch typically reports reserved/allocated of 1.05-1.15.
FRAGMENTATION_FRACTION = 0.10
# ZeRO-3 gathers and frees whole layers every step, which fragments the cache far more
# (DeepSpeed warns about "pytorch allocator cache flushes" under pressure); doubled there.
FRAGMENTATION_FRACTION_ZERO3 = 0.20

Method = Literal["lora", "qlora"]
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Names other codebases use for the same projections (Phi-3 fuses qkv and gate/up; torchtune
# calls o "output_proj"; Mixtral's experts use w1/w3/w2).
MODULE_ALIASES: Mapping[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "output_proj": ("o_proj",), "out_proj": ("o_proj",), "dense": ("o_proj",),
    "wq": ("q_proj",), "wk": ("k_proj",), "wv": ("v_proj",), "wo": ("o_proj",),
    "w1": ("gate_proj",), "w3": ("up_proj",), "w2": ("down_proj",),
}
# Targetable modules outside the decoder layers (never part of all-linear).
EXTRA_MODULES = ("lm_head", "embed_tokens")


class EstimateError(ValueError):
    """The spec asks for something the estimator cannot size (for example an unknown module)."""


@dataclass(frozen=True)
class TrainerProfile:
    """How the trainer that runs the job holds memory; the default is this project's trainer
    (transformers + PEFT + TRL SFTTrainer). Other values exist to compare with published
    figures from other trainers (torchtune keeps adapters and Adam in bf16, chunks the loss).
    """

    lora_state_bytes: float = LORA_STATE_BYTES + AUTOCAST_COPY_BYTES
    loss_chunks: int = 1
    chunked_saved_logit_bytes: float = LOGIT_BYTES_CHUNKED_SAVED
    # prepare_model_for_kbit_training (TRL calls it for QLoRA without ZeRO-3) upcasts every
    # non-quantized weight (embeddings, lm_head, norms) to fp32.
    qlora_upcast_nonquantized: bool = True
    # Activation offloading to CPU (torchtune's enable_activation_offloading): checkpoints
    # leave the GPU except the layer in flight.
    offload_activations: bool = False


DEFAULT_PROFILE = TrainerProfile()


@dataclass(frozen=True)
class Estimate:
    """Peak memory per GPU (GiB) and what it is made of; the breakdown sums to the total."""

    total_gib: float
    breakdown: Mapping[str, float]

    def describe(self) -> str:
        """`weights 14.96 + lora_params 0.38 + ...` for messages and tables."""
        return " + ".join(f"{k} {v:.2f}" for k, v in self.breakdown.items() if v > 0.0005)


@dataclass(frozen=True)
class Linear:
    """One projection inside a decoder layer: its input and output widths and how many."""

    d_in: int
    d_out: int
    count: int = 1  # experts in an MoE layer


# --------------------------------------------------------------------------- shapes


def head_dim(shape: ModelShape) -> int:
    return shape.head_dim or shape.hidden_size // shape.num_attention_heads


def kv_heads(shape: ModelShape) -> int:
    return shape.num_key_value_heads or shape.num_attention_heads


def layer_linears(shape: ModelShape) -> dict[str, Linear]:
    """Every linear layer in one decoder layer, by its canonical (Llama) name."""
    h, hd = shape.hidden_size, head_dim(shape)
    q_out, kv_out = shape.num_attention_heads * hd, kv_heads(shape) * hd
    experts = shape.num_experts or 1
    out = {
        "q_proj": Linear(h, q_out), "k_proj": Linear(h, kv_out), "v_proj": Linear(h, kv_out),
        "o_proj": Linear(q_out, h),
        "gate_proj": Linear(h, shape.intermediate_size, experts),
        "up_proj": Linear(h, shape.intermediate_size, experts),
        "down_proj": Linear(shape.intermediate_size, h, experts),
    }
    if shape.num_experts:
        out["router"] = Linear(h, shape.num_experts)
    return out


def linear_params(shape: ModelShape) -> int:
    """Parameters in the decoder layers' linear layers (what QLoRA quantizes)."""
    per_layer = sum(lin.d_in * lin.d_out * lin.count for lin in layer_linears(shape).values())
    return per_layer * shape.num_hidden_layers


def other_params(shape: ModelShape) -> int:
    """Embeddings, lm_head (unless tied) and norms: kept in 16 bits even under QLoRA."""
    embed = shape.vocab_size * shape.hidden_size
    head = 0 if shape.tie_word_embeddings else embed
    norms = (2 * shape.num_hidden_layers + 1) * shape.hidden_size
    return embed + head + norms


def total_params(shape: ModelShape) -> int:
    return linear_params(shape) + other_params(shape)


def resolve_targets(shape: ModelShape, names: list[str]) -> list[str]:
    """Canonical module names for `lora.targetModules`; unknown names raise EstimateError."""
    layer = layer_linears(shape)
    if names == ["all-linear"]:
        return [n for n in layer]  # every linear in the layers, router included; not lm_head
    out: list[str] = []
    for raw in names:
        name = raw.rsplit(".", 1)[-1]
        canon = MODULE_ALIASES.get(name, (name,))
        for c in canon:
            if c not in layer and c not in EXTRA_MODULES:
                known = sorted([*layer, *MODULE_ALIASES, *EXTRA_MODULES])
                raise EstimateError(
                    f"spec.lora.targetModules: unknown module {raw!r} for sizing; "
                    f"use all-linear or one of {', '.join(known)}")
            if c not in out:
                out.append(c)
    return out


def lora_param_count(shape: ModelShape, targets: list[str], r: int, *, dora: bool) -> int:
    """r · (d_in + d_out) per targeted matrix; DoRA adds a magnitude vector of d_out."""
    layer = layer_linears(shape)
    total = 0
    for name in targets:
        if name == "lm_head":
            total += r * (shape.hidden_size + shape.vocab_size) + (shape.vocab_size if dora else 0)
            continue
        if name == "embed_tokens":
            total += r * (shape.vocab_size + shape.hidden_size)
            continue
        lin = layer[name]
        per = r * (lin.d_in + lin.d_out) + (lin.d_out if dora else 0)
        total += per * lin.count * shape.num_hidden_layers
    return total


# --------------------------------------------------------------------------- terms


@dataclass(frozen=True)
class _Job:
    """The spec's numbers the estimate needs, resolved once."""

    tokens: int
    act_bytes: float
    weight_bytes: float
    targets: list[str]
    r: int
    dropout: bool
    dora: bool
    checkpointing: bool


def _job(shape: ModelShape, spec: LoRAJobSpec, *, on_cpu: bool) -> _Job:
    precision = spec.training.precision
    fp32 = precision == Precision.FP32 or (precision == Precision.AUTO and on_cpu)
    width = BYTES_FP32 if fp32 else BYTES_16BIT
    return _Job(
        tokens=spec.training.micro_batch_size * spec.training.max_seq_length,
        act_bytes=width, weight_bytes=width,
        targets=resolve_targets(shape, list(spec.lora.target_modules)),
        r=spec.lora.r, dropout=spec.lora.dropout > 0, dora=spec.lora.use_dora,
        checkpointing=spec.training.gradient_checkpointing,
    )


def layer_activation_bytes(shape: ModelShape, job: _Job) -> float:
    """Bytes one decoder layer saves for backward, per token, with checkpointing off."""
    h, b = shape.hidden_size, job.act_bytes
    hd = head_dim(shape)
    q_out, kv_out = shape.num_attention_heads * hd, kv_heads(shape) * hd
    active = MOE_TOP_K if shape.num_experts else 1
    inter = shape.intermediate_size * active
    norms = 2 * (RMSNORM_SAVED_FP32_BYTES * h + b * h)
    attention = b * (3 * q_out + 2 * kv_out + q_out) + 4.0 * shape.num_attention_heads
    mlp = b * MLP_SAVED_TENSORS * inter
    lora = 0.0
    layer = layer_linears(shape)
    for name in job.targets:
        if name in EXTRA_MODULES:
            continue
        lin = layer[name]
        width = active if lin.count > 1 else 1
        if job.dropout:
            lora += (b + DROPOUT_MASK_BYTES) * lin.d_in * width
        lora += b * job.r * width + (b * lin.d_out * width if job.dora else 0.0)
    return norms + attention + mlp + lora


def _logit_bytes(profile: TrainerProfile) -> float:
    if profile.loss_chunks <= 1:
        return LOGIT_BYTES_UNCHUNKED
    rest = max(LOGIT_BYTES_UNCHUNKED - profile.chunked_saved_logit_bytes, 0.0)
    return profile.chunked_saved_logit_bytes + rest / profile.loss_chunks


def _activation_terms(shape: ModelShape, job: _Job,
                      profile: TrainerProfile) -> tuple[float, float]:
    """(activations, logits_loss) in bytes, arranged so that their sum is the peak."""
    t, h, layers = job.tokens, shape.hidden_size, shape.num_hidden_layers
    per_layer = layer_activation_bytes(shape, job) * t
    residual = RESIDUAL_STREAM_TENSORS * job.act_bytes * h * t
    logits = _logit_bytes(profile) * t * shape.vocab_size
    backward = per_layer * LAYER_BACKWARD_FACTOR
    if job.checkpointing:
        kept = 2 if profile.offload_activations else layers  # offload: the layers in flight
        saved = kept * job.act_bytes * h * t + residual
        # The recompute happens after the logits are freed: only its excess over them counts.
        return saved + max(0.0, backward - logits), logits
    if profile.offload_activations:
        return 2 * per_layer + residual + backward, logits
    return layers * per_layer + residual + (backward - per_layer), logits


def _weight_terms(shape: ModelShape, job: _Job, method: Method, deepspeed: str,
                  profile: TrainerProfile) -> tuple[float, float, float]:
    """(weights, quant_constants, dequant_buffer) in bytes, before any ZeRO-3 sharding."""
    linear, other = linear_params(shape), other_params(shape)
    if method == "lora":
        return (linear + other) * job.weight_bytes, 0.0, 0.0
    # Sharded QLoRA (ZeRO-3) skips prepare_model_for_kbit_training: no fp32 upcast there.
    upcast = profile.qlora_upcast_nonquantized and not deepspeed.startswith("zero3")
    other_bytes = BYTES_FP32 if upcast else job.weight_bytes
    bits = NF4_CONSTANTS_BITS_DOUBLE if NF4_DOUBLE_QUANT else NF4_CONSTANTS_BITS_SINGLE
    largest = max(lin.d_in * lin.d_out for lin in layer_linears(shape).values())
    return (linear * NF4_BYTES_PER_PARAM + other * other_bytes, linear * bits / 8,
            DEQUANT_BUFFERS * largest * job.act_bytes)


def _largest_layer_bytes(shape: ModelShape, method: Method, weight_bytes: float) -> float:
    per_param = NF4_BYTES_PER_PARAM if method == "qlora" else weight_bytes
    layer = linear_params(shape) / shape.num_hidden_layers * per_param
    embed = shape.vocab_size * shape.hidden_size * weight_bytes
    return max(layer, embed)


# --------------------------------------------------------------------------- estimate


def estimate(shape: ModelShape, spec: LoRAJobSpec, *, method: Method, gpus: int,
             deepspeed: str, profile: TrainerProfile = DEFAULT_PROFILE,
             on_cpu: bool = False) -> Estimate:
    """Peak memory per GPU of training `spec` on `shape` with this method and parallelism.

    `deepspeed` is a resolved stage (none, zero2, zero3, zero3-offload), never auto. `on_cpu`
    sizes a local CPU run (fp32 for precision auto, no CUDA context). Raises EstimateError
    for target modules the shape does not have.
    """
    if deepspeed == DeepSpeed.AUTO.value:
        raise EstimateError("estimate() needs a resolved deepspeed stage, not auto")
    if gpus < 1:
        raise EstimateError(f"gpus must be at least 1 (got {gpus})")
    job = _job(shape, spec, on_cpu=on_cpu)
    weights, constants, dequant = _weight_terms(shape, job, method, deepspeed, profile)
    n_lora = lora_param_count(shape, job.targets, job.r, dora=job.dora)
    lora = n_lora * profile.lora_state_bytes
    activations, logits = _activation_terms(shape, job, profile)
    if job.dora:  # DoRA builds each targeted weight's norm: one full fp32 weight transient
        largest = max(lin.d_in * lin.d_out for lin in layer_linears(shape).values())
        dequant += largest * BYTES_FP32
    buffers = 0.0
    if deepspeed == "zero2":
        # fp32 master + grads + Adam sharded; the 16-bit working copy stays replicated.
        lora = n_lora * (job.weight_bytes + (profile.lora_state_bytes - job.weight_bytes) / gpus)
        buffers = ZERO2_BUCKET_ELEMENTS * job.weight_bytes
    elif deepspeed in ("zero3", "zero3-offload"):
        gathered = ZERO3_GATHERED_LAYERS * _largest_layer_bytes(shape, method, job.weight_bytes)
        buffers = gathered
        if deepspeed == "zero3":
            weights, constants = weights / gpus, constants / gpus
            lora = lora / gpus
        else:  # params and optimizer state live in CPU memory; only gathered copies on GPU
            weights, constants = 0.0, 0.0
            lora = n_lora * job.weight_bytes
    context = 0.0 if on_cpu else CUDA_CONTEXT_GIB * GIB
    if gpus > 1 and not on_cpu:
        buffers += NCCL_BUFFERS_GIB * GIB
    frag = FRAGMENTATION_FRACTION_ZERO3 if deepspeed.startswith("zero3") else FRAGMENTATION_FRACTION
    fragmentation = frag * (activations + logits + lora + buffers + dequant)
    parts = {
        "weights": weights, "quant_constants": constants, "lora_params": lora,
        "activations": activations, "logits_loss": logits, "dequant_buffer": dequant,
        "deepspeed_buffers": buffers, "cuda_context": context, "fragmentation": fragmentation,
    }
    breakdown = {k: round(v / GIB, 3) for k, v in parts.items()}
    return Estimate(total_gib=round(sum(parts.values()) / GIB, 2), breakdown=breakdown)

