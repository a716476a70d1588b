"""Server mode, the paper's protocol: an OpenAI-compatible server per model, and the async client.

`ServerEngine` (backend `server`) starts a vLLM or SGLang server on the job's GPUs (data
parallel over all of them by default, tensor parallel as configured), waits until it answers,
sends the requests with at most `concurrency` in flight (egm.infer.backends.client), and stops the server
by its process group when done. The server's output goes to a log file that is kept; its PID is
written beside it while it runs. `url:` uses a server that is already running instead.

Engine options:
  server: vllm | sglang | transformers   (transformers = `transformers serve`, CPU tests only)
  url: http://host:port/v1                (an external server; nothing is started)
  model_name: name to send                (default: the first id of /v1/models)
  concurrency: requests in flight         (default: inference.batch_size, 64 in the paper)
  tensor_parallel_size, data_parallel_size ("auto": all GPUs / tp), dtype, max_model_len,
  gpu_memory_utilization, load_format (`dummy`: random weights), enforce_eager (no CUDA graphs),
  engine_args (a list of extra command-line arguments),
  host, port (0/None: a free one), ready_timeout_s, request_timeout_s, log_dir,
  trust_remote_code (off; only for self-made test models), device (transformers only)

The command lines follow the authors' launch scripts (EGM-AReaL
`examples/agrounding/evaluation/sglang_infer.sh` and `vllm_infer.sh`, the same files in zgq1879/EGM
`verl/scripts/`): SGLang's `python -m sglang.launch_server --model-path M --dp-size 8 --tp-size 1
--dtype auto --mem-fraction-static 0.8` (sglang_infer.sh lines 12-19) and vLLM's `python -m
vllm.entrypoints.openai.api_server --model M --data-parallel-size 8 --tensor-parallel-size 1 --dtype
auto --gpu-memory-utilization 0.9` (vllm_infer.sh lines 12-20). Three deliberate differences, none of
which reaches the model: the server listens on 127.0.0.1, not 0.0.0.0 (the job's own client is its
only user); the port is a free one, not 30000/8000 (several jobs may share a node); and vLLM gets no
`--trust-remote-code` (Qwen3-VL is built into transformers, and remote code stays off unless the
config asks for it).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from egm.infer.backends.client import OpenAIChatClient, ServerError
from egm.infer.backends.gpus import resolve_data_parallel
from egm.infer.base import CONTAINERS, Completion, EngineBase, Request, require_module
from egm.options import SamplingOptions

log = logging.getLogger(__name__)

SERVER_KINDS = ("vllm", "sglang", "transformers")
MODULES = {"vllm": "vllm", "sglang": "sglang", "transformers": "fastapi"}
# The share of GPU memory each server takes when the config names none: the authors' values
# (sglang_infer.sh line 19 `--mem-fraction-static 0.8`; vllm_infer.sh line 20
# `--gpu-memory-utilization 0.9`, which is also vLLM's own default).
AUTHORS_MEMORY_FRACTION = {"sglang": 0.8, "vllm": 0.9}


@dataclass
class ServerSpec:
    kind: str
    model_dir: str
    host: str = "127.0.0.1"
    port: int = 8000
    served_name: str = "egm"
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    dtype: str = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    load_format: str | None = None
    enforce_eager: bool = False
    engine_args: list[str] = field(default_factory=list)
    trust_remote_code: bool = False
    device: str | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"


def _executable(name: str) -> str:
    """A console script of this environment (beside its python), else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


# Each serving engine's spelling of the optional settings: context length, weight loader, and
# running without graph capture.
OPTIONAL_FLAGS = {
    "vllm": ("--max-model-len", "--load-format", "--enforce-eager"),
    "sglang": ("--context-length", "--load-format", "--disable-cuda-graph"),
}


