"""lm-eval on the in-memory model (plan and adapters included), with task configs that run offline.

    lm_eval_tasks(model, tokenizer, ["arc_easy_local"], render_tasks(tmp, data_dir="../shared/data"))

The lm-eval tasks in `cqil/tasks/` are the harness's own task configs pointed at local files
(`dataset_path: json` / `csv`, `${data_dir}` filled in by `render_tasks`), so they run offline.
Stages: `run_evaluate` (one variant: the original, a plan zero-shot, or a plan with its fine-tuned
adapter) and `run_quality` (the table of every variant, with the held-out scores).
"""

from __future__ import annotations

import json
import random
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from string import Template

import pandas as pd
import torch

from .data import load_split
from .errors import CqilError
from .io import provenance, write_csv, write_json, write_markdown
from .models import load_model
from .plan import Plan

QUALITY_METRICS = ("acc", "acc_norm", "word_perplexity")  # of the lm-eval results, what the quality table keeps
HELDOUT_METRICS = ("perplexity", "kl", "top1")  # on the corpus's held-out blocks, against the original


@dataclass(frozen=True)
class EvaluateSettings:
    split: str = "test"  # corpus blocks that become the cqil_heldout / cqil_cloze tasks
    tasks: list = field(default_factory=lambda: ["cqil_heldout", "cqil_cloze"])  # also *_local tasks, or lm-eval's own
    data_dir: str | None = None  # evaluation data in the layout of ../shared/data (for the *_local tasks)
    limit: int | None = None  # documents per task (None: all)
    batch_size: int = 8
    cloze_choices: int = 4

    def __post_init__(self):  # checked before any model loads, and by check_config before any job
        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            raise CqilError(f"evaluate.data_dir: {self.data_dir!r} is not a directory")
        if self.data_dir is None and (local := [t for t in self.tasks if t.endswith("_local")]):
            raise CqilError(
                f"evaluate.tasks: {', '.join(local)}: local tasks need evaluate.data_dir (the layout of ../shared/data)"
            )


TASKS = Path(__file__).parent / "tasks"


def render_tasks(out_dir, data_dir=None, corpus_tasks=None) -> Path:
    """Write the task YAMLs of `cqil/tasks/` whose files are given, with absolute paths (lm-eval resolves
    relative ones against the working directory), to `out_dir`: the include path for `lm_eval_tasks`.

    data_dir: the evaluation data in the layout of ../shared/data (ARC, Winogrande, MMLU);
    corpus_tasks: the folder `build_corpus_tasks` wrote (cqil_heldout, cqil_cloze).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    values = {
        key: str(Path(value).resolve())
        for key, value in (("data_dir", data_dir), ("corpus_tasks", corpus_tasks))
        if value is not None
    }
    for template in TASKS.glob("*.yaml"):
        text = Template(template.read_text())
        if all(name in values for name in text.get_identifiers()):
            (out_dir / template.name).write_text(text.substitute(values))
    return out_dir


def build_corpus_tasks(blocks: torch.Tensor, tokenizer, out_dir, choices: int = 4, seed: int = 0) -> Path:
    """Two lm-eval tasks from held-out token blocks (B, T), needing no outside data:
    heldout.jsonl (each block's text, for rolling perplexity) and cloze.jsonl (each block's first half,
    its true second half and `choices - 1` second halves of other blocks, in a seeded order; at most as
    many choices as there are blocks)."""
    rng = random.Random(seed)
    choices = min(choices, len(blocks))  # a tiny test split cannot offer more distractors than it has blocks
    half = blocks.shape[1] // 2
    firsts = [tokenizer.decode(b[:half]) for b in blocks]
    seconds = [tokenizer.decode(b[half:]) for b in blocks]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cloze = []
    for i, context in enumerate(firsts):
        options = [seconds[i]] + rng.sample(seconds[:i] + seconds[i + 1 :], choices - 1)
        order = rng.sample(range(choices), choices)
        cloze.append({"context": context, "choices": [options[j] for j in order], "answer": order.index(0)})
    with open(out_dir / "heldout.jsonl", "w") as f:
        f.writelines(json.dumps({"text": tokenizer.decode(b)}) + "\n" for b in blocks)
    with open(out_dir / "cloze.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in cloze)
    return out_dir


def lm_eval_tasks(
    model,
    tokenizer,
    tasks: list[str],
    include_path,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
) -> dict:
    """lm-eval's `simple_evaluate` on the in-memory model: {task: {metric: value, metric_stderr: value}}."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(next(model.parameters()).device))
    local = {path.stem for path in Path(include_path).glob("*.yaml")}
    # lm-eval's own tasks (sciq, winogrande, ... from the Hub) only when asked: scanning them takes 13 s
    manager = TaskManager(include_path=str(include_path), include_defaults=not set(tasks) <= local)
    out = simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        bootstrap_iters=1000,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
    )
    return {
        task: {key.replace(",none", ""): value for key, value in metrics.items() if key != "alias"}
        for task, metrics in out["results"].items()
    }


