"""Evaluate one variant on real benchmarks: lm-eval on the in-memory model (plan and adapters included), offline,
and WikiText-2 perplexity; every question's score is kept, for the paired intervals of `quality.py`.

    lm_eval_tasks(model, tokenizer, ["arc_easy_local"], render_tasks(tmp, data_dir="data"))
    run_evaluate(EvaluateSettings(), model="smollm2-135m", out="eval/original.json")   # the stage

The lm-eval tasks in `cqil/tasks/` are the harness's own task configs pointed at local files
(`dataset_path: json` / `csv`, `${data_dir}` filled in by `render_tasks`), so they run offline; the data
of the default ships in `data/` (provenance: data/SOURCES.md). A group file there wraps lm-eval's own Hub
tasks (`mmlu_5shot`: the paper's MMLU 5-shot) and is scored as one task. `questions` evaluates a seeded subset
of a task, the same questions for every variant, so that differences between variants are paired.
"""

from __future__ import annotations

import json
import random
import re
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from functools import reduce
from pathlib import Path
from string import Template

import torch
import yaml

from .data import load_split
from .errors import CqilError
from .io import provenance, write_json
from .metrics import add_sums, block_nll, summarize
from .models import load_model
from .plan import Plan, Prune
from .runtime import resolve_device

TASKS = Path(__file__).parent / "tasks"
CORPUS_TASKS = ("cqil_heldout", "cqil_cloze")  # built from the corpus's test blocks (no outside data)
TASK_ITEMS = ("acc", "acc_norm")  # the per-question scores kept of a multiple-choice task


def local_tasks() -> dict[str, str]:
    """The task YAMLs shipped in `cqil/tasks/`: name -> template text."""
    return {path.stem: path.read_text() for path in sorted(TASKS.glob("*.yaml"))}


def task_files(template: str, data_dir) -> list[Path]:
    """The data files (or glob patterns) a task template reads, under `data_dir`."""
    return [Path(data_dir) / name for name in re.findall(r"\$\{data_dir\}/(\S+)", template)]


def lm_eval_members(task: str) -> list[str]:
    """The lm-eval tasks that a group file of `cqil/tasks/` is built on (its `task:` list); none for a task file."""
    template = local_tasks().get(task)
    config = yaml.safe_load(template) if template else {}
    return list(config["task"]) if "group" in config else []


def hub_tasks(tasks) -> list[str]:
    """lm-eval's own tasks that evaluating `tasks` reads from the Hub, which `prepare_tasks` fetches: the names
    that are not ours, and the tasks that our group files are built on (mmlu for mmlu_5shot)."""
    local = local_tasks()
    theirs = [task for task in tasks if task not in local and task not in CORPUS_TASKS]
    return list(dict.fromkeys(theirs + [member for task in tasks for member in lm_eval_members(task)]))


def present(path: Path) -> bool:
    """A file, or a glob pattern that matches at least one."""
    return path.is_file() if "*" not in path.name else any(path.parent.glob(path.name))


@dataclass(frozen=True)
class EvaluateSettings:
    data_dir: str | None = "data"  # evaluation data in the layout of data/ (the *_local tasks)
    tasks: list = field(  # *_local tasks (cqil/tasks/), cqil_heldout / cqil_cloze (the corpus), or lm-eval's own
        default_factory=lambda: [
            "arc_easy_local",
            "arc_challenge_local",
            "piqa_local",
            "winogrande_local",
            "openbookqa_local",
        ]
    )
    questions: dict = field(  # task -> a seeded subset of this many questions (a task not named here: all of it)
        default_factory=lambda: {
            "arc_easy_local": 500,
            "arc_challenge_local": 100,
            "piqa_local": 500,
            "winogrande_local": 100,
            "openbookqa_local": 200,
        }
    )
    seed: int = 0  # of the question subsets
    wikitext: str | None = "data/wikitext-2-raw/wiki.test.raw"  # WikiText-2 raw test: perplexity (null: none)
    wikitext_tokens: int = 8192  # its budget: the first this many tokens of the file ...
    wikitext_block: int = 512  # ... in blocks of this many, each scored on its own
    split: str = "test"  # corpus blocks that become the cqil_heldout / cqil_cloze tasks, when asked for
    cloze_choices: int = 4
    limit: int | None = None  # lm-eval's own cut: the first n documents of every task (for tests)
    batch_size: int = 8

    def __post_init__(self):  # checked before any model loads, and by check_config before any job
        local = local_tasks()
        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            raise CqilError(f"evaluate.data_dir: {self.data_dir!r} is not a directory")
        for i, task in enumerate(self.tasks):
            if task.endswith("_local") and task not in local:
                raise CqilError(f"evaluate.tasks[{i}]: {task!r} is not a local task (allowed: {', '.join(local)})")
            if task in local and "${data_dir}" in local[task]:
                if self.data_dir is None:
                    raise CqilError(f"evaluate.tasks[{i}]: {task} needs evaluate.data_dir (the layout of data/)")
                if missing := [str(p) for p in task_files(local[task], self.data_dir) if not present(p)]:
                    raise CqilError(
                        f"evaluate.tasks[{i}]: {task} reads {missing[0]}, which is not there "
                        f"(evaluate.data_dir: {self.data_dir})"
                    )
        if unknown := [t for t in self.tasks if t not in local and not known_lm_eval_task(t)]:
            raise CqilError(
                f"evaluate.tasks: {unknown[0]!r} is neither a task of cqil/tasks/ ({', '.join(local)}) "
                f"nor one of lm-eval's"
            )
        for task, count in self.questions.items():  # a task not in `tasks` is ignored: an overlay may drop tasks
            if not isinstance(count, int) or count < 1:
                raise CqilError(f"evaluate.questions.{task}: {count!r} is not a count of questions (>= 1)")
        if self.wikitext is not None and not Path(self.wikitext).is_file():
            raise CqilError(f"evaluate.wikitext: {self.wikitext!r} not found")


