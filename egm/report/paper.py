"""Numbers published for the EGM paper, kept as data so reports can set our runs beside them.

Source: "Bigger or Longer? Test-Time-Scaling is More Efficient than Model-Size-Scaling for
Visual Grounding", arXiv 2601.13633, and its released model cards.

The results table exists in two published versions (VERSIONS), which differ in several cells;
a comparison names the one it uses (`report.paper_version` in the config):

* "seed_readme": the table of the seed README (ShortResult.png, the same in EGM-AReaL and
  zgq1879/EGM), the version the paper's abstract quotes (EGM-8B 91.4, the 235B-Instruct 90.5).
* "model_cards": the tables of the later release's model cards (nvidia/EGM-8B, nvidia/EGM-4B),
  e.g. EGM-8B RefCOCO testA 95.6 (seed: 95.0), the 235B-Instruct Avg 88.2 (seed: 90.5). Four of
  its printed Avgs are not the mean of their row (PRINTED_AVG_OFF); they are kept as printed.

`TRADEOFF_POINTS` and `MEAN_COMPLETION_TOKENS` were read off the paper's accuracy/latency plot
and text, so they are approximate; the paper does not state the hardware its latencies were
measured on, so they are not comparable in absolute terms with latencies measured here. Where a
plotted model has a row in the table, its accuracy is taken from the table of the version in use
(`tradeoff_points`), so one version gives one number per model: the plot reads 90.9 for EGM-4B,
the seed table prints 91.0 (the cards print 90.9).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from egm.data.splits import EVAL_SPLITS

SOURCE = (
    "Bigger or Longer? Test-Time-Scaling is More Efficient than Model-Size-Scaling for "
    "Visual Grounding (EGM), arXiv 2601.13633"
)

SPLITS = EVAL_SPLITS

# A dict (ordered like SPLITS) so callers can look a label up by split id: "refcoco+_testA" ->
# "RefCOCO+ testA", the data set as the paper writes it, then the split.
DATASET_LABELS = {"refcoco": "RefCOCO", "refcoco+": "RefCOCO+", "refcocog": "RefCOCOg"}
SPLIT_LABELS: dict[str, str] = {
    split: f"{DATASET_LABELS[dataset]} {part}" for split in SPLITS for dataset, part in [split.split("_", 1)]
}

AVG = "Avg"


def _row(*values: float) -> dict[str, float]:
    if len(values) != len(SPLITS) + 1:
        raise ValueError(f"expected {len(SPLITS)} splits + Avg, got {len(values)} values")
    return dict(zip((*SPLITS, AVG), values))


@dataclass(frozen=True)
class PaperTable:
    """One published version of the results table: Acc@0.5 in percent per model and split, and
    "Avg" as printed (not recomputed, so that a transcription slip shows up in the sanity test)."""

    key: str
    source: str
    rows: dict[str, dict[str, float]]


VERSIONS: dict[str, PaperTable] = {
    "seed_readme": PaperTable(
        "seed_readme",
        f"{SOURCE}: the seed README's results table (ShortResult.png in EGM-AReaL and zgq1879/EGM), "
        "the version the abstract quotes",
        {
            "Qwen3-VL-4B-Thinking": _row(90.0, 92.7, 85.6, 85.2, 89.5, 79.3, 87.8, 87.7, 87.2),
            "EGM-4B": _row(93.5, 95.1, 90.9, 89.7, 93.1, 84.9, 90.4, 90.8, 91.0),
            "Qwen3-VL-8B-Thinking": _row(91.0, 92.9, 86.9, 86.2, 89.3, 80.2, 87.6, 88.6, 87.8),
            "EGM-8B": _row(93.9, 95.0, 91.2, 90.1, 93.3, 85.9, 90.4, 91.2, 91.4),
            "Qwen3-VL-235B-A22B-Instruct": _row(92.9, 94.6, 90.2, 88.6, 92.4, 84.2, 90.3, 90.8, 90.5),
            "Qwen3-VL-235B-A22B-Thinking": _row(92.9, 94.1, 90.6, 89.5, 92.5, 85.5, 90.4, 90.5, 90.7),
        },
    ),
    "model_cards": PaperTable(
        "model_cards",
        f"{SOURCE}: the released model cards' results tables (nvidia/EGM-8B: the 8B rows and the "
        "235B baselines; nvidia/EGM-4B: the 4B rows)",
        {
            "Qwen3-VL-4B-Thinking": _row(90.0, 92.7, 85.6, 85.2, 89.5, 79.3, 87.0, 87.7, 87.2),
            "EGM-4B": _row(93.5, 95.1, 90.0, 89.7, 93.1, 84.9, 90.4, 90.8, 90.9),
            "Qwen3-VL-8B-Thinking": _row(91.0, 92.5, 86.6, 86.2, 91.2, 80.5, 87.8, 88.6, 87.8),
            "EGM-8B": _row(93.9, 95.6, 91.2, 90.5, 93.5, 86.3, 90.8, 91.4, 91.4),
            "Qwen3-VL-235B-A22B-Instruct": _row(90.4, 94.6, 82.2, 86.4, 92.1, 78.5, 90.5, 90.5, 88.2),
            "Qwen3-VL-235B-A22B-Thinking": _row(93.4, 94.1, 90.6, 89.5, 91.4, 85.2, 90.4, 90.5, 90.7),
        },
    ),
}
DEFAULT_VERSION = "seed_readme"
# Rows whose printed Avg is not the mean of their 8 splits (to the printed decimal): the model
# cards print the seed table's Avg beside changed split values. version -> models.
PRINTED_AVG_OFF: dict[str, tuple[str, ...]] = {
    "seed_readme": (),
    "model_cards": ("Qwen3-VL-4B-Thinking", "Qwen3-VL-8B-Thinking", "EGM-8B", "Qwen3-VL-235B-A22B-Thinking"),
}


def paper_table(version: str = DEFAULT_VERSION) -> PaperTable:
    try:
        return VERSIONS[version]
    except KeyError:
        raise ValueError(f"unknown paper version {version!r}; known: {', '.join(VERSIONS)}") from None


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


def tradeoff_points(version: str = DEFAULT_VERSION) -> tuple[TradeoffPoint, ...]:
    """The plot's points, with the accuracy of models in the table taken from `version`'s table."""
    rows = paper_table(version).rows
    return tuple(replace(p, avg_acc=rows[p.model][AVG]) if p.model in rows else p for p in TRADEOFF_POINTS)


def paper_models(version: str = DEFAULT_VERSION) -> list[str]:
    """Every model name the paper gives a number for (table or figure), table first."""
    names = list(paper_table(version).rows)
    names += [p.model for p in TRADEOFF_POINTS if p.model not in names]
    return names


def tradeoff_point(paper_model: str, version: str = DEFAULT_VERSION) -> TradeoffPoint | None:
    for point in tradeoff_points(version):
        if point.model == paper_model:
            return point
    return None


def paper_acc(paper_model: str, split: str, version: str = DEFAULT_VERSION) -> tuple[float, str] | None:
    """(value %, where it comes from) for one split or "Avg"; None if the paper has no value.

    The table (of `version`) is preferred; a figure-only model has an approximate Avg and no
    per-split values.
    """
    row = paper_table(version).rows.get(paper_model)
    if row is not None and split in row:
        return row[split], "table"
    point = tradeoff_point(paper_model, version)
    if split == AVG and point is not None:
        return point.avg_acc, "figure (approx.)"
    return None
