"""The paper config runs the authors' evaluation protocol: their engine, server flags and request.

What "theirs" means, file and line (EGM-AReaL `examples/agrounding/evaluation/`, identical in
zgq1879/EGM `verl/scripts/`):
- sglang_infer.sh lines 12-19: `python -m sglang.launch_server --model-path M --host 0.0.0.0
  --port 30000 --nnodes 1 --node-rank 0 --dp-size 8 --tp-size 1 --dtype auto
  --mem-fraction-static 0.8`; lines 30-38: the client with `--max_tokens 4096 --concurrency 64
  --prompt_template qwen3 --box_remap scale`.
- vllm_infer.sh lines 12-20: `python -m vllm.entrypoints.openai.api_server --model M --host 0.0.0.0
  --trust-remote-code --port 8000 --data-parallel-size 8 --tensor-parallel-size 1 --dtype auto
  --gpu-memory-utilization 0.9`.
- sglang_infer.py lines 12-15 (the image as `data:image/jpeg;base64,...`), 100-117 (one user
  message: the image with detail "high", then the prompt; temperature 0.0, top_p 1.0,
  presence_penalty 0.0, max_tokens, and in extra_body top_k 20, repetition_penalty 1.0), line 197
  (the `qwen3` prompt).
Where we differ on purpose (host, port, no --trust-remote-code), egm/infer/backends/server.py says why.
"""

from __future__ import annotations

import base64
import json
import shlex
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from egm.infer.backends.client import OpenAIChatClient
from egm.infer.backends.server import server_command, server_spec
from egm.infer.base import Request
from egm.options import PredictOptions, SamplingOptions, parse_options
from tests.workflow_helpers import REPO, copy_workflow, run_snakemake

AUTHORS_MODELS = ("egm-8b", "egm-4b", "qwen3-vl-8b-thinking", "qwen3-vl-4b-thinking")
EIGHT_GPUS = [str(i) for i in range(8)]
# sglang_infer.py line 197.
PROMPT = "Locate the red mug on the left, output its bbox coordinates using JSON format"


def authors_flags(cmd: list[str]) -> tuple[str, dict[str, str]]:
    """A rendered `python -m MODULE --flag value ...` as (MODULE, flags), less the three flags the job
    sets on purpose and the authors' scripts set otherwise (host, port, served name: egm.infer.backends.server)."""
    assert cmd[1] == "-m" and len(cmd) % 2 == 1, cmd  # flags and values in pairs, nothing bare
    flags = dict(zip(cmd[3::2], cmd[4::2]))
    assert {"--host", "--port", "--served-model-name"} <= set(flags), cmd
    return cmd[2], {k: v for k, v in flags.items() if k not in ("--host", "--port", "--served-model-name")}


def planned_predict_jobs(tmp_path: Path) -> dict[str, dict]:
    """`snakemake -n --forceall -p` on config/config.yaml: each predict job's resources and options."""
    copy_workflow(tmp_path)
    result = run_snakemake(tmp_path, REPO / "config" / "config.yaml", "-n", "--forceall", "-p")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs, resources = {}, None
    for line in result.stdout.splitlines():
        if line.strip().startswith("resources:"):
            resources = dict(item.split("=", 1) for item in line.split(":", 1)[1].replace(" ", "").split(","))
        if line.startswith("Shell command: python -m egm predict"):
            words = shlex.split(line.removeprefix("Shell command: "))
            options = json.loads(words[words.index("--options") + 1])
            jobs[words[words.index("--model") + 1]] = {"resources": resources, "options": options}
    return jobs


def test_paper_config_answers_through_the_authors_sglang_server(tmp_path):
    jobs = planned_predict_jobs(tmp_path)
    for model in AUTHORS_MODELS:
        job = jobs[model]
        assert job["resources"]["gpu"] == "8", (model, job["resources"])
        options = parse_options(PredictOptions, job["options"])
        assert options.backend == "server" and options.engine_options["server"] == "sglang", model
        assert options.inference.batch_size == 64  # the requests in flight (sglang_infer.sh line 36)
        sampling = options.inference.sampling()
        assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.repetition_penalty,
                sampling.presence_penalty, sampling.max_tokens) == (0.0, 1.0, 20, 1.0, 0.0, 4096)
        assert options.prompt == "qwen3"

        # The server this job starts on its 8 GPUs, as ServerEngine builds it.
        engine_options = {k: v for k, v in options.engine_options.items() if k != "server"}
        cmd = server_command(server_spec("/models/m", "sglang", gpus=EIGHT_GPUS, port=30000, **engine_options))
        # Every flag that could change an answer, and no other (no context length, load format,
        # CUDA-graph switch): sglang_infer.sh lines 12-19.
        assert authors_flags(cmd) == ("sglang.launch_server", {
            "--model-path": "/models/m",  # line 13
            "--dp-size": "8",  # line 16
            "--tp-size": "1",  # line 17
            "--dtype": "auto",  # line 18
            "--mem-fraction-static": "0.8",  # line 19
        }), cmd
    # The 235B rows are ours (the authors published no set-up): one engine over the 8 GPUs.
    for model in ("qwen3-vl-235b-a22b-instruct", "qwen3-vl-235b-a22b-thinking"):
        options = jobs[model]["options"]
        assert options["backend"] == "server" and options["engine_options"] == {"server": "sglang",
                                                                                 "tensor_parallel_size": 8}
        cmd = server_command(server_spec("/m", gpus=EIGHT_GPUS, **options["engine_options"]))
        assert "--tp-size 8" in " ".join(cmd) and "--dp-size 1" in " ".join(cmd)


