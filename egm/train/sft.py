"""Supervised fine-tuning with TRL's SFTTrainer: the paper's first training stage.

Samples are chat-formatted prompt-completion pairs (user: the image then the SFT prompt, with its
final period; assistant: reasoning, `</think>`, the JSON box), the loss is on the assistant span
only, the vision tower is frozen while the mergers and the LLM train, images are resized to the
recipe's pixel budget. bf16 on GPU; several GPUs run under torchrun with DeepSpeed ZeRO-3
(config/recipes/deepspeed_zero3.json); CPU and one GPU run in plain python.
"""

from __future__ import annotations

import logging
import os

from egm.train import common
from egm.train.recipes import sft_args, warn_unapplied

log = logging.getLogger(__name__)


def train_sft(
    model_dir: str | os.PathLike,
    data_path: str | os.PathLike,
    image_root: str,
    out_dir: str | os.PathLike,
    manifest_path: str | os.PathLike,
    work_dir: str | os.PathLike,
    options: dict,
    fingerprint_inputs: list[str] = (),
    callbacks: list | None = None,
) -> dict | None:
    """Train, write `out_dir` and then `manifest_path`; resume from `work_dir` if it holds
    checkpoints of the same options and inputs. Returns the manifest (None on ranks > 0).

    options: {"recipe": {...}, "max_steps": int|None, "limit": int|None (rows), "run": str}.
    """
    from trl import SFTConfig, SFTTrainer

    from egm.train.cost import TrainingCost
    from egm.train.data import sft_dataset

    stage = common.Stage("sft", model_dir, work_dir, options, [*fingerprint_inputs, data_path])
    recipe = stage.recipe
    kwargs = sft_args(recipe, world_size=stage.world_size, on_gpu=stage.gpu, max_steps=options.get("max_steps"))
    warn_unapplied(recipe, "sft")
    # The config first: with DeepSpeed ZeRO-3 it must exist before the model is built.
    args = SFTConfig(
        output_dir=str(stage.checkpoints),
        **common.TRAINER_DEFAULTS,
        # The vision collator reads images and messages; it needs the raw columns.
        remove_unused_columns=False,
        **kwargs,
    )
    processor, model, frozen = stage.load_model(args, freeze_by_default=True)

    dataset, data_summary = sft_dataset(data_path, image_root, limit=options.get("limit"))
    log.info("SFT data: %s", data_summary)

    cost = TrainingCost()
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=processor,
        callbacks=[cost, *(callbacks or [])],
    )
    return stage.train_and_finish(trainer, cost, out_dir, manifest_path, trl_args=dict(kwargs), data=data_summary,
                                  frozen=frozen)
