"""The lmms-eval thresholds table (egm.report.thresholds) from metrics that `score` computes."""

from __future__ import annotations

import json
import math

import pandas as pd

from egm.cli import main
from egm.data.validation import unscored
from egm.metrics import LMMS_METRICS, summarize_predictions
from egm.report.paper import AVG
from egm.report.thresholds import PAPER_COLUMN, thresholds_table

SPLITS = ["refcoco_val", "refcoco_testA"]
MODELS = {"m": {"display": "Model M", "paper": None, "params_b": 1.0}}


def _row(line, answer, bbox):
    return {"line": line, "status": "ok", "answer": answer, "bbox": list(bbox), "width": 100, "height": 100,
            "completion_tokens": 5, "latency_s": 0.1}


def _scored(split, rows, validation=None):
    metrics = summarize_predictions(rows, "m", split)
    metrics.update(unscored(metrics, validation))
    return metrics


def _half_iou_split(split):
    # [0, 0, 50, 99] in pixels against [0, 0, 100, 99]: IoU exactly 0.5, centre inside.
    return _scored(split, [_row(1, '"bbox_2d": [0, 0, 500, 1000]', (0, 0, 100, 99)),
                           _row(2, "no box here", (0, 0, 50, 50))])


def test_iou_at_half_is_in_lmms_acc_not_in_the_paper_column_and_avg_is_the_split_mean():
    metrics = [_half_iou_split(s) for s in SPLITS]
    df = thresholds_table(metrics, MODELS, SPLITS)
    assert list(df["split"]) == [*SPLITS, AVG] and set(LMMS_METRICS) <= set(df.columns)
    first = df.iloc[0]
    assert first[PAPER_COLUMN] == 0.0 and first["ACC@0.5"] == 50.0  # one of two records, in percent
    assert first["Center_ACC"] == 50.0 and first["scored"] == 2
    assert first["IoU"] == metrics[0]["mean_iou"] * 100
    avg = df.iloc[-1]
    assert avg["scored"] == 4 and avg["ACC@0.5"] == 50.0
    assert any("strictly above 0.5" in note for note in df.attrs["notes"])


def test_split_without_a_score_is_na_and_leaves_the_avg_empty(tmp_path):
    empty = _scored("refcoco_testA", [], validation={"error": "refcoco_testA: no valid record"})
    assert empty["no_score"] and empty["lmms_eval"] == dict.fromkeys(LMMS_METRICS)
    metrics = [_half_iou_split("refcoco_val"), empty]
    for entry in metrics:
        entry["provenance"] = {"model_key": "m", "model": {"repo_id": "org/m", "revision": "main"}}
    paths = []
    for entry in metrics:
        path = tmp_path / f"{entry['split']}.json"
        path.write_text(json.dumps(entry))
        paths.append(str(path))
    report = json.dumps({"models": MODELS, "order": list(MODELS), "splits": SPLITS})
    prefix = tmp_path / "tables" / "refcoco_thresholds"
    assert main(["report-thresholds", "--metrics", *paths, "--report", report, "--out-prefix", str(prefix)]) in (0, None)
    csv = pd.read_csv(prefix.with_suffix(".csv"))
    assert math.isnan(csv.loc[csv["split"] == AVG, "ACC@0.5"].iloc[0])
    assert csv["model_repo"].iloc[0] == "org/m"  # provenance columns, as in the other tables
    md = prefix.with_suffix(".md").read_text(encoding="utf-8")
    unscored_line = next(line for line in md.splitlines() if line.startswith("| Model M | RefCOCO testA"))
    assert unscored_line.count("n/a (no valid record)") == 1 + len(LMMS_METRICS)
    assert "no valid record" in md.split("Notes:")[1]
    assert prefix.with_suffix(".tex").read_text(encoding="utf-8").count("\\midrule") == 1


def test_metrics_scored_before_the_lmms_entry_show_missing_and_say_so():
    stale = _half_iou_split("refcoco_val")
    del stale["lmms_eval"]
    df = thresholds_table([stale], MODELS, ["refcoco_val"])
    assert df.iloc[0][PAPER_COLUMN] == 0.0 and all(math.isnan(df.iloc[0][m]) for m in LMMS_METRICS)
    assert any("rescore" in note for note in df.attrs["notes"])