def test_vllm_server_is_one_key_away_with_the_authors_flags():
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    options = {**config["models"]["egm-8b"]["engine_options"], "server": "vllm"}
    cmd = server_command(server_spec("/models/m", gpus=EIGHT_GPUS, **options))
    # vllm_infer.sh lines 12-20; its line 15, --trust-remote-code, is left out: Qwen3-VL needs no remote code.
    assert authors_flags(cmd) == ("vllm.entrypoints.openai.api_server", {
        "--model": "/models/m",  # line 13
        "--data-parallel-size": "8",  # line 17
        "--tensor-parallel-size": "1",  # line 18
        "--dtype": "auto",  # line 19
        "--gpu-memory-utilization": "0.9",  # line 20
    }), cmd
    assert "--trust-remote-code" not in cmd


class RecordingServer(ThreadingHTTPServer):
    """A chat-completions endpoint of our own that keeps every request body and counts how many
    requests it holds at once (each answer waits a little, so the client's concurrency shows)."""

    daemon_threads = True
    request_queue_size = 256  # 64 connections open at once: the default backlog of 5 would reset some

    def __init__(self, hold_s: float):
        super().__init__(("127.0.0.1", 0), RecordingHandler)
        self.hold_s = hold_s
        self.bodies: list[dict] = []
        self.headers_seen: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()


class RecordingHandler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's name)
        server: RecordingServer = self.server  # type: ignore[assignment]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with server.lock:
            server.bodies.append(body)
            server.headers_seen.append(dict(self.headers))
            server.in_flight += 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
        time.sleep(server.hold_s)
        with server.lock:
            server.in_flight -= 1
        text = '{"bbox_2d": [10, 20, 30, 40]}'
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}],
                              "usage": {"completion_tokens": 7}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def recording_server():
    server = RecordingServer(hold_s=0.3)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_request_body_on_the_wire_is_the_authors(recording_server, tmp_path):
    from PIL import Image

    image = tmp_path / "coco.jpg"
    Image.new("RGB", (64, 48), "blue").save(image, format="JPEG")
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    sampling = SamplingOptions(**{k: config["inference"][k] for k in (
        "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "presence_penalty")})
    url = f"http://127.0.0.1:{recording_server.server_address[1]}/v1"
    client = OpenAIChatClient(url, "egm", sampling, concurrency=config["inference"]["batch_size"], api_key=None)
    requests = [Request(str(i), str(image), PROMPT) for i in range(160)]
    answers = {}
    client.run(requests, lambda i, c: answers.__setitem__(i, c))

    assert len(answers) == 160 and all(a.completion_tokens == 7 for a in answers.values())
    # 64 in flight (sglang_infer.sh line 36; sglang_infer.py line 189's semaphore), never more.
    assert recording_server.max_in_flight == 64
    data_url = "data:image/jpeg;base64," + base64.b64encode(image.read_bytes()).decode()  # sglang_infer.py l. 15
    expected = {
        "model": "egm",
        # sglang_infer.py lines 101-104 and 108: one user turn, no system prompt, image then text.
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url, "detail": "high"}},
            {"type": "text", "text": PROMPT},
        ]}],
        # Lines 109-116: the sampling fields; extra_body lands at the top level of the JSON.
        "temperature": 0.0, "top_p": 1.0, "presence_penalty": 0.0, "max_tokens": 4096,
        "top_k": 20, "repetition_penalty": 1.0,
    }
    assert all(body == expected for body in recording_server.bodies), recording_server.bodies[0]
    assert all(type(recording_server.bodies[0][k]) is type(v) for k, v in expected.items())


