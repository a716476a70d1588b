# Inference: one job per model answers every split (one engine load), one JSONL per split.


def predict_options(model):
    entry = MODELS[model]
    return json_arg(
        {
            "prompt": entry["prompt"],
            "backend": entry["backend"],
            "engine_options": entry["engine_options"],
            "inference": config["inference"],
        }
    )


rule predict:
    input:
        model="resources/manifests/model-{model}.json",
        splits=split_files(),
        images="resources/manifests/images-coco.json",
    output:
        expand("results/predictions/{{model}}/{split}.jsonl", split=SPLITS),
    params:
        options=lambda wc: predict_options(wc.model),
    resources:
        gpu=lambda wc: MODELS[wc.model]["gpus"],
    log:
        "logs/predict/{model}.log",
    shell:
        "python -m egm predict --model-dir resources/models/{wildcards.model} --model-manifest {input.model}"
        " --splits {input.splits} --image-root {IMAGE_ROOT} --out-dir results/predictions/{wildcards.model}"
        " --options {params.options} > {log} 2>&1"
