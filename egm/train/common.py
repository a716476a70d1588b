"""What the SFT and RL stages share: the work directory and resume, the process layout, model
loading and freezing, and writing the finished model directory and its manifest.

Layout of one stage (e.g. results/checkpoints/{run}/sft):

    results/checkpoints/{run}/.work/sft/fingerprint.json   what these checkpoints were made from
    results/checkpoints/{run}/.work/sft/checkpoints/checkpoint-N/   Trainer checkpoints (resume)
    results/checkpoints/{run}/sft/                          the finished model (atomic)
    results/checkpoints/{run}/sft.json                      its manifest, written last

A killed job leaves its checkpoints in `.work`; the rerun resumes from the last one, but only
if the fingerprint (options and input manifests) is the same: checkpoints of other settings are
discarded rather than continued. A finished stage removes its `.work` directory.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
FINGERPRINT = "fingerprint.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# Only these come from training; every other file (tokenizer, processor, chat template,
# generation defaults) is the start model's, so the trained model is served like it.
TRAINED_FILES = ("config.json",)


# ---------------------------------------------------------------- processes


def world() -> tuple[int, int]:
    """(world size, global rank) from the launcher's environment; (1, 0) in plain python."""
    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def launch_command(gpus: int, argv: list[str]) -> list[str] | None:
    """The torchrun command that runs `python -m egm <argv>` once per GPU, or None to run here.

    One process is enough on CPU and on one GPU; under a launcher (LOCAL_RANK set) we are
    already one of its processes.
    """
    if gpus <= 1 or "LOCAL_RANK" in os.environ:
        return None
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={int(gpus)}",
        "-m", "egm", *argv,
    ]


def relaunch(gpus: int, argv: list[str]) -> bool:
    """Run the command under torchrun when it needs several processes; True if it did."""
    import subprocess

    command = launch_command(gpus, argv)
    if command is None:
        return False
    log.info("launching %d processes: %s", gpus, " ".join(command))
    result = subprocess.run(command)
    if result.returncode:
        raise SystemExit(f"torchrun exited with {result.returncode}")
    return True


# ---------------------------------------------------------------- work directory


def fingerprint(options: dict, inputs: list[str | os.PathLike]) -> dict:
    """What a set of checkpoints depends on: the options and each input file's hash."""
    from egm.io import sha256_file, sha256_json

    return {
        "options_sha256": sha256_json(options),
        "inputs": {str(p): sha256_file(p) for p in inputs},
    }


def prepare_work_dir(work_dir: Path, print_: dict, rank: int = 0) -> Path:
    """The checkpoint directory for this fingerprint; stale checkpoints are removed first."""
    from egm.io import read_json, write_json

    work_dir = Path(work_dir)
    marker = work_dir / FINGERPRINT
    if rank == 0:
        if marker.exists() and read_json(marker) != print_:
            log.warning("%s holds checkpoints of other settings or inputs: starting over", work_dir)
            shutil.rmtree(work_dir)
        if not marker.exists():
            if work_dir.exists():
                shutil.rmtree(work_dir)  # no fingerprint: nothing there can be trusted
            work_dir.mkdir(parents=True)
            write_json(marker, print_)
    barrier()
    return work_dir / CHECKPOINTS


# Settings every stage's TRL config shares: step checkpoints, plain logs, no experiment trackers.
TRAINER_DEFAULTS = {"save_strategy": "steps", "report_to": "none", "disable_tqdm": True, "logging_first_step": True}


def load_for_training(config, work_dir: Path, fingerprint, rank: int, model_dir, recipe: dict, freeze_by_default: bool):
    """Work dir, processor and model once the TRL config exists (with DeepSpeed ZeRO-3 it must come
    first); returns (processor, model, frozen vision parameters)."""
    from egm.train.processing import load_processor

    _ = config.world_size  # sets up the process group (several GPUs), so the work-dir barrier holds
    prepare_work_dir(Path(work_dir), fingerprint, rank)
    processor = load_processor(model_dir, recipe.get("image_min_pixels"), recipe.get("image_max_pixels"))
    model = load_model(model_dir)
    if getattr(config, "deepspeed", None):
        keep_checkpoint_names(model)
    frozen = freeze_vision_tower(model) if recipe.get("freeze_vision_tower", freeze_by_default) else {}
    if frozen:
        log.info("vision tower frozen: %s", frozen)
    return processor, model, frozen


def train_resuming(trainer, checkpoints: Path):
    """Train, continuing from the newest complete checkpoint a killed run left; (result, resumed from)."""
    resume = last_checkpoint(checkpoints)
    if resume:
        log.info("resuming from %s", resume)
    result = trainer.train(resume_from_checkpoint=resume)
    log.info("trained: %s", result.metrics)
    return result, resume


