"""CQIL on P ranks: rank j computes layer S + gP + j of every group g, then one all-reduce per group.

    shard(model, Plan.parse("S12-E28-P2-D0"), rank, world=2)   # in place, on every rank

Placement of the layers outside [S, E), the embedding and the head (`placement`):
- `replicated` (default): every rank runs them, so no rank waits for the group input. Costs memory on
  ranks > 0, and on a machine whose ranks share memory bandwidth (one CPU) they compete while doing so.
- `rank0`, as the official code: only rank 0 runs them and broadcasts the input of the first group;
  the other ranks hold just their group layers and wait. One more collective per forward.
The other ranks' group layers are dropped (to the meta device). Each rank's layer stores its keys and
values in the cache slot of its group's first layer, so every rank fills the same slots and the cache
lengths (hence positions and masks) that transformers reads from those slots agree, also for a plan
that starts at layer 0.

The sum is the one `transform.group_forward` computes in one process (tests check logits agree):
group output = hidden + all_reduce(delta_j). With bypass D >= 1, layer j's MLP input needs the
attention outputs of layers j-D .. j-1 of the group, so the ranks all-gather theirs first. LP's mode
(every MLP reads every attention output) all-reduces the attention outputs instead: two all-reduces a group.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist

from ..errors import EngineError
from ..layers import CACHE, causal_lm, decoder_layers
from ..plan import Plan
from ..transform import attention, check_layer_types, delta, mlp_delta, pass_through, remove_plan

PLACEMENTS = ("replicated", "rank0")


def rank_forward(
    layer, rank: int, bypass: int, mode: str, entry: bool, hidden_states: torch.Tensor, **kwargs
) -> torch.Tensor:
    """This rank's share of a group on the group input `hidden_states` (B, T, C): the whole group's output.

    `entry`: the first group under rank-0 placement, whose input only rank 0 has computed.
    """
    if entry:
        hidden_states = hidden_states.contiguous()
        dist.broadcast(hidden_states, src=0)
    attn = attention(layer, hidden_states, **kwargs)
    if mode == "lp":  # h = x + sum_k A_k; y = h + sum_k MLP_k(norm(h))
        attn = attn.contiguous()
        dist.all_reduce(attn)
        mixed = hidden_states + attn
        summed = mlp_delta(layer, mixed)
        dist.all_reduce(summed)
        return mixed + summed
    bypassed = 0
    if bypass:
        attn_outputs = [torch.empty_like(attn) for _ in range(dist.get_world_size())]
        dist.all_gather(attn_outputs, attn.contiguous())
        bypassed = sum(attn_outputs[max(0, rank - bypass) : rank])
    summed = delta(layer, hidden_states, attn, bypassed, mode == "official")
    dist.all_reduce(summed)  # sum over the group's layers, one per rank
    return hidden_states + summed


def placeholder(layer_idx: int, kv_shape: tuple[int, int], hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    """A layer that only rank 0 runs (rank-0 placement), on another rank: compute nothing, but give the
    layer's cache slot as many positions as rank 0's, since transformers reads cache lengths there."""
    if (cache := kwargs.get(CACHE)) is not None:
        zeros = hidden_states.new_zeros(hidden_states.shape[0], kv_shape[0], hidden_states.shape[1], kv_shape[1])
        cache.update(zeros, zeros, layer_idx)
    return hidden_states


class NoHead(torch.nn.Module):
    """The LM head of a rank > 0 under rank-0 placement: its logits are never read, so they are not computed."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.new_zeros(*hidden.shape[:-1], self.vocab)


def shard(model, plan: Plan, rank: int, world: int, placement: str = "replicated"):
    """Keep this rank's layer of every group and make the group compute across ranks; returns the model."""
    if world != plan.size:
        raise EngineError(f"plan {plan}: P={plan.size} layers per group needs {plan.size} ranks, got {world}")
    if placement not in PLACEMENTS:
        raise EngineError(f"placement {placement!r}: allowed are {', '.join(PLACEMENTS)}")
    remove_plan(model)
    layers = decoder_layers(model)
    plan.validate(len(layers))
    check_layer_types(model.config, plan)
    grouped = range(plan.start, plan.end)
    if placement == "rank0" and rank > 0:  # only rank 0 runs what lies outside the groups
        kv_shape = (model.config.num_key_value_heads, layers[0].self_attn.head_dim)
        for i, layer in enumerate(layers):
            if i not in grouped:
                layer.to("meta")
                layer.forward = partial(placeholder, layer.self_attn.layer_idx, kv_shape)
        causal_lm(model).lm_head = NoHead(model.config.vocab_size)
    for g, group in enumerate(plan.groups()):
        members = [layers[i] for i in group]
        own = members[rank]
        own.self_attn.layer_idx = members[0].self_attn.layer_idx  # this rank's KV cache slot for the group
        for layer in members:
            if layer is not own:
                layer.to("meta")  # frees the weights another rank computes
            layer.forward = pass_through
        entry = placement == "rank0" and g == 0
        members[0].forward = partial(rank_forward, own, rank, plan.bypass, plan.bypass_mode, entry)
    return model
