"""The `--options` JSON of the commands: assembled from the config, and parsed into typed dataclasses.

The rules resolve every option from the config (workflow/rules/common.smk, through the
`*_job_options` functions here, which benchmarks/multigpu.py calls too) and pass it as one
JSON object; here it becomes a dataclass, so a key the code does not know (a typo, a config key
passed to the wrong command) fails the job before anything loads, naming the key, instead of
being ignored. The raw object stays the job's provenance record (what the rule passed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any


class OptionsError(ValueError):
    """The options object has a key the command does not know, or lacks one it needs."""


def json_arg(text: str) -> Any:
    """argparse type of a JSON argument."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err}") from err


T = typing.TypeVar("T")


def parse_options(cls: type[T], data: Any, where: str = "--options") -> T:
    """`data` as a `cls`: unknown keys refused, missing required keys named, nested dataclasses parsed."""
    if not isinstance(data, dict):
        raise OptionsError(f"{where}: expected a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise OptionsError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(fields)}")
    missing = [name for name, f in fields.items() if name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise OptionsError(f"{where}: missing key(s) {', '.join(map(repr, missing))}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        hint = hints[name]
        values[name] = parse_options(hint, value, f"{where}.{name}") if dataclasses.is_dataclass(hint) else value
    return cls(**values)


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


@dataclass(frozen=True)
class TrainOptions:
    """A training stage's `--options` (workflow/rules/common.smk's train_options). Checked here so
    a key the stage does not read fails the job before the model loads; the stage itself keeps the
    raw object, which is its resume fingerprint and its manifest's record."""

    recipe: dict  # resolved; its keys are checked by egm.train.recipes
    run: str | None = None
    max_steps: int | None = None  # None: the recipe's epochs
    limit: int | None = None  # rows (SFT) or prompts (RL); None: all


@dataclass(frozen=True)
class InferenceOptions:
    """The config's `inference:` section: the paper's decoding settings and predict's batching."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    presence_penalty: float
    # Predict's own keys: the latency and scaling rules leave them out (they batch by their own
    # settings), so that changing them does not rerun those jobs.
    batch_size: int | None = None
    limit: int | None = None

    def sampling(self) -> SamplingOptions:
        return SamplingOptions(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                               top_k=self.top_k, repetition_penalty=self.repetition_penalty,
                               presence_penalty=self.presence_penalty)


@dataclass(frozen=True, kw_only=True)
class EngineJobOptions:
    """What every job that loads an engine is given: the model's prompt, backend and GPUs."""

    prompt: str
    backend: str
    inference: InferenceOptions
    engine_options: dict = field(default_factory=dict)
    gpus: int = 0


@dataclass(frozen=True, kw_only=True)
class PredictOptions(EngineJobOptions):
    def __post_init__(self):
        if self.inference.batch_size is None:
            raise OptionsError("--options.inference: missing key 'batch_size' (predict batches by it)")


@dataclass(frozen=True)
class LatencySettings:
    """The config's `latency:` protocol (the rule resolves its backend, engine options and GPUs)."""

    n: int
    seed: int
    concurrency: int
    batch1_n: int
    warmup: int
    split: str | None = None  # named for the reader: the rule passes the split's file itself


@dataclass(frozen=True, kw_only=True)
class LatencyOptions(EngineJobOptions):
    latency: LatencySettings


@dataclass(frozen=True)
class ScalingSettings:
    budgets: list
    answer_max_tokens: int
    n_per_split: int | None
    seed: int
    batch_size: int | None = None  # None: inference.batch_size


@dataclass(frozen=True, kw_only=True)
class ScalingOptions(EngineJobOptions):
    scaling: ScalingSettings


# Assembly: what the rules (workflow/rules/common.smk) and benchmarks/multigpu.py pass as --options.


def predict_job_options(entry: dict, inference: dict) -> dict:
    """Predict's options for a model's config entry (prompt, backend, engine_options, gpus) under
    the config's `inference:` section."""
    return {
        "prompt": entry["prompt"],
        "backend": entry["backend"],
        "engine_options": entry["engine_options"],
        "inference": inference,
        "gpus": entry["gpus"],
    }


def train_job_options(run: str, spec: dict, recipe: dict) -> dict:
    """A training stage's options: the recipe's content, resolved by the caller with its overrides
    (egm.train.recipes.resolve_recipe; the content, not the path, so a changed value reruns the
    stage and an edited comment does not), the stage's step and row limits, the run name."""
    return {"run": run, "recipe": recipe, "max_steps": spec["max_steps"], "limit": spec["limit"]}
