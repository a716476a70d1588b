"""Issue 18 points 1 and 2: splits and RL parquet checked before predict, a split with no valid
record reported there and marked, not fatal, in its metrics and in the tables."""

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from egm.data.validation import ValidationError, unscored, validate_rl_parquet, validate_split
from egm.report.common import write_table
from egm.report.paper import SPLITS
from egm.report.tables import paper_comparison, refcoco_table


@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "images"
    (root / "coco/train2014").mkdir(parents=True)
    Image.new("RGB", (64, 48)).save(root / "coco/train2014/a.jpg")
    return str(root)


def record(**over):
    rec = {"id": 1, "image": "/data/coco/train2014/a.jpg", "sent": "the cat", "bbox": [1, 2, 30, 40],
           "width": 64, "height": 48}
    rec.update(over)
    return json.dumps(rec)


def test_split_report_names_bad_records_by_file_and_line(tmp_path, image_root):
    path = tmp_path / "refcoco_val.jsonl"
    path.write_text("\n".join([record(), "{oops", record(id=3, width=65), record(id=4, image="/data/coco/x.jpg")]) + "\n")
    report = validate_split(path, image_root)
    assert report["name"] == "refcoco_val" and report["valid"] == 1 and report["bad"] == 3
    assert report["error"] is None
    assert [b["where"] for b in report["bad_records"]] == [f"{path}:2", f"{path}:3", f"{path}:4"]
    assert "malformed JSON" in report["bad_records"][0]["reason"]
    assert "is 64x48, record says 65x48" in report["bad_records"][1]["reason"]
    assert "file not found" in report["bad_records"][2]["reason"]


def test_split_with_no_valid_record_is_reported_not_raised(tmp_path, image_root):
    empty = tmp_path / "refcocog_test.jsonl"
    empty.write_text("")
    report = validate_split(empty, image_root)
    assert report["valid"] == 0 and report["bad"] == 0
    assert report["error"] == f"{empty}: no valid record (0 bad: the file has no records)"
    all_bad = tmp_path / "refcocog_val.jsonl"
    all_bad.write_text(record(width=1) + "\n")
    assert "1 bad: line 1: image:" in validate_split(all_bad, image_root)["error"]


