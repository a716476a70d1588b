"""Report stage: tables, the paper comparison and the trade-off figure, on synthetic metrics."""

from __future__ import annotations

import math
import re
import zlib

import pandas as pd
import pytest

from egm.provenance import FIELDS
from egm.report import paper
from egm.report.common import latex_escape, write_table
from egm.report.tables import AMODAL_NOTE, NO_COUNTERPART_NOTE, expected_comparison, paper_comparison, refcoco_table
from egm.report.tradeoff import tradeoff_figure

SPLITS = list(paper.SPLITS)


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


@pytest.mark.parametrize("version", list(paper.VERSIONS))
def test_paper_table_average_agrees_with_printed_avg(version):
    """Each row's printed Avg is its mean to the printed decimal, except exactly the rows the data
    says are off (a transcription slip shows up here either way)."""
    table = paper.paper_table(version)
    off = set()
    for model, row in table.rows.items():
        assert list(row) == [*paper.SPLITS, paper.AVG]
        if math.fsum(row[s] for s in paper.SPLITS) / len(paper.SPLITS) != pytest.approx(row["Avg"], abs=0.05):
            off.add(model)
    assert off == set(paper.PRINTED_AVG_OFF[version])


def test_both_versions_cover_the_same_models_and_one_number_per_model():
    assert list(paper.VERSIONS["seed_readme"].rows) == list(paper.VERSIONS["model_cards"].rows)
    assert paper.DEFAULT_VERSION == "seed_readme"
    for version, table in paper.VERSIONS.items():
        for model, row in table.rows.items():
            point = paper.tradeoff_point(model, version)
            assert point is None or point.avg_acc == row[paper.AVG], (version, model)
    # The cells the two versions are known to differ in (issue 27).
    assert paper.paper_acc("EGM-8B", "refcoco_testA", "seed_readme")[0] == 95.0
    assert paper.paper_acc("EGM-8B", "refcoco_testA", "model_cards")[0] == 95.6
    assert paper.paper_acc("Qwen3-VL-235B-A22B-Instruct", "Avg", "model_cards")[0] == 88.2
    with pytest.raises(ValueError, match="unknown paper version"):
        paper.paper_table("arxiv_v9")


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
    egm8 = paper.paper_table().rows["EGM-8B"]
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
    assert [p.name for p in written] == ["refcoco.csv", "refcoco.md", "refcoco.tex"]

    back = pd.read_csv(tmp_path / "sub" / "refcoco.csv")
    assert list(back.columns) == [*df.columns, *FIELDS]  # each row's provenance after the table
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


def test_empty_comparison_still_writes_files_and_says_what_was_not_run(tmp_path):
    models = {"tiny": {"display": "Tiny", "paper": None, "params_b": 0.001}}
    metrics = [metric("tiny", "refcoco_val", 0.05)]
    df = paper_comparison(metrics, models, ["refcoco_val"])
    write_table(df, tmp_path / "comparison", title="cmp")  # the notes come along via df.attrs
    assert df.empty
    assert list(pd.read_csv(tmp_path / "comparison.csv").columns) == [*df.columns, *FIELDS]
    md = (tmp_path / "comparison.md").read_text(encoding="utf-8")
    assert NO_COUNTERPART_NOTE in md and AMODAL_NOTE in md
    # Every paper table model is named as not run, since none has a counterpart here.
    for name in paper.paper_table().rows:
        assert name in md
    assert "\\multicolumn" in (tmp_path / "comparison.tex").read_text(encoding="utf-8")


def test_comparison_names_only_the_paper_models_without_counterpart():
    df = paper_comparison(big_metrics(), MODELS, SPLITS)
    not_run = next(n for n in df.attrs["notes"] if n.startswith("Not run"))
    assert "EGM-8B" not in not_run and "EGM-4B" in not_run


# ---------------------------------------------------------------- provenance and LaTeX


