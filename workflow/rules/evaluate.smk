# Scoring: the paper's metrics per model and split.


rule score:
    input:
        predictions="results/predictions/{model}/{split}.jsonl",
        run="results/predictions/{model}/run.json",
        # Why a split has no score, when it has none (no valid record).
        validation="results/validation/{split}.json",
    output:
        "results/metrics/{model}/{split}.json",
    container:
        image_for("cpu")
    resources:
        **cpu_job(),
    log:
        "logs/score/{model}/{split}.log",
    shell:
        "python -m egm score {input.predictions} {output} --model {wildcards.model} --split {wildcards.split}"
        " --run-record {input.run} --validation {input.validation} > {log} 2>&1"
