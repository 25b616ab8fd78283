"""The memory estimate per job (cqil/memory.py), its check before any job, and `cqil cost` (cqil/cost.py)."""

import copy
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_config
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from cqil import memory
from cqil.cli import main
from cqil.config import check_config, merged
from cqil.errors import ConfigError
from cqil.finetune import FinetuneSettings, checkpoint_layers, lora_config
from cqil.memory import GIB, MIB, Shape, job_memory
from cqil.plan import Plan

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
DEFAULT = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
PAPER = merged(DEFAULT, yaml.safe_load((ROOT / "config" / "paper.yaml").read_text()))
# What config/paper.yaml needs for the check (docs/cost.md): each Hub model's shape, the A100-80GB's memory,
# and gradient checkpointing (33B); merged over it, a line already there changes nothing.
PAPER_SIZED = merged(
    PAPER,
    {
        "catalog": {name: {"shape": name} for name in ["llama-7b", "llama-13b", "llama-33b", "qwen1.5-14b"]},
        "finetune": {"gradient_checkpointing": True},
        "resources": {"default": {"gpu_mem_mb": 81920}},
    },
)
# The tiny llama of conftest in float32: 8 layers, hidden 64, intermediate 128, 4 heads, 2 KV heads of 16, vocab 96.
TINY = Shape(
    parameters=8 * 36992 + 2 * 96 * 64 + 64,  # layers; embeddings and head (untied); the final norm
    layer_parameters=2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64,  # q, o; k, v; gate, up, down; two norms
    layers=8,
    hidden=64,
    intermediate=128,
    kv=32,
    vocab=96,
    dtype_bytes=4,
)


def test_the_shape_of_a_local_model_is_counted_on_the_meta_device(tiny_dir):
    assert memory.model_shape(str(tiny_dir), None, "float32") == TINY
    assert memory.model_shape(str(tiny_dir), "llama-7b", "bfloat16").parameters == 6_738_415_616  # shape wins
    assert memory.model_shape("org/not-downloaded", None, "auto") is None  # a Hub id not in the cache


def test_each_term_on_the_tiny_shape_against_a_hand_calculation():
    assert memory.weight_bytes(TINY) == 308_288 * 4
    assert memory.layer_inputs_bytes(TINY, 256) == 8 * 256 * 64 * 4
    assert memory.kv_cache_bytes(TINY, 10) == 8 * 10 * 2 * 32 * 4
    assert memory.gram_chunk_bytes(TINY, 2, 33) == 8 * 2 * 4 * 64 * 8  # 4 positions of 8 layers: 32 of one
    corpus = {"corpus": {"blocks": {"finetune": 3}, "block_size": 16}}
    assert memory.mapped_split_bytes(TINY, corpus, "finetune") == 3 * 16 * 2  # uint16 ids for 96 of them
    assert memory.working_bytes(TINY, 10) == 10 * (3 * 128 + 3 * 64 + 2 * 32) * 4
    per = 8 * 128 + 25 * 64 + 4 * 32  # bytes a fine-tuned layer keeps per token in bf16: 2752
    assert memory.activation_bytes_per_token_layer(TINY) == per
    assert memory.train_activation_bytes(TINY, 256, False, 2) == 8 * 256 * per
    assert memory.train_activation_bytes(TINY, 256, True, 2) == 8 * 256 * 64 * 2 + 2 * 256 * per  # inputs + a group
    targets = FinetuneSettings().target_modules  # r x (in + out): q 128, k 96, v 96, o 128, gate/up/down 192 each
    assert memory.lora_parameters(TINY, 4, targets, 8) == 4 * 8 * (128 + 96 + 96 + 128 + 3 * 192)