def server_command(spec: ServerSpec) -> list[str]:
    """The command line that starts `spec`'s server."""
    if spec.kind not in SERVER_KINDS:
        raise ValueError(f"unknown server {spec.kind!r}; use one of {', '.join(SERVER_KINDS)}")
    memory = spec.gpu_memory_utilization or AUTHORS_MEMORY_FRACTION.get(spec.kind)
    if spec.kind == "vllm":
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", spec.model_dir,
               "--host", spec.host, "--port", str(spec.port), "--served-model-name", spec.served_name,
               "--data-parallel-size", str(spec.data_parallel_size),
               "--tensor-parallel-size", str(spec.tensor_parallel_size), "--dtype", spec.dtype,
               "--gpu-memory-utilization", str(memory)]
    elif spec.kind == "sglang":
        cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", spec.model_dir, "--host", spec.host,
               "--port", str(spec.port), "--served-model-name", spec.served_name,
               "--dp-size", str(spec.data_parallel_size), "--tp-size", str(spec.tensor_parallel_size),
               "--dtype", spec.dtype, "--mem-fraction-static", str(memory)]
    else:
        # Serves one model, named by its path; one request at a time (no batching for Qwen3-VL).
        if spec.load_format not in (None, "auto"):
            raise ValueError(f"transformers serve has no load_format {spec.load_format!r}")
        cmd = [_executable("transformers"), "serve", spec.model_dir, "--host", spec.host, "--port", str(spec.port),
               "--dtype", spec.dtype, "--device", spec.device or "auto"]
    if spec.kind in OPTIONAL_FLAGS:
        length, loader, eager = OPTIONAL_FLAGS[spec.kind]
        if spec.max_model_len:
            cmd += [length, str(spec.max_model_len)]
        if spec.load_format:
            cmd += [loader, spec.load_format]
        if spec.enforce_eager:
            cmd.append(eager)
    if spec.trust_remote_code:
        cmd.append("--trust-remote-code")
    return cmd + [str(a) for a in spec.engine_args]


def server_spec(model_dir: str, server: str = "vllm", tensor_parallel_size: int = 1, data_parallel_size="auto",
                dtype: str = "auto", max_model_len: int | None = None, gpu_memory_utilization: float | None = None,
                load_format: str | None = None, enforce_eager: bool = False, engine_args: list | None = None,
                host: str = "127.0.0.1", port: int | None = None, trust_remote_code: bool = False,
                device: str | None = None, gpus: list[str] | None = None) -> ServerSpec:
    """The server a job starts from its engine options (`gpus`: the job's GPUs, default the visible ones)."""
    tp = int(tensor_parallel_size)
    return ServerSpec(
        kind=server, model_dir=str(model_dir), host=host, port=int(port or free_port(host)),
        tensor_parallel_size=tp,
        data_parallel_size=1 if server == "transformers" else resolve_data_parallel(data_parallel_size, tp, gpus),
        dtype=dtype, max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
        load_format=load_format, enforce_eager=bool(enforce_eager), engine_args=list(engine_args or []),
        trust_remote_code=bool(trust_remote_code), device=device,
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class ManagedServer:
    """One server process (group): started, awaited, asked after, stopped by its PID."""

    def __init__(self, spec: ServerSpec, log_path: Path, env: dict | None = None):
        self.spec = spec
        self.log_path = Path(log_path)
        self.pid_path = self.log_path.with_suffix(".pid")
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = server_command(self.spec)
        with open(self.log_path, "ab") as handle:
            handle.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(cmd)}\n".encode())
            # A session of its own: the server and every worker it forks (data parallel ranks)
            # share one process group, which stop() ends as a whole.
            self.proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, env=self.env)
        self.pid_path.write_text(f"{self.proc.pid}\n")
        log.info("started %s server (pid %d) on %s; log %s", self.spec.kind, self.proc.pid, self.spec.base_url, self.log_path)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def exit_reason(self, wait_s: float = 0.0) -> str | None:
        """None while the process runs, else a sentence naming its exit code and log."""
        if self.proc is None:
            return "the server was never started"
        if wait_s:
            try:
                self.proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                pass
        code = self.proc.poll()
        if code is None:
            return None
        return f"server process {self.proc.pid} exited with code {code}; see its log {self.log_path}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, timeout_s: float = 1800.0, poll_s: float = 0.5) -> str:
        """Block until GET /v1/models answers; returns the first model id it lists."""
        import httpx

        deadline = time.monotonic() + timeout_s
        url = f"{self.spec.base_url}/models"
        while True:
            reason = self.exit_reason()
            if reason:
                raise ServerError(f"{self.spec.kind} server did not come up: {reason}\n{self.log_tail()}")
            try:
                response = httpx.get(url, timeout=5.0)
                if response.status_code == 200:
                    ids = [m.get("id") for m in response.json().get("data", [])]
                    return ids[0] if ids else self.spec.served_name
            except (httpx.TransportError, ValueError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"{self.spec.kind} server not ready after {timeout_s:.0f} s; see {self.log_path}\n{self.log_tail()}")
            time.sleep(poll_s)

    def stop(self, grace_s: float = 30.0) -> int | None:
        """SIGTERM to the process group, SIGKILL after `grace_s`; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        # The leader may be gone with workers left behind: end the group either way.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.pid_path.unlink(missing_ok=True)
        code = self.proc.poll()
        log.info("stopped %s server (pid %d, exit code %s)", self.spec.kind, self.proc.pid, code)
        return code


def _stop_on_sigterm() -> None:
    """Turn SIGTERM (Snakemake or SLURM cancelling the job) into SystemExit, so cleanup runs."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


