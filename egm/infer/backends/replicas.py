"""Data parallelism for engines that hold one GPU (or one tensor-parallel group) each.

A ReplicatedEngine starts one worker process per GPU group, each seeing only its own GPUs and
its share of the CPU threads from its first instruction (the environment it is started with:
CUDA_VISIBLE_DEVICES, OMP_NUM_THREADS), loads the inner engine in all of them at once, and
splits every `generate` call into contiguous shards, one per replica, answered in parallel and
put back in request order.

predict hands it as many requests at a time as the inner engine asks for alone, times the
replicas: each replica then gets exactly the chunks one engine would get from a run on one GPU
group (the same batches, so the same answers where the engine is deterministic), and is as busy.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import traceback
from collections.abc import Callable

from egm.infer.base import Completion, Engine, EngineBase, Request
from egm.options import SamplingOptions
from egm.runtime import temporary_environment

log = logging.getLogger(__name__)


def _worker(conn, load: Callable[..., Engine], backend: str, model_dir: str, sampling: SamplingOptions, options: dict,
            gpus: list[str]) -> None:
    try:
        engine = load(backend, model_dir, sampling, {**options, "data_parallel_size": 1})
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", engine.chunk_size))
    try:
        while True:
            requests = conn.recv()
            if requests is None:
                break
            try:
                conn.send(("ok", engine.generate(requests)))
            except BaseException:
                conn.send(("error", traceback.format_exc()))
    finally:
        engine.close()


def replica_environment(gpus: list[str], replicas: int) -> dict:
    """What a replica's process starts with: its GPUs, and its share of the CPUs for OpenMP.

    Set when the process starts, not by the worker: anything that asks CUDA for its devices
    first (a device count on import) fixes the visible set for the process's lifetime. Without
    a share, every replica's OpenMP pool takes every core, and on two H200s two hf replicas
    answered slower than one. A thread count the user set stays.
    """
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // max(1, replicas)))
    return {"CUDA_VISIBLE_DEVICES": ",".join(gpus), "OMP_NUM_THREADS": threads}


def replicated_chunk_size(batch_size: int, inner_chunk_sizes: list[int | None], replicas: int) -> int:
    """Requests per generate call for `replicas` engines that each want `inner_chunk_sizes` (None: a batch)."""
    per_replica = max([int(batch_size)] + [int(c) for c in inner_chunk_sizes if c])
    return per_replica * int(replicas)


def shard(items: list, n: int) -> list[list]:
    """n contiguous, balanced slices (sizes differ by at most one)."""
    base, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        size = base + (1 if i < extra else 0)
        out.append(items[start : start + size])
        start += size
    return out


class ReplicatedEngine(EngineBase):
    """`load` is the engine factory (egm.infer.engine.load_engine), handed in rather than imported:
    the factory builds this class, so importing it here would close a cycle. A module-level
    function, it reaches the spawned workers by name."""

    def __init__(self, load: Callable[..., Engine], backend: str, model_dir: str, sampling: SamplingOptions,
                 options: dict, gpu_groups: list[list[str]]):
        if not gpu_groups:
            raise ValueError("no GPU groups to put replicas on")
        self.name = backend
        self.gpu_groups = gpu_groups
        self.data_parallel_size = len(gpu_groups)
        ctx = mp.get_context("spawn")  # never fork a process that may already hold CUDA state
        self._conns, self._procs = [], []
        for gpus in gpu_groups:
            parent, child = ctx.Pipe()
            # Not daemonic: vLLM starts its own engine process, which a daemonic process may not.
            # A worker still ends with its parent: its pipe closes and recv() raises.
            proc = ctx.Process(target=_worker,
                               args=(child, load, backend, str(model_dir), sampling, dict(options), list(gpus)),
                               daemon=False)
            with temporary_environment(replica_environment(gpus, len(gpu_groups))):
                proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        try:
            inner = [self._receive(i, conn, expect="ready") for i, conn in enumerate(self._conns)]
        except BaseException:
            self.close()
            raise
        self.chunk_size = replicated_chunk_size(int(options.get("batch_size", 1)), inner, len(gpu_groups))
        log.info("%s: %d replicas on GPU groups %s", backend, len(gpu_groups), gpu_groups)

    def _receive(self, i: int, conn, expect: str):
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError) as err:
            code = self._procs[i].exitcode
            raise RuntimeError(f"replica {i} (GPUs {self.gpu_groups[i]}) died (exit code {code})") from err
        if kind == "error":
            raise RuntimeError(f"replica {i} (GPUs {self.gpu_groups[i]}) failed:\n{payload}")
        if kind != expect:
            raise RuntimeError(f"replica {i}: expected {expect}, got {kind}")
        return payload

    def generate(self, requests: list[Request]) -> list[Completion]:
        shards = shard(list(requests), len(self._conns))
        busy = []
        for i, (conn, part) in enumerate(zip(self._conns, shards)):
            if part:
                conn.send(part)
                busy.append(i)
        results: list[Completion] = []
        for i in busy:
            results.extend(self._receive(i, self._conns[i], expect="ok"))
        return results

    def close(self) -> None:
        for conn in self._conns:
            try:
                conn.send(None)
            except (OSError, ValueError):
                pass
        for proc in self._procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=10)
        for conn in self._conns:
            conn.close()
        self._conns, self._procs = [], []
