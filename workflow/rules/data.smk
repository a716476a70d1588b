# Data: hub (or offline mirror) -> extracted images, validated splits, rewritten RL parquet.


if "demo" in config:

    rule demo_mirror:
        localrule: True
        output:
            "resources/manifests/demo-mirror.json",
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
    # Downloads run where the internet is: on a cluster, the submit host.
    localrule: True
    input:
        mirror_ready(),
    output:
        manifest="resources/manifests/dataset.json",
        splits=split_files(),
        rl=[f"{DATASET_DIR}/{rel}" for rel in DATASET_FILES["rl"]],
        flip=f"{DATASET_DIR}/{DATASET_FILES['flip']}",
        sft=[f"{DATASET_DIR}/{rel}" for rel in DATASET_FILES["sft"]],
    params:
        dataset=config["dataset"],
        checksums=json_arg(config["dataset"]["checksums"]),
        mirror=mirror_arg(config["dataset"]["repo_id"]),
        mirror_files=lambda wc: mirror_files(
            config["dataset"]["repo_id"], "resources/manifests/dataset.json", config["dataset"]["allow_patterns"]
        ),
        # The repo's root: where coco_flip.tar, one of its top-level files, lands.
        dest=lambda wildcards, output: folder_of(output.flip),
    container:
        image_for("cpu")
    log:
        "logs/fetch_dataset.log",
    # Every output must be in the repo, and at least one archive part: checked before fetching.
    shell:
        "python -m egm fetch --repo-type dataset --repo-id {params.dataset[repo_id]}"
        " --revision {params.dataset[revision]} --allow {params.dataset[allow_patterns]:q}"
        " --require {output.splits} {output.rl} {output.flip} {output.sft} 'coco.tar.part_*'"
        " --checksums {params.checksums} {params.mirror} --mirror-files {params.mirror_files}"
        " --dest {params.dest} --manifest {output.manifest} > {log} 2>&1"


rule extract_images:
    input:
        "resources/manifests/dataset.json",
    output:
        "resources/manifests/images-{archive}.json",
    params:
        image_root=IMAGE_ROOT,
        dataset_dir=DATASET_DIR,
    container:
        image_for("cpu")
    resources:
        **cpu_job(),
    log:
        "logs/extract_images/{archive}.log",
    shell:
        "python -m egm extract --archive {wildcards.archive} --dataset-dir {params.dataset_dir}"
        " --fetch-manifest {input} --dest {params.image_root} --manifest {output} > {log} 2>&1"


# Validation: every configured split and RL parquet, on the CPU, before any GPU job reads them
# (egm/data/validation.py). A split with no valid record is reported, not fatal: it costs only its
# own score. An RL parquet with no usable row fails here rather than in a training job.


rule validate_split:
    input:
        split=f"{DATASET_DIR}/metadata/eval/{{split}}.jsonl",
        images="resources/manifests/images-coco.json",
    output:
        "results/validation/{split}.json",
    params:
        image_root=IMAGE_ROOT,
    container:
        image_for("cpu")
    resources:
        **cpu_job(),
    log:
        "logs/validate/{split}.log",
    shell:
        "python -m egm validate-split {input.split} --image-root {params.image_root} --out {output} > {log} 2>&1"


rule validate_rl_parquet:
    input:
        parquet=f"{DATASET_DIR}/{RL_DATA.format(part='{part}')}",
        images=expand("resources/manifests/images-{archive}.json", archive=["coco", "coco_flip"]),
    output:
        "results/validation/rl_{part}.json",
    params:
        image_root=IMAGE_ROOT,
    container:
        image_for("cpu")
    resources:
        **cpu_job(),
    log:
        "logs/validate/rl_{part}.log",
    shell:
        "python -m egm validate-parquet {input.parquet} --image-root {params.image_root} --out {output} > {log} 2>&1"


rule rewrite_rl_parquet:
    input:
        parquet=f"{DATASET_DIR}/{RL_DATA.format(part='{part}')}",
        images=expand("resources/manifests/images-{archive}.json", archive=["coco", "coco_flip"]),
        validation="results/validation/rl_{part}.json",
    output:
        "resources/rl/{part}.parquet",
    params:
        image_root=IMAGE_ROOT,
    container:
        image_for("cpu")
    resources:
        **cpu_job(),
    log:
        "logs/rewrite_rl_parquet/{part}.log",
    shell:
        "python -m egm rewrite-parquet {input.parquet} {output} --image-root {params.image_root} > {log} 2>&1"
