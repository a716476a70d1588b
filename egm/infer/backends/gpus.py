"""Which GPUs a job was given, without importing a framework.

SLURM (and Snakemake's GPU resources under it) hand a job its GPUs through CUDA_VISIBLE_DEVICES;
on a workstation every GPU is visible. Engines then use all of them: one replica per GPU (or
per tensor-parallel group), or the engine's own data parallelism.
"""

from __future__ import annotations

import os
import shutil
import subprocess


def visible_gpus(environ: dict | None = None) -> list[str]:
    """Device ids this process may use, as CUDA numbers them (strings: UUIDs are allowed)."""
    env = os.environ if environ is None else environ
    listed = env.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        ids = [d.strip() for d in listed.split(",") if d.strip()]
        # "-1", "" and SLURM's "NoDevFiles" all mean no GPU.
        return [] if not ids or ids[0] in ("-1", "NoDevFiles") else ids
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(line for line in out.splitlines() if line.startswith("GPU "))]


def groups(gpus: list[str], per_group: int) -> list[list[str]]:
    """Split the GPUs into groups of `per_group` (tensor parallel size); leftovers stay idle."""
    if per_group < 1:
        raise ValueError(f"GPUs per group must be at least 1, got {per_group}")
    n = len(gpus) // per_group
    return [gpus[i * per_group : (i + 1) * per_group] for i in range(n)]


def resolve_data_parallel(value, tensor_parallel: int, gpus: list[str] | None = None) -> int:
    """`data_parallel_size` from the config: an int, or "auto" = every visible GPU used."""
    if value in (None, "auto"):
        gpus = visible_gpus() if gpus is None else gpus
        return max(1, len(gpus) // max(1, int(tensor_parallel)))
    value = int(value)
    if value < 1:
        raise ValueError(f"data_parallel_size must be at least 1 or 'auto', got {value}")
    return value
