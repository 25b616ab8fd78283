"""The `cqil` command line: four commands for people, and one sub-command per pipeline stage.

    cqil info smollm2-135m
    cqil ppl --model smollm2-135m --plan S18-E28-P2-D0 --text README.md
    cqil generate --model smollm2-135m --plan S18-E28-P2-D0 "The capital of France is"
    cqil search --model smollm2-135m --corpus corpus.pt --settings '{"starts": [12]}' --out search.csv
    cqil cost --configfile config/paper.yaml      # GPU-hours per stage of a run, from its config alone

A stage's options are its run function's keyword arguments (`out_dir` is `--out-dir`), its settings
come as one JSON object (`--settings`, the config section), see stages.py. Bad input (a plan, a model
spec, a file, a setting) ends with one line `cqil: error: ...` and exit status 2, before any model
weight is read.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

import yaml

from .config import check_schema, merged
from .cost import DEFAULT_TFLOPS, cost_table
from .errors import CqilError
from .metrics import perplexity
from .models import DTYPES, describe, load_model
from .plan import ENGINES, parse_plan
from .runtime import report_error
from .stages import STAGES, settings
from .transform import apply_plan, remove_plan

# How the stages' keyword arguments look on the command line: their help, and what is not plain text.
OPTIONS = {
    "out": dict(help="the file this stage writes (JSON or CSV; tables get a Markdown file beside them)"),
    "out_dir": dict(help="the folder this stage writes into"),
    "summary": dict(help="the summary JSON this stage writes"),
    "figure": dict(help="figure path, written as PNG and PDF"),
    "title": dict(help="figure title"),
    "similarity": dict(help="similarity.csv, written by `cqil similarity`"),
    "sensitivity": dict(help="sensitivity.csv, written by `cqil sensitivity`"),
    "search": dict(help="search.csv, written by `cqil search`"),
    "selected": dict(help="selected.json, written by `cqil select`"),
    "predictions": dict(help="predictions.csv, written by `cqil simulate`"),
    "baselines": dict(help="baselines.json, written by `cqil baselines`"),
    "levels": dict(help="a quality.csv, written by `cqil quality`"),
    "differences": dict(help="a quality_diff.csv, written by `cqil quality`"),
    "latency_table": dict(help="a latency.csv, written by `cqil latency-table`"),
    "run_dir": dict(help="record: results/<run>"),
    "logs": dict(help="record: logs/<run> (Snakemake's benchmark files)"),
    "config_name": dict(help="record: the run's name"),
    "model": dict(help="embedded name, local HF directory, .gguf file or Hub id"),
    "dtype": dict(choices=list(DTYPES)),
    "plan": dict(
        help="CQIL plan (S18-E28-P2-D0; LP: S18-E28-P2-LP; 0-indexed, end exclusive) or pruned layers (drop-17-19)"
    ),
    "layers": dict(type=int, help="expected number of decoder layers (from the config)"),
    "corpus": dict(help="corpus file written by `cqil corpus`"),
    "inputs": dict(nargs="+", help="the JSON files to collect"),
    "folders": dict(nargs="+", help="results folders (results/<run>/<model>) of runs with the baselines on"),
    "scores": dict(nargs="*", help="`cqil score` JSON files: held-out quality, zero-shot"),
    "finetune": dict(nargs="*", help="`cqil finetune` JSON files: held-out quality after fine-tuning"),
    "latency": dict(nargs="*", help="`cqil latency` JSON files (simulate) or latency.csv tables (tables)"),
    "quality": dict(nargs="+", help="MODEL=PATH of each model's quality.csv"),
    "gpu_latency": dict(
        nargs="*", help="simulate: `cqil latency --engine original` JSON from one GPU (a fitted preset)"
    ),
    "gpu_layers": dict(nargs="*", help="simulate: `cqil layer-latency` JSON from a GPU (checks every preset)"),
    "gpu_decode": dict(nargs="*", help="simulate: `cqil decode-latency` JSON from that GPU (the compiled rest)"),
    "adapter": dict(help="peft adapter directory written by `cqil finetune` (needs --plan)"),
    "engine": dict(choices=list(ENGINES)),
    "degree": dict(type=int, help="tp: ranks to split each layer over"),
    "device": dict(choices=["auto", "cpu", "cuda"]),
    "shapes": dict(nargs="+", help="named shapes (cqil.models.SHAPES)"),
    "lengths": dict(type=int, nargs="+", help="prefill tokens"),
    "context": dict(type=int, help="KV cache length of the decode step"),
    "modes": dict(nargs="+", help="layer-latency: eager, graphs; decode-latency: eager, static, compiled"),
    "prompt_length": dict(type=int, help="decode-latency: prompt tokens before the timed decode"),
    "new_tokens": dict(type=int, help="decode-latency: decode steps timed per generation"),
    "backend": dict(help="decode-latency: torch.compile backend (inductor; eager for a CPU dry run)"),
    "warmup": dict(type=int),
    "repeats": dict(type=int),
    "action": dict(choices=["record", "compare", "dashboard", "trends"]),
    "history": dict(help="the history of runs: append-only JSON lines, one record per run (default: %(default)s)"),
    "baseline": dict(help="compare: also against the newest earlier record with this label or git sha"),
    "fail_on_regression": dict(action="store_true", help="compare: exit 1 when a metric regressed"),
    "confirm": dict(action="store_true", help="compare: time a regressed latency's setup again; only a repeat counts"),
    "any_record": dict(action="store_true", help="compare, dashboard: also records of another config or machine"),
    "config": dict(help="record: the run's config as JSON (its hash is recorded)"),
}
POSITIONAL = ("inputs", "folders", "action")


def stage_parser(sub, name: str, settings_class, run) -> None:
    """The sub-command of one stage, from its run function's signature: no default means required."""
    summary = " ".join(run.__doc__.split()).removeprefix("The stage: ").split(". ")[0]
    parser = sub.add_parser(name, help=summary.replace("%", "%%"), description=run.__doc__)  # help is %-formatted
    parser.set_defaults(func=lambda args: run_stage(name, args))
    if settings_class:
        parser.add_argument(
            "--settings", default="{}", help=f"JSON object of {settings_class.__name__} fields (config section: {name})"
        )
    for param in list(inspect.signature(run).parameters.values())[1 if settings_class else 0 :]:
        if param.name == "argv":
            continue  # the command's own arguments: `cqil latency` relaunches itself under torchrun
        spec = dict(OPTIONS.get(param.name, {}))
        if param.name in POSITIONAL:
            parser.add_argument(param.name, **spec)
        elif param.default is param.empty:
            parser.add_argument(f"--{param.name.replace('_', '-')}", required=True, **spec)
        else:
            default = list(param.default) if isinstance(param.default, tuple) else param.default
            parser.add_argument(f"--{param.name.replace('_', '-')}", default=default, **spec)


