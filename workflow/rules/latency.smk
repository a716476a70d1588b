# Latency: each model under the paper's protocol (64 requests in flight, the backend using every
# GPU of the job) and at batch 1, on a fixed seeded sample of one split -> results/latency/{model}.json.
# Only with a `latency:` section in the config; the trade-off figure then takes its latency from here.

if LATENCY:

    rule latency:
        input:
            model=lambda wc: model_manifest(wc.model),
            split=f"{DATASET_DIR}/metadata/eval/{LATENCY['split']}.jsonl",
            images="resources/manifests/images-coco.json",
            data="resources/manifests/dataset.json",
        output:
            "results/latency/{model}.json",
        params:
            image_root=IMAGE_ROOT,
            options=lambda wc: latency_options(wc.model),
            model_dir=lambda wc: model_dir(wc.model),
        container:
            image_for(lambda wc: model_image_key(wc.model, latency_entry(wc.model)))
        resources:
            **gpu_job(lambda wc: latency_entry(wc.model)["gpus"]),
        benchmark:
            "results/benchmarks/latency/{model}.tsv"
        log:
            "logs/latency/{model}.log",
        shell:
            "python -m egm latency --model {wildcards.model} --model-dir {params.model_dir}"
            " --split {input.split} --image-root {params.image_root} --options {params.options} --out {output}"
            " --model-manifest {input.model} --data-manifest {input.data} > {log} 2>&1"
