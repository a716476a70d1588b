"""The tokens figure, the latency table and the training curves, on synthetic inputs."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from egm import cli
from egm.report import paper
from egm.report.common import save_figure, write_table
from egm.report.latency_table import NO_LATENCY, PREDICTIONS, PROTOCOL, latency_table, write_latency_table
from egm.report.tokens import paper_references, token_points, tokens_figure
from egm.report.training import StageLog, read_stage, reward_functions, series, training_figure

SPLITS = list(paper.SPLITS)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

MODELS = {
    "big": {"display": "Big", "paper": "EGM-8B", "params_b": 8.77},
    "small": {"display": "Small", "paper": None, "params_b": 0.5},
    "base": {"display": "Base", "paper": "Qwen3-VL-8B-Thinking", "params_b": 8.77},
}


def metric(model, split, acc=0.5, latency_s=0.5, tokens=100.0):
    return {"model": model, "split": split, "n_scored": 10, "acc_at_0.5": acc, "mean_iou": acc,
            "mean_completion_tokens": tokens, "mean_latency_s": latency_s, "n_bad_records": 0, "n_unparseable": 0}


def latency_file(model, mean_ms=250.0):
    return {
        "model": model,
        "backend": "vllm",
        "device": {"name": "2x Some GPU (80 GB)", "gpus": ["Some GPU (80 GB)"] * 2},
        "split": "refcoco_val",
        "mean_latency_ms": mean_ms,
        "protocol": {"concurrency": 64, "summary": {"n": 128, "mean_ms": mean_ms, "p50_ms": 200.0, "p90_ms": 400.0,
                                                    "mean_completion_tokens": 90.0, "tokens_per_s": 1234.5}},
        "batch1": {"concurrency": 1, "summary": {"n": 8, "mean_ms": 120.0}},
    }


def capture_figure(monkeypatch, module):
    """Keep the Figure a figure function saves, so tests can read what it says."""
    captured = {}

    def keep(fig, out_prefix):
        captured["fig"] = fig
        return save_figure(fig, out_prefix)

    monkeypatch.setattr(module, "save_figure", keep)
    return captured


def assert_png_and_pdf(prefix):
    assert prefix.with_suffix(".png").read_bytes().startswith(PNG_SIGNATURE)
    assert prefix.with_suffix(".pdf").read_bytes().startswith(b"%PDF")


# ---------------------------------------------------------------- save_figure


def test_save_figure_is_byte_identical_on_rerender(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def render(prefix):
        fig = Figure()
        FigureCanvasAgg(fig)
        fig.add_subplot().plot([1, 2], [3, 4])
        return save_figure(fig, prefix)

    first = render(tmp_path / "a")
    second = render(tmp_path / "b")
    assert [p.suffix for p in first] == [".png", ".pdf"]
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]


# ---------------------------------------------------------------- tokens figure


def test_token_points_average_tokens_and_name_what_cannot_be_placed():
    metrics = [metric("big", s, acc=0.9, tokens=100.0 + 10 * i) for i, s in enumerate(SPLITS)]
    metrics += [metric("small", s, tokens=None) for s in SPLITS]  # no token counts
    metrics += [metric("base", s) for s in SPLITS[:3]]  # not every configured split
    points, skipped = token_points(metrics, MODELS, SPLITS)
    assert [p.name for p in points] == ["Big"]
    assert points[0].tokens == pytest.approx(135.0) and points[0].accuracy == pytest.approx(90.0)
    assert skipped == ["Small (no token count)", "Base (no Avg accuracy)"]


def test_paper_references_pair_only_what_the_paper_gives():
    points, lines = paper_references()
    assert [(p.name, p.tokens, p.accuracy) for p in points] == [("EGM-8B", 101.0, 91.4)]
    # Both "without EGM" counts are 42 tokens: one line, both names, no accuracy made up.
    assert [(line.tokens, len(line.names)) for line in lines] == [(42.0, 2)]


def test_tokens_figure_files_and_not_plotted_note(tmp_path, monkeypatch):
    from egm.report import tokens

    captured = capture_figure(monkeypatch, tokens)
    metrics = [metric("big", s, acc=0.9, tokens=120.0) for s in SPLITS] + [metric("small", s, tokens=0) for s in SPLITS]
    written = tokens_figure(metrics, MODELS, tmp_path / "tokens", SPLITS)
    assert written == [tmp_path / "tokens.png", tmp_path / "tokens.pdf"]
    assert_png_and_pdf(tmp_path / "tokens")
    ax = captured["fig"].axes[0]
    assert "Not plotted: Small (no token count)." in ax.get_title(loc="left").replace("\n", " ")
    assert [line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == "--"] == [42.0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("Qwen3-VL-8B and Qwen3-VL-235B-A22B (without EGM), ≈42 tokens" in t and "not stated" in t
               for t in legend)


def test_tokens_figure_without_any_model(tmp_path, monkeypatch):
    from egm.report import tokens

    captured = capture_figure(monkeypatch, tokens)
    tokens_figure([], MODELS, tmp_path / "tokens", SPLITS[:2])
    assert_png_and_pdf(tmp_path / "tokens")
    title = captured["fig"].axes[0].get_title(loc="left").replace("\n", " ")
    assert "No model of this run could be plotted." in title and "the paper averages its 8" in title


# ---------------------------------------------------------------- latency table


def test_latency_table_sources_values_and_paper_latency():
    metrics = [metric("big", s, latency_s=0.1 * (i + 1), tokens=50.0) for i, s in enumerate(SPLITS[:2])]
    metrics += [metric("small", s, latency_s=None) for s in SPLITS[:2]]
    metrics += [metric("base", s, latency_s=9.0) for s in SPLITS[:2]]
    df = latency_table(metrics, MODELS, SPLITS, [latency_file("base")])
    rows = df.set_index("model")
    assert list(df["model"]) == ["Big", "Small", "Base"]
    assert list(df["source"]) == [PREDICTIONS, NO_LATENCY, PROTOCOL]
    # Predictions: mean over the splits, in ms; no percentiles or device.
    assert rows.loc["Big", "latency (ms)"] == pytest.approx(150.0)
    assert rows.loc["Big", "tokens"] == pytest.approx(50.0)
    assert math.isnan(rows.loc["Big", "p90 (ms)"]) and pd.isna(rows.loc["Big", "device"])
    assert math.isnan(rows.loc["Small", "latency (ms)"])
    # The protocol file wins over the predictions' 9 s, tokens from the same run.
    base = rows.loc["Base"]
    assert (base["latency (ms)"], base["p50 (ms)"], base["p90 (ms)"], base["batch-1 (ms)"]) == (250.0, 200.0, 400.0, 120.0)
    assert (base["tokens"], base["tokens/s"]) == (90.0, 1234.5)
    assert (base["device"], base["backend"]) == ("2x Some GPU (80 GB)", "vllm")
    # Paper latency of each model's counterpart (approximate), NaN without one.
    assert rows.loc["Big", "paper latency (ms)"] == paper.tradeoff_point("EGM-8B").latency_ms
    assert rows.loc["Base", "paper latency (ms)"] == paper.tradeoff_point("Qwen3-VL-8B-Thinking").latency_ms
    assert math.isnan(rows.loc["Small", "paper latency (ms)"])
    assert "128 requests of refcoco_val, 64 in flight" in " ".join(df.attrs["notes"])


def test_latency_table_keeps_models_seen_only_in_latency_files_and_rejects_duplicates():
    df = latency_table([], MODELS, SPLITS, [latency_file("stale", 80.0), latency_file("small")])
    assert list(df["model"]) == ["Small", "stale"]
    assert df["paper latency (ms)"].isna().all()
    with pytest.raises(ValueError, match="duplicate latency"):
        latency_table([], MODELS, SPLITS, [latency_file("small"), latency_file("small")])


def test_latency_table_tolerates_missing_protocol_fields():
    partial = {"model": "big", "mean_latency_ms": 300.0, "protocol": {"summary": {}}}
    row = latency_table([], MODELS, SPLITS, [partial]).iloc[0]
    assert row["source"] == PROTOCOL and row["latency (ms)"] == 300.0
    assert math.isnan(row["p50 (ms)"]) and math.isnan(row["batch-1 (ms)"]) and pd.isna(row["device"])


def test_write_latency_table_through_the_cli(tmp_path):
    paths = []
    for i, split in enumerate(SPLITS[:2]):
        path = tmp_path / f"big-{split}.json"
        path.write_text(json.dumps(metric("big", split, latency_s=0.2)))
        paths.append(str(path))
    latency = tmp_path / "small.json"
    latency.write_text(json.dumps(latency_file("small")))
    report = {"models": MODELS, "order": list(MODELS), "splits": SPLITS[:2]}
    cli.main(["report-latency", "--metrics", *paths, "--latency", str(latency), "--report", json.dumps(report),
              "--out-prefix", str(tmp_path / "latency")])
    csv = pd.read_csv(tmp_path / "latency.csv")
    assert list(csv["model"]) == ["Big", "Small"] and list(csv["source"]) == [PREDICTIONS, PROTOCOL]
    md = (tmp_path / "latency.md").read_text()
    assert "| Big | predictions | 200.0 | – |" in md
    assert "does not state its hardware" in md
    assert "\\begin{tabular}" in (tmp_path / "latency.tex").read_text()


def test_empty_latency_table_still_writes(tmp_path):
    df = write_latency_table([], MODELS, SPLITS, [], tmp_path / "latency")
    assert df.empty and list(df.columns)[:2] == ["model", "source"]
    assert "No metrics or latency files" in (tmp_path / "latency.md").read_text()


# ---------------------------------------------------------------- training curves

# Shaped like the keys a real demo run logs (TRL's SFTTrainer and GRPOTrainer, one reward function).
SFT_HISTORY = [
    {"loss": 4.0, "grad_norm": 9.0, "learning_rate": 1e-5, "mean_token_accuracy": 0.1, "epoch": 0.0, "step": 1},
    {"loss": 2.0, "grad_norm": 3.0, "learning_rate": 1e-4, "mean_token_accuracy": 0.5, "epoch": 0.5, "step": 50},
    {"loss": 1.0, "grad_norm": 1.0, "learning_rate": 5e-5, "mean_token_accuracy": 0.7, "epoch": 1.0, "step": 100},
    # The Trainer's closing summary: a run average, not a point.
    {"train_runtime": 12.0, "train_loss": 2.3, "epoch": 1.0, "step": 100},
]
RL_HISTORY = [
    {"loss": 0.01, "reward": 0.2, "reward_std": 0.1, "rewards/grounding_reward/mean": 0.2, "step": 1},
    {"loss": -0.02, "reward": 0.4, "reward_std": 0.2, "rewards/grounding_reward/mean": 0.4, "step": 2},
    {"eval_loss": 0.0, "eval_reward": 0.35, "step": 2},
    {"train_runtime": 3.0, "train_loss": 0.0, "step": 2},
]


def write_stage(root, run, stage, history, **meta):
    stage_dir = root / run / stage
    stage_dir.mkdir(parents=True)
    (stage_dir / "training.json").write_text(json.dumps({"stage": stage, "run": run, "log_history": history, **meta}))
    return stage_dir


def test_series_reads_logged_points_only():
    assert series(SFT_HISTORY, "loss") == ([1, 50, 100], [4.0, 2.0, 1.0])  # not the summary's train_loss
    assert series(RL_HISTORY, "reward") == ([1, 2], [0.2, 0.4])
    assert series(RL_HISTORY, "eval_reward") == ([2], [0.35])
    assert series([{"step": 1, "loss": None}, {"loss": 1.0}], "loss") == ([], [])
    assert reward_functions(RL_HISTORY) == ["grounding_reward"]


def test_read_stage_names_run_stage_and_display(tmp_path):
    stage_dir = write_stage(tmp_path, "tiny", "rl", RL_HISTORY)
    log = read_stage(stage_dir, {"tiny-rl": {"display": "reproduced RL"}})
    assert (log.run, log.stage, log.display, len(log.history)) == ("tiny", "rl", "reproduced RL", 4)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "training.json").write_text(json.dumps({"stage": "rl"}))
    with pytest.raises(TypeError, match="log_history"):
        read_stage(tmp_path / "bad")
    with pytest.raises(FileNotFoundError):
        read_stage(tmp_path / "missing")


def test_training_figure_draws_the_logged_curves(tmp_path, monkeypatch):
    from egm.report import training

    captured = capture_figure(monkeypatch, training)
    stages = [read_stage(write_stage(tmp_path, "tiny", stage, history))
              for stage, history in (("sft", SFT_HISTORY), ("rl", RL_HISTORY))]
    written = training_figure(stages, tmp_path / "training")
    assert written == [tmp_path / "training.png", tmp_path / "training.pdf"]
    assert_png_and_pdf(tmp_path / "training")
    sft, reward, rl_loss = captured["fig"].axes
    assert list(sft.lines[0].get_ydata()) == [4.0, 2.0, 1.0]
    assert list(reward.lines[0].get_ydata()) == [0.2, 0.4]
    assert [line.get_label() for line in reward.lines] == ["mean reward", "eval reward"]
    assert list(rl_loss.lines[0].get_ydata()) == [0.01, -0.02]
    assert "Not in the log history" not in captured["fig"].get_suptitle()


def test_training_figure_draws_the_rewards_running_mean(tmp_path, monkeypatch):
    from egm.report import training

    captured = capture_figure(monkeypatch, training)
    window = training.REWARD_WINDOW
    rewards = [(step % 3) / 10 + step / 100 for step in range(1, 3 * window + 1)]  # noisy, rising
    history = [{"loss": 0.0, "reward": r, "step": step} for step, r in enumerate(rewards, 1)]
    training_figure([StageLog("tiny", "rl", history)], tmp_path / "training")
    reward = captured["fig"].axes[1]
    labels = [line.get_label() for line in reward.lines]
    assert labels == ["mean reward", f"running mean of {window} logged steps"]
    smooth = reward.lines[1]
    assert list(smooth.get_xdata()) == list(range(window, 3 * window + 1))
    first = sum(rewards[:window]) / window
    assert smooth.get_ydata()[0] == pytest.approx(first)
    assert smooth.get_ydata()[-1] == pytest.approx(sum(rewards[-window:]) / window) and smooth.get_ydata()[-1] > first


def test_training_figure_notes_missing_reward_and_missing_sft_stage(tmp_path, monkeypatch):
    from egm.report import training

    captured = capture_figure(monkeypatch, training)
    renamed = [{"loss": 0.1, "rewards/mean": 0.3, "step": 1}]  # a reward under a key we do not read
    stages = [StageLog("a", "sft", SFT_HISTORY), StageLog("a", "rl", renamed), StageLog("b", "rl", RL_HISTORY)]
    training_figure(stages, tmp_path / "training")
    suptitle = captured["fig"].get_suptitle().replace("\n", " ")
    assert "Not in the log history, so not drawn: a/rl: reward." in suptitle
    axes = captured["fig"].axes
    assert len(axes) == 6
    texts = [t.get_text().replace("\n", " ") for t in axes[1].texts]
    assert texts == ["no 'reward' in the RL log history"]
    assert "no SFT stage" in axes[3].texts[0].get_text().replace("\n", " ")  # run b starts RL elsewhere
    assert list(axes[4].lines[0].get_ydata()) == [0.2, 0.4]


def test_training_figure_rejects_nothing_and_duplicates(tmp_path):
    with pytest.raises(ValueError, match="no training stages"):
        training_figure([], tmp_path / "training")
    with pytest.raises(ValueError, match="two logs"):
        training_figure([StageLog("a", "rl", RL_HISTORY), StageLog("a", "rl", RL_HISTORY)], tmp_path / "training")
    assert not (tmp_path / "training.png").exists()


def test_latency_rows_are_traced_to_the_run_they_come_from(tmp_path):
    measured = latency_file("big")
    measured["provenance"] = {"job": {"engine": {"backend": "vllm", "package": "vllm", "version": "0.1"},
                                      "device": {"name": "2x Some GPU"}}}
    predicted = [{**metric("small", s), "provenance": {"job": {"engine": {"backend": "hf", "package": "transformers",
                                                                           "version": "5"}}}} for s in SPLITS]
    write_table(latency_table(predicted, MODELS, SPLITS, [measured]), tmp_path / "latency")
    rows = pd.read_csv(tmp_path / "latency.csv", dtype=str).set_index("model_key")
    assert rows.loc["big", "engine"] == "vllm vllm 0.1" and rows.loc["big", "device"] == "2x Some GPU"
    assert rows.loc["small", "engine"] == "hf transformers 5"
