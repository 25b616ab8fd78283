"""What a run costs in GPU-hours, per stage and model, from its config alone (`cqil cost`).

    print(cost_table(config, tflops=124.8))       # GPU-hours per stage and model, a Markdown table

FLOPs per stage at a sustained rate; latency from the weights streamed per decoded token. The model shapes are
those of the memory check (cqil/memory.py); docs/cost.md has the paper run's table and how it compares with
what the run took.
"""

from __future__ import annotations

from .errors import CqilError
from .memory import Shape, catalog_shape, latency_setups, rule_resources, section_settings, weight_bytes
from .stages import SECTIONS, settings

# cqil cost: tokens that lm-eval scores per question (context and every choice): an assumption, not a count.
EVAL_TOKENS_PER_QUESTION = 512
TASK_QUESTIONS = {  # evaluated questions of a task the config does not subset (the sets' sizes)
    "arc_easy_local": 2376,
    "arc_challenge_local": 1172,
    "piqa_local": 1838,
    "winogrande_local": 1267,
    "openbookqa_local": 500,
    "sciq": 1000,
    "mmlu": 14042,
}
A100_BF16_PEAK = 312e12  # FLOP/s, dense
DEFAULT_TFLOPS = 0.4 * A100_BF16_PEAK / 1e12  # sustained: 40% of the A100's bf16 peak
FP64_SLOWDOWN = 16  # the similarity's Gram matrix is float64: A100 19.5 fp64 tensor-core vs 312 bf16 TFLOP/s
HBM_BYTES_PER_S = 1.70e12  # latency's decode streams the weights: the A100-80GB preset of cqil/simulate/model.py


def forward_flops(shape: Shape, tokens: int, seq: int, layers: int, head: bool = True) -> float:
    """A forward of `tokens` (in sequences of `seq`) through `layers` decoder layers and, with `head`, the LM head:
    2 FLOPs per weight and token, and causal attention's QK^T and AV (2 seq h per token and layer)."""
    per_token = layers * (2 * shape.layer_parameters + 2 * seq * shape.hidden)
    return tokens * (per_token + (2 * shape.hidden * shape.vocab if head else 0))


def selected_plans(config: dict, model: str) -> int:
    """Plans `select` carries forward at most: per_size for each P, and the named ones (config and catalog)."""
    select = section_settings(config, "select")
    return select.per_size * len(config["search"]["sizes"]) + len(
        set(select.always) | set(config["catalog"][model].get("plans", []))
    )


def _split_tokens(config: dict, split: str) -> int:
    return config["corpus"]["blocks"][split] * config["corpus"]["block_size"]


def evaluated_tokens(config: dict) -> int:
    """Tokens lm-eval scores per variant: each task's questions (EVAL_TOKENS_PER_QUESTION each), and WikiText-2."""
    s = section_settings(config, "evaluate")
    total = s.wikitext_tokens if s.wikitext else 0
    for task in s.tasks:
        if task not in s.questions and task not in TASK_QUESTIONS:
            raise CqilError(
                f"evaluate.tasks: {task!r} has no known size (known: {', '.join(TASK_QUESTIONS)}); "
                f"give its questions in evaluate.questions"
            )
        questions = s.questions.get(task, TASK_QUESTIONS.get(task))
        total += min(questions, s.limit or questions) * EVAL_TOKENS_PER_QUESTION
    return total


