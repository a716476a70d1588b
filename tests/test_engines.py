"""Engine plumbing that needs no engine: vLLM/SGLang request and option mapping, the server
command lines, the client's request body, GPU discovery, sharding, the Ray-on-SLURM plan."""

import base64
import importlib.util
import json
import os
import sys
import types
from importlib.machinery import ModuleSpec

import pytest

from egm.grounding import PROMPTS
from egm.infer.backends import client as cl
from egm.infer.backends.gpus import groups, resolve_data_parallel, visible_gpus
from egm.infer.backends.ray_slurm import plan, plan_local
from egm.infer.backends.replicas import replicated_chunk_size, shard
from egm.infer.backends.server import ServerSpec, server_command
from egm.infer.backends.sglang import sglang_engine_kwargs, sglang_inputs, sglang_request_params
from egm.infer.backends.vllm import vllm_engine_kwargs, vllm_prompt, vllm_request_sampling_kwargs
from egm.infer.base import BackendUnavailable, Completion, EngineBase, LazyEngine, Request
from egm.infer.engine import load_engine
from egm.options import SamplingOptions

PAPER = SamplingOptions(max_tokens=4096, temperature=0.0, top_p=1.0, top_k=20, repetition_penalty=1.0, presence_penalty=0.0)
PROMPT = PROMPTS["qwen3"].format(sent="the red circle")


def test_vllm_sampling_and_engine_options():
    assert vllm_request_sampling_kwargs(PAPER) == {"max_tokens": 4096, "temperature": 0.0, "top_p": 1.0, "top_k": 20,
                                           "repetition_penalty": 1.0, "presence_penalty": 0.0}
    sampled = vllm_request_sampling_kwargs(SamplingOptions(temperature=0.7, top_k=0, presence_penalty=1.5, extra={"seed": 3}))
    assert sampled["top_k"] == -1 and sampled["seed"] == 3 and sampled["presence_penalty"] == 1.5

    kwargs = vllm_engine_kwargs("/m", {"tensor_parallel_size": 8, "dtype": "bfloat16", "max_model_len": 8192,
                                       "batch_size": 64, "data_parallel_size": "auto",
                                       "engine_args": {"enable_prefix_caching": False}})
    assert kwargs == {"model": "/m", "limit_mm_per_prompt": {"image": 1}, "trust_remote_code": False,
                      "tensor_parallel_size": 8, "dtype": "bfloat16", "max_model_len": 8192,
                      "enable_prefix_caching": False}
    with pytest.raises(ValueError, match="tp_size"):
        vllm_engine_kwargs("/m", {"tp_size": 2})


def test_vllm_gets_the_model_directory_as_an_absolute_path(tmp_path, monkeypatch):
    """Ray starts vLLM's workers of a multi-node engine elsewhere than our working directory: on
    two Ray nodes a relative model path was read as a hub repo id and the engine failed."""
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert vllm_engine_kwargs("models/tiny", {})["model"] == str((tmp_path / "models" / "tiny").resolve())
    assert vllm_engine_kwargs("org/not-a-local-dir", {})["model"] == "org/not-a-local-dir"


def test_vllm_pipeline_parallel_names_qwen3_vl_text_architecture(tiny_dir, tmp_path):
    """vLLM 0.25 refused pipeline-parallel Qwen3-VL (its text config names no architecture): the
    two-node Ray run failed so on two H200s. Only with pipeline parallelism, and never over a
    name the config has or the user's own overrides."""
    expected = {"text_config": {"architectures": ["Qwen3ForCausalLM"]}}
    assert vllm_engine_kwargs(str(tiny_dir), {"pipeline_parallel_size": 2})["hf_overrides"] == expected
    assert "hf_overrides" not in vllm_engine_kwargs(str(tiny_dir), {"pipeline_parallel_size": 1})
    assert "hf_overrides" not in vllm_engine_kwargs(str(tiny_dir), {"tensor_parallel_size": 2})
    mine = {"text_config": {"architectures": ["Mine"]}}
    assert vllm_engine_kwargs(str(tiny_dir), {"pipeline_parallel_size": 2,
                                              "engine_args": {"hf_overrides": mine}})["hf_overrides"] == mine
    config = json.loads((tiny_dir / "config.json").read_text())
    config["text_config"]["architectures"] = ["Qwen3ForCausalLM"]
    named = tmp_path / "named"
    named.mkdir()
    (named / "config.json").write_text(json.dumps(config))
    assert "hf_overrides" not in vllm_engine_kwargs(str(named), {"pipeline_parallel_size": 2})


