"""LoRA + KD fine-tuning on tiny models: the loss, one step, gradient checkpointing, adapter-only checkpoints
and resume after a real kill."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file

from cqil import Plan, apply_plan
from cqil.errors import CqilError
from cqil.finetune import (
    FinetuneSettings,
    checkpoint_layers,
    finetune,
    lora_config,
    micro_batch,
    run_finetune,
    student_loss,
)
from cqil.layers import decoder_layers

IDS = torch.randint(3, 96, (4, 16), generator=torch.Generator().manual_seed(0))


def peft_student(plan, settings, dtype=torch.float32):
    from peft import get_peft_model

    model = apply_plan(tiny_model(dtype=dtype), plan)
    return get_peft_model(model, lora_config(plan, 8, settings))


def test_kd_loss_is_exactly_zero_without_a_change():
    settings = FinetuneSettings()
    student = peft_student(Plan.parse("S0-E8-P1-D0"), settings)  # one-layer groups: the original model
    assert student_loss(student, IDS, settings).item() == 0.0
    grouped = peft_student(Plan.parse("S2-E6-P2-D0"), settings)
    assert student_loss(grouped, IDS, settings).item() > 1e-3
    assert grouped.config.cqil_plan == "S2-E6-P2-D0"  # the teacher's forward put the plan back


def test_one_step_lowers_the_loss_on_a_fixed_batch(tmp_path):
    plan, settings = Plan.parse("S2-E6-P2-D1"), FinetuneSettings(steps=1, batch_size=4, lr=5e-3, lora_r=8)
    model = tiny_model(dtype=torch.float32)
    summary = finetune(model, plan, IDS, settings, tmp_path / "run", eval_blocks=IDS)
    assert summary["heldout_after"]["kl"] < summary["heldout_before"]["kl"]
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").exists()
    assert json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["r"] == 8


def test_lm_loss_and_grouped_targets():
    settings = FinetuneSettings(loss="kd+lm", lora_layers="grouped")
    student = peft_student(Plan.parse("S2-E6-P2-D0"), settings)
    trainable = {n.split(".layers.")[1].split(".")[0] for n, p in student.named_parameters() if p.requires_grad}
    assert trainable == {"2", "3", "4", "5"}
    assert student_loss(student, IDS, settings) > student_loss(student, IDS, FinetuneSettings())


def test_batches_are_a_pure_function_of_the_step():
    settings = FinetuneSettings(batch_size=3, grad_accum=2, seed=1)
    seen = torch.cat([micro_batch(10, settings, step, micro) for step in range(5) for micro in range(2)])
    assert sorted(seen[:10].tolist()) == list(range(10))  # the first epoch visits every block once
    assert torch.equal(micro_batch(10, settings, 3, 1), seen[7 * 3 : 8 * 3])


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(loss="mse"), "finetune.loss: 'mse' is not one of kd, lm, kd+lm"),
        (dict(kd_reduction="mean"), "is not one of token, official"),
        (dict(steps=0), "must be >= 1"),
        (dict(gradient_checkpointing="yes"), "finetune.gradient_checkpointing: 'yes' is not one of true, false"),
    ],
)
def test_bad_settings(settings, message):
    with pytest.raises(CqilError, match=re.escape(message)):
        FinetuneSettings(**settings)


def test_bad_device(tmp_path):
    with pytest.raises(CqilError, match=re.escape("device 'tpu': allowed are auto, cpu, cuda")):
        run_finetune(
            FinetuneSettings(),
            model="random:llama-135m",
            plan=Plan.parse("S2-E6-P2-D0"),
            corpus=tmp_path / "corpus.pt",
            out_dir=tmp_path,
            summary=tmp_path / "summary.json",
            device="tpu",
        )


def test_the_stage_trains_on_the_compact_split_as_on_int64_ids(tiny_dir, tmp_path, monkeypatch):
    """run_finetune hands the splits to finetune as the corpus file stores them (uint16 for this vocabulary,
    memory-mapped, no int64 copy of a split), and trains the same adapter, with the same losses and held-out
    scores, as on the same ids stored in int64."""
    train = torch.randint(3, 96, (6, 16), generator=torch.Generator().manual_seed(1))
    given, real = [], finetune

    def spy(model, plan, blocks, *args, eval_blocks, **kwargs):
        given.append((blocks.dtype, eval_blocks.dtype))
        return real(model, plan, blocks, *args, eval_blocks=eval_blocks, **kwargs)

    monkeypatch.setattr("cqil.finetune.finetune", spy)
    runs = {}
    for dtype in (torch.uint16, torch.int64):
        name = str(dtype).removeprefix("torch.")
        torch.save({"finetune": train.to(dtype), "test": IDS.to(dtype)}, tmp_path / f"{name}.pt")
        run_finetune(
            FinetuneSettings(steps=3, batch_size=2, lora_r=4, lr=1e-3),
            model=str(tiny_dir),
            plan=Plan.parse("S2-E6-P2-D0"),
            corpus=tmp_path / f"{name}.pt",
            out_dir=tmp_path / name,
            summary=tmp_path / f"{name}.json",
        )
        summary = json.loads((tmp_path / f"{name}.json").read_text())
        adapter = load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")
        runs[name] = (
            {key: summary[key] for key in ("first_loss", "last_loss", "heldout_before", "heldout_after")},
            adapter,
        )
    assert given == [(torch.uint16, torch.uint16), (torch.int64, torch.int64)]
    assert runs["uint16"][0] == runs["int64"][0]
    assert runs["uint16"][1].keys() == runs["int64"][1].keys()
    assert all(torch.equal(runs["uint16"][1][key], runs["int64"][1][key]) for key in runs["int64"][1])


def randomized_student(plan, settings, checkpointed):
    """A float64 student whose LoRA weights are random (peft starts B at zero, which leaves A without gradient)."""
    student = peft_student(plan, settings, dtype=torch.float64)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in (p for p in student.parameters() if p.requires_grad):
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) / 10)
    if checkpointed:
        checkpoint_layers(student)
    return student.train()


def step_on(student, settings):
    """One student_loss and its backward: the loss, the gradients, the layers whose MLP ran during the backward
    (a pre-hook: a recomputation may stop before the end of a layer) and the bytes autograd kept from the forward."""
    calls, saved = [], []
    for i, layer in enumerate(decoder_layers(student)):
        layer.mlp.register_forward_pre_hook(lambda module, args, i=i: calls.append(i))
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t
    ):
        loss = student_loss(student, IDS, settings)
    calls.clear()
    loss.backward()
    grads = {name: p.grad for name, p in student.named_parameters() if p.requires_grad}
    return loss, grads, sorted(calls), sum(saved)


def test_gradient_checkpointing_recomputes_every_layer_with_the_same_gradients():
    plan, settings = Plan.parse("S2-E6-P2-D1"), FinetuneSettings(loss="kd+lm")
    loss, grads, recomputed, kept = step_on(randomized_student(plan, settings, checkpointed=False), settings)
    loss_c, grads_c, recomputed_c, kept_c = step_on(randomized_student(plan, settings, checkpointed=True), settings)
    assert recomputed == [] and recomputed_c == list(range(8))  # every layer once, grouped ones inside their group
    assert kept_c < kept / 4  # what autograd holds from the forward: layer inputs, not their activations
    torch.testing.assert_close(loss_c, loss, rtol=1e-12, atol=0)
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-10, atol=1e-12)


def trained_with_mlp_calls(out_dir, gradient_checkpointing: bool):
    """Two steps of finetune on a float64 tiny model: its adapter, and how often layer 3's MLP ran (layer 3 is
    the second of its group, computed inside layer 2's group forward)."""
    model, calls = tiny_model(dtype=torch.float64), []
    decoder_layers(model)[3].mlp.register_forward_pre_hook(lambda module, args: calls.append(3))
    settings = FinetuneSettings(steps=2, batch_size=2, lr=5e-3, lora_r=4, gradient_checkpointing=gradient_checkpointing)
    finetune(model, Plan.parse("S2-E6-P2-D0"), IDS, settings, out_dir)
    return load_file(out_dir / "adapter" / "adapter_model.safetensors"), len(calls)