def stage_flops(shape: Shape, config: dict, model: str) -> dict[str, float]:
    """FLOPs of each compute stage for one model (latency apart: it is bound by memory, see latency_seconds)."""
    block, layers = config["corpus"]["block_size"], shape.layers
    similarity, sensitivity = section_settings(config, "similarity"), section_settings(config, "sensitivity")
    calibration = _split_tokens(config, similarity.split)
    gram = 2 * layers**2 * (calibration - calibration // block) * shape.hidden * FP64_SLOWDOWN  # float64, A100 rate
    variants = [(i, k) for k in sensitivity.distances for i in range(k, layers)]
    search = section_settings(config, "search")
    search.include = search.include + config["catalog"][model].get("plans", [])  # as the rule passes them
    search = settings(SECTIONS["search"], vars(search), "search")
    finetune = section_settings(config, "finetune")
    passes = 2 + ("kd" in finetune.loss) + finetune.gradient_checkpointing  # student fwd+bwd, teacher, recompute
    steps_tokens = finetune.steps * finetune.grad_accum * finetune.batch_size * block
    ranks = max(rule_resources(config, "finetune")["gpu"], 1)  # each rank scores the held-out blocks before and after
    plans = selected_plans(config, model)
    return {
        "similarity": forward_flops(shape, calibration, block, layers, head=False) + gram,
        "sensitivity": _split_tokens(config, sensitivity.split)
        * sum(forward_flops(shape, 1, block, n) for n in [layers] + [layers - i for i, _ in variants]),
        "search": _split_tokens(config, search.split)
        * sum(forward_flops(shape, 1, block, n) for n in [layers] + [layers - p.start for p in search.plans(layers)]),
        "score": plans
        * 2
        * forward_flops(shape, _split_tokens(config, section_settings(config, "score").split), block, layers),
        "finetune": plans
        * (
            passes * forward_flops(shape, steps_tokens, block, layers)
            + ranks * 4 * forward_flops(shape, _split_tokens(config, finetune.eval_split), block, layers)
        ),
        "evaluate": (1 + 2 * plans) * forward_flops(shape, evaluated_tokens(config), EVAL_TOKENS_PER_QUESTION, layers),
    }


def latency_seconds(shape: Shape, config: dict, model: str, rate: float) -> float:
    """GPU-seconds of the latency jobs: every rank held while a repeat prefills (compute) and decodes (the weights
    streamed once per token); a lower bound, without loading the weights or eager decode's launch costs."""
    s = section_settings(config, "latency")
    total = 0.0
    for setup in latency_setups(config, model):
        repeat = sum(
            forward_flops(shape, s.batch_size * n, n, shape.layers) / rate
            + s.new_tokens * weight_bytes(shape) / HBM_BYTES_PER_S
            for n in s.prompt_lengths
        )
        timed = 2 if s.interleaved_baseline and setup.ranks > 1 else 1  # the original timed between repeats
        total += setup.ranks * (s.warmup + s.repeats) * repeat * timed
    return total


def stage_hours(config: dict, model: str, tflops: float) -> dict[str, tuple[float | None, float]]:
    """Stage -> (FLOPs, GPU-hours) for one model at `tflops` sustained (latency: FLOPs None, time-bound)."""
    shape = catalog_shape(config, model)
    if shape is None:
        raise CqilError(
            f"catalog.{model}: its config is not on this machine: set catalog.{model}.shape "
            f"(one of cqil.models.SHAPES) or run `cqil info {config['catalog'][model]['spec']}` once"
        )
    rate = tflops * 1e12
    hours = {stage: (flops, flops / rate / 3600) for stage, flops in stage_flops(shape, config, model).items()}
    timed = model in (config.get("latency_setups") or {"models": []})["models"]
    return hours | {"latency": (None, latency_seconds(shape, config, model, rate) / 3600 if timed else 0.0)}


def cost_table(config: dict, tflops: float = DEFAULT_TFLOPS) -> str:
    """GPU-hours per stage (rows) and model (columns) as a Markdown table, with each stage's PFLOP over all models."""
    models = list(dict.fromkeys(config["models"] + (config.get("latency_setups") or {"models": []})["models"]))
    per_model = {m: stage_hours(config, m, tflops) if m in config["models"] else {} for m in models}
    for m in models:  # a model timed only: latency alone
        if not per_model[m]:
            per_model[m] = {"latency": stage_hours(config, m, tflops)["latency"]}
    stages = list(dict.fromkeys(stage for hours in per_model.values() for stage in hours))
    lines = [
        f"| stage | {' | '.join(models)} | all models | PFLOP |",
        "|---" * (len(models) + 3) + "|",
    ]
    for stage in stages:
        cells = [per_model[m].get(stage, (0.0, 0.0)) for m in models]
        flops = [f for f, _ in cells if f is not None]
        pflop = f"{sum(flops) / 1e15:,.0f}" if stage != "latency" else "-"
        row = " | ".join(f"{h:,.2f}" for _, h in cells)
        lines.append(f"| {stage} | {row} | {sum(h for _, h in cells):,.2f} | {pflop} |")
    totals = [sum(h for _, h in per_model[m].values()) for m in models]
    lines.append(f"| **total** | {' | '.join(f'{t:,.0f}' for t in totals)} | **{sum(totals):,.0f}** | |")
    return "\n".join(lines)
