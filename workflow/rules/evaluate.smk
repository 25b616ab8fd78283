# {variant} is `original`, a plan (zero-shot) or `<plan>-finetuned` (the plan with its adapter).
rule evaluate:
    input:
        unpack(variant_inputs),
    output:
        f"{RESULTS}/eval/{{variant}}.json",
    params:
        spec=spec,
        dtype=dtype,
        variant=variant_args,
        split=config["evaluate"].get("split", "test"),
        tasks=" ".join(config["evaluate"]["tasks"]),
        options=evaluate_options(),
        batch_size=config["evaluate"].get("batch_size", 8),
        cloze_choices=config["evaluate"].get("cloze_choices", 4),
    log:
        f"logs/{config['run']}/evaluate/{{model}}/{{variant}}.log",
    benchmark:
        f"logs/{config['run']}/evaluate/{{model}}/{{variant}}.benchmark.tsv"
    threads: res("evaluate", "threads")
    resources:
        **job_resources("evaluate"),
    shell:
        "cqil --threads {threads} evaluate --model {params.spec:q} --dtype {params.dtype} {params.variant}"
        " --corpus {input.corpus} --split {params.split} --tasks {params.tasks} {params.options}"
        " --batch-size {params.batch_size} --cloze-choices {params.cloze_choices} --out {output} > {log} 2>&1"


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
