"""Training curves of each run: SFT loss, and GRPO reward and loss, against the optimizer step.

Read from `training.json` in each finished stage directory (results/checkpoints/{run}/{stage}/),
whose `log_history` is the Trainer's `state.log_history`: one dict per logging step, eval entries
(keys prefixed "eval_") interleaved, and a closing summary entry (train_runtime, train_loss, ...)
that is an average over the whole run and so not a point of any curve.
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from egm.io import read_json
from egm.report.common import as_number, save_figure

TRAINING_FILE = "training.json"
STAGES = ("sft", "rl")
REWARD_FUNCTION = re.compile(r"^rewards/(?P<name>.+)/mean$")
MARKERS_BELOW = 60  # points per curve under which each logged step gets a marker
REWARD_WINDOW = 8  # logged RL steps per point of the reward's running mean


@dataclass
class StageLog:
    run: str
    stage: str  # "sft" or "rl"
    history: list[dict] = field(default_factory=list)
    display: str | None = None

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(steps, values) of every entry that logged `key` as a finite number."""
        return series(self.history, key)


def series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    steps: list[float] = []
    values: list[float] = []
    for entry in history:
        step, value = as_number(entry.get("step")), as_number(entry.get(key))
        if not (math.isnan(step) or math.isnan(value)):
            steps.append(step)
            values.append(value)
    return steps, values


def reward_functions(history: Sequence[Mapping[str, Any]]) -> list[str]:
    """Names of the reward functions that logged a per-function mean, in first-logged order."""
    names: dict[str, None] = {}
    for entry in history:
        for key in entry:
            match = REWARD_FUNCTION.match(key)
            if match:
                names.setdefault(match["name"], None)
    return list(names)


def read_stage(model_dir: str | Path, models: Mapping[str, Mapping[str, Any]] | None = None) -> StageLog:
    """A finished stage's log; run and stage from its training.json, the directory names as fallback."""
    model_dir = Path(model_dir)
    training = read_json(model_dir / TRAINING_FILE)
    history = training.get("log_history")
    if not isinstance(history, list):
        raise TypeError(f"{model_dir / TRAINING_FILE}: no log_history list")
    run = str(training.get("run") or model_dir.parent.name)
    stage = str(training.get("stage") or model_dir.name)
    if stage not in STAGES:
        raise ValueError(f"{model_dir / TRAINING_FILE}: unknown stage {stage!r}, expected one of {STAGES}")
    spec = (models or {}).get(f"{run}-{stage}") or {}
    return StageLog(run, stage, history, spec.get("display"))


def _curve(ax: Axes, steps: list[float], values: list[float], **style) -> None:
    marker = "o" if len(steps) < MARKERS_BELOW else None
    ax.plot(steps, values, marker=marker, markersize=3, linewidth=1.2, **style)


def _empty(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, textwrap.fill(text, 40), transform=ax.transAxes, ha="center", va="center",
            fontsize=8, color="0.35")
    ax.set_xticks([])
    ax.set_yticks([])


def _logged(ax: Axes, log: StageLog | None, key: str, missing: list[str],
            no_stage: str) -> tuple[list[float], list[float]] | None:
    """The panel's main series, or None after marking the panel empty (and naming the key in
    `missing` when the stage exists but did not log it)."""
    if log is None:
        _empty(ax, no_stage)
        return None
    steps, values = log.series(key)
    if not steps:
        # A renamed key (another TRL version) must not pass for a run that learned nothing.
        _empty(ax, f"no '{key}' in the {log.stage.upper()} log history")
        missing.append(f"{log.run}/{log.stage}: {key}")
        return None
    return steps, values


def _sft_loss(ax: Axes, log: StageLog | None, missing: list[str]) -> None:
    logged = _logged(ax, log, "loss", missing, "no SFT stage in this run (its RL starts from a released checkpoint)")
    if logged is None:
        return
    steps, values = logged
    _curve(ax, steps, values, color="C0", label="train loss")
    eval_steps, eval_values = log.series("eval_loss")
    if eval_steps:
        ax.plot(eval_steps, eval_values, linestyle="none", marker="s", markersize=4, color="C3", label="eval loss")
    every = values + eval_values
    # SFT loss falls by orders of magnitude early on; a log axis keeps the later steps readable.
    if min(every) > 0 and max(every) / min(every) > 10:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel("loss (log scale)")
    else:
        ax.set_ylabel("loss")
    ax.legend(loc="upper right", fontsize=7)


