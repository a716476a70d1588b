"""What a GPU job cost, recorded by the job itself beside its results: wall time, GPU-seconds,
peak GPU memory and tokens generated. Snakemake's benchmark files hold wall time and memory of
the host process only; `egm plan --check` reads these beside them.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

GIB = 2**30


def peak_gpu_memory() -> tuple[float | None, str]:
    """(GiB, how it was read): this process's peak reserved CUDA memory where this process used
    CUDA through torch; engines in their own processes (vLLM, a server) are not seen from here."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None, "not measured: no CUDA in this process (engines in their own processes are not seen)"
    peak = max(torch.cuda.max_memory_reserved(i) for i in range(torch.cuda.device_count()))
    return round(peak / GIB, 3), "torch.cuda.max_memory_reserved, the largest over this process's GPUs"


def tokens_in(paths) -> int:
    """Completion tokens of the answer rows in JSONL result files."""
    total = 0
    for path in paths:
        for line in Path(path).read_text().splitlines():
            total += json.loads(line).get("completion_tokens") or 0
    return total


def job_cost(started: float, gpus: int, tokens: int | None) -> dict:
    """The job's cost block; `started` is time.monotonic() at its start."""
    wall = time.monotonic() - started
    peak, peak_from = peak_gpu_memory()
    return {"wall_s": round(wall, 3), "gpus": gpus, "gpu_seconds": round(wall * gpus, 3),
            "peak_gpu_mem_gib": peak, "peak_gpu_mem_from": peak_from, "tokens_generated": tokens}
