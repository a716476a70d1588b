"""The accuracy/latency trade-off figure, our models over the paper's points.

Built on a bare `Figure` with the Agg canvas rather than pyplot, so drawing touches no global
backend state and works in any worker process.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.text import Annotation
from matplotlib.ticker import FuncFormatter, NullFormatter
from matplotlib.transforms import Bbox

from egm.io import atomic_write
from egm.report import paper
from egm.report.tables import order_splits, summarise

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


def _radius(area: float) -> float:
    """Marker radius in points for a scatter area (scatter's s is the marker width squared)."""
    return math.sqrt(area) / 2


LABEL_GAP_PT = 2.0
SIDES = 8  # placements per ring around a marker


@dataclass
class _Label:
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


def _place_labels(fig: Figure, ax: Axes, labels: list[_Label]) -> None:
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


def _latency_label(ms: float, _pos: object = None) -> str:
    if ms >= 1000:
        return f"{ms / 1000:g} s"
    return f"{ms:g} ms"


def _axis_limits(values: Sequence[float], log: bool) -> tuple[float, float]:
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
    ax.set_ylim(*_axis_limits(ys, log=False))
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


def latency_by_model(files: list[dict]) -> dict[str, float]:
    """Mean latency (ms) per model key from results/latency/{model}.json contents."""
    out = {}
    for entry in files:
        out[str(entry["model"])] = float(entry["mean_latency_ms"])
    return out


def tradeoff_figure(
    metrics: list[dict], models: dict, out_prefix: Path, splits: list[str], latency: dict[str, float] | None = None
) -> None:
    """Avg Acc@0.5 (%) against mean latency (ms, log x) -> `{out_prefix}.png` and `.pdf`.

    Latency comes from `latency` (the latency rule's protocol run, by model key) where given,
    else from the mean over the predictions. Models without an Avg (a configured split missing
    or unscored) or without a positive latency cannot be placed; they are left out and named in
    the subtitle.
    """
    configured = order_splits(splits)
    ours: list[tuple[str, float, float, float]] = []
    skipped: list[str] = []
    latency = latency or {}
    for summary in summarise(metrics, models, configured):
        accuracy = summary.average(configured)
        latency_ms = latency.get(summary.key, summary.mean_latency_ms())
        if math.isnan(accuracy):
            skipped.append(f"{summary.display} (no Avg accuracy)")
        elif math.isnan(latency_ms) or latency_ms <= 0:
            skipped.append(f"{summary.display} (no latency)")
        else:
            ours.append((summary.display, latency_ms, accuracy, summary.params_b))

    fig = Figure(figsize=(8.0, 5.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()

    points = paper.TRADEOFF_POINTS
    ax.scatter(
        [p.latency_ms for p in points],
        [p.avg_acc for p in points],
        s=[marker_area(p.params_b) for p in points],
        facecolors="none",
        edgecolors=PAPER_COLOUR,
        linewidths=1.0,
        zorder=2,
    )
    xs = [p.latency_ms for p in points] + [o[1] for o in ours]
    ys = [p.avg_acc for p in points] + [o[2] for o in ours]
    x_lo, x_hi = _axis_limits(xs, log=True)

    # Our labels are placed first so they win any clash with the paper's.
    labels: list[_Label] = []
    for i, (name, latency_ms, accuracy, params_b) in enumerate(ours):
        colour = f"C{i % 10}"
        ax.scatter(
            [latency_ms], [accuracy], s=[marker_area(params_b)], color=colour,
            edgecolors="black", linewidths=0.6, zorder=4, clip_on=False,  # whole even at 0 %
        )
        annotation = ax.annotate(
            name, (latency_ms, accuracy), xytext=(0, 0), textcoords="offset points",
            fontsize=8, color=colour, fontweight="bold", zorder=5,
        )
        labels.append(_Label(annotation, _radius(marker_area(params_b)), "below"))
    for p in points:
        annotation = ax.annotate(
            p.model, (p.latency_ms, p.avg_acc), xytext=(0, 0), textcoords="offset points",
            fontsize=6, color=PAPER_COLOUR, zorder=2,
        )
        near_right = math.log(p.latency_ms / x_lo) > 0.75 * math.log(x_hi / x_lo)
        prefer = "left" if near_right else "right"
        labels.append(_Label(annotation, _radius(marker_area(p.params_b)), prefer))

    accuracy_axes(ax, (x_lo, x_hi), ys, "mean latency per sample (log scale)", _latency_label)
    handles = [marker_handle(OUR_LEGEND, ours=True), marker_handle(PAPER_LEGEND, ours=False)]
    ax.legend(handles=handles, loc="lower right", fontsize=8)

    subtitle = [
        average_note(configured) + "; marker area grows with parameter count.",
        "Latency: ours measured on this run's hardware; the paper does not state its hardware."
        + (" Ours from the latency protocol run (results/latency/) where present." if latency else ""),
        *placement_notes(ours, skipped),
    ]
    wrapped = "\n".join(textwrap.fill(line, 120) for line in subtitle)
    ax.set_title(wrapped, fontsize=7.5, loc="left")
    fig.suptitle("Accuracy vs latency on RefCOCO / RefCOCO+ / RefCOCOg", fontsize=11)
    _place_labels(fig, ax, labels)  # last, once titles have fixed the layout

    save_figure(fig, out_prefix)
