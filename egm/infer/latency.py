"""The paper's latency protocol for one model: results/latency/{model}.json.

A fixed, seeded sample of one eval split is answered twice with the model's configured backend:

1. the protocol run: `concurrency` requests in flight (64 in the paper; with the server backend
   the server spreads them over its data-parallel replicas, one per GPU), each request's latency
   measured from sending it to its full answer (queueing included);
2. batch 1: one request at a time, the latency a single user sees.

A few requests are sent first and not counted (warm-up: compilation, graph capture, caches).
The summary per run: mean, p50, p90, p99 (ms), mean completion tokens, tokens/s (all completion
tokens over the run's wall time) and requests/s; the device is named. The trade-off figure takes
its latency from here when the file exists.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from egm.infer.base import Completion, Engine, Request

if TYPE_CHECKING:
    from egm.options import LatencyOptions

log = logging.getLogger(__name__)


def sample_records(records: Sequence, n: int, seed: int) -> list:
    """`n` records drawn without replacement by a seeded RNG, in split order (all if fewer)."""
    if n >= len(records):
        return list(records)
    chosen = set(random.Random(seed).sample(range(len(records)), n))
    return [rec for i, rec in enumerate(records) if i in chosen]


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(latencies_s: Sequence[float], tokens: Sequence[int], wall_s: float) -> dict:
    ms = [1000.0 * v for v in latencies_s]
    n = len(ms)
    total_tokens = int(sum(tokens))
    return {
        "n": n,
        "mean_ms": math.fsum(ms) / n if n else math.nan,
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "min_ms": min(ms) if ms else math.nan,
        "max_ms": max(ms) if ms else math.nan,
        "mean_completion_tokens": total_tokens / n if n else math.nan,
        "wall_s": wall_s,
        "tokens_per_s": total_tokens / wall_s if wall_s > 0 else math.nan,
        "requests_per_s": n / wall_s if wall_s > 0 else math.nan,
    }


def answer_all(engine: Engine, requests: list[Request], concurrency: int) -> tuple[list[Completion], float]:
    """All answers with `concurrency` requests in flight; (completions in request order, wall s).

    Engines that answer one by one (server) get the whole list with that concurrency; batch
    engines get chunks of `concurrency` requests (one batch at a time, or one per replica).
    """
    out: list[Completion | None] = [None] * len(requests)
    t0 = time.perf_counter()
    if engine.generate_each is not None:

        def keep(index: int, completion: Completion) -> None:
            out[index] = completion

        engine.generate_each(requests, keep, concurrency=concurrency)
    else:
        for start in range(0, len(requests), concurrency):
            chunk = requests[start : start + concurrency]
            out[start : start + len(chunk)] = engine.generate(chunk)
    wall = time.perf_counter() - t0
    missing = [r.id for r, c in zip(requests, out) if c is None]
    if missing:
        raise RuntimeError(f"no answer for {len(missing)} request(s), e.g. {missing[:3]}")
    return out, wall  # type: ignore[return-value]


def _run_record(requests: list[Request], completions: list[Completion], wall: float, concurrency: int) -> dict:
    return {
        "concurrency": concurrency,
        "summary": summarize([c.latency_s for c in completions], [c.completion_tokens for c in completions], wall),
        "requests": [
            {"id": r.id, "latency_s": c.latency_s, "completion_tokens": c.completion_tokens}
            for r, c in zip(requests, completions)
        ],
    }


def measure_latency(engine: Engine, requests: list[Request], concurrency: int, batch1_n: int, warmup: int) -> dict:
    """Warm-up, the protocol run over all requests, then batch 1 over the first `batch1_n`."""
    if warmup:
        log.info("warm-up: %d requests", min(warmup, len(requests)))
        answer_all(engine, requests[:warmup], concurrency)
    log.info("protocol run: %d requests, %d in flight", len(requests), concurrency)
    completions, wall = answer_all(engine, requests, concurrency)
    result = {"protocol": _run_record(requests, completions, wall, concurrency)}
    single = requests[:batch1_n]
    if single:
        log.info("batch 1: %d requests, one at a time", len(single))
        completions, wall = answer_all(engine, single, 1)
        result["batch1"] = _run_record(single, completions, wall, 1)
    return result


def run_latency(model: str, model_dir: str, split_path: str, image_root: str, options: LatencyOptions,
                provenance: dict) -> dict:
    """The latency job: sample the split, load the engine, measure, close it; the result file's content.

    The protocol's concurrency is also the batch size (and, for the server backend, the client's
    concurrency) unless the engine options set their own.
    """
    from egm.data.splits import load_split
    from egm.grounding import build_prompt
    from egm.infer.base import LazyEngine
    from egm.infer.engine import engine_loader

    settings, sampling = options.latency, options.inference.sampling()
    split = load_split(Path(split_path), image_root)
    records = sample_records(split.records, settings.n, settings.seed)
    requests = [Request(r.id, r.image_path, build_prompt(options.prompt, r.sent)) for r in records]
    concurrency = settings.concurrency
    engine_options = {"batch_size": concurrency, **options.engine_options}
    if options.backend == "server":
        engine_options.setdefault("concurrency", concurrency)
    log.info("latency of %s (%s): %d requests of %s", model_dir, options.backend, len(requests), split_path)
    with LazyEngine(engine_loader(options.backend, model_dir, sampling, engine_options)) as engine:
        result = measure_latency(engine(), requests, concurrency, settings.batch1_n, settings.warmup)
        data_parallel = engine().data_parallel_size
    summary = result["protocol"]["summary"]
    log.info("protocol: mean %.1f ms, p90 %.1f ms, %.1f tokens/s", summary["mean_ms"], summary["p90_ms"],
             summary["tokens_per_s"])
    return {
        "model": model,
        "model_dir": model_dir,
        "backend": options.backend,
        "engine_options": options.engine_options,
        "data_parallel_size": data_parallel,
        "device": provenance["job"]["device"],
        "split": Path(split_path).name.removesuffix(".jsonl"),
        "sample": {"n": len(requests), "seed": settings.seed, "bad_records_in_split": len(split.bad)},
        "max_tokens": sampling.max_tokens,
        "mean_latency_ms": summary["mean_ms"],
        **result,
        "provenance": provenance,
    }
