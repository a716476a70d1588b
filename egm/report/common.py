"""What the report's tables and figures share: reading the per-split metrics into one summary per
model, number helpers, the table writers (CSV, Markdown, LaTeX) and the figure frame (saving,
axes, markers, label placement).

Every table or figure module imports from here and from no sibling; figures are drawn on a bare
`Figure` with the Agg canvas rather than pyplot, so drawing touches no global backend state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.text import Annotation
from matplotlib.ticker import FuncFormatter, NullFormatter
from matplotlib.transforms import Bbox

from egm import provenance as prov
from egm.io import atomic_write
from egm.report import paper
from egm.report.paper import SPLIT_LABELS, SPLITS

MISSING = "–"

FORMATS = ("csv", "md", "tex")


def as_number(value: Any) -> float:
    """A finite float, or NaN for absent/null/non-numeric/non-finite values."""
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out if math.isfinite(out) else math.nan


def finite_mean(values: Iterable[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return math.fsum(finite) / len(finite) if finite else math.nan


def as_count(value: Any) -> int:
    number = as_number(value)
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
        return finite_mean(self.latency_ms.values())

    def parseable(self) -> float:
        """Share (%) of scored answers with a parseable box."""
        return 100.0 * (self.scored - self.unparseable) / self.scored if self.scored else math.nan


def index_metrics(metrics: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], Mapping[str, Any]]:
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
    index = index_metrics(metrics)
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
            params_b=as_number(spec.get("params_b")),
        )
        for split, entry in entries.items():
            summary.acc[split] = as_number(entry.get("acc_at_0.5")) * 100.0
            summary.iou[split] = as_number(entry.get("mean_iou")) * 100.0
            summary.tokens[split] = as_number(entry.get("mean_completion_tokens"))
            summary.latency_ms[split] = as_number(entry.get("mean_latency_s")) * 1000.0
            summary.bad_records += as_count(entry.get("n_bad_records"))
            summary.unparseable += as_count(entry.get("n_unparseable"))
            summary.scored += as_count(entry.get("n_scored"))
            summary.provenance.append(prov.flatten(entry.get("provenance"), key))
            if entry.get("no_score"):
                summary.no_score[split] = (str(entry["no_score"]), str(entry.get("no_score_reason") or ""))
        summaries.append(summary)
    return summaries


def row_provenance(summaries: Iterable[ModelSummary]) -> dict[str, dict[str, str]]:
    """Provenance per table row label (the display name), merged over the model's splits."""
    rows: dict[str, list[dict[str, str]]] = {}
    for summary in summaries:
        rows.setdefault(summary.display, []).extend(summary.provenance)
    return {display: prov.merge(entries) for display, entries in rows.items()}


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


def split_size_notes(metrics: Iterable[Mapping[str, Any]], splits: Sequence[str]) -> list[str]:
    """One note naming the configured splits scored over another number of lines than the
    released files hold (a demo, a `limit`, another revision of the data): their scores are not
    over the paper's samples."""
    seen: dict[str, set[int]] = {}
    released: dict[str, int] = {}
    for entry in metrics:
        split = str(entry.get("split"))
        if split in splits and entry.get("differs_from_release"):
            seen.setdefault(split, set()).add(as_count(entry.get("n_records")))
            released[split] = as_count(entry.get("released_lines"))
    if not seen:
        return []
    listed = "; ".join(f"{SPLIT_LABELS.get(s, s)} {'/'.join(map(str, sorted(seen[s])))} (released {released[s]})"
                       for s in order_splits(list(seen)))
    return [f"Split sizes differ from the released data set's, so these scores are not over the paper's samples "
            f"(lines scored here, and in the released file): {listed}."]


# --------------------------------------------------------------------------- tables


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
    if df.attrs.get("lead"):
        lines += [f"**{df.attrs['lead']}**", ""]
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
    if df.attrs.get("lead"):
        lines.append(comment(df.attrs["lead"]))
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


# --------------------------------------------------------------------------- figures

PAPER_COLOUR = "0.55"

PAPER_LEGEND = "paper (approximate, read off the plot)"

OUR_LEGEND = "this run"

DPI = 150


def marker_area(params_b: float) -> float:
    """Scatter area (pt^2), linear in parameters, with a floor so tiny models stay visible."""
    if math.isnan(params_b) or params_b <= 0:
        return 40.0
    return 20.0 + 6.0 * params_b


def save_figure(fig: Figure, out_prefix: Path) -> list[Path]:
    """Write `{out_prefix}.png` and `{out_prefix}.pdf` atomically; returns the paths written."""
    out_prefix = Path(out_prefix)
    # Dates and version strings left out so re-rendering identical inputs gives identical files.
    outputs = (("png", {"Software": None}), ("pdf", {"CreationDate": None, "Producer": None}))
    written = []
    for fmt, metadata in outputs:
        path = out_prefix.with_name(f"{out_prefix.name}.{fmt}")
        with atomic_write(path, "wb") as handle:
            fig.savefig(handle, format=fmt, dpi=DPI, metadata=metadata)
        written.append(path)
    return written


def marker_radius(area: float) -> float:
    """Marker radius in points for a scatter area (scatter's s is the marker width squared)."""
    return math.sqrt(area) / 2

LABEL_GAP_PT = 2.0

SIDES = 8  # placements per ring around a marker


