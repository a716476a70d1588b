"""The accuracy/latency trade-off figure, our models over the paper's points.

Built on a bare `Figure` with the Agg canvas rather than pyplot, so drawing touches no global
backend state and works in any worker process.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from egm.report import paper
from egm.report.common import (
    OUR_LEGEND, PAPER_COLOUR, PAPER_LEGEND, MarkerLabel, accuracy_axes, average_note, axis_limits, latency_label,
    marker_area, marker_handle, marker_radius, order_splits, place_labels, placement_notes, save_figure, summarise,
)


def latency_by_model(files: list[dict]) -> dict[str, float]:
    """Mean latency (ms) per model key from results/latency/{model}.json contents."""
    out = {}
    for entry in files:
        out[str(entry["model"])] = float(entry["mean_latency_ms"])
    return out


def tradeoff_figure(
    metrics: list[dict], models: dict, out_prefix: Path, splits: list[str], latency: dict[str, float] | None = None,
    paper_version: str = paper.DEFAULT_VERSION,
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

    points = paper.tradeoff_points(paper_version)
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
    x_lo, x_hi = axis_limits(xs, log=True)

    # Our labels are placed first so they win any clash with the paper's.
    labels: list[MarkerLabel] = []
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
        labels.append(MarkerLabel(annotation, marker_radius(marker_area(params_b)), "below"))
    for p in points:
        annotation = ax.annotate(
            p.model, (p.latency_ms, p.avg_acc), xytext=(0, 0), textcoords="offset points",
            fontsize=6, color=PAPER_COLOUR, zorder=2,
        )
        near_right = math.log(p.latency_ms / x_lo) > 0.75 * math.log(x_hi / x_lo)
        prefer = "left" if near_right else "right"
        labels.append(MarkerLabel(annotation, marker_radius(marker_area(p.params_b)), prefer))

    accuracy_axes(ax, (x_lo, x_hi), ys, "mean latency per sample (log scale)", latency_label)
    handles = [marker_handle(OUR_LEGEND, ours=True), marker_handle(PAPER_LEGEND, ours=False)]
    ax.legend(handles=handles, loc="lower right", fontsize=8)

    subtitle = [
        average_note(configured) + "; marker area grows with parameter count.",
        f"Paper points: the plot's, accuracy from the {paper_version} table where it has the model. "
        "Latency: ours measured on this run's hardware; the paper does not state its hardware."
        + (" Ours from the latency protocol run (results/latency/) where present." if latency else ""),
        *placement_notes(ours, skipped),
    ]
    wrapped = "\n".join(textwrap.fill(line, 120) for line in subtitle)
    ax.set_title(wrapped, fontsize=7.5, loc="left")
    fig.suptitle("Accuracy vs latency on RefCOCO / RefCOCO+ / RefCOCOg", fontsize=11)
    place_labels(fig, ax, labels)  # last, once titles have fixed the layout

    save_figure(fig, out_prefix)