def provenance(commit="a" * 40, engine_version="5.24.0", image_sha="b" * 64):
    return {
        "model_key": "big",
        "model": {"repo_id": "org/big", "revision": "main", "commit": commit, "manifest_sha256": "c" * 64},
        "data": {"repo_id": "org/data", "revision": "v1", "commit": "d" * 40},
        "job": {
            "egm": {"version": "0.1.0", "commit": "e" * 40, "dirty": True},
            "image": {"name": "cpu-123", "path": "x.sif", "sha256": image_sha},
            "engine": {"backend": "hf", "package": "transformers", "version": engine_version},
            "device": {"name": "1x GPU"},
            "config_sha256": "f" * 64,
        },
    }


def test_table_rows_carry_their_provenance_into_csv_markdown_and_latex(tmp_path):
    metrics = big_metrics()
    for entry in metrics:
        entry["provenance"] = provenance()
    metrics[-1]["provenance"] = provenance(engine_version="5.25.0")  # one split from another engine
    df = refcoco_table(metrics, MODELS, SPLITS)
    write_table(df, tmp_path / "t")
    row = pd.read_csv(tmp_path / "t.csv", dtype=str).iloc[0]
    assert row["model_commit"] == "a" * 40 and row["data_commit"] == "d" * 40
    assert row["data_revision"] == "v1" and row["image_sha256"] == "b" * 64
    assert row["engine"] == "hf transformers 5.24.0; hf transformers 5.25.0"  # mixed runs show
    assert row["egm"] == "0.1.0 @ " + "e" * 40 + "-dirty" and row["model_key"] == "big"
    md = (tmp_path / "t.md").read_text(encoding="utf-8")
    assert "org/big @ main: " + "a" * 12 + " |" in md and "cpu-123 (" + "b" * 12 + ")" in md
    assert "a" * 13 not in md  # shortened in Markdown
    tex = (tmp_path / "t.tex").read_text(encoding="utf-8")
    assert "% Provenance of Big:" in tex and "a" * 40 in tex


def test_trained_model_is_traced_by_its_manifest_digest():
    entry = provenance(commit=None)
    row = refcoco_table([{**m, "provenance": entry} for m in big_metrics()], MODELS, SPLITS).attrs["provenance"]["Big"]
    assert row["model_commit"] == "manifest:" + "c" * 64


def test_latex_table_escapes_and_aligns(tmp_path):
    df = pd.DataFrame({"model": ["a_b & 50%"], "diff": [-1.25], "gap": [math.nan]})
    write_table(df, tmp_path / "t", formats=("tex",), title="T", notes=["x ≤ 1"])
    tex = (tmp_path / "t.tex").read_text(encoding="utf-8")
    assert "\\begin{tabular}{lrr}" in tex and "\\toprule" in tex and tex.rstrip().endswith("\\end{tabular}")
    assert "a\\_b \\& 50\\% & -1.2 & -- \\\\" in tex
    assert "% Note: x ≤ 1" in tex
    assert latex_escape("∞ {x}") == "$\\infty$ \\{x\\}"


# ---------------------------------------------------------------- expected ranges (the demo)


def test_expected_comparison_verdicts():
    models = {**MODELS, "small": {"display": "Small", "paper": None, "params_b": 0.5}}
    metrics = big_metrics() + [metric("small", s, 0.05) for s in SPLITS]
    expected = {
        "big": {"acc": [40, 50], "parseable": [99.5, 100]},  # Avg 45.0 within; 1 unparseable per split
        "small": {"acc": [6, 10], "tokens": [0, 200]},
        "idle": {"acc": [0, 1]},
    }
    df = expected_comparison(metrics, models, SPLITS, expected)
    got = {(r.model, r.metric): (round(r.reproduced, 3), r.verdict) for r in df.itertuples()}
    big_parseable = 100.0 * (sum(100 - i % 2 for i in range(8)) - 8) / sum(100 - i % 2 for i in range(8))
    assert got[("Big", "Avg Acc@0.5 (%)")] == (45.0, "within")
    assert got[("Big", "parseable answers (%)")] == (round(big_parseable, 3), "outside")
    assert got[("Small", "Avg Acc@0.5 (%)")] == (5.0, "outside")
    assert got[("Small", "mean tokens")] == (100.0, "within")
    assert got[("Idle", "Avg Acc@0.5 (%)")][1] == "not run"
    with pytest.raises(ValueError, match="nobody"):
        expected_comparison(metrics, models, SPLITS, {"nobody": {"acc": [0, 1]}})
    with pytest.raises(ValueError, match="speed"):
        expected_comparison(metrics, models, SPLITS, {"big": {"speed": [0, 1]}})


