"""A few SFT and GRPO steps of the pipeline's own training code on a real-size Qwen3-VL (random weights).

The model is the Qwen3-VL-2B architecture of EGM.md section 6 (vocabulary 151936, 28 layers,
hidden 2048; ViT depth 24), built with random weights and saved as a model directory; the text
side uses the demo's tokenizer (the real one cannot be downloaded there), so only the token ids
differ from the real model. The data is the demo data set drawn at 640x480, so each image is
resized to the paper's SFT pixel budget (max 50176 -> 256x192 -> 48 visual tokens).

What runs is `egm.train.sft.train_sft` and `egm.train.rl.train_rl` with the paper's recipes
(config/recipes/sft.yaml, rl_verl.yaml) and only these overrides for one GPU and a short run:
SFT global batch 8 (micro 8, the paper's per-GPU size), GRPO 2 prompts x 8 samples with
128 new tokens, transformers `generate` rollouts (no vLLM in that image). bf16 autocast with
fp32 master weights (TRL's default), gradient checkpointing on as in the recipes. Reported:
steady-state steps/s and samples/s (first step excluded), peak GPU memory, and the time of
writing the finished model directory (weights, hashes, manifest).

    python -m benchmarks.train_gpu --out benchmarks/results/train-h100.json        # on a GPU
    python -m benchmarks.train_gpu --size tiny --out /tmp/train-tiny.json           # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import statistics
import time
from pathlib import Path

from benchmarks.common import REPO


def build_model_dir(out: Path, arch: str, device: str) -> int:
    """The architecture with random bf16 weights, saved like the released checkpoints."""
    from egm.models.architectures import write_architecture_model

    return write_architecture_model(out, arch, weights=True, device=device)


def build_data(root: Path, side: tuple[int, int], n_images: int) -> None:
    from egm.data.archives import extract_archive, part_files
    from egm.data.demo import write_demo_dataset
    from egm.data.parquet import rewrite_image_paths

    write_demo_dataset(root / "ds", seed=0, n_train_images=n_images, n_eval_per_split=2, width=side[0],
                       height=side[1])
    extract_archive(part_files(root / "ds"), root / "images")
    extract_archive([root / "ds" / "coco_flip.tar"], root / "images")
    for part in ("train", "val"):
        rewrite_image_paths(root / "ds" / "processed_rl_data" / f"{part}_grounding.parquet",
                            root / "rl" / f"{part}.parquet", str(root / "images"))


def step_timer():
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.start = None

        def on_step_begin(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.start)

        def on_train_begin(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

    return StepTimer()


def summarise(timer, samples_per_step: int, manifest: dict, wall_s: float, finish_s: float) -> dict:
    import torch

    steady = timer.times[1:] or timer.times
    median = statistics.median(steady)
    last = manifest["log"]["last"]
    return {
        "steps": len(timer.times),
        "step_s": [round(t, 4) for t in timer.times],
        "first_step_s": round(timer.times[0], 3),
        "median_step_s_after_first": round(median, 4),
        "steps_per_s": round(1 / median, 4),
        "samples_per_s": round(samples_per_step / median, 3),
        "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        "wall_s": round(wall_s, 1),
        "write_model_dir_s": round(finish_s, 1),
        "last_log": {k: v for k, v in last.items() if isinstance(v, (int, float))},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["2b", "tiny"], default="2b")
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", default="/tmp/egm-train-bench")
    parser.add_argument("--sft-steps", type=int, default=10)
    parser.add_argument("--rl-steps", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch
    import transformers
    import trl

    from egm.train import common
    from egm.data.paths import SFT_DATA
    from egm.train.recipes import load_recipe
    from egm.train.rl import train_rl
    from egm.train.sft import train_sft

    gpu = torch.cuda.is_available()
    arch = "qwen3-vl-2b" if args.size == "2b" else "tiny"
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    record: dict = {
        "what": "egm.train SFT and GRPO steps, paper recipes, random-weight model",
        "model": f"{arch} architecture (EGM.md section 6), random bf16 weights saved, trained with fp32 "
                 "master weights + bf16 autocast",
        "device": torch.cuda.get_device_name() if gpu else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
        "python": platform.python_version(),
    }

    t0 = time.perf_counter()
    record["params"] = build_model_dir(work / "base", arch, "cuda" if gpu else "cpu")
    record["build_and_save_model_s"] = round(time.perf_counter() - t0, 1)
    (work / "base.json").write_text("{}")
    side = (640, 480) if args.size == "2b" else (96, 96)
    build_data(work / "data", side, n_images=40 if args.size == "2b" else 8)

    # SFT: the paper's recipe, one GPU's share of the global batch.
    sft_recipe = load_recipe(REPO / "config/recipes/sft.yaml")
    sft_recipe.update(global_batch_size=8, micro_batch_size=8, save_steps=100000, logging_steps=1,
                      dataloader_num_workers=2)
    if not gpu:
        sft_recipe.update(image_max_pixels=9216, image_min_pixels=9216)
    timer = step_timer()
    t0 = time.perf_counter()
    original_finish = common.finish_stage
    finish_times = {}

    def timed_finish(*a, **k):
        start = time.perf_counter()
        out = original_finish(*a, **k)
        finish_times[len(finish_times)] = time.perf_counter() - start
        return out

    common.finish_stage = timed_finish
    import egm.train.rl as rl_module
    import egm.train.sft as sft_module

    sft_module.common.finish_stage = timed_finish
    manifest = train_sft(
        work / "base", work / "data/ds" / SFT_DATA.format(data="raw"),
        str(work / "data/images"), work / "sft", work / "sft.json", work / ".work/sft",
        {"run": "bench", "recipe": sft_recipe, "max_steps": args.sft_steps, "limit": None},
        fingerprint_inputs=[work / "base.json"], callbacks=[timer],
    )
    record["sft"] = summarise(timer, 8, manifest, time.perf_counter() - t0, finish_times[0])
    record["sft"]["recipe_overrides"] = "global_batch_size 8, micro_batch_size 8"
    record["sft"]["mean_tokens_per_sample"] = manifest["log"]["last"].get("num_tokens", 0) / max(
        1, 8 * manifest["global_step"])
    print(json.dumps(record["sft"]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")  # kept if the GRPO part fails
    torch.cuda.empty_cache() if gpu else None

    # GRPO from the SFT output, the verl recipe at one-GPU scale.
    rl_recipe = load_recipe(REPO / "config/recipes/rl_verl.yaml")
    rl_recipe.update(group_size=8, prompts_per_step=2, micro_batch_size=16, max_new_tokens=128, rollout="hf",
                     save_steps=100000, logging_steps=1)
    rl_recipe.pop("eval_steps")
    if not gpu:
        rl_recipe.update(image_max_pixels=9216, image_min_pixels=9216, max_new_tokens=16)
    timer = step_timer()
    t0 = time.perf_counter()
    rl_module.common.finish_stage = timed_finish
    manifest = train_rl(
        work / "sft", work / "data/rl/train.parquet", None, work / "rl", work / "rl.json", work / ".work/rl",
        {"run": "bench", "recipe": rl_recipe, "max_steps": args.rl_steps, "limit": None},
        fingerprint_inputs=[work / "sft.json"], callbacks=[timer],
    )
    record["grpo"] = summarise(timer, 16, manifest, time.perf_counter() - t0, finish_times[1])
    record["grpo"]["recipe_overrides"] = ("2 prompts x 8 samples per step, micro batch 16, 128 new tokens, "
                                          "transformers generate rollouts")
    print(json.dumps(record["grpo"]), flush=True)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