def test_offline_prompts_are_the_papers_request(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    req = Request("1", "/images/a.jpg", PROMPT)
    prompt = vllm_prompt(tok, req, image="IMG")
    assert prompt["multi_modal_data"] == {"image": "IMG"}
    text = prompt["prompt"]
    # One user turn, no system prompt, one image placeholder before the text.
    assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>" + PROMPT + "<|im_end|>")
    assert text.count("<|image_pad|>") == 1 and "system" not in text
    prompts, images = sglang_inputs(tok, [req, req])
    assert prompts == [text, text] and images == ["/images/a.jpg"] * 2


def test_sglang_sampling_and_engine_options():
    assert sglang_request_params(PAPER) == {"max_new_tokens": 4096, "temperature": 0.0, "top_p": 1.0, "top_k": 20,
                                             "repetition_penalty": 1.0, "presence_penalty": 0.0}
    kwargs = sglang_engine_kwargs("/m", {"tensor_parallel_size": 2, "data_parallel_size": "auto", "max_model_len": 8192,
                                         "gpu_memory_utilization": 0.85, "batch_size": 64},
                                  gpus=["0", "1", "2", "3", "4"])
    assert kwargs == {"model_path": "/m", "trust_remote_code": False, "tp_size": 2, "dp_size": 2,
                      "context_length": 8192, "mem_fraction_static": 0.85}
    assert sglang_engine_kwargs("/m", {"data_parallel_size": 3}, gpus=[])["dp_size"] == 3


def test_server_command_lines():
    spec = ServerSpec(kind="vllm", model_dir="/m", port=9001, tensor_parallel_size=8, data_parallel_size=1,
                      max_model_len=16384, engine_args=["--pipeline-parallel-size", 2])
    cmd = server_command(spec)
    assert cmd[1:5] == ["-m", "vllm.entrypoints.openai.api_server", "--model", "/m"]
    joined = " ".join(cmd)
    for part in ("--port 9001", "--tensor-parallel-size 8", "--data-parallel-size 1", "--max-model-len 16384",
                 "--served-model-name egm", "--pipeline-parallel-size 2"):
        assert part in joined
    assert "--trust-remote-code" not in cmd

    sg = " ".join(server_command(ServerSpec(kind="sglang", model_dir="/m", port=1, data_parallel_size=8)))
    assert "-m sglang.launch_server --model-path /m" in sg and "--dp-size 8" in sg and "--tp-size 1" in sg
    tf = server_command(ServerSpec(kind="transformers", model_dir="/m", port=2, device="cpu", trust_remote_code=True))
    assert tf[1:3] == ["serve", "/m"] and tf[-1] == "--trust-remote-code" and "cpu" in tf
    with pytest.raises(ValueError):
        server_command(ServerSpec(kind="ollama", model_dir="/m"))


def test_client_request_body(tmp_path):
    from PIL import Image

    png, jpg = tmp_path / "a.png", tmp_path / "b.bin"
    Image.new("RGB", (4, 4), "red").save(png)
    Image.new("RGB", (4, 4), "red").save(jpg, format="JPEG")
    url = cl.image_data_url(str(png))
    assert url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == png.read_bytes()  # the file itself, not re-encoded
    assert cl.image_data_url(str(jpg)).startswith("data:image/jpeg;base64,")

    body = cl.request_body("egm", url, PROMPT, PAPER)
    assert body["messages"] == [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url, "detail": "high"}},
        {"type": "text", "text": PROMPT},
    ]}]
    assert {k: v for k, v in body.items() if k != "messages"} == {
        "model": "egm", "max_tokens": 4096, "temperature": 0.0, "top_p": 1.0, "top_k": 20,
        "repetition_penalty": 1.0, "presence_penalty": 0.0}
    json.dumps(body)

    # A server without the vLLM/SGLang extensions: dropped where they change nothing, else refused.
    plain = cl.sampling_fields(PAPER, extensions=False)
    assert "top_k" not in plain and "repetition_penalty" not in plain
    with pytest.raises(ValueError, match="repetition_penalty"):
        cl.sampling_fields(SamplingOptions(repetition_penalty=1.1), extensions=False)
    with pytest.raises(ValueError, match="top_k"):
        cl.sampling_fields(SamplingOptions(temperature=1.0, top_k=20), extensions=False)