@dataclass
class MarkerLabel:
    annotation: Annotation
    radius_pt: float  # of the marker it names
    prefer: str  # a key of the sides in `placements`

    def placements(self) -> list[tuple[tuple[float, float], str, str]]:
        """(offset in points, ha, va) around the marker, preferred side first, then the other
        sides, then the same sides a text line or two further out (for crowded clusters)."""
        out = []
        for extra in (0.0, 9.0, 18.0):
            gap = self.radius_pt + LABEL_GAP_PT + extra
            diagonal = gap * 0.75
            sides = {
                "right": ((gap, 0.0), "left", "center"),
                "left": ((-gap, 0.0), "right", "center"),
                "above": ((0.0, gap), "center", "bottom"),
                "below": ((0.0, -gap), "center", "top"),
                "upper right": ((diagonal, diagonal), "left", "bottom"),
                "lower right": ((diagonal, -diagonal), "left", "top"),
                "upper left": ((-diagonal, diagonal), "right", "bottom"),
                "lower left": ((-diagonal, -diagonal), "right", "top"),
            }
            out += [sides[self.prefer]] + [place for side, place in sides.items() if side != self.prefer]
        return out


def _overlap(box: Bbox, others: list[Bbox]) -> float:
    """Area (pixels^2) `box` shares with `others`."""
    total = 0.0
    for other in others:
        width = min(box.x1, other.x1) - max(box.x0, other.x0)
        height = min(box.y1, other.y1) - max(box.y0, other.y0)
        if width > 0 and height > 0:
            total += width * height
    return total


def place_labels(fig: Figure, ax: Axes, labels: list[MarkerLabel]) -> None:
    """Greedily put each label on the first place around its marker that is free and inside the
    axes; where none is (a crowded cluster), on the inside place that overlaps least, so that a
    label may touch another but is never dropped.
    """
    for label in labels:
        label.annotation.set_in_layout(False)  # moving a label must not move the axes under it
    fig.canvas.draw()  # settles the layout so extents are final
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    taken = [legend.get_window_extent(renderer) for legend in [ax.get_legend()] if legend]
    pixels_per_point = renderer.points_to_pixels(1.0)
    for label in labels:
        # Each marker as its bounding square, so labels keep off circles too.
        x, y = ax.transData.transform(label.annotation.xy)
        half = label.radius_pt * pixels_per_point
        taken.append(Bbox.from_extents(x - half, y - half, x + half, y + half))

    def place(annotation: Annotation, offset: tuple[float, float], ha: str, va: str) -> Bbox:
        annotation.set_position(offset)
        annotation.set_horizontalalignment(ha)
        annotation.set_verticalalignment(va)
        return annotation.get_window_extent(renderer)

    for label in labels:
        annotation = label.annotation
        candidates = label.placements()
        best, best_cost = 0, None
        for index, candidate in enumerate(candidates):
            box = place(annotation, *candidate)
            inside = box.x0 >= frame.x0 and box.x1 <= frame.x1 and box.y0 >= frame.y0 and box.y1 <= frame.y1
            # Leaving the axes costs more than any overlap; nearer places win ties (they come first).
            cost = _overlap(box, taken) + (0.0 if inside else 1e12)
            if best_cost is None or cost < best_cost:
                best, best_cost = index, cost
            if cost == 0:
                break
        offset, ha, va = candidates[best]
        taken.append(place(annotation, offset, ha, va))
        if best >= SIDES:  # moved out past the first ring: a thin leader says which marker it names
            ax.annotate("", xy=annotation.xy, xytext=offset, textcoords="offset points", zorder=1,
                        arrowprops={"arrowstyle": "-", "color": annotation.get_color(), "linewidth": 0.5,
                                    "shrinkA": 0, "shrinkB": label.radius_pt})


def latency_label(ms: float, _pos: object = None) -> str:
    if ms >= 1000:
        return f"{ms / 1000:g} s"
    return f"{ms:g} ms"


def axis_limits(values: Sequence[float], log: bool) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if log:
        return lo / 1.6, hi * 1.6
    pad = 0.1 * (hi - lo) + 1.0
    return max(0.0, lo - pad), min(102.0, hi + pad)


def accuracy_axes(ax: Axes, x_limits: tuple[float, float], ys: Sequence[float], x_label: str,
                  x_formatter, x_locator=None) -> None:
    """Avg Acc@0.5 (%) over a log x axis: the frame the trade-off and tokens figures share."""
    ax.set_xscale("log")
    ax.set_xlim(*x_limits)
    ax.set_ylim(*axis_limits(ys, log=False))
    if x_locator is not None:
        ax.xaxis.set_major_locator(x_locator)
    ax.xaxis.set_major_formatter(FuncFormatter(x_formatter))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(x_label)
    ax.set_ylabel("Avg Acc@0.5 (%)")
    ax.grid(True, which="major", alpha=0.3)


def marker_handle(label: str, ours: bool) -> Line2D:
    """A legend entry for our (filled) or the paper's (hollow, grey) markers."""
    if ours:
        return Line2D([], [], marker="o", linestyle="none", markersize=7, markerfacecolor="C0",
                      markeredgecolor="black", label=label)
    return Line2D([], [], marker="o", linestyle="none", markersize=7, markerfacecolor="none",
                  markeredgecolor=PAPER_COLOUR, label=label)


def average_note(configured: Sequence[str]) -> str:
    """What the Avg on the y axis averages, and whether that is the paper's Avg."""
    differs = list(configured) != list(paper.SPLITS)
    return f"Avg over {len(configured)} configured split(s)" + (
        f" (the paper averages its {len(paper.SPLITS)})" if differs else "")


def placement_notes(ours: Sequence, skipped: Sequence[str]) -> list[str]:
    """Subtitle lines naming what could not be plotted."""
    notes = [] if ours else ["No model of this run could be plotted."]
    if skipped:
        notes.append("Not plotted: " + ", ".join(skipped) + ".")
    return notes
