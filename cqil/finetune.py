"""LoRA + knowledge distillation: teach a CQIL model to match the original (the official recipe).

    summary = finetune(model, plan, train_blocks, FinetuneSettings(steps=60), out_dir, eval_blocks)
    run_finetune(FinetuneSettings(), model="smollm2-135m", plan=plan, corpus="corpus.pt", out_dir=out_dir,
                 summary="finetune.json")  # the stage: reads the corpus file, writes the adapter and the summary

Student: the model + LoRA adapters (peft) + the plan. Teacher: the same weights with the adapters
disabled and the plan removed, so one model sits in memory and each batch costs two forwards, as in
the official code (PAPER.md). Losses: `kd` = KL(teacher || student) at temperature T, `lm` = next-token
cross-entropy, or `kd+lm`. A plain loop over accelerate (one CPU, one GPU, or several processes under
`torchrun` / `accelerate launch`, where each rank takes its slice of every micro-batch and DDP averages
the gradients).

Each process computes on accelerate's device (`cuda:LOCAL_RANK` where CUDA is present), where the stage
loads the model. `gradient_checkpointing` recomputes each decoder layer's activations in the backward
(a CQIL group as one unit) instead of keeping those of every layer.

Resumable: every `save_every` steps the adapter (the trainable LoRA weights), optimizer, scheduler and RNG
states are saved with `accelerator.save_state` (to a temporary folder, then renamed), without the base
weights, which a resume has already loaded with the model; a new call with the same `out_dir` continues
from there, and the batch order is a pure function of (seed, step), so an interrupted and resumed run ends
with the same adapter as an uninterrupted one.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch.distributed._composable import checkpoint as checkpoint_activations
from tqdm.auto import tqdm
from transformers import get_scheduler

from .data import open_split
from .errors import CqilError
from .io import atomic, provenance, write_csv, write_json
from .layers import decoder_layers
from .metrics import add_sums, log_probs, summarize, token_sums
from .models import load_model
from .plan import Plan, Prune
from .report import loss_figure
from .runtime import resolve_device
from .transform import apply_plan, planned

LOSSES = ("kd", "lm", "kd+lm")
KD_REDUCTIONS = ("token", "official")
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER_STATE = "adapter.safetensors"  # the trainable weights in a resumable checkpoint


@dataclass(frozen=True)
class FinetuneSettings:
    split: str = "finetune"  # corpus blocks to train on
    eval_split: str = "test"  # held-out blocks: KL to the original before and after
    steps: int = 60  # optimizer steps
    batch_size: int = 4  # blocks per micro-batch (over all ranks)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 5e-4  # peak learning rate (official: 1e-4 for 8000 steps)
    schedule: str = "linear"  # any transformers scheduler name: linear, cosine, constant, ...
    warmup_steps: int = 0
    weight_decay: float = 0.1
    max_grad_norm: float | None = None  # None: no clipping (official)
    loss: str = "kd"  # kd | lm | kd+lm
    lm_weight: float = 1.0  # weight of the lm term in kd+lm
    temperature: float = 1.0  # KD temperature T; the KD term is scaled by T^2
    kd_reduction: str = "token"  # token: mean over tokens | official: sum over positions and vocab / batch
    lora_r: int = 32
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_layers: str = "all"  # all (official) | grouped: only the layers inside [S, E)
    target_modules: list = field(default_factory=lambda: list(ALL_TARGETS))
    seed: int = 42
    save_every: int = 10  # steps between resumable checkpoints
    mixed_precision: str = "auto"  # auto: bf16 on a GPU that has it, else none | no | bf16 | fp16
    gradient_checkpointing: bool = False  # recompute each decoder layer in the backward: one layer's activations held

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise CqilError(f"finetune.loss: {self.loss!r} is not one of {', '.join(LOSSES)}")
        if self.kd_reduction not in KD_REDUCTIONS:
            raise CqilError(f"finetune.kd_reduction: {self.kd_reduction!r} is not one of {', '.join(KD_REDUCTIONS)}")
        if self.lora_layers not in ("all", "grouped"):
            raise CqilError(f"finetune.lora_layers: {self.lora_layers!r} is not one of all, grouped")
        if min(self.steps, self.batch_size, self.grad_accum, self.save_every) < 1:
            raise CqilError("finetune: steps, batch_size, grad_accum and save_every must be >= 1")
        if not isinstance(self.gradient_checkpointing, bool):
            raise CqilError(
                f"finetune.gradient_checkpointing: {self.gradient_checkpointing!r} is not one of true, false"
            )


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float, reduction: str) -> torch.Tensor:
    """KL(teacher || student) over the vocabulary at temperature T, times T^2; logits (B, T, V)."""
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = F.kl_div(s, t, log_target=True, reduction="sum") * temperature**2
    return kl / (student.shape[0] * student.shape[1] if reduction == "token" else student.shape[0])


def lora_config(plan: Plan | Prune, num_layers: int, settings: FinetuneSettings) -> LoraConfig:
    layers = range(plan.start, plan.end) if settings.lora_layers == "grouped" else range(num_layers)
    removed = plan.removed if isinstance(plan, Prune) else ()  # a pruned model has no such layers to adapt
    return LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=settings.target_modules,
        layers_to_transform=[i for i in layers if i not in removed],
        task_type="CAUSAL_LM",
    )


def student_loss(student, input_ids: torch.Tensor, settings: FinetuneSettings, forward=None) -> torch.Tensor:
    """The training loss of one micro-batch (B, T): the teacher is the same model, adapters and plan off.

    `forward` is the student as the trainer wraps it (DDP under several processes), `student` the peft model.
    No KV cache: it would hold every layer's keys and values to the end of the forward, and a checkpointed
    layer's recomputation would append to it a second time.
    """
    logits = (forward or student)(input_ids=input_ids, use_cache=False).logits
    loss = 0.0
    if "kd" in settings.loss:
        with torch.no_grad(), student.disable_adapter(), planned(student, None):
            teacher = student(input_ids=input_ids, use_cache=False).logits
        loss = loss + kd_loss(logits, teacher, settings.temperature, settings.kd_reduction)
    if "lm" in settings.loss:
        weight = settings.lm_weight if settings.loss == "kd+lm" else 1.0
        loss = loss + weight * F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())
    return loss


@torch.inference_mode()
def divergence(student, blocks: torch.Tensor, batch_size: int = 4) -> dict:
    """Perplexity, KL(original || student) and top-1 agreement of the student on held-out blocks."""
    total = {}
    device = next(student.parameters()).device
    for batch in blocks.split(batch_size):
        batch = batch.long().to(device)  # blocks may be the corpus's compact ids (data.open_split)
        with student.disable_adapter(), planned(student, None):
            reference = log_probs(student(input_ids=batch, use_cache=False).logits)
        logp = log_probs(student(input_ids=batch, use_cache=False).logits)
        total = add_sums(total, token_sums(logp, batch, reference))
    return summarize(total)


def micro_batch(n_blocks: int, settings: FinetuneSettings, step: int, micro: int) -> torch.Tensor:
    """Block indices of micro-batch `micro` of step `step`: epochs are seeded permutations of the blocks,
    read in order, so the batches of any step are known without replaying the steps before it."""
    first = (step * settings.grad_accum + micro) * settings.batch_size
    return torch.tensor(
        [
            _epoch_order(n_blocks, settings.seed, q // n_blocks)[q % n_blocks]
            for q in range(first, first + settings.batch_size)
        ]
    )


@functools.lru_cache(maxsize=8)
def _epoch_order(n_blocks: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def checkpoint_layers(model) -> None:
    """Gradient checkpointing: each decoder layer keeps only its input for the backward and computes its
    activations again there, so the backward holds one layer's activations at a time, for one more forward.

    transformers' own checkpointing wraps the decoder layer class's `forward`, which the plan's per-layer
    forwards (transform.py) shadow, so it would skip every CQIL group. torch's composable checkpoint hooks the
    module call instead, whatever forward that runs, and leaves the parameter names (peft's, the adapter's)
    as they are. A group's last layer computes the whole group, which is recomputed as one unit.
    """
    for layer in decoder_layers(model):
        checkpoint_activations(layer)


def _mixed_precision(choice: str, on_cpu: bool) -> str:
    if choice != "auto":
        return choice
    return "bf16" if not on_cpu and torch.cuda.is_bf16_supported() else "no"


def training_state(model, plan: Plan | Prune, settings: FinetuneSettings, device: str = "auto"):
    """The accelerator, the LoRA student (as accelerate wraps it, and unwrapped), its optimizer and scheduler:
    the plan applied to `model`, only the adapter in the checkpoints."""
    # accelerate puts each process on cuda:LOCAL_RANK, which resolve_device also gives (and checks) unless on the CPU
    on_cpu = resolve_device(device).type == "cpu"
    accelerator = Accelerator(mixed_precision=_mixed_precision(settings.mixed_precision, on_cpu), cpu=on_cpu)
    set_seed(settings.seed)
    apply_plan(model, plan)
    student = get_peft_model(model, lora_config(plan, len(decoder_layers(model)), settings))
    if settings.gradient_checkpointing:
        checkpoint_layers(model)
    optimizer = torch.optim.AdamW(
        [p for p in student.parameters() if p.requires_grad], lr=settings.lr, weight_decay=settings.weight_decay
    )
    scheduler = get_scheduler(
        settings.schedule, optimizer, num_warmup_steps=settings.warmup_steps, num_training_steps=settings.steps
    )
    # The scheduler stays outside `prepare`: accelerate's wrapper steps it once per process per step.
    student, optimizer = accelerator.prepare(student, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    inner = accelerator.unwrap_model(student)
    _checkpoint_the_adapter_only(accelerator, inner)
    return accelerator, student, inner, optimizer, scheduler


def resumed_step(accelerator, checkpoint: Path) -> int:
    """The step `checkpoint` left off at, its state loaded (0 without one). A run killed while swapping
    checkpoints resumes from the previous one, which is whole."""
    old = checkpoint.with_name(checkpoint.name + ".old")
    if not (checkpoint / "step.json").exists() and (old / "step.json").exists() and accelerator.is_main_process:
        os.replace(old, checkpoint)
    accelerator.wait_for_everyone()
    if not (checkpoint / "step.json").exists():
        return 0
    accelerator.load_state(str(checkpoint))
    start = json.loads((checkpoint / "step.json").read_text())["step"]
    accelerator.print(f"resuming from step {start} ({checkpoint})")
    return start


def train_step(accelerator, student, inner, optimizer, scheduler, blocks, settings: FinetuneSettings, step) -> float:
    """One optimizer step over `grad_accum` micro-batches (each rank its share of each); the loss, mean over ranks."""
    total = 0.0
    for micro in range(settings.grad_accum):
        ids = blocks[micro_batch(len(blocks), settings, step, micro)].long()  # from compact ids
        ids = ids[accelerator.process_index :: accelerator.num_processes].to(accelerator.device)
        loss = student_loss(inner, ids, settings, forward=student) / settings.grad_accum
        accelerator.backward(loss)
        total += loss.item()
    total = accelerator.reduce(torch.tensor(total, device=accelerator.device), reduction="mean").item()
    if settings.max_grad_norm:
        accelerator.clip_grad_norm_(student.parameters(), settings.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return total


def finetune(
    model,
    plan: Plan | Prune,
    blocks: torch.Tensor,
    settings: FinetuneSettings,
    out_dir,
    eval_blocks: torch.Tensor | None = None,
    checkpoint_dir=None,
    device: str = "auto",
) -> dict:
    """Fine-tune LoRA adapters for `plan`; writes `out_dir`/adapter (peft format) and losses.csv.

    `blocks` and `eval_blocks` are token ids (B, T) of any integer type, e.g. a memory-mapped split of compact
    ids (data.open_split): each batch is read and taken as int64 when it is used.
    Returns the summary: steps, seconds, first and last loss, and held-out divergence before/after.
    """
    out_dir = Path(out_dir)
    checkpoint = Path(checkpoint_dir or out_dir / "checkpoint")
    accelerator, student, inner, optimizer, scheduler = training_state(model, plan, settings, device)
    losses_path = out_dir / "losses.csv"
    start = resumed_step(accelerator, checkpoint)
    before = divergence(inner, eval_blocks) if eval_blocks is not None and start == 0 else None
    rows = _read_losses(losses_path)[:start]

    student.train()
    began = time.perf_counter()
    bar = tqdm(range(start, settings.steps), desc=f"finetune {plan}", disable=not accelerator.is_main_process)
    for step in bar:
        total = train_step(accelerator, student, inner, optimizer, scheduler, blocks, settings, step)
        rows.append({"step": step + 1, "loss": total, "lr": scheduler.get_last_lr()[0]})
        bar.set_postfix(loss=f"{total:.4f}")
        if (step + 1) % settings.save_every == 0 or step + 1 == settings.steps:
            _save_checkpoint(accelerator, checkpoint, step + 1, rows, losses_path)
    student.eval()
    seconds = time.perf_counter() - began

    if accelerator.is_main_process:
        _save_adapter(inner, out_dir / "adapter")
    after = divergence(inner, eval_blocks) if eval_blocks is not None else None
    return {
        "plan": str(plan),
        "steps": settings.steps,
        "resumed_at": start,
        "seconds_this_run": seconds,
        "first_loss": rows[0]["loss"] if rows else None,
        "last_loss": rows[-1]["loss"] if rows else None,
        "heldout_before": before,
        "heldout_after": after,
        "settings": asdict(settings),
    }


def _read_losses(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as f:
        return [{"step": int(r["step"]), "loss": float(r["loss"]), "lr": float(r["lr"])} for r in csv.DictReader(f)]


def _save_checkpoint(accelerator, checkpoint: Path, step: int, rows: list[dict], losses_path: Path) -> None:
    """Resumable state, written beside its final place and swapped in, so a kill never leaves half a checkpoint."""
    staged = checkpoint.with_name(checkpoint.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
    accelerator.wait_for_everyone()  # every rank writes its own RNG state into the staged folder
    accelerator.save_state(str(staged))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (staged / "step.json").write_text(json.dumps({"step": step}))
        # The losses first, then the checkpoint: a kill between the two leaves more rows than the checkpoint's
        # step, which resume cuts back (rows[:start]); the other order could leave fewer, and lose steps.
        with atomic(losses_path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["step", "loss", "lr"])
            writer.writeheader()
            writer.writerows(rows)
        old = checkpoint.with_name(checkpoint.name + ".old")
        if checkpoint.exists():
            os.replace(checkpoint, old)
        os.replace(staged, checkpoint)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _checkpoint_the_adapter_only(accelerator, student) -> None:
    """Make `save_state` write the trainable weights instead of the whole model (13-65 GB for 7B-33B), and
    `load_state` read them back: the base weights never change, and every rank has loaded them already."""
    trainable = {name: p for name, p in student.named_parameters() if p.requires_grad}

    def save(models, weights, output_dir):
        weights.clear()
        if accelerator.is_main_process:
            save_file({name: p.detach() for name, p in trainable.items()}, Path(output_dir) / ADAPTER_STATE)

    def load(models, input_dir):
        models.clear()
        _load_trainable(trainable, Path(input_dir) / ADAPTER_STATE)

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def _load_trainable(trainable: dict, path: Path) -> None:
    if not path.exists():
        raise CqilError(
            f"finetune checkpoint {path.parent}: no {path.name} (a checkpoint of an older cqil, with the whole "
            f"model); delete the folder to start over"
        )
    state = load_file(path)
    if {name: t.shape for name, t in state.items()} != {name: p.shape for name, p in trainable.items()}:
        raise CqilError(
            f"finetune checkpoint {path.parent}: its adapter does not match these settings (lora_r, lora_layers, "
            f"target_modules); delete the folder to start over"
        )
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(state[name])


def _save_adapter(student, target: Path) -> None:
    staged = target.with_name(target.name + ".tmp")
    shutil.rmtree(staged, ignore_errors=True)
    student.save_pretrained(staged)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staged, target)


def run_finetune(
    settings: FinetuneSettings,
    *,
    model: str,
    plan: Plan | Prune,
    corpus,
    out_dir,
    summary,
    dtype: str = "auto",
    figure=None,
    device: str = "auto",
) -> None:
    """The stage: fine-tune `plan`'s adapters (resuming from `out_dir`'s checkpoint), write the summary JSON
    and, with `figure`, the loss curve. The model is loaded straight onto this process's device (`device` auto:
    `cuda:LOCAL_RANK` where CUDA is present, else the CPU), where accelerate trains it."""
    where = resolve_device(device)
    # memory-mapped, as stored: the fine-tuning split in int64 would be several GiB in every rank
    blocks, held_out = open_split(corpus, settings.split), open_split(corpus, settings.eval_split)
    student = load_model(model, dtype=dtype, device=where)[0]
    found = finetune(student, plan, blocks, settings, out_dir, eval_blocks=held_out, device=device)
    settings_used = {"model": model, "dtype": dtype, "device": str(where), "settings": asdict(settings)}
    write_json(summary, found | {"provenance": provenance(settings_used, plan)})
    if figure:
        loss_figure(pd.read_csv(Path(out_dir) / "losses.csv"), f"{plan}: fine-tuning", figure)


def run_finetuned_table(inputs, *, out) -> None:
    """The stage: the `cqil finetune` summaries as one CSV (`finetuned.csv`), each plan's losses and held-out
    quality before and after fine-tuning."""
    records = [json.loads(Path(path).read_text()) for path in inputs]
    write_csv(
        out,
        pd.DataFrame(
            [
                {
                    "plan": r["plan"],
                    "steps": r["steps"],
                    "first_loss": r["first_loss"],
                    "last_loss": r["last_loss"],
                    **{
                        f"{key}_{when}": (r[f"heldout_{when}"] or {}).get(key)
                        for when in ("before", "after")
                        for key in ("perplexity", "kl", "top1")
                    },
                }
                for r in records
            ]
        ),
    )