def test_expected_relative_ranges_and_verdict_line(tmp_path):
    # Big's Avg is 45.0, Small's 5.0: Big is 40 points over Small, Small 40 under Big.
    models = {**MODELS, "small": {"display": "Small", "paper": None, "params_b": 0.5}}
    metrics = big_metrics() + [metric("small", s, 0.05) for s in SPLITS]
    expected = {"big": {"acc_over": {"small": [20, 100]}}, "small": {"acc_over": {"big": [-2, 100]}}}
    df = expected_comparison(metrics, models, SPLITS, expected)
    got = {(r.model, r.metric): (round(r.reproduced, 3), r.verdict) for r in df.itertuples()}
    assert got == {("Big", "Avg Acc@0.5 minus Small's (points)"): (40.0, "within"),
                   ("Small", "Avg Acc@0.5 minus Big's (points)"): (-40.0, "outside")}
    lead = "Verdict: 1 of 2 value(s) outside their expected ranges: Small, Avg Acc@0.5 minus Big's (points): -40.0 (expected -2 to 100)."
    assert df.attrs["lead"] == lead
    write_table(df, tmp_path / "t", formats=("md", "tex"), title="T")
    # The verdict comes right under the title, before the table.
    assert (tmp_path / "t.md").read_text().splitlines()[:3] == ["## T", "", f"**{lead}**"]
    assert f"% {lead}" in (tmp_path / "t.tex").read_text()
    passing = expected_comparison(metrics, models, SPLITS, {"big": {"acc_over": {"small": [20, 100]}}})
    assert passing.attrs["lead"] == "Verdict: all 1 value(s) within their expected ranges."
    with pytest.raises(ValueError, match="nobody"):
        expected_comparison(metrics, models, SPLITS, {"big": {"acc_over": {"nobody": [0, 1]}}})


# ---------------------------------------------------------------- figure


def _pdf_literals(array: bytes) -> bytes:
    """The bytes of the `(...)` string literals in a PDF text array, escapes resolved, joined."""
    escapes = {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"b": b"\b", b"f": b"\f"}
    out, i = bytearray(), 0
    while i < len(array):
        if array[i:i + 1] != b"(":
            i += 1
            continue
        depth, i = 1, i + 1
        while i < len(array):
            char = array[i:i + 1]
            if char == b"\\":
                octal = re.match(rb"[0-7]{1,3}", array[i + 1:i + 4])
                if octal:
                    out.append(int(octal.group(), 8))
                    i += 1 + len(octal.group())
                else:
                    out += escapes.get(array[i + 1:i + 2], array[i + 1:i + 2])
                    i += 2
                continue
            depth += char == b"("
            depth -= char == b")"
            i += 1
            if depth == 0:
                break
            out += char
    return bytes(out)


def pdf_text_runs(pdf: bytes) -> list[str]:
    """Each text-showing operation (`[...] TJ`, `(...) Tj`) of the PDF's content streams, as text.

    matplotlib compresses its content streams and kerns text into arrays of single glyphs, so the
    title is not a byte string of the file: the streams are inflated and each array joined.
    """
    runs = []
    for stream in re.findall(rb"stream\r?\n(.*?)\r?\nendstream", pdf, re.S):
        try:
            content = zlib.decompress(stream)
        except zlib.error:
            continue  # not a Flate stream (fonts, images): no text operators to read
        for array in re.findall(rb"(\[.*?\]\s*TJ|\(.*?\)\s*Tj)", content, re.S):
            runs.append(_pdf_literals(array).decode("latin-1"))
    return runs


