"""Training recipes (config/recipes/*.yaml) -> TRL `SFTConfig` / `GRPOConfig` arguments.

A recipe is written in the paper's terms (global batch, prompts per step, group size, clip
epsilon, KL coefficient, ...). Every key is either mapped to a TRL argument here, used by our
own code (image pixel budget, vision-tower freezing, rollout engine), or *recorded only*: a
setting of the authors' run that TRL has no counterpart for (AReaL's asynchrony, its rollout/
trainer GPU split). Recorded-only keys are logged as "not applied" when a run starts, so the
recipe stays a complete record of the paper's run without pretending to reproduce it. An
unknown key is an error.

docs/training.md has the table of what maps exactly, approximately, or not at all.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RECIPE_DIR = Path("config/recipes")
DEEPSPEED_CONFIGS = {"zero3": "deepspeed_zero3.json"}

# recipe key -> TRL argument, for keys that carry over one to one.
COMMON_DIRECT = {
    "learning_rate": "learning_rate",
    "lr_scheduler": "lr_scheduler_type",
    "weight_decay": "weight_decay",
    "max_grad_norm": "max_grad_norm",
    "epochs": "num_train_epochs",
    "optimizer": "optim",
    "gradient_checkpointing": "gradient_checkpointing",
    "save_steps": "save_steps",
    "save_total_limit": "save_total_limit",
    "logging_steps": "logging_steps",
    "seed": "seed",
    "dataloader_num_workers": "dataloader_num_workers",
}
SFT_DIRECT = {**COMMON_DIRECT, "max_length": "max_length"}
RL_DIRECT = {
    **COMMON_DIRECT,
    "group_size": "num_generations",
    "max_new_tokens": "max_completion_length",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "clip_eps": "epsilon",
    "clip_eps_high": "epsilon_high",
    "kl_beta": "beta",
    "ppo_epochs": "num_iterations",
    "entropy_coef": "entropy_coef",
    "importance_sampling_level": "importance_sampling_level",
    "reward_normalization": "scale_rewards",
    "rollout_is_correction": "vllm_importance_sampling_correction",
    "rollout_is_mode": "vllm_importance_sampling_mode",
    "rollout_is_cap": "vllm_importance_sampling_clip_max",
    "vllm_gpu_memory_utilization": "vllm_gpu_memory_utilization",
    "vllm_max_model_length": "vllm_max_model_length",
}
# Keys our code handles itself (documented beside each recipe's values).
COMMON_DERIVED = {"stage", "source", "warmup_ratio", "warmup_steps", "micro_batch_size", "bf16", "deepspeed"}
SFT_DERIVED = COMMON_DERIVED | {"global_batch_size", "image_min_pixels", "image_max_pixels", "freeze_vision_tower"}
RL_DERIVED = COMMON_DERIVED | {
    "prompts_per_step", "loss_aggregation", "rollout", "eval_steps", "image_min_pixels", "image_max_pixels",
    "freeze_vision_tower",
}
# Settings of the authors' runs with no TRL counterpart: kept in the recipe, logged, not applied.
RL_RECORDED_ONLY = {
    "max_head_offpolicyness",  # AReaL's asynchronous rollout: up to N policy versions stale
    "batch_advantage_normalization",  # AReaL re-normalises advantages over the batch after the group step
    "rollout_gpus",  # AReaL: 2 GPUs serve SGLang rollouts, the rest train (TRL colocates)
    "decoupled_loss",  # AReaL's proximal-policy loss; rollout_is_* is TRL's closest mechanism
}
SFT_RECORDED_ONLY: set[str] = set()

# verl's names for the loss aggregation -> TRL's loss_type.
LOSS_AGGREGATION = {
    "token-mean": "dapo",  # sum over every token of the (accumulated) batch / number of tokens
    "seq-mean-token-mean": "grpo",  # mean per sequence, then over sequences
    "seq-mean-token-sum-norm": "dr_grpo",  # token sums / a constant (max length)
}
# vllm-server: TRL's server mode on `rollout_gpus` of the job's GPUs (egm.train.rollout_server).
ROLLOUTS = ("auto", "vllm", "hf", "vllm-server")
# Room for the prompt (text and image tokens) in vLLM's context when a recipe sets no
# vllm_max_model_length: without a limit vLLM takes the model's (262144 for Qwen3-VL) and refuses
# to start unless its KV cache holds one sequence that long. A COCO image at the released
# preprocessing is ~300-400 tokens.
VLLM_PROMPT_TOKENS = 2048
# How long the trainer waits for the rollout server (`rollout: vllm-server`) to answer: an 8B loads
# and captures its graphs in a few minutes; TRL's default is 240 s.
ROLLOUT_SERVER_WAIT_S = 900


class RecipeError(ValueError):
    pass


def load_recipe(path: str | Path) -> dict:
    import yaml

    with open(path, encoding="utf-8") as handle:
        recipe = yaml.safe_load(handle) or {}
    if not isinstance(recipe, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of keys to values")
    return recipe


def resolve_recipe(path: str | Path, overrides: dict, base: str | Path) -> dict:
    """A recipe as a training job receives it: the file's content (a relative path read from
    `base`, the workflow's folder) with the config's overrides on top."""
    path = Path(path)
    return {**load_recipe(path if path.is_absolute() else Path(base) / path), **overrides}


def check_keys(recipe: dict, stage: str) -> None:
    known = known_keys(stage)
    unknown = sorted(set(recipe) - known)
    if unknown:
        raise RecipeError(f"unknown {stage} recipe keys {unknown}; known: {sorted(known)}")
    if recipe.get("stage", stage) != stage:
        raise RecipeError(f"recipe is for stage {recipe.get('stage')!r}, used as {stage!r}")


def known_keys(stage: str) -> set[str]:
    if stage == "sft":
        return set(SFT_DIRECT) | SFT_DERIVED | SFT_RECORDED_ONLY
    if stage == "rl":
        return set(RL_DIRECT) | RL_DERIVED | RL_RECORDED_ONLY
    raise RecipeError(f"unknown stage {stage!r}")


def recorded_only(recipe: dict, stage: str) -> dict:
    keys = RL_RECORDED_ONLY if stage == "rl" else SFT_RECORDED_ONLY
    if stage == "rl" and recipe.get("rollout") == "vllm-server":
        keys = keys - {"rollout_gpus"}  # the server's share of the GPUs (egm.train.rollout_server)
    return {k: recipe[k] for k in sorted(keys) if k in recipe}


def batch_split(total: int, micro: int, world_size: int, what: str) -> int:
    """Gradient accumulation steps so that micro x world_size x accumulation == total."""
    if total <= 0 or micro <= 0:
        raise RecipeError(f"{what}: batch sizes must be positive (total {total}, micro {micro})")
    per_step = micro * world_size
    if total % per_step:
        divisors = [m for m in range(1, total // world_size + 1) if total % (m * world_size) == 0]
        raise RecipeError(
            f"{what}: {total} is not a multiple of micro_batch_size {micro} x {world_size} processes; "
            f"micro batch sizes that fit: {divisors[-8:]}"
        )
    return total // per_step


def _warmup(recipe: dict) -> float:
    if "warmup_ratio" in recipe and "warmup_steps" in recipe:
        raise RecipeError("give warmup_ratio or warmup_steps, not both")
    if "warmup_ratio" in recipe:
        ratio = float(recipe["warmup_ratio"])
        if not 0 <= ratio < 1:
            raise RecipeError(f"warmup_ratio must be in [0, 1), got {ratio}")
        # transformers 5 reads warmup_steps < 1 as a fraction of the training steps.
        return ratio
    steps = recipe.get("warmup_steps", 0)
    if steps != int(steps) or (0 < steps < 1):
        raise RecipeError(f"warmup_steps must be a whole number, got {steps}")
    return int(steps)


def _common(recipe: dict, direct: dict, world_size: int, on_gpu: bool, max_steps: int | None) -> dict:
    args: dict[str, Any] = {direct[k]: v for k, v in recipe.items() if k in direct}
    args["warmup_steps"] = _warmup(recipe)
    args["max_steps"] = int(max_steps) if max_steps else -1
    args["bf16"] = bool(recipe.get("bf16", False)) and on_gpu
    args["use_cpu"] = not on_gpu
    if world_size > 1 and recipe.get("deepspeed"):
        name = recipe["deepspeed"]
        if name not in DEEPSPEED_CONFIGS:
            raise RecipeError(f"unknown deepspeed config {name!r}; known: {sorted(DEEPSPEED_CONFIGS)}")
        args["deepspeed"] = str(recipe_dir() / DEEPSPEED_CONFIGS[name])
    # TRL turns activation checkpointing on by default; here only a recipe does (it costs a
    # second forward pass, pointless for a model that fits without it).
    args["gradient_checkpointing"] = bool(recipe.get("gradient_checkpointing", False))
    if args["gradient_checkpointing"]:
        args["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    return args


def recipe_dir() -> Path:
    """config/recipes of this checkout (the package is installed editable, like every rule runs it)."""
    here = Path(__file__).resolve().parents[2] / RECIPE_DIR
    return here if here.is_dir() else Path.cwd() / RECIPE_DIR


def sft_args(recipe: dict, world_size: int = 1, on_gpu: bool = False, max_steps: int | None = None) -> dict:
    """SFTConfig keyword arguments of an SFT recipe (output/logging paths are added by the caller)."""
    check_keys(recipe, "sft")
    args = _common(recipe, SFT_DIRECT, world_size, on_gpu, max_steps)
    micro = int(recipe.get("micro_batch_size", 1))
    args["per_device_train_batch_size"] = micro
    args["gradient_accumulation_steps"] = batch_split(int(recipe["global_batch_size"]), micro, world_size,
                                                      "global_batch_size")
    # Loss on the assistant turn only: the data is prompt-completion, the prompt masked out.
    args["completion_only_loss"] = True
    return args


def rl_args(recipe: dict, world_size: int = 1, on_gpu: bool = False, max_steps: int | None = None,
            vllm_available: bool = False, server_url: str | None = None) -> dict:
    """GRPOConfig keyword arguments of an RL recipe (`server_url`: the rollout server `egm rl` started
    for `rollout: vllm-server`)."""
    check_keys(recipe, "rl")
    args = _common(recipe, RL_DIRECT, world_size, on_gpu, max_steps)
    group = int(recipe["group_size"])
    completions = int(recipe["prompts_per_step"]) * group
    micro = int(recipe.get("micro_batch_size", group))
    args["per_device_train_batch_size"] = micro
    # One optimizer step per rollout batch ("one PPO minibatch"): the rollout batch is the
    # accumulated batch, generated once (steps_per_generation = accumulation steps).
    args["gradient_accumulation_steps"] = batch_split(completions, micro, world_size, "prompts_per_step x group_size")
    args["steps_per_generation"] = args["gradient_accumulation_steps"]
    aggregation = recipe.get("loss_aggregation", "token-mean")
    if aggregation not in LOSS_AGGREGATION:
        raise RecipeError(f"unknown loss_aggregation {aggregation!r}; known: {sorted(LOSS_AGGREGATION)}")
    args["loss_type"] = LOSS_AGGREGATION[aggregation]
    rollout = recipe.get("rollout", "auto")
    if rollout not in ROLLOUTS:
        raise RecipeError(f"unknown rollout {rollout!r}; known: {ROLLOUTS}")
    if rollout in ("vllm", "vllm-server") and not vllm_available:
        raise RecipeError("recipe asks for vLLM rollouts, but vLLM is not importable here (or there is no GPU)")
    if rollout == "vllm-server" and not server_url:
        raise RecipeError("rollout: vllm-server needs the server `python -m egm rl` starts on the recipe's "
                          "rollout_gpus; run the stage through that command")
    args["use_vllm"] = rollout in ("vllm", "vllm-server") or (rollout == "auto" and vllm_available)
    if rollout == "vllm-server":
        args["vllm_mode"] = "server"
        args["vllm_server_base_url"] = server_url
        args["vllm_server_timeout"] = float(ROLLOUT_SERVER_WAIT_S)
        # Colocate-only settings: the server took its own from its command line.
        args.pop("vllm_gpu_memory_utilization", None)
        args.pop("vllm_max_model_length", None)
    elif args["use_vllm"]:
        args["vllm_mode"] = "colocate"
        args.setdefault("vllm_max_model_length", VLLM_PROMPT_TOKENS + int(recipe["max_new_tokens"]))
    if args["use_vllm"]:
        budget = sorted({"image_min_pixels", "image_max_pixels"} & set(recipe))
        if budget:
            # TRL hands vLLM the raw images, which vLLM resizes with the model directory's own
            # preprocessor_config.json: the trainer's prompts would hold another number of image tokens.
            raise RecipeError(
                f"{budget} would resize the trainer's images but not vLLM's (it reads the model directory's "
                "preprocessor_config.json): drop them from the RL recipe, or use rollout: hf")
    else:
        args.pop("vllm_max_model_length", None)
        # The importance-sampling correction compares vLLM's log-probs with the trainer's.
        args["vllm_importance_sampling_correction"] = False
    if recipe.get("eval_steps"):
        args["eval_strategy"] = "steps"
        args["eval_steps"] = int(recipe["eval_steps"])
        args["per_device_eval_batch_size"] = group  # whole groups on every process
    return args


def warn_unapplied(recipe: dict, stage: str) -> dict:
    """Log each recipe key that has no TRL counterpart (recorded, not applied); returns them."""
    unapplied = recorded_only(recipe, stage)
    for key, value in unapplied.items():
        log.warning("recipe key %s=%r has no TRL counterpart: not applied", key, value)
    return unapplied