def run_evaluate(
    settings: EvaluateSettings, *, model: str, corpus, out, dtype: str = "auto", plan: Plan | None = None, adapter=None
) -> None:
    """The stage: lm-eval tasks on the original, a plan (zero-shot) or a plan with its adapter (fine-tuned), as JSON."""
    if adapter and not plan:
        raise CqilError("--adapter needs --plan: adapters are trained for a plan")
    blocks = load_split(corpus, settings.split)
    loaded, tokenizer = load_model(model, plan=plan, dtype=dtype)
    if adapter:
        from peft import PeftModel

        loaded = PeftModel.from_pretrained(loaded, adapter).merge_and_unload()  # the plan stays applied
    with tempfile.TemporaryDirectory() as tmp:
        corpus_tasks = build_corpus_tasks(blocks, tokenizer, Path(tmp) / "corpus", choices=settings.cloze_choices)
        include = render_tasks(Path(tmp) / "tasks", data_dir=settings.data_dir, corpus_tasks=corpus_tasks)
        results = lm_eval_tasks(
            loaded, tokenizer, settings.tasks, include, limit=settings.limit, batch_size=settings.batch_size
        )
    stage = "finetuned" if adapter else "zeroshot" if plan else "original"
    write_json(
        out,
        {
            "plan": str(plan) if plan else "original",
            "stage": stage,
            "results": results,
            "provenance": provenance(
                {"model": model, "dtype": dtype, "adapter": adapter, "settings": asdict(settings)}, plan
            ),
        },
    )


def run_quality(inputs, *, out, scores=(), finetune=()) -> None:
    """The stage: the quality table of the original and each plan, zero-shot and fine-tuned, as a long CSV and a
    Markdown table beside it (a row per plan and stage). It holds lm-eval's metrics per task (`cqil evaluate`
    files) and the held-out perplexity, KL and top-1 agreement (`cqil score` and `cqil finetune` files)."""

    def rows_of(plan, stage, task, metrics, names):
        return [
            {
                "plan": plan,
                "stage": stage,
                "task": task,
                "metric": name,
                "value": metrics[name],
                "stderr": metrics.get(f"{name}_stderr"),
            }
            for name in names
            if name in metrics
        ]

    rows = []
    for i, path in enumerate(scores):
        record = json.loads(Path(path).read_text())
        rows += rows_of("original", "original", "heldout", record["original"], HELDOUT_METRICS) if i == 0 else []
        rows += rows_of(record["plan"]["plan"], "zeroshot", "heldout", record["plan"], HELDOUT_METRICS)
    for path in finetune:
        record = json.loads(Path(path).read_text())
        rows += rows_of(record["plan"], "finetuned", "heldout", record["heldout_after"] or {}, HELDOUT_METRICS)
    for path in inputs:
        record = json.loads(Path(path).read_text())
        for task, metrics in record["results"].items():
            rows += rows_of(record["plan"], record["stage"], task, metrics, QUALITY_METRICS)
    long = pd.DataFrame(rows)
    write_csv(out, long)
    table = long.assign(column=long.task + " " + long.metric).pivot_table(
        index=["plan", "stage"], columns="column", values="value", sort=False
    )
    write_markdown(Path(out).with_suffix(".md"), table.reset_index())