def known_lm_eval_task(name: str) -> bool:
    """Whether lm-eval ships a task (or group) of this name; it scans its task folder (seconds), so only
    names that are not ours get here."""
    from lm_eval.tasks import TaskManager

    return name in TaskManager().all_tasks


def render_tasks(out_dir, data_dir=None, corpus_tasks=None) -> Path:
    """Write the task YAMLs of `cqil/tasks/` whose files are given, with absolute paths (lm-eval resolves
    relative ones against the working directory), and those that read no file of ours (a group of lm-eval's
    Hub tasks), to `out_dir`: the include path for `lm_eval_tasks`.

    data_dir: the evaluation data in the layout of data/ (ARC, PIQA, Winogrande, OpenBookQA; MMLU, BoolQ);
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
    questions: dict | None = None,
    seed: int = 0,
) -> tuple[dict, dict]:
    """lm-eval's `simple_evaluate` on the in-memory model.

    Returns {task: {metric: value, metric_stderr: value}} and, for multiple-choice tasks, every question's
    scores {task: {"doc_id": [...], "acc": [...], "acc_norm": [...], "choices": [...]}} (a group as one task).
    `questions` asks for a seeded subset of a task's questions (the same for every model: the indices depend on
    the seed alone).
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(next(model.parameters()).device))
    local = {path.stem for path in Path(include_path).glob("*.yaml")}
    # lm-eval's own tasks (sciq, winogrande, ... from the Hub) only when asked: scanning them is slow
    defaults = not set(tasks) <= local or any(lm_eval_members(task) for task in tasks)
    manager = TaskManager(include_path=str(include_path), include_defaults=defaults)
    questions = {task: count for task, count in (questions or {}).items() if task in tasks}
    samples = question_subsets(manager.load(tasks), questions, seed) if questions else None
    out = simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=manager,
        limit=None if samples else limit,
        samples=samples,
        num_fewshot=num_fewshot,
        bootstrap_iters=1000,
        log_samples=True,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
    )
    results = {
        task: {key.replace(",none", ""): value for key, value in metrics.items() if key != "alias"}
        for task, metrics in out["results"].items()
    }
    return results, question_items(out, tasks)


def subtasks(name: str, groups: dict) -> list[str]:
    """The tasks that a group holds, through its subgroups (a task: itself), given lm-eval's group -> children."""
    return [leaf for child in groups[name] for leaf in subtasks(child, groups)] if name in groups else [name]


def question_subsets(loaded: dict, questions: dict, seed: int) -> dict[str, list[int]]:
    """lm-eval's `samples` (it takes them for every task or none): a named task's seeded subset, all of the others.
    A group is evaluated whole: lm-eval reads an empty subset of one of its subtasks as all of it."""
    sizes = {task: len(built.eval_docs) for task, built in loaded["tasks"].items()}
    for group in questions.keys() & loaded["group_map"].keys():
        total = sum(sizes[task] for task in subtasks(group, loaded["group_map"]))
        if questions[group] < total:
            raise CqilError(
                f"evaluate.questions.{group}: {questions[group]} of its {total} questions, but a group of tasks "
                f"is evaluated whole (give {total} or leave it out)"
            )
    return {task: subset(size, questions.get(task, size), seed, task) for task, size in sizes.items()}


