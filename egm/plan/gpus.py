"""The cards' published figures (gpus.json beside this file) and the latency split of a measured
record into a fixed and a per-token part, scaled to another card by those figures.

A decode step reads the weights (memory-bound); the work before it (preprocessing, vision tower,
prompt pass) is matrix work (compute-bound). So from a record measured on card `base`, on card G

    T_G(n) = fixed x F_base / F_G + n x per_token x B_base / B_G

with B the memory bandwidth and F the dense bf16 throughput. benchmarks/projection.py draws the
batch-1 trade-off with these; `egm plan` prices jobs with them.
"""

from __future__ import annotations

import json
from pathlib import Path

GPUS_FILE = Path(__file__).with_name("gpus.json")
HEADROOM = 1.2  # weights x this must fit the card's memory
BF16_BYTES = 2
ACTIVE_235B = 22e9  # active parameters of Qwen3-VL-235B-A22B per token (its name)
TOTAL_235B = 235e9


def load_gpus(path: Path = GPUS_FILE) -> dict:
    gpus = json.loads(Path(path).read_text())["gpus"]
    for name, spec in gpus.items():
        missing = {"memory_gb", "bandwidth_tbps", "bf16_dense_tflops", "source"} - set(spec)
        if missing:
            raise ValueError(f"{path}: GPU {name!r} lacks {sorted(missing)}")
    return gpus


def gpu_of(record: dict, gpus: dict) -> str:
    """The gpus.json row of a record's device (its `record_device` is a prefix of the name)."""
    device = record["device"]
    for name, spec in gpus.items():
        if device.startswith(spec.get("record_device", name)):
            return name
    raise ValueError(f"no GPU in {GPUS_FILE.name} matches the record's device {device!r}")


def find_gpu(name: str, gpus: dict) -> str:
    """The gpus.json row a user means by `name` ("H100", "a100", "H200 SXM"): the one row whose
    name starts with it, case aside; or a device name as the driver reports it ("NVIDIA H100
    80GB HBM3"), which starts with the row's `record_device`."""
    hits = [row for row in gpus if row.lower() == name.lower()] or [
        row for row in gpus if row.lower().startswith(name.lower())] or [
        row for row in gpus if name.startswith(gpus[row].get("record_device", row))]
    if len(hits) != 1:
        raise ValueError(f"GPU {name!r} names {len(hits)} rows of {GPUS_FILE.name}; one of: {sorted(gpus)}")
    return hits[0]


def run_gpu(workdir: Path, gpus: dict) -> tuple[str, str] | None:
    """(gpus.json row, the record naming it) of the first GPU a finished run's predictions ran on
    (their run.json's device, e.g. "NVIDIA H100 80GB HBM3 (81559 MiB)"); None for a CPU run."""
    for record in sorted(Path(workdir).glob("results/predictions/*/run.json")):
        names = json.loads(record.read_text()).get("job", {}).get("device", {}).get("gpus") or []
        if names:
            return find_gpu(names[0].split(" (")[0], gpus), str(record.relative_to(workdir))
    return None


def split_costs(record: dict, method: str, batch: int = 1) -> dict:
    """Per measured architecture: fixed (ms), per_token (ms), the token counts and medians used,
    for `method` at `batch` requests at once (ms per request, every request of the batch)."""
    out = {}
    for arch, entry in record["models"].items():
        runs = {r["new_tokens"]: r["ms_per_request"] for r in entry["runs"]
                if r["method"] == method and r["batch"] == batch}
        if len(runs) < 2:
            continue
        n1, n2 = min(runs), max(runs)
        per_token = (runs[n2] - runs[n1]) / (n2 - n1)
        out[arch] = {"fixed_ms": runs[n1] - n1 * per_token, "per_token_ms": per_token, "measured_ms": runs,
                     "parameters": entry["parameters"], "llm_parameters": entry["llm_parameters"]}
    if not out and batch == 1:
        raise ValueError(f"the record has no {method} runs at batch 1 with two token counts")
    return out


def predict_ms(costs: dict, base: dict, gpu: dict, tokens: float, scale: float = 1.0) -> float:
    """T_G(n) of the module docstring; `scale` multiplies both parts (a bigger model's work)."""
    fixed = costs["fixed_ms"] * base["bf16_dense_tflops"] / gpu["bf16_dense_tflops"]
    decode = tokens * costs["per_token_ms"] * base["bandwidth_tbps"] / gpu["bandwidth_tbps"]
    return scale * (fixed + decode)


def fits(parameters: float, gpu: dict) -> bool:
    return parameters * BF16_BYTES * HEADROOM <= gpu["memory_gb"] * 1e9
