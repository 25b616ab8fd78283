"""The `cqil` command line: one sub-command per stage, each a thin call into the library.

    cqil info smollm2-135m
    cqil ppl --model smollm2-135m --plan S18-E28-P2-D0 --text README.md
    cqil generate --model smollm2-135m --plan S18-E28-P2-D0 "The capital of France is"

Bad input (a plan, a model spec, a file) ends with one line `cqil: error: ...` and exit status 2,
before any model weight is read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .concurrent import apply_plan, remove_plan
from .models import DTYPES, ModelError, describe, load_model
from .plan import Plan, PlanError


def _plan(name: str | None) -> Plan | None:
    return Plan.parse(name) if name else None


def _text(path: str) -> str:
    if not Path(path).is_file():
        raise ModelError(f"--text {path!r}: file not found")
    return Path(path).read_text(encoding="utf-8")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cqil", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def command(func, name):
        p = sub.add_parser(name, help=func.__doc__.splitlines()[0], description=func.__doc__)
        p.set_defaults(func=func)
        return p

    def model_args(p):
        p.add_argument("--model", default="smollm2-135m",
                       help="embedded name, local HF directory, .gguf file or Hub id (default: %(default)s)")
        p.add_argument("--plan", help="CQIL plan, e.g. S18-E28-P2-D0 (0-indexed, end exclusive)")
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
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (PlanError, ModelError) as err:
        print(f"cqil: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
