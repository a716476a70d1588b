# Test-time scaling ("bigger or longer?"): each model answers one fixed, seeded sample of the eval
# splits under every reasoning budget of `scaling.budgets` (budget forcing, egm/infer/budget.py),
# one job and one engine load per model -> results/scaling/{model}/budget-{N}.{jsonl,json}; then
# accuracy vs latency per budget as a table and a figure (docs/scaling.md).

SCALING = config["scaling"]
SCALING_BUDGETS = [str(b) for b in SCALING["budgets"]]  # file labels: "0", "16", ..., "unlimited"
_unknown_single = sorted(set(SCALING["single_point"]) - set(MODELS))
if _unknown_single:
    raise ValueError(f"scaling.single_point names {_unknown_single}, which are not evaluated models: {sorted(MODELS)}")
# Answered once, unlimited: Instruct models and the bigger ones (single points in the figure).
SINGLE_POINT = [m for m in MODELS if m in SCALING["single_point"]]
SWEPT = [m for m in MODELS if m not in SINGLE_POINT]


def scaling_budgets(model):
    return ["unlimited"] if model in SINGLE_POINT else SCALING_BUDGETS


def scaling_options(model):
    entry = MODELS[model]
    settings = {k: SCALING[k] for k in ("answer_max_tokens", "n_per_split", "seed")}
    settings["budgets"] = scaling_budgets(model)
    settings["batch_size"] = SCALING["batch_size"] or config["inference"]["batch_size"]
    return json_arg(
        {
            "prompt": entry["prompt"],
            "backend": entry["backend"],
            "engine_options": entry["engine_options"],
            # limit is predict's smoke-run cut and batch_size is resolved above: neither is a key here.
            "inference": {k: v for k, v in config["inference"].items() if k not in ("batch_size", "limit")},
            "scaling": settings,
            "gpus": entry["gpus"],
        }
    )


def _any_of(keys):
    return "|".join(map(re.escape, keys)) if keys else "a^"


def _scaling_outputs(budgets):
    return expand("results/scaling/{{model}}/budget-{budget}.{ext}", budget=budgets, ext=["jsonl", "json"])


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
        options=lambda wc: scaling_options(wc.model),
        model_dir=lambda wc: model_dir(wc.model),
    container:
        image_for(lambda wc: model_image_key(wc.model))
    resources:
        **model_job(),
    log:
        "logs/scaling/{model}.log",
    shell:
        "python -m egm scaling --model {wildcards.model} --model-dir {params.model_dir} --model-manifest {input.model}"
        " --splits {input.splits} --image-root {IMAGE_ROOT} --out-dir results/scaling/{wildcards.model}"
        " --work-dir results/scaling/.work/{wildcards.model} --options {params.options}"
        " --data-manifest {input.data} > {log} 2>&1"


use rule scaling as scaling_single_point with:
    output:
        _scaling_outputs(["unlimited"]),
    wildcard_constraints:
        model=_any_of(SINGLE_POINT),


SCALING_METRICS = [f"results/scaling/{m}/budget-{b}.json" for m in MODELS for b in scaling_budgets(m)]


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
        options=report_options(),
    container:
        image_for("cpu")
    resources:
        **cpu_job(),
    log:
        "logs/table_scaling.log",
    shell:
        "python -m egm report-scaling --metrics {input} --report {params.options}"
        " --table-prefix results/tables/scaling > {log} 2>&1"


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
        options=report_options(),
    container:
        image_for("cpu")
    resources:
        **cpu_job(),
    log:
        "logs/figure_scaling.log",
    shell:
        "python -m egm report-scaling --metrics {input} --report {params.options}"
        " --figure-prefix results/figures/scaling > {log} 2>&1"
