"""A Ray cluster across the nodes of a SLURM allocation, for engines that span nodes.

Models too large for one node run vLLM (or SGLang) with tensor parallelism inside a node and
pipeline parallelism across nodes, over Ray. Inside an allocation of N nodes:

    python -m egm.infer.ray_slurm -- python -m egm predict ...      # or any command

starts the Ray head on the first node of the allocation, one Ray worker on every other node
(each through `srun`, one task per node), waits until all N nodes have joined, runs the command
on the head node with RAY_ADDRESS set, and stops the cluster when the command ends (also on
failure or SIGTERM). The engine is then told to use Ray, e.g. for vLLM in the model's config:

    engine_options: {server: vllm, tensor_parallel_size: 8, data_parallel_size: 1,
                     engine_args: [--pipeline-parallel-size, 2, --distributed-executor-backend, ray]}

See docs/inference.md. This cannot run on a machine without SLURM; `plan()` is what is tested.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class RayPlan:
    head: str
    head_address: str  # ip:port the workers and the command connect to
    workers: list[str]
    head_cmd: list[str]
    worker_cmd: list[str] | None
    env: dict


def slurm_hostnames(environ: dict | None = None) -> list[str]:
    env = os.environ if environ is None else environ
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise RuntimeError("not inside a SLURM allocation (SLURM_JOB_NODELIST is unset); use salloc/sbatch --nodes=N")
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return [h for h in out.stdout.split() if h]


def plan(hostnames: list[str], head_ip: str, port: int = 6379, gpus_per_node: int | None = None,
         cpus_per_node: int | None = None, ray: str = "ray") -> RayPlan:
    """The srun commands that start the head (first node) and the workers (all others)."""
    if not hostnames:
        raise ValueError("no nodes")
    head, workers = hostnames[0], hostnames[1:]
    resources = []
    if gpus_per_node is not None:
        resources += [f"--num-gpus={gpus_per_node}"]
    if cpus_per_node is not None:
        resources += [f"--num-cpus={cpus_per_node}"]
    address = f"{head_ip}:{port}"
    # --block keeps each `ray start` in the foreground of its srun step, so ending the step ends Ray.
    head_cmd = ["srun", "--nodes=1", "--ntasks=1", "--overlap", f"--nodelist={head}",
                ray, "start", "--head", f"--node-ip-address={head_ip}", f"--port={port}",
                "--include-dashboard=false", *resources, "--block"]
    worker_cmd = None
    if workers:
        worker_cmd = ["srun", f"--nodes={len(workers)}", f"--ntasks={len(workers)}", "--ntasks-per-node=1", "--overlap",
                      f"--nodelist={','.join(workers)}", ray, "start", f"--address={address}", *resources, "--block"]
    return RayPlan(head=head, head_address=address, workers=workers, head_cmd=head_cmd, worker_cmd=worker_cmd,
                   env={"RAY_ADDRESS": address})


def _alive_nodes(address: str) -> int:
    """Nodes that have joined (through Ray's Python API: it ships with the engines' images)."""
    code = ("import ray; ray.init(address=%r, logging_level='ERROR'); "
            "print(sum(1 for n in ray.nodes() if n['Alive']))") % address
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    try:
        return int(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return 0


def run(command: list[str], port: int = 6379, timeout_s: float = 600.0, gpus_per_node: int | None = None) -> int:
    hostnames = slurm_hostnames()
    head_ip = socket.gethostbyname(hostnames[0])
    p = plan(hostnames, head_ip, port=port, gpus_per_node=gpus_per_node)
    steps: list[subprocess.Popen] = []

    def stop(*_):
        for step in reversed(steps):
            if step.poll() is None:
                step.send_signal(signal.SIGTERM)  # srun forwards it to `ray start --block`
        for step in steps:
            try:
                step.wait(timeout=60)
            except subprocess.TimeoutExpired:
                step.kill()

    previous = signal.signal(signal.SIGTERM, lambda *a: (stop(), sys.exit(143)))
    try:
        log.info("ray head on %s (%s): %s", p.head, p.head_address, shlex.join(p.head_cmd))
        steps.append(subprocess.Popen(p.head_cmd))
        if p.worker_cmd:
            time.sleep(5)  # the head must listen before workers dial in
            log.info("ray workers on %s: %s", p.workers, shlex.join(p.worker_cmd))
            steps.append(subprocess.Popen(p.worker_cmd))
        deadline = time.monotonic() + timeout_s
        while (joined := _alive_nodes(p.head_address)) < len(hostnames):
            if any(step.poll() is not None for step in steps):
                raise RuntimeError("a ray start step exited before the cluster was up; see the job's output")
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {joined} of {len(hostnames)} nodes joined the Ray cluster in {timeout_s:.0f} s")
            time.sleep(5)
        log.info("ray cluster up: %d nodes; running %s", len(hostnames), shlex.join(command))
        return subprocess.run(command, env={**os.environ, **p.env}).returncode
    finally:
        stop()
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m egm.infer.ray_slurm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=6379)
    parser.add_argument("--gpus-per-node", type=int, default=None)
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run on the head node")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(command, port=args.port, timeout_s=args.timeout_s, gpus_per_node=args.gpus_per_node)


if __name__ == "__main__":
    sys.exit(main())
