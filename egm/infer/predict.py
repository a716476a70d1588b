"""Run one model over eval splits and write one prediction JSONL per split.

Resumable: finished records are appended (and fsynced) to a work file under
`<out_dir>/.work/`, keyed by everything that determines an answer (model files, prompt,
decoding options). A rerun after a kill skips them; the final per-split file is written
atomically, in the split's line order, only once the split is complete. Because the work file
outlives the final file, Snakemake deleting outputs before a rerun (for example when a split is
added) costs no inference for splits already answered under the same settings. A cached answer
is reused only for the record it answered (same id, image, expression, box and size on that
line), so a split file fixed in place is answered again where its records changed.

The first chunk a job answers is answered once more before it is timed (`warm_up`), so no
record's latency carries the engine's compile, capture or first-call cost; the summary reports
that warm-up apart (`warmup_s`).

A split with no valid record costs only itself: its prediction file holds its bad records (or
nothing), its metrics say why it has no score, and the other splits are answered as usual.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from egm.data.splits import SplitData, read_split
from egm.grounding import build_prompt
from egm.infer.base import Engine, LazyEngine, Request
from egm.io import atomic_write
from egm.metrics import evaluate_answer

if TYPE_CHECKING:
    from egm.options import PredictOptions

log = logging.getLogger(__name__)


def cache_key(*parts: object) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def read_work_file(path: Path) -> dict[int, dict]:
    """Records already answered, by line. A torn last line (killed mid-write) is cut off."""
    done: dict[int, dict] = {}
    if not path.exists():
        return done
    good_bytes = 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.endswith(b"\n"):
                log.warning("%s: dropping torn last line %d (interrupted write)", path, number)
                break
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: corrupt work record ({err}); delete the file to redo it") from err
            done[record["line"]] = record
            good_bytes += len(raw)
    if good_bytes != path.stat().st_size:
        with open(path, "r+b") as handle:
            handle.truncate(good_bytes)
    return done


def record_base(split_name: str, rec) -> dict:
    """The fields of a prediction row that name its record (predict and the scaling sweep share them)."""
    return {
        "split": split_name,
        "line": rec.line,
        "id": rec.id,
        "image": rec.image,
        "sent": rec.sent,
        "bbox": rec.bbox,
        "width": rec.width,
        "height": rec.height,
    }


def requests_for(records: list, prompt_template: str) -> tuple[list[str], list[Request]]:
    """Each record's prompt and its request (the image, then the prompt)."""
    prompts = [build_prompt(prompt_template, rec.sent) for rec in records]
    return prompts, [Request(rec.id, rec.image_path, p) for rec, p in zip(records, prompts)]


def warm_up(engine: Engine, pending: list, prompt_template: str, batch_size: int) -> float:
    """Answer the job's first chunk once, untimed and thrown away; returns its wall time.

    What an engine does on its first requests (vLLM's and the fast decode's compile and capture
    for new shapes, a server's first batches, lazy CUDA set-up) would otherwise land in the first
    batch's per-record latency: a latency column must not include it (the paper's servers were
    warm before their first timed request).
    """
    # One batch per replica (each compiles for itself); a server warms up with one round of its
    # requests in flight.
    replicas = 1 if engine.generate_each is not None else int(engine.data_parallel_size or 1)
    _, requests = requests_for(pending[: batch_size * replicas], prompt_template)
    started = time.perf_counter()
    if engine.generate_each is not None:
        engine.generate_each(requests, lambda i, c: None)
    else:
        engine.generate(requests)
    took = time.perf_counter() - started
    log.info("warm-up: %d request(s) answered once, untimed, in %.1f s", len(requests), took)
    return took


