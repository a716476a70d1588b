# How every job asks for its image and its resources: each rule names its image through
# image_for() (the key from model_image_key() / train_image_key()) and what it asks a scheduler
# for through cpu_job() / gpu_job() / model_job() / train_job() (and train_threads()); the
# profiles (profiles/) only say where jobs run. Without --use-apptainer (or a profile that sets
# it) and without a cluster executor, neither changes how a rule runs. Reads common.smk's MODELS
# and RUNS (included first); common.smk reads nothing from here.
import json
import os
import shutil
from pathlib import Path

from snakemake.exceptions import WorkflowError

from egm.io import sha256_file
from egm.provenance import IMAGE_DIGESTS_ENV, image_sha256
from egm.runtime import GPU_JOBS_ON_CPU_ENV

# containers.<key> -> the definition (containers/<name>.def) whose content hash fills "{hash}".
IMAGE_DEFINITIONS = {"cpu": "cpu", "vllm": "gpu-vllm", "sglang": "gpu-sglang"}
USE_APPTAINER = any(
    getattr(method, "name", str(method)).upper().endswith("APPTAINER")
    for method in workflow.deployment_settings.deployment_method
)
RESOURCES = config["resources"]
# egm.runtime.require_gpus reads it in the job (sbatch and Apptainer pass the environment on):
# the config is its only source, so a value left in the user's shell is dropped.
os.environ.pop(GPU_JOBS_ON_CPU_ENV, None)
if RESOURCES["gpu_jobs_on_cpu"]:
    os.environ[GPU_JOBS_ON_CPU_ENV] = "1"


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
        # The job starts the server itself (egm.infer.backends.server): it runs in that engine's image.
        return options.get("server", "vllm")
    return "cpu"  # hf on CPU, or a client of an external server (engine_options.url)


def _image_ref(key):
    ref = config["containers"][key]
    if "{hash}" not in ref:
        return ref
    definition = os.path.join(workflow.basedir, "containers", f"{IMAGE_DEFINITIONS[key]}.def")
    if not os.path.exists(definition):
        raise WorkflowError(f"containers.{key} names {ref!r}, but its definition {definition} is missing")
    digest = sha256_file(definition)[:12]
    # The same name containers/build.sh gives the image: a new definition means a new image path,
    # and Snakemake reruns every job whose container string changed.
    return ref.replace("{hash}", digest)


IMAGES = {}  # config key -> resolved image reference


def _require_images(keys):
    """Resolve images and fail, naming every missing file at once, before any job starts."""
    for key in keys:
        IMAGES.setdefault(key, _image_ref(key))
    missing = {
        key: IMAGES[key] for key in sorted(set(keys)) if "://" not in IMAGES[key] and not os.path.exists(IMAGES[key])
    }
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
    # Results name the image they were made in by its digest (egm.provenance.image_record). The
    # host reads every image file; a job inside one may not see its own (a symlinked image's
    # target is outside the job's binds). Jobs and their Apptainer inherit this environment.
    os.environ[IMAGE_DIGESTS_ENV] = json.dumps(
        {os.path.basename(ref): image_sha256(Path(ref)) for ref in IMAGES.values() if "://" not in ref}
    )


def image_for(key):
    """A rule's container: the image of config `containers.<key>`. Every rule names its image
    (`snakemake --lint`, and a reader, can see where each job runs); only under Apptainer is the
    job run in it, and only then must the file exist. `key` may be a function of the wildcards."""
    if callable(key):
        return lambda wildcards: image_for(key(wildcards))
    if key not in IMAGES:
        if USE_APPTAINER:
            _require_images([key])
        else:
            IMAGES[key] = _image_ref(key)
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


def train_image_key(run):
    return "vllm" if RUNS[run]["gpus"] > 0 else "cpu"


def train_job():
    """Scheduler resources of a training job: the run's `gpus:`. The command launches one process
    per configured GPU; the global batch is the recipe's either way."""
    return gpu_job(lambda wildcards: RUNS[wildcards.run]["gpus"])


def train_threads(wildcards):
    """Threads of a training job, which Snakemake exports as OMP_NUM_THREADS: a CPU run (the
    demo) trains 1.45x faster on two threads than on one; a GPU job's CPUs are cpus_per_gpu."""
    return RESOURCES["cpu_train_threads"] if RUNS[wildcards.run]["gpus"] == 0 else 1
