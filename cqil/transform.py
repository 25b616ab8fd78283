"""The CQIL transform of a model, in one process: the layers of each group read the same input, their deltas are summed.

    apply_plan(model, Plan.parse("S18-E28-P2-D0"))   # in place; weights are not copied
    apply_plan(model, Prune((17, 19, 20)))           # the pruning baseline: those layers left out
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
A pruned layer hands its input through too, and its cache slot stays empty; transformers reads the cache
length from the first layer of each attention type, so those layers cannot be pruned (`check_prune`).
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch

from .errors import PlanError
from .layers import decoder_layers, layer_types
from .plan import Plan, Prune, parse_plan


def attention(layer, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    """A_k: the attention output of decoder layer k on the group input (B, T, C)."""
    return layer.self_attn(hidden_states=layer.input_layernorm(hidden_states), **kwargs)[0]


def delta(layer, hidden_states: torch.Tensor, attn: torch.Tensor, bypassed, official: bool) -> torch.Tensor:
    """delta_k = A_k + MLP_k(norm(x + A_k + B_k)), B_k the bypassed attention outputs (Sec. 3.3).

    `bypassed` is 0 where there is no B_k (D = 0, the group's first layer). The official code also
    adds B_k to the residual (`official=True`: its LLaMA modeling file adds in place to a tensor that is
    also the residual).
    """
    bypassing = torch.is_tensor(bypassed)  # adding a literal 0 would still copy the (B, T, C) tensor
    mixed = hidden_states + attn + bypassed if bypassing else hidden_states + attn
    mlp = mlp_delta(layer, mixed)
    return attn + mlp + bypassed if official and bypassing else attn + mlp


def mlp_delta(layer, mixed: torch.Tensor) -> torch.Tensor:
    """MLP_k(norm(h)): layer k's MLP on the residual stream `mixed` (B, T, C)."""
    return layer.mlp(layer.post_attention_layernorm(mixed))


def lp_forward(members, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    """One LP group: h = x + sum_k A_k(x), then y = h + sum_k MLP_k(norm_k(h)); every MLP sees every attention."""
    mixed = hidden_states + sum(attention(layer, hidden_states, **kwargs) for layer in members)
    return mixed + sum(mlp_delta(layer, mixed) for layer in members)


def group_forward(members, bypass: int, mode: str, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    """One group: `hidden + sum_k delta_k(hidden)`; `hidden_states` (B, T, C) is the group's input.

    B_k is the sum of the `bypass` (D) previous attention outputs of the group (0 for D = 0); the LP mode
    mixes all of them (`lp_forward`). `runtime/cqil.py` computes the same sums with one layer per rank.
    """
    if mode == "lp":
        return lp_forward(members, hidden_states, **kwargs)
    official = mode == "official"
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


def prunable_layers(config) -> list[int]:
    """The layers a Prune may remove: all but the first of each attention type, whose KV cache slot transformers
    reads for the cache length (positions, masks); a pruned layer leaves its slot empty."""
    types = layer_types(config)
    return [i for i in range(len(types)) if i != types.index(types[i])]


def check_prune(config, prune: Prune) -> None:
    """A one-line error if `prune` removes a layer that must stay (`prunable_layers`)."""
    types, allowed = layer_types(config), prunable_layers(config)
    if kept := [i for i in prune.removed if i < len(types) and i not in allowed]:
        raise PlanError(
            f"prune {prune}: layer {kept[0]} is the first {types[kept[0]]} layer, whose KV cache slot transformers "
            f"reads for the cache length; it cannot be removed"
        )


def apply_plan(model, plan: Plan | Prune | None):
    """Make `model` compute `plan` in place (None restores the original); returns the model.

    The plan is stored in `model.config.cqil_plan`, so `save_pretrained` keeps it and
    `load_model` restores it.
    """
    remove_plan(model)
    if plan is None:
        return model
    layers = decoder_layers(model)
    plan.validate(len(layers))
    if isinstance(plan, Plan):
        check_layer_types(model.config, plan)
    for i, layer in enumerate(layers):
        if "forward" in layer.__dict__:  # e.g. accelerate's device_map / offload hooks live there
            raise PlanError(
                f"plan {plan}: layer {i} already has its forward replaced (accelerate hooks?); "
                f"apply the plan to a model loaded without device_map offloading"
            )
    # An instance attribute shadows the class's forward; nn.Module.__call__ (hooks) is unchanged.
    if isinstance(plan, Prune):
        check_prune(model.config, plan)
        for i in plan.removed:
            layers[i].forward = pass_through
    # A group of one layer is that layer: with P=1 every layer keeps its own forward, bit for bit.
    for group in plan.groups() if isinstance(plan, Plan) and plan.size > 1 else ():
        members = [layers[i] for i in group]
        members[0].forward = partial(group_forward, members, plan.bypass, plan.bypass_mode)
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
def planned(model, plan: Plan | Prune | None):
    """Run a block with `plan` applied (None: the original model), then restore the model's own plan."""
    before = stored_plan(model.config)
    apply_plan(model, plan)
    try:
        yield model
    finally:
        apply_plan(model, before)


def stored_plan(config) -> Plan | Prune | None:
    """The plan recorded in a model config by `apply_plan`, if any."""
    name = getattr(config, "cqil_plan", None)
    return parse_plan(name) if name else None
