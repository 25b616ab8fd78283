# Equal-depth baselines of the selected plans (config.baselines, on in config/baselines.yaml): the layers each
# pruning rule removes and the LP plan over the same groups. Their variants (drop-..., S..-LP) go through the
# same score, finetune, evaluate and latency rules as the plans; the comparison puts them side by side.
checkpoint baselines:
    input:
        corpus=rules.corpus.output.blocks,
        selected=rules.select.output,
    output:
        f"{RESULTS}/baselines.json",
    log:
        log_path("baselines"),
    benchmark:
        log_path("baselines", "benchmark.tsv")
    priority: 1  # seconds of work that unlock the baselines' fine-tunings (see rule finetune)
    threads: res("baselines", "threads")
    resources:
        **job_resources("baselines"),
    params:
        env=hub_env("baselines"),
        device=config["device"],
        spec=spec,
        dtype=dtype,
        settings=settings("baselines"),
    shell:
        "{params.env}cqil --threads {threads} baselines --device {params.device} --settings {params.settings}"
        " --model {params.spec:q} --dtype {params.dtype} --corpus {input.corpus} --selected {input.selected}"
        " --out {output} > {log} 2>&1"


# The quality table of the compared variants (as the `quality` rule's, on their evaluations), then the comparison.
rule baselines_quality:
    input:
        evals=compared_evaluations,
        scores=for_compared_variants(f"{RESULTS}/plans/{{plan}}/scores.json"),
        finetune=for_compared_variants(f"{RESULTS}/plans/{{plan}}/finetune.json"),
    output:
        table=f"{RESULTS}/baselines/quality.csv",
        differences=f"{RESULTS}/baselines/quality_diff.csv",
    log:
        log_path("baselines_quality"),
    threads: 1
    params:
        settings=settings("quality"),
    shell:
        "cqil quality --settings {params.settings} {input.evals} --scores {input.scores} --finetune {input.finetune}"
        " --out {output.table} > {log} 2>&1"


rule comparison:
    input:
        baselines=f"{RESULTS}/baselines.json",
        levels=rules.baselines_quality.output.table,
        differences=rules.baselines_quality.output.differences,
        latency=lambda wildcards: (
            f"{RESULTS}/latency.csv".format(model=wildcards.model) if wildcards.model in LATENCY_MODELS else []
        ),
    output:
        table=f"{RESULTS}/comparison.csv",
        markdown=f"{RESULTS}/comparison.md",
        figure=report(
            f"{RESULTS}/figures/comparison.png",
            caption="../report/comparison.rst",
            category="Quality",
            subcategory="{model}",
        ),
        pdf=f"{RESULTS}/figures/comparison.pdf",
    log:
        log_path("comparison"),
    threads: 1
    params:
        latency=lambda wildcards, input: f"--latency-table {input.latency}" if input.latency else "",
        figure=f"{RESULTS}/figures/comparison",
    shell:
        "cqil comparison --baselines {input.baselines} --levels {input.levels} --differences {input.differences}"
        " {params.latency} --out {output.table} --figure {params.figure} > {log} 2>&1"