def check_figure_files(prefix, size_inches, title):
    """`prefix`.png decodes to the figure's size in pixels and is not blank; `prefix`.pdf is a PDF
    whose text carries the figure's title."""
    from PIL import Image, ImageChops

    from egm.report.common import DPI

    png = prefix.with_name(prefix.name + ".png")
    with Image.open(png) as image:
        assert image.format == "PNG"
        assert image.size == (round(size_inches[0] * DPI), round(size_inches[1] * DPI))
        rgb = image.convert("RGB")
    drawn = ImageChops.difference(rgb, Image.new("RGB", rgb.size, "white")).convert("L").point(lambda v: v > 0)
    ink = sum(drawn.histogram()[1:]) / (rgb.size[0] * rgb.size[1])
    box = drawn.getbbox()
    assert box and 0.01 < ink < 0.9, ink  # some of the canvas drawn, not all of it one colour
    assert box[2] - box[0] > rgb.size[0] // 2 and box[3] - box[1] > rgb.size[1] // 2, box  # not a corner
    assert len(rgb.getcolors(1 << 24)) > 16  # text and markers anti-aliased, not a flat fill

    pdf = prefix.with_name(prefix.name + ".pdf").read_bytes()
    assert pdf.startswith(b"%PDF") and pdf.rstrip().endswith(b"%%EOF")
    assert title in pdf_text_runs(pdf)


TRADEOFF_SIZE = (8.0, 5.6)  # inches, as egm.report.tradeoff draws it
TRADEOFF_TITLE = "Accuracy vs latency on RefCOCO / RefCOCO+ / RefCOCOg"


def _check_figure(prefix):
    check_figure_files(prefix, TRADEOFF_SIZE, TRADEOFF_TITLE)


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


def test_crowded_labels_do_not_overlap_and_far_ones_get_a_leader():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from egm.report.common import MarkerLabel, place_labels

    fig = Figure(figsize=(4, 3))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 10)
    labels = []
    for i in range(6):  # six markers almost on one spot: the first ring cannot hold every label
        xy = (5.0 + 0.05 * i, 5.0)
        ax.scatter([xy[0]], [xy[1]], s=[40])
        labels.append(MarkerLabel(ax.annotate(f"model number {i}", xy, xytext=(0, 0), textcoords="offset points",
                                         fontsize=7), 3.0, "right"))
    before = len(ax.texts)
    place_labels(fig, ax, labels)
    renderer = fig.canvas.get_renderer()
    boxes = [label.annotation.get_window_extent(renderer) for label in labels]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b)
    assert len(ax.texts) > before  # leaders (empty annotations) for the labels moved further out


def test_expected_ranges_name_only_evaluated_models_and_known_metrics():
    from egm.report.tables import check_expected

    check_expected({"a": {"acc": [0, 5], "parseable": [90, 100]}}, ["a", "b"])
    with pytest.raises(ValueError, match="not evaluated"):
        check_expected({"c": {"acc": [0, 5]}}, ["a", "b"])
    with pytest.raises(ValueError, match="unknown metric 'accuracy'"):
        check_expected({"a": {"accuracy": [0, 5]}}, ["a"])


@pytest.mark.parametrize("version, testa", [("seed_readme", 95.0), ("model_cards", 95.6)])
def test_comparison_uses_and_names_the_chosen_paper_version(version, testa, tmp_path):
    df = paper_comparison(big_metrics(), MODELS, SPLITS, paper_version=version)
    egm8 = df[(df["paper_model"] == "EGM-8B") & (df["split"] == "refcoco_testA")]
    assert egm8["paper"].tolist() == [testa]
    write_table(df, tmp_path / "cmp", title="cmp")
    md = (tmp_path / "cmp.md").read_text(encoding="utf-8")
    assert f"Paper values ({version})" in md
    assert (("printed Avg of" in md) == bool(paper.PRINTED_AVG_OFF[version]))
