"""The CQIL transform of a model, in one process: the layers of each group read the same input, their deltas are summed.

    apply_plan(model, Plan.parse("S18-E28-P2-D0"))   # in place; weights are not copied
    remove_plan(model)                               # the original forward again

This is the arithmetic of P ranks run one after another: the reference that the concurrent engine
(`runtime/cqil.py`, one layer of each group per rank) is checked against, and the model that the
search, fine-tuning and evaluation use.
How it plugs into a transformers model without forking its modeling file: the model's own decoder
loop still calls every layer in order, with that layer's mask, rotary embedding and cache slot. The
first layer of a group computes the whole group from the shared input; the other layers of the
group hand their input through untouched. Nothing moves, so the state dict keys, peft's LoRA
targets and `save_pretrained` are those of the original model, and each layer keeps its own
`layer_idx`, so the KV cache holds one entry per layer and `generate()` works with the cache.
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch

from .errors import PlanError
from .layers import decoder_layers
from .plan import Plan


def attention(layer, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    """A_k: the attention output of decoder layer k on the group input (B, T, C)."""
    return layer.self_attn(hidden_states=layer.input_layernorm(hidden_states), **kwargs)[0]


def delta(layer, hidden_states: torch.Tensor, attn: torch.Tensor, bypassed, official: bool) -> torch.Tensor:
    """delta_k = A_k + MLP_k(norm(x + A_k + B_k)), B_k the bypassed attention outputs (Sec. 3.3).

    `bypassed` is 0 where there is no B_k (D = 0, the group's first layer). The official code also
    adds B_k to the residual (`official=True`, see PAPER.md).
    """
    bypassing = torch.is_tensor(bypassed)  # adding a literal 0 would still copy the (B, T, C) tensor
    mixed = hidden_states + attn + bypassed if bypassing else hidden_states + attn
    mlp = layer.mlp(layer.post_attention_layernorm(mixed))
    return attn + mlp + bypassed if official and bypassing else attn + mlp


def group_forward(members, bypass: int, official: bool, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    """One group: `hidden + sum_k delta_k(hidden)`; `hidden_states` (B, T, C) is the group's input.

    B_k is the sum of the `bypass` (D) previous attention outputs of the group (0 for D = 0).
    `runtime/cqil.py` computes the same sum with one layer per rank.
    """
    attn_outputs = []  # A_0 .. A_{k-1}, each (B, T, C)
    total = torch.zeros_like(hidden_states)
    for layer in members:
        attn = attention(layer, hidden_states, **kwargs)
        bypassed = sum(attn_outputs[-bypass:]) if bypass else 0  # sum([]) = 0 for the first layer
        total = total + delta(layer, hidden_states, attn, bypassed, official)
        attn_outputs.append(attn)
    return hidden_states + total


def pass_through(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A grouped layer after the first: its work was done by the group, so the input goes on unchanged."""
    return hidden_states


def check_layer_types(config, plan: Plan) -> None:
    """All layers of a group get the first layer's attention mask, so they must share its type."""
    types = getattr(config, "layer_types", None)
    for group in plan.groups() if types else ():
        if len({types[i] for i in group}) > 1:
            raise PlanError(
                f"plan {plan}: group {group.start}-{group.stop - 1} mixes attention types "
                f"{sorted({types[i] for i in group})}; choose groups within one type"
            )


def apply_plan(model, plan: Plan | None):
    """Make `model` compute `plan` in place (None restores the original); returns the model.

    The plan is stored in `model.config.cqil_plan`, so `save_pretrained` keeps it and
    `load_model` restores it.
    """
    remove_plan(model)
    if plan is None:
        return model
    layers = decoder_layers(model)
    plan.validate(len(layers))
    check_layer_types(model.config, plan)
    for i, layer in enumerate(layers):
        if "forward" in layer.__dict__:  # e.g. accelerate's device_map / offload hooks live there
            raise PlanError(
                f"plan {plan}: layer {i} already has its forward replaced (accelerate hooks?); "
                f"apply the plan to a model loaded without device_map offloading"
            )
    # A group of one layer is that layer: with P=1 every layer keeps its own forward, bit for bit.
    for group in plan.groups() if plan.size > 1 else ():
        members = [layers[i] for i in group]
        # An instance attribute shadows the class's forward; nn.Module.__call__ (hooks) is unchanged.
        members[0].forward = partial(group_forward, members, plan.bypass, plan.bypass_mode == "official")
        for layer in members[1:]:
            layer.forward = pass_through
    model.config.cqil_plan = str(plan)
    return model


def _ours(forward) -> bool:
    return forward is pass_through or (isinstance(forward, partial) and forward.func is group_forward)


def remove_plan(model):
    """Give every decoder layer its own forward back; returns the model."""
    for layer in decoder_layers(model):
        if _ours(layer.__dict__.get("forward")):
            del layer.forward
    model.config.__dict__.pop("cqil_plan", None)
    return model


@contextlib.contextmanager
def planned(model, plan: Plan | None):
    """Run a block with `plan` applied (None: the original model), then restore the model's own plan."""
    before = stored_plan(model.config)
    apply_plan(model, plan)
    try:
        yield model
    finally:
        apply_plan(model, before)


def stored_plan(config) -> Plan | None:
    """The plan recorded in a model config by `apply_plan`, if any."""
    name = getattr(config, "cqil_plan", None)
    return Plan.parse(name) if name else None
