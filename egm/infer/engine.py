"""The one engine interface every inference backend implements.

A backend turns a batch of (image, prompt) requests into completions under the paper's request
format: one user turn, no system prompt, the image first and then the text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Request:
    id: str
    image_path: str
    prompt: str
    # Text the assistant turn starts with, after the chat template's generation prompt (which
    # for the Thinking models ends with `<think>\n`); the engine continues it. Budget forcing
    # (egm.infer.budget) sends the reasoning so far and the forced `</think>` here.
    assistant_prefix: str = ""
    # This request's cap on new tokens; None: the engine's SamplingOptions.max_tokens.
    max_tokens: int | None = None
    # Stop strings: generation ends after the first one produced, which stays at the end of the
    # text (so a caller can tell it stopped there). The hf backends need single-token strings.
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Completion:
    text: str
    completion_tokens: int
    # Wall time from submitting the request until its full answer was back (queueing included).
    latency_s: float


@dataclass(frozen=True)
class SamplingOptions:
    """The paper's decoding settings (greedy when temperature is 0)."""

    max_tokens: int = 4096
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 20
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    extra: dict = field(default_factory=dict)


def request_max_tokens(request: Request, sampling: SamplingOptions) -> int:
    """The new-token cap of one request: its own, else the engine's."""
    return int(sampling.max_tokens if request.max_tokens is None else request.max_tokens)


def batches_by_settings(requests: list[Request], size: int) -> list[list[int]]:
    """Indices of `requests` in batches of at most `size` consecutive requests that share their
    max_tokens and stop strings (a batched engine decodes a batch under one setting)."""
    out: list[list[int]] = []
    for i, req in enumerate(requests):
        key = (req.max_tokens, tuple(req.stop))
        last = out[-1] if out else None
        if last and len(last) < size and (requests[last[0]].max_tokens, tuple(requests[last[0]].stop)) == key:
            last.append(i)
        else:
            out.append([i])
    return out


class Engine(Protocol):
    name: str

    def generate(self, requests: list[Request]) -> list[Completion]:
        """Completions in the order of `requests`."""
        ...

    def close(self) -> None: ...


class BackendUnavailable(RuntimeError):
    """The backend's engine cannot be imported here; the message names the container to use."""


# Where each serving engine is installed (one container per engine: their pins clash).
CONTAINERS = {"vllm": "containers/gpu-vllm.def", "sglang": "containers/gpu-sglang.def"}
BACKENDS = ("hf", "vllm", "sglang", "server")


def require_module(module: str, what: str, container: str | None) -> None:
    """Raise BackendUnavailable, naming the container to use, if `module` cannot be imported."""
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        where = (
            f"run this rule in the image built from {container} (snakemake --use-apptainer, or "
            f"apptainer exec --nv <image> python -m egm ...)"
            if container
            else "install it (pip install 'transformers[serving]')"
        )
        raise BackendUnavailable(f"{what} needs the Python package {module!r}, which is not importable here; {where}")


def load_engine(backend: str, model_dir: str, sampling: SamplingOptions, options: dict | None = None) -> Engine:
    """An engine for `backend` (hf, vllm, sglang, server) with the model's engine_options.

    `data_parallel_size` ("auto" by default: every GPU the job was given) sets how many engine
    replicas serve the requests: hf and vllm run one replica per GPU group in worker processes;
    sglang and the servers use their own data parallelism.
    """
    options = dict(options or {})
    if backend == "hf":
        from egm.infer.hf import HFEngine

        replicas = _replicas(backend, model_dir, sampling, options)
        if replicas:
            return replicas
        if options.pop("decode", "generate") == "graph":
            from egm.infer.fast import FastHFEngine

            return FastHFEngine(model_dir, sampling, **options)
        return HFEngine(model_dir, sampling, **options)
    if backend == "vllm":
        replicas = _replicas(backend, model_dir, sampling, options)
        if replicas:
            return replicas
        from egm.infer.vllm import VLLMEngine

        return VLLMEngine(model_dir, sampling, **options)
    if backend == "sglang":
        from egm.infer.sglang import SGLangEngine

        return SGLangEngine(model_dir, sampling, **options)
    if backend == "server":
        from egm.infer.server import ServerEngine

        return ServerEngine(model_dir, sampling, **options)
    raise BackendUnavailable(f"unknown inference backend {backend!r}; known: {', '.join(BACKENDS)}")


def _replicas(backend: str, model_dir: str, sampling: SamplingOptions, options: dict):
    """A ReplicatedEngine when more than one GPU group is available, else None (options trimmed)."""
    from egm.infer.gpus import groups, resolve_data_parallel, visible_gpus

    dp = options.pop("data_parallel_size", "auto")
    tp = int(options.get("tensor_parallel_size", 1)) if backend == "vllm" else 1
    gpus = visible_gpus()
    n = resolve_data_parallel(dp, tp, gpus)
    if n <= 1:
        return None
    gpu_groups = groups(gpus, tp)[:n]
    if len(gpu_groups) < n:
        raise ValueError(f"data_parallel_size {n} x tensor_parallel_size {tp} needs {n * tp} GPUs; visible: {gpus}")
    from egm.infer.replicas import ReplicatedEngine

    return ReplicatedEngine(backend, model_dir, sampling, options, gpu_groups)
