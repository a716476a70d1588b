"""`python -m egm sft` and `python -m egm rl`: the training stages' commands (see egm.cli).

With `--gpus N` > 1 the command re-runs itself under torchrun, one process per GPU (DeepSpeed
ZeRO-3 from the recipe); on CPU or one GPU it trains in this process.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from egm.options import TrainOptions, json_arg, parse_options

log = logging.getLogger("egm")


def _argv_after_command() -> list[str]:
    """This process's own arguments (from the subcommand on), for the torchrun relaunch."""
    argv = sys.argv[1:]
    for name in ("sft", "rl"):
        if name in argv:
            return argv[argv.index(name):]
    raise RuntimeError(f"cannot find the training command in {argv}")


def _relaunched(args: argparse.Namespace, stage: str) -> bool:
    """Check the options and that the job sees its GPUs; with several GPUs, re-run under torchrun
    and say so (this process is done)."""
    from egm.runtime import require_gpus
    from egm.train.common import relaunch

    parse_options(TrainOptions, args.options)
    require_gpus(args.gpus, what=f"{stage} {args.out_dir}")
    return relaunch(args.gpus, _argv_after_command())


def cmd_sft(args: argparse.Namespace) -> None:
    if _relaunched(args, "sft"):
        return
    from egm.train.sft import train_sft

    manifest = train_sft(
        args.model_dir, args.data, args.image_root, args.out_dir, args.manifest, args.work_dir, args.options,
        fingerprint_inputs=[args.model_manifest, *args.inputs],
    )
    if manifest:
        log.info("SFT done: %d steps, last log %s", manifest["global_step"], manifest["log"]["last"])


def cmd_rl(args: argparse.Namespace) -> None:
    from egm.train.rollout_server import SERVER_URL_ENV

    recipe = args.options.get("recipe") or {}
    if recipe.get("rollout") == "vllm-server":
        if SERVER_URL_ENV not in os.environ:
            _rl_beside_rollout_server(args, recipe)
            return
        # Here and in each torchrun process: the job's GPUs less the server's.
        args.gpus -= int(recipe.get("rollout_gpus", 1))
    if _relaunched(args, "rl"):
        return
    from egm.train.rl import train_rl

    manifest = train_rl(
        args.model_dir, args.train, args.val, args.out_dir, args.manifest, args.work_dir, args.options,
        fingerprint_inputs=[args.model_manifest],
    )
    if manifest:
        log.info("RL done: %d steps, last log %s", manifest["global_step"], manifest["log"]["last"])


def _rl_beside_rollout_server(args: argparse.Namespace, recipe: dict) -> None:
    """`rollout: vllm-server`: the server on the recipe's rollout_gpus for as long as training runs,
    which sees only the other GPUs (egm.train.rollout_server)."""
    from egm.runtime import require_gpus, temporary_environment
    from egm.train.rollout_server import SERVER_URL_ENV, rollout_server

    parse_options(TrainOptions, args.options)
    require_gpus(args.gpus, what=f"rl {args.out_dir}")
    server, training = rollout_server(args.model_dir, args.work_dir, args.gpus, recipe)
    # The server took the last GPUs, so a trainer in this process (whose CUDA may already have
    # counted every GPU) still lands on its own: device 0 is training[0].
    with server, temporary_environment({SERVER_URL_ENV: server.url, "CUDA_VISIBLE_DEVICES": ",".join(training)}):
        server.check()
        cmd_rl(args)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", required=True, help="the start model's directory")
    p.add_argument("--model-manifest", required=True, help="its manifest (part of the resume fingerprint)")
    p.add_argument("--out-dir", required=True, help="the trained model's directory (written atomically)")
    p.add_argument("--manifest", required=True, help="JSON written last, the rule's output downstream rules use")
    p.add_argument("--work-dir", required=True, help="checkpoints for resuming a killed run")
    p.add_argument("--options", type=json_arg, required=True, help="JSON: recipe, max_steps, limit, run")
    p.add_argument("--gpus", type=int, default=0, help="GPUs of the job; more than one runs under torchrun")


def add_train_parsers(sub) -> None:
    p = sub.add_parser("sft", help="supervised fine-tuning (TRL SFTTrainer) of a Qwen3-VL model, resumable")
    _common(p)
    p.add_argument("--data", required=True, help="the SFT JSONL")
    p.add_argument("--image-root", required=True, help="where the extracted images live")
    p.add_argument("--inputs", nargs="*", default=[], help="more manifests the result depends on")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("rl", help="GRPO reinforcement learning (TRL GRPOTrainer) with the IoU reward, resumable")
    _common(p)
    p.add_argument("--train", required=True, help="rewritten RL train parquet")
    p.add_argument("--val", default=None, help="rewritten RL val parquet (reward split 'test')")
    p.set_defaults(func=cmd_rl)
