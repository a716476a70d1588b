"""Issue 18 point 4: a failed job's reason is one readable line at the end of its log, without a
traceback when the data or files are at fault; the profiles print failed logs on the console."""

import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def egm(*args, cwd):
    return subprocess.run([sys.executable, "-m", "egm", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def last_line(result):
    return result.stderr.strip().splitlines()[-1]


def test_expected_failure_is_one_line_without_traceback(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data/coco.tar.part_ab").write_bytes(b"x")
    (tmp_path / "fetch.json").write_text('{"files": [{"path": "coco.tar.part_ab", "bytes": 1, "sha256": "0"}]}')
    result = egm("extract", "--archive", "coco", "--dataset-dir", "data", "--fetch-manifest", "fetch.json",
                 "--dest", "images", "--manifest", "out.json", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    line = last_line(result)
    assert line.endswith("ERROR egm: extract failed: data: coco.tar is split into parts but 1 part(s) are missing: "
                         "coco.tar.part_aa")

    result = egm("fetch", "--repo-id", "org/data", "--repo-type", "dataset", "--mirror", "site-mirror",
                 "--dest", "d", "--manifest", "m.json", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "ERROR egm: fetch failed: offline mirror site-mirror has no repository 'org/data'" in last_line(result)


def test_unexpected_failure_keeps_its_traceback_and_ends_with_the_reason(tmp_path):
    (tmp_path / "p.jsonl").write_text("{not json\n")
    result = egm("score", "p.jsonl", "m.json", "--model", "m", "--split", "refcoco_val", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" in result.stderr  # a code path's failure: the traceback is for the developer
    assert last_line(result).split(" ", 2)[2] == (
        "ERROR egm: score failed: ValueError: p.jsonl:1: malformed prediction line: "
        "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)")


def test_profiles_print_failed_logs():
    for profile in ("local-gpu", "slurm"):
        settings = yaml.safe_load((REPO / "profiles" / profile / "config.yaml").read_text())
        assert settings["show-failed-logs"] is True, profile
