# Report: the paper's artifacts rebuilt from the metrics, beside the paper's own numbers.


rule table_refcoco:
    input:
        ALL_METRICS,
    output:
        report(
            multiext("results/tables/refcoco", *TABLE),
            caption="../report/refcoco.rst",
            category="Tables",
        ),
        report(
            multiext("results/tables/refcoco_vs_paper", *TABLE),
            caption="../report/refcoco_vs_paper.rst",
            category="Tables",
        ),
        # Only where the config sets ranges (the demo): this run against them.
        *(
            [
                report(
                    multiext("results/tables/refcoco_vs_expected", *TABLE),
                    caption="../report/refcoco_vs_expected.rst",
                    category="Tables",
                )
            ]
            if EXPECTED
            else []
        ),
    params:
        options=report_options(tolerance=config["report"]["tolerance"], expected=EXPECTED),
        prefixes=out_prefixes,
    container:
        image_for("cpu")
    resources:
        **cpu_job(),
    log:
        "logs/table_refcoco.log",
    shell:
        "python -m egm report-table --metrics {input} --report {params.options}"
        " --out-prefixes {params.prefixes} > {log} 2>&1"


# lmms-eval's RefCOCO metrics from the same per-split metrics: no new inference.
rule table_refcoco_thresholds:
    input:
        ALL_METRICS,
    output:
        report(
            multiext("results/tables/refcoco_thresholds", *TABLE),
            caption="../report/refcoco_thresholds.rst",
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
        "logs/table_refcoco_thresholds.log",
    shell:
        "python -m egm report-thresholds --metrics {input} --report {params.options}"
        " --out-prefix {params.prefix} > {log} 2>&1"


rule figure_tradeoff:
    input:
        metrics=ALL_METRICS,
        latency=LATENCY_FILES,
    output:
        report(
            multiext("results/figures/tradeoff", ".png", ".pdf"),
            caption="../report/tradeoff.rst",
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
        "logs/figure_tradeoff.log",
    shell:
        "python -m egm report-tradeoff --metrics {input.metrics} --latency {input.latency} --report {params.options}"
        " --out-prefix {params.prefix} > {log} 2>&1"


rule figure_tokens:
    input:
        ALL_METRICS,
    output:
        report(
            multiext("results/figures/tokens", ".png", ".pdf"),
            caption="../report/tokens.rst",
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
        "logs/figure_tokens.log",
    shell:
        "python -m egm report-tokens --metrics {input} --report {params.options}"
        " --out-prefix {params.prefix} > {log} 2>&1"


rule table_latency:
    input:
        metrics=ALL_METRICS,
        latency=LATENCY_FILES,
    output:
        report(
            multiext("results/tables/latency", *TABLE),
            caption="../report/latency.rst",
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
        "logs/table_latency.log",
    shell:
        "python -m egm report-latency --metrics {input.metrics} --latency {input.latency} --report {params.options}"
        " --out-prefix {params.prefix} > {log} 2>&1"


if TRAINING_STAGES:

    rule figure_training:
        input:
            TRAINING_STAGES,
        output:
            report(
                multiext("results/figures/training", ".png", ".pdf"),
                caption="../report/training.rst",
                category="Figures",
            ),
        params:
            prefix=out_prefixes,
            # Only the stages' row labels: a change to the evaluated models or splits leaves the curves as they are.
            options=json_arg({"models": {model: {"display": MODELS[model]["display"]} for model in TRAINED}}),
        container:
            image_for("cpu")
        resources:
            **cpu_job(),
        log:
            "logs/figure_training.log",
        shell:
            "python -m egm report-training --stages {input} --report {params.options}"
            " --out-prefix {params.prefix} > {log} 2>&1"


# The run's price checked: every job's estimate from the committed measurement records (egm plan)
# beside what it cost here (its benchmark file, its own cost record), after every other artifact.
# On the host (`run:` is never sent into a container): it plans through Snakemake's API, which
# the images leave out.
rule table_cost:
    input:
        expand("results/tables/{table}{ext}", table=["refcoco", "latency", "scaling"], ext=TABLE),
        rules.figure_training.output if TRAINING_STAGES else [],
    output:
        report("results/tables/cost.md", caption="../report/cost.rst", category="Tables"),
        json="results/tables/cost.json",
    params:
        configfiles=configfiles_given(),
    localrule: True
    log:
        "logs/table_cost.log",
    run:
        shell(
            "python -m egm plan --check --gpu auto --gpus 1 --configfile {params.configfiles}"
            " --json {output.json} --markdown {output[0]} > {log} 2>&1"
        )