def test_the_setting_checkpoints_the_training_and_trains_the_same_adapter(tmp_path):
    adapter, calls = trained_with_mlp_calls(tmp_path / "plain", gradient_checkpointing=False)
    adapter_c, calls_c = trained_with_mlp_calls(tmp_path / "checkpointed", gradient_checkpointing=True)
    assert (calls, calls_c) == (2 * 2, 2 * 3)  # per step: student, teacher, and the recomputation in the backward
    assert adapter.keys() == adapter_c.keys()
    for name in adapter:
        torch.testing.assert_close(adapter_c[name], adapter[name], rtol=1e-10, atol=1e-12)


def test_resume_refuses_a_checkpoint_of_other_lora_settings(tmp_path):
    plan = Plan.parse("S2-E6-P2-D0")
    finetune(tiny_model(dtype=torch.float32), plan, IDS, FinetuneSettings(steps=1, batch_size=2, lora_r=2), tmp_path)
    with pytest.raises(CqilError, match=re.escape("its adapter does not match these settings (lora_r, lora_layers")):
        finetune(tiny_model(dtype=torch.float32), plan, IDS, FinetuneSettings(steps=2, batch_size=2), tmp_path)


def test_resume_after_a_kill_reaches_the_same_adapter(tiny_dir, tmp_path):
    torch.save(
        {"finetune": torch.randint(3, 96, (12, 16), generator=torch.Generator().manual_seed(1)), "test": IDS},
        tmp_path / "corpus.pt",
    )
    steps = 120  # the kill comes at the first checkpoint (step 5), long before the last step
    settings = json.dumps({"steps": steps, "batch_size": 2, "save_every": 5, "lora_r": 4, "lr": 1e-3})

    def command(name):
        return [
            sys.executable,
            "-m",
            "cqil",
            "--threads",
            "1",
            "finetune",
            "--model",
            str(tiny_dir),
            "--plan",
            "S2-E6-P2-D0",
            "--corpus",
            str(tmp_path / "corpus.pt"),
            "--settings",
            settings,
            "--out-dir",
            str(tmp_path / name),
            "--summary",
            str(tmp_path / f"{name}.json"),
        ]

    subprocess.run(command("straight"), check=True, capture_output=True)
    killed = subprocess.Popen(command("killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    step_file = tmp_path / "killed" / "checkpoint" / "step.json"
    deadline = time.time() + 120
    while not step_file.exists() and time.time() < deadline and killed.poll() is None:
        time.sleep(0.01)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "adapter").exists(), "the run finished before it could be killed"
    subprocess.run(command("killed"), check=True, capture_output=True)
    summary = json.loads((tmp_path / "killed.json").read_text())
    assert 0 < summary["resumed_at"] < steps
    straight = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=1e-5, atol=1e-6)
    losses = (tmp_path / "killed" / "losses.csv").read_text().splitlines()
    assert len(losses) == steps + 1 and losses == (tmp_path / "straight" / "losses.csv").read_text().splitlines()
    # The checkpoint holds the adapter, AdamW's two moments of it, the scheduler and the RNG state, not the model.
    checkpoint = tmp_path / "killed" / "checkpoint"
    sizes = {path.name: path.stat().st_size for path in checkpoint.iterdir()}
    assert set(sizes) == {
        "adapter.safetensors",
        "optimizer.bin",
        "custom_checkpoint_0.pkl",  # the scheduler
        "random_states_0.pkl",
        "step.json",
    }
    adapter = sum(t.numel() * t.element_size() for t in resumed.values())
    kept = load_file(checkpoint / "adapter.safetensors")
    assert sum(t.numel() * t.element_size() for t in kept.values()) == adapter and len(kept) == len(resumed)
    assert sizes["optimizer.bin"] < 3 * adapter
    assert sum(sizes.values()) < sum(path.stat().st_size for path in tiny_dir.glob("*.safetensors")) / 2


