# Validation, paths and input functions; no rules here.
import json
import re
import shlex
from pathlib import Path

from cqil.config import ConfigError, check_config

try:
    check_config(config, Path(workflow.basedir) / "schemas" / "config.schema.yaml")
except ConfigError as err:  # one line, before any job runs
    raise SystemExit(f"cqil: error: {err}")

RESULTS = f"results/{config['run']}/{{model}}"
RESOURCES = f"resources/{config['run']}/{{model}}"


def log_path(rule, suffix="log"):
    """logs/<run>/<rule>/<model>.log, and .benchmark.tsv beside it (Snakemake's timings)."""
    return f"logs/{config['run']}/{rule}/{{model}}.{suffix}"


wildcard_constraints:
    model="|".join(map(re.escape, config["models"])),
    plan=r"S\d+-E\d+-P\d+-D\d+(-official)?",


def spec(wildcards):
    return config["catalog"][wildcards.model]["spec"]


def layers(wildcards):
    return config["catalog"][wildcards.model]["layers"]


def dtype(wildcards):
    return config["catalog"][wildcards.model].get("dtype", "auto")


def settings(section, drop=("split",)):
    """A config section as the quoted JSON that `cqil <stage> --settings` reads."""
    values = {k: v for k, v in config[section].items() if k not in drop}
    return shlex.quote(json.dumps(values, sort_keys=True))


def res(rule, key):
    """A rule's resource: its own entry in config.resources, else the default's."""
    return {**config["resources"]["default"], **config["resources"].get(rule, {})}[key]


def for_selected_plans(pattern):
    """An input function: `pattern` for each plan the `select` checkpoint chose for the model."""

    def inputs(wildcards):
        selected = checkpoints.select.get(model=wildcards.model).output[0]
        plans = json.loads(Path(selected).read_text())["plans"]
        return expand(pattern, model=wildcards.model, plan=plans)

    return inputs


def launcher(rule):
    """`cqil`, or `accelerate launch` over the job's GPUs when it has more than one."""
    gpus = res(rule, "gpu")
    return f"accelerate launch --num_processes {gpus} -m cqil" if gpus > 1 else "cqil"


FIGURES = ["similarity_heatmap", "similarity_adjacent", "sensitivity", "frontier"]


def final_targets():
    return expand(
        [f"{RESULTS}/corpus.json", f"{RESULTS}/selected_scores.csv", f"{RESULTS}/finetuned.csv"]
        + [f"{RESULTS}/figures/{name}.png" for name in FIGURES],
        model=config["models"],
    )
