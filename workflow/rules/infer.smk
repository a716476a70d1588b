# Inference: one job per model answers every split (one engine load), one JSONL per split.


rule predict:
    input:
        model=lambda wc: model_manifest(wc.model),
        splits=split_files(),
        images="resources/manifests/images-coco.json",
        data="resources/manifests/dataset.json",
        # Every split checked on the CPU first: a broken split is reported before a GPU is asked for.
        validation=validation_reports(),
    output:
        splits=expand("results/predictions/{{model}}/{split}.jsonl", split=SPLITS),
        # Provenance (egm.provenance): what produced these answers, copied into every metrics file.
        run="results/predictions/{model}/run.json",
    params:
        image_root=IMAGE_ROOT,
        options=lambda wc: predict_options(wc.model),
        model_dir=lambda wc: model_dir(wc.model),
        out_dir=lambda wildcards, output: folder_of(output.run),
    container:
        image_for(lambda wc: model_image_key(wc.model))
    resources:
        **model_job(),
    benchmark:
        "results/benchmarks/predict/{model}.tsv"
    log:
        "logs/predict/{model}.log",
    shell:
        "python -m egm predict --model-dir {params.model_dir} --model-manifest {input.model}"
        " --splits {input.splits} --image-root {params.image_root} --out-dir {params.out_dir}"
        " --options {params.options} --model {wildcards.model} --data-manifest {input.data} --run-record {output.run}"
        " > {log} 2>&1"