def run_stage(name: str, args) -> int | None:
    settings_class, run = STAGES[name]
    names = [param for param in inspect.signature(run).parameters if param != "settings"]
    given = {param: args.argv if param == "argv" else getattr(args, param) for param in names}
    if given.get("plan"):
        given["plan"] = parse_plan(given["plan"])
    if settings_class:
        return run(settings(settings_class, args.settings, name), **given)
    return run(**given)


def cmd_info(args) -> None:
    """Print layers, parameters, family and dtype of a model (reads its config, not its weights)."""
    for key, value in describe(args.model).items():
        print(f"{key:16} {value:,}" if isinstance(value, int) else f"{key:16} {value}")


def _text(path: str) -> str:
    if not Path(path).is_file():
        raise CqilError(f"--text {path!r}: file not found")
    return Path(path).read_text(encoding="utf-8")


def cmd_ppl(args) -> None:
    """Print the perplexity of the original model and, with --plan, of the CQIL model on a text file."""
    plan, text = parse_plan(args.plan) if args.plan else None, _text(args.text)
    model, tokenizer = load_model(args.model, plan=plan, dtype=args.dtype)
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    print(f"{'plan':24} {'tokens':>8} {'perplexity':>11}")
    for variant in [None, plan] if plan else [None]:
        apply_plan(model, variant)
        score = perplexity(model, ids, block_size=args.block_size)
        print(f"{str(variant) if variant else 'original':24} {score['tokens']:8d} {score['perplexity']:11.3f}")


