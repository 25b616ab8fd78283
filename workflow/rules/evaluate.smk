# {variant} is `original`, a plan (zero-shot) or `<plan>-finetuned` (the plan with its adapter).
rule evaluate:
    input:
        unpack(variant_inputs),
    output:
        f"{RESULTS}/eval/{{variant}}.json",
    log:
        f"logs/{config['run']}/evaluate/{{model}}/{{variant}}.log",
    benchmark:
        f"logs/{config['run']}/evaluate/{{model}}/{{variant}}.benchmark.tsv"
    threads: res("evaluate", "threads")
    resources:
        **job_resources("evaluate"),
    params:
        spec=spec,
        dtype=dtype,
        variant=variant_args,
        settings=settings("evaluate"),
    shell:
        "cqil --threads {threads} evaluate --settings {params.settings} --model {params.spec:q} --dtype {params.dtype}"
        " {params.variant} --out {output} > {log} 2>&1"


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
