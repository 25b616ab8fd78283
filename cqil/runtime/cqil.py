"""CQIL on P ranks: rank j computes layer S + gP + j of every group g, then one all-reduce per group.

    shard(model, Plan.parse("S12-E28-P2-D0"), rank, world=2)   # in place, on every rank

Placement of the layers outside [S, E), the embedding and the head (`placement`):
- `replicated` (default): every rank runs them, so no rank waits for the group input. Costs memory on
  ranks > 0, and on a machine whose ranks share memory bandwidth (one CPU) they compete while doing so.
- `rank0`, as the official code: only rank 0 runs them and broadcasts the input of the first group;
  the other ranks hold just their group layers and wait. One more collective per forward.
The other ranks' group layers are dropped (to the meta device). As in `transform.py`, the model's own
loop calls every layer with its own arguments: the members before a group's last record theirs and hand
the group input on, and the last runs this rank's layer with that layer's arguments (its mask, rotary and
KV cache slot). transformers reads cache lengths (hence positions and masks) from the first layer of each
attention type, so every rank fills those slots: with zeros where another rank computes the layer.

The sum is the one `transform.group_sum` computes in one process (tests check logits agree):
group output = hidden + all_reduce(delta_j). With bypass D >= 1, layer j's MLP input needs the
attention outputs of layers j-D .. j-1 of the group, so the ranks all-gather theirs first. LP's mode
(every MLP reads every attention output) all-reduces the attention outputs instead: two all-reduces a group.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist

from ..layers import CACHE, Layout, cache_length_layers, causal_lm, decoder_layers
from ..plan import Plan
from ..transform import delta, group_calls, plan_layout, record_and_pass, remove_plan, whole_delta

PLACEMENTS = ("replicated", "rank0")


def rank_share(parts: Layout | None, rank: int, bypass: int, mode: str, layer, hidden_states, **kwargs):
    """This rank's layer `layer` of a group on the group input `hidden_states` (B, T, C): the whole group's output."""
    if parts is None:  # D = 0: the layer as a whole
        summed = whole_delta(layer, hidden_states, **kwargs)
        dist.all_reduce(summed)
        return hidden_states + summed
    attn = parts.attention(layer, hidden_states, **kwargs)
    if mode == "lp":  # h = x + sum_k A_k; y = h + sum_k MLP_k(norm(h))
        attn = attn.contiguous()
        dist.all_reduce(attn)
        mixed = hidden_states + attn
        summed = parts.mlp(layer, mixed)
        dist.all_reduce(summed)
        return mixed + summed
    attn_outputs = [torch.empty_like(attn) for _ in range(dist.get_world_size())]
    dist.all_gather(attn_outputs, attn.contiguous())
    bypassed = sum(attn_outputs[max(0, rank - bypass) : rank]) if rank else 0
    summed = delta(parts, layer, hidden_states, attn, bypassed, mode == "official")
    dist.all_reduce(summed)  # sum over the group's layers, one per rank
    return hidden_states + summed


def rank_last_member(members, rank: int, plan: Plan, parts, entry: bool, filled, hidden_states, **kwargs):
    """A group's last layer on this rank: its layer `members[rank]`, with that layer's recorded arguments.

    `entry`: the first group under rank-0 placement, whose input only rank 0 has computed. `filled`: the
    cache slots (layer_idx, kv_shape) of members another rank computes that transformers reads lengths from.
    """
    own, own_kwargs = group_calls(members, kwargs)[rank]
    for layer_idx, kv_shape in filled:
        placeholder(layer_idx, kv_shape, hidden_states, **kwargs)
    if entry:
        hidden_states = hidden_states.contiguous()
        dist.broadcast(hidden_states, src=0)
    return rank_share(parts, rank, plan.bypass, plan.bypass_mode, own, hidden_states, **own_kwargs)


def placeholder(layer_idx: int, kv_shape: tuple[int, int], hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    """A layer another rank computes, whose KV cache slot transformers reads for the cache length: compute
    nothing, but give the slot as many positions as the computing rank's."""
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


def shard(model, plan: Plan, rank: int, placement: str = "replicated"):
    """Keep this rank's layer of every group and make the group compute across ranks (P of them); returns the model.

    The plan, the placement and the number of ranks are the caller's to check, before any rank starts
    (`latency.Job.check`, `LatencySettings`, and `latency.measure` against the process group)."""
    remove_plan(model)
    layers = decoder_layers(model)
    parts = plan_layout(model.config, plan)
    grouped, read = range(plan.start, plan.end), cache_length_layers(model.config)
    kv_shape = (model.config.num_key_value_heads, layers[0].self_attn.head_dim)
    if placement == "rank0" and rank > 0:  # only rank 0 runs what lies outside the groups
        for i, layer in enumerate(layers):
            if i not in grouped:
                layer.to("meta")
                layer.forward = partial(placeholder, layer.self_attn.layer_idx, kv_shape)
        causal_lm(model).lm_head = NoHead(model.config.vocab_size)
    for g, group in enumerate(plan.groups()):
        members = [layers[i] for i in group]
        for layer in members[:-1]:
            layer.forward = partial(record_and_pass, layer)
        filled = [(i, kv_shape) for i, layer in zip(group, members) if i in read and layer is not members[rank]]
        entry = placement == "rank0" and g == 0
        members[-1].forward = partial(rank_last_member, members, rank, plan, parts, entry, filled)
        for layer in members:
            if layer is not members[rank]:
                layer.to("meta")  # frees the weights another rank computes
    return model
