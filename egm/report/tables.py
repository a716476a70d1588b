"""Result tables: our per-split Acc@0.5 in the paper's layout, and a side-by-side with the paper.

Dataframes keep full precision (the CSV is for machines); only the Markdown rounds, to one
decimal like the paper.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from egm.io import atomic_write
from egm.report import paper
from egm.report.paper import AVG, SPLIT_LABELS, SPLITS

MISSING = "–"
EXTRA_COLUMNS = ("mean IoU", "tokens", "latency (ms)", "bad records", "unparseable")
COMPARISON_COLUMNS = (
    "model", "paper_model", "split", "source", "paper", "reproduced", "diff", "verdict",
)
NO_COUNTERPART_NOTE = (
    "No model in this run has a paper counterpart (every model's `paper` entry is null), "
    "so there is nothing to compare."
)


def _num(value: Any) -> float:
    """A finite float, or NaN for absent/null/non-numeric/non-finite values."""
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out if math.isfinite(out) else math.nan


def _mean(values: Iterable[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return math.fsum(finite) / len(finite) if finite else math.nan


def _count(value: Any) -> int:
    number = _num(value)
    return 0 if math.isnan(number) else int(number)


def order_splits(splits: Iterable[str]) -> list[str]:
    """Paper order first; splits the paper does not have keep their given order after them."""
    unique = list(dict.fromkeys(splits))
    known = [s for s in SPLITS if s in unique]
    return known + [s for s in unique if s not in SPLITS]


@dataclass
class ModelSummary:
    key: str
    display: str
    params_b: float
    acc: dict[str, float] = field(default_factory=dict)  # percent, configured splits only
    iou: dict[str, float] = field(default_factory=dict)  # percent
    tokens: dict[str, float] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    bad_records: int = 0
    unparseable: int = 0

    def average(self, splits: Sequence[str]) -> float:
        """Unweighted mean over `splits`, NaN unless every one of them has a score.

        A partial mean would look like a full one in the table, so it is not given.
        """
        values = [self.acc.get(s, math.nan) for s in splits]
        if not values or any(math.isnan(v) for v in values):
            return math.nan
        return math.fsum(values) / len(values)

    def mean_latency_ms(self) -> float:
        return _mean(self.latency_ms.values())


def _index(metrics: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], Mapping[str, Any]]:
    index: dict[tuple[str, str], Mapping[str, Any]] = {}
    for entry in metrics:
        key = (str(entry["model"]), str(entry["split"]))
        if key in index:
            # Two files for one cell would make every aggregate ambiguous.
            raise ValueError(f"duplicate metrics for model {key[0]!r}, split {key[1]!r}")
        index[key] = entry
    return index


def summarise(
    metrics: Iterable[Mapping[str, Any]],
    models: Mapping[str, Mapping[str, Any]],
    splits: Sequence[str],
) -> list[ModelSummary]:
    """One summary per model that has metrics on a configured split, in the models order.

    Metrics of models missing from the mapping are kept (after the configured ones, named by
    their key) rather than dropped, so a stale or misnamed result is visible in the report.
    """
    index = _index(metrics)
    configured = order_splits(splits)
    keys = list(models)
    keys += sorted({m for (m, _) in index} - set(keys))
    summaries = []
    for key in keys:
        entries = {s: index[(key, s)] for s in configured if (key, s) in index}
        if not entries:
            continue
        spec = models.get(key) or {}
        summary = ModelSummary(
            key=key,
            display=str(spec.get("display") or key),
            params_b=_num(spec.get("params_b")),
        )
        for split, entry in entries.items():
            summary.acc[split] = _num(entry.get("acc_at_0.5")) * 100.0
            summary.iou[split] = _num(entry.get("mean_iou")) * 100.0
            summary.tokens[split] = _num(entry.get("mean_completion_tokens"))
            summary.latency_ms[split] = _num(entry.get("mean_latency_s")) * 1000.0
            summary.bad_records += _count(entry.get("n_bad_records"))
            summary.unparseable += _count(entry.get("n_unparseable"))
        summaries.append(summary)
    return summaries


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
        row["mean IoU"] = _mean(m.iou.values())
        row["tokens"] = _mean(m.tokens.values())
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
    df.attrs["notes"] = refcoco_notes(configured)
    df.attrs["empty_note"] = "No metrics for any configured model and split."
    return df


def paper_comparison(
    metrics: list[dict], models: dict, splits: list[str], tolerance: float = 0.5
) -> pd.DataFrame:
    """Long table of our Acc@0.5 (%) against the paper's, for models with a `paper` entry.

    Rows cover every split and the Avg the paper reports for that model, run or not. Our Avg
    here is over the paper's 8 splits, so it is missing unless all 8 were run: an Avg over
    fewer splits would not be the paper's quantity. Models the paper only plots get one Avg
    row against the approximate value read off the figure (source "figure (approx.)").
    """
    configured = order_splits(splits)
    summaries = {m.key: m for m in summarise(metrics, models, configured)}
    known = set(paper.paper_models())
    rows = []
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
            reference = paper.paper_acc(paper_model, split)
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
            if math.isnan(reproduced):
                verdict = "not run"
            elif abs(diff) <= tolerance + 1e-9:  # slack so 0.5 exactly is not lost to float error
                verdict = "match"
            else:
                verdict = "differs"
            rows.append(
                {
                    "model": display,
                    "paper_model": paper_model,
                    "split": split,
                    "source": source,
                    "paper": paper_value,
                    "reproduced": reproduced,
                    "diff": diff,
                    "verdict": verdict,
                }
            )
    df = pd.DataFrame(rows, columns=list(COMPARISON_COLUMNS))
    df[["paper", "reproduced", "diff"]] = df[["paper", "reproduced", "diff"]].astype("float64")
    df.attrs["notes"] = comparison_notes(df, tolerance)
    df.attrs["empty_note"] = NO_COUNTERPART_NOTE
    return df


# --------------------------------------------------------------------------- writing


def _is_missing(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    try:
        return bool(isinstance(value, float) and math.isnan(value)) or bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _format_cell(value: Any, signed: bool, labels: Mapping[str, str]) -> str:
    if _is_missing(value):
        return MISSING
    if isinstance(value, bool):
        return str(value)
    kind = getattr(getattr(value, "dtype", None), "kind", "")  # numpy scalars
    if isinstance(value, int) or kind in ("i", "u"):
        return str(int(value))
    if isinstance(value, float) or kind == "f":
        number = float(value)
        if round(number, 1) == 0:
            number = 0.0  # no "-0.0" for tiny negative differences
        text = f"{number:+.1f}" if signed and number != 0 else f"{number:.1f}"
        return text
    text = labels.get(str(value), str(value))
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown(
    df: pd.DataFrame,
    title: str | None,
    notes: Sequence[str],
    labels: Mapping[str, str],
    signed_columns: Sequence[str],
    empty_note: str,
) -> str:
    lines: list[str] = []
    if title:
        lines += [f"## {title}", ""]
    if len(df.columns):
        headers = [_format_cell(str(c), False, labels) for c in df.columns]
        numeric = [pd.api.types.is_numeric_dtype(df[c]) for c in df.columns]
        lines.append("| " + " | ".join(headers) + " |")
        lines.append("|" + "|".join("---:" if n else ":---" for n in numeric) + "|")
        for row in df.itertuples(index=False, name=None):
            cells = [
                _format_cell(v, c in signed_columns, labels) for c, v in zip(df.columns, row)
            ]
            lines.append("| " + " | ".join(cells) + " |")
    if df.empty:
        lines += ["", f"_{empty_note}_"]
    if notes:
        lines += ["", "Notes:", ""]
        lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def write_table(
    df: pd.DataFrame,
    out_prefix: Path,
    formats: Sequence[str] = ("csv", "md"),
    title: str | None = None,
    notes: Sequence[str] | None = None,
    labels: Mapping[str, str] | None = None,
    signed_columns: Sequence[str] = ("diff",),
    empty_note: str | None = None,
) -> list[Path]:
    """Write `{out_prefix}.csv` (full precision, missing as empty) and/or `{out_prefix}.md`.

    In the Markdown only, column headers and string cells found in `labels` (default: split
    ids to paper labels) are relabelled, numbers get one decimal (`signed_columns` with a
    sign), and missing values show as "–". `notes` and `empty_note` default to those that
    refcoco_table / paper_comparison store in `df.attrs`. Returns the paths written.
    """
    labels = SPLIT_LABELS if labels is None else labels
    notes = list(df.attrs.get("notes", [])) if notes is None else list(notes)
    if empty_note is None:
        empty_note = df.attrs.get("empty_note", "No rows.")
    unknown = set(formats) - {"csv", "md"}
    if unknown:
        raise ValueError(f"unknown table formats: {sorted(unknown)}")
    out_prefix = Path(out_prefix)
    written = []
    for fmt in formats:
        path = out_prefix.with_name(f"{out_prefix.name}.{fmt}")
        # newline="" so the csv writer's own line endings are not translated.
        with atomic_write(path, "w", encoding="utf-8", newline="") as handle:
            if fmt == "csv":
                df.to_csv(handle, index=False, lineterminator="\n")
            else:
                handle.write(_markdown(df, title, notes, labels, signed_columns, empty_note))
        written.append(path)
    return written


# --------------------------------------------------------------------------- report entry points


def refcoco_notes(splits: Sequence[str]) -> list[str]:
    configured = order_splits(splits)
    notes = [
        "Acc@0.5 (%): share of scored samples whose predicted box has IoU > 0.5 with the "
        "ground truth; unparseable answers count as misses, bad records (invalid data) are "
        "left out of the denominator.",
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


def comparison_notes(df: pd.DataFrame, tolerance: float) -> list[str]:
    if df.empty:
        return [f"Paper values: {paper.TABLE_SOURCE}."]  # the empty note already says why
    counts = df["verdict"].value_counts()
    compared = int(counts.get("match", 0) + counts.get("differs", 0))
    notes = [
        f"Paper values: {paper.TABLE_SOURCE}.",
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
    return notes


def write_refcoco_table(
    metrics: list[dict],
    models: dict,
    splits: list[str],
    out_prefix: Path,
    formats: Sequence[str] = ("csv", "md"),
) -> pd.DataFrame:
    df = refcoco_table(metrics, models, splits)
    write_table(
        df,
        out_prefix,
        formats,
        title="RefCOCO / RefCOCO+ / RefCOCOg Acc@0.5 (%), this run",
    )
    return df


def write_paper_comparison(
    metrics: list[dict],
    models: dict,
    splits: list[str],
    out_prefix: Path,
    tolerance: float = 0.5,
    formats: Sequence[str] = ("csv", "md"),
) -> pd.DataFrame:
    df = paper_comparison(metrics, models, splits, tolerance)
    write_table(
        df,
        out_prefix,
        formats,
        title="Acc@0.5 (%): this run against the paper",
    )
    return df
