"""The factory of inference engines: `load_engine` picks the backend and its replicas.

The interface the engines implement (requests, completions, the Engine protocol) lives in
egm.infer.base, which every engine imports; this module imports the engines, lazily.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from egm.infer.base import BackendUnavailable, Engine
from egm.options import SamplingOptions

log = logging.getLogger(__name__)

BACKENDS = ("hf", "vllm", "sglang", "server")


def load_engine(backend: str, model_dir: str, sampling: SamplingOptions, options: dict | None = None) -> Engine:
    """An engine for `backend` (hf, vllm, sglang, server) with the model's engine_options.

    `data_parallel_size` ("auto" by default: every GPU the job was given) sets how many engine
    replicas serve the requests: hf and vllm run one replica per GPU group in worker processes;
    sglang and the servers use their own data parallelism.
    """
    options = dict(options or {})
    if backend == "hf":
        from egm.infer.backends.hf import HFEngine

        replicas = _replicas(backend, model_dir, sampling, options)
        if replicas:
            return replicas
        if options.pop("decode", "generate") == "graph":
            from egm.infer.fast.engine import FastHFEngine

            return FastHFEngine(model_dir, sampling, **options)
        return HFEngine(model_dir, sampling, **options)
    if backend == "vllm":
        replicas = _replicas(backend, model_dir, sampling, options)
        if replicas:
            return replicas
        from egm.infer.backends.vllm import VLLMEngine

        return VLLMEngine(model_dir, sampling, **options)
    if backend == "sglang":
        from egm.infer.backends.sglang import SGLangEngine

        return SGLangEngine(model_dir, sampling, **options)
    if backend == "server":
        from egm.infer.backends.server import ServerEngine

        return ServerEngine(model_dir, sampling, **options)
    raise BackendUnavailable(f"unknown inference backend {backend!r}; known: {', '.join(BACKENDS)}")


def engine_loader(backend: str, model_dir: str, sampling: SamplingOptions, options: dict | None = None
                  ) -> Callable[[], Engine]:
    """A function that loads the engine when called (for LazyEngine: only once work is pending)."""

    def load() -> Engine:
        log.info("loading %s with backend %s", model_dir, backend)
        return load_engine(backend, model_dir, sampling, options)

    return load


def _replicas(backend: str, model_dir: str, sampling: SamplingOptions, options: dict):
    """A ReplicatedEngine when more than one GPU group is available, else None (options trimmed)."""
    from egm.infer.backends.gpus import groups, resolve_data_parallel, visible_gpus

    dp = options.pop("data_parallel_size", "auto")
    tp = int(options.get("tensor_parallel_size", 1)) if backend == "vllm" else 1
    gpus = visible_gpus()
    n = resolve_data_parallel(dp, tp, gpus)
    if n <= 1:
        return None
    gpu_groups = groups(gpus, tp)[:n]
    if len(gpu_groups) < n:
        raise ValueError(f"data_parallel_size {n} x tensor_parallel_size {tp} needs {n * tp} GPUs; visible: {gpus}")
    from egm.infer.backends.replicas import ReplicatedEngine

    return ReplicatedEngine(load_engine, backend, model_dir, sampling, options, gpu_groups)
