rule prepare_model:
    output:
        f"{RESULTS}/model.json",
    log:
        log_path("prepare_model"),
    benchmark:
        log_path("prepare_model", "benchmark.tsv")
    threads: res("prepare_model", "threads")
    resources:
        **job_resources("prepare_model"),
    params:
        spec=spec,
        layers=layers,
    shell:
        "cqil --threads {threads} prepare --model {params.spec:q} --layers {params.layers} --out {output} > {log} 2>&1"
