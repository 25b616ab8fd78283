"""Quality of a (possibly CQIL) model, always measured on the in-memory model (plan and adapters included).

    perplexity(model, token_ids, block_size=512)    # {"perplexity": 22.97, "nll": 3.13, "tokens": 7154}
    token_sums(...) / summarize(...)                # perplexity, KL(original || model), top-1 agreement
    lm_eval_tasks(model, tokenizer, ["arc_easy_local"], render_tasks(tmp, data_dir="../shared/data"))

The lm-eval tasks in `cqil/tasks/` are the harness's own task configs pointed at local files
(`dataset_path: json` / `csv`, `${data_dir}` filled in by `render_tasks`), so they run offline.
"""

from __future__ import annotations

import math
from pathlib import Path
from string import Template

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def blocks(token_ids: torch.Tensor, block_size: int) -> list[torch.Tensor]:
    """Non-overlapping blocks of `block_size` tokens; a last shorter block is kept if it predicts anything."""
    return [b for b in token_ids.split(block_size) if len(b) > 1]


@torch.inference_mode()
def perplexity(model, token_ids: torch.Tensor, block_size: int = 512, progress: bool = True) -> dict:
    """exp(mean next-token negative log-likelihood) over the blocks of a 1-D tensor of token ids.

    Each block is scored on its own (no context carried over), as in the usual strided evaluation
    with stride = block size.
    """
    device = next(model.parameters()).device
    total = {}
    for block in tqdm(blocks(token_ids, block_size), desc="perplexity", unit="block", disable=not progress):
        ids = block[None].to(device)  # (1, T)
        total = add_sums(total, token_sums(log_probs(model(input_ids=ids).logits), ids))
    if not total:
        raise ValueError("perplexity: the text has fewer than 2 tokens")
    return summarize(total)


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities, at least float32: (B, T, V) -> (B, T-1, V); row t predicts token t+1."""
    return F.log_softmax(logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def token_sums(logp: torch.Tensor, input_ids: torch.Tensor, reference: torch.Tensor | None = None) -> dict:
    """Sums over the predicted positions of a batch: NLL of the next token and, against the original
    model's log-probabilities `reference`, KL(original || model) and top-1 agreement.

    logp, reference: (B, T-1, V) from `log_probs`; input_ids: (B, T).
    """
    sums = {"nll": -logp.gather(-1, input_ids[:, 1:, None]).sum().item(), "tokens": logp.shape[0] * logp.shape[1]}
    if reference is not None:
        sums["kl"] = F.kl_div(logp, reference, log_target=True, reduction="sum").item()  # sum p_ref (log p_ref - log p)
        sums["top1"] = (logp.argmax(-1) == reference.argmax(-1)).sum().item()
    return sums


def add_sums(total: dict, sums: dict) -> dict:
    return {key: total.get(key, 0) + value for key, value in sums.items()}


def summarize(sums: dict) -> dict:
    """Perplexity, mean KL(original || model) in nats per token, and top-1 agreement with the original."""
    n = sums["tokens"]
    out = {"perplexity": math.exp(sums["nll"] / n), "nll": sums["nll"] / n, "tokens": n}
    if "kl" in sums:
        out |= {"kl": sums["kl"] / n, "top1": sums["top1"] / n}
    return out


TASKS = Path(__file__).parent / "tasks"


def render_tasks(out_dir, data_dir=None, corpus_tasks=None) -> Path:
    """Write the task YAMLs of `cqil/tasks/` whose files are given, with absolute paths (lm-eval resolves
    relative ones against the working directory), to `out_dir`: the include path for `lm_eval_tasks`.

    data_dir: the evaluation data in the layout of ../shared/data (ARC, Winogrande, MMLU);
    corpus_tasks: the folder `build_corpus_tasks` wrote (cqil_heldout, cqil_cloze).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    values = {key: str(Path(value).resolve()) for key, value in
              (("data_dir", data_dir), ("corpus_tasks", corpus_tasks)) if value is not None}
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
    import json
    import random

    rng = random.Random(seed)
    choices = min(choices, len(blocks))  # a tiny test split cannot offer more distractors than it has blocks
    half = blocks.shape[1] // 2
    firsts = [tokenizer.decode(b[:half]) for b in blocks]
    seconds = [tokenizer.decode(b[half:]) for b in blocks]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cloze = []
    for i, context in enumerate(firsts):
        options = [seconds[i]] + rng.sample(seconds[:i] + seconds[i + 1:], choices - 1)
        order = rng.sample(range(choices), choices)
        cloze.append({"context": context, "choices": [options[j] for j in order], "answer": order.index(0)})
    with open(out_dir / "heldout.jsonl", "w") as f:
        f.writelines(json.dumps({"text": tokenizer.decode(b)}) + "\n" for b in blocks)
    with open(out_dir / "cloze.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in cloze)
    return out_dir


def lm_eval_tasks(model, tokenizer, tasks: list[str], include_path, limit: int | None = None,
                  batch_size: int = 8, num_fewshot: int | None = None) -> dict:
    """lm-eval's `simple_evaluate` on the in-memory model: {task: {metric: value, metric_stderr: value}}."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
              device=str(next(model.parameters()).device))
    local = {path.stem for path in Path(include_path).glob("*.yaml")}
    # lm-eval's own tasks (sciq, winogrande, ... from the Hub) only when asked: scanning them takes 13 s
    manager = TaskManager(include_path=str(include_path), include_defaults=not set(tasks) <= local)
    out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                          bootstrap_iters=1000, random_seed=0, numpy_random_seed=0, torch_random_seed=0)
    return {task: {key.replace(",none", ""): value for key, value in metrics.items() if key != "alias"}
            for task, metrics in out["results"].items()}
