"""GRPO reinforcement learning with TRL's GRPOTrainer and the authors' IoU reward.

Prompts are the RL parquet's (the eval prompt, no final period, image first); each is sampled
`group_size` times and every completion scored by `egm.train.rewards.grounding_reward` ("mix"
on train rows, accuracy on the val rows, which are split "test"). Rollouts use vLLM colocated
with training where vLLM is importable on a GPU, `model.generate` otherwise, or (`rollout:
vllm-server`) a vLLM server on some of the job's GPUs (egm.train.rollout_server). Checkpoints every
`save_steps`; a killed job resumes from the last one (see egm.train.common).

The recipes of the authors' two code bases (AReaL, verl) live in config/recipes/; how each key
maps onto GRPOConfig, and what cannot, is in docs/training.md.
"""

from __future__ import annotations

import importlib.util
import logging
import os

from egm.models.inputs import IMAGE_TOKEN
from egm.train import common
from egm.train.recipes import rl_args, warn_unapplied
from egm.train.rollout_server import SERVER_URL_ENV

log = logging.getLogger(__name__)


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None and common.on_gpu()


def rollout_path(trainer) -> str:
    """What the trainer samples rollouts with, read from the trainer itself rather than from what
    was asked of it: "vllm-colocate", "vllm-server" or "transformers-generate"."""
    if getattr(trainer, "use_vllm", False):
        return f"vllm-{trainer.args.vllm_mode}"
    return "transformers-generate"


def collapse_image_placeholders(ids: list[int], pad_id: int) -> list[int]:
    """A prompt's ids with each run of image placeholders cut to one: the form vLLM expands itself.

    TRL hands vLLM the trainer processor's ids, whose placeholders are already expanded to the
    image's token count, beside the image; vLLM 0.25.1 expands the first placeholder of such a
    prompt again and reads the rest as text (benchmarks/results/vllm-placeholders-h100.json: 300
    sent, 599 in vLLM's prompt for a 640x480 image with Qwen3-VL-8B's processor), so every rollout
    would be sampled from another prompt than the one the policy is trained on."""
    out: list[int] = []
    for token in ids:
        if token == pad_id and out and out[-1] == pad_id:
            continue
        out.append(token)
    return out


def send_vllm_unexpanded_prompts(trainer, pad_id: int) -> bool:
    """Route the trainer's vLLM prompts through collapse_image_placeholders (colocate and server
    mode share TRL's VLLMGeneration.generate). False where the trainer has no vLLM."""
    generation = getattr(trainer, "vllm_generation", None)
    if generation is None:
        return False
    original = generation.generate

    def generate(prompts, images, *args, **kwargs):
        if images is not None:
            prompts = [collapse_image_placeholders(list(ids), pad_id) for ids in prompts]
        return original(prompts, images, *args, **kwargs)

    generation.generate = generate
    return True


def forget_image_embeddings_on_sync(trainer) -> str | None:
    """After each of TRL's weight syncs, drop vLLM's cached vision-encoder outputs too.

    vLLM keeps an image's encoder output, keyed by the image's content, for later requests with
    the same image (its `EncoderCacheManager`); TRL 1.16's sync resets the KV prefix cache but not
    that one, so an image sampled again after a sync (RefCOCO has several expressions per image,
    and epochs repeat them all) is read through the vision weights of an earlier step: rollouts
    partly from a stale policy. vLLM 0.25.1 has `reset_encoder_cache` for exactly this; colocate
    mode calls it on the engine, server mode on the server's dev endpoint (TRL's `vllm-serve`
    runs vLLM with it). Returns what the manifest records; None where the trainer has no vLLM."""
    generation = getattr(trainer, "vllm_generation", None)
    if generation is None:
        return None
    original = generation.sync_weights

    def reset_encoder_cache() -> None:
        if generation.mode == "colocate":
            generation.llm.llm_engine.reset_encoder_cache()
        elif generation.accelerator.is_main_process:
            client = generation.vllm_client
            response = client.session.post(f"{client.base_url}/reset_encoder_cache")
            if response.status_code != 200:
                raise RuntimeError(f"the rollout server refused /reset_encoder_cache: {response.status_code} "
                                   f"{response.text[:200]}")

    def sync_weights(*args, **kwargs):
        result = original(*args, **kwargs)
        reset_encoder_cache()
        return result

    generation.sync_weights = sync_weights
    return "vLLM's cached image encodings dropped after each weight sync (reset_encoder_cache)"


def train_rl(
    model_dir: str | os.PathLike,
    train_path: str | os.PathLike,
    val_path: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    manifest_path: str | os.PathLike,
    work_dir: str | os.PathLike,
    options: dict,
    fingerprint_inputs: list[str] = (),
    callbacks: list | None = None,
    reward_funcs: list | None = None,
) -> dict | None:
    """Train, write `out_dir` and then `manifest_path`; resume from `work_dir` when it holds
    checkpoints of the same options and inputs. Returns the manifest (None on ranks > 0).

    options: {"recipe": {...}, "max_steps": int|None, "limit": int|None (prompts), "run": str}.
    `reward_funcs` replaces the grounding reward (tests only: the pipeline always uses it).
    """
    from trl import GRPOConfig, GRPOTrainer

    from egm.train.cost import TrainingCost
    from egm.train.data import rl_dataset
    from egm.train.rewards import trl_grounding_reward

    inputs = [*fingerprint_inputs, train_path, *([val_path] if val_path else [])]
    stage = common.Stage("rl", model_dir, work_dir, options, inputs)
    recipe = stage.recipe
    kwargs = rl_args(recipe, world_size=stage.world_size, on_gpu=stage.gpu, max_steps=options.get("max_steps"),
                     vllm_available=vllm_available(), server_url=os.environ.get(SERVER_URL_ENV))
    if not val_path:
        kwargs.pop("eval_strategy", None)
        kwargs.pop("eval_steps", None)
    not_applied = warn_unapplied(recipe, "rl")
    args = GRPOConfig(output_dir=str(stage.checkpoints), **common.TRAINER_DEFAULTS, **kwargs)
    processor, model, frozen = stage.load_model(args, freeze_by_default=False)

    train, train_summary = rl_dataset(train_path, limit=options.get("limit"))
    val, val_summary = (None, None)
    if val_path and args.eval_strategy != "no":
        val, val_summary = rl_dataset(val_path, limit=options.get("limit"))
    log.info("RL data: %s %s", train_summary, val_summary)

    cost = TrainingCost()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_funcs or [trl_grounding_reward],
        args=args,
        train_dataset=train,
        eval_dataset=val,
        processing_class=processor,
        callbacks=[cost, *(callbacks or [])],
    )
    rollout = rollout_path(trainer)
    extra = {}
    if send_vllm_unexpanded_prompts(trainer, processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)):
        extra["vllm_prompts"] = "one placeholder per image, expanded by vLLM (collapse_image_placeholders)"
    encoder_cache = forget_image_embeddings_on_sync(trainer)
    if encoder_cache:
        extra["vllm_encoder_cache"] = encoder_cache
    log.info("rollouts: %s %s", rollout, extra)
    return stage.train_and_finish(trainer, cost, out_dir, manifest_path, trl_args=kwargs, not_applied=not_applied,
                                  rollout=rollout, data={"train": train_summary, "val": val_summary}, frozen=frozen,
                                  **extra)
