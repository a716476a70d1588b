"""Latency per model, beside the paper's approximate latency for its counterpart.

A model's numbers come from its latency protocol run (results/latency/{model}.json, see
egm.infer.latency) when there is one, else from the mean over its predictions' per-sample
latency. The two are different measurements (the protocol keeps `concurrency` requests in
flight; predict runs the configured batches), so the table says which one each row is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from egm import provenance as prov
from egm.report import paper
from egm.report.common import as_number, finite_mean, order_splits, summarise, write_table

PROTOCOL = "latency protocol"
PREDICTIONS = "predictions"
NO_LATENCY = "none"
COLUMNS = (
    "model", "source", "latency (ms)", "p50 (ms)", "p90 (ms)", "batch-1 (ms)", "tokens", "tokens/s",
    "device", "backend", "paper latency (ms)",
)
FLOAT_COLUMNS = ("latency (ms)", "p50 (ms)", "p90 (ms)", "batch-1 (ms)", "tokens", "tokens/s", "paper latency (ms)")


def _summary(entry: Mapping[str, Any], run: str) -> Mapping[str, Any]:
    return ((entry.get(run) or {}).get("summary")) or {}


def _device(entry: Mapping[str, Any]) -> str | None:
    device = entry.get("device")
    if isinstance(device, Mapping):
        return device.get("name")
    return str(device) if device else None


def _paper_latency(spec: Mapping[str, Any]) -> float:
    point = paper.tradeoff_point(spec.get("paper") or "")
    return point.latency_ms if point else math.nan


def latency_table(
    metrics: Sequence[Mapping[str, Any]],
    models: Mapping[str, Mapping[str, Any]],
    splits: Sequence[str],
    latency: Sequence[Mapping[str, Any]] = (),
) -> pd.DataFrame:
    """One row per model with metrics on a configured split or a latency file, in the models order
    (models missing from the mapping after them, by key, so stale results stay visible)."""
    configured = order_splits(splits)
    summaries = {s.key: s for s in summarise(metrics, models, configured)}
    protocol: dict[str, Mapping[str, Any]] = {}
    for entry in latency:
        key = str(entry["model"])
        if key in protocol:
            raise ValueError(f"duplicate latency files for model {key!r}")
        protocol[key] = entry
    keys = list(models) + sorted((set(summaries) | set(protocol)) - set(models))

    rows = []
    traced: dict[str, dict[str, str]] = {}
    for key in keys:
        summary, measured = summaries.get(key), protocol.get(key)
        if summary is None and measured is None:
            continue
        spec = models.get(key) or {}
        row: dict[str, Any] = {c: math.nan for c in FLOAT_COLUMNS}
        row.update(model=str(spec.get("display") or key), device=None, backend=None,
                   **{"paper latency (ms)": _paper_latency(spec)})
        if measured is not None:
            run = _summary(measured, "protocol")
            # Tokens from the same run as the latency, so tokens and time describe one workload.
            row.update({
                "source": PROTOCOL,
                "latency (ms)": as_number(measured.get("mean_latency_ms", run.get("mean_ms"))),
                "p50 (ms)": as_number(run.get("p50_ms")),
                "p90 (ms)": as_number(run.get("p90_ms")),
                "batch-1 (ms)": as_number(_summary(measured, "batch1").get("mean_ms")),
                "tokens": as_number(run.get("mean_completion_tokens")),
                "tokens/s": as_number(run.get("tokens_per_s")),
                "device": _device(measured),
                "backend": measured.get("backend"),
            })
            traced[row["model"]] = prov.flatten(measured.get("provenance"), key)
        else:
            mean_ms = summary.mean_latency_ms()
            row.update({
                "source": NO_LATENCY if math.isnan(mean_ms) else PREDICTIONS,
                "latency (ms)": mean_ms,
                "tokens": finite_mean(summary.tokens.values()),
            })
            traced[row["model"]] = prov.merge(summary.provenance)
            row["device"] = traced[row["model"]]["device"] or None
        rows.append(row)
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df[list(FLOAT_COLUMNS)] = df[list(FLOAT_COLUMNS)].astype("float64")
    df.attrs["notes"] = latency_notes(protocol.values())
    df.attrs["empty_note"] = "No metrics or latency files for any configured model."
    df.attrs["provenance"] = traced
    return df


def _run_settings(entry: Mapping[str, Any]) -> str:
    n = as_number(_summary(entry, "protocol").get("n"))
    concurrency = (entry.get("protocol") or {}).get("concurrency", "?")
    requests = "?" if math.isnan(n) else int(n)
    return f"{requests} requests of {entry.get('split', '?')}, {concurrency} in flight"


def latency_notes(protocol: Iterable[Mapping[str, Any]]) -> list[str]:
    notes = [
        (f"source '{PROTOCOL}': the model's latency run (results/latency/); latency is the mean over its "
         "requests, each timed from sending to its full answer, queueing included; p50/p90 over the same "
         "requests; batch-1: mean with one request at a time; tokens: mean generated tokens per request; "
         "tokens/s: all generated tokens over the run's wall time (throughput, not one request's speed)."),
        (f"source '{PREDICTIONS}': mean per-sample latency and tokens of the evaluation predictions "
         "(unweighted over the model's splits), as batched for predict, on the device predict ran on; no percentiles."),
        ("paper latency (ms): the paper's approximate latency for the model's `paper` counterpart, read off "
         "its accuracy/latency figure; the paper does not state its hardware, so compare shapes, not values."),
    ]
    described = sorted({_run_settings(entry) for entry in protocol})
    if described:
        notes.append(f"Latency runs: {'; '.join(described)}.")
    return notes


def write_latency_table(
    metrics: Sequence[Mapping[str, Any]],
    models: Mapping[str, Mapping[str, Any]],
    splits: Sequence[str],
    latency: Sequence[Mapping[str, Any]],
    out_prefix: Path,
) -> pd.DataFrame:
    df = latency_table(metrics, models, splits, latency)
    write_table(df, out_prefix, title="Latency per model, this run and the paper (approximate)", signed_columns=())
    return df
