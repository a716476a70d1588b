# Models: base and released checkpoints from the hub (or the offline mirror).


rule fetch_model:
    # Downloads run where the internet is: on a cluster, the submit host.
    localrule: True
    input:
        mirror_ready(),
    output:
        "resources/manifests/model-{model}.json",
    params:
        repo_id=lambda wc: MODELS[wc.model]["repo_id"],
        revision=lambda wc: MODELS[wc.model]["revision"],
        checksums=lambda wc: json_arg(MODELS[wc.model]["checksums"]),
        mirror=lambda wc: mirror_arg(MODELS[wc.model]["repo_id"]),
        mirror_files=lambda wc: mirror_files(MODELS[wc.model]["repo_id"], model_manifest(wc.model)),
        dest=lambda wc: model_dir(wc.model),
    container:
        image_for("cpu")
    log:
        "logs/fetch_model/{model}.log",
    shell:
        "python -m egm fetch --repo-type model --repo-id {params.repo_id} --revision {params.revision}"
        " --checksums {params.checksums} {params.mirror} --mirror-files {params.mirror_files}"
        " --dest {params.dest} --manifest {output} > {log} 2>&1"
