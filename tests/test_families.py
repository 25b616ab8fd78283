"""The support matrix: CQIL on a tiny random model of every decoder family in `FAMILIES`, built from
transformers' own config classes, against references that do not use the transform.

D = 0 works for every family (each layer is called whole); bypass and LP where `cqil.layers` knows the
layer's layout; tensor parallelism where it lists the family. docs/families.md is this file's matrix:
`python tests/test_families.py` writes it, and a test checks it is current.
"""

import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import TINY, assert_cached_generation_equals_recompute, tiny_tokenizer
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from cqil import Plan, PlanError, apply_plan, load_model, parse_plan, remove_plan
from cqil.layers import FAMILY_LAYOUTS, LAYOUTS, TENSOR_PARALLEL, decoder_inputs, layer_types, lm_logits, run_layers
from cqil.plan import Prune
from cqil.transform import prunable_layers

ROOT = Path(__file__).resolve().parents[1]
SLIDING = dict(sliding_window=4)  # shorter than the test sequences, so the window matters
# Each family's tiny config: what differs from the shared settings (attention types, windows, heads).
FAMILIES = {
    "llama": {},
    "mistral": SLIDING,
    "qwen2": dict(use_sliding_window=True, max_window_layers=3, **SLIDING),  # layers 0-2 full, 3-7 sliding
    "qwen3": {},
    "gemma": {},
    "gemma2": SLIDING,  # sliding and global attention alternate: every P=2 group mixes them
    "gemma3_text": SLIDING,  # five sliding layers, then a global one
    "phi3": {},
    "olmo2": {},
    "olmo3": SLIDING,
    "granite": dict(residual_multiplier=0.5, embedding_multiplier=2.0, logits_scaling=4.0),
    "starcoder2": {},
    "smollm3": {},
    "cohere": {},  # attention and MLP in parallel on one norm
    "cohere2": SLIDING,
    "exaone4": SLIDING,
    "helium": {},
    "glm": {},
    "ministral": SLIDING,
    "seed_oss": {},
    "arcee": {},
    "ernie4_5": {},
    "nemotron": {},
    "olmo": {},
    "stablelm": {},
    "phi": {},
}
SHARED = TINY | dict(head_dim=16)  # head_dim: some families would derive a different one
D0_PLANS = ["S0-E8-P2-D0", "S1-E7-P3-D0"]


def family_model(family: str, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, **SHARED | FAMILIES[family])
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def modes(family: str) -> dict:
    """The matrix row: which of CQIL's modes the family runs."""
    layout = FAMILY_LAYOUTS.get(family)
    return {"D0": True, "bypass": bool(layout), "LP": bool(layout), "TP": family in TENSOR_PARALLEL, "engine": True}


def plans(family: str) -> list[str]:
    """The plans the family runs: D = 0, and bypass (both modes) and LP where it has a layout."""
    return ["S0-E8-P2-D0"] + (["S0-E8-P2-D1", "S0-E8-P4-D2-official", "S0-E8-P2-LP"] if modes(family)["bypass"] else [])


