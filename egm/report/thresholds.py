"""lmms-eval's RefCOCO metrics (IoU, ACC@0.1 ... ACC@0.9, Center_ACC) beside the paper's Acc@0.5.

Read from the per-split metrics `score` writes (their "lmms_eval" entry; egm.metrics says which
of lmms-eval's definitions we follow and where we differ); no new inference. One row per model and
split, in the paper's split order, then the model's unweighted Avg over the configured splits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from egm.metrics import LMMS_METRICS
from egm.report.paper import AVG
from egm.report.common import (
    as_count, as_number, index_metrics, no_score_label, no_score_notes, order_splits, row_provenance, summarise,
)

PAPER_COLUMN = "paper Acc@0.5"
METRIC_COLUMNS = (PAPER_COLUMN, *LMMS_METRICS)
COLUMNS = ("model", "split", "scored", *METRIC_COLUMNS)
TITLE = "RefCOCO/+/g at lmms-eval's thresholds (%)"


def thresholds_notes(splits: Sequence[str]) -> list[str]:
    return [
        f"{PAPER_COLUMN}: the paper's metric, IoU strictly above 0.5 (IoU > 0.5, as in refcoco.md). "
        "lmms-eval's ACC@t counts IoU at or above t (IoU >= t), so its ACC@0.5 also counts records at IoU exactly 0.5 and is "
        f"never below {PAPER_COLUMN}.",
        "Center_ACC: the predicted box's centre lies inside the ground-truth box, edges included. "
        "IoU: the mean IoU. All in percent (lmms-eval prints fractions).",
        "Same answers, parser and pixel boxes as the paper's metric: these are lmms-eval's metrics "
        "over this run's predictions, not lmms-eval's own run (its prompt asks for 0-1 coordinates "
        "and it reads only the first [a, b, c, d]). IoU and centre containment do not depend on "
        "pixels vs normalised coordinates.",
        "An answer without a box is a miss on every metric (IoU 0). lmms-eval scores [0, 0, 0, 0] "
        "instead, which counts for its Center_ACC when the ground truth touches the image's top-left "
        "corner. Bad records (invalid data) are misses too: every line of a split is a sample (scored: "
        "lines counted).",
        f"{AVG}: unweighted mean over the {len(order_splits(splits))} configured split(s); "
        "missing if the model lacks a score on any of them.",
    ]


def thresholds_table(
    metrics: list[dict], models: Mapping[str, Mapping[str, Any]], splits: Sequence[str]
) -> pd.DataFrame:
    """Percent values per model and split, and per model the Avg row; see the module docstring.

    A split whose metrics say it has no score shows "n/a (reason)" in every metric cell; one whose
    metrics predate the lmms-eval entry shows the lmms-eval cells missing, with a note to rescore.
    """
    configured = order_splits(splits)
    index = index_metrics(metrics)
    summaries = summarise(metrics, models, configured)
    rows: list[dict[str, Any]] = []
    labels: dict[tuple[int, str], str] = {}
    stale: list[str] = []
    for summary in summaries:
        per_split: dict[str, dict[str, float]] = {}
        total_scored = 0
        for split in configured:
            entry = index.get((summary.key, split))
            if entry is None:
                continue
            lmms = entry.get("lmms_eval")
            if not isinstance(lmms, Mapping) and not entry.get("no_score"):
                stale.append(f"{summary.display} / {split}")
            lmms = lmms if isinstance(lmms, Mapping) else {}
            values = {PAPER_COLUMN: summary.acc.get(split, math.nan)}
            values |= {name: as_number(lmms.get(name)) * 100.0 for name in LMMS_METRICS}
            per_split[split] = values
            if split in summary.no_score:
                for column in METRIC_COLUMNS:
                    labels[(len(rows), column)] = no_score_label(summary.no_score[split][0])
            scored = as_count(entry.get("n_scored"))
            total_scored += scored
            rows.append({"model": summary.display, "split": split, "scored": scored, **values})
        # A mean over fewer splits would pass for the full one, so the Avg needs every configured split.
        complete = all(s in per_split for s in configured)
        average = {
            column: math.fsum(v[column] for v in per_split.values()) / len(per_split)
            if complete and per_split and not any(math.isnan(v[column]) for v in per_split.values())
            else math.nan
            for column in METRIC_COLUMNS
        }
        rows.append({"model": summary.display, "split": AVG, "scored": total_scored, **average})
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df[list(METRIC_COLUMNS)] = df[list(METRIC_COLUMNS)].astype("float64")
    df["scored"] = df["scored"].astype("int64")
    notes = thresholds_notes(configured) + no_score_notes(summaries)
    if stale:
        notes.append("No lmms-eval metrics in the metrics of " + ", ".join(stale) + " (scored before they "
                     "were computed): rescore them (snakemake -R score).")
    df.attrs["notes"] = notes
    df.attrs["cell_labels"] = labels
    df.attrs["empty_note"] = "No metrics for any configured model and split."
    df.attrs["provenance"] = row_provenance(summaries)
    return df
