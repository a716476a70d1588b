"""Drive the real Snakemake workflow from tests: a copy of the workflow in a temp directory,
run through the `snakemake` CLI as a user would, and planned through the Snakemake API."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from snakemake.api import SnakemakeApi
from snakemake.settings.types import ConfigSettings, OutputSettings, Quietness, ResourceSettings

REPO = Path(__file__).resolve().parents[1]

# Output path prefix -> pipeline stage, to name what a plan would rerun.
STAGES = [
    ("resources/manifests/demo-mirror", "demo_mirror"),
    ("resources/manifests/dataset", "fetch_dataset"),
    ("resources/hub/", "fetch_dataset"),
    ("resources/manifests/images-", "extract_images"),
    ("results/validation/", "validate"),
    ("resources/rl/", "rewrite_rl_parquet"),
    ("resources/manifests/model-", "fetch_model"),
    ("resources/manifests/start-", "fetch_model"),
    ("results/checkpoints/", "train"),
    ("results/predictions/", "predict"),
    ("results/latency/", "latency"),
    ("results/scaling/", "scaling"),
    ("results/metrics/", "score"),
    ("results/tables/", "report"),
    ("results/figures/", "report"),
]


def stage_of(path: str) -> str:
    for prefix, stage in STAGES:
        if path.startswith(prefix):
            return stage
    raise AssertionError(f"output of no known stage: {path}")


def copy_workflow(dest: Path) -> Path:
    shutil.copy(REPO / "Snakefile", dest / "Snakefile")
    shutil.copytree(REPO / "workflow", dest / "workflow")
    shutil.copytree(REPO / "config", dest / "config")
    # Every rule names its image, whose file name carries its definition's hash.
    (dest / "containers").mkdir(exist_ok=True)
    for definition in (REPO / "containers").glob("*.def"):
        shutil.copy(definition, dest / "containers" / definition.name)
    # The measurement records the report's cost table prices jobs from (rule table_cost).
    shutil.copytree(REPO / "benchmarks" / "results", dest / "benchmarks" / "results")
    return dest


def write_config(workdir: Path, config: dict, name: str = "test.yaml") -> Path:
    path = workdir / "config" / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def shipped_config(name: str) -> dict:
    """A config of config/ with its `splits` as the workflow sees them: the schema's default (all
    eight) where the file leaves them out."""
    config = yaml.safe_load((REPO / "config" / name).read_text())
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    config.setdefault("splits", schema["properties"]["splits"]["default"])
    return config


def small_demo_config(**inference) -> dict:
    config = shipped_config("demo.yaml")
    config["demo"].update(n_train_images=8, n_eval_per_split=4)
    config["inference"].update({"max_tokens": 16, "batch_size": 8, **inference})
    for run in config.get("train", {}).get("runs", {}).values():
        # A couple of optimizer steps on a handful of rows: the stages run, nothing more.
        run["sft"].update(max_steps=2, limit=16)
        run["rl"].update(max_steps=1, limit=4, overrides={"group_size": 2, "prompts_per_step": 2,
                                                          "micro_batch_size": 4, "max_new_tokens": 8})
    # The test-time-scaling sweep: one record per split, three budgets, short answers.
    config["scaling"] = {"budgets": [0, 4, "unlimited"], "answer_max_tokens": 8, "n_per_split": 1, "seed": 0}
    return config


def run_snakemake(workdir: Path, configfile: Path, *args: str, timeout: int = 900, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return subprocess.run(
        ["snakemake", "--cores", "2", "--configfile", str(configfile), *args],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout,
    )


def plan(workdir: Path, configfile: Path | None = None, targets: list[str] | None = None) -> list[str]:
    """Output files a run would (re)create now: a dry run through the Snakemake API."""
    with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
        workflow = api.workflow(
            resource_settings=ResourceSettings(cores=1),
            config_settings=ConfigSettings(configfiles=[configfile] if configfile else []),
            snakefile=workdir / "Snakefile",
            workdir=workdir,
        )
        dag_api = workflow.dag(**({} if targets is None else {"dag_settings": _targets(targets)}))
        updated: list[str] = []
        dag_api.execute_workflow(executor="dryrun", updated_files=updated)
        return sorted(updated)


def _targets(targets):
    from snakemake.settings.types import DAGSettings

    return DAGSettings(targets=set(targets))


def files_containing(root: Path, needles: list[str]) -> list[str]:
    """Every file under `root` (hidden folders such as .snakemake included) holding a needle."""
    hits = []
    encoded = [n.encode() for n in needles]
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            hits += [f"{path.relative_to(root)}: {n.decode()}" for n in encoded if n in data]
    return hits