def _rl_reward(ax: Axes, log: StageLog | None, missing: list[str]) -> None:
    logged = _logged(ax, log, "reward", missing, "no RL stage")
    if logged is None:
        return
    steps, values = logged
    _curve(ax, steps, values, color="C1", label="mean reward")
    if len(values) >= 2 * REWARD_WINDOW:
        ax.plot(steps[REWARD_WINDOW - 1:], running_mean(values, REWARD_WINDOW), color="C1", linewidth=2.6,
                alpha=0.7, label=f"running mean of {REWARD_WINDOW} logged steps")
    std_steps, stds = log.series("reward_std")
    if std_steps == steps:
        ax.fill_between(steps, [v - s for v, s in zip(values, stds)], [v + s for v, s in zip(values, stds)],
                        color="C1", alpha=0.2, linewidth=0, label="± std over the step's completions")
    functions = reward_functions(log.history)
    if len(functions) > 1:  # with one function its mean is the reward itself
        for i, name in enumerate(functions):
            fn_steps, fn_values = log.series(f"rewards/{name}/mean")
            _curve(ax, fn_steps, fn_values, color=f"C{4 + i % 6}", linestyle=":", label=name)
    eval_steps, eval_values = log.series("eval_reward")
    if eval_steps:
        ax.plot(eval_steps, eval_values, linestyle="none", marker="s", markersize=4, color="C3", label="eval reward")
    ax.set_ylabel("reward")
    ax.legend(loc="best", fontsize=7)


def running_mean(values: Sequence[float], window: int) -> list[float]:
    """Mean of each `window` consecutive values (len(values) - window + 1 of them)."""
    return [sum(values[i:i + window]) / window for i in range(len(values) - window + 1)]


def _rl_loss(ax: Axes, log: StageLog | None, missing: list[str]) -> None:
    logged = _logged(ax, log, "loss", missing, "no RL stage")
    if logged is None:
        return
    steps, values = logged
    _curve(ax, steps, values, color="C2")
    ax.axhline(0.0, color="0.6", linewidth=0.8, zorder=0)
    ax.set_ylabel("loss")


PANELS = (("SFT loss", "sft", _sft_loss), ("RL reward", "rl", _rl_reward), ("RL loss", "rl", _rl_loss))


def training_figure(stages: Sequence[StageLog], out_prefix: Path) -> list[Path]:
    """One row per run (in the order its stages are given): SFT loss, RL reward, RL loss against
    the step -> `{out_prefix}.png`, `.pdf`. Curves a log lacks are marked in their panel and named
    in the subtitle."""
    if not stages:
        raise ValueError("no training stages to plot")
    runs: dict[str, dict[str, StageLog]] = {}
    for log in stages:
        if log.stage in runs.setdefault(log.run, {}):
            raise ValueError(f"two logs for run {log.run!r}, stage {log.stage!r}")
        runs[log.run][log.stage] = log

    fig = Figure(figsize=(12.0, 1.0 + 3.2 * len(runs)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(runs), len(PANELS), squeeze=False)
    missing: list[str] = []
    for row, (run, logs) in zip(axes, runs.items()):
        for ax, (title, stage, draw) in zip(row, PANELS):
            log = logs.get(stage)
            draw(ax, log, missing)
            name = f" ({log.display})" if log is not None and log.display else ""
            ax.set_title(f"run {run}: {title}{name}", fontsize=9, loc="left")
            if log is not None and ax.lines:
                ax.set_xlabel("optimizer step")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.grid(True, alpha=0.3)

    subtitle = [
        ("Values as the Trainer logged them, every `logging_steps` steps. RL reward: the mean over each step's "
         "sampled completions, band ± their standard deviation, and its running mean (a step's mean is over a "
         "few prompts only, so the trend is what shows learning)."),
    ]
    if missing:
        subtitle.append("Not in the log history, so not drawn: " + ", ".join(missing) + ".")
    fig.suptitle("Training curves\n" + "\n".join(textwrap.fill(line, 170) for line in subtitle), fontsize=9)
    return save_figure(fig, out_prefix)
