"""The CQIL transform of a model, in one process: the layers of each group read the same input, their deltas are summed.

    apply_plan(model, Plan.parse("S18-E28-P2-D0"))   # in place; weights are not copied
    apply_plan(model, Prune((17, 19, 20)))           # the pruning baseline: those layers left out
    remove_plan(model)                               # the original forward again

This is the arithmetic of P ranks run one after another: the reference that the concurrent engine
(`runtime/cqil.py`, one layer of each group per rank) is checked against, and the model that the
search, fine-tuning and evaluation use.
How it plugs into a transformers model without forking its modeling file: the model's own decoder
loop still calls every layer in order, with that layer's mask, rotary embedding and cache slot (which
differ between a family's sliding and global layers). The layers of a group before its last record
what they were called with and hand their input, the group's input, on unchanged; the last layer
computes the whole group from that input, each member with its own recorded arguments. Nothing moves,
so the state dict keys, peft's LoRA targets and `save_pretrained` are those of the original model, and
each layer keeps its own `layer_idx`, so the KV cache holds one entry per layer and `generate()` works
with the cache. With D = 0 a member is called as a whole (`Layer_k(x) - x`), so any family works;
bypass and LP need the family's layout (`layers.LAYOUTS`).
A pruned layer hands its input through too, and its cache slot stays empty; transformers reads the cache
length from the first layer of each attention type, so those layers cannot be pruned (`check_prune`).
"""

from __future__ import annotations

import contextlib
import weakref
from functools import partial

import torch

from .errors import ModelError, PlanError
from .layers import Layout, cache_length_layers, decoder_layers, layer_types, layout
from .plan import Plan, Prune, parse_plan


def whole_delta(layer, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    """Layer_k(x) - x: what decoder layer k adds to the residual, its own class's forward on `hidden_states`."""
    return type(layer).forward(layer, hidden_states, **kwargs) - hidden_states


def delta(parts: Layout, layer, hidden_states, attn, bypassed, official: bool) -> torch.Tensor:
    """delta_k = A_k + MLP_k(norm(x + A_k + B_k)), B_k the bypassed attention outputs (Sec. 3.3).

    `bypassed` is 0 where there is no B_k (the group's first layer). The official code also
    adds B_k to the residual (`official=True`: its LLaMA modeling file adds in place to a tensor that is
    also the residual).
    """
    bypassing = torch.is_tensor(bypassed)  # adding a literal 0 would still copy the (B, T, C) tensor
    mixed = hidden_states + attn + bypassed if bypassing else hidden_states + attn
    mlp = parts.mlp(layer, mixed)
    return attn + mlp + bypassed if official and bypassing else attn + mlp


def group_sum(parts: Layout | None, bypass: int, mode: str, calls, hidden_states: torch.Tensor) -> torch.Tensor:
    """One group on its input `hidden_states` (B, T, C): `hidden + sum_k delta_k(hidden)`.

    `calls` holds (layer, its keyword arguments) per member, in order. D = 0 calls each layer whole;
    otherwise B_k is the sum of the `bypass` (D) previous attention outputs of the group, and the LP mode
    gives every MLP every attention output: h = x + sum_k A_k(x), y = h + sum_k MLP_k(h).
    `runtime/cqil.py` computes the same sums with one layer per rank.
    """
    if parts is None:  # D = 0
        return hidden_states + sum(whole_delta(layer, hidden_states, **kw) for layer, kw in calls)
    attn_outputs = [parts.attention(layer, hidden_states, **kw) for layer, kw in calls]  # A_k, each (B, T, C)
    if mode == "lp":
        mixed = hidden_states + sum(attn_outputs)
        return mixed + sum(parts.mlp(layer, mixed) for layer, _ in calls)
    total = 0
    for k, ((layer, _), attn) in enumerate(zip(calls, attn_outputs)):
        bypassed = sum(attn_outputs[max(0, k - bypass) : k]) if k else 0
        total = total + delta(parts, layer, hidden_states, attn, bypassed, mode == "official")
    return hidden_states + total


def plan_layout(config, plan: Plan) -> Layout | None:
    """The layout a plan's groups need: none for D = 0, the family's for bypass and LP (one line if it has none)."""
    if plan.bypass == 0 and plan.bypass_mode != "lp":
        return None
    try:
        return layout(config, "LP" if plan.bypass_mode == "lp" else f"bypass D={plan.bypass}")
    except ModelError as err:
        raise PlanError(f"plan {plan}: {err}") from None


# Arguments recorded by the members of a group before its last, per layer. A module-level table rather
# than the forward's closure: gradient checkpointing recomputes the last member in the backward pass,
# possibly after `planned` re-applied the plan (the KD teacher), and must find what the forward recorded.
RECORDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def record_and_pass(layer, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    """A grouped layer before the group's last: note its arguments, hand the group input on unchanged."""
    RECORDED[layer] = kwargs
    return hidden_states


def group_calls(members, kwargs: dict) -> list[tuple]:
    """(layer, its keyword arguments) for every member of a group, called from its last with `kwargs`."""
    calls = [(layer, RECORDED[layer]) for layer in members[:-1]] + [(members[-1], kwargs)]
    if not torch.is_grad_enabled():  # nothing will recompute the group: free its masks and cache references
        for layer in members[:-1]:
            del RECORDED[layer]
    return calls


def last_member(members, parts: Layout | None, bypass: int, mode: str, hidden_states: torch.Tensor, **kwargs):
    """The group's last layer: the whole group on the input its members handed on."""
    return group_sum(parts, bypass, mode, group_calls(members, kwargs), hidden_states)


def pass_through(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A pruned layer: the input goes on unchanged."""
    return hidden_states


def prunable_layers(config) -> list[int]:
    """The layers a Prune may remove: all but those whose KV cache slot transformers reads for the cache
    length (`layers.cache_length_layers`); a pruned layer leaves its slot empty."""
    kept = cache_length_layers(config)
    return [i for i in range(len(layer_types(config))) if i not in kept]


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
    parts = plan_layout(model.config, plan) if isinstance(plan, Plan) else None
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
        for layer in members[:-1]:
            layer.forward = partial(record_and_pass, layer)
        members[-1].forward = partial(last_member, members, parts, plan.bypass, plan.bypass_mode)
    model.config.cqil_plan = str(plan)
    return model


def _ours(forward) -> bool:
    return forward is pass_through or (isinstance(forward, partial) and forward.func in (record_and_pass, last_member))


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