def test_answer_text_keeps_the_reasoning():
    assert cl.answer_text({"content": "think</think>\n\nanswer"}) == "think</think>\n\nanswer"
    assert cl.answer_text({"content": "[1,2,3,4]", "reasoning_content": "I see it"}) == "I see it\n</think>\n\n[1,2,3,4]"
    assert cl.answer_text({"content": "", "reasoning_content": "unfinished"}) == "unfinished"
    assert cl.answer_text({"content": None}) == ""


@pytest.mark.parametrize("backend, options, container", [
    ("vllm", {}, "containers/gpu-vllm.def"),
    ("sglang", {}, "containers/gpu-sglang.def"),
    ("server", {"server": "sglang"}, "containers/gpu-sglang.def"),
    ("server", {"server": "vllm"}, "containers/gpu-vllm.def"),
])
def test_missing_engines_name_their_container(backend, options, container):
    module = "vllm" if "vllm" in container else "sglang"
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed here")
    with pytest.raises(BackendUnavailable, match=container):
        load_engine(backend, "/m", PAPER, {"data_parallel_size": 1, **options})


def test_unknown_backend():
    with pytest.raises(BackendUnavailable, match="known: hf, vllm, sglang, server"):
        load_engine("tgi", "/m", PAPER)


def test_gpu_discovery_and_parallel_sizes():
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}) == []
    gpus = [str(i) for i in range(8)]
    assert groups(gpus, 1) == [[g] for g in gpus]
    assert groups(gpus, 4) == [gpus[:4], gpus[4:]]
    assert groups(gpus[:3], 2) == [["0", "1"]]
    assert resolve_data_parallel("auto", 1, gpus) == 8
    assert resolve_data_parallel("auto", 8, gpus) == 1
    assert resolve_data_parallel("auto", 1, []) == 1
    assert resolve_data_parallel(2, 4, []) == 2
    with pytest.raises(ValueError):
        resolve_data_parallel(0, 1, gpus)


def test_shards_are_contiguous_and_balanced():
    items = list(range(10))
    parts = shard(items, 4)
    assert [len(p) for p in parts] == [3, 3, 2, 2]
    assert sum(parts, []) == items
    assert shard([1], 3) == [[1], [], []]


def test_ray_plan_head_on_first_node_workers_on_the_rest():
    p = plan(["gpu01", "gpu02", "gpu03"], "10.0.0.1", port=6400, gpus_per_node=8)
    assert p.head == "gpu01" and p.workers == ["gpu02", "gpu03"] and p.env == {"RAY_ADDRESS": "10.0.0.1:6400"}
    assert "--head" in p.head_cmd and "--nodelist=gpu01" in p.head_cmd and "--num-gpus=8" in p.head_cmd
    assert p.head_cmd[-1] == "--block"
    assert "--nodelist=gpu02,gpu03" in p.worker_cmd and "--address=10.0.0.1:6400" in p.worker_cmd
    assert "--ntasks-per-node=1" in p.worker_cmd
    assert plan(["solo"], "10.0.0.2").worker_cmd is None
    assert p.nodes == 3 and [s.env for s in p.starts] == [{}, {}]  # srun gives each node its own GPUs


def test_local_ray_nodes_each_get_their_own_gpus_address_and_ports():
    p = plan_local(2, ["0", "1", "2", "3"], gpus_per_node=2, port=6400)
    head, worker = p.starts
    assert head.env == {"CUDA_VISIBLE_DEVICES": "0,1"} and worker.env == {"CUDA_VISIBLE_DEVICES": "2,3",
                                                                          "VLLM_HOST_IP": "127.0.0.2"}
    assert "--head" in head.cmd and "--node-ip-address=127.0.0.1" in head.cmd and "--port=6400" in head.cmd
    assert "--address=127.0.0.1:6400" in worker.cmd and "--node-ip-address=127.0.0.2" in worker.cmd
    assert all("--num-gpus=2" in s.cmd and s.cmd[-1] == "--block" for s in p.starts)
    for flag in ("--dashboard-agent-listen-port=", "--min-worker-port=", "--max-worker-port="):
        assert len({next(a for a in s.cmd if a.startswith(flag)) for s in p.starts}) == 2, flag
    # The command runs on the head node, with its GPUs, and finds the cluster.
    assert p.env == {"RAY_ADDRESS": "127.0.0.1:6400", "CUDA_VISIBLE_DEVICES": "0,1"} and p.nodes == 2
    with pytest.raises(ValueError, match="need 4 GPUs"):
        plan_local(2, ["0", "1"], gpus_per_node=2)


