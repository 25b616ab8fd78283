"""LoRA + KD fine-tuning on tiny models: the loss, one step, adapter-only checkpoints and resume after a real
kill."""

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
    finetune,
    lora_config,
    micro_batch,
    run_finetune,
    student_loss,
)

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
    ],
)
def test_bad_settings(settings, message):
    with pytest.raises(CqilError, match=re.escape(message)):
        FinetuneSettings(**settings)


def test_bad_device(tmp_path):
    with pytest.raises(CqilError, match=re.escape("device: 'tpu' is not one of auto, cpu, cuda")):
        run_finetune(
            FinetuneSettings(),
            model="random:llama-135m",
            plan=Plan.parse("S2-E6-P2-D0"),
            corpus=tmp_path / "corpus.pt",
            out_dir=tmp_path,
            summary=tmp_path / "summary.json",
            device="tpu",
        )


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
    settings = json.dumps({"steps": 400, "batch_size": 2, "save_every": 5, "lora_r": 4, "lr": 1e-3})

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
    assert 0 < summary["resumed_at"] < 400
    straight = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=1e-5, atol=1e-6)
    losses = (tmp_path / "killed" / "losses.csv").read_text().splitlines()
    assert len(losses) == 401 and losses == (tmp_path / "straight" / "losses.csv").read_text().splitlines()
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
    """torchrun with 2 CPU processes (gloo DDP, half of each micro-batch per rank) == one process."""
    torch.save(
        {"finetune": torch.randint(3, 96, (12, 16), generator=torch.Generator().manual_seed(1)), "test": IDS},
        tmp_path / "corpus.pt",
    )
    settings = json.dumps({"steps": 6, "batch_size": 4, "save_every": 3, "lora_r": 4})

    def run(launcher, name):
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
                settings,
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
    two = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], "two")
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5)
    lr = [line.split(",")[2] for line in (tmp_path / "two" / "losses.csv").read_text().splitlines()[1:]]
    assert lr == [line.split(",")[2] for line in (tmp_path / "one" / "losses.csv").read_text().splitlines()[1:]]
