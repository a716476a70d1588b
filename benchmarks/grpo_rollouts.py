"""GRPO rollouts from vLLM (TRL's colocate mode) against transformers `generate`, on one GPU, and
the check that vLLM samples from the current policy (issue 32).

Each variant is `egm.train.rl.train_rl` (the `rl` rule's code) with the AReaL recipe
(config/recipes/rl_areal.yaml: the one with TRL's vLLM importance-sampling correction, so TRL
compares vLLM's log-probabilities with the policy's) at one-GPU scale, the grounding reward, on
the demo generator's RL data, each in its own process (a vLLM engine does not leave its process):

- speed-vllm, speed-hf: the Qwen3-VL-2B architecture (random bf16 weights, trained with fp32
  masters under bf16 autocast), 640x480 images (300 visual tokens), 4 prompts x 8 samples a step,
  256 new tokens, the same steps with vLLM and with `generate` rollouts: step time, rollout tokens/s
  (completion tokens / time inside vLLM.generate or transformers.generate), trainer tokens/s
  (prompt + completion tokens / the step's time less rollout and weight sync), peak GPU memory.
  A random model writes no box, so every reward is 0 and the policy does not move: cost only.
- sync, sync-stale: the weight-sync check. The demo's tiny model after a short SFT (made on the CPU
  machine by `check-model`; it writes boxes, so rewards differ inside a group and every step moves
  the policy), fp32 in both trainer and vLLM (eager), temperature 1 without top-k/top-p (TRL's log-probs
  apply the temperature only; vLLM's would also be renormalised by a truncation). TRL logs per step
  `sampling/sampling_logp_difference/mean|max`: |log p_vLLM - log p_policy| on the sampled tokens,
  the policy's computed right after the rollout. In sync it stays at the engines' numerical floor;
  `sync-stale` replaces TRL's weight sync by a no-op after the first, the classic fault, and shows
  the same figure growing with the steps.

The finished model directory is not written (`common.finish_stage` is replaced by a stub that keeps
the stage's meta and log history): it costs ~21 s for the 2B (train-h100.json) and says nothing here.

    python -m benchmarks.grpo_rollouts check-model --out resources/grpo-rollouts/tiny-sft    # CPU machine
    python3 -m benchmarks.grpo_rollouts run --check-model resources/grpo-rollouts/tiny-sft --out $OUT  # GPU
    python -m benchmarks.grpo_rollouts run --size tiny --variants speed-hf --out /tmp/r     # CPU smoke
    python -m benchmarks.grpo_rollouts run --dry-run --out /tmp/r     # each variant's GRPOConfig, nothing run
    python -m benchmarks.grpo_rollouts record --work W --out F        # the record from a run's work dir
    python -m benchmarks.grpo_rollouts record --work W --out F --archives A1 A2 [--tag T]
        # one record from several calls' grpo-rollouts-logs.tar.gz (a call cut short, then the rest)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO
from benchmarks.train_gpu import build_data  # the demo data set, as train_gpu.py lays it out
from egm.io import read_json, write_json

RECIPE = REPO / "config" / "recipes" / "rl_areal.yaml"
PACKAGES = ("torch", "transformers", "trl", "accelerate", "datasets", "vllm")
GIB = 2**30
# The paper's recipe at one-GPU scale: 32 completions a step, two forwards of 16.
SPEED_OVERRIDES = dict(
    prompts_per_step=4, group_size=8, micro_batch_size=16, max_new_tokens=256, save_steps=100000, logging_steps=1,
    # vLLM's share of the card beside the 2B's fp32 masters, gradients and Adam states (~34 GB):
    # the recipe's 0.35 of an 80 GB card would leave the trainer too little. Weights (4.3 GB) and a
    # KV cache for 32 sequences of 600 tokens (2.2 GB) need far less.
    vllm_gpu_memory_utilization=0.2,
    vllm_max_model_length=1024,
)
CHECK_OVERRIDES = dict(
    prompts_per_step=8, group_size=8, micro_batch_size=16, max_new_tokens=96, save_steps=100000, logging_steps=1,
    # Large enough that one step moves the tiny policy far beyond the engines' floor.
    learning_rate=1e-4, lr_scheduler="constant", warmup_steps=0,
    temperature=1.0, top_p=1.0, top_k=0, bf16=False, gradient_checkpointing=False,
    vllm_gpu_memory_utilization=0.1, vllm_max_model_length=512,
)
# Arguments added to the LLM that TRL builds in colocate mode (it passes no dtype, and vLLM's
# `auto` would run the check model's fp32 checkpoint in 16 bits, whose rounding on a hidden size
# of 128 is far above the floor the check needs). Eager: nothing to compile for a 2-layer model.
CHECK_ENGINE = {"dtype": "float32", "enforce_eager": True}
# SFT steps of the check model: the demo's answer format is learned by then (docs/training.md).
CHECK_MODEL_STEPS = 300
# name: (model, rollout, stale, steps, time cap in s). Run in this order; the last goes first when
# time runs short.
VARIANTS = {
    "sync": ("check", "vllm", False, 6, 150),
    "speed-vllm": ("speed", "vllm", False, 4, 240),
    "speed-hf": ("speed", "hf", False, 4, 200),
    "sync-stale": ("check", "vllm", True, 6, 120),
}
# In sync, a later step's mean log-prob difference stays within this factor of the first step's
# (both engines hold the start weights at step 1); the stale run must exceed the synced run's
# largest by as much for the check to have shown that it can fail.
SYNC_FACTOR = 3.0
LOGP_DIFF = "sampling/sampling_logp_difference/mean"


# ----------------------------------------------------------------------------- the check model (CPU)


def make_check_model(out: Path, steps: int, images: int) -> dict:
    """The demo's tiny model after `steps` SFT steps of the demo recipe (fp32, as the recipe has no
    bf16): it answers in the SFT format with boxes, so GRPO's rewards differ inside a group."""
    import shutil
    import tempfile

    from egm.models.tiny import write_tiny_model
    from egm.data.paths import SFT_DATA
    from egm.train.recipes import load_recipe
    from egm.train.sft import train_sft

    work = Path(tempfile.mkdtemp(prefix="egm-check-model-"))
    try:
        build_data(work / "data", (96, 96), images)
        write_tiny_model(work / "tiny", seed=0)
        (work / "tiny.json").write_text("{}")
        recipe = load_recipe(REPO / "config" / "recipes" / "demo_sft.yaml")
        recipe.update(save_steps=100000)
        manifest = train_sft(
            work / "tiny", work / "data/ds" / SFT_DATA.format(data="raw"), str(work / "data/images"), out,
            work / "sft.json", work / ".work",
            {"run": "check-model", "recipe": recipe, "max_steps": steps, "limit": None},
            fingerprint_inputs=[work / "tiny.json"],
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"steps": manifest["global_step"], "loss": manifest["log"]["last"].get("loss")}


