# Latency: each model under the paper's protocol (64 requests in flight, the backend using every
# GPU of the job) and at batch 1, on a fixed seeded sample of one split -> results/latency/{model}.json.
# Only with a `latency:` section in the config; the trade-off figure then takes its latency from here.

LATENCY = config.get("latency")
LATENCY_MODELS = (MODELS if LATENCY["models"] is None else LATENCY["models"]) if LATENCY else []
for _model in LATENCY_MODELS:
    if _model not in MODELS:
        raise ValueError(f"latency.models: {_model!r} is not an evaluated model: {sorted(MODELS)}")
LATENCY_FILES = expand("results/latency/{model}.json", model=LATENCY_MODELS)
# Model settings that still apply when the latency jobs use another backend than predict.
CARRIED_OVER = ("tensor_parallel_size", "dtype", "max_model_len", "gpu_memory_utilization", "load_format",
                "enforce_eager")


def latency_entry(model):
    """The model's backend, engine options and GPUs for its latency job."""
    entry = MODELS[model]
    if not LATENCY["backend"]:
        return {"backend": entry["backend"], "engine_options": entry["engine_options"], "gpus": entry["gpus"]}
    options = {k: v for k, v in entry["engine_options"].items() if k in CARRIED_OVER}
    options.update(LATENCY["engine_options"])
    gpus = entry["gpus"] if LATENCY["gpus"] is None else LATENCY["gpus"]
    return {"backend": LATENCY["backend"], "engine_options": options, "gpus": gpus}


def latency_options(model):
    entry = latency_entry(model)
    settings = {k: LATENCY[k] for k in ("split", "n", "seed", "concurrency", "batch1_n", "warmup")}
    return json_arg(
        {
            "prompt": MODELS[model]["prompt"],
            "backend": entry["backend"],
            "engine_options": entry["engine_options"],
            # batch_size is the protocol's concurrency here: not a key this rule depends on.
            "inference": {k: v for k, v in config["inference"].items() if k not in ("batch_size", "limit")},
            "latency": settings,
            "gpus": entry["gpus"],
        }
    )


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
            options=lambda wc: latency_options(wc.model),
            model_dir=lambda wc: model_dir(wc.model),
        container:
            image_for(lambda wc: model_image_key(wc.model, latency_entry(wc.model)))
        resources:
            **gpu_job(lambda wc: latency_entry(wc.model)["gpus"]),
        log:
            "logs/latency/{model}.log",
        shell:
            "python -m egm latency --model {wildcards.model} --model-dir {params.model_dir}"
            " --split {input.split} --image-root {IMAGE_ROOT} --options {params.options} --out {output}"
            " --model-manifest {input.model} --data-manifest {input.data} > {log} 2>&1"
