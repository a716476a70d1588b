"""Rollouts from a vLLM server on some of the job's GPUs, training on the others (TRL's server mode).

An RL recipe with `rollout: vllm-server` and `rollout_gpus: k` (AReaL's layout: the authors served
rollouts from 2 of 8 GPUs) makes `python -m egm rl` start `trl vllm-serve` on the last k GPUs the
job was given, pass its address to the trainer (GRPOConfig's `vllm_server_base_url`) and train
on the rest, under torchrun when more than one. TRL's client waits for the server to answer
(`vllm_server_timeout`), sends it the prompts, and after each optimizer step pushes the new
weights to it over NCCL. The server stops when training ends, however it ends; if it died first,
the error names its log.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

# The trainer's processes (torchrun's children included) find the server here; set only while
# one runs, so a process that sees it knows a server was started for it.
SERVER_URL_ENV = "EGM_ROLLOUT_SERVER_URL"


class RolloutServerError(RuntimeError):
    pass


def split_gpus(visible: list[str], rollout_gpus: int) -> tuple[list[str], list[str]]:
    """(training GPUs, rollout GPUs): the server takes the last `rollout_gpus` of the job's."""
    if not 0 < rollout_gpus < len(visible):
        raise RolloutServerError(
            f"rollout: vllm-server needs 1 <= rollout_gpus < the job's GPUs; rollout_gpus is {rollout_gpus}, "
            f"the job has {len(visible)} ({','.join(visible) or 'none'})")
    return visible[:-rollout_gpus], visible[-rollout_gpus:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(model_dir: str, port: int, rollout_gpus: int, max_model_len: int, recipe: dict) -> list[str]:
    """`trl vllm-serve` for the start model, one replica per rollout GPU, on this host only."""
    command = ["trl", "vllm-serve", "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
               "--data-parallel-size", str(rollout_gpus), "--max-model-len", str(max_model_len),
               "--gpu-memory-utilization", "0.9"]  # its GPUs are its own (colocate shares them: 0.35)
    if recipe.get("bf16"):
        command += ["--dtype", "bfloat16"]
    return command


class RolloutServer:
    """`command` running on `gpus`, its output in `log_path`, for the length of a `with` block."""

    def __init__(self, command: list[str], gpus: list[str], log_path: str | Path, url: str):
        self.command, self.gpus, self.log_path, self.url = command, gpus, Path(log_path), url
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> RolloutServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(self.gpus)}
        env.pop(SERVER_URL_ENV, None)
        log.info("rollout server on GPU %s: %s (log %s)", ",".join(self.gpus), " ".join(self.command), self.log_path)
        with open(self.log_path, "ab") as out:
            # Its own process group: stopping it reaches vLLM's worker processes too.
            self.process = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        return self

    def check(self) -> None:
        """Raise if the server is no longer running."""
        if self.process is not None and self.process.poll() is not None:
            raise RolloutServerError(
                f"the rollout server exited with {self.process.returncode}; its log {self.log_path} ends:\n"
                + self.log_tail())

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __exit__(self, kind, error, traceback) -> None:
        died = self.process is not None and self.process.poll() is not None
        self.stop()
        if died and error is not None:
            # The trainer's own error (a refused connection) hides why: say what the server said.
            raise RolloutServerError(
                f"training failed ({type(error).__name__}: {error}) after the rollout server exited with "
                f"{self.process.returncode}; its log {self.log_path} ends:\n{self.log_tail()}") from error

    def stop(self, grace_s: float = 30.0) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        for sig, wait in ((signal.SIGINT, grace_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                return
            try:
                process.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


def rollout_server(model_dir: str, work_dir: str, gpus: int, recipe: dict) -> tuple[RolloutServer, list[str]]:
    """The server for an RL job on `gpus` GPUs (not started yet: use it in a `with`) and the GPUs
    left for training. Its log goes beside the work directory (which holds only checkpoints)."""
    from egm.infer.backends.gpus import visible_gpus
    from egm.train.recipes import VLLM_PROMPT_TOKENS

    training, rollout = split_gpus(visible_gpus()[:gpus], int(recipe.get("rollout_gpus", 1)))
    port = free_port()
    command = serve_command(model_dir, port, len(rollout), VLLM_PROMPT_TOKENS + int(recipe["max_new_tokens"]), recipe)
    log_path = Path(str(work_dir).rstrip("/") + "-rollout-server.log")
    return RolloutServer(command, rollout, log_path, f"http://127.0.0.1:{port}"), training
