"""The training rules in the DAG, planned through Snakemake (no job runs; the demo end-to-end run in
tests/test_workflow.py runs them and checks what reruns when a recipe value changes)."""

import yaml

from tests.workflow_helpers import REPO, copy_workflow, plan, run_snakemake, small_demo_config, write_config


def paper_config() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def test_paper_run_trains_then_evaluates_both_stages(tmp_path):
    copy_workflow(tmp_path)
    outputs = set(plan(tmp_path, targets=["results/metrics/egm-8b-repro-rl/refcoco_val.json"]))
    assert {"results/checkpoints/egm-8b-repro/sft.json", "results/checkpoints/egm-8b-repro/rl.json"} <= outputs
    assert "resources/manifests/model-qwen3-vl-8b-thinking.json" in outputs  # SFT starts from the base
    assert {"resources/rl/train.parquet", "resources/rl/val.parquet"} <= outputs
    assert "resources/manifests/model-egm-8b.json" not in outputs  # nothing else


def test_rl_from_a_released_sft_checkpoint(tmp_path):
    copy_workflow(tmp_path)
    config = paper_config()
    config["train"]["runs"]["egm-8b-repro"]["rl"]["from"] = "JamesZGQ/EGM-8B-SFT"
    outputs = set(plan(tmp_path, write_config(tmp_path, config)))
    assert "resources/manifests/start-egm-8b-repro.json" in outputs
    assert not any("/sft" in p for p in outputs if p.startswith("results/checkpoints/"))
    assert not any(p.startswith("results/predictions/egm-8b-repro-sft/") for p in outputs)
    assert any(p.startswith("results/predictions/egm-8b-repro-rl/") for p in outputs)


def test_training_commands(tmp_path):
    copy_workflow(tmp_path)
    result = run_snakemake(tmp_path, REPO / "config" / "config.yaml", "-n", "-p", "results/checkpoints/egm-8b-repro/rl.json")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "python -m egm sft --model-dir resources/models/qwen3-vl-8b-thinking" in out
    assert "vanilla_grounding_reasoning_training_dataset_raw.jsonl" in out
    assert "python -m egm rl --model-dir results/checkpoints/egm-8b-repro/sft" in out
    assert out.count("--gpus 8") == 2
    assert '"learning_rate": 1e-05' in out and '"learning_rate": 3e-06' in out  # recipe content in params


def test_bad_training_config_fails_before_any_job(tmp_path):
    copy_workflow(tmp_path)
    config = small_demo_config()
    config["train"]["runs"]["tiny"]["base"] = "no-such-model"
    result = run_snakemake(tmp_path, write_config(tmp_path, config), "-n")
    assert result.returncode != 0 and "no-such-model" in result.stdout + result.stderr
    config = small_demo_config()
    config["train"]["runs"]["tiny"]["sft"]["lr"] = 1.0  # not a run key (recipe keys go in overrides)
    result = run_snakemake(tmp_path, write_config(tmp_path, config), "-n")
    assert result.returncode != 0
