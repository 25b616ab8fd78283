"""Tensor parallelism, the baseline CQIL is compared with: torch's DTensor `parallelize_module`.

    shard(model, degree=2, device_type="cpu")   # on every rank, in place

Megatron-style, as transformers' own `base_model_tp_plan` for LLaMA: q, k, v, gate and up are split
by output columns, o and down by input rows, whose partial outputs are all-reduced: two all-reduces
per layer. Each rank holds 1/degree of every layer's heads and MLP; embedding, norms and the LM head
are replicated. The attention code infers its head count from the shard's width, so the model's
modules run unchanged, KV cache included (each rank caches its own heads).
"""

from __future__ import annotations

from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from ..errors import EngineError
from ..layers import TENSOR_PARALLEL, decoder_layers


def layer_plan() -> dict:
    return {
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(),
    }


def check_degree(config, degree: int) -> None:
    """Refuse a family whose layers this plan cannot split, and a degree that does not split the heads, the
    KV heads and the MLP evenly."""
    if config.model_type not in TENSOR_PARALLEL:
        raise EngineError(
            f"family {config.model_type!r}: tensor parallelism is not supported (its projections are fused "
            f"or normalised across heads); it works for {', '.join(TENSOR_PARALLEL)}"
        )
    heads, kv_heads, width = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    if degree < 1 or heads % degree or kv_heads % degree or width % degree:
        allowed = [d for d in range(1, kv_heads + 1) if not (heads % d or kv_heads % d or width % d)]
        raise EngineError(
            f"tp degree {degree}: the model has {heads} attention heads, {kv_heads} KV heads and "
            f"MLP width {width}; the degree must divide all three (allowed: {', '.join(map(str, allowed))})"
        )


def shard(model, degree: int, device_type: str):
    """Split every decoder layer over `degree` ranks (the process group's world); returns the model. The degree is
    the caller's to check against the model's config (`check_degree`), before any rank starts."""
    mesh = init_device_mesh(device_type, (degree,))
    for layer in decoder_layers(model):
        parallelize_module(layer, mesh, layer_plan())
    return model