class ServerEngine(EngineBase):
    name = "server"

    def __init__(
        self,
        model_dir: str,
        sampling: SamplingOptions,
        server: str = "vllm",
        url: str | None = None,
        model_name: str | None = None,
        concurrency: int | None = None,
        batch_size: int = 64,
        tensor_parallel_size: int = 1,
        data_parallel_size="auto",
        dtype: str = "auto",
        max_model_len: int | None = None,
        gpu_memory_utilization: float | None = None,
        load_format: str | None = None,
        enforce_eager: bool = False,
        engine_args: list | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        ready_timeout_s: float = 1800.0,
        request_timeout_s: float = 3600.0,
        log_dir: str = "logs/server",
        trust_remote_code: bool = False,
        device: str | None = None,
        api_key: str | None = None,
    ):
        if server not in SERVER_KINDS:
            raise ValueError(f"unknown server {server!r}; use one of {', '.join(SERVER_KINDS)}")
        self.sampling = sampling
        self.server = None
        self.concurrency = int(concurrency or batch_size)
        health: Callable[[], str | None] = lambda: None
        if url:
            base_url = url.rstrip("/")
            model = model_name or self._first_model(base_url)
        else:
            require_module(MODULES[server], f"server {server}", CONTAINERS.get(server))
            spec = server_spec(
                model_dir, server, tensor_parallel_size=tensor_parallel_size, data_parallel_size=data_parallel_size,
                dtype=dtype, max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
                load_format=load_format, enforce_eager=enforce_eager, engine_args=engine_args, host=host, port=port,
                trust_remote_code=trust_remote_code, device=device,
            )
            log_path = Path(log_dir) / f"{Path(model_dir).name}.{server}.{spec.port}.log"
            self.server = ManagedServer(spec, log_path)
            _stop_on_sigterm()
            atexit.register(self.close)
            self.server.start()
            try:
                served = self.server.wait_ready(ready_timeout_s)
            except BaseException:
                self.close()
                raise
            base_url, model = spec.base_url, model_name or served
            health = lambda: self.server.exit_reason(wait_s=2.0) if self.server else None  # noqa: E731
        self.base_url, self.model = base_url, model
        self.data_parallel_size = self.server.spec.data_parallel_size if self.server else None
        self.client = OpenAIChatClient(
            base_url, model, sampling, concurrency=self.concurrency, timeout_s=request_timeout_s,
            extensions=server != "transformers", api_key=api_key or os.environ.get("EGM_SERVER_API_KEY"),
            health=health,
        )

    @staticmethod
    def _first_model(base_url: str) -> str:
        import httpx

        response = httpx.get(f"{base_url}/models", timeout=30.0)
        response.raise_for_status()
        ids = [m["id"] for m in response.json().get("data", [])]
        if not ids:
            raise ServerError(f"{base_url} lists no model; set engine_options.model_name")
        return ids[0]

    def generate_each(self, requests: list[Request], on_done: Callable[[int, Completion], None],
                      concurrency: int | None = None) -> None:
        """Send all requests (at most `concurrency` in flight); `on_done` as each one finishes."""
        self.client.run(requests, on_done, concurrency=concurrency)

    def generate(self, requests: list[Request]) -> list[Completion]:
        results: list[Completion | None] = [None] * len(requests)

        def keep(index: int, completion: Completion) -> None:
            results[index] = completion

        self.generate_each(requests, keep)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.stop()
