"""The `cqil` command line: one sub-command per stage, each a thin call into the library.

    cqil info smollm2-135m
    cqil ppl --model smollm2-135m --plan S18-E28-P2-D0 --text README.md
    cqil generate --model smollm2-135m --plan S18-E28-P2-D0 "The capital of France is"

Bad input (a plan, a model spec, a file) ends with one line `cqil: error: ...` and exit status 2,
before any model weight is read.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from .concurrent import apply_plan, remove_plan
from .data import CorpusError
from .finetune import FinetuneError
from .models import DTYPES, ModelError, describe, load_model
from .plan import Plan, PlanError
from .runtime import EngineError, report_error
from .simulate import SimulateError


class InputError(ValueError):
    """Bad command-line input; the message is one line."""


def _plan(name: str | None) -> Plan | None:
    return Plan.parse(name) if name else None


def _text(path: str) -> str:
    if not Path(path).is_file():
        raise InputError(f"--text {path!r}: file not found")
    return Path(path).read_text(encoding="utf-8")


def _settings(cls, text: str):
    """A stage's settings dataclass from a JSON object (the rule passes its config section)."""
    try:
        return cls(**json.loads(text or "{}"))
    except json.JSONDecodeError as err:
        raise InputError(f"--settings: not valid JSON ({err})") from None
    except TypeError as err:
        raise InputError(f"--settings: {err} (allowed: {', '.join(cls.__dataclass_fields__)})") from None


def _blocks(path: str, split: str):
    """One split of a corpus file written by `cqil corpus`."""
    import torch

    from .data import SPLITS

    if split not in SPLITS:
        raise InputError(f"--split {split!r}: allowed are {', '.join(SPLITS)}")
    if not Path(path).is_file():
        raise InputError(f"--corpus {path!r}: file not found (run `cqil corpus` first)")
    return torch.load(path)[split]


def _record(args, settings=None) -> dict:
    """The command's own arguments (with its parsed settings): the settings part of an artifact's provenance."""
    record = {k: v for k, v in vars(args).items() if k != "func"}
    return record | {"settings": asdict(settings)} if settings is not None else record


def cmd_info(args) -> None:
    """Print layers, parameters, family and dtype of a model (reads its config, not its weights)."""
    for key, value in describe(args.model).items():
        print(f"{key:16} {value:,}" if isinstance(value, int) else f"{key:16} {value}")


def cmd_ppl(args) -> None:
    """Print the perplexity of the original model and, with --plan, of the CQIL model on a text file."""
    from .evaluate import perplexity

    plan, text = _plan(args.plan), _text(args.text)
    model, tokenizer = load_model(args.model, plan=plan, dtype=args.dtype)
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    rows = []
    for variant in [None, plan] if plan else [None]:
        apply_plan(model, variant)
        score = perplexity(model, ids, block_size=args.block_size)
        rows.append((str(variant) if variant else "original", score["tokens"], score["perplexity"]))
    print(f"{'plan':24} {'tokens':>8} {'perplexity':>11}")
    for name, tokens, ppl in rows:
        print(f"{name:24} {tokens:8d} {ppl:11.3f}")


def cmd_generate(args) -> None:
    """Greedy continuation of a prompt by the original model and, with --plan, by the CQIL model."""
    plan = _plan(args.plan)
    model, tokenizer = load_model(args.model, plan=plan, dtype=args.dtype)
    inputs = tokenizer(args.prompt, return_tensors="pt")
    for variant in [None, plan] if plan else [None]:
        apply_plan(model, variant)
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        text = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        print(f"[{variant or 'original'}] {args.prompt}{text}")
    remove_plan(model)


def cmd_prepare(args) -> None:
    """Make a model available offline and check its layer count against the config."""
    from .io import provenance, write_json

    info = describe(args.model)  # the embedded model is downloaded and converted here, once
    if args.layers is not None and info["layers"] != args.layers:
        raise InputError(f"--layers {args.layers}: model {args.model!r} has {info['layers']} layers")
    write_json(args.out, info | {"provenance": provenance(_record(args))})


