"""The transformers layer API that CQIL relies on, in one place: the decoder stack of a model, run layer by layer.

    layers = decoder_layers(model)                       # model.model.layers, also inside peft
    hidden, kwargs = decoder_inputs(model, input_ids)    # layer 0's input, and each layer's mask and rotary
    hidden = run_layers(model, hidden, kwargs, range(12, 30))
    logits = lm_logits(model, hidden)
    inputs, output, kwargs = layer_inputs(model, input_ids)   # every layer's input: the analysis and the search

Any decoder-only model whose attention layers transformers runs in a list (`model.model.layers`) works:
D = 0 calls each layer as a whole, so per-layer scalings, sandwich norms, post-norms and residual
multipliers are the family's own code. Bypass (D >= 1) and LP split a layer into its attention and MLP
halves, which needs the layer's *layout* (`LAYOUTS`); tensor parallelism needs llama's projection
names (`TENSOR_PARALLEL`). `docs/families.md` is the support matrix, tested.

The analysis and the plan search start the stack in the middle (from a cached layer input), so they call
the layers themselves: `decoder_inputs` records what the model's own forward hands each layer (embedding
scale, masks and rotary embeddings of each layer's attention type), so these functions reproduce the
uncached forward exactly (tests/test_models.py checks logits for equality), a plan applied included.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from transformers.masking_utils import create_causal_mask

from .errors import ModelError


def causal_lm(model):
    """The transformers `*ForCausalLM` of a model, also inside a peft wrapper; refused unless its attention
    layers sit in a list at `model.model.layers`."""
    if hasattr(model, "get_base_model"):  # peft.PeftModel
        model = model.get_base_model()
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not all(hasattr(layer, "self_attn") for layer in layers):
        raise ModelError(
            f"family {model.config.model_type!r} is not supported: CQIL needs a decoder-only model whose "
            f"attention layers transformers runs in a list at model.model.layers"
        )
    return model


def check_config(config) -> None:
    """Refuse, from the config alone, a model transformers does not build as a decoder-only causal LM."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if getattr(config, "is_encoder_decoder", False) or config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelError(
            f"family {config.model_type!r} is not supported: CQIL needs a decoder-only model that transformers "
            f"loads with AutoModelForCausalLM"
        )


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


# --- Layouts: a layer's attention and MLP halves ---------------------------------------------------------
# Every supported layout is a residual stream x -> h = x + A(x) -> y = h + M(h); bypass and LP recombine
# the halves across a group. tests/test_families.py checks layer(x) == x + A(x) + M(x + A(x)) per family.


def attention_input(layer, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    """The attention block's raw output on `hidden_states` (B, T, C), before any post-norm."""
    return layer.self_attn(hidden_states=hidden_states, **kwargs)[0]


@dataclass(frozen=True)
class Layout:
    name: str
    attention: Callable  # (layer, x, **layer kwargs) -> A(x), what the attention adds to the residual
    mlp: Callable  # (layer, h) -> M(h), what the MLP adds to the residual


LAYOUTS = {
    "pre-norm": Layout(  # LLaMA: norms before each block
        "pre-norm",
        lambda layer, x, **kw: attention_input(layer, layer.input_layernorm(x), **kw),
        lambda layer, h: layer.mlp(layer.post_attention_layernorm(h)),
    ),
    "sandwich": Layout(  # Gemma 2 and 3: norms before and after each block
        "sandwich",
        lambda layer, x, **kw: layer.post_attention_layernorm(attention_input(layer, layer.input_layernorm(x), **kw)),
        lambda layer, h: layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h))),
    ),
    "post-norm": Layout(  # OLMo 2: norms after each block only
        "post-norm",
        lambda layer, x, **kw: layer.post_attention_layernorm(attention_input(layer, x, **kw)),
        lambda layer, h: layer.post_feedforward_layernorm(layer.mlp(h)),
    ),
}
PRE_NORM = (
    "llama mistral ministral qwen2 qwen3 gemma smollm3 starcoder2 helium glm seed_oss arcee ernie4_5 nemotron olmo"
)
FAMILY_LAYOUTS = {
    **dict.fromkeys(PRE_NORM.split(), "pre-norm"),
    **dict.fromkeys(["gemma2", "gemma3_text"], "sandwich"),
    **dict.fromkeys(["olmo2", "olmo3", "exaone4"], "post-norm"),
}
# Families whose layers use llama's projection names and per-head norms only, so column/row splits of
# q, k, v, gate, up and o, down are exact (OLMo 2 normalises q and k over all heads; Phi-3 fuses them).
TENSOR_PARALLEL = tuple(
    "llama mistral ministral qwen2 qwen3 gemma gemma2 gemma3_text smollm3 helium seed_oss ernie4_5 olmo exaone4".split()
)


