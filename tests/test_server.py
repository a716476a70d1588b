"""Server mode against a real OpenAI-compatible server on loopback: `transformers serve` on CPU.

The tiny demo model is served as the paper's servers serve real checkpoints; the client sends
the paper's request (base64 image, detail "high", then the text) with bounded concurrency.
`transformers serve` needs the processor to load through AutoProcessor (Qwen3-VL's own wants a
video processor, i.e. torchvision): the test model dir ships an image-only processor with an
auto_map entry, which is remote code, so this self-made model alone is served with
--trust-remote-code. It answers one request at a time, which makes queueing visible.
"""

import json
import os
import shutil
import signal
import time

import httpx
import pytest
from PIL import Image, ImageDraw

from egm.data.splits import load_split
from egm.grounding import PROMPTS, build_prompt
from egm.infer.backends.client import ServerDied
from egm.infer.backends.hf import HFEngine
from egm.infer.base import EngineBase, Request
from egm.infer.engine import load_engine
from egm.infer.predict import predict_split, read_work_file
from egm.options import SamplingOptions

MAX_TOKENS = 6
PROCESSOR = '''
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """Qwen3-VL's processor without the video processor (which needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)
'''


@pytest.fixture(scope="module")
def served_dir(tiny_dir, tmp_path_factory):
    model = tmp_path_factory.mktemp("served") / "tiny-served"
    shutil.copytree(tiny_dir, model)
    (model / "image_only_processor.py").write_text(PROCESSOR)
    (model / "processor_config.json").write_text(json.dumps({
        "processor_class": "ImageOnlyQwen3VLProcessor",
        "auto_map": {"AutoProcessor": "image_only_processor.ImageOnlyQwen3VLProcessor"},
    }))
    return model


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("server-images")
    paths = []
    for i, colour in enumerate(["red", "blue", "green", "purple", "orange", "black"]):
        img = Image.new("RGB", (96, 96), "white")
        ImageDraw.Draw(img).rectangle((5 + 8 * i, 10, 50 + 6 * i, 60), fill=colour)
        path = root / f"{i}.png"
        img.save(path)
        paths.append(path)
    return paths


def start(model_dir, log_dir, concurrency):
    return load_engine("server", str(model_dir), SamplingOptions(max_tokens=MAX_TOKENS), {
        "server": "transformers", "device": "cpu", "trust_remote_code": True, "concurrency": concurrency,
        "log_dir": str(log_dir), "ready_timeout_s": 180,
    })


@pytest.fixture(scope="module")
def server(served_dir, tmp_path_factory):
    engine = start(served_dir, tmp_path_factory.mktemp("server-logs"), concurrency=3)
    yield engine
    engine.close()


class CountingTransport(httpx.AsyncBaseTransport):
    """Counts chat requests between sending and having the whole answer: in flight, seen from the wire."""

    def __init__(self):
        self.inner = httpx.AsyncHTTPTransport()
        self.now = self.peak = 0

    async def handle_async_request(self, request):
        counted = request.url.path.endswith("/chat/completions")
        self.now += counted
        self.peak = max(self.peak, self.now)
        try:
            response = await self.inner.handle_async_request(request)
            await response.aread()
            return response
        finally:
            self.now -= counted

    async def aclose(self):
        await self.inner.aclose()


def requests_for(images, n):
    sents = ["the red square", "the blue box on the left", "the green thing", "a purple shape", "orange", "the black one"]
    return [Request(str(i), str(images[i % len(images)]), PROMPTS["qwen3"].format(sent=sents[i % len(sents)]))
            for i in range(n)]


def test_concurrency_latency_and_tokens(server, images, tiny_dir):
    counting = CountingTransport()
    server.client.transport = counting
    requests = requests_for(images, 9)
    done = {}
    t0 = time.perf_counter()
    server.generate_each(requests, lambda i, c: done.__setitem__(i, c))
    wall = time.perf_counter() - t0
    server.client.transport = None

    assert sorted(done) == list(range(9))
    assert counting.peak == 3  # never more than the concurrency, and the server was kept busy
    for completion in done.values():
        assert completion.latency_s > 0
        assert 1 <= completion.completion_tokens <= MAX_TOKENS
    # The server answers one at a time: each latency includes waiting behind the others in flight.
    assert sum(c.latency_s for c in done.values()) > 1.5 * wall

    # The server saw the image: its greedy answers are the hf backend's, token for token.
    reference = HFEngine(str(tiny_dir), SamplingOptions(max_tokens=MAX_TOKENS), batch_size=3)
    try:
        expected = reference.generate(requests[:3])
    finally:
        reference.close()
    assert [done[i].text for i in range(3)] == [c.text for c in expected]
    assert [done[i].completion_tokens for i in range(3)] == [c.completion_tokens for c in expected]


def test_external_server_url(server, images):
    client = load_engine("server", "unused", SamplingOptions(max_tokens=MAX_TOKENS),
                         {"server": "transformers", "url": server.base_url, "concurrency": 2})
    try:
        assert client.server is None and client.model == server.model
        out = client.generate(requests_for(images, 2))
    finally:
        client.close()
    assert len(out) == 2 and all(c.completion_tokens >= 1 for c in out)


class KillAfter(EngineBase):
    """The engine, with its server killed (SIGKILL, no goodbye) once `n` answers are in."""

    def __init__(self, engine, n):
        self.engine, self.n, self.seen = engine, n, 0

    def generate_each(self, requests, on_done, concurrency=None):
        def counted(index, completion):
            on_done(index, completion)
            self.seen += 1
            if self.seen == self.n:
                os.killpg(self.engine.server.pid, signal.SIGKILL)

        self.engine.generate_each(requests, counted, concurrency)

    def close(self):
        self.engine.close()


def test_server_death_keeps_finished_records_and_resume_finishes(served_dir, server, images, tmp_path):
    lines = [json.dumps({"image": p.name, "sent": f"shape {i}", "bbox": [10, 10, 50, 50], "width": 96, "height": 96})
             for i, p in enumerate(images)]
    split_path = tmp_path / "refcoco_val.jsonl"
    split_path.write_text("\n".join(lines) + "\n")
    split = load_split(split_path, str(images[0].parent))
    out, work = tmp_path / "out" / "refcoco_val.jsonl", tmp_path / "out" / ".work" / "refcoco_val.k.jsonl"

    doomed = start(served_dir, tmp_path / "logs", concurrency=2)
    wrapped = KillAfter(doomed, 3)
    with pytest.raises(ServerDied) as err:
        predict_split(split, "refcoco_val", out, work, lambda: wrapped, "qwen3", batch_size=2)
    wrapped.close()
    message = str(err.value)
    assert "exited with code" in message and str(tmp_path / "logs") in message
    assert "requests had finished and were kept" in message
    assert list((tmp_path / "logs").glob("*.log")) and not list((tmp_path / "logs").glob("*.pid"))

    kept = read_work_file(work)
    assert len(kept) >= 3 and len(kept) < len(images)
    assert not out.exists()  # the split is not complete: no final file
    for row in kept.values():
        assert row["status"] == "ok" and row["completion_tokens"] >= 1 and row["latency_s"] > 0
        assert row["prompt"] == build_prompt("qwen3", row["sent"])

    # Resume with a live server: only the missing records are asked.
    summary = predict_split(split, "refcoco_val", out, work, lambda: server, "qwen3", batch_size=2)
    assert summary["newly_answered"] == len(images) - len(kept)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in rows] == list(range(1, len(images) + 1))
    assert all(r["status"] == "ok" for r in rows)
