rule figures:
    input:
        similarity=rules.similarity.output.table,
        sensitivity=rules.sensitivity.output.table,
        search=rules.search.output.table,
        selected=rules.select.output,
    output:
        [f"{RESULTS}/figures/{name}.{kind}" for name in FIGURES for kind in ("png", "pdf")],
    params:
        out_dir=f"{RESULTS}/figures",
    log:
        log_path("figures"),
    threads: 1
    shell:
        "cqil figures --similarity {input.similarity} --sensitivity {input.sensitivity} --search {input.search}"
        " --selected {input.selected} --title {wildcards.model} --out-dir {params.out_dir} > {log} 2>&1"