def ids_batch(batch=2, length=7, seed=1):
    return torch.randint(3, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def reference_logits(model, ids, plan: Plan):
    """y = x + sum_k (Layer_k(x) - x) for each group, on an untouched model: forward hooks replace the output of
    every grouped layer with the group's running sum, each member called whole with its own arguments."""
    starts = {g.start: g for g in plan.groups()}
    state = {}

    def hook(i, layer, args, kwargs, output):
        group = next((g for g in plan.groups() if i in g), None)
        if group is None:
            return output
        if i in starts:
            state["x"] = args[0] if args else kwargs["hidden_states"]
            state["sum"] = state["x"]
        x = state["x"]
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        state["sum"] = state["sum"] + type(layer).forward(layer, x, **rest) - x
        return state["sum"]

    handles = [
        layer.register_forward_hook(partial(hook, i), with_kwargs=True) for i, layer in enumerate(model.model.layers)
    ]
    try:
        return model(input_ids=ids, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("name", D0_PLANS)
@pytest.mark.parametrize("family", FAMILIES)
def test_d0_matches_the_reference_loop(family, name):
    model, plan, ids = family_model(family), Plan.parse(name), ids_batch()
    with torch.no_grad():
        expected, original = reference_logits(model, ids, plan), model(input_ids=ids).logits
        apply_plan(model, plan)
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-9, atol=1e-9)
    assert (expected - original).abs().max() > 1e-3  # the plan changes the output


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_generation_equals_recompute(family):
    model = family_model(family, torch.float32)
    prune = Prune(tuple(prunable_layers(model.config)[2:4]))  # never the slots transformers reads lengths from
    for plan in [*map(parse_plan, plans(family)), prune]:
        assert_cached_generation_equals_recompute(model, plan)


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_by_layer_equals_the_model(family):
    """decoder_inputs + run_layers + lm_logits == the model's forward (embedding scale, masks of each attention
    type, rotary, logit scaling), with left padding and a plan applied."""
    model = apply_plan(family_model(family), Plan.parse("S1-E7-P2-D0"))
    ids, mask = ids_batch(), torch.ones(2, 7, dtype=torch.long)
    mask[0, :2] = 0
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        hidden, kwargs = decoder_inputs(model, ids, mask)
        half = run_layers(model, hidden, kwargs, range(0, 3))  # restart inside the stack, as the search does
        logits = lm_logits(model, run_layers(model, half, kwargs, range(3, 8)))
    torch.testing.assert_close(logits, expected, rtol=0, atol=0, equal_nan=True)  # gemma2: NaN on padding rows


@pytest.mark.parametrize("family", sorted(FAMILY_LAYOUTS))
def test_layout_halves_make_the_layer(family):
    """Layer(x) == x + A(x) + M(x + A(x)): the layout's attention and MLP halves are the layer's own."""
    model, ids = family_model(family), ids_batch()
    parts = LAYOUTS[FAMILY_LAYOUTS[family]]
    with torch.no_grad():
        hidden, kwargs = decoder_inputs(model, ids)
        for i, layer in enumerate(model.model.layers):
            attn = parts.attention(layer, hidden, **kwargs[i])
            torch.testing.assert_close(layer(hidden, **kwargs[i]), hidden + attn + parts.mlp(layer, hidden + attn))
            hidden = layer(hidden, **kwargs[i])


@pytest.mark.parametrize("family", ["gemma3_text", "olmo2", "phi3", "cohere"])
def test_lora_and_save_load_keep_the_plan(family, tmp_path):
    """LoRA on every linear layer inside the groups == the plan on the merged weights; the saved model loads with
    its plan."""
    plan, ids = Plan.parse(plans(family)[-1]), ids_batch()
    student = get_peft_model(
        apply_plan(family_model(family), plan),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    )
    merged = apply_plan(remove_plan(student.merge_and_unload()), plan)
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=ids).logits, merged(input_ids=ids).logits)
    merged.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    restored, _ = load_model(str(tmp_path / "model"), dtype="float64")
    assert restored.config.cqil_plan == str(plan)
    with torch.no_grad():  # float64 round-off: a reloaded weight may take another BLAS path (docs/development.md)
        torch.testing.assert_close(restored(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=0, atol=1e-12)


def test_a_family_without_a_layout_runs_d0_and_refuses_the_rest():
    model = family_model("cohere")
    apply_plan(model, Plan.parse("S0-E8-P2-D0"))
    with pytest.raises(PlanError, match="family 'cohere' has no layer layout for bypass D=1: it runs CQIL with D = 0"):
        apply_plan(model, Plan.parse("S0-E8-P2-D1"))
    with pytest.raises(PlanError, match="has no layer layout for LP"):
        apply_plan(model, Plan.parse("S0-E8-P2-LP"))


def test_tensor_parallelism_refuses_what_it_cannot_split():
    from cqil.runtime import EngineError
    from cqil.runtime.tp import check_degree

    check_degree(family_model("gemma3_text").config, 2)
    with pytest.raises(EngineError, match="family 'phi3': tensor parallelism is not supported"):
        check_degree(family_model("phi3").config, 2)


def test_mixed_attention_types_really_are_mixed():
    # The point of gemma2 and qwen2 above: groups over both attention types, so each member's own mask matters.
    for family, group in (("gemma2", (0, 1)), ("gemma3_text", (4, 5)), ("qwen2", (2, 3))):
        types = layer_types(family_model(family).config)
        assert types[group[0]] != types[group[1]], family


# --- Two ranks: the engines against the one-process model -----------------------------------------------


def decode_logits(model, ids, steps=4):
    """Prefill logits, then `steps` cached greedy decode steps' logits, stacked: (steps + 1, B, V)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    logits = [out.logits[:, -1]]
    for _ in range(steps):
        out = model(input_ids=logits[-1].argmax(-1, keepdim=True), past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.stack(logits)


def engine_cases():
    """(family, engine, plan or degree, placement) of every engine run the matrix claims."""
    for family in FAMILIES:
        for name in plans(family):
            if Plan.parse(name).size == 2:  # two ranks
                yield family, "cqil", name, "replicated"
        yield family, "cqil", "S2-E6-P2-D0", "rank0"
        if family in TENSOR_PARALLEL:
            yield family, "tp", None, None


def engine_worker(rank: int, world: int, port: int, results):
    import os

    import torch.distributed as dist

    from cqil.runtime import Ranks, pin, tp
    from cqil.runtime import cqil as cqil_engine

    pin(Ranks(rank, world, torch.device("cpu")), threads=1)  # a core and a 1-thread pool per rank, as `cqil latency`
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ids = ids_batch(length=9)
    try:
        for family, engine, name, placement in engine_cases():
            reference = family_model(family)
            if engine == "cqil":
                apply_plan(reference, Plan.parse(name))
                model = cqil_engine.shard(family_model(family), Plan.parse(name), rank, placement)
            else:
                model = tp.shard(family_model(family), degree=world, device_type="cpu")
            with torch.no_grad():
                diff = (decode_logits(model, ids) - decode_logits(reference, ids)).abs().max().item()
            if rank == 0:
                results[(family, engine, name, placement)] = diff
    finally:
        dist.destroy_process_group()


def test_engines_on_two_ranks_equal_one_process():
    """Every family's CQIL engine (each of its plans; rank-0 placement too) and, where listed, TP, on 2 gloo
    ranks: prefill and 4 cached decode steps equal the one-process model in float64."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(engine_worker, args=(2, port, results), nprocs=2, join=True)
        results = dict(results)
    assert set(results) == set(engine_cases())
    assert {case: diff for case, diff in results.items() if diff > 1e-9} == {}


# --- The docs' matrix ------------------------------------------------------------------------------------


def matrix() -> str:
    header = "| family | layout | D = 0 | bypass | LP | TP | engine |\n|---|---|---|---|---|---|---|\n"
    rows = [
        f"| {family} | {FAMILY_LAYOUTS.get(family, 'whole layer only')} | "
        + " | ".join("yes" if ok else "no" for ok in modes(family).values())
        + " |"
        for family in FAMILIES
    ]
    return header + "\n".join(rows) + "\n"


def test_registries_are_all_tested():
    assert set(FAMILY_LAYOUTS) <= set(FAMILIES) and set(TENSOR_PARALLEL) <= set(FAMILIES)


def test_docs_matrix_is_current():
    assert matrix() in (ROOT / "docs" / "families.md").read_text(), "run: python tests/test_families.py"


if __name__ == "__main__":  # rewrite the matrix in docs/families.md, between its markers
    doc = ROOT / "docs" / "families.md"
    text = doc.read_text()
    begin, end = "<!-- matrix: python tests/test_families.py -->\n", "<!-- end of matrix -->"
    head, rest = text.split(begin)
    doc.write_text(head + begin + matrix() + end + rest.split(end)[1])
    sys.exit(0)