def layout(config, mode: str) -> Layout:
    """The layout of the model's layers, for `mode` (what needs it: bypass, LP); one line if it has none."""
    family = config.model_type
    if family not in FAMILY_LAYOUTS:
        raise ModelError(
            f"family {family!r} has no layer layout for {mode}: it runs CQIL with D = 0 only; "
            f"{mode} works for {', '.join(sorted(FAMILY_LAYOUTS))}"
        )
    return LAYOUTS[FAMILY_LAYOUTS[family]]


# --- Running the decoder layer by layer -------------------------------------------------------------


def layer_types(config) -> list[str]:
    """Attention type of every layer: most families list them; mistral slides everywhere when a window is set."""
    if getattr(config, "layer_types", None):
        return list(config.layer_types)
    sliding = getattr(config, "sliding_window", None) is not None
    return ["sliding_attention" if sliding else "full_attention"] * config.num_hidden_layers


def cache_length_layers(config) -> list[int]:
    """The layers whose KV cache slot transformers reads for the cache length (positions, masks): the first
    of each attention type (layer 0 among them)."""
    types = layer_types(config)
    return sorted({types.index(kind) for kind in types})


@contextlib.contextmanager
def layers_replaced(model, forward):
    """Run a block with every decoder layer's forward replaced by `forward(i, hidden_states, **kwargs)`; the
    layers' own forwards (a plan's included) come back after."""
    layers = decoder_layers(model)
    own = [layer.__dict__.get("forward") for layer in layers]
    for i, layer in enumerate(layers):
        layer.forward = partial(forward, i)
    try:
        yield
    finally:
        for layer, saved in zip(layers, own):
            del layer.forward
            if saved is not None:
                layer.forward = saved


def decoder_inputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """Layer 0's input (B, T, C) and, for each decoder layer, the keyword arguments the model's own forward
    gives it (mask, rotary embeddings, positions), recorded from one forward whose layers are skipped."""
    if attention_mask is None:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    else:  # left padding: positions count real tokens only, as generate() does
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    calls = []

    def record(i, hidden_states, *args, **kwargs):
        if args:
            raise ModelError(f"family {model.config.model_type!r}: its layers take positional arguments")
        calls.append((hidden_states, kwargs))
        return hidden_states

    with layers_replaced(model, record):  # the inner model: no LM head
        inner = causal_lm(model).model
        inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False)
    return calls[0][0], [kwargs for _, kwargs in calls]


def run_layers(model, hidden: torch.Tensor, layer_kwargs: list[dict], layers: range) -> torch.Tensor:
    """Run decoder layers `layers` (in order) on `hidden` (B, T, C): the input of layer layers.start."""
    stack = decoder_layers(model)
    for i in layers:
        hidden = stack[i](hidden, **layer_kwargs[i])
    return hidden


def layer_inputs(model, input_ids: torch.Tensor):
    """The input of every decoder layer (L tensors (B, T, C)), the last layer's output, and the layer kwargs.

    On the model as it is: callers that analyse the original run it inside `planned(model, None)`.
    """
    hidden, kwargs = decoder_inputs(model, input_ids.to(next(model.parameters()).device))
    inputs = []
    for i in range(len(decoder_layers(model))):
        inputs.append(hidden)
        hidden = run_layers(model, hidden, kwargs, range(i, i + 1))
    return inputs, hidden, kwargs


def lm_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) from the last layer's output: the model's own forward from there (final norm, LM head,
    the family's logit scaling or soft-capping), its layers skipped."""

    def last_output(i, hidden_states, **kwargs):
        return hidden if i == 0 else hidden_states

    with layers_replaced(model, last_output):
        return causal_lm(model)(inputs_embeds=hidden, use_cache=False).logits
