"""What a GPU job cost, recorded by the job itself beside its results: wall time, GPU-seconds,
peak GPU memory and tokens generated. Snakemake's benchmark files hold wall time and memory of
the host process only; `egm plan --check` reads these beside them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

GIB = 2**30


class GpuMemoryPeak:
    """The most memory the job's GPUs had in use, sampled from nvidia-smi every `every` seconds
    in a background thread: it sees engines in their own processes (vLLM, a server), which
    torch's counters in this process do not; it counts every process on those GPUs."""

    QUERY = ["--query-gpu=index,memory.used", "--format=csv,noheader,nounits"]

    def __init__(self, every: float = 1.0):
        self.every = every
        self.peak_mib: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        self.indices = {int(i) for i in visible.split(",") if i.strip().isdigit()} or None

    def sample(self) -> None:
        out = subprocess.run(["nvidia-smi", *self.QUERY], capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            return
        for line in out.stdout.splitlines():
            index, used = (part.strip() for part in line.split(","))
            if self.indices is None or int(index) in self.indices:
                self.peak_mib = max(self.peak_mib or 0.0, float(used))

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except (OSError, ValueError, subprocess.SubprocessError):
                return  # no reading is better than a job failed by its bookkeeping
            self._stop.wait(self.every)

    def start(self) -> "GpuMemoryPeak":
        if shutil.which("nvidia-smi"):
            self._thread = threading.Thread(target=self._loop, name="gpu-memory-peak", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> tuple[float | None, str]:
        if self._thread is None:
            return None, "not measured: no nvidia-smi"
        self._stop.set()
        self._thread.join(timeout=15)
        if self.peak_mib is None:
            return None, "not measured: nvidia-smi gave no reading"
        return round(self.peak_mib / 1024, 3), (f"nvidia-smi memory.used every {self.every:g} s, the largest over "
                                                "the job's GPUs (every process on them)")


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


def job_cost(started: float, gpus: int, tokens: int | None, sampler: GpuMemoryPeak | None = None) -> dict:
    """The job's cost block; `started` is time.monotonic() at its start, `sampler` the memory
    sampler started with it (its reading wins; else torch's counters of this process)."""
    wall = time.monotonic() - started
    peak, peak_from = sampler.stop() if sampler else (None, "")
    if peak is None:
        peak, peak_from = peak_gpu_memory()
    return {"wall_s": round(wall, 3), "gpus": gpus, "gpu_seconds": round(wall * gpus, 3),
            "peak_gpu_mem_gib": peak, "peak_gpu_mem_from": peak_from, "tokens_generated": tokens}