def test_replicas_take_what_one_engine_takes_each():
    # vLLM asks for 256 at a time, the fast hf decode for 8 batches, plain generate for one batch.
    assert replicated_chunk_size(64, [256, 256], 2) == 512
    assert replicated_chunk_size(64, [512, 512], 2) == 1024
    assert replicated_chunk_size(64, [None, None], 2) == 128


def test_lazy_engine_loads_once_on_first_use_and_closes_once():
    events = []

    class Recorded(EngineBase):
        def close(self):
            events.append("close")

    def load():
        events.append("load")
        return Recorded()

    with LazyEngine(load, on_load=lambda e: events.append("warm")) as engine:
        assert not engine.loaded and events == []
        assert engine() is engine()
    assert events == ["load", "warm", "close"]
    with LazyEngine(load):  # nothing asked for it: nothing loaded, nothing closed
        pass
    assert events == ["load", "warm", "close"]
    plain = Recorded()  # capabilities an engine does not have read as absent
    assert plain.generate_each is None and plain.chunk_size is None and plain.data_parallel_size == 1


def test_vllm_engine_process_is_spawned_and_egm_main_is_import_safe(monkeypatch, tiny_dir):
    """On the H200 a predict job counted GPUs before building vLLM, and vLLM's forked engine
    process died ("Cannot re-initialize CUDA in forked subprocess"). The engine process is now
    spawned, and a spawned child imports `python -m egm`'s main module again, so that must not
    run the command line."""
    import runpy

    from egm.infer.backends.vllm import VLLMEngine

    seen = {}

    class MockLLMForCPU:  # vLLM cannot run on CPU CI: this records what the engine saw
        def __init__(self, **kwargs):
            seen["method"] = os.environ.get("VLLM_WORKER_MULTIPROC_METHOD")

    mock_vllm = types.ModuleType("vllm")
    mock_vllm.__spec__ = ModuleSpec("vllm", None)
    mock_vllm.LLM, mock_vllm.SamplingParams = MockLLMForCPU, lambda **kwargs: kwargs
    monkeypatch.setitem(sys.modules, "vllm", mock_vllm)
    monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)
    VLLMEngine(str(tiny_dir), PAPER)
    assert seen["method"] == "spawn"
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "fork")  # a user's own choice wins
    VLLMEngine(str(tiny_dir), PAPER)
    assert seen["method"] == "fork"

    import egm.cli

    monkeypatch.setattr(egm.cli, "main", lambda *a, **k: pytest.fail("main ran on import"))
    runpy.run_module("egm", run_name="__mp_main__")
    monkeypatch.setattr(egm.cli, "main", lambda *a, **k: 0)
    with pytest.raises(SystemExit):
        runpy.run_module("egm", run_name="__main__")


def test_replicas_answer_as_one_engine_does(tiny_dir, tmp_path):
    """Two replicas (on CPU here: the GPU ids only set CUDA_VISIBLE_DEVICES) ask for one engine's
    chunk each, get one engine's batches, and so give its answers, in request order."""
    from PIL import Image

    from egm.infer.backends.hf import HFEngine
    from egm.infer.backends.replicas import ReplicatedEngine

    requests = []
    for i in range(4):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (96, 96), (40 * i, 90, 200 - 30 * i)).save(path)
        requests.append(Request(str(i), str(path), PROMPTS["qwen3"].format(sent=f"the shape {i}")))
    sampling = SamplingOptions(max_tokens=6)
    alone = HFEngine(str(tiny_dir), sampling, batch_size=2).generate(requests)
    replicated = ReplicatedEngine(load_engine, "hf", str(tiny_dir), sampling, {"batch_size": 2}, [["0"], ["1"]])
    try:
        assert replicated.chunk_size == 4 and replicated.data_parallel_size == 2
        answers = replicated.generate(requests)
    finally:
        replicated.close()
    assert [a.text for a in answers] == [a.text for a in alone]
    assert [a.completion_tokens for a in answers] == [a.completion_tokens for a in alone]


