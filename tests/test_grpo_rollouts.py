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
        variants, steps, size, work, check_model, check_f32, tag = None, None, "2b", str(tmp_path), str(tmp_path / "m"), "ieee", None

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
        # vLLM's Triton attention takes float32 dots as TF32 unless told otherwise.
        assert plan[name]["env"]["TRITON_F32_DEFAULT"] == "ieee" and "ieee" in plan[name]["env"]["TRITON_CACHE_DIR"]
    assert plan["speed-vllm"]["env"] == plan["speed-hf"]["env"] == {}
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


def test_floor_stats(bench):
    stats = bench.floor_stats([0.0, 0.002, 0.02, 0.5])
    assert stats["tokens"] == 4 and stats["max"] == 0.5 and stats["over_0.01"] == 0.5
    assert stats["mean"] == round((0.002 + 0.02 + 0.5) / 4, 6)
    assert bench.floor_stats([]) == {"tokens": 0}


def test_vllm_step_figures_take_trls_sections(bench):
    # A step as the tap records it with vLLM: TRL's profiled sections and its log entry.
    step = {"step": 3, "step_s": 2.0, "sections_s": {"sync_weights": 0.1, "vLLM.generate": 0.5},
            "log": {"completions/mean_length": 10.0, "num_tokens": 1500.0, bench.LOGP_DIFF: 2e-6}}
    figures = bench.step_figures(step, completions=64, tokens_before=500.0)
    assert figures["completion_tokens"] == 640 and figures["trainer_tokens"] == 1000
    assert figures["rollout_tokens_per_s"] == 1280.0  # 640 tokens in 0.5 s inside vLLM.generate
    assert figures["trainer_tokens_per_s"] == round(1000 / 1.4, 1)  # the step less rollout and sync
    assert figures["logp_diff_mean"] == 2e-6


class FakeVLLMFromTransformers:
    """A stand-in for vLLM's LLM on the CPU (vLLM needs a GPU): it samples with the same transformers
    model the floor check scores with and reports that model's log-probs, shifted by `bias` nats
    on every completion token, so the floor it shows is exactly `bias`."""

    bias = 0.0

    def __init__(self, model, **kwargs):
        import torch
        from transformers import AutoModelForImageTextToText

        from egm.train.processing import load_processor

        self.torch = torch
        self.processor = load_processor(model)
        self.model = AutoModelForImageTextToText.from_pretrained(model, dtype=torch.float32).eval()
        self.kwargs = kwargs

    def generate(self, requests, sampling_params, use_tqdm=False):
        from types import SimpleNamespace as NS

        torch = self.torch
        outputs = []
        pad = self.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        for request in requests:
            prompt = list(request["prompt_token_ids"])
            extra = {}
            if "multi_modal_data" in request:
                extra = dict(self.processor.image_processor(images=[request["multi_modal_data"]["image"]],
                                                            return_tensors="pt"))
                # As vLLM does with a one-placeholder prompt: the placeholder becomes the image's tokens.
                n = int(extra["image_grid_thw"].prod()) // self.processor.image_processor.merge_size ** 2
                at = prompt.index(pad)
                prompt = prompt[:at] + [pad] * n + prompt[at + 1:]
            ids = torch.tensor([prompt])
            if extra:
                extra["mm_token_type_ids"] = (ids == pad).long()
            with torch.inference_mode():
                full = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                           do_sample=False, **extra)
                if "mm_token_type_ids" in extra:
                    extra["mm_token_type_ids"] = torch.nn.functional.pad(extra["mm_token_type_ids"],
                                                                         (0, full.shape[1] - ids.shape[1]))
                logits = self.model(input_ids=full, attention_mask=torch.ones_like(full), **extra).logits[0]
            logps = torch.log_softmax(logits[:-1], -1).gather(1, full[0, 1:, None])[:, 0].tolist()
            n = ids.shape[1]
            completion = full[0, n:].tolist()
            prompt_lp = [None] + [{int(t): NS(logprob=lp)} for t, lp in zip(full[0, 1:n].tolist(), logps[:n - 1])]
            sample = NS(token_ids=completion,
                        logprobs=[{t: NS(logprob=lp + self.bias)} for t, lp in zip(completion, logps[n - 1:])])
            outputs.append(NS(prompt_token_ids=prompt, prompt_logprobs=prompt_lp, outputs=[sample]))
        return outputs


