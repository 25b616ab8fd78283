# Validation, paths and input functions; no rules here.
import json
import re
import shlex
from pathlib import Path

from cqil.baselines import BaselinesSettings
from cqil.config import check_config
from cqil.errors import CqilError
from cqil.evaluate import CORPUS_TASKS, hub_tasks
from cqil.plan import PLAN_NAME, SETUP_NAME, Setup, parse_plan

try:
    check_config(config, Path(workflow.basedir) / "schemas" / "config.schema.yaml")
except CqilError as err:  # one line, before any job runs
    raise SystemExit(f"cqil: error: {err}")

RESULTS = f"results/{config['run']}/{{model}}"
RESOURCES = f"resources/{config['run']}/{{model}}"
SIMULATION = f"results/{config['run']}/simulation"
TABLES = f"results/{config['run']}/tables"
SIMULATION_FIGURES = ["simulation_reduction", "simulation_crossover", "simulation_validation"]
LOGS = f"logs/{config['run']}"


def log_path(rule, suffix="log", job="{model}"):
    """logs/<run>/<rule>/<job>.log, and .benchmark.tsv beside it (Snakemake's timings). `job`: the wildcards that
    name one job of the rule (`{model}/{plan}`); None for a rule that runs once per run (logs/<run>/<rule>.log)."""
    return f"{LOGS}/{rule}.{suffix}" if job is None else f"{LOGS}/{rule}/{job}.{suffix}"


LATENCY_MODELS = config["latency_setups"]["models"]
# lm-eval's own tasks, and those our groups wrap (mmlu for mmlu_5shot), read from the Hub: `prepare_tasks` fetches
# them before any evaluate job
HUB_TASKS = hub_tasks(config["evaluate"]["tasks"])
BASELINES = BaselinesSettings(**config["baselines"]).active if "baselines" in config else False


wildcard_constraints:
    model="|".join(map(re.escape, dict.fromkeys(config["models"] + LATENCY_MODELS))),
    setup=SETUP_NAME,
    plan=PLAN_NAME,
    variant=rf"original|{PLAN_NAME}(-finetuned)?",


def spec(wildcards):
    return config["catalog"][wildcards.model]["spec"]


def layers(wildcards):
    return config["catalog"][wildcards.model]["layers"]


def dtype(wildcards):
    return config["catalog"][wildcards.model].get("dtype", "auto")


def settings(section):
    """A config section as the quoted JSON that `cqil <stage> --settings` reads: the stage's settings, whole."""
    return shlex.quote(json.dumps(config[section], sort_keys=True))


def model_settings(section, field):
    """`settings` per model: the model's catalog `plans` join the list config[section][field]."""

    def params(wildcards):
        values = dict(config[section])
        values[field] = list(dict.fromkeys(values[field] + model_plans(wildcards.model)))
        return shlex.quote(json.dumps(values, sort_keys=True))

    return params


def model_plans(model):
    """Plans a model always carries: scored, selected and timed (the paper config's official plans)."""
    return config["catalog"][model].get("plans", [])


def latency_threads(wildcards):
    """Threads of a latency job: config.resources.latency.threads where the config gives them (a cluster's GPU
    node), else every core Snakemake may use, so that nothing else runs while it is timed (read when a job is
    scheduled, so `--report` needs no --cores)."""
    return config["resources"].get("latency", {}).get("threads") or workflow.cores


def output_dir(wildcards, output):
    """The folder of a rule's first output: where `cqil` writes the rule's family of files."""
    return str(Path(output[0]).parent)


def job_resources(rule, **override):
    """A rule's `resources:` from config.resources (its entry over the default): memory, runtime, GPUs,
    and the GPU model, SLURM partition and account where the config names them (the SLURM executor reads
    these names; a local run ignores them). `cpus_per_task` is the config's threads: SLURM's --cpus-per-task
    would otherwise be the job's `threads`, which Snakemake caps at the --cores of the submitting host."""
    keys = ("mem_mb", "runtime", "gpu", "gpu_model", "slurm_partition", "slurm_account")
    values = res(rule)
    return {key: values[key] for key in keys if key in values} | {"cpus_per_task": values["threads"]} | override


def hub_env(rule):
    """`HF_HUB_OFFLINE=1 ` before the command of a job that holds a GPU: its weights and data were fetched by
    CPU jobs before it (prepare_model, prepare_tasks, corpus), and a compute node may have no route to the Hub;
    offline, a missing file fails at once instead of a download on GPU time."""
    return "HF_HUB_OFFLINE=1 " if res(rule, "gpu") else ""


def run_folder(wildcards, output):
    """results/<run>, for a rule whose first output is results/<run>/<stage>/<file>."""
    return str(Path(output[0]).parents[1])


def res(rule, key=None):
    """A rule's entry in config.resources over the default entry, or one value of it (`key`): the rules read their
    `threads` here and their `resources:` from `job_resources`."""
    entry = {**config["resources"]["default"], **config["resources"].get(rule, {})}
    return entry if key is None else entry[key]


def for_selected_plans(*patterns):
    """An input function: each of `patterns` for each plan the `select` checkpoint chose for the model."""

    def inputs(wildcards):
        selected = checkpoints.select.get(model=wildcards.model).output[0]
        plans = json.loads(Path(selected).read_text())["plans"]
        return [path for pattern in patterns for path in expand(pattern, model=wildcards.model, plan=plans)]

    return inputs


def evaluations(wildcards):
    """The lm-eval results of the original and of each selected plan, zero-shot and fine-tuned."""
    plans = for_selected_plans(f"{RESULTS}/eval/{{plan}}.json", f"{RESULTS}/eval/{{plan}}-finetuned.json")
    return expand(f"{RESULTS}/eval/original.json", model=wildcards.model) + plans(wildcards)