def cmd_generate(args) -> None:
    """Greedy continuation of a prompt by the original model and, with --plan, by the CQIL model."""
    plan = parse_plan(args.plan) if args.plan else None
    model, tokenizer = load_model(args.model, plan=plan, dtype=args.dtype)
    inputs = tokenizer(args.prompt, return_tensors="pt")
    for variant in [None, plan] if plan else [None]:
        apply_plan(model, variant)
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        print(f"[{variant or 'original'}] {args.prompt}{text}")
    remove_plan(model)


ROOT = Path(__file__).resolve().parents[1]  # the checkout: config/ and workflow/ beside the package


def cmd_cost(args) -> None:
    """Print the estimated GPU-hours of each stage of a run, per model, from its config alone (a Markdown table).

    FLOPs per stage at a sustained rate (--tflops); latency from the weights streamed per decoded token.
    The config is config/config.yaml with each --configfile merged over it, as Snakemake merges them."""
    config = yaml.safe_load(Path(args.base).read_text())
    for path in args.configfile:
        config = merged(config, yaml.safe_load(Path(path).read_text()))
    check_schema(config, ROOT / "workflow" / "schemas" / "config.schema.yaml")
    print(cost_table(config, args.tflops))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cqil", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    sub = parser.add_subparsers(dest="command", required=True)
    for func, name in [(cmd_info, "info"), (cmd_ppl, "ppl"), (cmd_generate, "generate")]:
        p = sub.add_parser(name, help=func.__doc__.splitlines()[0], description=func.__doc__)
        p.set_defaults(func=func)
        if name == "info":
            p.add_argument("model", help=OPTIONS["model"]["help"])
            continue
        p.add_argument("--model", default="smollm2-135m", help=OPTIONS["model"]["help"] + " (default: %(default)s)")
        p.add_argument("--plan", help=OPTIONS["plan"]["help"])
        p.add_argument("--dtype", default="auto", choices=list(DTYPES))
    sub.choices["ppl"].add_argument("--text", required=True, help="UTF-8 text file to score")
    sub.choices["ppl"].add_argument(
        "--block-size", type=int, default=512, help="tokens per scored block (default: %(default)s)"
    )
    sub.choices["generate"].add_argument("prompt")
    sub.choices["generate"].add_argument("--max-new-tokens", type=int, default=30)
    cost = sub.add_parser("cost", help=cmd_cost.__doc__.splitlines()[0], description=cmd_cost.__doc__)
    cost.set_defaults(func=cmd_cost)
    cost.add_argument("--configfile", nargs="*", default=[], help="configs merged over --base, in order")
    cost.add_argument("--base", default=str(ROOT / "config" / "config.yaml"), help="the default config")
    cost.add_argument(
        "--tflops",
        type=float,
        default=DEFAULT_TFLOPS,
        help="sustained TFLOP/s of one GPU (default: %(default).1f, 40%% of the A100's 312 bf16 peak)",
    )
    for name, (settings_class, run) in STAGES.items():  # the pipeline's stages; the Snakemake rules call these
        stage_parser(sub, name, settings_class, run)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        status = args.func(args)
    except CqilError as err:
        print(f"cqil: error: {err}", file=sys.stderr)
        report_error(str(err))  # a rank under torchrun: the launcher repeats it
        sys.exit(2)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