def cmd_corpus(args) -> None:
    """Build disjoint, deterministic token blocks (calibration, search, finetune, test)."""
    import torch

    from .data import CorpusSettings, build_corpus
    from .io import atomic, provenance, write_json

    settings = _settings(CorpusSettings, args.settings)
    blocks, summary = build_corpus(args.model, settings)
    with atomic(args.out) as tmp:
        torch.save(blocks, tmp)
    write_json(args.summary, summary | {"provenance": provenance(_record(args, settings))})


def cmd_similarity(args) -> None:
    """Mean cosine similarity between the inputs of every pair of layers (CSV, long format)."""
    import pandas as pd

    from .analysis import similarity
    from .io import provenance, write_csv, write_json

    blocks = _blocks(args.corpus, args.split)
    model, _ = load_model(args.model, dtype=args.dtype)
    matrix = similarity(model, blocks, batch_size=args.batch_size)
    size = len(matrix)
    write_csv(args.out, pd.DataFrame({"layer_i": [i for i in range(size) for _ in range(size)],
                                      "layer_j": list(range(size)) * size, "cosine": matrix.ravel()}))
    adjacent = [float(matrix[i, i + 1]) for i in range(size - 1)]
    write_json(Path(args.out).with_suffix(".json"), {"adjacent": adjacent, "blocks": len(blocks),
                                                       "provenance": provenance(_record(args))})


def cmd_sensitivity(args) -> None:
    """Perplexity and KL when layer i computes from the input of layer i-k (CSV)."""
    import pandas as pd

    from .analysis import sensitivity
    from .io import provenance, write_csv, write_json

    blocks = _blocks(args.corpus, args.split)
    model, _ = load_model(args.model, dtype=args.dtype)
    write_csv(args.out, pd.DataFrame(sensitivity(model, blocks, args.distances, batch_size=args.batch_size)))
    write_json(Path(args.out).with_suffix(".json"), {"blocks": len(blocks), "provenance": provenance(_record(args))})


def cmd_search(args) -> None:
    """Score a grid of plans against the original on held-out blocks (CSV, one row per plan)."""
    import time

    import pandas as pd

    from .io import provenance, write_csv, write_json
    from .models import load_config
    from .search import SearchSettings, score_plans

    settings = _settings(SearchSettings, args.settings)
    plans = settings.plans(load_config(args.model).num_hidden_layers)
    blocks = _blocks(args.corpus, args.split)
    model, _ = load_model(args.model, dtype=args.dtype)
    start = time.perf_counter()
    rows = score_plans(model, blocks, plans, batch_size=settings.batch_size)
    seconds = time.perf_counter() - start
    write_csv(args.out, pd.DataFrame(rows))
    write_json(Path(args.out).with_suffix(".json"), {
        "plans": len(plans), "blocks": len(blocks), "seconds": seconds, "plans_per_minute": 60 * len(plans) / seconds,
        "provenance": provenance(_record(args, settings))})


def cmd_select(args) -> None:
    """Pick the plans to carry forward from a search CSV, by the rule in the settings."""
    import pandas as pd

    from .io import provenance, write_json
    from .search import SelectSettings, select

    settings = _settings(SelectSettings, args.settings)
    rows = pd.read_csv(args.search).to_dict("records")
    chosen = select(rows, settings)
    if not chosen:
        raise InputError(f"select: no plan of {args.search} passes the rule {asdict(settings)}")
    write_json(args.out, {"plans": chosen, "rule": asdict(settings),
                          "provenance": provenance(_record(args, settings))})


def cmd_score(args) -> None:
    """Perplexity, KL to the original and top-1 agreement of one plan on one split (JSON)."""
    from .io import provenance, write_json
    from .search import score_plans

    plan = _plan(args.plan)
    blocks = _blocks(args.corpus, args.split)
    model, _ = load_model(args.model, dtype=args.dtype)
    original, row = score_plans(model, blocks, [plan], batch_size=args.batch_size, progress=False)
    write_json(args.out, {"split": args.split, "plan": row, "original": original,
                          "provenance": provenance(_record(args), plan)})


