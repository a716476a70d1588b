"""`rollout: vllm-server`: the RL job starts a rollout server on some of its GPUs and trains on the
others. vLLM's server needs a GPU, so the server here is a stand-in process (named as such); what
is checked is the stage's part: the GPU split, TRL's settings, the server's lifetime and errors."""

import os
import sys
import time
from types import SimpleNamespace

import pytest

from egm.runtime import GPU_JOBS_ON_CPU_ENV
from egm.train import cli, recipes, rollout_server
from egm.train.rollout_server import SERVER_URL_ENV, RolloutServer, RolloutServerError, split_gpus

RECIPE = {"stage": "rl", "group_size": 2, "prompts_per_step": 2, "micro_batch_size": 2, "max_new_tokens": 64,
          "learning_rate": 1e-5, "rollout": "vllm-server", "rollout_gpus": 1, "bf16": True}


def standin_server(seconds: float = 60, rc: int = 0, say: str = "serving") -> list[str]:
    """A stand-in for `trl vllm-serve` (which needs a GPU): prints, then sleeps or exits with `rc`."""
    code = f"import sys, time; print({say!r}, flush=True); time.sleep({seconds}); sys.exit({rc})"
    return [sys.executable, "-c", code]


def test_the_server_takes_the_last_gpus():
    assert split_gpus(["0", "1", "2", "3"], 1) == (["0", "1", "2"], ["3"])
    assert split_gpus(["4", "5"], 1) == (["4"], ["5"])
    for visible, k in ((["0"], 1), (["0", "1"], 2), (["0", "1"], 0)):
        with pytest.raises(RolloutServerError, match="rollout_gpus"):
            split_gpus(visible, k)


def test_trl_server_mode_settings():
    args = recipes.rl_args(RECIPE, vllm_available=True, server_url="http://127.0.0.1:8123")
    assert (args["use_vllm"], args["vllm_mode"], args["vllm_server_base_url"]) == (True, "server", "http://127.0.0.1:8123")
    assert args["vllm_server_timeout"] >= 600  # an 8B takes minutes to load
    assert "vllm_gpu_memory_utilization" not in args and "vllm_max_model_length" not in args
    with pytest.raises(recipes.RecipeError, match="python -m egm rl"):
        recipes.rl_args(RECIPE, vllm_available=True)
    with pytest.raises(recipes.RecipeError, match="not importable"):
        recipes.rl_args(RECIPE, vllm_available=False, server_url="http://127.0.0.1:8123")
    # Applied now, so no longer listed as recorded only; with colocate it still is.
    assert "rollout_gpus" not in recipes.recorded_only(RECIPE, "rl")
    assert "rollout_gpus" in recipes.recorded_only({**RECIPE, "rollout": "auto"}, "rl")


def test_serve_command_is_trls_on_this_host():
    command = rollout_server.serve_command("/m", 8123, 2, 2112, RECIPE)
    assert command[:4] == ["trl", "vllm-serve", "--model", "/m"]
    flags = dict(zip(command[4::2], command[5::2]))
    assert flags == {"--host": "127.0.0.1", "--port": "8123", "--data-parallel-size": "2", "--max-model-len": "2112",
                     "--gpu-memory-utilization": "0.9", "--dtype": "bfloat16"}


def test_server_stopped_when_the_block_ends(tmp_path):
    server = RolloutServer(standin_server(), ["1"], tmp_path / "server.log", "http://127.0.0.1:1")
    with server:
        for _ in range(100):  # until it has started and said so
            if "serving" in (tmp_path / "server.log").read_text():
                break
            time.sleep(0.1)
        assert server.process.poll() is None
        server.check()
    assert server.process.poll() is not None  # stopped, not left running
    assert "serving" in (tmp_path / "server.log").read_text()


def test_a_server_that_died_is_named_with_its_log(tmp_path):
    server = RolloutServer(standin_server(0, rc=3, say="CUDA out of memory"), ["1"], tmp_path / "s.log", "http://x")
    with pytest.raises(RolloutServerError, match=r"exited with 3(.|\n)*CUDA out of memory"):
        with server:
            time.sleep(1.5)
            raise ConnectionError("refused")  # what the trainer's client says


def test_rl_command_trains_beside_the_server(tmp_path, monkeypatch):
    """`egm rl` with rollout: vllm-server on a 2-GPU job: the server on GPU 1 (its environment),
    training on GPU 0 with the server's address; afterwards the server is gone and the
    environment as it was. GPU_JOBS_ON_CPU lets the job's GPU check pass on this CPU machine."""
    seen = {}

    def fake_train_rl(*a, **k):
        seen.update(url=os.environ.get(SERVER_URL_ENV), gpus=os.environ.get("CUDA_VISIBLE_DEVICES"))
        seen["server_alive"] = made[0].process.poll() is None

    made = []
    real = rollout_server.rollout_server

    def with_standin(*a, **k):
        server, training = real(*a, **k)
        server.command = standin_server()
        made.append(server)
        return server, training

    monkeypatch.setattr(rollout_server, "rollout_server", with_standin)
    monkeypatch.setattr("egm.train.rl.train_rl", fake_train_rl)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv(GPU_JOBS_ON_CPU_ENV, "1")
    monkeypatch.delenv(SERVER_URL_ENV, raising=False)
    monkeypatch.setattr(sys, "argv", ["egm", "rl", "--gpus", "2"])  # what a torchrun relaunch would rerun
    args = SimpleNamespace(options={"recipe": RECIPE}, gpus=2, out_dir=str(tmp_path / "out"), model_dir="/m",
                           model_manifest="m.json", train="t.parquet", val=None, manifest="rl.json",
                           work_dir=str(tmp_path / "work"))
    cli.cmd_rl(args)
    assert seen["gpus"] == "0" and seen["url"].startswith("http://127.0.0.1:") and seen["server_alive"]
    assert made[0].gpus == ["1"] and made[0].process.poll() is not None
    assert (tmp_path / "work-rollout-server.log").exists()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1" and SERVER_URL_ENV not in os.environ