# ----------------------------------------------------------------------------- preparation


def variant_recipe(model: str, rollout: str, size: str) -> dict:
    from egm.train.recipes import load_recipe

    recipe = load_recipe(RECIPE)
    recipe.update(SPEED_OVERRIDES if model == "speed" else CHECK_OVERRIDES)
    if "warmup_steps" in recipe:
        recipe.pop("warmup_ratio", None)
    recipe["rollout"] = rollout
    if size == "tiny" and model == "speed":  # the CPU smoke run: seconds a step
        recipe.update(prompts_per_step=2, group_size=4, micro_batch_size=8, max_new_tokens=16, bf16=False,
                      gradient_checkpointing=False)
    return recipe


def check_model_dir(args) -> str:
    """The carried check model, or where `prepare` trains one (on the GPU, ~300 steps) without it."""
    carried = Path(args.check_model).resolve()
    return str(carried if (carried / "config.json").exists() else Path(args.work) / "check-model")


def make_plan(args) -> dict:
    names = args.variants or list(VARIANTS)
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    work = Path(args.work)
    plan = {"work": str(work), "size": args.size, "check_f32": args.check_f32, "tag": getattr(args, "tag", None),
            "floor": bool(getattr(args, "floor", False)), "variants": {}}
    for name in names:
        model, rollout, stale, steps, cap = VARIANTS[name]
        plan["variants"][name] = {
            "model": model, "rollout": rollout, "stale": stale, "steps": args.steps or steps, "cap_s": cap,
            "recipe": variant_recipe(model, rollout, args.size),
            "vllm_engine_extra": CHECK_ENGINE if model == "check" and rollout == "vllm" else {},
            # The check model's fp32 dot products inside vLLM's Triton kernels (see logp_floor).
            "env": triton_env(args.check_f32) if model == "check" and rollout == "vllm" else {},
            "model_dir": str(work / "speed-model") if model == "speed" else check_model_dir(args),
            "data": str(work / ("speed-data" if model == "speed" else "check-data")),
        }
    return plan


def prepare(plan: dict) -> dict:
    """The speed model (random weights, drawn on the GPU where there is one) and both data sets."""
    import torch

    from egm.models.architectures import write_architecture_model

    work = Path(plan["work"])
    out: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"}
    models = {v["model"] for v in plan["variants"].values()}
    if "speed" in models:
        t0 = time.perf_counter()
        arch = "qwen3-vl-2b" if plan["size"] == "2b" else "tiny"
        out["speed_params"] = write_architecture_model(work / "speed-model", arch, weights=True,
                                                       device="cuda" if torch.cuda.is_available() else "cpu")
        out["speed_arch"] = arch
        out["build_model_s"] = round(time.perf_counter() - t0, 1)
        build_data(work / "speed-data", (640, 480) if plan["size"] == "2b" else (96, 96), 24)
    if "check" in models:
        build_data(work / "check-data", (96, 96), 64)
        model_dir = next(v["model_dir"] for v in plan["variants"].values() if v["model"] == "check")
        if not (Path(model_dir) / "config.json").exists():
            t0 = time.perf_counter()
            out["check_model"] = {**make_check_model(Path(model_dir), CHECK_MODEL_STEPS, 400),
                                  "trained_here_s": round(time.perf_counter() - t0, 1)}
    return out


# ----------------------------------------------------------------------------- one variant (its own process)


