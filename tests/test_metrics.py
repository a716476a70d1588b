import math

import pytest

from egm.metrics import acc_at_05, iou, mean_iou, read_prediction_rows, split_average, summarize_predictions


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


def test_split_average_is_unweighted():
    assert split_average({"a": 0.9, "b": 0.5}) == 0.7
    assert abs(mean_iou([0.2, 0.4]) - 0.3) < 1e-12


def _row(line, answer, bbox=(0, 0, 50, 50), tokens=10, latency=0.5):
    return {
        "line": line, "status": "ok", "answer": answer, "bbox": list(bbox), "width": 100, "height": 100,
        "completion_tokens": tokens, "latency_s": latency,
    }


def test_summarize_predictions_counts_bad_and_unparseable():
    rows = [
        _row(1, '"bbox_2d": [0, 0, 500, 500]', tokens=10, latency=1.0),  # IoU 1
        _row(2, "no idea", tokens=30, latency=3.0),  # unparseable -> IoU 0
        {"line": 3, "status": "bad_record", "error": "image missing"},
    ]
    m = summarize_predictions(rows, "m", "s")
    assert m["n_records"] == 3 and m["n_scored"] == 2 and m["n_bad_records"] == 1
    assert m["n_unparseable"] == 1
    assert m["acc_at_0.5"] == 0.5 and m["mean_iou"] == 0.5
    assert m["mean_completion_tokens"] == 20 and m["mean_latency_s"] == 2.0
    assert m["bad_records"] == [{"line": 3, "reason": "image missing"}]


def test_summarize_predictions_recomputes_iou_from_the_answer():
    row = _row(1, '"bbox_2d": [0, 0, 500, 500]')
    row["iou"] = 0.0  # a stale stored value must not be trusted
    assert summarize_predictions([row], "m", "s")["acc_at_0.5"] == 1.0


def test_summarize_predictions_all_bad_gives_nulls():
    m = summarize_predictions([{"line": 1, "status": "bad_record", "error": "x"}], "m", "s")
    assert m["acc_at_0.5"] is None and m["n_scored"] == 0


def test_read_prediction_rows_names_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"line": 1}\n{"line": 2\n')
    rows = read_prediction_rows(path)
    assert next(rows) == {"line": 1}
    with pytest.raises(ValueError, match=r"p\.jsonl:2"):
        next(rows)
