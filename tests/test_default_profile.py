"""profiles/default, which Snakemake reads by itself: a plain `snakemake` run, as a new user types
it (no profile, no --show-failed-logs), shows a failed job's one-line reason on the console, not
only `Error in rule ... (check log file(s) for error details)`."""

import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import yaml

from egm.data.demo import write_demo_dataset
from tests.workflow_helpers import REPO, copy_workflow, small_demo_config, write_config

DATASET = "egm-demo/EGM_Datasets"


def test_default_profile_keys_exist_in_snakemake():
    """Each key is an option of this Snakemake (a misspelt key would fail every run), and none
    takes a choice away from profiles/slurm or profiles/local-gpu, which are read with it and
    which it overrides key by key."""
    from snakemake.cli import get_argument_parser

    default = yaml.safe_load((REPO / "profiles/default/config.yaml").read_text())
    options = {opt for action in get_argument_parser()._actions for opt in action.option_strings}
    assert {f"--{key}" for key in default} <= options
    assert default["show-failed-logs"] is True
    for other in ("slurm", "local-gpu"):
        profile = yaml.safe_load((REPO / "profiles" / other / "config.yaml").read_text())
        assert {key: profile[key] for key in default if key in profile} == {
            key: default[key] for key in default if key in profile}, other


def _plain_snakemake(workdir: Path, configfile: Path, target: str) -> tuple[int, str]:
    """`snakemake --cores 2 TARGET --configfile CONFIG` in a checkout-like copy; returns the exit
    code and the console (stdout + stderr)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["snakemake", "--cores", "2", target, "--configfile", str(configfile)],
                            cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    return result.returncode, result.stdout + result.stderr


def _checkout_with_mirror(tmp_path: Path) -> tuple[Path, Path]:
    copy_workflow(tmp_path)
    shutil.copytree(REPO / "profiles", tmp_path / "profiles")
    mirror = tmp_path / "site"
    write_demo_dataset(mirror / DATASET, n_train_images=2, n_eval_per_split=1)
    config = small_demo_config()
    del config["demo"]
    config["hub"]["mirror"] = str(mirror)
    return mirror / DATASET, write_config(tmp_path, config)


def _last_line(path: Path) -> str:
    return path.read_text().strip().splitlines()[-1]


def test_refused_archive_and_missing_file_reasons_reach_the_console(tmp_path):
    repo, configfile = _checkout_with_mirror(tmp_path)
    # A tar part whose member climbs out of the image folder: extraction refuses it.
    for part in repo.glob("coco.tar.part_*"):
        part.unlink()
    data, buffer = b"not an image", io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        member = tarfile.TarInfo("coco/../../escaped.jpg")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    (repo / "coco.tar.part_aa").write_bytes(buffer.getvalue())

    rc, console = _plain_snakemake(tmp_path, configfile, "resources/manifests/images-coco.json")
    assert rc != 0
    assert "Using workflow specific profile profiles/default" in console
    reason = _last_line(tmp_path / "logs/extract_images/coco.log")
    assert "'..' component" in reason and reason in console, console[-3000:]

    # A file the workflow needs gone from the mirror: the fetch's reason on the console too.
    (repo / "metadata/eval/refcoco_testA.jsonl").unlink()
    shutil.rmtree(tmp_path / "resources")
    rc, console = _plain_snakemake(tmp_path, configfile, "resources/manifests/dataset.json")
    assert rc != 0
    reason = _last_line(tmp_path / "logs/fetch_dataset.log")
    assert "metadata/eval/refcoco_testA.jsonl" in reason and reason in console, console[-3000:]