class StepTap:
    """Per optimizer step: wall time, the time inside each of TRL's profiled sections (rollout,
    weight sync, log-prob forwards, rewards, loss), GPU memory, and the step's log entry; written
    to `path` after every step, so a run cut short keeps what it measured."""

    def __init__(self, path: Path):
        import torch
        from transformers import TrainerCallback

        from trl.extras import profiling

        self.path, self.torch = path, torch
        self.sections: list[tuple[str, float]] = []
        self.steps: list[dict] = []
        self.started = time.perf_counter()
        self.train_begin_s = None
        self._mark = self._t0 = None
        original = profiling.ProfilingContext._log_metrics
        tap = self

        def _log_metrics(context, duration):
            # TRL times these sections only for experiment trackers; the record takes them too.
            tap.sections.append((context.name.split(".", 1)[-1], duration))
            return original(context, duration)

        profiling.ProfilingContext._log_metrics = _log_metrics

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                tap.train_begin_s = round(time.perf_counter() - tap.started, 2)
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()

            def on_step_begin(self, args, state, control, **kwargs):
                tap._sync()
                tap._mark, tap._t0 = len(tap.sections), time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                tap._sync()
                step_s = time.perf_counter() - tap._t0
                sections: dict[str, float] = {}
                for name, seconds in tap.sections[tap._mark:]:
                    sections[name] = round(sections.get(name, 0.0) + seconds, 4)
                tap.steps.append({"step": state.global_step, "step_s": round(step_s, 4), "sections_s": sections,
                                  **tap._memory()})
                tap.write()

            def on_log(self, args, state, control, logs=None, **kwargs):
                if tap.steps and logs and "loss" in logs:
                    tap.steps[-1]["log"] = {k: v for k, v in logs.items() if isinstance(v, (int, float))}
                    tap.write()

        self.callback = Callback()

    def _sync(self):
        if self.torch.cuda.is_available():
            self.torch.cuda.synchronize()

    def _memory(self) -> dict:
        cuda = self.torch.cuda
        if not cuda.is_available():
            return {}
        free, total = cuda.mem_get_info()
        return {"allocated_peak_gib": round(cuda.max_memory_allocated() / GIB, 2),
                "reserved_peak_gib": round(cuda.max_memory_reserved() / GIB, 2),
                "device_used_gib": round((total - free) / GIB, 2)}

    def write(self, **extra):
        write_json(self.path, {"train_begin_s": self.train_begin_s, "steps": self.steps, **extra})


def stale_after_first_sync() -> None:
    """The fault the check must catch: vLLM keeps the weights of the first sync (the start model)."""
    from trl.generation import vllm_generation

    original = vllm_generation.VLLMGeneration.sync_weights

    def sync_once(self):
        if not getattr(self, "_egm_synced_once", False):
            original(self)
            self._egm_synced_once = True

    vllm_generation.VLLMGeneration.sync_weights = sync_once


def add_engine_arguments(extra: dict) -> None:
    import functools

    from trl.generation import vllm_generation

    vllm_generation.LLM = functools.partial(vllm_generation.LLM, **extra)


def run_variant(plan: dict, name: str) -> None:
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    spec = plan["variants"][name]
    os.environ.update(spec.get("env", {}))
    work = Path(plan["work"]) / name
    work.mkdir(parents=True, exist_ok=True)
    tap = StepTap(work / "steps.json")
    if spec["stale"]:
        stale_after_first_sync()
    if spec["vllm_engine_extra"]:
        add_engine_arguments(spec["vllm_engine_extra"])

    from egm.train import common
    from egm.train.rl import train_rl

    kept = {}

    def keep_meta(trainer, work_dir, start_dir, out_dir, manifest_path, meta):
        kept.update(meta=meta, global_step=trainer.state.global_step, log_history=trainer.state.log_history)
        return kept

    common.finish_stage = keep_meta
    (work / "start.json").write_text("{}")
    data = Path(spec["data"])
    train_rl(spec["model_dir"], data / "rl" / "train.parquet", None, work / "rl", work / "rl.json", work / ".work",
             {"run": name, "recipe": spec["recipe"], "max_steps": spec["steps"], "limit": None},
             fingerprint_inputs=[work / "start.json"], callbacks=[tap.callback])
    meta = kept["meta"]
    tap.write(rollout=meta["rollout"], trl_args=meta["trl_args"], cost=meta["cost"],
              log_history=kept["log_history"], done=True)


# ----------------------------------------------------------------------------- the log-prob floor

# Prompts of the floor check, and the settings of Triton's fp32 dot products it compares: vLLM's
# Triton attention kernels (the backends that take float32) call `tl.dot` without a precision, and
# Triton's default for float32 inputs is TF32 (10-bit mantissa) unless TRITON_F32_DEFAULT says
# otherwise; the trainer's float32 attention (PyTorch SDPA) is IEEE.
FLOOR_PROMPTS = 16
FLOOR_PRECISIONS = ("tf32", "ieee")


def triton_env(precision: str) -> dict:
    """Triton's fp32 dot precision, and a kernel cache of its own: kernels compiled under the
    other setting are never reused."""
    return {"TRITON_F32_DEFAULT": precision, "TRITON_CACHE_DIR": f"/tmp/egm-triton-{precision}"}