def cmd_finetune(args) -> None:
    """LoRA + KD fine-tuning of a CQIL plan; resumes from the checkpoint in --out-dir if there is one."""
    import pandas as pd

    from . import report
    from .finetune import FinetuneSettings, finetune
    from .io import provenance, write_json

    plan = _plan(args.plan)
    settings = _settings(FinetuneSettings, args.settings)
    blocks, held_out = _blocks(args.corpus, args.split), _blocks(args.corpus, args.eval_split)
    model, _ = load_model(args.model, dtype=args.dtype)
    summary = finetune(model, plan, blocks, settings, args.out_dir, eval_blocks=held_out)
    write_json(args.summary, summary | {"provenance": provenance(_record(args, settings), plan)})
    if args.figure:
        report.loss_figure(pd.read_csv(Path(args.out_dir) / "losses.csv"), f"{plan}: fine-tuning", args.figure)


def cmd_evaluate(args) -> None:
    """lm-eval tasks on the original, a CQIL plan, or a plan with its fine-tuned adapter (JSON)."""
    import tempfile

    from .evaluate import build_corpus_tasks, lm_eval_tasks, render_tasks
    from .io import provenance, write_json

    plan = _plan(args.plan)
    if args.adapter and not plan:
        raise InputError("--adapter needs --plan: adapters are trained for a plan")
    if args.data_dir and not Path(args.data_dir).is_dir():
        raise InputError(f"--data-dir {args.data_dir!r}: not a directory")
    if not args.data_dir and (local := [t for t in args.tasks if t.endswith("_local")]):
        raise InputError(f"--tasks {', '.join(local)}: local tasks need --data-dir (the layout of ../shared/data)")
    blocks = _blocks(args.corpus, args.split)
    model, tokenizer = load_model(args.model, plan=plan, dtype=args.dtype)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter).merge_and_unload()  # the plan stays applied
    with tempfile.TemporaryDirectory() as tmp:
        corpus_tasks = build_corpus_tasks(blocks, tokenizer, Path(tmp) / "corpus", choices=args.cloze_choices)
        include = render_tasks(Path(tmp) / "tasks", data_dir=args.data_dir, corpus_tasks=corpus_tasks)
        results = lm_eval_tasks(model, tokenizer, args.tasks, include, limit=args.limit, batch_size=args.batch_size)
    stage = "finetuned" if args.adapter else "zeroshot" if plan else "original"
    write_json(args.out, {"plan": str(plan) if plan else "original", "stage": stage, "results": results,
                          "provenance": provenance(_record(args), plan)})


def cmd_quality(args) -> None:
    """The quality table: original and each plan, zero-shot and fine-tuned, per task (CSV + Markdown)."""
    import pandas as pd

    from .io import write_csv, write_markdown

    def rows_of(plan, stage, task, metrics, names):
        return [{"plan": plan, "stage": stage, "task": task, "metric": name, "value": metrics[name],
                 "stderr": metrics.get(f"{name}_stderr")} for name in names if name in metrics]

    rows, heldout = [], ("perplexity", "kl", "top1")  # on the corpus's held-out blocks, against the original
    for i, path in enumerate(args.scores):
        record = json.loads(Path(path).read_text())
        rows += rows_of("original", "original", "heldout", record["original"], heldout) if i == 0 else []
        rows += rows_of(record["plan"]["plan"], "zeroshot", "heldout", record["plan"], heldout)
    for path in args.finetune:
        record = json.loads(Path(path).read_text())
        rows += rows_of(record["plan"], "finetuned", "heldout", record["heldout_after"] or {}, heldout)
    for path in args.inputs:
        record = json.loads(Path(path).read_text())
        for task, metrics in record["results"].items():
            rows += rows_of(record["plan"], record["stage"], task, metrics, args.metrics)
    long = pd.DataFrame(rows)
    write_csv(args.out, long)
    table = long.assign(column=long.task + " " + long.metric).pivot_table(
        index=["plan", "stage"], columns="column", values="value", sort=False)
    write_markdown(Path(args.out).with_suffix(".md"), table.reset_index())


def cmd_collect(args) -> None:
    """Collect `cqil score` or `cqil finetune` JSON files into one CSV, a row per plan."""
    import pandas as pd

    from .io import write_csv

    records = [json.loads(Path(path).read_text()) for path in args.inputs]
    if args.kind == "scores":  # the original, then each plan
        rows = [records[0]["original"]] + [r["plan"] for r in records]
    else:  # held-out quality before and after fine-tuning
        rows = [{"plan": r["plan"], "steps": r["steps"], "first_loss": r["first_loss"], "last_loss": r["last_loss"],
                 **{f"{key}_{when}": (r[f"heldout_{when}"] or {}).get(key) for when in ("before", "after")
                    for key in ("perplexity", "kl", "top1")}} for r in records]
    write_csv(args.out, pd.DataFrame(rows))


