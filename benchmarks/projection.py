"""Batch-1 latency of the paper's models on other GPUs, predicted from one measured latency record.

The paper's claim is about deployment cost; this turns one GPU's measurement into the trade-off
a user of another GPU would see. From a `benchmarks/latency.py` record of one GPU (the base), for
each measured architecture, `--method` (graph_compiled by default) at batch 1, the two forced
token counts n1 < n2 give

    per_token = (T(n2) - T(n1)) / (n2 - n1)        fixed = T(n1) - n1 x per_token

A decode step reads the weights (memory-bound); the work before it (preprocessing, vision tower,
prompt pass) is matrix work (compute-bound). So on a GPU G

    T_G(n) = fixed x F_base / F_G + n x per_token x B_base / B_G

with B the memory bandwidth and F the dense bf16 throughput published for each card
(`egm/plan/gpus.json`; published figures on both sides, so every card is on the same footing).
What this leaves out, and where a prediction errs: per-step overheads that do not scale with
either figure (kernel launches, host work), cards whose kernels reach a different share of their
peak, and memory other programs take.

The paper's models (`egm.report.paper`): EGM and Instruct at 4B and 8B on their measured
architectures, with the paper's mean answer lengths (EGM 101 tokens, without EGM 42; the 4B
models' lengths are not given and are taken as the 8B ones'), and Qwen3-VL-235B-A22B-Instruct,
extrapolated from the 8B by active language-model parameters (22e9 against the 8B's), which
scales both the bytes a step reads and the prompt pass. A model whose bf16 weights, with 20 %
room for the cache and activations, exceed a card's memory is marked as not fitting and gets
no prediction there.

`--check RECORD` compares the predictions with another GPU's measured record (same method,
batch 1, every architecture and token count both have): the method's error, stated per cell.

    python -m benchmarks.projection --base benchmarks/results/latency-sizes-h100.json \\
        --out benchmarks/results/projection-from-h100.json [--check benchmarks/results/latency-h200.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from egm.io import write_json
from egm.plan.gpus import (
    ACTIVE_235B, GPUS_FILE, TOTAL_235B, fits, gpu_of, load_gpus, predict_ms, split_costs)
from egm.report.paper import MEAN_COMPLETION_TOKENS, tradeoff_point

# (paper model, measured architecture it runs as, answer tokens, how the tokens were chosen)
PAPER_MODELS = (
    ("EGM-8B", "qwen3-vl-8b", MEAN_COMPLETION_TOKENS["EGM-8B"], "paper"),
    ("Qwen3-VL-8B-Instruct", "qwen3-vl-8b", MEAN_COMPLETION_TOKENS["Qwen3-VL-8B (without EGM)"], "paper"),
    ("EGM-4B", "qwen3-vl-4b", MEAN_COMPLETION_TOKENS["EGM-8B"], "assumed: EGM-8B's"),
    ("Qwen3-VL-4B-Instruct", "qwen3-vl-4b", MEAN_COMPLETION_TOKENS["Qwen3-VL-8B (without EGM)"],
     "assumed: the 8B without EGM's"),
    ("Qwen3-VL-235B-A22B-Instruct", "qwen3-vl-8b", MEAN_COMPLETION_TOKENS["Qwen3-VL-235B-A22B (without EGM)"], "paper"),
)


def project(record: dict, gpus: dict, method: str) -> dict:
    base_name = gpu_of(record, gpus)
    base = gpus[base_name]
    costs = split_costs(record, method)
    predictions = []
    for model, arch, tokens, tokens_from in PAPER_MODELS:
        if arch not in costs:
            continue
        c = costs[arch]
        big = model.startswith("Qwen3-VL-235B")
        scale = ACTIVE_235B / c["llm_parameters"] if big else 1.0
        parameters = TOTAL_235B if big else c["parameters"]
        point = tradeoff_point(model)
        for gpu_name, gpu in gpus.items():
            ok = fits(parameters, gpu)
            measured = c["measured_ms"].get(int(tokens)) if gpu_name == base_name and not big else None
            predictions.append({
                "gpu": gpu_name, "model": model, "architecture": arch, "tokens": tokens, "tokens_from": tokens_from,
                "avg_acc": point.avg_acc if point else None, "egm": bool(point and point.egm),
                "extrapolated": big, "fits": ok,
                "latency_ms": round(predict_ms(c, base, gpu, tokens, scale), 1) if ok else None,
                "measured_ms": measured,
            })
    return {
        "base": {"device": record["device"], "gpu": base_name, "method": method, "batch": 1,
                 "record_torch": record.get("torch"), "costs": {a: {k: (round(v, 3) if isinstance(v, float) else v)
                                                                    for k, v in c.items()} for a, c in costs.items()}},
        "predictions": predictions,
    }


def check(result: dict, other: dict, gpus: dict, method: str) -> list[dict]:
    """Predictions against another GPU's measured record, per architecture and token count."""
    name = gpu_of(other, gpus)
    base = gpus[result["base"]["gpu"]]
    rows = []
    for arch, measured in split_costs(other, method).items():
        costs = result["base"]["costs"].get(arch)
        if costs is None:
            continue
        for tokens, ms in sorted(measured["measured_ms"].items()):
            predicted = predict_ms(costs, base, gpus[name], tokens)
            rows.append({"gpu": name, "architecture": arch, "tokens": tokens, "measured_ms": ms,
                         "predicted_ms": round(predicted, 1), "error_pct": round(100 * (predicted - ms) / ms, 1)})
    return rows