def test_validate_split_command_succeeds_with_the_reason_on_the_last_line(tmp_path, image_root):
    empty = tmp_path / "refcocog_test.jsonl"
    empty.write_text("\n")
    out = tmp_path / "validation" / "refcocog_test.json"
    result = subprocess.run([sys.executable, "-m", "egm", "validate-split", str(empty), "--image-root", image_root,
                             "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "refcocog_test: NO VALID RECORD" in last and str(empty) in last
    assert json.loads(out.read_text())["error"].startswith(str(empty))


def _rl_row(image="data/coco/train2014/a.jpg", width=64, height=48, truth=(10, 20, 500, 900), content=None):
    return {
        "prompt": [{"role": "user", "content": content or "<image>\nLocate the cat, output its bbox coordinates using JSON format"}],
        "images": [image],
        "reward_model": {"style": "rule", "ground_truth": list(truth)},
        "extra_info": {"split": "train", "index": 0, "id": 0, "height": height, "width": width, "question": "the cat"},
    }


def test_rl_parquet_report_and_failure(tmp_path, image_root):
    path = tmp_path / "train_grounding.parquet"
    rows = [_rl_row(), _rl_row(image="data/coco/train2014/gone.jpg"), _rl_row(width=640),
            _rl_row(truth=(1, 2, 3)), _rl_row(content="Locate the cat")]
    pq.write_table(pa.Table.from_pylist(rows), path)
    report = validate_rl_parquet(path, image_root)
    assert (report["rows"], report["valid"], report["bad"], report["error"]) == (5, 1, 4, None)
    reasons = {b["where"]: b["reason"] for b in report["bad_records"]}
    assert "file not found" in reasons[f"{path}: row 1"]
    assert "is 64x48, row says 640x48" in reasons[f"{path}: row 2"]
    assert "ground_truth" in reasons[f"{path}: row 3"]
    assert "placeholder" in reasons[f"{path}: row 4"]

    pq.write_table(pa.Table.from_pylist(rows[1:]), path)
    assert validate_rl_parquet(path, image_root)["error"].startswith(f"{path}: no usable row (4 bad: row 0:")
    pq.write_table(pa.table({"images": [["a.jpg"]]}), path)
    assert "no column(s) prompt, reward_model, extra_info" in validate_rl_parquet(path, image_root)["error"]
    path.write_bytes(b"not parquet")
    assert "not a readable parquet file" in validate_rl_parquet(path, image_root)["error"]

    out = tmp_path / "rl_train.json"
    result = subprocess.run([sys.executable, "-m", "egm", "validate-parquet", str(path), "--image-root", image_root,
                             "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and not out.exists()
    last = result.stderr.strip().splitlines()[-1]
    assert f"ERROR egm: validate-parquet failed: {path}: not a readable parquet file" in last
    assert "Traceback" not in result.stderr
    assert issubclass(ValidationError, ValueError)


def test_unscored_metrics_say_why():
    report = {"error": "x/refcocog_test.jsonl: no valid record (0 bad: the file has no records)"}
    assert unscored({"n_scored": 3, "n_answered": 3}, report) == {}
    # Bad records are samples (misses) but not answers: a split of only bad records has no score.
    assert unscored({"n_scored": 2, "n_answered": 0}, report) == {"no_score": "no valid record",
                                                                  "no_score_reason": report["error"]}
    assert unscored({"n_scored": 0, "n_answered": 0}, {"error": None})["no_score"] == "nothing scored"


def _metrics(model, split, acc, **extra):
    return {"model": model, "split": split, "acc_at_0.5": acc, "mean_iou": acc, "n_scored": 10 if acc is not None else 0,
            "n_bad_records": 0, "n_unparseable": 0, "mean_completion_tokens": 5.0, "mean_latency_s": 0.1, **extra}


def test_tables_mark_a_split_without_score_and_leave_avg_empty(tmp_path):
    models = {"egm-8b": {"display": "EGM-8B", "paper": "EGM-8B"}}
    reason = "resources/hub/x/metadata/eval/refcocog_test.jsonl: no valid record (0 bad: the file has no records)"
    metrics = [_metrics("egm-8b", s, 0.9) for s in SPLITS[:-1]]
    metrics.append(_metrics("egm-8b", "refcocog_test", None, no_score="no valid record", no_score_reason=reason))
    df = refcoco_table(metrics, models, list(SPLITS))
    assert df["refcocog_test"].isna().all() and df["Avg"].isna().all()  # honest: no Avg over 7 of 8
    write_table(df, tmp_path / "refcoco")
    md = (tmp_path / "refcoco.md").read_text()
    header, _, row = md.splitlines()[:3]
    cells = [c.strip() for c in row.strip("|").split("|")]
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert cells[columns.index("RefCOCOg test")] == "n/a (no valid record)"
    assert cells[columns.index("Avg")] == "–"
    assert cells[columns.index("RefCOCO val")] == "90.0"
    assert reason in md and "Avg is left empty" in md
    assert "n/a (no valid record)" in (tmp_path / "refcoco.tex").read_text()
    csv = (tmp_path / "refcoco.csv").read_text().splitlines()
    assert csv[1].split(",")[len(SPLITS)] == ""  # machines read a plain gap; the Markdown says why

    comparison = paper_comparison(metrics, models, list(SPLITS))
    row = comparison[comparison["split"] == "refcocog_test"].iloc[0]
    assert row["verdict"] == "n/a (no valid record)"
    write_table(comparison, tmp_path / "vs_paper")
    line = next(l for l in (tmp_path / "vs_paper.md").read_text().splitlines() if "RefCOCOg test" in l)
    assert line.count("n/a (no valid record)") == 2  # reproduced and verdict
