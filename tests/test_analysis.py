"""Similarity, sensitivity and the plan search on tiny models with known answers."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from cqil import Plan, apply_plan
from cqil.analysis import cosine_gram, sensitivity, similarity
from cqil.errors import CqilError
from cqil.layers import layer_inputs
from cqil.metrics import log_probs, summarize, token_sums
from cqil.search import SelectSettings, score_plans, select


def blocks(n=4, length=12, seed=0):
    return torch.randint(3, 96, (n, length), generator=torch.Generator().manual_seed(seed))


def silence(model, layers):
    """Make layers identity maps: zero the projections that write into the residual stream."""
    for i in layers:
        torch.nn.init.zeros_(model.model.layers[i].self_attn.o_proj.weight)
        torch.nn.init.zeros_(model.model.layers[i].mlp.down_proj.weight)


def test_identical_inputs_have_similarity_one():
    model = tiny_model()
    matrix = similarity(model, blocks(), batch_size=3)
    assert matrix.shape == (8, 8)
    np.testing.assert_allclose(np.diag(matrix), 1.0)
    np.testing.assert_allclose(matrix, matrix.T)
    assert matrix[0, 7] < 0.99  # a random model changes its input
    silence(model, range(2, 6))  # layers 2-5 pass their input on: the inputs of layers 2..6 are identical
    np.testing.assert_allclose(similarity(model, blocks())[2:7, 2:7], 1.0)


def test_similarity_matches_hidden_states_without_the_first_token():
    """Reference: transformers' own hidden states (input of layer i), cosine per token, first token out."""
    model, ids = tiny_model(), blocks(n=3)
    with torch.no_grad():
        states = model(input_ids=ids, output_hidden_states=True).hidden_states[:8]  # inputs of layers 0..7

    def mean_cos(first):
        return np.array(
            [
                [torch.cosine_similarity(a[:, first:], b[:, first:], dim=-1).mean().item() for b in states]
                for a in states
            ]
        )

    np.testing.assert_allclose(similarity(model, ids), mean_cos(1), atol=1e-12)
    assert np.abs(mean_cos(0) - mean_cos(1)).max() > 1e-4  # leaving the first token out matters


def test_the_chunked_gram_equals_every_state_at_once_in_float64():
    """Reference: every layer's states of every block at once, normalized in float64, one product (the
    computation the chunks replace). A float32 model, 11 positions after the first (chunks of 2, the last of 1)
    and batches of 3 and 1 blocks."""
    model, ids = tiny_model(dtype=torch.float32), blocks(n=4, length=12)
    with torch.no_grad():
        inputs, _, _ = layer_inputs(model, ids)
    states = F.normalize(torch.stack([h[:, 1:].reshape(-1, 64) for h in inputs]).double(), dim=-1)
    reference = (torch.einsum("ind,jnd->ij", states, states) / states.shape[1]).numpy()
    np.testing.assert_allclose(similarity(model, ids, batch_size=3), reference, rtol=0, atol=1e-14)