def cmd_figures(args) -> None:
    """Similarity, sensitivity and search-frontier figures (PNG + PDF) from the stage CSVs."""
    import pandas as pd

    from . import report

    out, name, similarity = Path(args.out_dir), args.title, pd.read_csv(args.similarity)
    report.similarity_heatmap(similarity, f"{name}: layer-input similarity", out / "similarity_heatmap")
    report.similarity_curve(similarity, f"{name}: adjacent layers", out / "similarity_adjacent")
    report.sensitivity_figure(pd.read_csv(args.sensitivity), f"{name}: sensitivity to an earlier input",
                              out / "sensitivity")
    selected = json.loads(Path(args.selected).read_text())
    report.frontier_figure(pd.read_csv(args.search), selected["plans"], f"{name}: plan search",
                           out / "frontier", metric=selected["rule"]["metric"])


def cmd_latency(args) -> None:
    """Prefill and decode latency of one engine (original, cqil or tp), checked against a 1-process reference.

    cqil and tp run on several ranks: outside torchrun this command starts torchrun itself.
    """
    from .io import provenance, write_json
    from .latency import LatencySettings, measure, world_size
    from .models import load_config
    from .runtime import launch, under_torchrun
    from .runtime.tp import check_degree

    settings, plan = _settings(LatencySettings, args.settings), _plan(args.plan)
    world = world_size(args.engine, plan, args.degree)
    config = load_config(args.model)  # refuse a bad plan or degree before any process starts
    if plan:
        plan.validate(config.num_hidden_layers)
    if args.engine == "tp":
        check_degree(config, args.degree)
    if world > 1 and not under_torchrun():
        return launch(["-m", "cqil", *args.argv], world)
    result = measure(args.model, args.engine, settings, plan, args.degree, args.dtype, args.device)
    if result is not None:  # rank 0
        write_json(args.out, {**result, "settings": asdict(settings), "provenance": provenance(_record(args, settings), plan)})


def cmd_layer_latency(args) -> None:
    """Per-layer prefill and decode latency of named LLaMA shapes with random weights (eager, CUDA graphs)."""
    import pandas as pd

    from .io import provenance, write_json
    from .latency import layer_latency

    records = [record for shape in args.shapes for mode in args.modes
               for record in layer_latency(shape, args.lengths, args.context, args.dtype, args.device,
                                           graphs=mode == "graphs", warmup=args.warmup, repeats=args.repeats)]
    write_json(args.out, {"records": records, "provenance": provenance(_record(args))})
    columns = ["shape", "graphs", "phase", "tokens", "median_ms", "p10_ms", "p90_ms"]
    print(pd.DataFrame(records)[columns].to_markdown(index=False, floatfmt=".4g"))


def cmd_simulate(args) -> None:
    """Predicted latency of the paper's models on GPUs (analytic model), validated on this machine's runs."""
    import pandas as pd

    from . import report, simulate
    from .io import provenance, write_csv, write_json, write_markdown

    settings = _settings(simulate.SimulateSettings, args.settings)
    out = Path(args.out_dir)
    predicted = pd.DataFrame(simulate.predictions(settings.plans, settings.hardware, list(settings.tp_degrees),
                                                  list(settings.prefill_tokens), settings.max_ranks))
    results = [json.loads(Path(path).read_text()) for path in args.latency]
    by_model = {}
    for result in results:
        by_model.setdefault(result["model"], []).append(result)
    checked = pd.DataFrame([row for group in by_model.values() for row in simulate.validation(group)])
    swept = pd.DataFrame(simulate.crossover_sweep(settings))
    for name, frame in (("predictions", predicted), ("validation", checked), ("crossover", swept)):
        write_csv(out / f"{name}.csv", frame)
        write_markdown(out / f"{name}.md", frame)
    write_json(out / "simulation.json", {"hardware": {name: asdict(hw) for name, hw in simulate.HARDWARE.items()},
                                         "fitted": {model: asdict(simulate.fit_runs(group))
                                                    for model, group in by_model.items()},
                                         "provenance": provenance(_record(args, settings))})
    report.simulation_figures(predicted, checked, swept, out)