def floor_stats(diffs: list[float]) -> dict:
    if not diffs:
        return {"tokens": 0}
    ordered = sorted(diffs)
    return {"tokens": len(diffs), "mean": round(statistics.fmean(diffs), 6), "median": round(ordered[len(ordered) // 2], 6),
            "max": round(ordered[-1], 6), "over_0.01": round(sum(d > 0.01 for d in diffs) / len(diffs), 4)}


def logp_floor(plan: dict, precision: str) -> dict:
    """Where vLLM and the trainer disagree at equal weights: the check model's vLLM engine as TRL
    builds it (plus CHECK_ENGINE), 16 RL prompts sampled once each at temperature 1, then the
    trainer's model (transformers, float32, SDPA) scores the same tokens, one sequence at a time
    and as TRL's batched, left-padded forward does. Reported per part: the completion tokens
    (what TRL's `sampling_logp_difference` averages), the prompt's text after the image (vLLM's
    prompt log-probs), and the same prompts without their image (the text model alone)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process, as in TRL's colocate mode
    os.environ.update(triton_env(precision))
    import torch
    from transformers import AutoModelForImageTextToText
    from trl.data_utils import prepare_multimodal_messages
    from vllm import LLM, SamplingParams

    from egm.models.inputs import IMAGE_TOKEN
    from egm.train.data import rl_dataset
    from egm.train.processing import load_processor
    from egm.train.rl import collapse_image_placeholders

    spec = next(v for v in plan["variants"].values() if v["model"] == "check")
    model_dir = spec["model_dir"]
    dataset, _ = rl_dataset(Path(spec["data"]) / "rl" / "train.parquet", limit=FLOOR_PROMPTS)
    processor = load_processor(model_dir)  # the trainer's (egm.train.common.load_for_training), no pixel override
    rows = [dataset[i] for i in range(min(FLOOR_PROMPTS, len(dataset)))]
    with_image = [prepare_multimodal_messages(r["prompt"], images=r["images"]) for r in rows]
    text_only = [[{"role": m["role"], "content": [c for c in m["content"] if c["type"] != "image"]} for m in msgs]
                 for msgs in with_image]
    max_len = CHECK_OVERRIDES["vllm_max_model_length"]
    llm = LLM(model=model_dir, gpu_memory_utilization=CHECK_OVERRIDES["vllm_gpu_memory_utilization"],
              max_model_len=max_len, max_num_batched_tokens=4096, logprobs_mode="processed_logprobs",
              enable_prefix_caching=False, seed=0, **CHECK_ENGINE)
    sampling = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_tokens=CHECK_OVERRIDES["max_new_tokens"],
                              logprobs=0, prompt_logprobs=0, seed=0)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()

    def images_of(messages) -> list:
        return [c["image"] for m in messages for c in m["content"] if c["type"] == "image"]

    def encode(messages):
        return processor.apply_chat_template(conversation=[messages], add_generation_prompt=True, tokenize=True,
                                             return_dict=True, return_tensors="pt")

    def own_logps(ids: list[int], extra: dict) -> list[float]:
        inputs = {k: v.to(device) for k, v in extra.items() if k not in ("input_ids", "attention_mask")}
        if "mm_token_type_ids" in inputs:  # the completion's tokens are text
            pad = len(ids) - inputs["mm_token_type_ids"].shape[1]
            inputs["mm_token_type_ids"] = torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, pad))
        tensor = torch.tensor([ids], device=device)
        with torch.inference_mode():
            logits = model(input_ids=tensor, attention_mask=torch.ones_like(tensor), **inputs).logits[0].float()
        logps = torch.log_softmax(logits[:-1], dim=-1).gather(1, tensor[0, 1:, None])[:, 0]
        return [None, *logps.tolist()]

    out: dict = {"precision": precision, "triton_f32_default": os.environ.get("TRITON_F32_DEFAULT"),
                 "prompts": len(rows), "engine": {**CHECK_ENGINE, "logprobs_mode": "processed_logprobs"}}
    batched_for: dict = {}
    image_token = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    for part, conversations in (("image", with_image), ("text_only", text_only)):
        encoded = [encode(c) for c in conversations]
        requests = []
        for conv, enc in zip(conversations, encoded):
            # As the `rl` stage sends them: one placeholder per image, which vLLM expands.
            request = {"prompt_token_ids": collapse_image_placeholders(enc["input_ids"][0].tolist(), image_token)}
            images = images_of(conv)
            if images:
                request["multi_modal_data"] = {"image": images[0]}
            requests.append(request)
        outputs = llm.generate(requests, sampling_params=sampling, use_tqdm=False)
        completion, prompt_text, same_prompt, image_tokens = [], [], 0, []
        for enc, output in zip(encoded, outputs):
            prompt_ids = enc["input_ids"][0].tolist()  # the trainer's prompt
            theirs_prompt = list(output.prompt_token_ids)
            same_prompt += theirs_prompt == prompt_ids
            image_tokens.append([prompt_ids.count(image_token), theirs_prompt.count(image_token)])
            sample = output.outputs[0]
            ids = prompt_ids + list(sample.token_ids)
            ours = own_logps(ids, enc)
            theirs = [None] * len(prompt_ids) + [lp[t].logprob for lp, t in zip(sample.logprobs, sample.token_ids)]
            last_image = max((i for i, t in enumerate(prompt_ids) if t == image_token), default=0)
            if theirs_prompt == prompt_ids:  # vLLM's prompt log-probs line up with ours
                for i, logprob in enumerate(output.prompt_logprobs or []):
                    if logprob and i > last_image:
                        prompt_text.append(abs(logprob[prompt_ids[i]].logprob - ours[i]))
            completion += [abs(a - b) for a, b in zip(theirs[len(prompt_ids):], ours[len(prompt_ids):])]
            if part == "image":
                batched_for.setdefault("samples", []).append((prompt_ids, list(sample.token_ids), theirs[len(prompt_ids):]))
        out[part] = {"prompt_ids_equal": same_prompt, "image_tokens_ours_vllm": image_tokens,
                     "completion": floor_stats(completion),
                     "prompt_text_after_image": floor_stats(prompt_text)}
    # TRL's own forward: the batch's prompts through the processor with padding (left), the
    # completions right-padded after them, one forward for all.
    samples = batched_for["samples"]
    texts = [processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in with_image]
    images = [images_of(conv) for conv in with_image]
    processor.tokenizer.padding_side = "left"
    batch = processor(images=images, text=texts, padding=True, return_tensors="pt")
    width = max(len(s[1]) for s in samples)
    pad_id = processor.tokenizer.pad_token_id or 0
    completions = torch.tensor([s[1] + [pad_id] * (width - len(s[1])) for s in samples])
    mask = torch.tensor([[1] * len(s[1]) + [0] * (width - len(s[1])) for s in samples])
    ids = torch.cat([batch["input_ids"], completions], dim=1).to(device)
    attention = torch.cat([batch["attention_mask"], mask], dim=1).to(device)
    extra = {k: v.to(device) for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    if "mm_token_type_ids" in extra:
        extra["mm_token_type_ids"] = torch.nn.functional.pad(extra["mm_token_type_ids"], (0, width))
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=attention, **extra).logits.float()
    start = batch["input_ids"].shape[1]
    logps = torch.log_softmax(logits[:, start - 1:-1], dim=-1).gather(2, ids[:, start:, None])[..., 0]
    diffs = [abs(theirs[j] - logps[i, j].item()) for i, (_, done, theirs) in enumerate(samples) for j in range(len(done))]
    out["image"]["completion_batched_left_padded"] = floor_stats(diffs)
    return out


# ----------------------------------------------------------------------------- the run


def environment() -> dict:
    from egm.provenance import package_version

    return {"python": platform.python_version(), "packages": {p: package_version(p) for p in PACKAGES}}


def card_name(device: str) -> str:
    lowered = device.lower()
    for card in ("h200", "h100", "a100"):
        if card in lowered:
            return card
    return "cpu" if "nvidia" not in lowered else lowered.split()[-1]


def run_step(command: list[str], log: Path, limit: float) -> dict:
    """A subprocess with a time limit: SIGINT first (Python unwinds), SIGKILL 20 s later."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
        try:
            rc = proc.wait(timeout=max(limit, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = "timeout"
    return {"rc": rc, "wall_s": round(time.perf_counter() - t0, 1), "limit_s": round(limit)}


def run(args) -> Path:
    started = time.perf_counter()
    deadline = started + args.budget_s
    plan = make_plan(args)
    work = Path(args.work)
    if args.dry_run:
        print(json.dumps(dry_run(plan), indent=2))
        return work
    work.mkdir(parents=True, exist_ok=True)
    for stale in ("prepared.json", *(f"floor-{p}.json" for p in FLOOR_PRECISIONS),
                  *(f"{name}/steps.json" for name in plan["variants"])):
        (work / stale).unlink(missing_ok=True)  # an earlier call's would pass for this call's
    write_json(work / "plan.json", plan)
    me = [sys.executable, "-m", "benchmarks.grpo_rollouts"]  # run_step starts it in the repository
    statuses = {}
    statuses["prepare"] = run_step([*me, "prepare", "--plan", str(work / "plan.json")], work / "logs/prepare.log",
                                   min(180, deadline - time.perf_counter()))
    print("prepare", statuses["prepare"], flush=True)
    has_check = any(v["model"] == "check" for v in plan["variants"].values())
    if statuses["prepare"]["rc"] == 0 and plan["floor"] and has_check:
        for precision in FLOOR_PRECISIONS:
            statuses[f"floor-{precision}"] = run_step(
                [*me, "floor", precision, "--plan", str(work / "plan.json")], work / f"logs/floor-{precision}.log",
                min(120, deadline - time.perf_counter() - 60))
            print(f"floor-{precision}", statuses[f"floor-{precision}"], flush=True)
    if statuses["prepare"]["rc"] == 0:
        for name, spec in plan["variants"].items():
            left = deadline - time.perf_counter() - 15
            if not (Path(spec["model_dir"]) / "config.json").exists():
                statuses[name] = {"rc": "no model", "model_dir": spec["model_dir"]}
                continue
            if left < 45:
                statuses[name] = {"rc": "not started", "left_s": round(left)}
                continue
            statuses[name] = run_step([*me, "variant", name, "--plan", str(work / "plan.json")],
                                      work / f"logs/{name}.log", min(spec["cap_s"], left))
            print(name, statuses[name], flush=True)
    write_json(work / "statuses.json", statuses)
    path = write_record(work, Path(args.out))
    # The runs' logs and per-step files beside the record: what a failed variant said.
    import tarfile

    with tarfile.open(Path(args.out) / "grpo-rollouts-logs.tar.gz", "w:gz") as tar:
        for name in ("plan.json", "prepared.json", "statuses.json", "logs", *(f"floor-{p}.json" for p in FLOOR_PRECISIONS),
                     *(f"{v}/steps.json" for v in plan["variants"])):
            if (work / name).exists():
                tar.add(work / name, arcname=name)
    return path


def dry_run(plan: dict) -> dict:
    """Each variant's GRPOConfig arguments as they would resolve on a GPU with vLLM installed; TRL
    accepts them all (checked by building the config)."""
    from trl import GRPOConfig

    from egm.train.recipes import rl_args

    out = {}
    for name, spec in plan["variants"].items():
        kwargs = rl_args(spec["recipe"], on_gpu=True, max_steps=spec["steps"], vllm_available=True)
        kwargs["use_cpu"], kwargs["bf16"] = True, False  # only so that the config builds on this machine
        GRPOConfig(output_dir=str(Path(plan["work"]) / "dry" / name), report_to="none", **kwargs)
        out[name] = {**{k: v for k, v in spec.items() if k != "recipe"},
                     "grpo": rl_args(spec["recipe"], on_gpu=True, max_steps=spec["steps"], vllm_available=True)}
    return out


# ----------------------------------------------------------------------------- the record


def step_figures(step: dict, completions: int, tokens_before: float) -> dict:
    """One step's rates: rollout tokens/s inside the generate call, trainer tokens/s outside it."""
    log = step.get("log", {})
    sections = step["sections_s"]
    rollout_s = sections.get("vLLM.generate", sections.get("transformers.generate"))
    sync_s = sections.get("sync_weights", 0.0)
    completion_tokens = log.get("completions/mean_length", 0.0) * completions
    train_tokens = log.get("num_tokens", tokens_before) - tokens_before
    trainer_s = step["step_s"] - (rollout_s or 0.0) - sync_s
    out = {
        "step": step["step"], "step_s": step["step_s"], "rollout_s": rollout_s, "sync_s": round(sync_s, 4),
        # Every per-token log-prob forward of the step: the loss's and, with vLLM's importance
        # correction, the one right after the rollout.
        "logp_forwards_s": sections.get("_get_per_token_logps_and_entropies"),
        "completion_tokens": round(completion_tokens), "trainer_tokens": round(train_tokens),
        "rollout_tokens_per_s": round(completion_tokens / rollout_s, 1) if rollout_s else None,
        "trainer_tokens_per_s": round(train_tokens / trainer_s, 1) if trainer_s > 0 else None,
        "reward": log.get("reward"), "loss": log.get("loss"), "grad_norm": log.get("grad_norm"),
        # Groups whose rewards were all equal: no advantage, no gradient from them.
        "frac_reward_zero_std": log.get("frac_reward_zero_std"),
        "logp_diff_mean": log.get(LOGP_DIFF), "logp_diff_max": log.get("sampling/sampling_logp_difference/max"),
        "is_ratio_mean": log.get("sampling/importance_sampling_ratio/mean"),
    }
    return {**out, **{k: step[k] for k in ("allocated_peak_gib", "reserved_peak_gib", "device_used_gib") if k in step}}


def median_after_first(values: list) -> float | None:
    values = [v for v in values if v is not None]
    later = values[1:] or values
    return round(statistics.median(later), 4) if later else None


def variant_record(spec: dict, raw: dict | None, status: dict | None) -> dict:
    out = {"status": status, "model": spec["model"], "rollout_asked": spec["rollout"], "stale": spec["stale"],
           "steps_asked": spec["steps"], "recipe": spec["recipe"]}
    if not raw:
        return out
    completions = spec["recipe"]["prompts_per_step"] * spec["recipe"]["group_size"]
    steps, tokens = [], 0.0
    for step in raw["steps"]:
        steps.append(step_figures(step, completions, tokens))
        tokens = step.get("log", {}).get("num_tokens", tokens)
    generated = {name for step in raw["steps"] for name in step["sections_s"] if name.endswith("generate")}
    out.update({
        "startup_s": raw.get("train_begin_s"),
        "rollout_in_manifest": raw.get("rollout"),
        "generate_sections_seen": sorted(generated),
        # The manifest's rollout path against the section TRL actually timed.
        "manifest_rollout_true": (None if not raw.get("rollout") or not generated else
                                  ({"vLLM.generate"} == generated) == raw["rollout"].startswith("vllm")),
        "completed": bool(raw.get("done")),
        "completions_per_step": completions,
        "grpo_args": raw.get("trl_args"),
        "steps": steps,
        "median_after_first": {key: median_after_first([s[key] for s in steps]) for key in (
            "step_s", "rollout_s", "sync_s", "rollout_tokens_per_s", "trainer_tokens_per_s")},
        "peak": {key: max((s.get(key) or 0) for s in steps) or None
                 for key in ("allocated_peak_gib", "reserved_peak_gib", "device_used_gib")},
    })
    return out


def sync_check(synced: list[float | None], stale: list[float | None] | None) -> dict:
    """Whether vLLM sampled from the current policy: the synced run's per-step mean log-prob
    difference stays within SYNC_FACTOR of its first step's (when both engines hold the start
    weights), and, where the stale run ran past its first step, its difference grew beyond the
    synced run's largest by as much (the check can fail)."""
    synced = [v for v in synced if v is not None]
    out: dict = {"factor": SYNC_FACTOR, "synced_logp_diff_mean": synced,
                 "stale_logp_diff_mean": [v for v in (stale or []) if v is not None] or None}
    if len(synced) < 2:
        out["current_policy"] = None
        return out
    floor = max(synced[0], 1e-7)
    out["current_policy"] = max(synced[1:]) <= SYNC_FACTOR * floor
    later = (out["stale_logp_diff_mean"] or [])[1:]
    out["stale_detected"] = (max(later) > SYNC_FACTOR * max(synced)) if later else None
    return out


NOT_RUN = ("not started", "no model", None)


def merge_calls(archives: list[Path], work: Path, tag: str | None = None) -> Path:
    """One work directory from several calls' `grpo-rollouts-logs.tar.gz` on the same card, in
    order (a call cut short, then one that runs what it left): each variant as the last call that
    ran it left it, the preparation and floors of the first that has them. `write_record` then
    makes one record, whose sync check compares the synced and the stale run."""
    import shutil
    import tarfile

    # A work directory used before would lend its preparation or a variant's steps to this record.
    if work.exists() and any(work.iterdir()):
        raise ValueError(f"{work}: not empty; merging needs a new or empty work directory")
    work.mkdir(parents=True, exist_ok=True)
    plan, statuses, device = None, {}, None
    for i, archive in enumerate(archives):
        part = work / "calls" / str(i)
        with tarfile.open(archive) as tar:
            tar.extractall(part, filter="data")  # no absolute paths, no '..', no links out
        call_plan = read_json(part / "plan.json")
        call_statuses = read_json(part / "statuses.json") if (part / "statuses.json").exists() else {}
        call_device = read_json(part / "prepared.json").get("device") if (part / "prepared.json").exists() else None
        if device and call_device and call_device != device:
            raise ValueError(f"{archive}: ran on {call_device}, an earlier call on {device}: not one record")
        device = device or call_device
        if plan is None:
            plan = {**call_plan, "variants": {}}
        for name in ("prepared.json", *(f"floor-{p}.json" for p in FLOOR_PRECISIONS)):
            if (part / name).exists() and not (work / name).exists():
                shutil.copy(part / name, work / name)
        for name, status in call_statuses.items():
            if name == "prepare" or name.startswith("floor-"):
                statuses.setdefault(name, status)
        for name, spec in call_plan["variants"].items():
            status = call_statuses.get(name) or {}
            if name in plan["variants"] and status.get("rc") in NOT_RUN:
                continue  # an earlier call ran it: this one did not
            plan["variants"][name], statuses[name] = spec, status
            for what, dest in ((part / name / "steps.json", work / name / "steps.json"),
                               (part / "logs" / f"{name}.log", work / "logs" / f"{name}.log")):
                dest.unlink(missing_ok=True)  # an earlier call's, for a variant this call ran again
                if what.exists():
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(what, dest)
    if plan is None:
        raise ValueError("no archives to merge")
    plan["tag"] = tag if tag is not None else plan.get("tag")
    write_json(work / "plan.json", plan)
    write_json(work / "statuses.json", statuses)
    return work


def write_record(work: Path, out_dir: Path) -> Path:
    plan = read_json(work / "plan.json")
    statuses = read_json(work / "statuses.json") if (work / "statuses.json").exists() else {}
    prepared = read_json(work / "prepared.json") if (work / "prepared.json").exists() else {}
    device = prepared.get("device", "unknown")
    variants = {}
    for name, spec in plan["variants"].items():
        raw_path = work / name / "steps.json"
        variants[name] = variant_record(spec, read_json(raw_path) if raw_path.exists() else None, statuses.get(name))
        log = work / "logs" / f"{name}.log"
        if statuses.get(name, {}).get("rc") not in (0, None) and log.exists():
            variants[name]["log_tail"] = log.read_text(errors="replace").splitlines()[-30:]
    record = {
        "what": "GRPO (egm.train.rl, AReaL recipe at one-GPU scale, grounding reward, demo RL data): vLLM colocate "
                "rollouts against transformers generate, and the check that vLLM samples from the current policy",
        "device": device, "environment": prepared.pop("environment", None), "prepared": prepared,
        "statuses": statuses, "variants": variants,
    }
    floors = {p: read_json(work / f"floor-{p}.json") for p in FLOOR_PRECISIONS if (work / f"floor-{p}.json").exists()}
    if floors:
        record["logp_floor"] = floors
    record["check_f32"] = plan.get("check_f32")
    vllm, hf = variants.get("speed-vllm", {}), variants.get("speed-hf", {})
    fast, slow = vllm.get("median_after_first", {}), hf.get("median_after_first", {})
    if fast.get("step_s") and slow.get("step_s"):
        record["vllm_vs_generate"] = {
            "step_time_speedup": round(slow["step_s"] / fast["step_s"], 2),
            "rollout_tokens_per_s_ratio": (round(fast["rollout_tokens_per_s"] / slow["rollout_tokens_per_s"], 2)
                                           if fast.get("rollout_tokens_per_s") and slow.get("rollout_tokens_per_s")
                                           else None),
        }
    if "sync" in variants:
        synced = variants["sync"].get("steps", [])
        record["sync_check"] = sync_check([s["logp_diff_mean"] for s in synced],
                                          [s["logp_diff_mean"] for s in variants.get("sync-stale", {}).get("steps", [])])
        # The check needs a moving policy: steps with a gradient (some group's rewards differed).
        record["sync_check"]["steps_with_gradient"] = sum(1 for s in synced if (s.get("grad_norm") or 0) > 0)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"-{plan['tag']}" if plan.get("tag") else ""
    path = out_dir / f"grpo-rollouts-{card_name(device)}{tag}.json"
    write_json(path, record)
    summary = {name: {"rc": (v.get("status") or {}).get("rc"), "steps": len(v.get("steps", [])),
                      **v.get("median_after_first", {}), "peak": v.get("peak")} for name, v in variants.items()}
    print(json.dumps({"variants": summary, "vllm_vs_generate": record.get("vllm_vs_generate"),
                      "sync_check": record.get("sync_check"), "logp_floor": record.get("logp_floor")}, indent=1),
          flush=True)
    print(f"wrote {path}", flush=True)
    return path


# ----------------------------------------------------------------------------- CLI


def exit_after(step) -> None:
    """Run a step that may hold a vLLM engine, then leave at once: a colocated engine's threads can
    hold the interpreter at exit, and everything is written by then (steps.json after every step,
    the traceback in the log). Exit code 1 on any exception, the time limit's SIGINT included."""
    rc = 0
    try:
        step()
    except BaseException:  # noqa: BLE001 - also the SIGINT of the time limit
        import traceback

        traceback.print_exc()
        rc = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check-model", help="the tiny model after a short SFT (CPU machine)")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=CHECK_MODEL_STEPS)
    p.add_argument("--images", type=int, default=400)
    p = sub.add_parser("run", help="every variant, each in its own process, then the record")
    p.add_argument("--out", required=True, help="folder of the record (grpo-rollouts-<card>.json)")
    p.add_argument("--work", default="/tmp/egm-grpo-rollouts")
    p.add_argument("--check-model", default=str(REPO / "resources" / "grpo-rollouts" / "tiny-sft"),
                   help="made by check-model; where it is missing, `prepare` trains one here first")
    p.add_argument("--size", choices=["2b", "tiny"], default="2b")
    p.add_argument("--variants", nargs="*", help=f"default: {' '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, help="steps of every variant (default: each its own)")
    p.add_argument("--budget-s", type=float, default=440, help="the whole run, preparation included")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--tag", help="the record's name gets -TAG (a run of some variants beside a full one)")
    p.add_argument("--floor", action="store_true", help="first, where vLLM and the trainer disagree at equal weights")
    p.add_argument("--check-f32", choices=["ieee", "tf32"], default="ieee",
                   help="Triton's fp32 dot products in the check variants' vLLM (TRITON_F32_DEFAULT)")
    for name in ("prepare", "variant"):
        p = sub.add_parser(name)
        if name == "variant":
            p.add_argument("name")
        p.add_argument("--plan", required=True)
    p = sub.add_parser("floor", help="one precision's log-prob floor (its own process)")
    p.add_argument("precision", choices=FLOOR_PRECISIONS)
    p.add_argument("--plan", required=True)
    p = sub.add_parser("record", help="the record from a run's work directory, or from several calls' log archives")
    p.add_argument("--work", required=True, help="the work directory (with --archives: made there, empty or new)")
    p.add_argument("--out", required=True)
    p.add_argument("--archives", nargs="*", help="grpo-rollouts-logs.tar.gz of calls on one card, in order")
    p.add_argument("--tag", help="with --archives: the record's tag (default: the first call's)")
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.command == "check-model":
        print(json.dumps(make_check_model(Path(args.out), args.steps, args.images)))
    elif args.command == "run":
        run(args)
    elif args.command == "prepare":
        plan = read_json(args.plan)
        write_json(Path(plan["work"]) / "prepared.json", {**prepare(plan), "environment": environment()})
    elif args.command == "floor":
        plan = read_json(args.plan)
        exit_after(lambda: write_json(Path(plan["work"]) / f"floor-{args.precision}.json",
                                      logp_floor(plan, args.precision)))
    elif args.command == "variant":
        exit_after(lambda: run_variant(read_json(args.plan), args.name))
    else:
        if args.archives:
            merge_calls([Path(a) for a in args.archives], Path(args.work), args.tag)
        write_record(Path(args.work), Path(args.out))


if __name__ == "__main__":
    main()