def predict_split(
    split: SplitData,
    split_name: str,
    out_path: Path,
    work_path: Path,
    get_engine: Callable[[], Engine],
    prompt_template: str,
    batch_size: int,
) -> dict:
    done = read_work_file(work_path)
    for rec in split.records:
        cached = done.get(rec.line)
        if cached is not None and any(cached.get(k) != v for k, v in record_base(split_name, rec).items()):
            log.info("%s line %d: the record changed since it was answered; answering it again", split_name, rec.line)
            del done[rec.line]
    pending = [rec for rec in split.records if rec.line not in done]
    total = len(split.records)
    newly_answered = len(pending)
    log.info("%s: %d records, %d already answered, %d bad records", split_name, total, len(done), len(split.bad))
    # What answering cost, apart from loading the engine (the first split that answers loads it):
    # records per second across GPU counts and engines are compared on these.
    load_s = answer_s = warmup_s = 0.0
    if pending:
        first_load = not getattr(get_engine, "loaded", True)
        started = time.perf_counter()
        engine = get_engine()
        load_s = time.perf_counter() - started
        if first_load:
            warmup_s = warm_up(engine, pending, prompt_template, batch_size)
        answering = time.perf_counter()
        work_path.parent.mkdir(parents=True, exist_ok=True)
        with open(work_path, "a", encoding="utf-8") as work:

            def keep(rec, prompt, completion) -> None:
                row = record_base(split_name, rec)
                row.update(status="ok", error=None, prompt=prompt, answer=completion.text)
                row.update(evaluate_answer(completion.text, rec.bbox, rec.width, rec.height))
                row.update(completion_tokens=completion.completion_tokens, latency_s=completion.latency_s)
                work.write(json.dumps(row, ensure_ascii=False) + "\n")
                done[rec.line] = row

            if engine.generate_each is not None:
                # Engines that answer requests one by one (the server client) get the whole split
                # at once, so `concurrency` requests stay in flight throughout; each answer is
                # written as it arrives, so a failure mid-split keeps everything finished before it.
                prompts, requests = requests_for(pending, prompt_template)
                try:
                    engine.generate_each(requests, lambda i, c: (keep(pending[i], prompts[i], c), work.flush()))
                finally:
                    work.flush()
                    os.fsync(work.fileno())
                    log.info("%s: %d/%d answered", split_name, sum(1 for r in split.records if r.line in done), total)
                pending = []
            # Batch engines get chunks: a batch, or more where the engine asks for it (replicas).
            chunk = max(batch_size, int(engine.chunk_size or batch_size))
            for start in range(0, len(pending), chunk):
                batch = pending[start : start + chunk]
                prompts, requests = requests_for(batch, prompt_template)
                completions = engine.generate(requests)
                for rec, prompt, completion in zip(batch, prompts, completions):
                    keep(rec, prompt, completion)
                work.flush()
                os.fsync(work.fileno())
                log.info("%s: %d/%d answered", split_name, sum(1 for r in split.records if r.line in done), total)
        answer_s = time.perf_counter() - answering

    rows = [done[rec.line] for rec in split.records]
    # Bad records stay in the file, each a miss in the split's score (every line is a sample).
    rows += [{"split": split_name, "line": bad.line, "where": f"{split.path}:{bad.line}", "status": "bad_record",
              "error": bad.reason} for bad in split.bad]
    rows.sort(key=lambda row: row["line"])
    with atomic_write(out_path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {"split": split_name, "records": total, "bad_records": len(split.bad), "newly_answered": newly_answered,
            "problem": split.problem, "engine_load_s": round(load_s, 3), "warmup_s": round(warmup_s, 3),
            "answer_s": round(answer_s, 3)}


def split_name_of(path: Path) -> str:
    return Path(path).name.removesuffix(".jsonl")


def predict_model(
    split_files: list[Path],
    out_dir: Path,
    image_root: str,
    get_engine: Callable[[], Engine],
    prompt_template: str,
    batch_size: int,
    key: str,
    limit: int | None = None,
) -> list[dict]:
    """All splits of one model with one engine load (made lazily: nothing pending, no load)."""
    summaries = []
    with LazyEngine(get_engine) as engine:
        for path in split_files:
            name = split_name_of(path)
            split = read_split(Path(path), image_root, limit=limit)
            for bad in split.bad:
                log.warning("%s:%d: bad record skipped: %s", path, bad.line, bad.reason)
            if split.problem:
                log.warning("%s: not answered, %s; its metrics will say so, the other splits go on", name, split.problem)
            summaries.append(
                predict_split(
                    split,
                    name,
                    Path(out_dir) / f"{name}.jsonl",
                    Path(out_dir) / ".work" / f"{name}.{key}.jsonl",
                    engine,
                    prompt_template,
                    batch_size,
                )
            )
    return summaries


def run_predict(model_dir: str, model_manifest: str, split_files: list[str], out_dir: str, image_root: str,
                options: PredictOptions) -> list[dict]:
    """The predict job: its resume key, then every split with at most one engine load."""
    from egm.infer.engine import engine_loader
    from egm.io import sha256_file

    inference = options.inference
    sampling = inference.sampling()
    key = cache_key(sha256_file(model_manifest), options.prompt, options.backend, sampling, inference.limit)
    load = engine_loader(options.backend, model_dir, sampling, {"batch_size": inference.batch_size, **options.engine_options})
    return predict_model([Path(p) for p in split_files], Path(out_dir), image_root, load, options.prompt,
                         inference.batch_size, key, limit=inference.limit)
