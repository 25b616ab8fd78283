"""The equal-depth baselines: pruned and LP forwards against written-out reference loops (float64), and both
pruning rules on tiny models with a planted answer. Cached generation against recompute, for both, is in
tests/test_transform.py with the plans'."""

import copy
import json
import re

import pandas as pd
import pytest
import torch
from conftest import tiny_model
from peft import LoraConfig, get_peft_model
from transformers.masking_utils import create_causal_mask

from cqil import Plan, PlanError, apply_plan, load_model
from cqil.baselines import (
    BaselinesSettings,
    block_influence,
    comparison_rows,
    greedy_removal,
    layers_saved,
    lowest_influence,
    matched_plans,
    run_baselines,
)
from cqil.errors import CqilError
from cqil.layers import with_cache
from cqil.plan import PLAN_NAME, SETUP_NAME, Prune, Setup, parse_plan
from cqil.report import comparison_figure
from cqil.transform import prunable_layers


def layer_kwargs(model, h):
    pos = torch.arange(h.shape[1])[None]
    mask = create_causal_mask(
        config=model.config, inputs_embeds=h, attention_mask=None, position_ids=pos, **with_cache(None)
    )
    return dict(attention_mask=mask, position_embeddings=model.model.rotary_emb(h, position_ids=pos), position_ids=pos)


def reference_pruned(model, ids, removed):
    """A pruned model written out: the kept layers in order, the removed ones never called."""
    h = model.model.embed_tokens(ids)
    kw = layer_kwargs(model, h)
    for i, layer in enumerate(model.model.layers):
        if i not in removed:
            h = layer(h, **kw)
    return model.lm_head(model.model.norm(h))


def reference_lp(model, ids, plan):
    """LP written out (effective-depth's pairing, for any P): h = x + sum_k A_k(x); y = h + sum_k MLP_k(norm_k(h))."""
    h = model.model.embed_tokens(ids)
    kw = layer_kwargs(model, h)
    layers, i = model.model.layers, 0
    while i < len(layers):
        if not plan.start <= i < plan.end:
            h, i = layers[i](h, **kw), i + 1
            continue
        group = layers[i : i + plan.size]
        mixed = h + sum(layer.self_attn(layer.input_layernorm(h), **kw)[0] for layer in group)
        h = mixed + sum(layer.mlp(layer.post_attention_layernorm(mixed)) for layer in group)
        i += plan.size
    return model.lm_head(model.model.norm(h))


def ids_batch(batch=2, length=7, seed=1):
    return torch.randint(3, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- The values ------------------------------------------------------------------------------------------


def test_names_round_trip_and_parse_to_the_right_value():
    assert str(Plan.parse("S16-E28-P2-LP")) == "S16-E28-P2-LP"
    assert Plan.parse("S16-E28-P2-LP") == Plan(16, 28, 2, 0, "lp")
    assert parse_plan("drop-25-17-19") == Prune((17, 19, 25)) and str(Prune((25, 17))) == "drop-17-25"
    assert isinstance(parse_plan("S16-E28-P4-D0"), Plan)
    prune = Prune((17, 19, 20, 22, 23, 25))
    assert (prune.start, prune.end, prune.size, prune.steps(30)) == (17, 26, 1, 24)
    assert prune.ideal_reduction(30) == pytest.approx(0.2)
    assert layers_saved(Plan.parse("S16-E28-P2-D0"), 30) == 6 == layers_saved(Plan.parse("S18-E26-P4-D0"), 30)


def test_path_patterns_take_every_kind_of_name():
    variant = rf"original|{PLAN_NAME}(-finetuned)?"  # the workflow's {variant} constraint
    for name in ("S16-E28-P2-D0", "S16-E28-P2-D1-official", "S16-E28-P2-LP", "drop-17-19"):
        assert re.fullmatch(PLAN_NAME, name) and re.fullmatch(variant, name + "-finetuned"), name
    assert re.fullmatch(SETUP_NAME, "drop-17-19") and re.fullmatch(SETUP_NAME, "cqil-S16-E28-P2-LP")
    assert not re.fullmatch(SETUP_NAME, "cqil-drop-17-19")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Plan(16, 28, 2, 1, "lp"), "LP mixes all attention outputs of a group; D=1 must be 0"),
        (lambda: Prune(()), "needs one or more layer indices"),
        (lambda: Prune((3, 3)), "listed twice"),
        (lambda: Prune((-1,)), "needs one or more layer indices >= 0"),
        (lambda: Prune.parse("drop"), "expected the form drop-17-19-20"),
        (lambda: Prune((3, 30)).validate(30), "layer 30 exceeds the model's 30 layers"),
    ],
)
def test_bad_values_fail_with_one_line(make, message):
    with pytest.raises(PlanError) as err:
        make()
    assert message in str(err.value) and "\n" not in str(err.value)


