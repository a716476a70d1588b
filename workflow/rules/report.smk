# Report: the paper's artifacts rebuilt from the metrics, beside the paper's own numbers.


def report_options(**extra):
    models = {
        name: {key: entry.get(key) for key in ("display", "paper", "params_b")} for name, entry in MODELS.items()
    }
    # json_arg sorts dict keys; "order" keeps the config's model order (base -> SFT -> RL rows).
    return json_arg({"models": models, "order": list(MODELS), "splits": SPLITS, **extra})


ALL_METRICS = expand("results/metrics/{model}/{split}.json", model=MODELS, split=SPLITS)


rule table_refcoco:
    input:
        ALL_METRICS,
    output:
        report(
            multiext("results/tables/refcoco", ".csv", ".md"),
            caption="../report/refcoco.rst",
            category="Tables",
        ),
        report(
            multiext("results/tables/refcoco_vs_paper", ".csv", ".md"),
            caption="../report/refcoco_vs_paper.rst",
            category="Tables",
        ),
    params:
        options=report_options(tolerance=config["report"]["tolerance"]),
    container:
        image_for("cpu")
    resources:
        **cpu_job(),
    log:
        "logs/table_refcoco.log",
    shell:
        "python -m egm report-table --metrics {input} --report {params.options}"
        " --out-dir results/tables > {log} 2>&1"


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
        options=report_options(),
    container:
        image_for("cpu")
    resources:
        **cpu_job(),
    log:
        "logs/figure_tradeoff.log",
    shell:
        "python -m egm report-figure --metrics {input.metrics} --latency {input.latency} --report {params.options}"
        " --out-prefix results/figures/tradeoff > {log} 2>&1"
