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

from egm import provenance as prov
from egm.io import atomic_write
from egm.report import paper
from egm.report.paper import AVG, SPLIT_LABELS, SPLITS

MISSING = "–"
EXTRA_COLUMNS = ("mean IoU", "tokens", "latency (ms)", "bad records", "unparseable")
COMPARISON_COLUMNS = (
    "model", "paper_model", "split", "source", "paper", "reproduced", "diff", "verdict",
)
EXPECTED_COLUMNS = ("model", "metric", "low", "high", "reproduced", "verdict")
FORMATS = ("csv", "md", "tex")
AMODAL_NOTE = (
    "Amodal grounding (the paper's amodal tables): not run, the data is not public; only the "
    "prompt templates were released (egm.grounding.PROMPTS)."
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
    scored: int = 0
    provenance: list[dict[str, str]] = field(default_factory=list)  # egm.provenance.flatten, per split
    # Splits whose metrics say they have no score (e.g. no valid record): split -> (label, reason).
    no_score: dict[str, tuple[str, str]] = field(default_factory=dict)

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

    def parseable(self) -> float:
        """Share (%) of scored answers with a parseable box."""
        return 100.0 * (self.scored - self.unparseable) / self.scored if self.scored else math.nan


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
            summary.scored += _count(entry.get("n_scored"))
            summary.provenance.append(prov.flatten(entry.get("provenance"), key))
            if entry.get("no_score"):
                summary.no_score[split] = (str(entry["no_score"]), str(entry.get("no_score_reason") or ""))
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
    df.attrs["notes"] = refcoco_notes(configured) + no_score_notes(summaries)
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
    df.attrs["notes"] = comparison_notes(df, tolerance, [m for m in paper.REFCOCO_ACC if m not in compared]) + \
        no_score_notes(s for k, s in summaries.items() if (models.get(k) or {}).get("paper"))
    df.attrs["empty_note"] = NO_COUNTERPART_NOTE
    df.attrs["provenance"] = row_provenance(s for k, s in summaries.items() if (models.get(k) or {}).get("paper"))
    return df


def row_provenance(summaries: Iterable[ModelSummary]) -> dict[str, dict[str, str]]:
    """Provenance per table row label (the display name), merged over the model's splits."""
    rows: dict[str, list[dict[str, str]]] = {}
    for summary in summaries:
        rows.setdefault(summary.display, []).extend(summary.provenance)
    return {display: prov.merge(entries) for display, entries in rows.items()}


# What `report.expected` may give a range for: label and how to read it off a summary.
EXPECTED_METRICS = {
    "acc": "Avg Acc@0.5 (%)",
    "parseable": "parseable answers (%)",
    "iou": "mean IoU (%)",
    "tokens": "mean tokens",
}


def _expected_value(summary: ModelSummary, metric: str, splits: Sequence[str]) -> float:
    if metric == "acc":
        return summary.average(splits)
    if metric == "parseable":
        return summary.parseable()
    if metric == "iou":
        return _mean(summary.iou.values())
    return _mean(summary.tokens.values())


def verdict(value: float, low: float, high: float, inside: str = "match", outside: str = "differs") -> str:
    if math.isnan(value):
        return "not run"
    slack = 1e-9  # so a bound hit exactly is not lost to float error
    return inside if low - slack <= value <= high + slack else outside


def expected_comparison(
    metrics: list[dict], models: dict, splits: list[str], expected: Mapping[str, Mapping[str, Sequence[float]]]
) -> pd.DataFrame:
    """This run against ranges set in the config (`report.expected`: model key -> metric ->
    [low, high]), for runs the paper has no numbers for, such as the demo."""
    configured = order_splits(splits)
    summaries = {m.key: m for m in summarise(metrics, models, configured)}
    unknown = sorted(set(expected) - set(models))
    if unknown:
        raise ValueError(f"report.expected names model(s) {unknown}, which are not evaluated: {sorted(models)}")
    rows = []
    for key in [k for k in models if k in expected]:  # rows in the config's model order
        ranges, summary = expected[key], summaries.get(key)
        for metric, (low, high) in ranges.items():
            if metric not in EXPECTED_METRICS:
                raise ValueError(f"report.expected.{key}: unknown metric {metric!r}; known: {sorted(EXPECTED_METRICS)}")
            value = math.nan if summary is None else _expected_value(summary, metric, configured)
            rows.append({
                "model": str((models[key] or {}).get("display") or key),
                "metric": EXPECTED_METRICS[metric],
                "low": float(low),
                "high": float(high),
                "reproduced": value,
                "verdict": verdict(value, float(low), float(high), "within", "outside"),
            })
    df = pd.DataFrame(rows, columns=list(EXPECTED_COLUMNS))
    df[["low", "high", "reproduced"]] = df[["low", "high", "reproduced"]].astype("float64")
    counts = df["verdict"].value_counts()
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


# --------------------------------------------------------------------------- writing


def _is_missing(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    try:
        return bool(isinstance(value, float) and math.isnan(value)) or bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _format_cell(value: Any, signed: bool, labels: Mapping[str, str]) -> str:
    """A cell as text: one decimal for numbers (signed where asked), MISSING for gaps, labels applied."""
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
    return labels.get(str(value), str(value)).replace("\n", " ")


def _rows(df: pd.DataFrame, labels: Mapping[str, str], signed_columns: Sequence[str]) -> list[list[str]]:
    # A gap with a known cause (a split without a score) says so instead of the bare MISSING.
    cell_labels = df.attrs.get("cell_labels") or {}
    return [
        [cell_labels.get((position, c)) or _format_cell(v, c in signed_columns, labels) for c, v in zip(df.columns, row)]
        for position, row in enumerate(df.itertuples(index=False, name=None))
    ]


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def _provenance_lines(provenance: Mapping[str, Mapping[str, str]]) -> list[str]:
    """The Markdown provenance table: one line per table row label, commits shortened."""
    lines = [
        "| model | model (repo @ revision: commit) | data (repo @ revision: commit) | engine | device "
        "| image (sha256) | egm | config |",
        "|:---|:---|:---|:---|:---|:---|:---|:---|",
    ]
    for label, full in provenance.items():
        row = prov.short(full)

        def source(prefix: str) -> str:
            repo, revision, commit = row[f"{prefix}_repo"], row[f"{prefix}_revision"], row[f"{prefix}_commit"]
            return f"{repo or MISSING} @ {revision or MISSING}: {commit or MISSING}"

        image = row["image"] + (f" ({row['image_sha256']})" if row["image_sha256"] else "")
        cells = [label, source("model"), source("data"), row["engine"], row["device"], image, row["egm"],
                 row["config_sha256"]]
        lines.append("| " + " | ".join(_md_cell(c or MISSING) for c in cells) + " |")
    return lines


def _markdown(df, title, notes, labels, signed_columns, empty_note, provenance) -> str:
    lines: list[str] = []
    if title:
        lines += [f"## {title}", ""]
    if len(df.columns):
        headers = [_md_cell(_format_cell(str(c), False, labels)) for c in df.columns]
        numeric = [pd.api.types.is_numeric_dtype(df[c]) for c in df.columns]
        lines.append("| " + " | ".join(headers) + " |")
        lines.append("|" + "|".join("---:" if n else ":---" for n in numeric) + "|")
        lines += ["| " + " | ".join(map(_md_cell, cells)) + " |" for cells in _rows(df, labels, signed_columns)]
    if df.empty:
        lines += ["", f"_{empty_note}_"]
    if notes:
        lines += ["", "Notes:", ""]
        lines += [f"- {note}" for note in notes]
    if provenance:
        lines += ["", "Provenance (full commits and digests in the CSV; per split in results/metrics/):", ""]
        lines += _provenance_lines(provenance)
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    MISSING: "--", "−": "$-$", "≤": r"$\le$", "≥": r"$\ge$", "∞": r"$\infty$", "±": r"$\pm$",
}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(char, char) for char in text)


