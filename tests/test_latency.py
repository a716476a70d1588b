"""The latency protocol (egm.infer.latency, `python -m egm latency`), its rule, the figure's use of
it, and a CPU smoke run of benchmarks/latency.py."""

import json
import math
import statistics
import subprocess
import sys
from collections import Counter

import pytest
from PIL import Image

from egm.cli import main as egm_main
from egm.infer.base import Completion, EngineBase, Request
from egm.infer.latency import answer_all, measure_latency, percentile, sample_records, summarize
from egm.io import sha256_json
from tests.workflow_helpers import REPO, copy_workflow, plan, stage_of


def test_percentiles_and_summary():
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 90) == pytest.approx(4.6)  # numpy's linear interpolation
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 5.0
    s = summarize([0.1, 0.2, 0.3, 0.4], [10, 20, 30, 40], wall_s=0.5)
    assert s["n"] == 4 and s["mean_ms"] == pytest.approx(250.0) and s["p50_ms"] == pytest.approx(250.0)
    assert s["tokens_per_s"] == pytest.approx(200.0) and s["requests_per_s"] == pytest.approx(8.0)
    assert s["mean_completion_tokens"] == 25.0
    assert math.isnan(summarize([], [], 0.0)["mean_ms"])


def test_sample_is_seeded_and_in_split_order():
    records = list(range(100))
    a, b = sample_records(records, 10, seed=0), sample_records(records, 10, seed=0)
    assert a == b == sorted(a) and len(set(a)) == 10
    assert sample_records(records, 10, seed=1) != a
    assert sample_records(records[:5], 10, seed=0) == records[:5]


class BatchEngine(EngineBase):
    def __init__(self):
        self.chunks = []

    def generate(self, requests):
        self.chunks.append(len(requests))
        return [Completion(text=r.id, completion_tokens=3, latency_s=0.01) for r in requests]


class StreamEngine(EngineBase):
    def __init__(self):
        self.concurrency = []

    def generate_each(self, requests, on_done, concurrency=None):
        self.concurrency.append(concurrency)
        for i, r in reversed(list(enumerate(requests))):  # out of order, as a server answers
            on_done(i, Completion(text=r.id, completion_tokens=2, latency_s=0.02))


def test_protocol_then_batch_one():
    requests = [Request(str(i), "x.png", "p") for i in range(10)]
    batch = BatchEngine()
    result = measure_latency(batch, requests, concurrency=4, batch1_n=3, warmup=2)
    # warm-up (2), protocol in chunks of the concurrency, then one at a time
    assert batch.chunks == [2, 4, 4, 2, 1, 1, 1]
    assert result["protocol"]["summary"]["n"] == 10 and result["batch1"]["summary"]["n"] == 3
    assert [r["id"] for r in result["protocol"]["requests"]] == [str(i) for i in range(10)]

    stream = StreamEngine()
    out, _ = answer_all(stream, requests, concurrency=64)
    assert [c.text for c in out] == [r.id for r in requests] and stream.concurrency == [64]
    measure_latency(stream, requests, concurrency=64, batch1_n=2, warmup=0)
    assert stream.concurrency == [64, 64, 1]


