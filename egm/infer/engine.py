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


class Engine(Protocol):
    name: str

    def generate(self, requests: list[Request]) -> list[Completion]:
        """Completions in the order of `requests`."""
        ...

    def close(self) -> None: ...


class BackendUnavailable(RuntimeError):
    """The backend's engine cannot be imported here; the message names the container to use."""


def load_engine(backend: str, model_dir: str, sampling: SamplingOptions, options: dict | None = None) -> Engine:
    options = options or {}
    if backend == "hf":
        from egm.infer.hf import HFEngine

        return HFEngine(model_dir, sampling, **options)
    raise BackendUnavailable(f"unknown inference backend {backend!r}; available here: hf")
