# Paths and small helpers shared by the rules. Everything a rule passes on is derived here
# from the validated config, so each rule's params hold only the config keys it uses.
import json
import os
import re
import shlex

from snakemake.exceptions import WorkflowError

from egm.data.hub import mirror_state
from egm.data.paths import RL_DATA, SFT_DATA
from egm.options import predict_job_options, train_job_options
from egm.report.tables import check_expected
from egm.train.recipes import resolve_recipe

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


def folder_of(path):
    """The folder a rule's output lies in, for a command that takes the folder."""
    return os.path.dirname(path)


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
    return ["resources/manifests/demo-mirror.json"] if "demo" in config else []


def mirror_arg(repo_id):
    """`egm fetch`'s options for hub.mirror to fetch `repo_id`: a mapping is narrowed to that repo,
    so editing another repo's entry does not change (and rerun) this fetch."""
    if MIRROR is None:
        return ""
    if isinstance(MIRROR, dict):
        return f"--mirror-map {json_arg({k: v for k, v in MIRROR.items() if k == repo_id})}"
    folders = [MIRROR] if isinstance(MIRROR, str) else MIRROR
    return "--mirror " + " ".join(map(shlex.quote, folders))


def mirror_files(repo_id, manifest, allow_patterns=None):
    """The fetch's param that follows hub.mirror's files for `repo_id` (egm.data.hub.mirror_state:
    a stat per file, a checksum only where size or mtime moved): it changes, and so reruns the
    fetch, when they differ from what the fetch `manifest` recorded. The demo's mirror is an
    output of the DAG, tracked through its own manifest (mirror_ready)."""
    recorded = None
    if MIRROR is not None and "demo" not in config and os.path.exists(manifest):
        with open(manifest) as handle:
            recorded = json.load(handle)
    state = None if MIRROR is None or "demo" in config else mirror_state(repo_id, MIRROR, allow_patterns, recorded)
    return json_arg(state)


def demo_mirror_dir():
    """Where `egm make-demo` writes the demo's mirror: the folder, or the first of the list."""
    if isinstance(MIRROR, str):
        return MIRROR
    if isinstance(MIRROR, list):
        return MIRROR[0]
    raise WorkflowError("the demo writes its own offline mirror: set hub.mirror to a folder (or a list of folders)")


# The data set repo's files the workflow reads, repo-relative; fetch_dataset declares them as
# outputs and, with the archive parts, checks before fetching that the repo has each of them.
DATASET_FILES = {
    "splits": [f"metadata/eval/{split}.jsonl" for split in SPLITS],
    "rl": [RL_DATA.format(part=part) for part in RL_PARTS],
    "flip": "coco_flip.tar",
    # The SFT data of each run that trains an SFT stage.
    "sft": sorted({SFT_DATA.format(data=spec["sft"]["data"]) for spec in RUNS.values() if spec["rl"]["from"] == "sft"}),
}


def split_files():
    return [f"{DATASET_DIR}/{rel}" for rel in DATASET_FILES["splits"]]


def sft_data_file(run):
    return f"{DATASET_DIR}/{SFT_DATA.format(data=RUNS[run]['sft']['data'])}"


def validation_reports():
    """The eval splits' validation reports (validate_split), which predict waits for."""
    return expand("results/validation/{split}.json", split=SPLITS)


# Inference (infer.smk).


def predict_options(model):
    return json_arg(predict_job_options(MODELS[model], config["inference"]))


# Latency (latency.smk): each model under the paper's protocol, only with a `latency:` section.

LATENCY = config.get("latency")
LATENCY_MODELS = (MODELS if LATENCY["models"] is None else LATENCY["models"]) if LATENCY else []
for _model in LATENCY_MODELS:
    if _model not in MODELS:
        raise ValueError(f"latency.models: {_model!r} is not an evaluated model: {sorted(MODELS)}")
LATENCY_FILES = expand("results/latency/{model}.json", model=LATENCY_MODELS)
# Model settings that still apply when the latency jobs use another backend than predict.
CARRIED_OVER = (
    "tensor_parallel_size",
    "dtype",
    "max_model_len",
    "gpu_memory_utilization",
    "load_format",
    "enforce_eager",
)


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


# Training (train.smk).


wildcard_constraints:
    run="|".join(map(re.escape, RUNS)) if RUNS else "a^",


