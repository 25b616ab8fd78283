rule figures:
    input:
        similarity=rules.similarity.output,
        sensitivity=rules.sensitivity.output,
        search=rules.search.output,
        selected=rules.select.output,
    output:
        [f"{RESULTS}/figures/{name}.png" for name in FIGURES],
    params:
        out_dir=f"{RESULTS}/figures",
    log:
        log_path("figures"),
    threads: 1
    shell:
        "cqil figures --similarity {input.similarity} --sensitivity {input.sensitivity} --search {input.search}"
        " --selected {input.selected} --title {wildcards.model} --out-dir {params.out_dir} > {log} 2>&1"
