"""A Ray cluster across the nodes of a SLURM allocation, for engines that span nodes.

Models too large for one node run vLLM (or SGLang) with tensor parallelism inside a node and
pipeline parallelism across nodes, over Ray. Inside an allocation of N nodes:

    python -m egm.infer.backends.ray_slurm -- python -m egm predict ...      # or any command

starts the Ray head on the first node of the allocation, one Ray worker on every other node
(each through `srun`, one task per node), waits until all N nodes have joined, runs the command
on the head node with RAY_ADDRESS set, and stops the cluster when the command ends (also on
failure or SIGTERM). The engine is then told to use Ray, e.g. for vLLM in the model's config:

    engine_options: {server: vllm, tensor_parallel_size: 8, data_parallel_size: 1,
                     engine_args: [--pipeline-parallel-size, 2, --distributed-executor-backend, ray]}

`--local-nodes N` runs the same path without SLURM: N Ray nodes on this host, each a separate
raylet that sees only its own GPUs, so a multi-node engine can be tried on one multi-GPU machine
(benchmarks/multigpu.sh does this on two GPUs). See docs/inference.md.
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
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"


@dataclass
class RayStart:
    """One `ray start` process: its command line and what it adds to the environment."""

    cmd: list[str]
    env: dict = field(default_factory=dict)


@dataclass
class RayPlan:
    head: str
    head_address: str  # ip:port the workers and the command connect to
    workers: list[str]
    starts: list[RayStart]  # the head's first
    env: dict  # what the command gets on top of this process's environment
    nodes: int  # how many must join before the command runs

    @property
    def head_cmd(self) -> list[str]:
        return self.starts[0].cmd

    @property
    def worker_cmd(self) -> list[str] | None:
        return self.starts[1].cmd if len(self.starts) > 1 else None


def slurm_hostnames(environ: dict | None = None) -> list[str]:
    env = os.environ if environ is None else environ
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise RuntimeError("not inside a SLURM allocation (SLURM_JOB_NODELIST is unset); use salloc/sbatch --nodes=N")
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return [h for h in out.stdout.split() if h]


def _resources(gpus_per_node: int | None, cpus_per_node: int | None) -> list[str]:
    resources = []
    if gpus_per_node is not None:
        resources += [f"--num-gpus={gpus_per_node}"]
    if cpus_per_node is not None:
        resources += [f"--num-cpus={cpus_per_node}"]
    return resources


def plan(hostnames: list[str], head_ip: str, port: int = 6379, gpus_per_node: int | None = None,
         cpus_per_node: int | None = None, ray: str = "ray") -> RayPlan:
    """The srun commands that start the head (first node) and the workers (all others)."""
    if not hostnames:
        raise ValueError("no nodes")
    head, workers = hostnames[0], hostnames[1:]
    resources = _resources(gpus_per_node, cpus_per_node)
    address = f"{head_ip}:{port}"
    # --block keeps each `ray start` in the foreground of its srun step, so ending the step ends Ray.
    starts = [RayStart(["srun", "--nodes=1", "--ntasks=1", "--overlap", f"--nodelist={head}",
                        ray, "start", "--head", f"--node-ip-address={head_ip}", f"--port={port}",
                        "--include-dashboard=false", *resources, "--block"])]
    if workers:
        starts.append(RayStart(["srun", f"--nodes={len(workers)}", f"--ntasks={len(workers)}", "--ntasks-per-node=1",
                                "--overlap", f"--nodelist={','.join(workers)}", ray, "start", f"--address={address}",
                                *resources, "--block"]))
    return RayPlan(head=head, head_address=address, workers=workers, starts=starts, env={"RAY_ADDRESS": address},
                   nodes=len(hostnames))


def plan_local(nodes: int, gpus: list[str], gpus_per_node: int, port: int = 6379, ray: str = "ray",
               object_store_bytes: int = 2 * 10**9) -> RayPlan:
    """N Ray nodes on this host, node k on GPUs gpus[k*g:(k+1)*g], as if each were its own machine.

    What a second machine would give a node and one host does not, each gets here: its own GPUs
    (CUDA_VISIBLE_DEVICES, which Ray reads for the node's GPU ids), its own address (127.0.0.k+1:
    every 127.x address reaches this host; the head's Ray resolves to the host's own), VLLM_HOST_IP
    to match (vLLM's older Ray executor tells nodes apart by it), and ports of its own where Ray's
    defaults are fixed. The object store is capped: each raylet would otherwise take 30% of memory.
    """
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"need at least one node and one GPU per node, got {nodes} x {gpus_per_node}")
    if len(gpus) < nodes * gpus_per_node:
        raise ValueError(f"{nodes} nodes x {gpus_per_node} GPUs need {nodes * gpus_per_node} GPUs; visible: {gpus}")
    address = f"{LOCALHOST}:{port}"
    starts = []
    for k in range(nodes):
        own = ",".join(gpus[k * gpus_per_node:(k + 1) * gpus_per_node])
        common = [f"--num-gpus={gpus_per_node}", f"--object-store-memory={int(object_store_bytes)}",
                  f"--dashboard-agent-listen-port={52365 + k}",
                  f"--min-worker-port={10002 + 2000 * k}", f"--max-worker-port={10002 + 2000 * k + 1999}", "--block"]
        if k == 0:
            starts.append(RayStart([ray, "start", "--head", f"--node-ip-address={LOCALHOST}", f"--port={port}",
                                    "--include-dashboard=false", *common], {"CUDA_VISIBLE_DEVICES": own}))
        else:
            ip = f"127.0.0.{k + 1}"
            starts.append(RayStart([ray, "start", f"--address={address}", f"--node-ip-address={ip}", *common],
                                   {"CUDA_VISIBLE_DEVICES": own, "VLLM_HOST_IP": ip}))
    # The command runs "on the head node": it sees that node's GPUs only.
    env = {"RAY_ADDRESS": address, "CUDA_VISIBLE_DEVICES": starts[0].env["CUDA_VISIBLE_DEVICES"]}
    return RayPlan(head=socket.gethostname(), head_address=address, workers=[f"local-{k}" for k in range(1, nodes)],
                   starts=starts, env=env, nodes=nodes)


def alive_nodes(address: str) -> int:
    """Nodes that have joined (through Ray's Python API: it ships with the engines' images)."""
    code = ("import ray; ray.init(address=%r, logging_level='ERROR'); "
            "print(sum(1 for n in ray.nodes() if n['Alive']))") % address
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    try:
        return int(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return 0


def run_on_cluster(p: RayPlan, command: list[str], timeout_s: float = 600.0, head_start_s: float = 5.0) -> int:
    """Start the plan's Ray nodes, wait for all to join, run the command, stop the nodes."""
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
        for i, start in enumerate(p.starts):
            if i == 1:
                time.sleep(head_start_s)  # the head must listen before workers dial in
            where = p.head if i == 0 else ", ".join(p.workers)
            log.info("ray %s on %s: %s%s", "head" if i == 0 else "worker(s)", where,
                     "".join(f"{k}={v} " for k, v in start.env.items()), shlex.join(start.cmd))
            steps.append(subprocess.Popen(start.cmd, env={**os.environ, **start.env}))
        deadline = time.monotonic() + timeout_s
        while (joined := alive_nodes(p.head_address)) < p.nodes:
            if any(step.poll() is not None for step in steps):
                raise RuntimeError("a ray start step exited before the cluster was up; see the job's output")
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {joined} of {p.nodes} nodes joined the Ray cluster in {timeout_s:.0f} s")
            time.sleep(min(5.0, head_start_s + 0.1))
        log.info("ray cluster up: %d nodes; running %s", p.nodes, shlex.join(command))
        return subprocess.run(command, env={**os.environ, **p.env}).returncode
    finally:
        stop()
        signal.signal(signal.SIGTERM, previous)


def run(command: list[str], port: int = 6379, timeout_s: float = 600.0, gpus_per_node: int | None = None,
        local_nodes: int | None = None) -> int:
    if local_nodes:
        from egm.infer.backends.gpus import visible_gpus

        p = plan_local(local_nodes, visible_gpus(), gpus_per_node or 1, port=port)
    else:
        hostnames = slurm_hostnames()
        p = plan(hostnames, socket.gethostbyname(hostnames[0]), port=port, gpus_per_node=gpus_per_node)
    return run_on_cluster(p, command, timeout_s=timeout_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m egm.infer.backends.ray_slurm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=6379)
    parser.add_argument("--gpus-per-node", type=int, default=None)
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument("--local-nodes", type=int, default=None,
                        help="no SLURM: start this many Ray nodes on this host, --gpus-per-node GPUs each")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run on the head node")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(command, port=args.port, timeout_s=args.timeout_s, gpus_per_node=args.gpus_per_node,
               local_nodes=args.local_nodes)


if __name__ == "__main__":
    sys.exit(main())
