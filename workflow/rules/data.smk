# Data: hub (or offline mirror) -> extracted images, validated splits, rewritten RL parquet.


localrules:
    demo_mirror,
    fetch_dataset,


if "demo" in config:

    rule demo_mirror:
        output:
            "resources/demo_mirror.json",
        params:
            demo=config["demo"],
            dataset_repo=config["dataset"]["repo_id"],
            mirror=demo_mirror_dir(),
        container:
            image_for("cpu")
        log:
            "logs/demo_mirror.log",
        shell:
            "python -m egm make-demo --mirror {params.mirror:q} --dataset-repo {params.dataset_repo}"
            " --model-repo {params.demo[model_repo]} --seed {params.demo[seed]}"
            " --train-images {params.demo[n_train_images]} --eval-per-split {params.demo[n_eval_per_split]}"
            " --summary {output} > {log} 2>&1"


rule fetch_dataset:
    input:
        mirror_ready(),
    output:
        manifest="resources/manifests/dataset.json",
        splits=split_files(),
        rl=[f"{DATASET_DIR}/{rel}" for rel in DATASET_FILES["rl"]],
        flip=f"{DATASET_DIR}/{DATASET_FILES['flip']}",
    params:
        dataset=config["dataset"],
        checksums=json_arg(config["dataset"]["checksums"]),
        mirror=mirror_arg(config["dataset"]["repo_id"]),
    container:
        image_for("cpu")
    log:
        "logs/fetch_dataset.log",
    # DATASET_REQUIRED is neither a param nor spelled out here on purpose: it is a check, not
    # what the fetch produces, so adding a split or a training run does not fetch the data again.
    shell:
        "python -m egm fetch --repo-type dataset --repo-id {params.dataset[repo_id]}"
        " --revision {params.dataset[revision]} --allow {params.dataset[allow_patterns]:q}"
        " --require {DATASET_REQUIRED} --checksums {params.checksums} {params.mirror} --dest {DATASET_DIR} --manifest {output.manifest} > {log} 2>&1"


rule extract_images:
    input:
        "resources/manifests/dataset.json",
    output:
        "resources/manifests/images-{archive}.json",
    container:
        image_for("cpu")
    resources:
        **cpu_job(),
    log:
        "logs/extract_images/{archive}.log",
    shell:
        "python -m egm extract --archive {wildcards.archive} --dataset-dir {DATASET_DIR}"
        " --fetch-manifest {input} --dest {IMAGE_ROOT} --manifest {output} > {log} 2>&1"


# Validation: every configured split and RL parquet, on the CPU, before any GPU job reads them
# (egm/data/validation.py). A split with no valid record is reported, not fatal: it costs only its
# own score. An RL parquet with no usable row fails here rather than in a training job.


rule validate_split:
    input:
        split=f"{DATASET_DIR}/metadata/eval/{{split}}.jsonl",
        images="resources/manifests/images-coco.json",
    output:
        "results/validation/{split}.json",
    container:
        image_for("cpu")
    resources:
        **cpu_job(),
    log:
        "logs/validate/{split}.log",
    shell:
        "python -m egm validate-split {input.split} --image-root {IMAGE_ROOT} --out {output} > {log} 2>&1"


rule validate_rl_parquet:
    input:
        parquet=f"{DATASET_DIR}/processed_rl_data/{{part}}_grounding.parquet",
        images=expand("resources/manifests/images-{archive}.json", archive=["coco", "coco_flip"]),
    output:
        "results/validation/rl_{part}.json",
    container:
        image_for("cpu")
    resources:
        **cpu_job(),
    log:
        "logs/validate/rl_{part}.log",
    shell:
        "python -m egm validate-parquet {input.parquet} --image-root {IMAGE_ROOT} --out {output} > {log} 2>&1"


rule rewrite_rl_parquet:
    input:
        parquet=f"{DATASET_DIR}/processed_rl_data/{{part}}_grounding.parquet",
        images=expand("resources/manifests/images-{archive}.json", archive=["coco", "coco_flip"]),
        validation="results/validation/rl_{part}.json",
    output:
        "resources/rl/{part}.parquet",
    container:
        image_for("cpu")
    resources:
        **cpu_job(),
    log:
        "logs/rewrite_rl_parquet/{part}.log",
    shell:
        "python -m egm rewrite-parquet {input.parquet} {output} --image-root {IMAGE_ROOT} > {log} 2>&1"
