"""Containers: the definitions, the workflow's choice of image, early failures, and the demo run
inside the real CPU image under real Apptainer (built here, cached under ~/.cache/egm)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.container_helpers import (
    CANARY_TOKEN,
    APPTAINER_ARGS,
    apptainer_bin,
    container_workflow,
    cpu_image,
    files_holding,
    image_marker,
    image_name,
    job_logs,
    lean_demo_config,
    record_timing,
    snakemake,
    unavailable,
)
from tests.workflow_helpers import REPO, copy_workflow, small_demo_config, write_config

DEFINITIONS = ["cpu", "gpu-vllm", "gpu-sglang"]


def _definition(name: str) -> str:
    return (REPO / "containers" / f"{name}.def").read_text()


def _lock(name: str) -> dict[str, str]:
    block = re.search(r"<<'LOCK'\n(.*?)\nLOCK\n", _definition(name), re.S).group(1)
    return dict(line.strip().split("==") for line in block.splitlines() if line.strip())


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _with_definitions(dest: Path) -> Path:
    """The workflow with the image definitions (copy_workflow brings them)."""
    dest.mkdir()
    copy_workflow(dest)
    assert sorted(p.stem for p in (dest / "containers").glob("*.def")) == sorted(DEFINITIONS)
    return dest


def _fake_apptainer(directory: Path) -> Path:
    """Enough of an `apptainer` for the workflow's parse-time checks (nothing is run with it)."""
    directory.mkdir()
    shim = directory / "apptainer"
    shim.write_text("#!/bin/sh\necho 'apptainer version 1.4.5'\n")
    shim.chmod(0o755)
    return directory


def test_cpu_image_pins_pyproject_dependencies_exactly():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lock = {_norm(k): v for k, v in _lock("cpu").items()}
    for requirement in project["dependencies"]:
        name, _, version = requirement.partition("==")
        name = _norm(name)
        if name == "snakemake":
            continue  # runs on the host, not in the image
        if name == "torch":
            assert f"torch-{version}" in _definition("cpu")  # the CPU wheel passed in as a build argument
            continue
        assert lock.get(name) == version, (
            f"cpu.def pins {name}=={lock.get(name)}, pyproject.toml {version}: run `containers/build.sh --lock`"
        )


# Where a GPU image must differ from pyproject.toml (its engine pins these; see the .def headers).
ENGINE_PINNED = {"gpu-vllm": {"torch", "transformers", "huggingface-hub"},
                 "gpu-sglang": {"torch", "transformers", "tokenizers"}}


@pytest.mark.parametrize("name", sorted(ENGINE_PINNED))
def test_gpu_images_keep_pyprojects_other_pins(name):
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = {_norm(m.group(1)): m.group(2) for m in re.finditer(r"([A-Za-z0-9_.\-]+)(?:\[\w+\])?==([\w.]+)", _definition(name))}
    for requirement in project["dependencies"]:
        dep, _, version = requirement.partition("==")
        dep = _norm(dep)
        if dep == "snakemake" or dep in ENGINE_PINNED[name]:
            continue
        assert pins.get(dep) == version, f"{name}.def installs {dep}=={pins.get(dep)}, pyproject.toml pins {version}"


def test_definitions_pin_their_base_and_engines():
    cpu = _definition("cpu")
    assert re.search(r"^Bootstrap: debootstrap$", cpu, re.M) and re.search(r"^OSVersion: bookworm$", cpu, re.M)
    assert re.search(r"^MirrorURL: \{\{ MIRROR_URL \}\}$", cpu, re.M)  # from the build host, never committed
    for name in ("gpu-vllm", "gpu-sglang"):
        text = _definition(name)
        assert re.search(r"^From: \S+@sha256:[0-9a-f]{64}$", text, re.M), f"{name}: base image not pinned by digest"
    vllm = _definition("gpu-vllm")
    for pin in ("vllm==0.31.0", "torch==2.13.0", "transformers==5.17.0", '"trl[vllm]==1.16.0"', "deepspeed==0.19.8"):
        assert pin in vllm, pin
    assert "--no-build-isolation --no-deps deepspeed" in vllm
    sglang = _definition("gpu-sglang")
    for pin in ("sglang==0.5.23", "torch==2.14.1", "transformers==5.19.0"):
        assert pin in sglang, pin
    for name in DEFINITIONS:
        assert "export EGM_IMAGE={{ EGM_IMAGE }}" in _definition(name)


