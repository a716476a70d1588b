"""The demo as shipped (config/demo.yaml, nothing shrunk) teaches the tiny model to ground.

The demo's table is what a newcomer reads first; if SFT stops teaching (a data, recipe, model or
trainer change), the pipeline still runs end to end and only the numbers say so. This runs the
demo's DAG up to the RefCOCO table, about 8 minutes on 2 cores, and checks the paper's shape:
SFT far above the random init, RL from the SFT checkpoint not below it.
"""

import json
import statistics

import pytest
import yaml

from tests.workflow_helpers import REPO, copy_workflow, run_snakemake, shipped_config, write_config

SPLITS = shipped_config("demo.yaml")["splits"]


def avg_acc(workdir, model: str) -> float:
    """Avg Acc@0.5 in points over the demo's splits, from the per-split metrics files."""
    values = [json.loads((workdir / f"results/metrics/{model}/{split}.json").read_text())["acc_at_0.5"]
              for split in SPLITS]
    return 100 * statistics.fmean(values)


@pytest.mark.slow
def test_demo_sft_learns_to_ground_and_rl_keeps_it(tmp_path):
    copy_workflow(tmp_path)
    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    # A flag ends --configfile's list of files, so the target is read as a target.
    result = run_snakemake(tmp_path, write_config(tmp_path, config), "--show-failed-logs", "table_refcoco", timeout=1500)
    assert result.returncode == 0, result.stderr[-4000:]
    base, sft, rl = (avg_acc(tmp_path, m) for m in ("tiny-base", "tiny-sft", "tiny-rl"))
    scores = f"base {base:.1f}, SFT {sft:.1f}, RL {rl:.1f} Avg Acc@0.5"
    assert sft > base + 20, f"SFT did not teach the tiny model to ground: {scores}"
    assert rl >= sft - 3, f"RL from the SFT checkpoint lost what SFT learned: {scores}"
    # The SFT loss falls over its steps (the training figure draws this curve).
    history = json.loads((tmp_path / "results/checkpoints/tiny/sft/training.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) >= 4 and losses[-1] < losses[0] / 4, losses
