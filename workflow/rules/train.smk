# Training: SFT from a base model, then GRPO RL (config `train.runs`, recipes in config/recipes/).
# Each stage writes a model directory atomically and then its manifest, the file downstream rules
# (RL, predict) depend on; the trained models join MODELS in common.smk and are evaluated like
# any other. A killed stage resumes from its last checkpoint in results/checkpoints/{run}/.work/.
rule fetch_rl_start:
    localrule: True
    input:
        mirror_ready(),
    output:
        "resources/manifests/start-{run}.json",
    params:
        repo_id=lambda wc: RUNS[wc.run]["rl"]["from"],
        revision=lambda wc: RUNS[wc.run]["rl"]["revision"],
        mirror=lambda wc: mirror_arg(RUNS[wc.run]["rl"]["from"]),
        mirror_files=lambda wc: mirror_files(RUNS[wc.run]["rl"]["from"], f"resources/manifests/start-{wc.run}.json"),
        dest=lambda wc: rl_start(wc.run)[1],
    container:
        image_for("cpu")
    log:
        "logs/fetch_rl_start/{run}.log",
    shell:
        "python -m egm fetch --repo-type model --repo-id {params.repo_id} --revision {params.revision}"
        " {params.mirror} --mirror-files {params.mirror_files}"
        " --dest {params.dest} --manifest {output} > {log} 2>&1"


rule sft:
    input:
        model=lambda wc: model_manifest(RUNS[wc.run]["base"]),
        dataset="resources/manifests/dataset.json",
        data=lambda wc: sft_data_file(wc.run),
        images=expand("resources/manifests/images-{archive}.json", archive=["coco", "coco_flip"]),
    output:
        model=directory("results/checkpoints/{run}/sft"),
        manifest="results/checkpoints/{run}/sft.json",
    params:
        image_root=IMAGE_ROOT,
        options=lambda wc: train_options(wc.run, "sft"),
        start=lambda wc: model_dir(RUNS[wc.run]["base"]),
        work_dir=lambda wc: train_work_dir(wc.run, "sft"),
        # From the config, not {resources.gpu}: a local profile caps that resource.
        gpus=lambda wc: RUNS[wc.run]["gpus"],
    container:
        image_for(lambda wc: train_image_key(wc.run))
    threads: train_threads
    resources:
        **train_job(),
    benchmark:
        "results/benchmarks/sft/{run}.tsv"
    log:
        "logs/train/{run}/sft.log",
    shell:
        "python -m egm sft --model-dir {params.start} --model-manifest {input.model}"
        " --data {input.data}"
        " --image-root {params.image_root} --inputs {input.dataset} --out-dir {output.model} --manifest {output.manifest}"
        " --work-dir {params.work_dir} --options {params.options}"
        " --gpus {params.gpus} > {log} 2>&1"


rule rl:
    input:
        start=lambda wc: rl_start(wc.run)[0],
        train="resources/rl/train.parquet",
        val="resources/rl/val.parquet",
    output:
        model=directory("results/checkpoints/{run}/rl"),
        manifest="results/checkpoints/{run}/rl.json",
    params:
        options=lambda wc: train_options(wc.run, "rl"),
        start=lambda wc: rl_start(wc.run)[1],
        work_dir=lambda wc: train_work_dir(wc.run, "rl"),
        gpus=lambda wc: RUNS[wc.run]["gpus"],
    container:
        image_for(lambda wc: train_image_key(wc.run))
    threads: train_threads
    resources:
        **train_job(),
    benchmark:
        "results/benchmarks/rl/{run}.tsv"
    log:
        "logs/train/{run}/rl.log",
    shell:
        "python -m egm rl --model-dir {params.start} --model-manifest {input.start}"
        " --train {input.train} --val {input.val} --out-dir {output.model} --manifest {output.manifest}"
        " --work-dir {params.work_dir} --options {params.options}"
        " --gpus {params.gpus} > {log} 2>&1"