class EngineWithItsOwnProcess(EngineBase):
    """Stands in for vLLM's LLM, which starts an engine process of its own when built."""

    name = "own-process"

    def __init__(self):
        import multiprocessing as mp

        child = mp.get_context("spawn").Process(target=os.getpid)
        child.start()
        child.join()
        self.child_exitcode = child.exitcode

    def generate(self, requests):
        return [Completion(f"{r.id}:{self.child_exitcode}", 1, 0.0) for r in requests]


def load_engine_with_its_own_process(backend, model_dir, sampling, options):
    return EngineWithItsOwnProcess()


def test_a_replica_may_start_processes_of_its_own():
    """On two H200s, vLLM replicas failed: a daemonic worker may not have children."""
    from egm.infer.backends.replicas import ReplicatedEngine

    engine = ReplicatedEngine(load_engine_with_its_own_process, "own-process", "m", SamplingOptions(),
                              {"batch_size": 1}, [["0"], ["1"]])
    try:
        answers = engine.generate([Request(str(i), "x.png", "p") for i in range(4)])
    finally:
        engine.close()
    assert [a.text for a in answers] == ["0:0", "1:0", "2:0", "3:0"]


# What this module's process had when it was imported: in a replica, before any worker code ran.
ENVIRONMENT_AT_IMPORT = {key: os.environ.get(key) for key in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")}


class EngineReportingItsStart(EngineBase):
    name = "start"

    def generate(self, requests):
        seen = f"{ENVIRONMENT_AT_IMPORT['CUDA_VISIBLE_DEVICES']}|{ENVIRONMENT_AT_IMPORT['OMP_NUM_THREADS']}"
        return [Completion(seen, 1, 0.0) for _ in requests]


def load_engine_reporting_its_start(backend, model_dir, sampling, options):
    return EngineReportingItsStart()


def test_a_replica_starts_with_its_gpus_and_its_share_of_the_cpus(monkeypatch):
    """On two H200s two hf replicas answered slower than one: a replica must see only its GPUs
    from its first instruction (a CUDA device count fixes them for good), and every replica's
    OpenMP pool taking every core starved them all."""
    from egm.infer.backends.replicas import ReplicatedEngine

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # as a job with two GPUs is started
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    engine = ReplicatedEngine(load_engine_reporting_its_start, "start", "m", SamplingOptions(), {"batch_size": 1},
                              [["0"], ["1"]])
    try:
        answers = engine.generate([Request(str(i), "x.png", "p") for i in range(2)])
    finally:
        engine.close()
    assert [a.text for a in answers] == ["0|4", "1|4"]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1" and "OMP_NUM_THREADS" not in os.environ  # restored


def test_local_ray_run_starts_every_node_runs_the_command_and_stops_them(tmp_path, monkeypatch):
    """The launcher's run path with `ray start` stood in for: each node's process gets its GPUs,
    the command runs once all have joined with the cluster's address, and every node is stopped."""
    from egm.infer.backends import ray_slurm

    marks = tmp_path / "nodes"
    marks.mkdir()
    fake_ray = tmp_path / "ray"
    fake_ray.write_text('#!/bin/sh\necho "$CUDA_VISIBLE_DEVICES ${VLLM_HOST_IP:-none} $2" > "$MARKS/$$"\n'
                        'trap \'echo stopped >> "$MARKS/$$"; exit 0\' TERM\nwhile true; do sleep 0.05; done\n')
    fake_ray.chmod(0o755)
    monkeypatch.setenv("MARKS", str(marks))
    monkeypatch.setattr(ray_slurm, "alive_nodes", lambda address: len(list(marks.iterdir())))
    seen = tmp_path / "command.txt"
    command = [sys.executable, "-c", "import os, sys; open(sys.argv[1], 'w').write("
               "os.environ['RAY_ADDRESS'] + ' ' + os.environ['CUDA_VISIBLE_DEVICES'])", str(seen)]
    p = plan_local(2, ["0", "1"], gpus_per_node=1, port=6411, ray=str(fake_ray))
    assert ray_slurm.run_on_cluster(p, command, timeout_s=30, head_start_s=0.2) == 0
    assert seen.read_text() == "127.0.0.1:6411 0"
    nodes = sorted(m.read_text().split("\n")[0] for m in marks.iterdir())
    assert nodes == ["0 none --head", "1 127.0.0.2 --address=127.0.0.1:6411"]
    assert all(m.read_text().strip().endswith("stopped") for m in marks.iterdir())