def test_setups_of_pruned_and_lp_models():
    pruned = Setup.parse("drop-3-5")
    assert (pruned.engine, pruned.ranks, pruned.name, str(pruned)) == ("pruned", 1, "drop-3-5", "pruned drop-3-5")
    assert Setup.parse(str(pruned)) == pruned == Setup.of(Prune((3, 5)))
    assert pruned.ideal(10) == pytest.approx(0.2)
    lp = Setup.parse("cqil-S2-E6-P2-LP")
    assert (lp.ranks, lp.name) == (2, "cqil-S2-E6-P2-LP")
    with pytest.raises(PlanError, match="needs a prune"):
        Setup("pruned", Plan.parse("S2-E6-P2-D0"))


# --- The pruned forward ------------------------------------------------------------------------------------


@pytest.mark.parametrize("removed", [(3,), (2, 5, 6), (1, 2, 3, 4, 5, 6, 7)])
def test_pruned_forward_matches_reference(family, removed):
    model, ids = tiny_model(family), ids_batch()
    reference = copy.deepcopy(model)
    apply_plan(model, Prune(removed))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        torch.testing.assert_close(logits, reference_pruned(reference, ids, removed))
        assert (logits - reference(input_ids=ids).logits).abs().max() > 1e-2  # pruning changes the output
    assert model.config.cqil_plan == f"drop-{'-'.join(map(str, removed))}"
    apply_plan(model, None)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0)