def figure(result: dict, gpus: dict, out_prefix: Path) -> list[Path]:
    """One panel per GPU: the paper's accuracy against predicted latency; predictions hollow,
    measured points filled, models that do not fit named in the panel."""
    import math

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from egm.report.common import save_figure

    names = list(gpus)
    cols = 3
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows + 0.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, name in zip(axes, names):
        points = [p for p in result["predictions"] if p["gpu"] == name]
        for p in points:
            if p["latency_ms"] is None or p["avg_acc"] is None:
                continue
            colour = "C0" if p["egm"] else "C1"
            ax.plot(p["latency_ms"], p["avg_acc"], marker="o", markersize=8, linestyle="none",
                    markerfacecolor="none", markeredgecolor=colour, markeredgewidth=1.6)
            if p["measured_ms"] is not None:
                ax.plot(p["measured_ms"], p["avg_acc"], marker="o", markersize=5, linestyle="none", color=colour)
            ax.annotate(f"{p['model'].replace('Qwen3-VL-', '')} ({p['tokens']:.0f} tok)", (p["latency_ms"], p["avg_acc"]),
                        textcoords="offset points", xytext=(6, 3), fontsize=6.5)
        absent = sorted({p["model"].replace("Qwen3-VL-", "") for p in points if not p["fits"]})
        if absent:
            ax.text(0.02, 0.97, "does not fit: " + ", ".join(absent), transform=ax.transAxes, fontsize=7,
                    color="0.3", va="top")
        spec = gpus[name]
        base = " (measured base)" if name == result["base"]["gpu"] else " (predicted)"
        ax.set_title(f"{name}{base}\n{spec['bandwidth_tbps']:g} TB/s, {spec['bf16_dense_tflops']:g} bf16 TFLOP/s, "
                     f"{spec['memory_gb']:g} GB", fontsize=8, loc="left")
        shown = [p["latency_ms"] for p in points if p["latency_ms"] is not None]
        ax.set_xlim(0, 1.45 * max(shown, default=1.0))  # room for the labels right of the points
        accs = [p["avg_acc"] for p in points if p["avg_acc"] is not None]
        ax.set_ylim(min(accs, default=0) - 0.8, max(accs, default=100) + 1.0)
        ax.set_xlabel("latency per request, batch 1 (ms)", fontsize=8)
        ax.set_ylabel("Avg Acc@0.5 (%), the paper's", fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    fig.suptitle(
        f"Predicted batch-1 latency from the {result['base']['gpu']} measurement ({result['base']['method']}): "
        "hollow = predicted, filled = measured; blue EGM, orange without EGM.\nAccuracy is the paper's; latency "
        "is ours, predicted from published bandwidth and bf16 throughput (benchmarks/projection.py).", fontsize=9)
    return save_figure(fig, out_prefix)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, type=Path, help="benchmarks/latency.py record of the base GPU")
    parser.add_argument("--out", required=True, type=Path, help="JSON result; the figure is written beside it")
    parser.add_argument("--check", action="append", default=[], type=Path, help="measured record of another GPU")
    parser.add_argument("--method", default="graph_compiled")
    parser.add_argument("--gpus", type=Path, default=GPUS_FILE)
    args = parser.parse_args(argv)

    gpus = load_gpus(args.gpus)
    result = {"script": "benchmarks/projection.py", "base_record": args.base.name,
              "gpus": gpus, **project(json.loads(args.base.read_text()), gpus, args.method)}
    result["check"] = [row for path in args.check
                       for row in check(result, json.loads(path.read_text()), gpus, args.method)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    figure(result, gpus, args.out.with_suffix(""))
    print(f"{'gpu':22s} {'model':30s} {'tokens':>6s} {'ms':>9s}")
    for p in result["predictions"]:
        ms = "n/a (does not fit)" if p["latency_ms"] is None else f"{p['latency_ms']:9.1f}"
        print(f"{p['gpu']:22s} {p['model']:30s} {p['tokens']:6.0f} {ms}")
    for row in result["check"]:
        print(f"check {row['gpu']} {row['architecture']} {row['tokens']} tokens: predicted {row['predicted_ms']} ms, "
              f"measured {row['measured_ms']} ms ({row['error_pct']:+.1f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