def last_checkpoint(checkpoints: Path) -> str | None:
    """The newest complete Trainer checkpoint, or None.

    A checkpoint directory is complete once its trainer_state.json exists (the Trainer writes
    it after the weights and optimizer); a half-written one from a kill is skipped.
    """
    if not Path(checkpoints).is_dir():
        return None
    found = []
    for entry in Path(checkpoints).iterdir():
        if entry.name.startswith("checkpoint-") and entry.name[11:].isdigit() and (entry / "trainer_state.json").exists():
            found.append((int(entry.name[11:]), entry))
    return str(max(found)[1]) if found else None


def barrier() -> None:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------- model


def load_model(model_dir: str | os.PathLike):
    """The start model in fp32: master weights stay fp32 and `bf16=True` computes under bf16
    autocast (TRL's default; DeepSpeed's bf16 mode keeps fp32 masters too). Pure-bf16 weights
    would round away most updates at the paper's learning rates (1e-5 x a ~1e-2 weight is below
    bf16's precision)."""
    import torch
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32)


def keep_checkpoint_names(model) -> None:
    """Make the trained model save its weights under the start checkpoint's names.

    Loading under DeepSpeed ZeRO-3, transformers (5.17-5.24) keeps every key renaming it knows for
    the model, legacy ones included, where its plain loader keeps only those that matched the
    checkpoint; saving reverses them all and writes Qwen3-VL's text weights as
    `model.language_model.model.*`, which transformers reads back but vLLM cannot load. Without
    the recorded list, saving falls back to the model's own conversions, legacy ones left out.
    """
    if getattr(model, "_weight_conversions", None):
        model._weight_conversions = None


VISION_TOWER = ("visual.patch_embed.", "visual.pos_embed.", "visual.blocks.")


def freeze_vision_tower(model) -> dict:
    """Freeze the ViT (patch embedding, position embedding, blocks); the mergers and the LLM train.

    The paper's SFT: "vision encoder frozen, merger and LLM trained". Qwen3-VL's deepstack
    mergers project ViT features into the LLM like the main merger, so they count as merger.
    """
    frozen = trained = tensors = 0
    for name, param in model.named_parameters():
        if any(f"{part}" in name for part in VISION_TOWER):
            param.requires_grad_(False)
            frozen += full_numel(param)
            tensors += 1
        elif param.requires_grad:
            trained += full_numel(param)
    if tensors == 0:
        raise ValueError("no vision-tower parameters found to freeze (not a Qwen3-VL model?)")
    return {"frozen_params": frozen, "trained_params": trained}


def full_numel(param) -> int:
    """A parameter's size, also when DeepSpeed ZeRO-3 has partitioned it (its local tensor is then
    empty and the full size is `ds_numel`)."""
    return int(getattr(param, "ds_numel", param.numel()))


# ---------------------------------------------------------------- output