def test_layers_whose_cache_slot_transformers_reads_cannot_be_pruned():
    assert prunable_layers(tiny_model().config) == list(range(1, 8))
    with pytest.raises(PlanError, match="layer 0 is the first full_attention layer"):
        apply_plan(tiny_model(), Prune((0, 3)))
    # Qwen2 sliding above layer 4: layer 4 is the first sliding layer
    qwen = tiny_model("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=4)
    assert prunable_layers(qwen.config) == [1, 2, 3, 5, 6, 7]
    with pytest.raises(PlanError, match="layer 4 is the first sliding_attention layer"):
        apply_plan(qwen, Prune((4,)))


def test_pruned_model_trains_lora_and_saves(tiny_dir, tmp_path):
    prune, ids = Prune((2, 5)), ids_batch()
    model, tokenizer = load_model(str(tiny_dir), plan=prune)
    model.save_pretrained(tmp_path / "pruned")
    tokenizer.save_pretrained(tmp_path / "pruned")
    restored, _ = load_model(str(tmp_path / "pruned"))
    assert restored.config.cqil_plan == "drop-2-5"
    with torch.no_grad():
        torch.testing.assert_close(restored(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "down_proj"])
    student = get_peft_model(model, lora)
    student(input_ids=ids, labels=ids).loss.backward()
    layers = student.get_base_model().model.layers
    assert layers[3].self_attn.q_proj.lora_A["default"].weight.grad.abs().sum() > 0
    assert layers[2].self_attn.q_proj.lora_A["default"].weight.grad is None  # a removed layer is never run


# --- LP ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["S2-E6-P2-LP", "S0-E8-P2-LP", "S1-E5-P4-LP"])
def test_lp_forward_matches_reference(family, name):
    model, plan, ids = tiny_model(family), Plan.parse(name), ids_batch()
    reference = copy.deepcopy(model)
    apply_plan(model, plan)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        torch.testing.assert_close(logits, reference_lp(reference, ids, plan))
        cqil = apply_plan(copy.deepcopy(reference), Plan(plan.start, plan.end, plan.size))(input_ids=ids).logits
        assert (logits - cqil).abs().max() > 1e-2  # LP is not CQIL's sum of deltas


# --- The selection rules, with planted answers ---------------------------------------------------------------


def planted_model(dead):
    """A tiny model whose layers in `dead` are near-identities (their output projections scaled to ~0): BI and the
    greedy rule should both remove exactly those."""
    model = tiny_model(layers=8)
    with torch.no_grad():
        for i in dead:
            model.model.layers[i].self_attn.o_proj.weight.mul_(1e-4)
            model.model.layers[i].mlp.down_proj.weight.mul_(1e-4)
    return model


def blocks(count=4, length=12):
    return torch.randint(3, 96, (count, length), generator=torch.Generator().manual_seed(7))


def test_block_influence_finds_the_planted_layers():
    model = planted_model(dead=(2, 5, 6))
    influence = block_influence(model, blocks(), batch_size=2)
    assert influence.shape == (8,) and (influence >= -1e-12).all()
    assert sorted(influence.argsort()[:3]) == [2, 5, 6]
    assert lowest_influence(influence, 3, prunable_layers(model.config)) == Prune((2, 5, 6))


def test_block_influence_is_one_minus_the_cosine():
    """BI_i = 1 - mean over tokens (after the first) of cos(x_i, x_{i+1}), written out for one layer."""
    model, ids = tiny_model(), blocks(2)
    influence = block_influence(model, ids, batch_size=2)
    with torch.no_grad():
        states = model(input_ids=ids, output_hidden_states=True).hidden_states  # embeddings, then after each layer
    # transformers applies the final norm to the last hidden state only; layer 3's input and output are raw
    cos = torch.nn.functional.cosine_similarity(states[3][:, 1:], states[4][:, 1:], dim=-1)
    assert influence[3] == pytest.approx(1 - cos.mean().item(), abs=1e-9)


def own_text(model, count=8, length=24):
    """Blocks the model samples itself: on them the model's own distribution has the lowest expected perplexity,
    so removing a layer that matters raises it (on random tokens it may as well fall)."""
    torch.manual_seed(3)
    start = torch.randint(3, 96, (count, 1), generator=torch.Generator().manual_seed(5))
    model.generation_config.eos_token_id = None
    return model.generate(input_ids=start, max_new_tokens=length - 1, do_sample=True, top_k=0, pad_token_id=0)


def test_greedy_removal_finds_the_planted_layers_and_skips_layer_0():
    model = planted_model(dead=(0, 3, 6))  # layer 0 is dead but must stay (its cache slot)
    text = own_text(model)
    prune, trace = greedy_removal(model, text, 2, prunable_layers(model.config), batch_size=4)
    assert prune == Prune((3, 6))
    assert [step["step"] for step in trace] == [1, 2] and {step["layer"] for step in trace} == {3, 6}
    assert model.config.__dict__.get("cqil_plan") is None  # the model is left as it was
    ids = text
    for step in trace:  # the recorded perplexity is that of the pruned model so far, run whole
        removed = tuple(s["layer"] for s in trace[: step["step"]])
        with torch.no_grad(), torch.inference_mode():
            apply_plan(model, Prune(removed))
            logits = model(input_ids=ids).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 96), ids[:, 1:].reshape(-1))
        assert step["perplexity"] == pytest.approx(nll.exp().item(), rel=1e-9)


# --- The stage -------------------------------------------------------------------------------------------------


def test_run_baselines_matches_every_selected_plan(tiny_dir, tmp_path):
    corpus = tmp_path / "corpus.pt"
    torch.save({"calibration": blocks(), "test": blocks(2)}, corpus)
    selected = tmp_path / "selected.json"
    selected.write_text(json.dumps({"plans": ["S2-E6-P2-D0", "S0-E8-P4-D0"]}))
    out = tmp_path / "baselines.json"
    settings = BaselinesSettings(rules=["block_influence", "greedy"], lp=True, batch_size=2)
    run_baselines(settings, model=str(tiny_dir), corpus=corpus, selected=selected, out=out)
    record = json.loads(out.read_text())
    rows = {(row["plan"], row["rule"]): row for row in record["baselines"]}
    assert set(rows) == {(p, r) for p in ("S2-E6-P2-D0", "S0-E8-P4-D0") for r in ("block_influence", "greedy", "lp")}
    assert rows[("S2-E6-P2-D0", "lp")] | {"variant": None} == {
        "plan": "S2-E6-P2-D0",
        "rule": "lp",
        "variant": None,
        "steps": 6,
        "gpus": 2,
    }
    assert rows[("S0-E8-P4-D0", "lp")]["variant"] == "S0-E8-P4-LP"
    for (plan, rule), row in rows.items():
        assert row["steps"] == Plan.parse(plan).steps(8)  # equal sequential depth
        if rule != "lp":
            assert len(Prune.parse(row["variant"]).removed) == layers_saved(Plan.parse(plan), 8) and row["gpus"] == 1
    greedy = [step["layer"] for step in record["evidence"]["greedy"]]
    assert rows[("S2-E6-P2-D0", "greedy")]["variant"] == str(Prune(tuple(greedy[:2])))  # nested: the first n
    assert len(record["evidence"]["block_influence"]) == 8
    assert record["variants"] == list(dict.fromkeys(row["variant"] for row in record["baselines"]))