def question_items(out: dict, tasks: list[str]) -> dict:
    """Every question's scores per multiple-choice task asked for. A group's subtasks count as one task (one row
    in the quality table, like one task of a paper), their questions numbered on from one subtask to the next in
    name order."""
    groups = out.get("group_subtasks", {})
    owner = {task: name for name in tasks for task in subtasks(name, groups)}
    rows, offset = defaultdict(list), defaultdict(int)
    for task in sorted(out.get("samples", {})):
        name = owner.get(task, task)
        rows[name] += [row | {"doc_id": offset[name] + row["doc_id"]} for row in out["samples"][task]]
        offset[name] += out["n-samples"][task]["original"]
    items = {}
    for name, found in rows.items():
        if found and "acc" in found[0]:  # multiple choice: one row per question
            found = sorted(found, key=lambda row: row["doc_id"])
            items[name] = {
                "doc_id": [row["doc_id"] for row in found],
                "choices": [len(row["filtered_resps"]) for row in found],
                **{metric: [row[metric] for row in found] for metric in TASK_ITEMS if metric in found[0]},
            }
    return items


def subset(total: int, count: int, seed: int, task: str) -> list[int]:
    """`count` of a task's `total` question indices, sorted, drawn with a seed of its own (all if count >= total)."""
    if count >= total:
        return list(range(total))
    return sorted(random.Random(f"{seed}/{task}").sample(range(total), count))


def wikitext_text(path) -> str:
    """WikiText-2 raw as stored in data/: its rows joined by CRLF (the blank rows left out), read back as lines."""
    rows = Path(path).read_bytes().decode("utf-8").split("\r\n")
    return "\n".join(row for row in rows if row)


@torch.inference_mode()
def wikitext_perplexity(model, tokenizer, path, tokens: int, block: int) -> tuple[dict, dict]:
    """Perplexity on the first `tokens` tokens of WikiText-2, in blocks of `block` scored on their own; and each
    block's mean NLL (the items that the paired intervals resample)."""
    ids = tokenizer(wikitext_text(path), return_tensors="pt", add_special_tokens=False)["input_ids"][0][:tokens]
    blocks = block_nll(model, ids, block)
    mean = torch.tensor([b["nll"] / b["tokens"] for b in blocks], dtype=torch.float64)
    stderr = float(mean.std() / len(mean) ** 0.5) if len(mean) > 1 else float("nan")  # of the mean NLL, over blocks
    return (
        summarize(reduce(add_sums, blocks, {})) | {"nll_stderr": stderr, "blocks": len(blocks)},
        {"doc_id": list(range(len(blocks))), "nll": mean.tolist(), "tokens": [b["tokens"] for b in blocks]},
    )


def task_scores(model, tokenizer, settings: EvaluateSettings, blocks=None) -> tuple[dict, dict]:
    """lm-eval's results and every question's score on the settings' tasks: our task files rendered for the
    settings' data, with the corpus tasks built from `blocks` (the corpus's test blocks; None: none asked for)."""
    with tempfile.TemporaryDirectory() as tmp:
        built = None
        if blocks is not None:
            built = build_corpus_tasks(blocks, tokenizer, Path(tmp) / "corpus", settings.cloze_choices)
        include = render_tasks(Path(tmp) / "tasks", data_dir=settings.data_dir, corpus_tasks=built)
        return lm_eval_tasks(
            model,
            tokenizer,
            settings.tasks,
            include,
            limit=settings.limit,
            batch_size=settings.batch_size,
            questions=settings.questions,
            seed=settings.seed,
        )


def run_evaluate(
    settings: EvaluateSettings,
    *,
    model: str,
    out,
    corpus=None,
    dtype: str = "auto",
    plan: Plan | Prune | None = None,
    adapter=None,
    device: str = "auto",
) -> None:
    """The stage: lm-eval tasks and WikiText-2 perplexity on the original, a plan (zero-shot) or a plan with its
    adapter (fine-tuned), with every question's score, as JSON."""
    if adapter and not plan:
        raise CqilError("--adapter needs --plan: adapters are trained for a plan")
    corpus_tasks = [task for task in settings.tasks if task in CORPUS_TASKS]
    if corpus_tasks and corpus is None:
        raise CqilError(f"--corpus: the tasks {', '.join(corpus_tasks)} are built from the corpus's test blocks")
    blocks = load_split(corpus, settings.split) if corpus_tasks else None
    where = resolve_device(device)
    loaded, tokenizer = load_model(model, plan=plan, dtype=dtype, device=where)
    if adapter:
        from peft import PeftModel

        loaded = PeftModel.from_pretrained(loaded, adapter).merge_and_unload()  # the plan stays applied
    results, items = task_scores(loaded, tokenizer, settings, blocks) if settings.tasks else ({}, {})
    if settings.wikitext:
        results["wikitext2"], items["wikitext2"] = wikitext_perplexity(
            loaded, tokenizer, settings.wikitext, settings.wikitext_tokens, settings.wikitext_block
        )
    stage = "finetuned" if adapter else "zeroshot" if plan else "original"
    write_json(
        out,
        {
            "plan": str(plan) if plan else "original",
            "stage": stage,
            "results": results,
            "items": items,
            "provenance": provenance(
                {
                    "model": model,
                    "dtype": dtype,
                    "device": str(where),
                    "adapter": adapter,
                    "settings": asdict(settings),
                },
                plan,
            ),
        },
    )