def cmd_tables(args) -> None:
    """The paper's tables (quality with the official numbers beside ours; latency measured and predicted)."""
    import pandas as pd

    from . import report

    quality = []
    for item in args.quality:
        model, _, path = item.partition("=")
        if not path:
            raise InputError(f"--quality {item!r}: expected MODEL=PATH")
        quality.append(report.quality_table(pd.read_csv(path), model))
    out = Path(args.out_dir)
    report.write_table(pd.concat(quality, ignore_index=True), out / "quality")
    predicted = pd.read_csv(args.predictions) if args.predictions else None
    report.write_table(report.latency_summary([pd.read_csv(path) for path in args.latency], predicted), out / "latency")


def cmd_track(args) -> None:
    """Benchmark tracking: record a run in the history, compare the newest records, draw trends, export."""
    from . import report, track
    from .io import atomic, write_csv, write_json

    settings = _settings(track.TrackSettings, args.settings)
    if args.action == "record":
        if not (args.run_dir and args.logs and Path(args.run_dir).is_dir()):
            raise InputError(f"track record: --run-dir {args.run_dir!r} and --logs {args.logs!r} must name a run's folders")
        entry = track.record(args.run_dir, args.logs, json.loads(args.config), args.config_name, settings.label)
        track.append(args.history, entry)
        if args.out:
            write_json(args.out, entry)
        return print(f"{args.history}: appended a record with {len(entry['metrics'])} metrics")
    records, problems = track.load(args.history)
    for problem in problems:
        print(f"cqil: warning: {problem}", file=sys.stderr)
    if not records:
        raise InputError(f"--history {args.history}: no readable record")
    if args.action == "trends":
        for tool, entries in track.benchmark_json(records[-1], settings).items():  # github-action-benchmark
            with atomic(Path(args.out_dir) / f"{tool}.json") as tmp:
                tmp.write_text(json.dumps(entries, indent=1) + "\n")
        report.trend_figures(track.trends(records), args.out_dir)
        return None
    against = [("previous", records[-2] if len(records) > 1 else None)]
    if args.baseline:
        against.append((f"baseline {args.baseline}", track.find(records[:-1], args.baseline)))
        if against[-1][1] is None:
            raise InputError(f"--baseline {args.baseline!r}: no earlier record has that label or git sha")
    regressions = 0
    for name, old in against:
        if old is None:
            print(f"{name}: none (the history has one record)")
            continue
        table = track.compare(records[-1], old, settings)
        changed = table[table.status.isin(["regression", "improvement", "new", "missing"])]
        counts = ", ".join(f"{count} {status}" for status, count in table.status.value_counts().items())
        print(f"\n{name} (git {old['git'][:8]}, {old['date']}): {counts}")
        drifted = track.package_changes(records[-1], old)
        print(f"packages changed: {', '.join(drifted)}" if drifted else "packages: the same versions")
        print(changed.to_markdown(index=False, floatfmt=".4g") if len(changed) else "no change beyond the thresholds")
        if args.out:
            write_csv(Path(args.out).with_name(f"{Path(args.out).stem}-{name.split()[0]}.csv"), table)
        regressions += int((table.status == "regression").sum())
    if regressions and args.fail_on_regression:
        print(f"cqil: {regressions} regression(s) beyond the thresholds", file=sys.stderr)
        sys.exit(1)


