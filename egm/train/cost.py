"""What a training run costs, recorded by the run itself: each optimizer step's wall time and,
on GPU, each process's peak memory while training.

The trainer's own metrics give one runtime for the whole run, first step (compilation, caches,
DeepSpeed's set-up) included, and nothing per GPU; comparing a run on one GPU with the same run
on several needs steady-state step times and every GPU's memory. Both go into the stage's
manifest and training.json (`cost`).
"""

from __future__ import annotations

import os
import time

from transformers import TrainerCallback

GIB = 2**30


def _cuda():
    import torch

    return torch.cuda if torch.cuda.is_available() else None


class TrainingCost(TrainerCallback):
    def __init__(self):
        self.step_s: list[float] = []
        self._start: float | None = None

    def _synchronize(self) -> None:
        # A step's kernels run after its Python returns; timing needs them finished.
        cuda = _cuda()
        if cuda is not None:
            cuda.synchronize()

    def on_train_begin(self, args, state, control, **kwargs):
        cuda = _cuda()
        if cuda is not None:
            cuda.reset_peak_memory_stats()

    def on_step_begin(self, args, state, control, **kwargs):
        self._synchronize()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._synchronize()
        if self._start is not None:
            self.step_s.append(round(time.perf_counter() - self._start, 4))
            self._start = None

    def summary(self) -> dict:
        """Step times of this process and every process's memory. Collective: under several
        processes every rank must call it."""
        return {"step_s": self.step_s, "processes": all_processes(this_process())}


def this_process() -> dict:
    """This process's rank, device and peak memory since training began (None on CPU)."""
    cuda = _cuda()
    record = {"rank": int(os.environ.get("RANK", "0")), "device": "cpu",
              "peak_allocated_gib": None, "peak_reserved_gib": None}
    if cuda is not None:
        record.update(device=cuda.get_device_name(), peak_allocated_gib=round(cuda.max_memory_allocated() / GIB, 3),
                      peak_reserved_gib=round(cuda.max_memory_reserved() / GIB, 3))
    return record


def all_processes(record: dict) -> list[dict]:
    """Every process's record, by rank; just this one's outside a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [record]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, record)
    return sorted(gathered, key=lambda r: r["rank"])
