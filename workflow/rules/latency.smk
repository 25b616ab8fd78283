# {setup} is `original`, `cqil-<plan>` (P ranks) or `tp-<n>` (n ranks); `cqil latency` starts torchrun itself.
# Locally the job takes every core Snakemake has, so nothing else runs while it is timed; on a cluster, the
# threads that config.resources.latency gives it.
rule latency:
    input:
        rules.prepare_model.output,
    output:
        f"{RESULTS}/latency/{{setup}}.json",
    log:
        log_path("latency", job="{model}/{setup}"),
    benchmark:
        log_path("latency", "benchmark.tsv", job="{model}/{setup}")
    threads: latency_threads
    resources:
        **job_resources("latency", gpu=latency_gpus, cpus_per_task=latency_threads),
    params:
        env=hub_env("latency"),
        device=config["device"],
        spec=spec,
        dtype=dtype,
        engine=engine_args,
        settings=settings("latency"),
    shell:
        "{params.env}cqil latency --device {params.device} --settings {params.settings} --model {params.spec:q}"
        " --dtype {params.dtype} {params.engine} --out {output} > {log} 2>&1"


# The latency table (CSV + Markdown) and its figure: reductions against the 1-thread original and the ideal.
rule latency_table:
    input:
        latency_inputs,
    output:
        table=f"{RESULTS}/latency.csv",
        markdown=f"{RESULTS}/latency.md",
        figure=report(
            f"{RESULTS}/figures/latency.png",
            caption="../report/latency.rst",
            category="Latency",
            subcategory="{model}",
        ),
        pdf=f"{RESULTS}/figures/latency.pdf",
    log:
        log_path("latency_table"),
    threads: 1
    params:
        figure=f"{RESULTS}/figures/latency",
    shell:
        "cqil latency-table {input} --out {output.table} --figure {params.figure} --title {wildcards.model}"
        " > {log} 2>&1"