def _is_weight(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json")


def write_model_dir(saved: Path, start_dir: Path, out_dir: Path, extra: dict[str, Any]) -> list[dict]:
    """Assemble the finished model directory atomically: the start model's non-weight files, then
    the trained weights and config from `saved`, plus `training.json`. Returns its file list."""
    from egm.io import atomic_dir, sha256_file, write_json

    with atomic_dir(out_dir) as tmp:
        for entry in sorted(Path(start_dir).iterdir()):
            if entry.is_file() and not _is_weight(entry.name) and entry.name not in TRAINED_FILES:
                shutil.copy2(entry, tmp / entry.name)
        for entry in sorted(Path(saved).iterdir()):
            if entry.is_file() and (_is_weight(entry.name) or entry.name in TRAINED_FILES):
                shutil.copy2(entry, tmp / entry.name)
        if not any(_is_weight(p.name) for p in tmp.iterdir()):
            raise RuntimeError(f"{saved}: the trainer saved no weights")
        check_weight_names(Path(start_dir), tmp)
        write_json(tmp / "training.json", extra)
        files = [
            {"path": p.name, "size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(tmp.iterdir()) if p.is_file()
        ]
    return files


def weight_names(model_dir: Path) -> set[str] | None:
    """The tensor names of a directory's safetensors files (headers only), None without any."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    names: set[str] = set()
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            names.update(handle.keys())
    return names


def check_weight_names(start_dir: Path, trained_dir: Path) -> None:
    """The trained model is served like the start model, so its weights must carry the start's names.

    A name the start model does not have is an error (engines would not know where it goes); one
    the trained model lacks only a warning: a checkpoint may hold a tied weight that saving drops.
    """
    start, trained = weight_names(start_dir), weight_names(trained_dir)
    if start is None or trained is None:
        return
    if trained - start:
        raise RuntimeError(
            f"{trained_dir}: the trained weights are not named like the start model's ({start_dir}): "
            f"{sorted(trained - start)[:3]} ({len(trained - start)} in all) are not in the start model"
        )
    if start - trained:
        log.warning("%s: %d weights of the start model not saved (tied?): %s", trained_dir, len(start - trained),
                    sorted(start - trained)[:3])


def write_manifest(path: str | os.PathLike, content: dict) -> None:
    from egm.io import write_json

    write_json(path, content)


def log_history_summary(history: list[dict]) -> dict:
    """First and last logged values of each metric, and the number of log entries."""
    first: dict[str, Any] = {}
    last: dict[str, Any] = {}
    for entry in history:
        for key, value in entry.items():
            if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                first.setdefault(key, value)
                last[key] = value
    return {"entries": len(history), "first": first, "last": last}


class Timer:
    def __init__(self):
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return round(time.perf_counter() - self.start, 3)


class Stage:
    """What both training stages (sft, rl) do around their trainer: the process's place in the
    distributed world, the fingerprint a resume checks, the checkpoints folder and the wall clock;
    then training (resuming) and the model directory and manifest with the stage's record."""

    def __init__(self, name: str, model_dir: str | os.PathLike, work_dir: str | os.PathLike, options: dict,
                 inputs: list[str]):
        self.name, self.model_dir, self.work_dir, self.options = name, model_dir, Path(work_dir), options
        self.recipe = options["recipe"]
        self.world_size, self.rank = world()
        self.gpu = on_gpu()
        self.timer = Timer()
        self.fingerprint = fingerprint(options, inputs)
        self.checkpoints = self.work_dir / CHECKPOINTS

    def load_model(self, args, freeze_by_default: bool):
        """(processor, model, frozen parameter groups) for the trainer `args` (load_for_training)."""
        return load_for_training(args, self.work_dir, self.fingerprint, self.rank, self.model_dir, self.recipe,
                                 freeze_by_default=freeze_by_default)

    def train_and_finish(self, trainer, cost, out_dir: str | os.PathLike, manifest_path: str | os.PathLike,
                         **record) -> dict | None:
        """Train (from the last checkpoint of the same fingerprint, if any), then write the model
        directory and the manifest; `record` is the stage's own part of the record (trl_args, data,
        frozen, ...), beside what every stage records."""
        result, resume = train_resuming(trainer, self.checkpoints)
        meta = {
            "stage": self.name,
            "run": self.options.get("run"),
            "start": str(self.model_dir),
            "options": self.options,
            "world_size": self.world_size,
            "device": "cuda" if self.gpu else "cpu",
            **record,
            "resumed_from": resume,
            "train_metrics": result.metrics,
            "cost": cost.summary(),
            "wall_s": self.timer.seconds(),
            "fingerprint": self.fingerprint,
        }
        return finish_stage(trainer, self.work_dir, self.model_dir, out_dir, manifest_path, meta)


def finish_stage(trainer, work_dir: Path, start_dir: str | os.PathLike, out_dir: str | os.PathLike,
                 manifest_path: str | os.PathLike, meta: dict) -> dict | None:
    """Save the trained model (all processes: ZeRO-3 gathers the weights), then on rank 0 write
    the model directory and, last, the manifest that downstream rules depend on."""
    saved = Path(work_dir) / "final"
    if trainer.args.bf16 and not trainer.is_deepspeed_enabled:
        # The finished model in bf16, like the released checkpoints (ZeRO-3 gathers 16-bit
        # weights itself); the fp32 masters were only for the optimizer.
        import torch

        trainer.model.to(torch.bfloat16)
    trainer.save_model(str(saved))
    _, rank = world()
    manifest = None
    if rank == 0:
        state = trainer.state
        training = {
            **meta,
            "global_step": state.global_step,
            "log_history": state.log_history,
        }
        files = write_model_dir(saved, Path(start_dir), Path(out_dir), training)
        from egm.provenance import job_record

        manifest = {
            **{k: v for k, v in meta.items() if k != "options"},
            # Config keys stay out: `options` is in the model directory's training.json.
            "provenance": job_record("trl"),
            "dest": str(out_dir),
            "global_step": state.global_step,
            "log": log_history_summary(state.log_history),
            "files": files,
        }
        write_manifest(manifest_path, manifest)
        # The finished model is the product; optimizer-laden checkpoints are only for resuming a
        # killed job (an 8B ZeRO-3 checkpoint is ~100 GB), so they go once the manifest exists.
        shutil.rmtree(work_dir, ignore_errors=True)
    barrier()
    return manifest