def train_options(run, stage):
    """Everything a training stage uses, its recipe resolved (egm.options.train_job_options)."""
    spec = RUNS[run][stage]
    return json_arg(train_job_options(run, spec, resolve_recipe(spec["recipe"], spec["overrides"], workflow.basedir)))


def train_work_dir(run, stage):
    """Where a training stage keeps its checkpoints until it finishes (it resumes from them)."""
    return f"results/checkpoints/{run}/.work/{stage}"


def rl_start(run):
    """(manifest, model dir) RL starts from: this run's SFT, or a released SFT checkpoint."""
    if RUNS[run]["rl"]["from"] == "sft":
        return f"results/checkpoints/{run}/sft.json", f"results/checkpoints/{run}/sft"
    return f"resources/manifests/start-{run}.json", f"resources/models/start-{run}"


# Report (report.smk).


def out_prefixes(wildcards, output):
    """Each artifact's path without its extension, in output order: the rules spell an artifact's
    name once (in `output:`) and the commands get these prefixes."""
    return " ".join(dict.fromkeys(os.path.splitext(path)[0] for path in output))


PAPER_VERSION = config["report"]["paper_version"]


def report_options(**extra):
    models = {name: {key: entry.get(key) for key in ("display", "paper", "params_b")} for name, entry in MODELS.items()}
    # json_arg sorts dict keys; "order" keeps the config's model order (base -> SFT -> RL rows).
    return json_arg(
        {"models": models, "order": list(MODELS), "splits": SPLITS, "paper_version": PAPER_VERSION, **extra}
    )


ALL_METRICS = expand("results/metrics/{model}/{split}.json", model=MODELS, split=SPLITS)
TABLE = (".csv", ".md", ".tex")
EXPECTED = config["report"]["expected"]  # demo-style ranges; the paper config compares with the paper
check_expected(EXPECTED, MODELS)


# Only with training runs: every finished stage directory holds the Trainer's log history.
TRAINING_STAGES = [model_dir(model) for model in TRAINED]


# Test-time scaling (scaling.smk).

SCALING = config["scaling"]
SCALING_BUDGETS = [str(b) for b in SCALING["budgets"]]  # file labels: "0", "16", ..., "unlimited"
_unknown_single = sorted(set(SCALING["single_point"]) - set(MODELS))
if _unknown_single:
    raise ValueError(f"scaling.single_point names {_unknown_single}, which are not evaluated models: {sorted(MODELS)}")
# Answered once, unlimited: Instruct models and the bigger ones (single points in the figure).
SINGLE_POINT = [m for m in MODELS if m in SCALING["single_point"]]
SWEPT = [m for m in MODELS if m not in SINGLE_POINT]


def scaling_budgets(model):
    return ["unlimited"] if model in SINGLE_POINT else SCALING_BUDGETS


def scaling_work_dir(model):
    """Where a scaling job keeps the answers of the budgets it has finished (it resumes from them)."""
    return f"results/scaling/.work/{model}"


def scaling_options(model):
    entry = MODELS[model]
    settings = {k: SCALING[k] for k in ("answer_max_tokens", "n_per_split", "seed")}
    settings["budgets"] = scaling_budgets(model)
    settings["batch_size"] = SCALING["batch_size"] or config["inference"]["batch_size"]
    return json_arg(
        {
            "prompt": entry["prompt"],
            "backend": entry["backend"],
            "engine_options": entry["engine_options"],
            # limit is predict's smoke-run cut and batch_size is resolved above: neither is a key here.
            "inference": {k: v for k, v in config["inference"].items() if k not in ("batch_size", "limit")},
            "scaling": settings,
            "gpus": entry["gpus"],
        }
    )


def _any_of(keys):
    return "|".join(map(re.escape, keys)) if keys else "a^"


def _scaling_outputs(budgets):
    return expand("results/scaling/{{model}}/budget-{budget}.{ext}", budget=budgets, ext=["jsonl", "json"])


SCALING_METRICS = [f"results/scaling/{m}/budget-{b}.json" for m in MODELS for b in scaling_budgets(m)]


def configfiles_given():
    """The config files this run was given, relative to the workflow: the run's location is
    not a parameter of a job that reads them (table_cost)."""
    return [os.path.relpath(c) for c in workflow.configfiles]