def test_two_processes_match_one(tiny_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo DDP, half of each micro-batch per rank) == one process; the two
    processes checkpoint their layers (gradient checkpointing under DDP, as a large model trains)."""
    torch.save(
        {"finetune": torch.randint(3, 96, (12, 16), generator=torch.Generator().manual_seed(1)), "test": IDS},
        tmp_path / "corpus.pt",
    )
    settings = {"steps": 6, "batch_size": 4, "save_every": 3, "lora_r": 4}

    def run(launcher, name, **extra):
        subprocess.run(
            [
                *launcher,
                "-m",
                "cqil",
                "--threads",
                "1",
                "finetune",
                "--model",
                str(tiny_dir),
                "--plan",
                "S2-E6-P2-D0",
                "--corpus",
                str(tmp_path / "corpus.pt"),
                "--settings",
                json.dumps(settings | extra),
                "--out-dir",
                str(tmp_path / name),
                "--summary",
                str(tmp_path / f"{name}.json"),
            ],
            check=True,
            capture_output=True,
            timeout=300,
        )
        return load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")

    one = run([sys.executable], "one")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = run(torchrun, "two", gradient_checkpointing=True)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5)
    lr = [line.split(",")[2] for line in (tmp_path / "two" / "losses.csv").read_text().splitlines()[1:]]
    assert lr == [line.split(",")[2] for line in (tmp_path / "one" / "losses.csv").read_text().splitlines()[1:]]
