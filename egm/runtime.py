"""Checks of the machine a job landed on, run before any expensive work starts.

A GPU job that silently falls back to CPU would run for days (or run out of memory) before
anyone noticed; failing at once, with what to fix, is cheaper.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

log = logging.getLogger(__name__)

# Set (to "1") by the workflow when the config's `resources.gpu_jobs_on_cpu` is true; jobs inherit
# it through the environment (sbatch and Apptainer pass it on).
GPU_JOBS_ON_CPU_ENV = "EGM_GPU_JOBS_ON_CPU"


class RuntimeCheckError(SystemExit):
    """A job started where it cannot run; the message says why and what to change."""


def require_gpus(n: int, *, what: str = "this job") -> int:
    """Fail unless at least `n` CUDA devices are visible; returns how many are. `n` 0 checks nothing.

    Only the config's `resources.gpu_jobs_on_cpu` (GPU_JOBS_ON_CPU_ENV in the job) lets such a job
    go on, on the CPU: for a test of the scheduling path on a cluster whose GPUs are not real
    (config/cluster-smoke.yaml), never for a run whose numbers count.
    """
    if n <= 0:
        return 0
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible >= n:
        return visible
    seen = f"{visible} {'is' if visible == 1 else 'are'} visible"
    if os.environ.get(GPU_JOBS_ON_CPU_ENV) == "1":
        log.warning("%s needs %d GPU(s) but %s (CUDA_VISIBLE_DEVICES=%r): running on the CPU, as the "
                    "config's resources.gpu_jobs_on_cpu says", what, n, seen, os.environ.get("CUDA_VISIBLE_DEVICES"))
        return visible
    hints = []
    if torch.version.cuda is None:
        hints.append(f"this torch ({torch.__version__}) is a CPU build: run inside the GPU image (--use-apptainer)")
    cuda_env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cuda_env is not None:
        hints.append(f"CUDA_VISIBLE_DEVICES={cuda_env!r}")
    if os.environ.get("EGM_IMAGE"):
        hints.append(f"inside image {os.environ['EGM_IMAGE']}: the host's GPUs reach it only with `--nv` "
                     "(profiles/slurm and profiles/local-gpu set it)")
    if os.environ.get("SLURM_JOB_ID"):
        hints.append(f"SLURM job {os.environ['SLURM_JOB_ID']}: check the partition has GPUs (resources.gpu_partition)")
    raise RuntimeCheckError(
        f"{what} needs {n} GPU(s) but {seen}"
        + ("; " + "; ".join(hints) if hints else "")
        + ". Set the model's `gpus:` to 0 to run it on CPU."
    )


@contextlib.contextmanager
def temporary_environment(values: dict) -> Iterator[None]:
    """os.environ with `values` set, restored after (a process started inside inherits them)."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
