"""The test-time-scaling artifacts: accuracy against latency per reasoning budget, and its table.

Inputs are the sweep's per-budget metrics (results/scaling/{model}/budget-{N}.json, written by
egm.infer.budget). A model swept over several budgets is a curve through them; a model with one
point (an Instruct model, or a bigger one answered only without a budget) is a single marker. The
Pareto frontier is drawn over every point: those no other point beats on both accuracy and
latency.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from egm import provenance as prov
from egm.infer.budget import UNLIMITED
from egm.report.common import as_number, write_table

TABLE_COLUMNS = ("model", "budget", "n", "Acc@0.5", "mean IoU", "tokens", "latency (ms)", "closed (%)")


@dataclass(frozen=True)
class Point:
    model: str  # config key
    display: str
    budget: str  # "0", "16", ..., "unlimited"
    n: int
    acc: float  # percent
    iou: float  # percent
    tokens: float
    latency_ms: float
    closed: float  # percent of answers whose reasoning closed by itself
    answer_max_tokens: int | None
    n_per_split: int | None
    provenance: dict = field(default_factory=dict, compare=False)  # egm.provenance.flatten


def budget_order(label: str) -> float:
    return math.inf if label == UNLIMITED else float(label)


def budget_symbol(label: str) -> str:
    return "∞" if label == UNLIMITED else label


def collect_points(metrics: Sequence[Mapping[str, Any]], models: Mapping[str, Mapping[str, Any]]) -> list[Point]:
    """One point per (model, budget), models in the given order (unknown ones after, by key),
    budgets ascending with unlimited last. Two files for one point are an error."""
    seen: dict[tuple[str, str], Point] = {}
    for entry in metrics:
        key = (str(entry["model"]), str(entry["budget"]))
        if key in seen:
            raise ValueError(f"duplicate scaling metrics for model {key[0]!r}, budget {key[1]!r}")
        spec = models.get(key[0]) or {}
        count = as_number(entry.get("n_scored"))
        seen[key] = Point(
            model=key[0],
            display=str(spec.get("display") or key[0]),
            budget=key[1],
            n=0 if math.isnan(count) else int(count),
            acc=as_number(entry.get("acc_at_0.5")) * 100.0,
            iou=as_number(entry.get("mean_iou")) * 100.0,
            tokens=as_number(entry.get("mean_completion_tokens")),
            latency_ms=as_number(entry.get("mean_latency_s")) * 1000.0,
            closed=as_number(entry.get("closed_share")) * 100.0,
            answer_max_tokens=entry.get("answer_max_tokens"),
            n_per_split=entry.get("n_per_split"),
            provenance=prov.flatten(entry.get("provenance"), key[0]),
        )
    order = list(models) + sorted({m for m, _ in seen} - set(models))
    rank = {m: i for i, m in enumerate(order)}
    return sorted(seen.values(), key=lambda p: (rank[p.model], budget_order(p.budget)))


def pareto_front(points: Sequence[Point], value: str = "acc") -> list[Point]:
    """Points no other point beats: none has lower-or-equal latency with a higher `value` (or the
    same value at strictly lower latency). Returned by latency."""
    usable = [p for p in points if not math.isnan(getattr(p, value)) and p.latency_ms > 0]
    front: list[Point] = []
    best = -math.inf
    for p in sorted(usable, key=lambda p: (p.latency_ms, -getattr(p, value))):
        if getattr(p, value) > best:
            front.append(p)
            best = getattr(p, value)
    return front


def scaling_table(metrics: Sequence[Mapping[str, Any]], models: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    points = collect_points(metrics, models)
    rows = [
        {
            "model": p.display,
            "budget": p.budget,
            "n": p.n,
            "Acc@0.5": p.acc,
            "mean IoU": p.iou,
            "tokens": p.tokens,
            "latency (ms)": p.latency_ms,
            "closed (%)": p.closed,
        }
        for p in points
    ]
    df = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    floats = ["Acc@0.5", "mean IoU", "tokens", "latency (ms)", "closed (%)"]
    df[floats] = df[floats].astype("float64")
    df["n"] = df["n"].astype("int64")
    df.attrs["notes"] = scaling_notes(points)
    df.attrs["empty_note"] = "No scaling metrics."
    by_row: dict[str, list[dict]] = {}
    for p in points:
        by_row.setdefault(p.display, []).append(p.provenance)
    df.attrs["provenance"] = {display: prov.merge(rows) for display, rows in by_row.items()}
    return df


def scaling_notes(points: Sequence[Point]) -> list[str]:
    answer = sorted({p.answer_max_tokens for p in points if p.answer_max_tokens is not None})
    sample = sorted({p.n_per_split for p in points}, key=lambda v: (v is None, v or 0))
    sample_text = ", ".join("whole splits" if v is None else f"{v} records per split" for v in sample) or "–"
    return [
        "budget N: the reasoning gets at most N new tokens; if it has not closed by then, "
        "`\\n</think>\\n\\n` is appended and the model writes its answer in a second generation "
        f"(at most {', '.join(map(str, answer)) or '–'} tokens). 0: the reasoning is closed at once. "
        "unlimited: one plain generation, as in predict.",
        f"Every point answers the same seeded sample ({sample_text}), pooled over the splits.",
        "Acc@0.5 and mean IoU in %; tokens: mean generated tokens of both generations (the forced "
        "text is not counted); latency (ms): mean per request, both generations, on this run's "
        "hardware (a batching backend reports its batch's wall time for each request).",
        "closed (%): share of answers whose reasoning the model closed itself within the budget "
        "(unlimited: that wrote `</think>` at all).",
    ]


def write_scaling_table(metrics, models, out_prefix: Path) -> pd.DataFrame:
    df = scaling_table(metrics, models)
    write_table(df, out_prefix, title="Test-time scaling: accuracy, tokens and latency per reasoning budget",
                labels={UNLIMITED: "unlimited"}, signed_columns=())
    return df


PANELS = (("acc", "Acc@0.5 (%)"), ("iou", "mean IoU (%)"))


def _panel(ax, by_model: dict[str, list[Point]], value: str, label: str, legend: bool) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    from egm.report.common import axis_limits, latency_label

    points = [p for curve in by_model.values() for p in curve if not math.isnan(getattr(p, value))]
    for i, curve in enumerate(by_model.values()):
        colour = f"C{i % 10}"
        curve = [p for p in curve if not math.isnan(getattr(p, value))]
        if not curve:
            continue
        xs, ys = [p.latency_ms for p in curve], [getattr(p, value) for p in curve]
        if len(by_model_budgets(curve)) == 1:
            ax.scatter(xs, ys, s=90, marker="D", color=colour, edgecolors="black", linewidths=0.6, zorder=4,
                       label=f"{curve[0].display} (one point)")
            continue
        ax.plot(xs, ys, marker="o", markersize=5, color=colour, linewidth=1.4, zorder=3, label=curve[0].display)
        for p in curve:
            ax.annotate(budget_symbol(p.budget), (p.latency_ms, getattr(p, value)), xytext=(3, 4),
                        textcoords="offset points", fontsize=6.5, color=colour, zorder=5)
    front = pareto_front(points, value)
    if front:
        fx = [p.latency_ms for p in front]
        fy = [getattr(p, value) for p in front]
        # A frontier point holds its value until a slower point beats it: a staircase.
        ax.step(fx + [fx[-1] * 1.6], fy + [fy[-1]], where="post", color="0.35", linestyle="--", linewidth=1.0,
                zorder=2, label="Pareto frontier")
    if points:
        ax.set_xscale("log")
        ax.set_xlim(*axis_limits([p.latency_ms for p in points], log=True))
        ax.set_ylim(*axis_limits([getattr(p, value) for p in points], log=False))
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(latency_label))
        ax.xaxis.set_minor_formatter(NullFormatter())
        if legend:
            ax.legend(loc="best", fontsize=7)
    ax.set_xlabel("mean latency per request (log scale)")
    ax.set_ylabel(label)
    ax.grid(True, which="major", alpha=0.3)


def by_model_budgets(curve: Sequence[Point]) -> list[str]:
    return sorted({p.budget for p in curve}, key=budget_order)


def scaling_figure(metrics: Sequence[Mapping[str, Any]], models: Mapping[str, Mapping[str, Any]], out_prefix: Path) -> None:
    """Acc@0.5 (%) and mean IoU (%) against mean latency (ms, log x) -> `{out_prefix}.png`, `.pdf`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from egm.report.common import save_figure

    points = collect_points(metrics, models)
    usable = [p for p in points if not math.isnan(p.acc) and not math.isnan(p.latency_ms) and p.latency_ms > 0]
    skipped = sorted({f"{p.display} ({budget_symbol(p.budget)})" for p in points} -
                     {f"{p.display} ({budget_symbol(p.budget)})" for p in usable})
    by_model: dict[str, list[Point]] = {}
    for p in usable:
        by_model.setdefault(p.model, []).append(p)

    fig = Figure(figsize=(12.0, 5.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for i, (ax, (value, label)) in enumerate(zip(axes, PANELS)):
        _panel(ax, by_model, value, label, legend=i == 0)
    subtitle = [
        "Each curve: one model through its reasoning budgets (labels: new tokens of reasoning before "
        "`</think>` is forced; ∞ = unlimited, one plain generation). Diamonds: models answered at one point.",
        "Same seeded sample of the eval splits for every point; latency (both generations) measured on this run's "
        "hardware. Dashed: the Pareto frontier over all points.",
    ]
    if not usable:
        subtitle.append("No point could be plotted.")
    if skipped:
        subtitle.append("Not plotted (no accuracy or latency): " + ", ".join(skipped) + ".")
    axes[0].set_title("\n".join(textwrap.fill(line, 110) for line in subtitle), fontsize=7.5, loc="left")
    fig.suptitle("Bigger or longer? Accuracy vs latency per reasoning budget", fontsize=11)
    save_figure(fig, out_prefix)