class PeakBytes(TorchDispatchMode):
    """The peak bytes, over the ops run while it is on, of the storages they created that are still alive: a
    view or an in-place result shares its input's storage, which is counted once, if new."""

    def __init__(self, held: list[torch.Tensor]):
        super().__init__()
        self.held = {t.untyped_storage().data_ptr() for t in held}  # there before: not counted
        self.live, self.peak = {}, 0  # storage address -> (weak reference, bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            storage = tensor.untyped_storage() if isinstance(tensor, torch.Tensor) else None
            if storage is not None and storage.data_ptr() not in self.held:
                known = self.live.get(storage.data_ptr())
                if known is None or known[0].expired():  # a new storage, maybe where a freed one was
                    self.live[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        self.live = {ptr: entry for ptr, entry in self.live.items() if not entry[0].expired()}
        self.peak = max(self.peak, sum(size for _, size in self.live.values()))
        return out


def test_the_gram_holds_one_layers_states_in_float64_at_a_time():
    """8 layers of 2 blocks of 33 tokens: each chunk holds 4 positions of every layer, as many values as one
    layer's 32 positions; all layers' states at once in float64 would be 8 times as many, per copy."""
    inputs = [torch.randn(2, 33, 64) for _ in range(8)]
    one_layer = 2 * 32 * 64 * 8  # one layer's states after the first token, in float64
    with torch.inference_mode(), PeakBytes(inputs) as counted:
        cosine_gram(inputs)
    sums, norms = 8 * 8 * 8, 2 * (8 * 2 * 4) * 8  # the (L, L) sums; a chunk's norms and their clamped copy
    assert one_layer <= counted.peak <= one_layer + sums + norms


def test_analysis_runs_the_original_even_on_a_cqil_model():
    model, ids = tiny_model(), blocks()
    expected = similarity(model, ids)
    apply_plan(model, Plan.parse("S2-E6-P2-D0"))
    np.testing.assert_allclose(similarity(model, ids), expected, atol=1e-12)
    rows = score_plans(model, ids, [Plan.parse("S0-E8-P2-D0")], progress=False)
    assert rows[0]["kl"] == 0 and model.config.cqil_plan == "S2-E6-P2-D0"  # the original, then restored


def test_sensitivity_is_zero_where_earlier_layers_do_nothing():
    model = tiny_model()
    silence(model, [3])  # layer 3 is an identity map, so layer 4's input equals layer 3's
    rows = {(r["layer"], r["distance"]): r for r in sensitivity(model, blocks(), distances=(1, 2))}
    assert rows[(-1, 0)]["kl"] == pytest.approx(0, abs=1e-12) and rows[(-1, 0)]["top1"] == 1
    assert rows[(4, 1)]["kl"] == pytest.approx(0, abs=1e-10)  # layer 4 on the input of layer 3: unchanged
    assert rows[(4, 2)]["kl"] > 1e-4 and rows[(5, 1)]["kl"] > 1e-4
    assert set(rows) == {(-1, 0)} | {(i, 1) for i in range(1, 8)} | {(i, 2) for i in range(2, 8)}


def test_search_scores_equal_a_direct_evaluation():
    model, ids = tiny_model(), blocks()
    plans = [Plan.parse(p) for p in ["S2-E6-P2-D0", "S1-E5-P4-D1", "S0-E8-P2-D1-official", "S2-E8-P1-D0"]]
    rows = score_plans(model, ids, plans, batch_size=3)
    reused = {r["plan"]: r for r in rows}
    assert reused == {r["plan"]: r for r in score_plans(model, ids, plans, batch_size=3, reuse_prefix=False)}
    with torch.no_grad():
        reference = log_probs(model(input_ids=ids).logits)
        for plan in plans:
            apply_plan(model, plan)
            direct = summarize(token_sums(log_probs(model(input_ids=ids).logits), ids, reference))
            apply_plan(model, None)
            for key in ("perplexity", "kl", "top1"):
                assert reused[str(plan)][key] == pytest.approx(direct[key], rel=1e-9, abs=1e-12)
    assert reused["S2-E8-P1-D0"]["kl"] == pytest.approx(0, abs=1e-12)  # a P=1 plan is the original
    assert reused["S2-E8-P1-D0"]["top1"] == 1 and reused["original"]["ppl_ratio"] == 1
    assert reused["S2-E6-P2-D0"]["kl"] > 0 and reused["S2-E6-P2-D0"]["ideal_reduction"] == pytest.approx(2 / 8)


ROWS = [
    {"plan": "original", "size": 1, "bypass": 0, "ideal_reduction": 0.0, "kl": 0.0, "perplexity": 10, "top1": 1},
    {"plan": "S4-E8-P2-D0", "size": 2, "bypass": 0, "ideal_reduction": 0.25, "kl": 0.3, "perplexity": 12, "top1": 0.8},
    {"plan": "S6-E8-P2-D0", "size": 2, "bypass": 0, "ideal_reduction": 0.125, "kl": 0.1, "perplexity": 11, "top1": 0.9},
    {
        "plan": "S2-E8-P2-D0",
        "size": 2,
        "bypass": 0,
        "ideal_reduction": 0.375,
        "kl": 0.5,
        "perplexity": 15,
        "top1": 0.85,
    },
    {"plan": "S2-E8-P2-D1", "size": 2, "bypass": 1, "ideal_reduction": 0.375, "kl": 0.2, "perplexity": 11, "top1": 0.9},
    {"plan": "S0-E8-P4-D0", "size": 4, "bypass": 0, "ideal_reduction": 0.75, "kl": 2.0, "perplexity": 40, "top1": 0.3},
    {"plan": "S4-E8-P4-D0", "size": 4, "bypass": 0, "ideal_reduction": 0.375, "kl": 0.9, "perplexity": 20, "top1": 0.6},
]


def test_select_follows_the_rule():
    assert select(ROWS, SelectSettings(metric="kl", per_size=1, min_reduction=0.2)) == ["S4-E8-P2-D0", "S4-E8-P4-D0"]
    assert select(ROWS, SelectSettings(metric="top1", per_size=2, min_reduction=0.2)) == [
        "S2-E8-P2-D0",
        "S4-E8-P2-D0",
        "S4-E8-P4-D0",
        "S0-E8-P4-D0",
    ]
    assert select(ROWS, SelectSettings(metric="kl", min_reduction=0.2, bypasses=[0, 1])) == [
        "S2-E8-P2-D1",
        "S4-E8-P4-D0",
    ]
    assert select(ROWS, SelectSettings(min_reduction=0.5, always=["S6-E8-P2-D0"])) == ["S0-E8-P4-D0", "S6-E8-P2-D0"]
    with pytest.raises(CqilError, match="select.metric: 'bleu' is not one of kl, perplexity, top1"):
        SelectSettings(metric="bleu")
