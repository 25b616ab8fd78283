rule finetune:
    input:
        rules.corpus.output.blocks,
    output:
        adapter=directory(f"{RESOURCES}/plans/{{plan}}/finetune/adapter"),
        summary=f"{RESULTS}/plans/{{plan}}/finetune.json",
        figure=report(
            f"{RESULTS}/plans/{{plan}}/loss.png",
            caption="../report/loss.rst",
            category="Fine-tuning",
            subcategory="{model}",
        ),
    log:
        log_path("finetune", job="{model}/{plan}"),
    benchmark:
        log_path("finetune", "benchmark.tsv", job="{model}/{plan}")
    # Before the evaluations: each fine-tuning unlocks one, so started late they end a run on one busy core.
    priority: 1
    threads: res("finetune", "threads")
    resources:
        **job_resources("finetune"),
    params:
        env=hub_env("finetune"),
        device=config["device"],
        threads=rank_threads("finetune"),
        spec=spec,
        dtype=dtype,
        settings=settings("finetune"),
        out_dir=f"{RESOURCES}/plans/{{plan}}/finetune",  # the checkpoint here survives a killed job
        launcher=launcher("finetune"),
    shell:
        "{params.env}{params.launcher} --threads {params.threads} finetune --device {params.device}"
        " --settings {params.settings} --model {params.spec:q} --dtype {params.dtype} --plan {wildcards.plan}"
        " --corpus {input} --out-dir {params.out_dir}"
        " --summary {output.summary} --figure {output.figure} > {log} 2>&1"


# One row per fine-tuned plan: held-out perplexity, KL and top-1 agreement before and after.
rule finetuned:
    input:
        for_selected_plans(f"{RESULTS}/plans/{{plan}}/finetune.json"),
    output:
        f"{RESULTS}/finetuned.csv",
    log:
        log_path("finetuned"),
    threads: 1
    shell:
        "cqil finetuned-table {input} --out {output} > {log} 2>&1"
