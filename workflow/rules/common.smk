# Paths and small helpers shared by the rules. Everything a rule passes on is derived here
# from the validated config, so each rule's params hold only the config keys it uses.
import json
import re
import shlex

SPLITS = config["splits"]
MODELS = config["models"]
RL_PARTS = ["train", "val"]

DATASET_DIR = f"resources/hub/{config['dataset']['repo_id']}"
IMAGE_ROOT = "resources/images"
MIRROR = config["hub"]["mirror"]


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


def mirror_arg():
    return f"--mirror {shlex.quote(MIRROR)}" if MIRROR else ""


def split_files():
    return expand(f"{DATASET_DIR}/metadata/eval/{{split}}.jsonl", split=SPLITS)
