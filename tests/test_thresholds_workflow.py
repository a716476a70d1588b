"""The lmms-eval thresholds table through real Snakemake: its own target, from the metrics the
demo's score jobs write, with a split that has no score."""

import json
import math

import pandas as pd
import pytest

from egm.metrics import LMMS_METRICS
from egm.report.paper import AVG
from egm.report.thresholds import PAPER_COLUMN
from tests.workflow_helpers import copy_workflow, plan, run_snakemake, small_demo_config, write_config

DATASET = "egm-demo/EGM_Datasets"
OUTPUTS = [f"results/tables/refcoco_thresholds{ext}" for ext in (".csv", ".md", ".tex")]


@pytest.mark.slow
def test_thresholds_table_target_on_a_small_demo(tmp_path):
    copy_workflow(tmp_path)
    config = small_demo_config()
    config["train"]["runs"] = {}  # the table needs only the metrics; the base model has them
    config["report"]["expected"] = {}
    config["splits"] = ["refcoco_val", "refcocog_test"]
    configfile = write_config(tmp_path, config)
    result = run_snakemake(tmp_path, configfile, "--show-failed-logs", "resources/manifests/demo-mirror.json")
    assert result.returncode == 0, result.stderr[-4000:]
    (tmp_path / "resources/demo_mirror" / DATASET / "metadata/eval/refcocog_test.jsonl").write_text("")

    result = run_snakemake(tmp_path, configfile, "--show-failed-logs", "table_refcoco_thresholds")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "rule table_refcoco:" not in result.stderr  # its own target, not the paper table's
    table = pd.read_csv(tmp_path / OUTPUTS[0]).set_index("split")
    scored = json.loads((tmp_path / "results/metrics/tiny-base/refcoco_val.json").read_text())
    assert scored["n_scored"] == table.loc["refcoco_val", "scored"]
    for name in LMMS_METRICS:
        assert table.loc["refcoco_val", name] == pytest.approx(scored["lmms_eval"][name] * 100)
        assert math.isnan(table.loc["refcocog_test", name]) and math.isnan(table.loc[AVG, name])
    assert table.loc["refcoco_val", PAPER_COLUMN] <= table.loc["refcoco_val", "ACC@0.5"]
    md = (tmp_path / OUTPUTS[1]).read_text(encoding="utf-8")
    assert "n/a (no valid record)" in md and "IoU > 0.5" in md and "IoU >= t" in md
    # Removed, the table's target plans exactly its own files again.
    for path in OUTPUTS:
        (tmp_path / path).unlink()
    assert sorted(plan(tmp_path, configfile, targets=["table_refcoco_thresholds"])) == sorted(OUTPUTS)
