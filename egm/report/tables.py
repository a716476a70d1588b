"""Result tables: our per-split Acc@0.5 in the paper's layout, and a side-by-side with the paper.

Dataframes keep full precision (the CSV is for machines); only the Markdown rounds, to one
decimal like the paper.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

from egm.report import paper
from egm.report.common import (
    MISSING, ModelSummary, finite_mean, no_score_label, no_score_notes, order_splits, row_provenance, split_size_notes,
    summarise,
)
from egm.report.paper import AVG, SPLITS

EXTRA_COLUMNS = ("mean IoU", "tokens", "latency (ms)", "bad records", "unparseable")
COMPARISON_COLUMNS = (
    "model", "paper_model", "split", "source", "paper", "reproduced", "diff", "verdict",
)
EXPECTED_COLUMNS = ("model", "metric", "low", "high", "reproduced", "verdict")
AMODAL_NOTE = (
    "Amodal grounding (the paper's amodal tables): not run, the data is not public; only the "
    "prompt templates were released (egm.grounding.PROMPTS)."
)
NO_COUNTERPART_NOTE = (
    "No model in this run has a paper counterpart (every model's `paper` entry is null), "
    "so there is nothing to compare."
)


def refcoco_table(
    metrics: list[dict], models: dict, splits: list[str]
) -> pd.DataFrame:
    """Acc@0.5 (%) per model and split, the unweighted Avg, and run diagnostics.

    Columns: "model" (display name), the configured splits that any model has (paper order),
    "Avg" (over all configured splits; NaN if the model lacks any), then EXTRA_COLUMNS, whose
    means are unweighted over the splits the model has.
    """
    configured = order_splits(splits)
    summaries = summarise(metrics, models, configured)
    present = [s for s in configured if any(s in m.acc for m in summaries)]
    rows = []
    for m in summaries:
        row: dict[str, Any] = {"model": m.display}
        for split in present:
            row[split] = m.acc.get(split, math.nan)
        row[AVG] = m.average(configured)
        row["mean IoU"] = finite_mean(m.iou.values())
        row["tokens"] = finite_mean(m.tokens.values())
        row["latency (ms)"] = m.mean_latency_ms()
        row["bad records"] = m.bad_records
        row["unparseable"] = m.unparseable
        rows.append(row)
    columns = ["model", *present, AVG, *EXTRA_COLUMNS]
    df = pd.DataFrame(rows, columns=columns)
    float_columns = [*present, AVG, "mean IoU", "tokens", "latency (ms)"]
    df[float_columns] = df[float_columns].astype("float64")
    df[["bad records", "unparseable"]] = df[["bad records", "unparseable"]].astype("int64")
    # Notes ride with the frame so any caller of write_table gets them without extra arguments.
    df.attrs["notes"] = refcoco_notes(configured) + split_size_notes(metrics, configured) + no_score_notes(summaries)
    df.attrs["cell_labels"] = {
        (position, split): no_score_label(label)
        for position, m in enumerate(summaries)
        for split, (label, _) in m.no_score.items()
        if split in present
    }
    df.attrs["empty_note"] = "No metrics for any configured model and split."
    df.attrs["provenance"] = row_provenance(summaries)
    return df


def paper_comparison(
    metrics: list[dict], models: dict, splits: list[str], tolerance: float = 0.5,
    paper_version: str = paper.DEFAULT_VERSION,
) -> pd.DataFrame:
    """Long table of our Acc@0.5 (%) against the paper's (`paper_version`'s table), for models
    with a `paper` entry.

    Rows cover every split and the Avg the paper reports for that model, run or not. Our Avg
    here is over the paper's 8 splits, so it is missing unless all 8 were run: an Avg over
    fewer splits would not be the paper's quantity. Models the paper only plots get one Avg
    row against the approximate value read off the figure (source "figure (approx.)").
    """
    configured = order_splits(splits)
    summaries = {m.key: m for m in summarise(metrics, models, configured)}
    known = set(paper.paper_models(paper_version))
    rows = []
    labels: dict[tuple[int, str], str] = {}
    for key, spec in models.items():
        paper_model = (spec or {}).get("paper")
        if not paper_model:
            continue
        if paper_model not in known:
            raise ValueError(
                f"model {key!r} names paper model {paper_model!r}, which egm.report.paper "
                f"has no numbers for; known: {sorted(known)}"
            )
        summary = summaries.get(key)
        display = str(spec.get("display") or key)
        for split in (*SPLITS, AVG):
            reference = paper.paper_acc(paper_model, split, paper_version)
            if reference is None:
                continue
            paper_value, source = reference
            if summary is None:
                reproduced = math.nan
            elif split == AVG:
                reproduced = summary.average(SPLITS) if set(SPLITS) <= set(configured) else math.nan
            else:
                reproduced = summary.acc.get(split, math.nan) if split in configured else math.nan
            diff = reproduced - paper_value
            unscored = summary.no_score.get(split) if summary is not None else None
            if unscored:
                labels[(len(rows), "reproduced")] = no_score_label(unscored[0])
            rows.append(
                {
                    "model": display,
                    "paper_model": paper_model,
                    "split": split,
                    "source": source,
                    "paper": paper_value,
                    "reproduced": reproduced,
                    "diff": diff,
                    "verdict": no_score_label(unscored[0]) if unscored
                    else verdict(reproduced, paper_value - tolerance, paper_value + tolerance),
                }
            )
    df = pd.DataFrame(rows, columns=list(COMPARISON_COLUMNS))
    df.attrs["cell_labels"] = labels
    df[["paper", "reproduced", "diff"]] = df[["paper", "reproduced", "diff"]].astype("float64")
    compared = {spec.get("paper") for spec in models.values() if spec}
    table = paper.paper_table(paper_version)
    df.attrs["notes"] = comparison_notes(df, tolerance, [m for m in table.rows if m not in compared], table) + \
        no_score_notes(s for k, s in summaries.items() if (models.get(k) or {}).get("paper"))
    df.attrs["empty_note"] = NO_COUNTERPART_NOTE
    df.attrs["provenance"] = row_provenance(s for k, s in summaries.items() if (models.get(k) or {}).get("paper"))
    return df

# What `report.expected` may give a range for: label and how to read it off a summary.
EXPECTED_METRICS = {
    "acc": "Avg Acc@0.5 (%)",
    "parseable": "parseable answers (%)",
    "iou": "mean IoU (%)",
    "tokens": "mean tokens",
}
# A range on the difference to other evaluated models: {model key: [low, high]} (points).
RELATIVE_METRICS = {"acc_over": "Avg Acc@0.5 minus {other}'s (points)"}


def _expected_value(summary: ModelSummary, metric: str, splits: Sequence[str]) -> float:
    if metric == "acc":
        return summary.average(splits)
    if metric == "parseable":
        return summary.parseable()
    if metric == "iou":
        return finite_mean(summary.iou.values())
    return finite_mean(summary.tokens.values())


def verdict(value: float, low: float, high: float, inside: str = "match", outside: str = "differs") -> str:
    if math.isnan(value):
        return "not run"
    slack = 1e-9  # so a bound hit exactly is not lost to float error
    return inside if low - slack <= value <= high + slack else outside


def check_expected(expected: Mapping[str, Mapping[str, object]], models: Iterable[str]) -> None:
    """`report.expected` may only name evaluated models and known metrics: the workflow checks it
    before any job starts, and the table again (it can be called on its own)."""
    models = list(models)
    unknown = sorted(set(expected) - set(models))
    if unknown:
        raise ValueError(f"report.expected names model(s) {unknown}, which are not evaluated: {sorted(models)}")
    for key, ranges in expected.items():
        for metric, value in ranges.items():
            if metric in RELATIVE_METRICS:
                others = sorted(set(value) - set(models))
                if others:
                    raise ValueError(f"report.expected.{key}.{metric} compares with model(s) {others}, "
                                     f"which are not evaluated: {sorted(models)}")
            elif metric not in EXPECTED_METRICS:
                known = sorted([*EXPECTED_METRICS, *RELATIVE_METRICS])
                raise ValueError(f"report.expected.{key}: unknown metric {metric!r}; known: {known}")


def _display(models: Mapping, key: str) -> str:
    return str((models[key] or {}).get("display") or key)


def expected_comparison(
    metrics: list[dict], models: dict, splits: list[str], expected: Mapping[str, Mapping[str, object]]
) -> pd.DataFrame:
    """This run against ranges set in the config (`report.expected`: model key -> metric ->
    [low, high], or acc_over -> {other model key: [low, high]} for the Avg Acc@0.5 difference),
    for runs the paper has no numbers for, such as the demo."""
    check_expected(expected, models)
    configured = order_splits(splits)
    summaries = {m.key: m for m in summarise(metrics, models, configured)}

    def value_of(key: str, metric: str) -> float:
        summary = summaries.get(key)
        return math.nan if summary is None else _expected_value(summary, metric, configured)

    rows = []
    for key in [k for k in models if k in expected]:  # rows in the config's model order
        checks = []
        for metric, spec in expected[key].items():
            if metric in RELATIVE_METRICS:
                checks += [(RELATIVE_METRICS[metric].format(other=_display(models, other)), bounds,
                            value_of(key, "acc") - value_of(other, "acc")) for other, bounds in spec.items()]
            else:
                checks.append((EXPECTED_METRICS[metric], spec, value_of(key, metric)))
        for label, (low, high), value in checks:
            rows.append({
                "model": _display(models, key),
                "metric": label,
                "low": float(low),
                "high": float(high),
                "reproduced": value,
                "verdict": verdict(value, float(low), float(high), "within", "outside"),
            })
    df = pd.DataFrame(rows, columns=list(EXPECTED_COLUMNS))
    df[["low", "high", "reproduced"]] = df[["low", "high", "reproduced"]].astype("float64")
    counts = df["verdict"].value_counts()
    df.attrs["lead"] = expected_verdict(df)
    df.attrs["notes"] = [
        "Expected ranges come from the config (`report.expected`): what a working pipeline gives on "
        "this data and budget. They are not the paper's numbers (refcoco_vs_paper compares with those).",
        f"{int(counts.get('within', 0))} of {len(df)} value(s) within range; "
        f"{int(counts.get('not run', 0))} not run.",
        "Avg Acc@0.5 is over the configured splits; parseable: share of scored answers with a box the "
        "paper's parser reads.",
    ]
    df.attrs["empty_note"] = "No expected ranges configured."
    df.attrs["provenance"] = row_provenance(s for k, s in summaries.items() if k in expected)
    return df


def expected_verdict(df: pd.DataFrame) -> str:
    """One line for the top of the table (and the end of `make demo`): all within, or which are not."""
    if df.empty:
        return ""
    off = df[df["verdict"] != "within"]
    if off.empty:
        return f"Verdict: all {len(df)} value(s) within their expected ranges."
    listed = "; ".join(
        f"{row.model}, {row.metric}: {'not run' if math.isnan(row.reproduced) else f'{row.reproduced:.1f}'}"
        f" (expected {row.low:g} to {row.high:g})" for row in off.itertuples())
    return f"Verdict: {len(off)} of {len(df)} value(s) outside their expected ranges: {listed}."


def refcoco_notes(splits: Sequence[str]) -> list[str]:
    configured = order_splits(splits)
    notes = [
        "Acc@0.5 (%): share of the split's samples (every line of its file, as the authors count "
        "them) whose predicted box has IoU > 0.5 with the ground truth; unparseable answers and "
        "bad records (invalid data, listed by file:line in the metrics) count as misses.",
        f"Avg: unweighted mean over the {len(configured)} configured split(s); "
        f"{MISSING} if the model lacks a score on any of them.",
        "mean IoU (%), tokens (mean completion tokens) and latency (ms, mean per sample, "
        "measured on this run's hardware): unweighted means over the splits the model has.",
        "bad records, unparseable: summed over splits.",
    ]
    if configured != list(SPLITS):
        notes.append(
            "The configured splits differ from the paper's 8, so Avg is not comparable with "
            "the paper's Avg."
        )
    return notes


def comparison_notes(df: pd.DataFrame, tolerance: float, not_configured: Sequence[str] = (),
                     table: paper.PaperTable | None = None) -> list[str]:
    """What the comparison shows, and plainly what it could not: paper rows with no model in
    this config, cells without a number, and the amodal tables (data not public)."""
    table = table or paper.paper_table()
    notes = [f"Paper values ({table.key}): {table.source}; Acc@0.5, %. The other published version: "
             f"{', '.join(v for v in paper.VERSIONS if v != table.key)} (report.paper_version)."]
    off = paper.PRINTED_AVG_OFF.get(table.key)
    if off:
        notes.append(f"In this version the printed Avg of {', '.join(off)} is not the mean of its 8 splits; "
                     "we compare with the printed value.")
    if not df.empty:
        counts = df["verdict"].value_counts()
        compared = int(counts.get("match", 0) + counts.get("differs", 0))
        notes += [
            f"diff = reproduced − paper, in points; match: |diff| ≤ {tolerance:g} (our unrounded "
            "value against the paper's one-decimal value); not run: we have no number for it.",
            "Our Avg is over the paper's 8 splits and is missing unless all 8 were run.",
            f"{int(counts.get('match', 0))} of {compared} compared value(s) match; "
            f"{int(counts.get('not run', 0))} not run.",
        ]
        if (df["source"] != "table").any():
            notes.append(
                "Rows with source 'figure (approx.)' compare against an Avg read off the paper's "
                "accuracy/latency plot, so they are approximate."
            )
    if not_configured:
        notes.append(
            "Not run (no model of this config stands for them; the paper's models need GPUs, "
            "config/config.yaml lists them): " + ", ".join(not_configured) + "."
        )
    notes.append(AMODAL_NOTE)
    return notes
