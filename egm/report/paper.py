"""Numbers published in the EGM paper, kept as data so reports can set our runs beside them.

Source: "Bigger or Longer? Test-Time-Scaling is More Efficient than Model-Size-Scaling for
Visual Grounding", arXiv 2601.13633.

Two kinds of numbers live here and must not be confused:

* `REFCOCO_ACC` is transcribed from the paper's results table (printed values, exact to the
  paper's one decimal).
* `TRADEOFF_POINTS` and `MEAN_COMPLETION_TOKENS` were read off the paper's accuracy/latency
  plot and text, so they are approximate; the paper does not state the hardware its latencies
  were measured on, so they are not comparable in absolute terms with latencies measured here.
"""

from __future__ import annotations

from dataclasses import dataclass

from egm.data.splits import EVAL_SPLITS

SOURCE = (
    "Bigger or Longer? Test-Time-Scaling is More Efficient than Model-Size-Scaling for "
    "Visual Grounding (EGM), arXiv 2601.13633"
)
TABLE_SOURCE = f"{SOURCE}, results table (Acc@0.5, %)"

SPLITS = EVAL_SPLITS

# A dict (ordered like SPLITS) so callers can look a label up by split id.
SPLIT_LABELS: dict[str, str] = {
    "refcoco_val": "RefCOCO val",
    "refcoco_testA": "RefCOCO testA",
    "refcoco_testB": "RefCOCO testB",
    "refcoco+_val": "RefCOCO+ val",
    "refcoco+_testA": "RefCOCO+ testA",
    "refcoco+_testB": "RefCOCO+ testB",
    "refcocog_val": "RefCOCOg val",
    "refcocog_test": "RefCOCOg test",
}

AVG = "Avg"


def _row(*values: float) -> dict[str, float]:
    if len(values) != len(SPLITS) + 1:
        raise ValueError(f"expected {len(SPLITS)} splits + Avg, got {len(values)} values")
    return dict(zip((*SPLITS, AVG), values))


# Acc@0.5 in percent; "Avg" is the paper's printed unweighted mean of the 8 splits, kept as
# printed rather than recomputed so that a transcription slip shows up in the sanity test.
REFCOCO_ACC: dict[str, dict[str, float]] = {
    "Qwen3-VL-4B-Thinking": _row(90.0, 92.7, 85.6, 85.2, 89.5, 79.3, 87.8, 87.7, 87.2),
    "EGM-4B": _row(93.5, 95.1, 90.9, 89.7, 93.1, 84.9, 90.4, 90.8, 91.0),
    "Qwen3-VL-8B-Thinking": _row(91.0, 92.9, 86.9, 86.2, 89.3, 80.2, 87.6, 88.6, 87.8),
    "EGM-8B": _row(93.9, 95.0, 91.2, 90.1, 93.3, 85.9, 90.4, 91.2, 91.4),
    "Qwen3-VL-235B-A22B-Instruct": _row(92.9, 94.6, 90.2, 88.6, 92.4, 84.2, 90.3, 90.8, 90.5),
    "Qwen3-VL-235B-A22B-Thinking": _row(92.9, 94.1, 90.6, 89.5, 92.5, 85.5, 90.4, 90.5, 90.7),
}


@dataclass(frozen=True)
class TradeoffPoint:
    model: str
    avg_acc: float  # percent, approximate
    latency_ms: float  # mean per-sample latency, approximate, hardware unknown
    params_b: float  # billions; total parameters for MoE models
    egm: bool


# Parameter counts given by the paper for EGM-2B/4B/8B and the 235B MoE; the others are the
# nominal sizes in the model names (the 8B Qwen3-VL models share EGM-8B's 8.77B backbone).
TRADEOFF_POINTS: tuple[TradeoffPoint, ...] = (
    TradeoffPoint("EGM-2B", 89.1, 290.0, 2.0, True),
    TradeoffPoint("EGM-4B", 90.9, 490.0, 4.0, True),
    TradeoffPoint("EGM-8B", 91.4, 737.0, 8.77, True),
    TradeoffPoint("Qwen3-VL-2B-Instruct", 84.2, 175.0, 2.0, False),
    TradeoffPoint("Qwen3-VL-4B-Instruct", 87.3, 250.0, 4.0, False),
    TradeoffPoint("Qwen3-VL-8B-Instruct", 88.9, 410.0, 8.77, False),
    TradeoffPoint("Qwen3-VL-2B-Thinking", 83.6, 750.0, 2.0, False),
    TradeoffPoint("Qwen3-VL-4B-Thinking", 87.2, 1070.0, 4.0, False),
    TradeoffPoint("Qwen3-VL-8B-Thinking", 87.8, 1270.0, 8.77, False),
    TradeoffPoint("Qwen3-VL-32B-Thinking", 88.6, 7300.0, 32.0, False),
    TradeoffPoint("Qwen3-VL-235B-A22B-Instruct", 90.5, 4320.0, 235.0, False),
    TradeoffPoint("Qwen3-VL-235B-A22B-Thinking", 90.7, 13900.0, 235.0, False),
    TradeoffPoint("InternVL3-1B", 81.6, 100.0, 1.0, False),
    TradeoffPoint("InternVL3-2B", 86.7, 125.0, 2.0, False),
    TradeoffPoint("InternVL3-32B", 91.2, 1600.0, 32.0, False),
    TradeoffPoint("InternVL3-78B", 91.4, 2000.0, 78.0, False),
)

# Approximate mean generated tokens per query from the paper's text. The text speaks of "the
# 8B and 235B models without EGM" without naming the variant, so the keys say just that.
MEAN_COMPLETION_TOKENS: dict[str, float] = {
    "EGM-8B": 101.0,
    "Qwen3-VL-8B (without EGM)": 42.0,
    "Qwen3-VL-235B-A22B (without EGM)": 42.0,
}


def paper_models() -> list[str]:
    """Every model name the paper gives a number for (table or figure), table first."""
    names = list(REFCOCO_ACC)
    names += [p.model for p in TRADEOFF_POINTS if p.model not in REFCOCO_ACC]
    return names


def tradeoff_point(paper_model: str) -> TradeoffPoint | None:
    for point in TRADEOFF_POINTS:
        if point.model == paper_model:
            return point
    return None


def paper_acc(paper_model: str, split: str) -> tuple[float, str] | None:
    """(value %, where it comes from) for one split or "Avg"; None if the paper has no value.

    The table is preferred; a figure-only model has an approximate Avg and no per-split values.
    """
    row = REFCOCO_ACC.get(paper_model)
    if row is not None and split in row:
        return row[split], "table"
    point = tradeoff_point(paper_model)
    if split == AVG and point is not None:
        return point.avg_acc, "figure (approx.)"
    return None