def test_every_line_is_a_sample_bad_ones_misses_each_reported(recording_server, tmp_path):
    """validate-split, predict (through the server backend, at the recording server) and score, as
    the rules run them, on a short refcoco_testB holding a repeated id, an unparseable line, a
    size mismatch, a missing image and a malformed box: scored over every line."""
    import subprocess
    import sys

    from PIL import Image

    from egm.report.tables import refcoco_table

    images = tmp_path / "images" / "coco"
    images.mkdir(parents=True)
    Image.new("RGB", (100, 100), "red").save(images / "a.jpg", format="JPEG")
    Image.new("RGB", (80, 100), "red").save(images / "narrow.jpg", format="JPEG")

    def record(**fields):
        # The recording server answers [10, 20, 30, 40] in 0-1000: [1, 2, 3, 4] px on a 100x100 image.
        return json.dumps({"id": "a", "image": "/coco/a.jpg", "sent": "the red one", "bbox": [1, 2, 3, 4],
                           "width": 100, "height": 100} | fields)

    lines = [
        record(),                                   # 1
        record(),                                   # 2: the same id again, a sample like any other
        '{"id": 3, "image": ',                      # 3: not JSON
        record(id=4, image="/coco/narrow.jpg"),     # 4: the image is 80x100, the record says 100x100
        record(id=5),                               # 5
        record(id=6, image="/coco/gone.jpg"),       # 6: no such image
        record(id=7, bbox=[5, 5, 5]),               # 7: a malformed box
    ]
    split = tmp_path / "refcoco_testB.jsonl"
    split.write_text("\n".join(lines) + "\n")
    bad_lines = {3: "malformed JSON", 4: "record says 100x100", 6: "file not found", 7: "bbox"}
    egm = [sys.executable, "-m", "egm"]

    def run(*args):
        result = subprocess.run([*egm, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        return result

    run("validate-split", str(split), "--image-root", str(tmp_path / "images"), "--out", "validation.json")
    report = json.loads((tmp_path / "validation.json").read_text())
    assert (report["valid"], report["bad"], report["lines"]) == (3, 4, 7)
    assert report["released_lines"] == 5095 and report["differs_from_release"]  # flagged, not refused
    assert {r["where"]: r["reason"] for r in report["bad_records"]}.keys() == {f"{split}:{n}" for n in bad_lines}
    for bad in report["bad_records"]:
        assert bad_lines[int(bad["where"].rsplit(":", 1)[1])] in bad["reason"], bad

    (tmp_path / "model.json").write_text(json.dumps({"files": []}))
    options = {"prompt": "qwen3", "backend": "server", "gpus": 0,
               "engine_options": {"url": f"http://127.0.0.1:{recording_server.server_address[1]}/v1",
                                  "model_name": "egm"},
               "inference": {"max_tokens": 64, "temperature": 0.0, "top_p": 1.0, "top_k": 20,
                             "repetition_penalty": 1.0, "presence_penalty": 0.0, "batch_size": 64, "limit": None}}
    run("predict", "--model-dir", str(tmp_path), "--model-manifest", "model.json", "--splits", str(split),
        "--image-root", str(tmp_path / "images"), "--out-dir", "pred", "--options", json.dumps(options))
    # Lines 1, 2 and 5, the only valid records, twice: once as the untimed warm-up, once answered.
    assert len(recording_server.bodies) == 6
    run("score", "pred/refcoco_testB.jsonl", "metrics.json", "--model", "m", "--split", "refcoco_testB",
        "--validation", "validation.json")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["n_records"], metrics["n_scored"], metrics["n_answered"], metrics["n_bad_records"]) == (7, 7, 3, 4)
    assert metrics["acc_at_0.5"] == 3 / 7 and metrics["mean_iou"] == 3 / 7  # the 3 answered are exact hits
    assert sorted(b["where"] for b in metrics["bad_records"]) == sorted(f"{split}:{n}" for n in bad_lines)
    assert metrics["released_lines"] == 5095 and metrics["differs_from_release"]
    notes = " ".join(refcoco_table([metrics], {"m": {"display": "M"}}, ["refcoco_testB"]).attrs["notes"])
    assert "RefCOCO testB 7 (released 5095)" in notes, notes


def test_each_row_carries_the_protocol_stamp(monkeypatch, tmp_path):
    """A predict job of the paper config on 8 GPUs stamps its provenance, and so its table row,
    with the engine, server or offline, data x tensor parallel and requests in flight."""
    from egm.provenance import FIELDS, flatten, job_record

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(EIGHT_GPUS))
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    options = {"backend": "server", "engine_options": config["models"]["egm-8b"]["engine_options"],
               "inference": config["inference"], "gpus": 8}
    job = job_record(options["backend"], options["engine_options"], config=options, device=False)
    assert job["engine"]["protocol"] == {"mode": "server", "data_parallel": 8, "tensor_parallel": 1, "in_flight": 64}
    row = flatten({"job": job})
    assert "protocol" in FIELDS and row["protocol"] == "server, dp 8 x tp 1, 64 in flight"
    assert row["engine"].startswith("server sglang")
    big = config["models"]["qwen3-vl-235b-a22b-instruct"]["engine_options"]
    stamp = flatten({"job": job_record("server", big, config=options, device=False)})["protocol"]
    assert stamp == "server, dp 1 x tp 8, 64 in flight"
    offline = flatten({"job": job_record("vllm", {}, config=options, device=False)})["protocol"]
    assert offline == "offline, dp 8 x tp 1, 64 in flight"