def variant_inputs(wildcards):
    """What `cqil evaluate` reads for a variant: the model (prepared), lm-eval's Hub tasks (fetched), the corpus
    where a task is built from it, and the adapter of a fine-tuned plan."""
    inputs = {"model": expand(f"{RESULTS}/model.json", model=wildcards.model)}
    if HUB_TASKS:
        inputs["hub_tasks"] = rules.prepare_tasks.output
    if set(config["evaluate"]["tasks"]) & set(CORPUS_TASKS):
        inputs["corpus"] = expand(f"{RESOURCES}/corpus.pt", model=wildcards.model)
    if wildcards.variant.endswith("-finetuned"):
        plan = wildcards.variant.removesuffix("-finetuned")
        inputs["adapter"] = expand(f"{RESOURCES}/plans/{plan}/finetune/adapter", model=wildcards.model)
    return inputs


def variant_args(wildcards, input):
    """--plan, --adapter and --corpus of a variant: original, <plan> (zero-shot) or <plan>-finetuned."""
    corpus = f" --corpus {input.corpus}" if "corpus" in input.keys() else ""
    if wildcards.variant == "original":
        return corpus.strip()
    plan = wildcards.variant.removesuffix("-finetuned")
    return f"--plan {plan}" + (f" --adapter {input.adapter}" if "adapter" in input.keys() else "") + corpus


def launcher(rule):
    """`cqil`, or `torchrun` with one process per GPU when the job has more than one."""
    gpus = res(rule, "gpu")
    return f"torchrun --standalone --nproc_per_node {gpus} -m cqil" if gpus > 1 else "cqil"


def rank_threads(rule):
    """`--threads` of each process `launcher` starts: the job's threads shared among them (each rank taking
    them all would run ranks x threads threads on the job's cores)."""
    ranks = max(res(rule, "gpu"), 1)
    return lambda wildcards, threads: max(1, threads // ranks)


def latency_setups(model):
    """What the latency stage times for a model: the original, each plan, each TP degree that splits its heads."""
    entry, wanted = config["catalog"][model], config["latency_setups"]
    degrees = [n for n in wanted["tp_degrees"] if entry["heads"] % n == 0 and entry["kv_heads"] % n == 0]
    plans = dict.fromkeys(wanted["plans"] + model_plans(model))
    return (
        [Setup("original")] + [Setup.parse(f"cqil-{plan}") for plan in plans] + [Setup("tp", degree=n) for n in degrees]
    )


def latency_files(model):
    return expand(f"{RESULTS}/latency/{{setup}}.json", model=model, setup=[s.name for s in latency_setups(model)])


def latency_inputs(wildcards):
    """The latency table's records; with baselines, also every compared variant of a run model that fits the cores
    (a 4-rank setup on 2 cores would time contention, not the setup)."""
    files = latency_files(wildcards.model)
    if BASELINES and wildcards.model in config["models"]:
        setups = [Setup.of(parse_plan(name)) for name in compared_variants(wildcards.model)]
        wanted = [setup.name for setup in setups if setup.ranks <= workflow.cores]
        files += [path for path in expand(f"{RESULTS}/latency/{{setup}}.json", model=wildcards.model, setup=wanted)]
    return list(dict.fromkeys(files))


def compared_variants(model):
    """The matched CQIL plans and their baselines, in the order of the `baselines` checkpoint's record."""
    record = json.loads(Path(checkpoints.baselines.get(model=model).output[0]).read_text())
    return list(dict.fromkeys([row["plan"] for row in record["baselines"]] + record["variants"]))


def for_compared_variants(*patterns):
    """An input function: each of `patterns` for each compared variant (plan=the variant's name)."""

    def inputs(wildcards):
        variants = compared_variants(wildcards.model)
        return [path for pattern in patterns for path in expand(pattern, model=wildcards.model, plan=variants)]

    return inputs


def compared_evaluations(wildcards):
    """The evaluations the comparison reads: the original, and each compared variant zero-shot and fine-tuned."""
    variants = for_compared_variants(f"{RESULTS}/eval/{{plan}}.json", f"{RESULTS}/eval/{{plan}}-finetuned.json")
    return expand(f"{RESULTS}/eval/original.json", model=wildcards.model) + variants(wildcards)


def engine_args(wildcards):
    """`cqil latency` flags of a setup."""
    setup = Setup.parse(wildcards.setup)
    return (
        f"--engine {setup.engine}"
        + (f" --plan {setup.plan}" if setup.plan else "")
        + (f" --degree {setup.degree}" if setup.engine == "tp" else "")
    )


def latency_gpus(wildcards):
    """GPUs of a latency job: one per rank when config.resources.latency.gpu is set, else none."""
    return Setup.parse(wildcards.setup).ranks if res("latency", "gpu") else 0


FIGURES = ["similarity_heatmap", "similarity_adjacent", "sensitivity", "frontier"]


def final_targets():
    return (
        expand(
            [
                f"{RESULTS}/corpus.json",
                f"{RESULTS}/selected_scores.csv",
                f"{RESULTS}/finetuned.csv",
                f"{RESULTS}/quality.csv",
            ]
            + [f"{RESULTS}/figures/{name}.png" for name in FIGURES],
            model=config["models"],
        )
        + expand([f"{RESULTS}/latency.csv", f"{RESULTS}/figures/latency.png"], model=LATENCY_MODELS)
        + ([f"{SIMULATION}/predictions.csv"] if LATENCY_MODELS else [])
        + [f"{TABLES}/quality.csv"]
        + (
            expand([f"{RESULTS}/comparison.csv", f"{RESULTS}/figures/comparison.png"], model=config["models"])
            if BASELINES
            else []
        )
    )