def saved_bytes(layers: int, checkpointing: bool, tokens: int = 256) -> int:
    """Bytes of what autograd saves in a fine-tuning forward of a tiny bf16 LoRA model under bf16 autocast."""
    torch.manual_seed(0)
    config = tiny_config(
        layers=layers, hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_key_value_heads=8
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    plan = Plan.parse(f"S0-E{layers}-P2-D0")
    student = get_peft_model(model, lora_config(plan, layers, FinetuneSettings(lora_r=8)))
    if checkpointing:
        checkpoint_layers(model)
    weights = {p.untyped_storage().data_ptr() for p in student.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, config.vocab_size, (1, tokens))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        student(input_ids=ids, use_cache=False)
    return sum(saved.values())


def test_the_activation_term_is_what_autograd_keeps_per_layer():
    """The coefficients against a real forward: the saved bytes of 4 layers less those of 2, per token and layer."""
    shape = Shape(0, 0, 4, hidden=512, intermediate=1376, kv=512, vocab=96, dtype_bytes=2)
    kept = (saved_bytes(4, False) - saved_bytes(2, False)) / 2 / 256
    assert kept == pytest.approx(memory.activation_bytes_per_token_layer(shape), rel=0.05)
    inputs = (saved_bytes(4, True) - saved_bytes(2, True)) / 2 / 256
    assert inputs == 2 * 512  # with checkpointing a layer keeps its bf16 input alone


def test_33b_finetuning_needs_more_than_80_gib_without_checkpointing_and_less_with_it():
    without = merged(PAPER_SIZED, {"finetune": {"gradient_checkpointing": False}})
    assert (
        job_memory("finetune", "llama-33b", without).gpu
        > 80 * GIB
        > job_memory("finetune", "llama-33b", PAPER_SIZED).gpu
    )
    assert job_memory("finetune", "llama-33b", PAPER_SIZED).ranks == 4


def test_a_job_that_does_not_fit_fails_before_any_job_with_one_line():
    config = merged(PAPER_SIZED, {"finetune": {"gradient_checkpointing": False}})
    with pytest.raises(ConfigError) as err:
        memory.check_memory(config)
    assert str(err.value) == (
        "config.resources.finetune: finetune of llama-33b needs ~107 GiB per GPU, the GPU has 80 GiB: "
        "set finetune.gradient_checkpointing: true"
    )
    config = merged(PAPER_SIZED, {"evaluate": {"batch_size": 32}})
    with pytest.raises(
        ConfigError, match=r"evaluate of llama-33b needs ~92 GiB per GPU, .*: set evaluate.batch_size: 19$"
    ):
        memory.check_memory(config)
    small = {"resources": {"latency": {"mem_mb": 1000}}, "latency_setups": {"models": ["llama-135m"]}}
    config = merged(DEFAULT, small)  # 2 CPU ranks of the random llama-135m
    with pytest.raises(ConfigError) as err:
        check_config(config, SCHEMA)
    assert str(err.value) == (
        "config.resources.latency.mem_mb: latency of llama-135m needs ~4.1 GiB of host memory (2 processes), "
        "the job asks for 1000 MB: set resources.latency.mem_mb: 5000"
    )


def test_snakemake_stops_a_run_that_does_not_fit_before_any_job(tmp_path):
    (tmp_path / "small.yaml").write_text(
        "resources: {latency: {mem_mb: 1000}}\nlatency_setups: {models: [llama-135m]}\n"
    )
    result = subprocess.run(
        ["snakemake", "-n", "--cores", "1", "--configfile", str(tmp_path / "small.yaml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "cqil: error: config.resources.latency.mem_mb: latency of llama-135m needs" in result.stdout + result.stderr


def test_the_default_config_passes():
    check_config(copy.deepcopy(DEFAULT), SCHEMA)


def test_every_job_of_the_paper_config_sized_by_the_estimate_fits():
    """Every job of the paper run fits an A100-80GB and its mem_mb; the similarity of LLaMA-33B too, now that
    analysis.cosine_gram holds a float64 chunk of the layers' states and not three copies of all of them."""
    estimated = {(rule, model): job_memory(rule, model, PAPER_SIZED) for rule, model in memory.jobs(PAPER_SIZED)}
    assert None not in estimated.values() and len(estimated) == 8 * 4  # every model's shape is known
    assert all(need.gpu <= 81920 * MIB for need in estimated.values())
    assert all(
        need.host <= memory.rule_resources(PAPER_SIZED, rule)["mem_mb"] * MIB for (rule, _), need in estimated.items()
    )
    assert round(estimated["similarity", "llama-33b"].gpu / GIB, 1) == 64.5  # docs/cost.md
    # fine-tuning's 4 ranks each hold their runtimes (1 + 2 GiB); the mapped uint16 splits count once
    assert estimated["finetune", "llama-33b"].host == 4 * 3 * GIB + (256000 + 64) * 2048 * 2
    assert PAPER_SIZED == PAPER  # config/paper.yaml has the lines: the check of the run holds it to 80 GiB
    check_config(PAPER_SIZED, SCHEMA)


def test_cost_prints_the_gpu_hours_of_each_stage(tmp_path, capsys):
    overlay = tmp_path / "paper.yaml"
    overlay.write_text(
        yaml.safe_dump({"catalog": PAPER_SIZED["catalog"], "finetune": {"gradient_checkpointing": True}})
    )
    main(["cost", "--configfile", str(ROOT / "config" / "paper.yaml"), str(overlay), "--tflops", "124.8"])
    table = capsys.readouterr().out
    rows = {line.split(" | ")[0].strip("| *"): line for line in table.splitlines()[2:]}
    assert list(rows) == ["similarity", "sensitivity", "search", "score", "finetune", "evaluate", "latency", "total"]
    assert table in (ROOT / "docs" / "cost.md").read_text()  # the docs show what the command prints
