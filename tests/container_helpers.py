"""Real Apptainer and real SLURM for the workflow tests: install, build and cache once per machine.

The Apptainer prefix and the CPU image are kept under EGM_CACHE (default ~/.cache/egm), outside
the repository, so later CI runs on the same machine reuse them; the image is keyed by the hash
of its definition (which pins every package) and of the build script. Missing prerequisites skip these tests on a developer machine
and fail them in CI (EGM_CI=1, set by .ci/run), so CI never passes by skipping.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from egm.io import sha256_file
from tests.workflow_helpers import REPO, copy_workflow, small_demo_config

CACHE = Path(os.environ.get("EGM_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "egm")
IN_CI = os.environ.get("EGM_CI") == "1"
IS_ROOT = os.geteuid() == 0
# Root may run images only in a user namespace here (no CAP_SYS_RESOURCE for setuid-less root mode).
APPTAINER_ARGS = "--userns" if IS_ROOT else ""


def unavailable(reason: str):
    """Skip on a developer machine; fail in CI, where everything must be there."""
    if IN_CI:
        pytest.fail(f"CI prerequisite missing: {reason}")
    pytest.skip(reason)


def image_name(definition: str) -> str:
    """containers/build.sh's name for an image: <definition>-<first 12 hex of its SHA-256>."""
    digest = sha256_file(REPO / "containers" / f"{definition}.def")[:12]
    return f"{definition}-{digest}"


def apptainer_bin() -> Path:
    """The directory holding `apptainer`: installed (idempotently) into the cache prefix."""
    if not Path("/etc/debian_version").exists():
        unavailable("containers/install-apptainer.sh supports Debian hosts only")
    result = subprocess.run(
        [str(REPO / "containers" / "install-apptainer.sh")], capture_output=True, text=True, timeout=600,
        env={**os.environ, "EGM_CACHE": str(CACHE)},
    )
    if result.returncode != 0:
        unavailable(f"installing apptainer failed:\n{result.stderr[-2000:]}")
    return Path(result.stdout.strip().splitlines()[-1])


def cpu_image_inputs_key() -> str:
    """Hash of what makes the CPU image's environment: the definition (its LOCK block pins every
    package, kept equal to pyproject.toml's pins by test_containers) and the build script. The egm
    code is not in it: jobs run from a checkout import the checkout's egm (the working directory
    comes first on sys.path), and so do these tests."""
    digest = hashlib.sha256()
    for path in (REPO / "containers" / "cpu.def", REPO / "containers" / "build.sh"):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def cpu_image(bin_dir: Path) -> Path:
    """The CPU image, built by containers/build.sh on first use and cached by its inputs' hash."""
    name = image_name("cpu")
    out_dir = CACHE / "images" / cpu_image_inputs_key()
    image = out_dir / f"{name}.sif"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "images.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent test run builds it once, the other waits
        if not image.exists():
            _build_cpu_image(bin_dir, out_dir)
    return image


def _build_cpu_image(bin_dir: Path, out_dir: Path) -> None:
    if IS_ROOT and subprocess.run(["id", "egm-build"], capture_output=True).returncode != 0:
        unavailable("no unprivileged build user `egm-build` with subordinate ids (run ci/setup-system.sh)")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "EGM_CACHE": str(CACHE)}
    started = time.monotonic()
    result = subprocess.run(
        [str(REPO / "containers" / "build.sh"), "--out", str(out_dir), "cpu"],
        capture_output=True, text=True, timeout=1500, env=env,
    )
    if result.returncode != 0:
        pytest.fail(f"building the CPU image failed:\n{result.stderr[-6000:]}")
    record_timing("cpu_image_build_s", time.monotonic() - started)
    # Older builds of other inputs are dead weight: keep only this one.
    for other in (CACHE / "images").iterdir():
        if other != out_dir and other.is_dir():
            shutil.rmtree(other, ignore_errors=True)


def record_timing(key: str, seconds: float) -> None:
    """Wall times of the expensive steps, kept beside the cache (for budgeting CI)."""
    path = CACHE / "timings.json"
    timings = json.loads(path.read_text()) if path.exists() else {}
    timings[key] = round(seconds, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(timings, indent=1, sort_keys=True))


def lean_demo_config() -> dict:
    """The small demo, trimmed further: every rule still runs (training included), on two splits
    and a few training steps, so these runs fit CI's time on two cores."""
    config = small_demo_config()
    config["splits"] = config["splits"][:2]
    for run in config.get("train", {}).get("runs", {}).values():
        if "sft" in run:
            run["sft"]["max_steps"] = 2
        if "rl" in run:
            run["rl"].update(max_steps=1, limit=8)
    return config


def container_workflow(dest: Path, image: Path) -> Path:
    """A checkout-like copy: workflow (with the definitions), egm code, profiles, and the built CPU image."""
    dest.mkdir(parents=True)
    copy_workflow(dest)
    shutil.copytree(REPO / "profiles", dest / "profiles")
    # As in a checkout: `python -m egm` in a job imports this code, the image gives the environment.
    shutil.copytree(REPO / "egm", dest / "egm", ignore=shutil.ignore_patterns("__pycache__"))
    (dest / "containers" / "images").mkdir(parents=True)
    (dest / "containers" / "images" / image.name).symlink_to(image)
    return dest


def snakemake(workdir: Path, bin_dir: Path | None, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """The `snakemake` CLI as a user runs it, with the venv (and apptainer, if given) on PATH."""
    venv_bin = Path(sys.executable).parent
    path = os.pathsep.join(str(p) for p in (bin_dir, venv_bin) if p) + os.pathsep + os.environ["PATH"]
    return subprocess.run(
        ["snakemake", *args], cwd=workdir, env={**os.environ, "PATH": path, "HF_TOKEN": CANARY_TOKEN},
        capture_output=True, text=True, timeout=timeout,
    )


# Jobs see HF_TOKEN through the environment only; it must not land in any file a run writes.
CANARY_TOKEN = "hf_canaryCONTAINER0123456789abcdef"


def files_holding(workdir: Path, secret: str) -> list[str]:
    needle = secret.encode()
    return [
        str(p.relative_to(workdir)) for p in workdir.rglob("*")
        if p.is_file() and not p.is_symlink() and needle in p.read_bytes()
    ]


def job_logs(workdir: Path) -> list[Path]:
    return sorted(p for p in (workdir / "logs").rglob("*.log") if p.is_file())


def image_marker(log: Path) -> str | None:
    """The image an egm command said it ran in (egm.cli logs `image: $EGM_IMAGE` first)."""
    match = re.search(r"\(image: ([\w.+-]+)", log.read_text(errors="replace"))
    return match.group(1) if match else None
