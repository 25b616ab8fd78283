# lm-eval's own tasks (config.evaluate.tasks not in cqil/tasks/: sciq, ...; and mmlu, which mmlu_5shot wraps) read
# their data from the Hub: fetched here once, on a CPU job, into the Hugging Face cache that the evaluate jobs then
# read offline. lm-eval's `dummy` model answers at random: one question of each task is enough to download and build
# the task (all its splits: mmlu's dev questions, the 5-shot examples, too).
rule prepare_tasks:
    output:
        touch(f"resources/{config['run']}/hub_tasks.done"),
    log:
        log_path("prepare_tasks", job=None),
    threads: res("prepare_tasks", "threads")
    resources:
        **job_resources("prepare_tasks"),
    params:
        tasks=",".join(HUB_TASKS),
    shell:
        "lm_eval --model dummy --tasks {params.tasks} --limit 1 > {log} 2>&1"


# {variant} is `original`, a plan (zero-shot) or `<plan>-finetuned` (the plan with its adapter).
rule evaluate:
    input:
        unpack(variant_inputs),
    output:
        f"{RESULTS}/eval/{{variant}}.json",
    log:
        log_path("evaluate", job="{model}/{variant}"),
    benchmark:
        log_path("evaluate", "benchmark.tsv", job="{model}/{variant}")
    threads: res("evaluate", "threads")
    resources:
        **job_resources("evaluate"),
    params:
        env=hub_env("evaluate"),
        device=config["device"],
        spec=spec,
        dtype=dtype,
        variant=variant_args,
        settings=settings("evaluate"),
    shell:
        "{params.env}cqil --threads {threads} evaluate --device {params.device} --settings {params.settings}"
        " --model {params.spec:q} --dtype {params.dtype} {params.variant} --out {output} > {log} 2>&1"


# Every variant's scores with 95% intervals, and its paired differences from the original.
rule quality:
    input:
        evals=evaluations,
        scores=for_selected_plans(f"{RESULTS}/plans/{{plan}}/scores.json"),
        finetune=for_selected_plans(f"{RESULTS}/plans/{{plan}}/finetune.json"),
    output:
        table=f"{RESULTS}/quality.csv",
        markdown=f"{RESULTS}/quality.md",
        differences=f"{RESULTS}/quality_diff.csv",
        differences_markdown=f"{RESULTS}/quality_diff.md",
        figure=report(
            f"{RESULTS}/figures/quality_tradeoff.png",
            caption="../report/quality_tradeoff.rst",
            category="Quality",
            subcategory="{model}",
        ),
        pdf=f"{RESULTS}/figures/quality_tradeoff.pdf",
    log:
        log_path("quality"),
    threads: 1
    params:
        settings=settings("quality"),
        figure=f"{RESULTS}/figures/quality_tradeoff",
    shell:
        "cqil quality --settings {params.settings} {input.evals} --scores {input.scores} --finetune {input.finetune}"
        " --out {output.table} --figure {params.figure} > {log} 2>&1"