@pytest.mark.parametrize("bias", [0.0, 0.25])
def test_logp_floor_measures_the_engines_difference(bench, tmp_path, monkeypatch, bias):
    import types

    import trl.data_utils  # noqa: F401  (before the stand-in: TRL probes for a real vllm on import)

    from egm.models.tiny import write_tiny_model

    fake = types.ModuleType("vllm")
    fake.LLM = type("FakeLLM", (FakeVLLMFromTransformers,), {"bias": bias})
    fake.SamplingParams = lambda **kwargs: kwargs
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr(bench, "FLOOR_PROMPTS", 3)
    write_tiny_model(tmp_path / "model", seed=0)
    bench.build_data(tmp_path / "data", (96, 96), 4)
    plan = {"variants": {"sync": {"model": "check", "model_dir": str(tmp_path / "model"), "data": str(tmp_path / "data")}}}
    for name in ("TRITON_F32_DEFAULT", "TRITON_CACHE_DIR"):
        monkeypatch.setenv(name, "")  # logp_floor sets them; monkeypatch puts them back
    out = bench.logp_floor(plan, "tf32")
    assert out["prompts"] == 3 and out["triton_f32_default"] == "tf32"
    # The engine was sent one placeholder per image and expanded it to the trainer's prompt.
    assert out["image"]["image_tokens_ours_vllm"] == [[9, 9]] * 3
    for part in ("image", "text_only"):
        assert out[part]["prompt_ids_equal"] == 3
        completion = out[part]["completion"]
        assert 0 < completion["tokens"] <= 24 and completion["mean"] == pytest.approx(bias, abs=1e-4)
        # The prompt's log-probs carry no bias: the same model on the same tokens.
        assert out[part]["prompt_text_after_image"]["max"] < 1e-4
    # TRL's batched, padded forward scores the completions as the one-at-a-time forward does.
    assert out["image"]["completion_batched_left_padded"]["mean"] == pytest.approx(bias, abs=1e-4)


def _call_archive(bench, root, name, variants, ran, device="NVIDIA H100 80GB HBM3"):
    """A call's grpo-rollouts-logs.tar.gz as `run` packs it: `ran` maps a variant to its per-step
    mean log-prob differences; the others did not start."""
    import tarfile

    work = root / name
    recipe = {"prompts_per_step": 8, "group_size": 8}
    plan = {"tag": name, "variants": {v: {"model": "check", "rollout": "vllm", "stale": v == "sync-stale", "steps": 6,
                                          "recipe": recipe} for v in variants}}
    bench.write_json(work / "plan.json", plan)
    bench.write_json(work / "prepared.json", {"device": device})
    statuses = {"prepare": {"rc": 0}}
    for v in variants:
        statuses[v] = {"rc": 0} if v in ran else {"rc": "not started"}
        if v in ran:
            steps = [{"step": i + 1, "step_s": 1.0, "sections_s": {"vLLM.generate": 0.5},
                      "log": {bench.LOGP_DIFF: d, "grad_norm": 0.5}} for i, d in enumerate(ran[v])]
            bench.write_json(work / v / "steps.json", {"steps": steps, "done": True})
    bench.write_json(work / "statuses.json", statuses)
    archive = root / f"{name}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for item in sorted(work.rglob("*")):
            tar.add(item, arcname=str(item.relative_to(work)), recursive=False)
    return archive


def test_record_from_a_call_cut_short_and_the_call_that_ran_the_rest(bench, tmp_path):
    """The stale run that did not fit the first call, run by a second: one record from both calls'
    archives, whose sync check then compares the synced and the stale run."""
    first = _call_archive(bench, tmp_path, "a", ["sync", "sync-stale"], {"sync": [7e-7, 6e-7, 7e-7]})
    second = _call_archive(bench, tmp_path, "b", ["sync-stale"], {"sync-stale": [7e-7, 0.014, 0.03]})
    bench.merge_calls([first, second], tmp_path / "work", tag="both")
    record = json.loads(bench.write_record(tmp_path / "work", tmp_path / "out").read_text())
    assert list(record["variants"]) == ["sync", "sync-stale"]
    assert record["statuses"]["sync"]["rc"] == 0 and record["statuses"]["sync-stale"]["rc"] == 0
    check = record["sync_check"]
    assert check["synced_logp_diff_mean"] == [7e-7, 6e-7, 7e-7]
    assert check["stale_logp_diff_mean"] == [7e-7, 0.014, 0.03]
    assert check["current_policy"] is True and check["stale_detected"] is True
    # A used work directory would lend its files to the next merge.
    with pytest.raises(ValueError, match="not empty"):
        bench.merge_calls([second], tmp_path / "work")
    # Alone, the first call's record cannot say whether the check can fail.
    bench.merge_calls([first], tmp_path / "work-a")
    alone = json.loads(bench.write_record(tmp_path / "work-a", tmp_path / "out-a").read_text())
    assert alone["sync_check"]["current_policy"] is True and alone["sync_check"]["stale_detected"] is None


def test_calls_on_different_cards_are_not_one_record(bench, tmp_path):
    first = _call_archive(bench, tmp_path, "a", ["sync"], {"sync": [7e-7, 6e-7]})
    second = _call_archive(bench, tmp_path, "b", ["sync-stale"], {"sync-stale": [7e-7, 0.01]}, device="NVIDIA H200")
    with pytest.raises(ValueError, match="H200"):
        bench.merge_calls([first, second], tmp_path / "work")