def test_latency_command_writes_the_protocol_file(tiny_dir, tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    lines = []
    for i in range(6):
        Image.new("RGB", (96, 96), (40 * i, 0, 0)).save(root / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "sent": f"shape {i}", "bbox": [1, 1, 9, 9], "width": 96, "height": 96}))
    split = tmp_path / "refcoco_val.jsonl"
    split.write_text("\n".join(lines) + "\n")
    options = {
        "prompt": "qwen3", "backend": "hf", "engine_options": {"data_parallel_size": 1},
        "inference": {"max_tokens": 4, "temperature": 0.0, "top_p": 1.0, "top_k": 20, "repetition_penalty": 1.0,
                      "presence_penalty": 0.0},
        "latency": {"split": "refcoco_val", "n": 4, "seed": 0, "concurrency": 2, "batch1_n": 2, "warmup": 1},
    }
    out = tmp_path / "latency" / "tiny.json"
    assert egm_main(["latency", "--model", "tiny", "--model-dir", str(tiny_dir), "--split", str(split),
                     "--image-root", str(root), "--options", json.dumps(options), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["model"] == "tiny" and result["split"] == "refcoco_val" and result["sample"]["n"] == 4
    assert result["device"]["name"].startswith(("CPU", "1x", "2x", "4x", "8x"))
    protocol = result["protocol"]
    assert protocol["concurrency"] == 2 and len(protocol["requests"]) == 4
    for key in ("mean_ms", "p50_ms", "p90_ms", "p99_ms", "tokens_per_s"):
        assert protocol["summary"][key] > 0
    assert result["mean_latency_ms"] == protocol["summary"]["mean_ms"]
    assert result["batch1"]["concurrency"] == 1 and len(result["batch1"]["requests"]) == 2
    # What the job cost (egm plan --check): every request's tokens, the wall time it took.
    requests = protocol["requests"] + result["batch1"]["requests"]
    assert result["cost"]["tokens_generated"] == sum(r["completion_tokens"] for r in requests) > 0
    assert result["cost"]["wall_s"] > 0
    job = result["provenance"]["job"]
    assert job["engine"] == {**job["engine"], "backend": "hf", "package": "transformers"} and job["engine"]["version"]
    assert job["config"] == options and job["config_sha256"] == sha256_json(options)


def test_figure_prefers_the_latency_files(monkeypatch, tmp_path):
    from matplotlib.figure import Figure

    from egm.report.tradeoff import latency_by_model, tradeoff_figure

    splits = ["refcoco_val"]
    metrics = [{"model": "m", "split": "refcoco_val", "acc_at_0.5": 0.9, "mean_iou": 0.8,
                "mean_completion_tokens": 50, "mean_latency_s": 2.0}]
    models = {"m": {"display": "M", "params_b": 8.0}}
    placed = []

    titles = []

    def capture(fig, *args, **kwargs):
        ax = fig.axes[0]
        placed.append([tuple(c.get_offsets()[0]) for c in ax.collections[1:]])
        titles.append(ax.get_title(loc="left"))

    monkeypatch.setattr(Figure, "savefig", capture)
    tradeoff_figure(metrics, models, tmp_path / "a", splits)
    latency = latency_by_model([{"model": "m", "mean_latency_ms": 737.0}])
    tradeoff_figure(metrics, models, tmp_path / "b", splits, latency=latency)
    assert placed[0][0] == pytest.approx((2000.0, 90.0))  # the predictions' mean latency
    assert placed[2][0] == pytest.approx((737.0, 90.0))  # the latency rule's, preferred
    assert "latency protocol run" not in titles[0] and "latency protocol run" in titles[2]  # says which


def test_paper_config_measures_every_model_and_the_figure_uses_it(tmp_path):
    copy_workflow(tmp_path)
    outputs = plan(tmp_path, targets=["figure_tradeoff"])
    stages = Counter(stage_of(p) for p in outputs)
    latency_files = sorted(p for p in outputs if p.startswith("results/latency/"))
    assert stages["latency"] == len(latency_files) >= 6
    assert "results/latency/egm-8b.json" in latency_files
    # The demo has no latency section: no latency jobs there.
    demo = plan(tmp_path, REPO / "config" / "demo.yaml", targets=["figure_tradeoff"])
    assert not any(p.startswith("results/latency/") for p in demo)


def test_benchmark_script_smoke(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.latency", "--tiny", "--out", str(out), "--tokens", "2,3",
         "--batches", "1", "--methods", "generate,graph,vllm,engine_egm,engine_vllm", "--reps", "1",
         "--generate-reps", "1"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    entry = data["models"]["tiny"]
    runs = entry["runs"]
    assert [(r["method"], r["batch"], r["new_tokens"]) for r in runs] == [
        ("generate", 1, 2), ("generate", 1, 3), ("graph", 1, 2), ("graph", 1, 3),
        ("engine_egm", 1, 2), ("engine_egm", 1, 3)]
    assert runs[3]["agreement_with_generate"] == 1.0
    # The engine path: built through load_engine, warmed up apart from the timed repetitions.
    assert "errors" not in entry and entry["engine_build_s"]["engine_egm"] > 0
    assert all(len(r["warmup_ms"]) == 2 and r["short_batches_retimed"] >= 0 for r in runs[4:])
    # Where egm's engine path spends a batch, as the engine itself timed it: every phase, and as
    # many decode steps as tokens (none stopped early), the phases before the completions adding up
    # to no more than the request's time.
    for r in runs[4:]:
        phases = r["engine_phases_ms"]
        assert list(phases) == ["load_images", "build_inputs", "to_device", "decode", "completions"]
        assert all(v > 0 for v in phases.values()) and r["decode_steps"] == [r["new_tokens"]]
        assert sum(phases.values()) - phases["completions"] <= r["ms_per_request"]
    # The engines' images are of a photo's JPEG size, not noise's; both decode times on record.
    assert entry["engine_jpeg_kb"]["engine_egm"] < data["jpeg_decode_ms"]["noise"]["jpeg_kb"]
    assert set(data["jpeg_decode_ms"]) == {"photo_like", "noise"}
    assert set(entry["split"]) == {"generate", "graph", "engine_egm"}
    # vLLM, the peer, runs on a GPU only; the record says it was left out instead of omitting it.
    assert data["skipped"] == ["vllm: needs a GPU", "engine_vllm: needs a GPU"]
    check_latency_record(data, methods=("generate", "graph", "engine_egm"))


def test_stop_cost_stops_where_the_last_row_meets_a_stop_id():
    """benchmarks.latency.stop_cost on the tiny model (CPU, where the host checks every step): the
    stop ids end the batch where the last row meets one, no later, and both timings are taken."""
    import torch

    from benchmarks import latency as bench
    from benchmarks.common import Requests, build_model, image_processor, make_image
    from egm.infer.fast.decoder import GraphDecoder

    model, ids = build_model("tiny", "cpu", torch.float32)
    make = Requests(image_processor(), make_image(64, 64), ids, 900, "cpu", torch.float32)
    cost = bench.stop_cost(GraphDecoder(model), make, 2, 128, 160, 12, "cpu", 1)
    assert 1 <= cost["tokens"] <= 7 and cost["steps_run"] == max(cost["tokens"], 2)
    assert cost["stopped_ms"] > 0 and cost["forced_ms"] > 0


def test_decode_floor_counts_what_a_step_reads():
    """The decode floor's bytes for the paper's 8B (untied) and 4B (tied), from their shapes."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    from benchmarks import latency as bench
    from benchmarks.common import build_config

    for arch, tied in (("qwen3-vl-8b", False), ("qwen3-vl-4b", True)):
        config, _ = build_config(arch)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device("meta"):
                model = Qwen3VLForConditionalGeneration(config)
        finally:
            torch.set_default_dtype(previous)
        text = config.text_config
        embedding = text.vocab_size * text.hidden_size * 2
        # Everything the language model holds, less the input table a step reads one row of.
        assert bench.decode_weight_bytes(model) == bench.llm_weight_bytes(model) - (0 if tied else embedding), arch
        assert bench.kv_bytes_per_position(model) == 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * 2
    # n steps over the weights, the cache growing from the prompt's length by one position a step.
    assert bench.decode_floor_s(100, 10, prompt=5, n=3, batch=2, bandwidth=1.0) == 3 * 100 + 2 * (5 + 6 + 7) * 10


def _is_ratio(ratio, ms, denominator_s):
    """ratio == ms / 1000 / denominator_s up to the record's rounding (ms to 0.01, ratios to 0.001)."""
    return (ms - 0.005) / 1000 / denominator_s - 5e-4 <= ratio <= (ms + 0.005) / 1000 / denominator_s + 5e-4


def check_latency_record(data, methods):
    """What a benchmarks/latency.py record says must follow from its own fields: every method at every
    batch size and length it names (unless listed as skipped), and each derived number recomputed."""
    assert data["benchmark"] == "benchmarks/latency.py" and data["device"]
    bandwidth = [b for b in data["bandwidth_Bps"] if not math.isnan(b)]
    assert data["bandwidth_best_Bps"] == (max(bandwidth) if bandwidth else None)
    flops = data.get("matmul_flops")
    assert data["models"]
    for name, entry in data["models"].items():
        grid = {(m, b, n) for m in methods for b in data["batches"] for n in data["new_tokens"]}
        got = [(r["method"], r["batch"], r["new_tokens"]) for r in entry["runs"]]
        assert len(got) == len(set(got)), name
        missing = grid - set(got)
        assert all(any(name in s and m in s for s in data["skipped"]) for m, _, _ in missing), (name, missing)
        assert set(got) <= grid, (name, set(got) - grid)
        for method, cells in entry.get("split", {}).items():  # records before the split have none
            for label, cell in cells.items():
                by_n = {r["new_tokens"]: r["ms_per_request"] for r in entry["runs"]
                        if r["method"] == method and f"batch {r['batch']}" == label}
                (n1, t1), (n2, t2) = min(by_n.items()), max(by_n.items())
                per_token = (t2 - t1) / (n2 - n1)
                assert cell["ms_per_token"] == pytest.approx(per_token, abs=6e-4), (name, method, label)
                assert cell["ms_before_first_step"] == pytest.approx(t1 - (n1 - 1) * per_token, abs=0.006), (name, method, label)
        for run in entry["runs"]:
            what = (name, run["method"], run["batch"], run["new_tokens"])
            batch, ms = run["batch"], run["ms_per_request"]
            assert ms > 0 and run["all_ms"], what
            assert ms == pytest.approx(statistics.median(run["all_ms"]), abs=0.011), what  # of the repetitions
            if "min_ms" in run:  # records before the spread was kept have only all_ms
                assert (run["min_ms"], run["max_ms"]) == (min(run["all_ms"]), max(run["all_ms"])), what
            assert run["ms_per_request_amortized"] == pytest.approx(ms / batch, abs=0.011), what
            # Derived from the unrounded median: within what rounding ms to 0.01 and the rate to 0.1 allows.
            tokens = batch * run["new_tokens"]
            low, high = tokens / (ms + 0.005) * 1000 - 0.05, tokens / (ms - 0.005) * 1000 + 0.05
            assert low <= run["tokens_per_s"] <= high, what
            if run["method"] in ("graph", "graph_compiled") and ("generate", batch, run["new_tokens"]) in got:
                assert 0.0 <= run["agreement_with_generate"] <= 1.0, what
            if not bandwidth:
                assert "floor_ms" not in run and "ratio_to_floor" not in run, what
                continue
            floor_s = entry["llm_weight_bytes"] * run["new_tokens"] / max(bandwidth)
            assert run["floor_ms"] == pytest.approx(1000 * floor_s, abs=0.006), what
            assert _is_ratio(run["ratio_to_floor"], ms, floor_s), what
            if "decode_weight_bytes" in entry:  # the decode floor: weights and the KV cache at each step's length
                decode_s = sum(entry["decode_weight_bytes"]
                               + batch * (entry["prompt_tokens"] + k) * entry["kv_bytes_per_position"]
                               for k in range(run["new_tokens"])) / max(bandwidth)
                assert run["decode_floor_ms"] == pytest.approx(1000 * decode_s, abs=0.006), what
                assert _is_ratio(run["ratio_to_decode_floor"], ms, decode_s), what
            if flops and not math.isnan(flops):
                prefill_s = 2 * batch * (entry["llm_parameters"] * entry["prompt_tokens"]
                                         + entry["vision_parameters"] * 4 * entry["visual_tokens"]) / flops
                assert run["floor_with_prefill_ms"] == pytest.approx(1000 * (floor_s + prefill_s), abs=0.006), what
                assert _is_ratio(run["ratio_to_floor_with_prefill"], ms, floor_s + prefill_s), what


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "benchmarks" / "results").glob("latency-*.json")))
def test_checked_in_latency_records_are_consistent(name):
    data = json.loads((REPO / "benchmarks" / "results" / name).read_text())
    methods = {r["method"] for entry in data["models"].values() for r in entry["runs"]}
    check_latency_record(data, methods=tuple(sorted(methods)))
    assert data["cuda"] and any(card in data["device"] for card in ("H100", "H200"))
    assert all("floor_ms" in r for entry in data["models"].values() for r in entry["runs"])
    if name == "latency-h100.json":  # issue 30: egm beside vLLM, both in-process and through the engines
        assert {"graph_compiled", "vllm", "engine_egm", "engine_vllm"} <= methods
    for card in ("h100", "h200"):  # a record named by its methods (fast_decode_gpu.sh's EGM_LATENCY_METHODS) holds them
        if name.startswith(f"latency-{card}-"):
            assert methods == set(name[len(f"latency-{card}-"):-len(".json")].split("-")), name
    if name == "latency-sizes-h100.json":  # what the plan prices the 2B and 4B from
        assert set(data["models"]) == {"qwen3-vl-2b", "qwen3-vl-4b", "qwen3-vl-8b"}