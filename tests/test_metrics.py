import math

import pytest

from egm.metrics import (
    LMMS_METRICS,
    acc_at_05,
    center_inside,
    evaluate_answer,
    hit_at,
    iou,
    lmms_record,
    read_prediction_rows,
    summarize_predictions,
)


def test_iou_basic_cases():
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0  # touching edges, no +1 convention
    assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == 50 / 150


def test_iou_reversed_and_empty_boxes():
    assert iou([10, 10, 0, 0], [0, 0, 10, 10]) == 0.0
    assert iou([5, 5, 5, 5], [5, 5, 5, 5]) == 0.0  # union 0


def test_acc_is_strictly_greater_than_half():
    assert acc_at_05([0.5, 0.5000001, 0.9, 0.0]) == 0.5
    assert math.isnan(acc_at_05([]))


def _row(line, answer, bbox=(0, 0, 50, 50), tokens=10, latency=0.5):
    return {
        "line": line, "status": "ok", "answer": answer, "bbox": list(bbox), "width": 100, "height": 100,
        "completion_tokens": tokens, "latency_s": latency,
    }


def test_summarize_predictions_counts_bad_and_unparseable():
    rows = [
        _row(1, '"bbox_2d": [0, 0, 500, 500]', tokens=10, latency=1.0),  # IoU 1
        _row(2, "no idea", tokens=30, latency=3.0),  # unparseable -> IoU 0
        {"line": 3, "where": "s.jsonl:3", "status": "bad_record", "error": "image missing"},
    ]
    m = summarize_predictions(rows, "m", "s")
    # Every line is a sample (the authors' denominator): the bad record is a miss, not left out.
    assert m["n_records"] == 3 and m["n_scored"] == 3 and m["n_answered"] == 2 and m["n_bad_records"] == 1
    assert m["n_unparseable"] == 1
    assert m["acc_at_0.5"] == 1 / 3 and m["mean_iou"] == 1 / 3
    # Tokens and latency are the answered records' (the bad one was never sent).
    assert m["mean_completion_tokens"] == 20 and m["mean_latency_s"] == 2.0
    assert m["bad_records"] == [{"where": "s.jsonl:3", "line": 3, "reason": "image missing"}]


def test_summarize_predictions_recomputes_iou_from_the_answer():
    row = _row(1, '"bbox_2d": [0, 0, 500, 500]')
    row["iou"] = 0.0  # a stale stored value must not be trusted
    assert summarize_predictions([row], "m", "s")["acc_at_0.5"] == 1.0


def test_summarize_predictions_all_bad_gives_nulls():
    m = summarize_predictions([{"line": 1, "status": "bad_record", "error": "x"}], "m", "s")
    # A miss over one sample; nothing answered, so the split has no score (egm.data.validation.unscored).
    assert m["acc_at_0.5"] == 0.0 and m["n_scored"] == 1 and m["n_answered"] == 0
    assert m["mean_completion_tokens"] is None


def test_read_prediction_rows_names_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"line": 1}\n{"line": 2\n')
    rows = read_prediction_rows(path)
    assert next(rows) == {"line": 1}
    with pytest.raises(ValueError, match=r"p\.jsonl:2"):
        next(rows)


# lmms-eval's RefCOCO metrics (egm.metrics docstring): hand-made boxes at the thresholds' edges.


def test_lmms_threshold_is_inclusive_where_the_paper_is_strict():
    gt, pred = [0, 0, 100, 99], [0, 0, 50, 99]
    assert iou(pred, gt) == 0.5  # exactly, in binary floating point too
    assert hit_at(iou(pred, gt), 0.5)
    assert acc_at_05([iou(pred, gt)]) == 0.0
    record = lmms_record(iou(pred, gt), pred, gt)
    assert record["ACC@0.5"] == 1.0 and record["ACC@0.7"] == 0.0 and record["ACC@0.3"] == 1.0
    assert set(record) == set(LMMS_METRICS)


def test_center_on_the_edge_counts_and_just_outside_does_not():
    gt = [0, 0, 50, 50]
    assert center_inside([40, 40, 60, 60], gt)  # centre (50, 50): the corner itself
    assert center_inside([50, 10, 50, 20], gt)  # centre on the right edge
    assert not center_inside([41, 10, 61, 20], gt)  # centre x 51
    assert center_inside([60, 60, 40, 40], gt)  # a reversed box has the same centre


def test_no_box_misses_every_lmms_metric_even_at_the_top_left_corner():
    # lmms-eval's [0, 0, 0, 0] stand-in would put the centre on this ground truth's corner.
    record = lmms_record(0.0, None, [0, 0, 50, 50])
    assert record == dict.fromkeys(LMMS_METRICS, 0.0)


def test_summarize_predictions_lmms_metrics_over_scored_records():
    rows = [
        # 0-1000 -> pixels on a 100 x 100 image: [0, 0, 50, 99] against [0, 0, 100, 99], IoU 0.5.
        _row(1, '"bbox_2d": [0, 0, 500, 1000]', bbox=(0, 0, 100, 99)),
        _row(2, "no idea", bbox=(0, 0, 50, 50)),  # unparseable, ground truth at the top-left corner
        _row(3, '"bbox_2d": [400, 400, 600, 600]', bbox=(0, 0, 50, 50)),  # centre on the corner, IoU 100/2800
        {"line": 4, "status": "bad_record", "error": "image missing"},
    ]
    m = summarize_predictions(rows, "m", "s")
    lmms = m["lmms_eval"]
    assert set(lmms) == set(LMMS_METRICS)
    # Over all 4 samples: the bad record misses every metric.
    assert m["acc_at_0.5"] == 0.0 and lmms["ACC@0.5"] == 1 / 4
    assert lmms["ACC@0.1"] == 1 / 4 and lmms["ACC@0.9"] == 0.0  # row 3 is below 0.1
    assert lmms["Center_ACC"] == 2 / 4  # rows 1 and 3; the unparseable row 2 and the bad row 4 miss
    assert lmms["IoU"] == m["mean_iou"]


def test_summarize_predictions_all_bad_gives_zero_lmms_metrics():
    m = summarize_predictions([{"line": 1, "status": "bad_record", "error": "x"}], "m", "s")
    assert m["lmms_eval"] == dict.fromkeys(LMMS_METRICS, 0.0)
    assert summarize_predictions([], "m", "s")["lmms_eval"] == dict.fromkeys(LMMS_METRICS)


def test_evaluate_answer_unparseable_scores_zero():
    assert evaluate_answer("I cannot tell.", [0, 0, 10, 10], 100, 100) == {"parsed_box": None, "pred_box": None, "iou": 0.0}


def test_evaluate_answer_exact_box():
    result = evaluate_answer('"bbox_2d": [100, 100, 500, 500]', [10.0, 10.0, 50.0, 50.0], 100, 100)
    assert result["pred_box"] == [10.0, 10.0, 50.0, 50.0]
    assert result["iou"] == 1.0
