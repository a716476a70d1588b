# Test-time scaling ("bigger or longer?"): each model answers one fixed, seeded sample of the eval
# splits under every reasoning budget of `scaling.budgets` (budget forcing, egm/infer/budget.py),
# one job and one engine load per model -> results/scaling/{model}/budget-{N}.{jsonl,json}; then
# accuracy vs latency per budget as a table and a figure (docs/scaling.md).


rule scaling:
    input:
        model=lambda wc: model_manifest(wc.model),
        splits=split_files(),
        images="resources/manifests/images-coco.json",
        data="resources/manifests/dataset.json",
    output:
        _scaling_outputs(SCALING_BUDGETS),
    wildcard_constraints:
        model=_any_of(SWEPT),
    params:
        image_root=IMAGE_ROOT,
        options=lambda wc: scaling_options(wc.model),
        model_dir=lambda wc: model_dir(wc.model),
        out_dir=lambda wildcards, output: folder_of(output[0]),
        work_dir=lambda wc: scaling_work_dir(wc.model),
    container:
        image_for(lambda wc: model_image_key(wc.model))
    resources:
        **model_job(),
    benchmark:
        "results/benchmarks/scaling/{model}.tsv"
    log:
        "logs/scaling/{model}.log",
    shell:
        "python -m egm scaling --model {wildcards.model} --model-dir {params.model_dir} --model-manifest {input.model}"
        " --splits {input.splits} --image-root {params.image_root} --out-dir {params.out_dir}"
        " --work-dir {params.work_dir} --options {params.options}"
        " --data-manifest {input.data} > {log} 2>&1"


use rule scaling as scaling_single_point with:
    output:
        _scaling_outputs(["unlimited"]),
    wildcard_constraints:
        model=_any_of(SINGLE_POINT),


rule table_scaling:
    input:
        SCALING_METRICS,
    output:
        report(
            multiext("results/tables/scaling", *TABLE),
            caption="../report/scaling_table.rst",
            category="Tables",
        ),
    params:
        prefix=out_prefixes,
        options=report_options(),
    container:
        image_for("cpu")
    resources:
        **cpu_job(),
    log:
        "logs/table_scaling.log",
    shell:
        "python -m egm report-scaling --metrics {input} --report {params.options}"
        " --table-prefix {params.prefix} > {log} 2>&1"


rule figure_scaling:
    input:
        SCALING_METRICS,
    output:
        report(
            multiext("results/figures/scaling", ".png", ".pdf"),
            caption="../report/scaling.rst",
            category="Figures",
        ),
    params:
        prefix=out_prefixes,
        options=report_options(),
    container:
        image_for("cpu")
    resources:
        **cpu_job(),
    log:
        "logs/figure_scaling.log",
    shell:
        "python -m egm report-scaling --metrics {input} --report {params.options}"
        " --figure-prefix {params.prefix} > {log} 2>&1"
