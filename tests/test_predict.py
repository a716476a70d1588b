"""Prediction with the real tiny model: resume after SIGKILL, torn work lines, bad records."""

import json
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from egm.infer.predict import read_work_file

N_RECORDS = 30


def make_split(root, n=N_RECORDS, bad_line=None):
    images = root / "images" / "coco" / "train2014"
    images.mkdir(parents=True)
    lines = []
    for i in range(n):
        name = f"COCO_train2014_{i:012d}.jpg"
        Image.new("RGB", (96, 96), (20 * (i % 12), 100, 200)).save(images / name)
        record = {"id": i, "image": f"/data/coco/train2014/{name}", "sent": f"the shape {i}",
                  "bbox": [10, 10, 50, 60], "width": 96, "height": 96}
        lines.append(json.dumps(record))
    if bad_line is not None:
        lines[bad_line - 1] = '{"id": 999, "image": '  # truncated JSON
    split = root / "refcoco_val.jsonl"
    split.write_text("\n".join(lines) + "\n")
    manifest = root / "model.json"
    manifest.write_text(json.dumps({"files": []}))
    return split, manifest


def predict_cmd(tiny_dir, split, manifest, out_dir, root):
    options = {"prompt": "qwen3", "backend": "hf", "engine_options": {},
               "inference": {"max_tokens": 16, "temperature": 0.0, "top_p": 1.0, "top_k": 20,
                             "repetition_penalty": 1.0, "presence_penalty": 0.0, "batch_size": 1, "limit": None}}
    return [sys.executable, "-m", "egm", "predict", "--model-dir", str(tiny_dir), "--model-manifest", str(manifest),
            "--splits", str(split), "--image-root", str(root / "images"), "--out-dir", str(out_dir),
            "--options", json.dumps(options)]


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_killed_prediction_resumes_without_duplicates(tiny_dir, tmp_path):
    split, manifest = make_split(tmp_path)
    out = tmp_path / "pred"
    cmd = predict_cmd(tiny_dir, split, manifest, out, tmp_path)

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    work_files = []
    while time.monotonic() < deadline:
        work_files = list((out / ".work").glob("refcoco_val.*.jsonl")) if (out / ".work").exists() else []
        if work_files and work_files[0].read_bytes().count(b"\n") >= 5:
            break
        if proc.poll() is not None:
            pytest.fail("prediction finished before it could be killed; make the split larger")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "refcoco_val.jsonl").exists(), "a killed job must not leave a final file"
    answered_before = len(read_work_file(work_files[0]))
    assert 5 <= answered_before < N_RECORDS

    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{answered_before} already answered" in resumed.stderr
    rows = read_rows(out / "refcoco_val.jsonl")
    assert [row["line"] for row in rows] == list(range(1, N_RECORDS + 1))

    # The resumed file equals an uninterrupted run's answers (greedy decoding).
    fresh = tmp_path / "fresh"
    clean = subprocess.run(predict_cmd(tiny_dir, split, manifest, fresh, tmp_path), capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr[-3000:]
    assert [r["answer"] for r in rows] == [r["answer"] for r in read_rows(fresh / "refcoco_val.jsonl")]


def test_torn_last_work_line_is_cut_and_redone(tmp_path):
    work = tmp_path / "w.jsonl"
    work.write_text(json.dumps({"line": 1, "answer": "a"}) + "\n" + '{"line": 2, "ans')
    done = read_work_file(work)
    assert list(done) == [1]
    assert work.read_text().endswith("\n") and work.read_text().count("\n") == 1


def test_corrupt_middle_work_line_names_file_and_line(tmp_path):
    work = tmp_path / "w.jsonl"
    work.write_text('{"line": 1}\nnot json\n{"line": 3}\n')
    with pytest.raises(ValueError, match=r"w\.jsonl:2"):
        read_work_file(work)


def test_bad_record_is_kept_as_a_row_and_named_in_the_log(tiny_dir, tmp_path):
    split, manifest = make_split(tmp_path, n=4, bad_line=3)
    out = tmp_path / "pred"
    result = subprocess.run(predict_cmd(tiny_dir, split, manifest, out, tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{split}:3" in result.stderr
    rows = read_rows(out / "refcoco_val.jsonl")
    assert [r["line"] for r in rows] == [1, 2, 3, 4]
    assert rows[2]["status"] == "bad_record" and rows[2]["error"]
    assert all(r["status"] == "ok" for i, r in enumerate(rows) if i != 2)


def test_split_with_no_valid_record_costs_only_itself(tiny_dir, tmp_path):
    """Issue 18 point 1: an empty split and an all-bad split are not answered and say so; the job
    succeeds and every other split's predictions are written."""
    split, manifest = make_split(tmp_path, n=3)
    empty = tmp_path / "refcocog_test.jsonl"
    empty.write_text("")
    all_bad = tmp_path / "refcocog_val.jsonl"
    all_bad.write_text('{"id": 1, "image": "/data/coco/train2014/none.jpg", "sent": "x", "bbox": [1, 1, 5, 5], '
                       '"width": 96, "height": 96}\n')
    out = tmp_path / "pred"
    cmd = predict_cmd(tiny_dir, split, manifest, out, tmp_path)
    cmd[cmd.index("--splits") + 1: cmd.index("--splits") + 2] = [str(empty), str(split), str(all_bad)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["status"] for r in read_rows(out / "refcoco_val.jsonl")] == ["ok"] * 3
    assert (out / "refcocog_test.jsonl").read_text() == ""
    [row] = read_rows(out / "refcocog_val.jsonl")
    assert row["status"] == "bad_record" and "file not found" in row["error"]
    assert f"{empty}: no valid record" in result.stderr
    # Each split's summary, one JSON object a log line: the engine loads for the first split
    # with work, and only answering counts as answering.
    done = {s["split"]: s for s in (json.loads(line.split("done: ", 1)[1])
                                    for line in result.stderr.splitlines() if "done: " in line)}
    assert done["refcoco_val"]["newly_answered"] == 3 and done["refcoco_val"]["engine_load_s"] > 0
    assert done["refcoco_val"]["answer_s"] > 0
    assert done["refcocog_test"]["answer_s"] == done["refcocog_test"]["engine_load_s"] == 0
    last = result.stderr.strip().splitlines()[-1]
    assert "2 split(s) with no valid record, not answered" in last and "refcocog_test, refcocog_val" in last


def test_cached_answer_is_reused_only_for_the_same_record(tiny_dir, tmp_path):
    """A split fixed in place: lines whose record changed are answered again, the rest reused."""
    split, manifest = make_split(tmp_path, n=3)
    out = tmp_path / "pred"
    cmd = predict_cmd(tiny_dir, split, manifest, out, tmp_path)
    assert subprocess.run(cmd, capture_output=True, timeout=300).returncode == 0
    lines = split.read_text().splitlines()
    lines[1] = lines[1].replace('"the shape 1"', '"the other shape"')
    split.write_text("\n".join(lines) + "\n")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "line 2: the record changed since it was answered" in result.stderr
    assert "3 records, 2 already answered" in result.stderr
    rows = read_rows(out / "refcoco_val.jsonl")
    assert [r["sent"] for r in rows] == ["the shape 0", "the other shape", "the shape 2"]
    assert "the other shape" in rows[1]["prompt"]


class MockSlowFirstCallEngine:
    """A stand-in engine (no model): every call takes 0.05 s, the first one 0.6 s more, as a
    compile or a graph capture would. Answers name the request."""

    generate_each = None
    chunk_size = None
    data_parallel_size = 1

    def __init__(self):
        self.calls = []

    def generate(self, requests):
        from egm.infer.base import Completion

        started = time.perf_counter()
        time.sleep(0.05 + (0.6 if not self.calls else 0.0))
        self.calls.append([r.id for r in requests])
        took = time.perf_counter() - started
        return [Completion(text='"bbox_2d": [100, 100, 500, 600]', completion_tokens=3, latency_s=took)
                for _ in requests]

    def close(self):
        pass


def test_per_record_latency_excludes_the_engines_warm_up(tmp_path):
    """The first batch of a job carries the engine's first-call cost; the recorded latency of its
    records must not (issue 30): it is paid by a warm-up answer that is thrown away and reported apart."""
    from egm.infer.base import LazyEngine
    from egm.infer.predict import predict_model

    split, manifest = make_split(tmp_path, n=12)
    engine = MockSlowFirstCallEngine()
    with LazyEngine(lambda: engine) as lazy:
        [summary] = predict_model([split], tmp_path / "pred", str(tmp_path / "images"), lazy, "qwen3",
                                  batch_size=4, key="k")
    rows = read_rows(tmp_path / "pred" / "refcoco_val.jsonl")
    latencies = [row["latency_s"] for row in rows]
    assert len(rows) == 12 and max(latencies) < 0.3, latencies  # the first batch too
    assert summary["warmup_s"] >= 0.6
    # The warm-up answered the first batch once more, and nothing was recorded from it.
    assert engine.calls[0] == engine.calls[1] == ["0", "1", "2", "3"] and len(engine.calls) == 4
