"""CQIL on P ranks: rank j computes layer S + gP + j of every group g, then one all-reduce per group.

    shard(model, Plan.parse("S12-E28-P2-D0"), rank, world=2)   # in place, on every rank

Placement: the layers outside [S, E), the embedding and the head are replicated on every rank, so
ranks never wait for a broadcast of the group input. The official code runs them on rank 0 and
broadcasts the input of the first group instead: one more collective per forward, and the other ranks
idle meanwhile; replication costs memory on ranks > 0 only. The other ranks' group layers are dropped
(to the meta device). Each rank's layer stores its keys and values in the cache slot of its group's
first layer, so every rank fills the same slots and the cache lengths (hence positions and masks) that
transformers reads from those slots agree, also for a plan that starts at layer 0.

The sum is the one `concurrent.group_forward` computes in one process (tests check logits agree):
group output = hidden + all_reduce(delta_j). With bypass D >= 1, layer j's MLP input needs the
attention outputs of layers j-D .. j-1 of the group, so the ranks all-gather theirs first.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist

from ..concurrent import check_layer_types, attention, delta, pass_through, remove_plan
from ..models import decoder_layers
from ..plan import Plan
from . import EngineError


def rank_forward(layer, rank: int, bypass: int, official: bool, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    """This rank's share of a group on the group input `hidden_states` (B, T, C): the whole group's output."""
    attn = attention(layer, hidden_states, **kwargs)
    bypassed = 0
    if bypass:
        attn_outputs = [torch.empty_like(attn) for _ in range(dist.get_world_size())]
        dist.all_gather(attn_outputs, attn.contiguous())
        bypassed = sum(attn_outputs[max(0, rank - bypass):rank])
    summed = delta(layer, hidden_states, attn, bypassed, official)
    dist.all_reduce(summed)  # sum over the group's layers, one per rank
    return hidden_states + summed


def shard(model, plan: Plan, rank: int, world: int):
    """Keep this rank's layer of every group and make the group compute across ranks; returns the model."""
    if world != plan.size:
        raise EngineError(f"plan {plan}: P={plan.size} layers per group needs {plan.size} ranks, got {world}")
    remove_plan(model)
    layers = decoder_layers(model)
    plan.validate(len(layers))
    check_layer_types(model.config, plan)
    for group in plan.groups():
        members = [layers[i] for i in group]
        own = members[rank]
        own.self_attn.layer_idx = members[0].self_attn.layer_idx  # this rank's KV cache slot for the group
        for layer in members:
            if layer is not own:
                layer.to("meta")  # frees the weights another rank computes
            layer.forward = pass_through
        members[0].forward = partial(rank_forward, own, rank, plan.bypass, plan.bypass_mode == "official")
    return model
