"""The paper's "longer" axis: accuracy against how many tokens each model generates per sample.

The paper's own numbers here are few and loose: EGM-8B's ≈101 tokens (text) at its table Avg, and
≈42 tokens for "the 8B and 235B models without EGM", a variant the text does not name. That one
has no accuracy we could honestly pair with it, so it is drawn as a vertical reference line.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import LogLocator

from egm.report import paper
from egm.report.common import (
    OUR_LEGEND, PAPER_COLOUR, MarkerLabel, accuracy_axes, average_note, axis_limits, finite_mean, marker_area,
    marker_handle, marker_radius, order_splits, place_labels, placement_notes, save_figure, summarise,
)


@dataclass(frozen=True)
class TokenPoint:
    name: str
    tokens: float  # mean generated tokens per sample
    accuracy: float  # Avg Acc@0.5, percent
    params_b: float


@dataclass(frozen=True)
class TokenLine:
    """A paper token count without an accuracy to pair it with."""

    names: tuple[str, ...]
    tokens: float


def token_points(
    metrics: Sequence[Mapping[str, Any]], models: Mapping[str, Mapping[str, Any]], splits: Sequence[str]
) -> tuple[list[TokenPoint], list[str]]:
    """(our placeable models, "display (reason)" for each model that cannot be placed).

    Accuracy is the Avg over every configured split (NaN unless all are scored, as in the table);
    tokens are the mean over the splits the model has, like the table's tokens column.
    """
    configured = order_splits(splits)
    points: list[TokenPoint] = []
    skipped: list[str] = []
    for summary in summarise(metrics, models, configured):
        accuracy = summary.average(configured)
        tokens = finite_mean(summary.tokens.values())
        if math.isnan(accuracy):
            skipped.append(f"{summary.display} (no Avg accuracy)")
        elif math.isnan(tokens) or tokens <= 0:  # the x axis is logarithmic
            skipped.append(f"{summary.display} (no token count)")
        else:
            points.append(TokenPoint(summary.display, tokens, accuracy, summary.params_b))
    return points, skipped


def paper_references(version: str = paper.DEFAULT_VERSION) -> tuple[list[TokenPoint], list[TokenLine]]:
    """The paper's token counts: points where it gives the model's Avg (in `version`'s table), lines
    where it cannot."""
    points: list[TokenPoint] = []
    unpaired: dict[float, list[str]] = {}
    for name, tokens in paper.MEAN_COMPLETION_TOKENS.items():
        reference = paper.paper_acc(name, paper.AVG, version)
        if reference is None:
            unpaired.setdefault(tokens, []).append(name)
            continue
        point = paper.tradeoff_point(name, version)
        points.append(TokenPoint(name, tokens, reference[0], point.params_b if point else math.nan))
    lines = [TokenLine(tuple(names), tokens) for tokens, names in unpaired.items()]
    return points, lines


# The default cycle without its grey (C7), which would read as one of the paper's markers.
OUR_COLOURS = tuple(f"C{i}" for i in range(10) if i != 7)


def _join_names(names: Sequence[str]) -> str:
    """Names joined with "and", a qualifier they all end with ("A (x)", "B (x)") given once: "A and B (x)"."""
    qualifiers = {name[name.find(" ("):] if name.endswith(")") and " (" in name else "" for name in names}
    if len(names) > 1 and len(qualifiers) == 1 and "" not in qualifiers:
        qualifier = qualifiers.pop()
        return " and ".join(name.removesuffix(qualifier) for name in names) + qualifier
    return " and ".join(names)


def _tokens_label(value: float, _pos: object = None) -> str:
    return f"{value:g}"


def tokens_figure(
    metrics: Sequence[Mapping[str, Any]],
    models: Mapping[str, Mapping[str, Any]],
    out_prefix: Path,
    splits: Sequence[str],
    paper_version: str = paper.DEFAULT_VERSION,
) -> list[Path]:
    """Avg Acc@0.5 (%) against mean generated tokens per sample (log x) -> `{out_prefix}.png`, `.pdf`."""
    configured = order_splits(splits)
    ours, skipped = token_points(metrics, models, configured)
    references, lines = paper_references(paper_version)

    fig = Figure(figsize=(8.0, 5.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()

    xs = [p.tokens for p in (*ours, *references)] + [line.tokens for line in lines]
    ys = [p.accuracy for p in (*ours, *references)]
    x_lo, x_hi = axis_limits(xs, log=True)

    labels: list[MarkerLabel] = []
    for i, point in enumerate(ours):
        colour = OUR_COLOURS[i % len(OUR_COLOURS)]
        area = marker_area(point.params_b)
        ax.scatter([point.tokens], [point.accuracy], s=[area], color=colour, edgecolors="black",
                   linewidths=0.6, zorder=4, clip_on=False)  # whole even at 0 %
        annotation = ax.annotate(point.name, (point.tokens, point.accuracy), xytext=(0, 0),
                                 textcoords="offset points", fontsize=8, color=colour, fontweight="bold", zorder=5)
        labels.append(MarkerLabel(annotation, marker_radius(area), "below"))
    for point in references:
        area = marker_area(point.params_b)
        ax.scatter([point.tokens], [point.accuracy], s=[area], facecolors="none", edgecolors=PAPER_COLOUR,
                   linewidths=1.0, zorder=2)
        annotation = ax.annotate(f"{point.name} (paper)", (point.tokens, point.accuracy), xytext=(0, 0),
                                 textcoords="offset points", fontsize=7, color=PAPER_COLOUR, zorder=2)
        labels.append(MarkerLabel(annotation, marker_radius(area), "right"))
    for line in lines:
        ax.axvline(line.tokens, color=PAPER_COLOUR, linestyle="--", linewidth=1.0, zorder=1)
        ax.annotate(f"≈{line.tokens:g} tokens (paper)", (line.tokens, 1.0), xycoords=("data", "axes fraction"),
                    xytext=(-3, -4), textcoords="offset points", rotation=90, ha="right", va="top",
                    fontsize=6.5, color=PAPER_COLOUR)

    accuracy_axes(ax, (x_lo, x_hi), ys or [0.0, 100.0], "mean generated tokens per sample (log scale)",
                  _tokens_label, LogLocator(base=10, subs=(1.0, 2.0, 5.0)))

    handles = [marker_handle(OUR_LEGEND, ours=True)]
    if references:
        handles.append(marker_handle(f"paper: {paper_version} table Avg at the text's token count (approx.)",
                                     ours=False))
    for line in lines:
        handles.append(Line2D([], [], color=PAPER_COLOUR, linestyle="--",
                              label=f"paper: {_join_names(line.names)}, ≈{line.tokens:g} tokens"
                                    " (approx.; variant and accuracy not stated)"))
    ax.legend(handles=handles, loc="best", fontsize=7)

    subtitle = [
        average_note(configured)
        + "; tokens: mean generated tokens per sample (reasoning and answer), averaged over the model's splits;"
        " marker area grows with parameter count.",
        ("Paper token counts are approximate, from its text; the text does not say which variant its models"
         " without EGM are, so their count is a line rather than a point."),
        *placement_notes(ours, skipped),
    ]
    ax.set_title("\n".join(textwrap.fill(line, 120) for line in subtitle), fontsize=7.5, loc="left")
    fig.suptitle("Bigger or longer? Accuracy vs generated tokens", fontsize=11)
    place_labels(fig, ax, labels)  # last, once titles have fixed the layout
    return save_figure(fig, out_prefix)
