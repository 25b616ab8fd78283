"""The grouped forward against an independent written-out reference, in float64."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_cached_generation_equals_recompute, tiny_model
from peft import LoraConfig, get_peft_model
from transformers.masking_utils import create_causal_mask

from cqil import Plan, PlanError, apply_plan, load_model, parse_plan, remove_plan
from cqil.layers import with_cache

PLANS = [
    "S2-E6-P2-D0",
    "S2-E6-P2-D1",
    "S2-E6-P2-D1-official",
    "S1-E5-P4-D0",
    "S1-E5-P4-D1",
    "S1-E5-P4-D1-official",
    "S0-E8-P4-D3",
    "S0-E8-P4-D2-official",
]


def reference_logits(model, ids, plan):
    """CQIL written out from the paper's formulas on an untouched model (feasibility.md §Q3 loop).

    D = 0:  y = x + sum_k (Layer_k(x) - x)
    D >= 1: y = x + sum_k delta_k, delta_k = A_k + MLP_k(norm(x + A_k + B_k)) [+ B_k, official mode],
            A_k = Attn_k(norm(x)), B_k = sum_{i=1..min(D,k)} A_{k-i}
    """
    inner = model.model
    h = inner.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None]
    kw = dict(
        attention_mask=create_causal_mask(
            config=model.config, inputs_embeds=h, attention_mask=None, position_ids=pos, **with_cache(None)
        ),
        position_embeddings=inner.rotary_emb(h, position_ids=pos),
        position_ids=pos,
    )
    starts = {g.start: [inner.layers[j] for j in g] for g in plan.groups()} if plan else {}
    i = 0
    while i < len(inner.layers):
        if i not in starts:
            h = inner.layers[i](h, **kw)
            i += 1
            continue
        group, x = starts[i], h
        if plan.bypass == 0:
            h = x + sum(layer(x, **kw) - x for layer in group)
        else:
            A = [layer.self_attn(layer.input_layernorm(x), **kw)[0] for layer in group]
            y = x
            for k, layer in enumerate(group):
                B = sum(A[k - j] for j in range(1, min(plan.bypass, k) + 1)) if k else torch.zeros_like(x)
                y = y + A[k] + layer.mlp(layer.post_attention_layernorm(x + A[k] + B))
                if plan.bypass_mode == "official":
                    y = y + B
            h = y
        i += len(group)
    return model.lm_head(inner.norm(h))


def ids_batch(batch=2, length=7, seed=1):
    return torch.randint(3, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", PLANS)
def test_grouped_forward_matches_reference(family, name):
    model, plan, ids = tiny_model(family), Plan.parse(name), ids_batch()
    reference = copy.deepcopy(model)
    apply_plan(model, plan)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference_logits(reference, ids, plan))


def test_plans_really_change_the_output():
    model, ids = tiny_model(), ids_batch()
    with torch.no_grad():
        outputs = {}
        for name in [None, "S2-E6-P2-D0", "S2-E6-P2-D1", "S2-E6-P2-D1-official"]:
            apply_plan(model, Plan.parse(name) if name else None)
            outputs[name] = model(input_ids=ids).logits
    values = list(outputs.values())
    for i in range(len(values)):
        for j in range(i):
            assert (values[i] - values[j]).abs().max() > 1e-3


@pytest.mark.parametrize("name", [None, "S0-E8-P1-D0", "S3-E5-P1-D0"])
def test_empty_and_one_layer_groups_are_the_original(family, name):
    model, ids = tiny_model(family, dtype=torch.float32), ids_batch()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        apply_plan(model, Plan.parse(name) if name else None)
        assert torch.equal(model(input_ids=ids).logits, expected)


@pytest.mark.parametrize("parts", [None, "pre-norm"])
def test_group_of_one_layer_is_the_layer(parts):
    # P=1 plans skip the grouped forward; the mechanism itself also reduces to the layer (float64), whole or in halves.
    from cqil.layers import LAYOUTS
    from cqil.transform import group_sum

    model = tiny_model()
    layer, h = model.model.layers[3], torch.randn(2, 7, 64, dtype=torch.float64)
    pos = torch.arange(7)[None]
    kw = dict(position_embeddings=model.model.rotary_emb(h, position_ids=pos), attention_mask=None)
    layout = LAYOUTS[parts] if parts else None
    torch.testing.assert_close(group_sum(layout, 1, "paper", [(layer, kw)], h), layer(h, **kw))


def test_remove_plan_restores_the_original():
    model, ids = tiny_model(), ids_batch()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        apply_plan(model, Plan.parse("S0-E8-P4-D1"))
        assert model.config.cqil_plan == "S0-E8-P4-D1"
        remove_plan(model)
        assert torch.equal(model(input_ids=ids).logits, expected)
        assert not hasattr(model.config, "cqil_plan")
        assert set(model.state_dict()) == set(tiny_model().state_dict())  # nothing renamed or added


def test_foreign_forwards_are_refused_and_kept():
    model = tiny_model()
    hooked = model.model.layers[5]
    hooked.forward = lambda hidden_states, **kwargs: hidden_states  # stands in for an accelerate hook
    with pytest.raises(PlanError, match="layer 5 already has its forward replaced"):
        apply_plan(model, Plan.parse("S2-E6-P2-D0"))
    remove_plan(model)
    assert "forward" in hooked.__dict__


def test_planned_restores_the_models_own_plan():
    from cqil.transform import planned

    model, ids = tiny_model(), ids_batch()
    apply_plan(model, Plan.parse("S0-E8-P4-D1"))
    with torch.no_grad():
        planned_logits = model(input_ids=ids).logits
        with planned(model, None):
            assert not hasattr(model.config, "cqil_plan")
            original = model(input_ids=ids).logits
        assert model.config.cqil_plan == "S0-E8-P4-D1"
        torch.testing.assert_close(model(input_ids=ids).logits, planned_logits, rtol=0, atol=0)
    assert (original - planned_logits).abs().max() > 1e-3


def test_plan_must_fit_the_model():
    with pytest.raises(PlanError, match="exceeds the model's 8 layers"):
        apply_plan(tiny_model(), Plan.parse("S4-E10-P2-D0"))


@pytest.mark.parametrize("name", ["S2-E6-P2-D0", "S1-E5-P4-D1", "S2-E6-P2-LP", "S0-E8-P4-LP", "drop-2-5-6"])
def test_cached_generation_equals_uncached(family, name):
    assert_cached_generation_equals_recompute(tiny_model(family, dtype=torch.float32), parse_plan(name))


def test_padding_does_not_leak_into_the_groups():
    """A left-padded row gives the same logits as the same row unpadded."""
    model = tiny_model()
    apply_plan(model, Plan.parse("S1-E5-P4-D1"))
    ids = ids_batch(length=6)
    padded = torch.cat([torch.zeros(2, 3, dtype=ids.dtype), ids], dim=1)
    mask = torch.cat([torch.zeros(2, 3, dtype=ids.dtype), torch.ones_like(ids)], dim=1)
    with torch.no_grad():
        alone = model(input_ids=ids).logits
        batched = model(input_ids=padded, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    torch.testing.assert_close(batched[:, 3:], alone)


def test_loss_and_gradients_match_reference():
    plan, ids = Plan.parse("S1-E5-P4-D1"), ids_batch()
    model = tiny_model()
    reference = copy.deepcopy(model)
    apply_plan(model, plan)

    def loss(logits):  # next-token cross-entropy in float64 (HF's `labels` loss upcasts only to float32)
        return F.cross_entropy(logits[:, :-1].reshape(-1, 96), ids[:, 1:].reshape(-1))

    out = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.loss.double(), loss(out.logits), atol=1e-6, rtol=1e-6)
    loss(out.logits).backward()
    loss(reference_logits(reference, ids, plan)).backward()
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert model.model.layers[4].mlp.down_proj.weight.grad.abs().sum() > 0  # last member of a group learns


def test_lora_applies_inside_groups():
    """peft LoRA on a CQIL model == the plan on the merged weights; adapters train in every member."""
    plan, ids = Plan.parse("S2-E6-P2-D1"), ids_batch()
    model = apply_plan(tiny_model(), plan)
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        init_lora_weights=False,  # random B: adapters matter
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    student = get_peft_model(model, lora)
    merged = remove_plan(copy.deepcopy(student).merge_and_unload())
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=ids).logits, reference_logits(merged, ids, plan))
        with student.disable_adapter():
            base = remove_plan(copy.deepcopy(student.get_base_model()))
            torch.testing.assert_close(student(input_ids=ids).logits, reference_logits(base, ids, plan))
    student(input_ids=ids, labels=ids).loss.backward()
    member = student.get_base_model().model.layers[3]  # second layer of group (2, 3)
    assert member.self_attn.q_proj.lora_A["default"].weight.grad.abs().sum() > 0
    apply_plan(student, Plan.parse("S0-E8-P2-D0"))  # plans can also be changed through the peft wrapper
    assert student.config.cqil_plan == "S0-E8-P2-D0"


def test_save_and_load_restore_the_plan(tiny_dir, tmp_path):
    plan = Plan.parse("S0-E8-P4-D1-official")
    model, tokenizer = load_model(str(tiny_dir), plan=plan)
    ids = ids_batch()
    model.save_pretrained(tmp_path / "cqil")
    tokenizer.save_pretrained(tmp_path / "cqil")
    restored, _ = load_model(str(tmp_path / "cqil"))
    assert restored.config.cqil_plan == str(plan)
    with torch.no_grad():
        torch.testing.assert_close(restored(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
        plain, _ = load_model(str(tiny_dir))
        assert (plain(input_ids=ids).logits - model(input_ids=ids).logits).abs().max() > 1e-3