def cmd_latency_table(args) -> None:
    """Latency table (CSV + Markdown) and figure from `cqil latency` JSON files of one model."""
    from . import report
    from .io import write_csv, write_markdown
    from .latency import table

    results = [json.loads(Path(path).read_text()) for path in args.inputs]
    frame = table(results)
    write_csv(args.out, frame)
    write_markdown(Path(args.out).with_suffix(".md"), frame.drop(columns=["model"]))
    if args.figure:
        report.latency_figure(frame, results, args.title, args.figure)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cqil", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(func, name):
        p = sub.add_parser(name, help=func.__doc__.splitlines()[0], description=func.__doc__)
        p.set_defaults(func=func)
        return p

    def model_args(p, plan="optional"):
        p.add_argument("--model", default="smollm2-135m",
                       help="embedded name, local HF directory, .gguf file or Hub id (default: %(default)s)")
        if plan:
            p.add_argument("--plan", required=plan == "required",
                           help="CQIL plan, e.g. S18-E28-P2-D0 (0-indexed, end exclusive)")
        p.add_argument("--dtype", default="auto", choices=list(DTYPES))

    command(cmd_info, "info").add_argument("model", help="embedded name, local HF directory, .gguf file or Hub id")
    p = command(cmd_ppl, "ppl")
    model_args(p)
    p.add_argument("--text", required=True, help="UTF-8 text file to score")
    p.add_argument("--block-size", type=int, default=512, help="tokens per scored block (default: %(default)s)")
    p = command(cmd_generate, "generate")
    model_args(p)
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=30)

    # Pipeline stages (the Snakemake rules call these)
    p = command(cmd_prepare, "prepare")
    p.add_argument("--model", required=True)
    p.add_argument("--layers", type=int, help="expected number of decoder layers (from the config)")
    p.add_argument("--out", required=True, help="model info JSON")
    p = command(cmd_corpus, "corpus")
    p.add_argument("--model", required=True)
    p.add_argument("--settings", default="{}", help="JSON object of CorpusSettings fields (config: corpus)")
    p.add_argument("--out", required=True, help="blocks of every split (torch file)")
    p.add_argument("--summary", required=True, help="summary JSON")
    for func, name in [(cmd_similarity, "similarity"), (cmd_sensitivity, "sensitivity"), (cmd_search, "search"),
                       (cmd_score, "score")]:
        p = command(func, name)
        model_args(p, plan="required" if name == "score" else None)
        p.add_argument("--corpus", required=True, help="corpus file written by `cqil corpus`")
        p.add_argument("--split", default="test" if name == "score" else "search" if name == "search" else "calibration")
        p.add_argument("--out", required=True)
        if name != "search":
            p.add_argument("--batch-size", type=int, default=4)
        else:
            p.add_argument("--settings", default="{}", help="JSON object of SearchSettings fields (config: search)")
        if name == "sensitivity":
            p.add_argument("--distances", type=int, nargs="+", default=[1, 2])
    p = command(cmd_finetune, "finetune")
    model_args(p, plan="required")
    p.add_argument("--corpus", required=True, help="corpus file written by `cqil corpus`")
    p.add_argument("--split", default="finetune", help="blocks to train on")
    p.add_argument("--eval-split", default="test", help="held-out blocks for KL before/after")
    p.add_argument("--settings", default="{}", help="JSON object of FinetuneSettings fields (config: finetune)")
    p.add_argument("--out-dir", required=True, help="adapter/, checkpoint/ and losses.csv go here")
    p.add_argument("--summary", required=True, help="summary JSON (losses, held-out KL before/after)")
    p.add_argument("--figure", help="loss-curve figure path (PNG and PDF)")
    p = command(cmd_select, "select")
    p.add_argument("--search", required=True, help="search CSV")
    p.add_argument("--settings", default="{}", help="JSON object of SelectSettings fields (config: select)")
    p.add_argument("--out", required=True)
    p = command(cmd_evaluate, "evaluate")
    model_args(p)
    p.add_argument("--adapter", help="peft adapter directory written by `cqil finetune` (needs --plan)")
    p.add_argument("--corpus", required=True, help="corpus file: its --split blocks become the cqil_* tasks")
    p.add_argument("--split", default="test")
    p.add_argument("--tasks", nargs="+", default=["cqil_heldout", "cqil_cloze"])
    p.add_argument("--data-dir", help="evaluation data in the layout of ../shared/data (for the *_local tasks)")
    p.add_argument("--limit", type=int, help="documents per task (default: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--cloze-choices", type=int, default=4)
    p.add_argument("--out", required=True)
    p = command(cmd_quality, "quality")
    p.add_argument("inputs", nargs="+", help="JSON files written by `cqil evaluate`")
    p.add_argument("--scores", nargs="*", default=[], help="`cqil score` JSON files: held-out quality, zero-shot")
    p.add_argument("--finetune", nargs="*", default=[], help="`cqil finetune` JSON files: held-out quality after")
    p.add_argument("--metrics", nargs="+", default=["acc", "acc_norm", "word_perplexity"])
    p.add_argument("--out", required=True, help="CSV (long format); a Markdown table is written beside it")
    p = command(cmd_collect, "collect")
    p.add_argument("inputs", nargs="+", help="JSON files written by `cqil score` or `cqil finetune`")
    p.add_argument("--kind", choices=["scores", "finetune"], default="scores")
    p.add_argument("--out", required=True)
    p = command(cmd_figures, "figures")
    for name in ("similarity", "sensitivity", "search", "selected"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--title", default="")
    p.add_argument("--out-dir", required=True)
    p = command(cmd_latency, "latency")
    model_args(p)
    p.add_argument("--engine", required=True, choices=["original", "cqil", "tp"])
    p.add_argument("--degree", type=int, help="tp: ranks to split each layer over")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--settings", default="{}", help="JSON object of LatencySettings fields (config: latency)")
    p.add_argument("--out", required=True, help="JSON: records, check, parts, all-reduce times")
    p = command(cmd_layer_latency, "layer-latency")
    p.add_argument("--shapes", nargs="+", default=["llama-7b", "llama-13b", "llama-33b"],
                   help="named shapes (cqil.models.SHAPES)")
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048], help="prefill tokens")
    p.add_argument("--context", type=int, default=2048, help="KV cache length of the decode step")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--modes", nargs="+", default=["eager", "graphs"], choices=["eager", "graphs"])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", required=True, help="JSON records")
    p = command(cmd_simulate, "simulate")
    p.add_argument("--latency", nargs="*", default=[], help="`cqil latency` JSON files to fit and validate on")
    p.add_argument("--settings", default="{}", help="JSON object of SimulateSettings fields (config: simulate)")
    p.add_argument("--out-dir", required=True, help="predictions.*, validation.*, simulation.json and figures")
    p = command(cmd_tables, "tables")
    p.add_argument("--quality", nargs="+", required=True, help="MODEL=PATH of each model's quality.csv")
    p.add_argument("--latency", nargs="*", default=[], help="latency.csv files written by `cqil latency-table`")
    p.add_argument("--predictions", help="predictions.csv written by `cqil simulate`")
    p.add_argument("--out-dir", required=True, help="quality.{csv,md,tex} and latency.{csv,md,tex} go here")
    p = command(cmd_track, "track")
    p.add_argument("action", choices=["record", "compare", "trends"])
    p.add_argument("--history", default="results/history.jsonl", help="append-only JSON lines, one record per run")
    p.add_argument("--settings", default="{}", help="JSON object of TrackSettings fields (config: track)")
    p.add_argument("--run-dir", help="record: results/<run>")
    p.add_argument("--logs", help="record: logs/<run> (Snakemake's benchmark files)")
    p.add_argument("--config", default="{}", help="record: the run's config as JSON (its hash is recorded)")
    p.add_argument("--config-name", default="", help="record: the run's name")
    p.add_argument("--out", help="record: this record as JSON; compare: CSV of each comparison")
    p.add_argument("--baseline", help="compare: also against the newest earlier record with this label or git sha")
    p.add_argument("--fail-on-regression", action="store_true", help="compare: exit 1 when a metric regressed")
    p.add_argument("--out-dir", help="trends: figures and github-action-benchmark JSON")
    p = command(cmd_latency_table, "latency-table")
    p.add_argument("inputs", nargs="+", help="JSON files written by `cqil latency` for one model")
    p.add_argument("--out", required=True, help="CSV; a Markdown table is written beside it")
    p.add_argument("--figure", help="figure path (PNG and PDF)")
    p.add_argument("--title", default="")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `cqil latency` relaunches itself under torchrun
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        args.func(args)
    except (PlanError, ModelError, CorpusError, FinetuneError, InputError, EngineError, SimulateError) as err:
        print(f"cqil: error: {err}", file=sys.stderr)
        report_error(str(err))  # a rank under torchrun: the launcher repeats it
        sys.exit(2)


if __name__ == "__main__":
    main()
