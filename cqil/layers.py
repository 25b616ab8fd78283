"""The transformers layer API that CQIL relies on, in one place: the decoder stack of a model, run layer by layer.

    layers = decoder_layers(model)                       # model.model.layers, also inside peft
    hidden, kwargs = decoder_inputs(model, input_ids)    # embeddings, and each layer's mask and rotary
    hidden = run_layers(model, hidden, kwargs, range(12, 30))
    logits = lm_logits(model, hidden)

Supported families keep transformers 5's layer layout: `model.model.layers[i]` with `input_layernorm`,
`self_attn`, `post_attention_layernorm` and `mlp`, a shared rotary embedding and mask functions. The
analysis and the plan search start the stack in the middle (from a cached layer input), so they call
the layers themselves; these functions reproduce the model's own uncached forward exactly
(tests/test_models.py checks logits for equality), a plan applied with `apply_plan` included.
"""

from __future__ import annotations

import inspect

import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .errors import ModelError

FAMILIES = ("llama", "mistral", "qwen2")


def causal_lm(model):
    """The transformers `*ForCausalLM` of a supported model, also inside a peft wrapper."""
    if hasattr(model, "get_base_model"):  # peft.PeftModel
        model = model.get_base_model()
    if model.config.model_type not in FAMILIES:
        raise ModelError(
            f"family {model.config.model_type!r} is not supported; supported families are {', '.join(FAMILIES)}"
        )
    return model


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers, in order."""
    return causal_lm(model).model.layers


# --- The KV cache keyword ------------------------------------------------------------------------------
# transformers 5.24 renamed the keyword that hands a KV cache to a model, a decoder layer or a mask
# function from `past_key_values` to `cache` (the old name still works with a FutureWarning until
# 5.40); model outputs renamed the field too. Every place that passes or reads a cache goes through
# this one name, so the code runs on both sides of the rename without a warning.
CACHE = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def with_cache(cache) -> dict:
    """The keyword argument that hands `cache` (a transformers Cache, or None) to a model, layer or mask."""
    return {CACHE: cache}


# --- Running the decoder layer by layer -------------------------------------------------------------


def layer_types(config) -> list[str]:
    """Attention type of every layer: qwen2 lists them; mistral slides everywhere when a window is set."""
    if getattr(config, "layer_types", None):
        return list(config.layer_types)
    sliding = getattr(config, "sliding_window", None) is not None
    return ["sliding_attention" if sliding else "full_attention"] * config.num_hidden_layers


def decoder_inputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """Token embeddings (B, T, C) and, for each decoder layer, its keyword arguments (mask, rotary)."""
    inner = causal_lm(model).model
    hidden = inner.embed_tokens(input_ids)
    if attention_mask is None:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    else:  # left padding: positions count real tokens only, as generate() does
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    mask_args = dict(
        config=model.config,
        inputs_embeds=hidden,
        attention_mask=attention_mask,
        position_ids=positions,
        **with_cache(None),
    )
    types = layer_types(model.config)
    masks = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
    masks = {kind: masks[kind](**mask_args) for kind in set(types)}
    rotary = inner.rotary_emb(hidden, position_ids=positions)
    return hidden, [
        dict(attention_mask=masks[kind], position_embeddings=rotary, position_ids=positions) for kind in types
    ]


def run_layers(model, hidden: torch.Tensor, layer_kwargs: list[dict], layers: range) -> torch.Tensor:
    """Run decoder layers `layers` (in order) on `hidden` (B, T, C): the input of layer layers.start."""
    stack = decoder_layers(model)
    for i in layers:
        hidden = stack[i](hidden, **layer_kwargs[i])
    return hidden


def lm_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm and LM head on the output of the last layer: (B, T, C) -> (B, T, V)."""
    base = causal_lm(model)
    return base.lm_head(base.model.norm(hidden))
