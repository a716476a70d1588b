# Scoring: the paper's metrics per model and split.


rule score:
    input:
        "results/predictions/{model}/{split}.jsonl",
    output:
        "results/metrics/{model}/{split}.json",
    container:
        image_for("cpu")
    resources:
        **cpu_job(),
    log:
        "logs/score/{model}/{split}.log",
    shell:
        "python -m egm score {input} {output} --model {wildcards.model} --split {wildcards.split} > {log} 2>&1"
