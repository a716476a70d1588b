"""benchmarks/projection.py: the latency split, the prediction formula, the fit check, and the
comparison with another GPU's record, on hand-made records whose answers are known."""

import json
import subprocess
import sys

import pytest

from benchmarks import projection
from tests.workflow_helpers import REPO

GPUS = {
    "Base": {"memory_gb": 80, "bandwidth_tbps": 2.0, "bf16_dense_tflops": 100.0, "record_device": "Base card", "source": "s"},
    "Fast": {"memory_gb": 24, "bandwidth_tbps": 4.0, "bf16_dense_tflops": 400.0, "record_device": "Fast card", "source": "s"},
}


def record(device: str, runs: dict, parameters: float = 8e9, llm_parameters: float = 7e9) -> dict:
    """A latency.py record with graph_compiled runs at batch 1: {arch: {tokens: ms}}."""
    return {"device": device, "models": {
        arch: {"parameters": parameters, "llm_parameters": llm_parameters,
               "runs": [{"method": "graph_compiled", "batch": 1, "new_tokens": n, "ms_per_request": ms}
                        for n, ms in cells.items()]
               + [{"method": "graph_compiled", "batch": 64, "new_tokens": 42, "ms_per_request": 1e6}]}
        for arch, cells in runs.items()}}


def test_costs_split_into_fixed_and_per_token():
    costs = projection.split_costs(record("Base card", {"qwen3-vl-8b": {42: 142.0, 101: 260.0}}), "graph_compiled")
    c = costs["qwen3-vl-8b"]
    assert c["per_token_ms"] == pytest.approx(2.0) and c["fixed_ms"] == pytest.approx(58.0)
    with pytest.raises(ValueError, match="two token counts"):
        projection.split_costs(record("Base card", {"qwen3-vl-8b": {42: 142.0}}), "graph_compiled")


def test_fixed_part_scales_with_compute_and_decode_with_bandwidth():
    costs = {"fixed_ms": 60.0, "per_token_ms": 2.0}
    # 4x the throughput: 60 -> 15 ms; 2x the bandwidth: 2 -> 1 ms a token.
    assert projection.predict_ms(costs, GPUS["Base"], GPUS["Fast"], 100) == pytest.approx(15.0 + 100.0)
    assert projection.predict_ms(costs, GPUS["Base"], GPUS["Base"], 100, scale=3.0) == pytest.approx(3 * 260.0)


def test_fit_uses_bf16_weights_with_headroom():
    assert projection.fits(8.77e9, {"memory_gb": 24})  # 21.0 GB
    assert not projection.fits(10.5e9, {"memory_gb": 24})  # 25.2 GB
    assert not projection.fits(235e9, {"memory_gb": 141})


def test_projection_reproduces_the_base_and_marks_what_does_not_fit():
    base = record("Base card 80GB", {"qwen3-vl-8b": {42: 142.0, 101: 260.0}})
    result = projection.project(base, GPUS, "graph_compiled")
    assert result["base"]["gpu"] == "Base"
    by = {(p["gpu"], p["model"]): p for p in result["predictions"]}
    # On the base card the two measured cells come back exactly.
    assert by[("Base", "EGM-8B")]["latency_ms"] == by[("Base", "EGM-8B")]["measured_ms"] == 260.0
    assert by[("Base", "Qwen3-VL-8B-Instruct")]["latency_ms"] == 142.0
    assert by[("Fast", "EGM-8B")]["latency_ms"] == pytest.approx(58.0 / 4 + 101 * 1.0, abs=0.05)
    assert by[("Fast", "EGM-8B")]["measured_ms"] is None
    big = by[("Base", "Qwen3-VL-235B-A22B-Instruct")]
    assert big["extrapolated"] and not big["fits"] and big["latency_ms"] is None
    assert by[("Base", "EGM-8B")]["egm"] and by[("Base", "EGM-8B")]["avg_acc"] == 91.4
    # No 4B in the record: no 4B predictions.
    assert not any(p["architecture"] == "qwen3-vl-4b" for p in result["predictions"])
    with pytest.raises(ValueError, match="Other card"):
        projection.project(record("Other card", {"qwen3-vl-8b": {42: 1.0, 101: 2.0}}), GPUS, "graph_compiled")


def test_check_states_the_error_against_another_cards_record():
    result = projection.project(record("Base card", {"qwen3-vl-8b": {42: 142.0, 101: 260.0}}), GPUS, "graph_compiled")
    # Predicted on Fast: 14.5 + n; measured 10 % slower at 42 tokens, exact at 101.
    other = record("Fast card", {"qwen3-vl-8b": {42: (14.5 + 42) * 1.1, 101: 14.5 + 101}})
    rows = projection.check(result, other, GPUS, "graph_compiled")
    assert [(r["gpu"], r["tokens"], r["error_pct"]) for r in rows] == [("Fast", 42, -9.1), ("Fast", 101, 0.0)]


def test_shipped_gpu_table_and_the_command(tmp_path):
    gpus = projection.load_gpus()
    for name in ("H100 SXM", "H200 SXM", "A100 80GB SXM", "L40S", "RTX 4090", "Jetson AGX Orin 64GB"):
        assert gpus[name]["source"] and gpus[name]["bandwidth_tbps"] > 0, name
    base = tmp_path / "base.json"
    base.write_text(json.dumps(record("NVIDIA H100 80GB HBM3", {"qwen3-vl-8b": {42: 350.0, 101: 760.0}})))
    out = tmp_path / "projection.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks.projection", "--base", str(base),
                             "--out", str(out)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["base"]["gpu"] == "H100 SXM" and data["check"] == []
    assert len(data["predictions"]) == 3 * len(gpus)  # EGM-8B, 8B-Instruct, 235B on every card
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.with_suffix(".pdf").read_bytes()[:4] == b"%PDF"
