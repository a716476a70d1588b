# Paths and small helpers shared by the rules. Everything a rule passes on is derived here
# from the validated config, so each rule's params hold only the config keys it uses.
import json
import re
import shlex

SPLITS = config["splits"]
RUNS = config["train"]["runs"]
# Models produced by training runs (workflow/rules/train.smk) are evaluated like hub models.
TRAINED = {}  # model key -> (run, stage)


def trained_models(models, runs):
    """Each run's models: "{run}-sft" (unless its RL starts from a released SFT checkpoint) and
    "{run}-rl", with the inference settings of the run's base model and their own row labels."""
    out = {}
    for run, spec in runs.items():
        if spec["base"] not in models:
            raise ValueError(f"train.runs.{run}.base: {spec['base']!r} is not a key of models: {sorted(models)}")
        for stage in ("sft", "rl") if spec["rl"]["from"] == "sft" else ("rl",):
            key = f"{run}-{stage}"
            if key in models:
                raise ValueError(f"model key {key!r} of training run {run!r} is also a key of models:")
            entry = dict(models[spec["base"]])
            entry.update(repo_id=f"trained:{run}/{stage}", display=spec[stage]["display"], paper=spec[stage]["paper"])
            out[key] = entry
            TRAINED[key] = (run, stage)
    return out


MODELS = {**config["models"], **trained_models(config["models"], RUNS)}
RL_PARTS = ["train", "val"]


def model_dir(model):
    """A model's files: a fetched hub model, or a training run's output directory."""
    if model in TRAINED:
        run, stage = TRAINED[model]
        return f"results/checkpoints/{run}/{stage}"
    return f"resources/models/{model}"


def model_manifest(model):
    """The manifest a model's consumers depend on (fetch manifest, or a training stage's)."""
    if model in TRAINED:
        run, stage = TRAINED[model]
        return f"results/checkpoints/{run}/{stage}.json"
    return f"resources/manifests/model-{model}.json"


DATASET_DIR = f"resources/hub/{config['dataset']['repo_id']}"
IMAGE_ROOT = "resources/images"
MIRROR = config["hub"]["mirror"]  # a folder, a list of folders, or {repo_id: folder} (README.md)


wildcard_constraints:
    model="|".join(map(re.escape, MODELS)) if MODELS else "a^",
    split="|".join(map(re.escape, SPLITS)),
    archive="coco|coco_flip",
    part="train|val",


def json_arg(obj):
    """A JSON value quoted for the shell (params stay builtin types, so Snakemake tracks them)."""
    return shlex.quote(json.dumps(obj, sort_keys=True))


def mirror_ready():
    """In the demo the offline mirror is itself an output of the DAG."""
    return ["resources/demo_mirror.json"] if "demo" in config else []


def mirror_arg(repo_id=None):
    """`egm fetch`'s options for hub.mirror. With `repo_id`, a mapping is narrowed to that repo,
    so editing another repo's entry does not change (and rerun) this fetch."""
    if MIRROR is None:
        return ""
    if isinstance(MIRROR, dict):
        mapping = MIRROR if repo_id is None else {k: v for k, v in MIRROR.items() if k == repo_id}
        return f"--mirror-map {json_arg(mapping)}"
    folders = [MIRROR] if isinstance(MIRROR, str) else MIRROR
    return "--mirror " + " ".join(map(shlex.quote, folders))


def demo_mirror_dir():
    """Where `egm make-demo` writes the demo's mirror: the folder, or the first of the list."""
    if isinstance(MIRROR, str):
        return MIRROR
    if isinstance(MIRROR, list):
        return MIRROR[0]
    raise WorkflowError("the demo writes its own offline mirror: set hub.mirror to a folder (or a list of folders)")


# The data set repo's files the workflow reads, repo-relative; fetch_dataset declares them as outputs.
DATASET_FILES = {
    "splits": [f"metadata/eval/{split}.jsonl" for split in SPLITS],
    "rl": [f"processed_rl_data/{part}_grounding.parquet" for part in RL_PARTS],
    "flip": "coco_flip.tar",
}


def split_files():
    return [f"{DATASET_DIR}/{rel}" for rel in DATASET_FILES["splits"]]


def dataset_required():
    """What fetch_dataset must find (a pattern: at least one match), from the config: the
    outputs, the archive parts, and the SFT data of each run that trains an SFT stage. Checked
    before anything is fetched, so a mirror that lacks one fails naming it. Quoted for the shell."""
    required = [*DATASET_FILES["splits"], *DATASET_FILES["rl"], DATASET_FILES["flip"], "coco.tar.part_*"]
    required += sorted(
        {f"vanilla_grounding_reasoning_training_dataset_{spec['sft']['data']}.jsonl"
         for spec in RUNS.values() if spec["rl"]["from"] == "sft"}
    )
    return " ".join(map(shlex.quote, required))


DATASET_REQUIRED = dataset_required()


def validation_reports():
    """The eval splits' validation reports (validate_split), which predict waits for."""
    return expand("results/validation/{split}.json", split=SPLITS)


# Containers and cluster resources. Every rule names its image through image_for() and what it
# asks a scheduler for through cpu_job() / model_job(); without --use-apptainer (or a profile
# that sets it) and without a cluster executor, neither changes how a rule runs.
import hashlib
import os
import shutil

from snakemake.exceptions import WorkflowError

