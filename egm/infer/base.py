"""The engine interface every inference backend implements, apart from the factory that picks one.

A backend turns a batch of (image, prompt) requests into completions under the paper's request
format: one user turn, no system prompt, the image first and then the text. Engines import this
module; `egm.infer.engine.load_engine` imports the engines.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from egm.options import SamplingOptions


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


def request_max_tokens(request: Request, sampling: SamplingOptions) -> int:
    """The new-token cap of one request: its own, else the engine's."""
    return int(sampling.max_tokens if request.max_tokens is None else request.max_tokens)


def engine_sampling(sampling: SamplingOptions, request: Request | None = None, *, max_tokens_key: str,
                    seed_key: str, keep_stop_key: str) -> dict:
    """The decoding settings as vLLM and SGLang both take them, under each one's names for the token
    cap, the seed and "keep the stop string in the text": top_k <= 0 is "off" (-1), the seed (if
    any) comes from `sampling.extra`; with a `request`, its own max_tokens and stop strings (kept
    in the text, so a caller can tell where it stopped)."""
    params = {
        max_tokens_key: int(sampling.max_tokens),
        "temperature": float(sampling.temperature),
        "top_p": float(sampling.top_p),
        "top_k": int(sampling.top_k) if sampling.top_k and sampling.top_k > 0 else -1,
        "repetition_penalty": float(sampling.repetition_penalty),
        "presence_penalty": float(sampling.presence_penalty),
    }
    if sampling.extra.get("seed") is not None:
        params[seed_key] = int(sampling.extra["seed"])
    if request is not None and request.max_tokens is not None:
        params[max_tokens_key] = int(request.max_tokens)
    if request is not None and request.stop:
        params.update({"stop": list(request.stop), keep_stop_key: True})
    return params


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
    # Optional capabilities, None where an engine lacks them (EngineBase has the defaults):
    # generate_each(requests, on_done, concurrency=None) answers requests one by one, calling
    # on_done(index, completion) as each arrives (the server client: callers keep `concurrency`
    # requests in flight over a whole split instead of batching);
    generate_each: Callable[..., None] | None
    # chunk_size: how many requests one generate() call should get to keep the engine busy
    # (replicas, vllm, sglang schedule more than one batch at a time);
    chunk_size: int | None
    # data_parallel_size: how many replicas answer (named in the latency result).
    data_parallel_size: int | None

    def generate(self, requests: list[Request]) -> list[Completion]:
        """Completions in the order of `requests`."""
        ...

    def close(self) -> None: ...


class EngineBase:
    """What every engine inherits: the optional capabilities, absent until an engine sets them."""

    name: str = ""
    generate_each: Callable[..., None] | None = None
    chunk_size: int | None = None
    # One engine is one replica; a server engine sets None when it cannot tell (an external server).
    data_parallel_size: int | None = 1

    def generate(self, requests: list[Request]) -> list[Completion]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class LazyEngine:
    """One engine for a whole job, loaded on first use and closed once.

    A job whose work is all cached (resumed) never loads the engine; one that answers several
    splits or budgets loads it once. `on_load` runs once right after loading (a warm-up).
    """

    def __init__(self, load: Callable[[], Engine], on_load: Callable[[Engine], None] | None = None):
        self._load = load
        self._on_load = on_load
        self._engine: Engine | None = None

    def __call__(self) -> Engine:
        if self._engine is None:
            self._engine = self._load()
            if self._on_load is not None:
                self._on_load(self._engine)
        return self._engine

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    def close(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()

    def __enter__(self) -> LazyEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class BackendUnavailable(RuntimeError):
    """The backend's engine cannot be imported here; the message names the container to use."""


# Where each serving engine is installed (one container per engine: their pins clash).
CONTAINERS = {"vllm": "containers/gpu-vllm.def", "sglang": "containers/gpu-sglang.def"}


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