def test_infrastructure_files_name_no_hosts_or_machine_paths():
    files = [*(REPO / "containers").glob("*.def"), *(REPO / "containers").glob("*.sh"), *(REPO / "ci").glob("*"),
             *(REPO / "profiles").rglob("*.yaml"), REPO / "containers" / "README.md"]
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text()
        assert not re.search(r"\b(deb|ftp|security|archive)\.(debian|ubuntu)\.(org|com)\b|pypi\.org|pythonhosted", text), path
        assert not re.search(r"(?<![\w.])/(work|opt)/", text), path


def test_build_script_and_workflow_agree_on_image_names(tmp_path):
    for name in DEFINITIONS:
        printed = subprocess.run([str(REPO / "containers" / "build.sh"), "--name", name],
                                 capture_output=True, text=True, check=True).stdout.strip()
        assert printed == image_name(name)


def test_use_apptainer_without_apptainer_fails_before_any_job(tmp_path):
    workdir = _with_definitions(tmp_path / "wf")
    configfile = write_config(workdir, small_demo_config())
    tools = tmp_path / "tools"  # what Snakemake itself needs, and no apptainer anywhere on PATH
    tools.mkdir()
    for tool in ("bash", "sh", "which"):
        (tools / tool).symlink_to(shutil.which(tool))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{tools}"}
    result = subprocess.run(["snakemake", "-n", "--configfile", str(configfile), "--use-apptainer"],
                            cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "no `apptainer` on PATH" in result.stdout + result.stderr
    assert not (workdir / "resources").exists()


def test_missing_image_is_named_with_how_to_build_it(tmp_path):
    workdir = _with_definitions(tmp_path / "wf")
    configfile = write_config(workdir, small_demo_config())
    result = snakemake(workdir, _fake_apptainer(tmp_path / "bin"), "-n", "--configfile", str(configfile),
                       "--use-apptainer")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"containers/images/{image_name('cpu')}.sif" in output
    assert "make containers" in output


def test_paper_config_picks_each_models_engine_image(tmp_path):
    workdir = _with_definitions(tmp_path / "wf")
    result = snakemake(workdir, _fake_apptainer(tmp_path / "bin"), "-n", "--use-apptainer")
    output = result.stdout + result.stderr
    assert result.returncode != 0  # no image is built here
    # hf models on GPUs and the vllm models need the vLLM image; no model uses SGLang.
    assert f"containers.vllm: containers/images/{image_name('gpu-vllm')}.sif" in output
    assert f"containers.cpu: containers/images/{image_name('cpu')}.sif" in output
    assert "containers.sglang" not in output


def test_scheduler_resources_come_from_the_config(tmp_path):
    workdir = copy_workflow(tmp_path)
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["resources"].update(partition="cpu-part", gpu_partition="gpu-part", account="proj1", gpu_model="h100")
    configfile = write_config(workdir, config)
    result = snakemake(workdir, None, "table_refcoco", "-n", "--configfile", str(configfile))
    assert result.returncode == 0, result.stderr[-3000:]
    resources = {}
    for block in re.split(r"\n(?=\[)|\n\n", result.stdout):  # one block per planned job
        rule = re.search(r"^(?:local)?rule (\w+):$", block, re.M)
        line = re.search(r"^\s+resources: (.*)$", block, re.M)
        if rule and line:
            wildcards = re.search(r"^\s+wildcards: (.*)$", block, re.M)
            key = (rule.group(1), wildcards.group(1) if wildcards else "")
            resources[key] = dict(item.split("=", 1) for item in line.group(1).split(", "))
    big = resources[("predict", "model=qwen3-vl-235b-a22b-instruct")]
    assert (big["gpu"], big["gpu_model"], big["cpus_per_gpu"]) == ("8", "h100", "8")
    assert (big["slurm_partition"], big["slurm_account"]) == ("gpu-part", "proj1")
    assert big["mem_mb"] == str(8 * config["resources"]["mem_mb_per_gpu"])
    assert big["runtime"] == str(config["resources"]["gpu_runtime_min"])
    small = resources[("predict", "model=egm-8b")]
    assert small["gpu"] == "1" and small["slurm_partition"] == "gpu-part"
    score = next(v for (rule, _), v in resources.items() if rule == "score")
    assert score["slurm_partition"] == "cpu-part" and "gpu_model" not in score and score.get("gpu", "0") == "0"


@pytest.mark.slow
def test_demo_runs_every_job_inside_the_cpu_image(tmp_path):
    bin_dir = apptainer_bin()
    image = cpu_image(bin_dir)
    workdir = container_workflow(tmp_path / "wf", image)
    configfile = write_config(workdir, lean_demo_config())

    started = time.monotonic()
    result = snakemake(workdir, bin_dir, "--cores", "2", "--configfile", str(configfile), "--use-apptainer",
                       f"--apptainer-args={APPTAINER_ARGS}")
    record_timing("apptainer_demo_s", time.monotonic() - started)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (workdir / "results/figures/tradeoff.png").exists()
    assert (workdir / "results/tables/refcoco_vs_paper.md").exists()

    steps = int(re.findall(r"(\d+) of \1 steps \(100%\) done", result.stdout + result.stderr)[-1])
    logs = job_logs(workdir)
    assert len(logs) == steps - 1, [str(p.relative_to(workdir)) for p in logs]  # one log per job but `all`
    markers = {str(p.relative_to(workdir)): image_marker(p) for p in logs}
    assert set(markers.values()) == {image.stem}, markers  # every job, in exactly this image
    # Every metrics file names that image by the digest of its file (provenance).
    from egm.io import sha256_file

    digest = sha256_file(image)
    for path in (workdir / "results/metrics").rglob("*.json"):
        record = json.loads(path.read_text())["provenance"]
        assert record["job"]["image"]["name"] == image.stem, path
        assert record["job"]["image"]["sha256"] == digest == record["scored_by"]["image"]["sha256"], path
    assert files_holding(workdir, CANARY_TOKEN) == []

    # Same image, nothing to do; an edited definition is a new image and every job reruns.
    again = snakemake(workdir, bin_dir, "-n", "--configfile", str(configfile), "--use-apptainer")
    assert "Nothing to be done" in again.stdout + again.stderr, again.stdout[-2000:]
    definition = workdir / "containers" / "cpu.def"
    definition.write_text(definition.read_text() + "\n# edited\n")
    edited = subprocess.run(
        [str(REPO / "containers" / "build.sh"), "--name", "cpu"], capture_output=True, text=True, check=True
    )  # the repository's definition is unchanged: the edited name comes from the copy
    import hashlib

    new_name = f"cpu-{hashlib.sha256(definition.read_bytes()).hexdigest()[:12]}"
    assert new_name != edited.stdout.strip()
    (workdir / "containers" / "images" / f"{new_name}.sif").symlink_to(image)
    rerun = snakemake(workdir, bin_dir, "-n", "--configfile", str(configfile), "--use-apptainer")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    total = re.search(r"^total\s+(\d+)$", rerun.stdout, re.M)
    assert total and int(total.group(1)) == steps, rerun.stdout[-3000:]
    assert "software environment" in rerun.stdout.lower()


@pytest.mark.parametrize("profile", ["slurm", "local-gpu"])
def test_profiles_plan_the_demo_in_its_image(profile, tmp_path):
    if profile == "slurm" and importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        # Skipped on a developer machine without the `cluster` extra, failed in CI (not skipped).
        unavailable("the SLURM executor plugin is not installed (pip install -e '.[cluster]')")
    workdir = _with_definitions(tmp_path / "wf")
    shutil.copytree(REPO / "profiles", workdir / "profiles")
    (workdir / "containers" / "images").mkdir()
    (workdir / "containers" / "images" / f"{image_name('cpu')}.sif").touch()
    configfile = write_config(workdir, small_demo_config())
    result = snakemake(workdir, _fake_apptainer(tmp_path / "bin"), "--profile", f"profiles/{profile}", "-n",
                       "--configfile", str(configfile))
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "predict" in result.stdout
