rule corpus:
    input:
        rules.prepare_model.output,
    output:
        blocks=f"{RESOURCES}/corpus.pt",
        summary=f"{RESULTS}/corpus.json",
    log:
        log_path("corpus"),
    benchmark:
        log_path("corpus", "benchmark.tsv")
    threads: res("corpus", "threads")
    resources:
        **job_resources("corpus"),
    params:
        spec=spec,
        device=config["device"],
        settings=settings("corpus"),
    shell:
        "cqil --threads {threads} corpus --device {params.device} --settings {params.settings} --model {params.spec:q}"
        " --out {output.blocks} --summary {output.summary} > {log} 2>&1"