# containers.<key> -> the definition (containers/<name>.def) whose content hash fills "{hash}".
IMAGE_DEFINITIONS = {"cpu": "cpu", "vllm": "gpu-vllm", "sglang": "gpu-sglang"}
USE_APPTAINER = any(
    getattr(method, "name", str(method)).upper().endswith("APPTAINER")
    for method in workflow.deployment_settings.deployment_method
)
RESOURCES = config["resources"]


def model_image_key(model, entry=None):
    """The image a model's predict job runs in: its engine's, the CUDA image for hf on GPUs.
    `entry` replaces the model's config entry (the latency rule's backend)."""
    entry = entry or MODELS[model]
    if entry["backend"] in ("vllm", "sglang"):
        return entry["backend"]
    if entry["backend"] == "hf" and entry["gpus"] > 0:
        return "vllm"
    options = entry["engine_options"]
    if entry["backend"] == "server" and not options.get("url") and options.get("server", "vllm") in ("vllm", "sglang"):
        # The job starts the server itself (egm.infer.server): it runs in that engine's image.
        return options.get("server", "vllm")
    return "cpu"  # hf on CPU, or a client of an external server (engine_options.url)


def _image_ref(key):
    ref = config["containers"][key]
    if "{hash}" not in ref:
        return ref
    definition = os.path.join(workflow.basedir, "containers", f"{IMAGE_DEFINITIONS[key]}.def")
    if not os.path.exists(definition):
        raise WorkflowError(f"containers.{key} names {ref!r}, but its definition {definition} is missing")
    with open(definition, "rb") as handle:
        digest = hashlib.sha256(handle.read()).hexdigest()[:12]
    # The same name containers/build.sh gives the image: a new definition means a new image path,
    # and Snakemake reruns every job whose container string changed.
    return ref.replace("{hash}", digest)


IMAGES = {}  # config key -> resolved image reference


def _require_images(keys):
    """Resolve images and fail, naming every missing file at once, before any job starts."""
    for key in keys:
        IMAGES.setdefault(key, _image_ref(key))
    missing = {key: IMAGES[key] for key in sorted(set(keys)) if "://" not in IMAGES[key] and not os.path.exists(IMAGES[key])}
    if missing:
        raise WorkflowError(
            "container image file(s) missing:\n"
            + "".join(f"  containers.{key}: {ref}\n" for key, ref in missing.items())
            + f"Build them with `make containers IMAGES=\"{' '.join(IMAGE_DEFINITIONS[k] for k in missing)}\"` "
            "(containers/README.md), or point these config keys at existing images."
        )


if USE_APPTAINER:
    if not (shutil.which("apptainer") or shutil.which("singularity")):
        raise WorkflowError(
            "--use-apptainer is set, but there is no `apptainer` on PATH. Load your site's apptainer "
            "module (or install it: containers/README.md), or run without --use-apptainer."
        )
    _require_images({"cpu", *map(model_image_key, MODELS)})
    from pathlib import Path

    from egm.provenance import IMAGE_DIGESTS_ENV, image_sha256

    # Results name the image they were made in by its digest (egm.provenance.image_record). The
    # host reads every image file; a job inside one may not see its own (a symlinked image's
    # target is outside the job's binds). Jobs and their Apptainer inherit this environment.
    os.environ[IMAGE_DIGESTS_ENV] = json.dumps(
        {os.path.basename(ref): image_sha256(Path(ref)) for ref in IMAGES.values() if "://" not in ref}
    )


def image_for(key):
    """A rule's container: the image of config `containers.<key>` under Apptainer, else none.
    `key` may be a function of the job's wildcards returning the key."""
    if not USE_APPTAINER:
        return None
    if callable(key):
        return lambda wildcards: image_for(key(wildcards))
    if key not in IMAGES:
        _require_images([key])
    return IMAGES[key]


def _scheduler(gpus):
    keys = {}
    partition = (RESOURCES["gpu_partition"] if gpus else None) or RESOURCES["partition"]
    if partition:
        keys["slurm_partition"] = partition
    if RESOURCES["account"]:
        keys["slurm_account"] = RESOURCES["account"]
    return keys


def cpu_job():
    """Scheduler resources of a CPU job (data preparation, scoring, report)."""
    return {"mem_mb": RESOURCES["cpu_mem_mb"], "runtime": RESOURCES["cpu_runtime_min"], **_scheduler(0)}


def gpu_job(gpus_of):
    """Scheduler resources of a job that needs gpus_of(wildcards) GPUs (0: a CPU job), from the
    `resources:` config. A local run caps `gpu` at its --resources value: read a job's GPU count
    from the config, not from {resources.gpu}."""

    def each(make):
        return lambda wildcards: make(gpus_of(wildcards))

    return {
        "gpu": each(lambda gpus: gpus),
        # Unset values are dropped by Snakemake, so a CPU job asks for no GPU type.
        "gpu_model": each(lambda gpus: RESOURCES["gpu_model"] if gpus else None),
        "cpus_per_gpu": each(lambda gpus: RESOURCES["cpus_per_gpu"] if gpus else None),
        "mem_mb": each(lambda gpus: RESOURCES["mem_mb_per_gpu"] * gpus if gpus else RESOURCES["cpu_mem_mb"]),
        "runtime": each(lambda gpus: RESOURCES["gpu_runtime_min"] if gpus else RESOURCES["cpu_runtime_min"]),
        "slurm_partition": each(lambda gpus: _scheduler(gpus).get("slurm_partition")),
        "slurm_account": each(lambda gpus: _scheduler(gpus).get("slurm_account")),
    }


def model_job():
    """Scheduler resources of a model's job: its `gpus:` GPUs."""
    return gpu_job(lambda wildcards: MODELS[wildcards.model]["gpus"])