def _latex(df, title, notes, labels, signed_columns, empty_note, provenance) -> str:
    """A booktabs tabular to \\input into a paper; title, notes and provenance as % comments."""
    def comment(text: str) -> str:
        return "% " + text.replace("\n", " ")

    lines = [comment(title or "table"), "% Needs \\usepackage{booktabs}."]
    lines += [comment(f"Note: {note}") for note in notes]
    for label, row in (provenance or {}).items():
        lines.append(comment(f"Provenance of {label}: " + "; ".join(f"{k}={v}" for k, v in row.items() if v)))
    numeric = [pd.api.types.is_numeric_dtype(df[c]) for c in df.columns]
    lines.append("\\begin{tabular}{" + "".join("r" if n else "l" for n in numeric) + "}")
    lines.append("\\toprule")
    lines.append(" & ".join(latex_escape(_format_cell(str(c), False, labels)) for c in df.columns) + " \\\\")
    lines.append("\\midrule")
    for cells in _rows(df, labels, signed_columns):
        lines.append(" & ".join(map(latex_escape, cells)) + " \\\\")
    if df.empty:
        lines.append(f"\\multicolumn{{{max(1, len(df.columns))}}}{{l}}{{{latex_escape(empty_note)}}} \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def _csv_frame(df: pd.DataFrame, provenance: Mapping[str, Mapping[str, str]] | None) -> pd.DataFrame:
    """The table with each row's full provenance appended (joined on its "model" label); the
    columns are there even when empty, so every table of a kind has one CSV schema."""
    if "model" not in df.columns:
        return df
    out = df.copy()
    for name in prov.FIELDS:
        out[name] = [provenance.get(str(label), {}).get(name, "") for label in df["model"]]
    return out


def write_table(
    df: pd.DataFrame,
    out_prefix: Path,
    formats: Sequence[str] = FORMATS,
    title: str | None = None,
    notes: Sequence[str] | None = None,
    labels: Mapping[str, str] | None = None,
    signed_columns: Sequence[str] = ("diff",),
    empty_note: str | None = None,
) -> list[Path]:
    """Write `{out_prefix}.csv` (full precision, missing as empty), `.md` and `.tex` (LaTeX).

    In the Markdown and LaTeX, column headers and string cells found in `labels` (default: split
    ids to paper labels) are relabelled, numbers get one decimal (`signed_columns` with a sign),
    and missing values show as "–", or as the text `df.attrs["cell_labels"]` gives for that cell
    ({(row position, column): text}: a split without a score says why). `notes`, `empty_note` and
    the rows' provenance (label ->
    egm.provenance fields) come from `df.attrs` where the table builders put them; provenance
    becomes extra CSV columns, a Markdown section and LaTeX comments. Returns the paths written.
    """
    labels = SPLIT_LABELS if labels is None else labels
    notes = list(df.attrs.get("notes", [])) if notes is None else list(notes)
    if empty_note is None:
        empty_note = df.attrs.get("empty_note", "No rows.")
    provenance = df.attrs.get("provenance") or {}
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown table formats: {sorted(unknown)}")
    out_prefix = Path(out_prefix)
    written = []
    for fmt in formats:
        path = out_prefix.with_name(f"{out_prefix.name}.{fmt}")
        # newline="" so the csv writer's own line endings are not translated.
        with atomic_write(path, "w", encoding="utf-8", newline="") as handle:
            if fmt == "csv":
                _csv_frame(df, provenance).to_csv(handle, index=False, lineterminator="\n")
            elif fmt == "md":
                handle.write(_markdown(df, title, notes, labels, signed_columns, empty_note, provenance))
            else:
                handle.write(_latex(df, title, notes, labels, signed_columns, empty_note, provenance))
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


def no_score_label(label: str) -> str:
    return f"n/a ({label})"


def no_score_notes(summaries: Iterable[ModelSummary]) -> list[str]:
    """One note per split without a score, with the reason its metrics give; Avg stays empty."""
    notes = []
    for m in summaries:
        for split, (label, reason) in m.no_score.items():
            notes.append(f"{no_score_label(label)}: {m.display}, {SPLIT_LABELS.get(split, split)} has no score "
                         f"({reason or label}); its Avg is left empty, since a mean over fewer splits is not the "
                         "paper's Avg.")
    return notes


def comparison_notes(df: pd.DataFrame, tolerance: float, not_configured: Sequence[str] = ()) -> list[str]:
    """What the comparison shows, and plainly what it could not: paper rows with no model in
    this config, cells without a number, and the amodal tables (data not public)."""
    notes = [f"Paper values: {paper.TABLE_SOURCE}."]
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
