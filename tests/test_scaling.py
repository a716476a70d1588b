"""The test-time-scaling report (egm.report.scaling) and its rules (workflow/rules/scaling.smk)."""

import json
import math
import subprocess
import sys

import pytest

from egm.report.scaling import collect_points, pareto_front, scaling_figure, scaling_table, write_scaling_table
from tests.test_report import check_figure_files
from tests.workflow_helpers import copy_workflow, plan, run_snakemake, small_demo_config, write_config

MODELS = {"small": {"display": "Small-8B"}, "big": {"display": "Big-235B"}}
SCALING_SIZE = (12.0, 5.4)  # inches, as egm.report.scaling draws it
SCALING_TITLE = "Bigger or longer? Accuracy vs latency per reasoning budget"


def metric(model, budget, acc, latency_s, iou=None, closed=0.5, tokens=50.0):
    return {"model": model, "split": "scaling-sample", "budget": budget, "n_scored": 40, "acc_at_0.5": acc,
            "mean_iou": acc if iou is None else iou, "mean_completion_tokens": tokens, "mean_latency_s": latency_s,
            "closed_share": closed, "answer_max_tokens": 256, "n_per_split": 5}


SWEEP = [
    metric("small", "unlimited", 0.90, 0.80, closed=1.0),
    metric("small", "16", 0.70, 0.30),
    metric("small", "0", 0.60, 0.20, closed=0.0),
    metric("small", "128", 0.91, 0.70),  # beats unlimited on both axes
    metric("big", "unlimited", 0.85, 2.50),
]


def test_points_are_ordered_by_model_then_budget():
    points = collect_points(SWEEP, MODELS)
    assert [(p.model, p.budget) for p in points] == [
        ("small", "0"), ("small", "16"), ("small", "128"), ("small", "unlimited"), ("big", "unlimited")]
    assert points[0].acc == pytest.approx(60.0) and points[0].latency_ms == pytest.approx(200.0)
    with pytest.raises(ValueError, match="duplicate"):
        collect_points(SWEEP + [SWEEP[0]], MODELS)


def test_pareto_front():
    front = pareto_front(collect_points(SWEEP, MODELS))
    # unlimited (slower and worse than 128) and the big model (slower, worse) are dominated.
    assert [(p.model, p.budget) for p in front] == [("small", "0"), ("small", "16"), ("small", "128")]
    assert pareto_front([]) == []


def test_table_columns_and_markdown(tmp_path):
    df = scaling_table(SWEEP, MODELS)
    assert list(df.columns) == ["model", "budget", "n", "Acc@0.5", "mean IoU", "tokens", "latency (ms)", "closed (%)"]
    assert list(df["budget"]) == ["0", "16", "128", "unlimited", "unlimited"]
    assert df["closed (%)"].iloc[0] == 0.0 and df["latency (ms)"].iloc[-1] == pytest.approx(2500.0)
    write_scaling_table(SWEEP, MODELS, tmp_path / "scaling")
    md = (tmp_path / "scaling.md").read_text()
    assert "| Small-8B | 128 | 40 | 91.0 | 91.0 | 50.0 | 700.0 | 50.0 |" in md
    assert "at most 256 tokens" in md and "5 records per split" in md
    csv = (tmp_path / "scaling.csv").read_text().splitlines()
    assert csv[0].startswith("model,budget,n,Acc@0.5,mean IoU,tokens,latency (ms),closed (%),model_key,")
    assert len(csv) == 6


def test_figure_with_curves_single_points_and_missing_values(tmp_path):
    broken = metric("small", "64", None, 0.5)  # no accuracy: left out, named in the subtitle
    scaling_figure(SWEEP + [broken], MODELS, tmp_path / "scaling")
    check_figure_files(tmp_path / "scaling", SCALING_SIZE, SCALING_TITLE)
    png = (tmp_path / "scaling.png").read_bytes()
    scaling_figure(SWEEP + [broken], MODELS, tmp_path / "again")
    assert (tmp_path / "again.png").read_bytes() == png  # no dates: identical inputs, identical file
    scaling_figure([], MODELS, tmp_path / "empty")  # nothing to plot still makes a figure
    check_figure_files(tmp_path / "empty", SCALING_SIZE, SCALING_TITLE)
    assert math.isnan(collect_points([broken], MODELS)[0].acc)


def test_report_scaling_command(tmp_path):
    paths = []
    for i, entry in enumerate(SWEEP):
        paths.append(tmp_path / f"m{i}.json")
        paths[-1].write_text(json.dumps(entry))
    report = json.dumps({"models": MODELS, "order": ["small", "big"]})
    subprocess.run([sys.executable, "-m", "egm", "report-scaling", "--metrics", *map(str, paths), "--report", report,
                    "--table-prefix", str(tmp_path / "t"), "--figure-prefix", str(tmp_path / "f")], check=True)
    assert "| Small-8B | 128 |" in (tmp_path / "t.md").read_text()
    check_figure_files(tmp_path / "f", SCALING_SIZE, SCALING_TITLE)


def test_paper_plan_sweeps_each_model_and_answers_the_big_ones_once(tmp_path):
    copy_workflow(tmp_path)
    outputs = plan(tmp_path, targets=["table_scaling"])
    egm8b = sorted(p for p in outputs if p.startswith("results/scaling/egm-8b/"))
    assert egm8b == sorted(f"results/scaling/egm-8b/budget-{b}.{ext}" for b in
                           ("0", "16", "32", "64", "128", "256", "unlimited") for ext in ("json", "jsonl"))
    big = sorted(p for p in outputs if p.startswith("results/scaling/qwen3-vl-235b"))
    assert big == sorted(f"results/scaling/qwen3-vl-235b-a22b-{kind}/budget-unlimited.{ext}"
                         for kind in ("instruct", "thinking") for ext in ("json", "jsonl"))
    assert "results/tables/scaling.md" in outputs and not any(p.startswith("results/figures/") for p in outputs)
    assert not any(p.startswith("results/predictions/") for p in outputs)  # the sweep needs no predictions


def test_single_point_must_name_evaluated_models(tmp_path):
    copy_workflow(tmp_path)
    config = small_demo_config()
    config["scaling"]["single_point"] = ["no-such-model"]
    result = run_snakemake(tmp_path, write_config(tmp_path, config), "-n")
    assert result.returncode != 0 and "no-such-model" in result.stdout + result.stderr
