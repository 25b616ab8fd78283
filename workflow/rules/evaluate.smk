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
        " {params.variant} --corpus {input.corpus} --out {output} > {log} 2>&1"


rule quality:
    input:
        evals=evaluations,
        scores=for_selected_plans(f"{RESULTS}/plans/{{plan}}/scores.json"),
        finetune=for_selected_plans(f"{RESULTS}/plans/{{plan}}/finetune.json"),
    output:
        table=f"{RESULTS}/quality.csv",
        markdown=f"{RESULTS}/quality.md",
    log:
        log_path("quality"),
    threads: 1
    shell:
        "cqil quality {input.evals} --scores {input.scores} --finetune {input.finetune}"
        " --out {output.table} > {log} 2>&1"