def test_bad_baseline_settings_fail_with_one_line():
    with pytest.raises(CqilError, match="baselines.rules: 'shortgpt' is not one of block_influence, greedy"):
        BaselinesSettings(rules=["shortgpt"])
    with pytest.raises(CqilError, match="already LP"):
        BaselinesSettings(match=["S2-E6-P2-LP"])
    with pytest.raises(PlanError, match="expected the form"):
        BaselinesSettings(match=["drop-3"])
    with pytest.raises(CqilError, match="S2-E6-P2-D1 was not selected"):
        matched_plans(BaselinesSettings(match=["S2-E6-P2-D1"]), ["S2-E6-P2-D0"])
    assert matched_plans(BaselinesSettings(), ["S2-E6-P2-D0", "S2-E6-P2-LP"]) == [Plan.parse("S2-E6-P2-D0")]


def test_comparison_keeps_a_row_per_method_and_stage(tmp_path):
    """Two rules that agree keep a row each; a baseline shared by two plans of one depth counts once."""
    record = {
        "layers": 8,
        "baselines": [
            {"plan": "S2-E6-P2-D0", "rule": "block_influence", "variant": "drop-3-5", "steps": 6, "gpus": 1},
            {"plan": "S2-E6-P2-D0", "rule": "greedy", "variant": "drop-3-5", "steps": 6, "gpus": 1},
            {"plan": "S2-E6-P2-D0", "rule": "lp", "variant": "S2-E6-P2-LP", "steps": 6, "gpus": 2},
            {"plan": "S2-E5-P3-D0", "rule": "block_influence", "variant": "drop-3-5", "steps": 6, "gpus": 1},
        ],
    }
    variants = ["S2-E6-P2-D0", "S2-E5-P3-D0", "drop-3-5", "S2-E6-P2-LP"]
    levels = pd.DataFrame(
        [
            {
                "plan": v,
                "stage": s,
                "task": "wikitext2",
                "metric": "perplexity",
                "value": 40.0 + i,
                "low": 39,
                "high": 45,
            }
            for i, v in enumerate(variants)
            for s in ("zeroshot", "finetuned")
        ]
        + [{"plan": "original", "stage": "original", "task": "wikitext2", "metric": "perplexity", "value": 36.0}]
        + [{"plan": v, "stage": "zeroshot", "task": "heldout", "metric": "kl", "value": 0.1} for v in variants]
    )
    differences = pd.DataFrame(
        [
            {"plan": v, "stage": s, "task": "average", "diff": -1.0, "low": -3.0, "high": 1.0, "distinguishable": False}
            for v in variants
            for s in ("zeroshot", "finetuned")
        ]
    )
    table = comparison_rows(record, levels, differences)
    assert len(table) == 2 * 5  # CQIL P2, CQIL P4, BI, greedy, LP; zero-shot and fine-tuned
    assert table.groupby("method").size().to_dict() == {
        "CQIL": 4,
        "LP": 2,
        "pruned (ShortGPT BI)": 2,
        "pruned (SLEB greedy)": 2,
    }
    assert set(table.depth) == {6} and table.wikitext2_original.eq(36.0).all()
    assert table.set_index(["variant", "stage"]).heldout_kl[("drop-3-5", "zeroshot")].eq(0.1).all()
    comparison_figure(table, tmp_path / "comparison")
    assert (tmp_path / "comparison.png").stat().st_size > 10_000
