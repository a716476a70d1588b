"""Report stage: tables, the paper comparison and the trade-off figure, on synthetic metrics."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from egm.report import paper
from egm.report.figures import tradeoff_figure
from egm.report.tables import (
    NO_COUNTERPART_NOTE,
    paper_comparison,
    refcoco_table,
    write_paper_comparison,
    write_table,
)

SPLITS = list(paper.SPLITS)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def metric(model, split, acc, latency_s=0.5, tokens=100.0, iou=0.8, bad=0, unparseable=0):
    return {
        "model": model,
        "split": split,
        "n_records": 100,
        "n_scored": 100 - bad,
        "n_bad_records": bad,
        "n_unparseable": unparseable,
        "acc_at_0.5": acc,
        "mean_iou": iou,
        "mean_completion_tokens": tokens,
        "mean_latency_s": latency_s,
        "bad_records": [],
    }


MODELS = {
    "big": {"display": "Big", "paper": "EGM-8B", "params_b": 8.77},
    "small": {"display": "Small", "paper": None, "params_b": 0.5},
    "idle": {"display": "Idle", "paper": None, "params_b": 1.0},  # never run
}

# Distinct, easily summed fractions: 0.10, 0.20, ..., 0.80 -> Avg 45.0 %.
BIG_ACC = {s: (i + 1) / 10 for i, s in enumerate(SPLITS)}


def big_metrics():
    return [
        metric("big", s, a, latency_s=0.1 * (i + 1), tokens=10.0 * (i + 1), bad=i % 2,
               unparseable=1)
        for i, (s, a) in enumerate(BIG_ACC.items())
    ]


# ---------------------------------------------------------------- paper data sanity


@pytest.mark.parametrize("model", list(paper.REFCOCO_ACC))
def test_paper_table_average_agrees_with_printed_avg(model):
    assert list(paper.REFCOCO_ACC[model]) == [*paper.SPLITS, paper.AVG]
    printed = paper.REFCOCO_ACC[model]["Avg"]
    assert paper.recomputed_average(model) == pytest.approx(printed, abs=0.05)


def test_split_labels_cover_splits_in_order():
    assert list(paper.SPLIT_LABELS) == list(paper.SPLITS)
    assert len(paper.SPLITS) == 8


# ---------------------------------------------------------------- refcoco_table


def test_refcoco_table_unweighted_average_and_extras():
    metrics = big_metrics() + [metric("small", s, 0.05, latency_s=0.02) for s in SPLITS]
    df = refcoco_table(metrics, MODELS, SPLITS)
    assert list(df["model"]) == ["Big", "Small"]  # models order, "Idle" skipped
    assert list(df.columns) == ["model", *SPLITS, "Avg", "mean IoU", "tokens", "latency (ms)",
                                "bad records", "unparseable"]
    big = df.set_index("model").loc["Big"]
    for split, acc in BIG_ACC.items():
        assert big[split] == pytest.approx(acc * 100)
    assert big["Avg"] == pytest.approx(45.0)
    assert big["mean IoU"] == pytest.approx(80.0)
    assert big["tokens"] == pytest.approx(45.0)
    assert big["latency (ms)"] == pytest.approx(450.0)
    assert big["bad records"] == 4
    assert big["unparseable"] == 8
    assert df.set_index("model").loc["Small", "Avg"] == pytest.approx(5.0)


def test_refcoco_table_avg_missing_when_a_split_is_missing():
    metrics = [m for m in big_metrics() if m["split"] != "refcocog_test"]
    metrics += [metric("small", s, 0.5) for s in SPLITS]
    df = refcoco_table(metrics, MODELS, SPLITS).set_index("model")
    assert math.isnan(df.loc["Big", "refcocog_test"])
    assert math.isnan(df.loc["Big", "Avg"])
    assert df.loc["Small", "Avg"] == pytest.approx(50.0)


def test_refcoco_table_null_accuracy_and_split_order():
    # Given out of paper order, and with one split scoring nothing.
    splits = ["refcocog_val", "refcoco_val"]
    metrics = [metric("small", "refcocog_val", None), metric("small", "refcoco_val", 0.3)]
    df = refcoco_table(metrics, MODELS, splits)
    assert list(df.columns[1:3]) == ["refcoco_val", "refcocog_val"]
    assert math.isnan(df.loc[0, "refcocog_val"])
    assert math.isnan(df.loc[0, "Avg"])


def test_refcoco_table_rejects_duplicates():
    with pytest.raises(ValueError, match="duplicate"):
        refcoco_table([metric("big", "refcoco_val", 0.5)] * 2, MODELS, SPLITS)


# ---------------------------------------------------------------- paper_comparison


def test_paper_comparison_diff_and_verdict():
    egm8 = paper.REFCOCO_ACC["EGM-8B"]
    values = {s: egm8[s] / 100 for s in SPLITS}
    values["refcoco_val"] = (egm8["refcoco_val"] + 0.3) / 100  # within tolerance
    values["refcoco_testA"] = (egm8["refcoco_testA"] - 2.0) / 100  # outside
    del values["refcocog_test"]  # not run
    metrics = [metric("big", s, a) for s, a in values.items()]
    metrics += [metric("small", s, 0.1) for s in SPLITS]
    df = paper_comparison(metrics, MODELS, SPLITS, tolerance=0.5)

    assert list(df.columns) == ["model", "paper_model", "split", "source", "paper",
                                "reproduced", "diff", "verdict"]
    assert set(df["model"]) == {"Big"}  # only models with a paper counterpart
    assert list(df["split"]) == [*SPLITS, "Avg"]
    rows = df.set_index("split")
    assert rows.loc["refcoco_val", "diff"] == pytest.approx(0.3)
    assert rows.loc["refcoco_val", "verdict"] == "match"
    assert rows.loc["refcoco_testA", "diff"] == pytest.approx(-2.0)
    assert rows.loc["refcoco_testA", "verdict"] == "differs"
    assert rows.loc["refcocog_test", "verdict"] == "not run"
    assert math.isnan(rows.loc["refcocog_test", "reproduced"])
    assert rows.loc["Avg", "verdict"] == "not run"  # one of the 8 splits missing


def test_paper_comparison_avg_needs_all_paper_splits_and_unknown_key_fails():
    metrics = [metric("big", "refcoco_val", 0.9)]
    df = paper_comparison(metrics, MODELS, ["refcoco_val"])
    assert df.set_index("split").loc["Avg", "verdict"] == "not run"
    bad = {"x": {"display": "X", "paper": "No-Such-Model", "params_b": 1}}
    with pytest.raises(ValueError, match="No-Such-Model"):
        paper_comparison([], bad, SPLITS)


def test_paper_comparison_figure_only_model_has_avg_row():
    models = {"two": {"display": "Two", "paper": "EGM-2B", "params_b": 2.0}}
    df = paper_comparison([metric("two", s, 0.5) for s in SPLITS], models, SPLITS)
    assert list(df["split"]) == ["Avg"]
    assert df.loc[0, "source"] != "table"
    assert df.loc[0, "reproduced"] == pytest.approx(50.0)


# ---------------------------------------------------------------- writing


def test_write_table_csv_and_markdown(tmp_path):
    metrics = big_metrics()
    metrics[0]["mean_latency_s"] = None
    df = refcoco_table(metrics, MODELS, SPLITS)
    written = write_table(df, tmp_path / "sub" / "refcoco", title="T", notes=["a note"])
    assert [p.name for p in written] == ["refcoco.csv", "refcoco.md"]

    back = pd.read_csv(tmp_path / "sub" / "refcoco.csv")
    assert list(back.columns) == list(df.columns)
    assert list(back["model"]) == list(df["model"])
    numeric = df.columns[1:]
    pd.testing.assert_frame_equal(back[numeric], df[numeric], check_dtype=False, rtol=1e-12)

    md = (tmp_path / "sub" / "refcoco.md").read_text(encoding="utf-8")
    for label in ["model", *paper.SPLIT_LABELS.values(), "Avg", "latency (ms)"]:
        assert f"| {label} |" in md or f" {label} |" in md
    assert "## T" in md and "- a note" in md
    assert "| 10.0 |" in md and "| 45.0 |" in md  # one decimal
    assert not list(tmp_path.glob("sub/.*.tmp"))  # no temporaries left behind


def test_write_table_missing_and_signed(tmp_path):
    df = pd.DataFrame({"model": ["A"], "paper": [90.0], "reproduced": [math.nan], "diff": [-0.04]})
    write_table(df, tmp_path / "t", formats=("md",))
    md = (tmp_path / "t.md").read_text(encoding="utf-8")
    assert "| A | 90.0 | – | 0.0 |" in md
    assert not (tmp_path / "t.csv").exists()


@pytest.mark.parametrize("via", ["helper", "write_table"])
def test_empty_comparison_still_writes_files(tmp_path, via):
    models = {"tiny": {"display": "Tiny", "paper": None, "params_b": 0.001}}
    metrics = [metric("tiny", "refcoco_val", 0.05)]
    if via == "helper":
        df = write_paper_comparison(metrics, models, ["refcoco_val"], tmp_path / "comparison")
    else:  # the note must come along even when the caller passes none
        df = paper_comparison(metrics, models, ["refcoco_val"])
        write_table(df, tmp_path / "comparison", title="cmp")
    assert df.empty
    assert list(pd.read_csv(tmp_path / "comparison.csv").columns) == list(df.columns)
    assert NO_COUNTERPART_NOTE in (tmp_path / "comparison.md").read_text(encoding="utf-8")


# ---------------------------------------------------------------- figure


def _check_figure(prefix):
    png = prefix.with_name(prefix.name + ".png").read_bytes()
    pdf = prefix.with_name(prefix.name + ".pdf").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 1000
    assert pdf.startswith(b"%PDF") and len(pdf) > 1000


def test_tradeoff_figure_normal(tmp_path):
    metrics = big_metrics() + [metric("small", s, 0.05, latency_s=0.02) for s in SPLITS]
    tradeoff_figure(metrics, MODELS, tmp_path / "fig" / "tradeoff", SPLITS)
    _check_figure(tmp_path / "fig" / "tradeoff")


def test_tradeoff_figure_nan_and_no_latency(tmp_path):
    metrics = [metric("big", s, None) for s in SPLITS]  # nothing scored
    metrics += [metric("small", s, 0.5, latency_s=None) for s in SPLITS]
    tradeoff_figure(metrics, MODELS, tmp_path / "tradeoff", SPLITS)
    _check_figure(tmp_path / "tradeoff")


def test_tradeoff_figure_demo_like_single_split(tmp_path):
    models = {"tiny": {"display": "Tiny", "paper": None, "params_b": None}}
    metrics = [metric("tiny", "refcoco_val", 0.05, latency_s=0.02)]
    tradeoff_figure(metrics, models, tmp_path / "demo", ["refcoco_val"])
    _check_figure(tmp_path / "demo")
