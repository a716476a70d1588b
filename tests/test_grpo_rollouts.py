"""benchmarks/grpo_rollouts.py on the CPU: its generate-rollout variant as a real run (tiny
architecture, real TRL steps, the grounding reward), the GRPO configs of the GPU variants, the
stale-sync fault it injects, and the weight-sync verdict it draws from TRL's logged figures.
The vLLM variants themselves need a GPU (docs/training.md, "Rollouts: vLLM or generate")."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    from benchmarks import grpo_rollouts

    return grpo_rollouts


def test_generate_variant_runs_and_is_recorded(tmp_path):
    # ~40 s: two GRPO steps of the tiny architecture, each variant in its own process like on the GPU.
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.grpo_rollouts", "run", "--size", "tiny", "--variants", "speed-hf", "--steps", "2",
         "--work", str(tmp_path / "work"), "--out", str(out)],
        capture_output=True, text=True, timeout=400, cwd=REPO,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    record = json.loads((out / "grpo-rollouts-cpu.json").read_text())
    assert list(record["variants"]) == ["speed-hf"] and "check_model" not in record["prepared"]
    hf = record["variants"]["speed-hf"]
    assert hf["completed"] and hf["status"]["rc"] == 0
    # The manifest's rollout path is the one TRL timed.
    assert hf["rollout_in_manifest"] == "transformers-generate"
    assert hf["generate_sections_seen"] == ["transformers.generate"] and hf["manifest_rollout_true"] is True
    assert [s["step"] for s in hf["steps"]] == [1, 2]
    recipe = hf["recipe"]
    for step in hf["steps"]:
        assert 0 < step["rollout_s"] < step["step_s"]
        assert step["sync_s"] == 0 and step["logp_diff_mean"] is None  # no vLLM: nothing to sync or compare
        # Completion tokens from TRL's mean length: every completion of the step, at most max_new_tokens each.
        assert 0 < step["completion_tokens"] <= recipe["prompts_per_step"] * recipe["group_size"] * recipe["max_new_tokens"]
        assert step["trainer_tokens"] > step["completion_tokens"]  # prompts (with image tokens) count too
        assert step["rollout_tokens_per_s"] > 0 and step["trainer_tokens_per_s"] > 0
    assert hf["median_after_first"]["step_s"] == hf["steps"][1]["step_s"]
    assert record["environment"]["packages"]["trl"]


def test_gpu_variants_resolve_to_the_grpo_configs_they_claim(bench, tmp_path):
    class Args:
        variants, steps, size, work, check_model = None, None, "2b", str(tmp_path), str(tmp_path / "m")

    plan = bench.dry_run(bench.make_plan(Args))  # builds every GRPOConfig: TRL takes the arguments
    assert list(plan) == ["sync", "speed-vllm", "speed-hf", "sync-stale"]
    for name, variant in plan.items():
        grpo = variant["grpo"]
        vllm = name != "speed-hf"
        assert grpo["use_vllm"] is vllm and (grpo.get("vllm_mode") == "colocate") is vllm
        # TRL compares vLLM's log-probs with the policy's only with the importance correction on.
        assert grpo["vllm_importance_sampling_correction"] is vllm
        if vllm:
            assert grpo["vllm_max_model_length"] < 262144
    assert plan["speed-vllm"]["grpo"]["max_completion_length"] == plan["speed-hf"]["grpo"]["max_completion_length"]
    for name in ("sync", "sync-stale"):
        grpo = plan[name]["grpo"]
        # fp32 in both engines, and no truncated sampling: vLLM's processed log-probs would be
        # renormalised over the kept tokens, TRL's are not.
        assert grpo["bf16"] is False and grpo["top_p"] == 1.0 and grpo["top_k"] == 0
        assert plan[name]["vllm_engine_extra"]["dtype"] == "float32"  # vLLM's `auto` would take 16 bits
    assert plan["sync-stale"]["stale"] and not plan["sync"]["stale"]


def test_stale_variant_syncs_only_once(bench, monkeypatch):
    from trl.generation import vllm_generation

    calls = []
    monkeypatch.setattr(vllm_generation.VLLMGeneration, "sync_weights", lambda self: calls.append(self))
    bench.stale_after_first_sync()
    engine = object.__new__(vllm_generation.VLLMGeneration)
    for _ in range(3):
        engine.sync_weights()
    assert calls == [engine]


def test_check_engine_gets_its_dtype(bench, monkeypatch):
    from trl.generation import vllm_generation

    monkeypatch.setattr(vllm_generation, "LLM", lambda **kwargs: kwargs, raising=False)  # no vLLM here
    bench.add_engine_arguments({"dtype": "float32", "enforce_eager": True})
    assert vllm_generation.LLM(model="m", seed=0) == {"model": "m", "seed": 0, "dtype": "float32", "enforce_eager": True}


def test_sync_verdict(bench):
    floor = [2e-6, 3e-6, 2.5e-6, 3.1e-6]
    stale = [2e-6, 4e-3, 9e-3, 1.5e-2]
    verdict = bench.sync_check(floor, stale)
    assert verdict["current_policy"] is True and verdict["stale_detected"] is True
    # A sync that silently lags: the difference grows with the steps.
    assert bench.sync_check(stale, None)["current_policy"] is False
    # A stale run that stays at the floor shows nothing about the check.
    assert bench.sync_check(floor, floor)["stale_detected"] is False
    assert bench.sync_check(floor[:1], None)["current_policy"] is None  # one step proves nothing


def test_vllm_step_figures_take_trls_sections(bench):
    # A step as the tap records it with vLLM: TRL's profiled sections and its log entry.
    step = {"step": 3, "step_s": 2.0, "sections_s": {"sync_weights": 0.1, "vLLM.generate": 0.5},
            "log": {"completions/mean_length": 10.0, "num_tokens": 1500.0, bench.LOGP_DIFF: 2e-6}}
    figures = bench.step_figures(step, completions=64, tokens_before=500.0)
    assert figures["completion_tokens"] == 640 and figures["trainer_tokens"] == 1000
    assert figures["rollout_tokens_per_s"] == 1280.0  # 640 tokens in 0.5 s inside vLLM.generate
    assert figures["trainer_tokens_per_s"] == round(1000 / 1.4, 1)  # the step less rollout and sync
    assert figures["logp_diff_mean"] == 2e-6
