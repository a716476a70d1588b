"""What one GPU run of the pipeline's own DAG did, read from that run's outputs.

Run in the work directory of a finished (or partly finished) Snakemake run of
config/gpu-smoke.yaml (benchmarks/gpu_pipeline.sh does both on the GPU machine):

    python -m benchmarks.gpu_pipeline --config config/gpu-smoke.yaml --out benchmarks/results/gpu-pipeline-h200.json

Nothing here is measured by this script: every number comes from a file the DAG's jobs wrote.
- jobs: every job Snakemake recorded (.snakemake/metadata: rule, start and end time per output),
  with the model, its backend, wall time, records answered, completion tokens and tokens/s
  (completion tokens over the job's whole wall time, engine start-up included);
- the engines' versions and the device, from the predict jobs' provenance (run.json);
- the latency jobs' summaries (p50/p90/p99 per mode) and every request's latency;
- the RefCOCO table's rows (results/tables/refcoco.csv);
- engine agreement: for each pair of models with the same checkpoint and different backends,
  the share of records with equal parsed boxes, and the records that differ.
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

import yaml

from benchmarks.agreement import engine_agreement
from egm.data.splits import EVAL_SPLITS
from egm.io import read_json, write_json
from egm.metrics import read_prediction_rows

MODEL_RULES = {"predict": "results/predictions/", "latency": "results/latency/", "scaling": "results/scaling/"}


def snakemake_jobs(root: Path) -> list[dict]:
    """One entry per recorded job: rule, outputs, start, end (Snakemake's metadata per output)."""
    jobs: dict[tuple, dict] = {}
    meta = root / ".snakemake" / "metadata"
    for path in sorted(meta.glob("*")) if meta.is_dir() else []:
        try:
            record = json.loads(path.read_text())
            output = base64.b64decode(path.name.replace("@", "/")).decode()
        except (ValueError, UnicodeDecodeError):
            continue
        if record.get("incomplete") or record.get("starttime") is None:
            continue
        # Each output carries its job's end time; start times differ by microseconds between them.
        key = (record["rule"], record.get("job_hash"), record["endtime"])
        job = jobs.setdefault(key, {"rule": record["rule"], "start": record["starttime"], "end": record["endtime"],
                                    "outputs": []})
        job["start"] = min(job["start"], record["starttime"])
        job["outputs"].append(output)
    return sorted(jobs.values(), key=lambda j: j["start"])


def _model_of(job: dict) -> str | None:
    prefix = MODEL_RULES.get(job["rule"])
    if prefix is None:
        return None
    for out in job["outputs"]:
        if out.startswith(prefix):
            return Path(out[len(prefix):]).parts[0].removesuffix(".json")
    return None


def _answers(job: dict, root: Path) -> tuple[int, int]:
    """(records answered, completion tokens) of a predict, scaling or latency job."""
    n = tokens = 0
    for out in job["outputs"]:
        path = root / out
        if not path.exists():
            continue
        if job["rule"] in ("predict", "scaling") and out.endswith(".jsonl"):
            rows = [r for r in read_prediction_rows(path) if r.get("status", "ok") == "ok"]
            n += len(rows)
            tokens += sum(int(r.get("completion_tokens") or 0) for r in rows)
        elif job["rule"] == "latency":
            data = read_json(path)
            for mode in ("protocol", "batch1"):
                requests = data.get(mode, {}).get("requests", [])
                n += len(requests)
                tokens += sum(int(r["completion_tokens"]) for r in requests)
    return n, tokens


def job_entry(job: dict, models: dict, latency: dict, root: Path) -> dict:
    model = _model_of(job)
    entry = {"rule": job["rule"], "wall_s": round(job["end"] - job["start"], 3), "outputs": len(job["outputs"])}
    if model is None:
        return entry
    spec = models.get(model, {})
    backend = spec.get("backend", "hf")
    options = spec.get("engine_options", {})
    if job["rule"] == "latency" and latency.get("backend"):
        backend = latency["backend"]
        options = {**options, **latency.get("engine_options", {})}
    records, tokens = _answers(job, root)
    entry.update(model=model, backend=backend, engine_options=options, records=records, completion_tokens=tokens,
                 tokens_per_s=round(tokens / entry["wall_s"], 1) if entry["wall_s"] > 0 else None)
    return entry


def latency_entry(path: Path) -> dict:
    data = read_json(path)
    out = {"model": data["model"], "backend": data["backend"], "engine_options": data["engine_options"],
           "data_parallel_size": data.get("data_parallel_size"), "device": data.get("device"),
           "sample": data.get("sample"), "max_tokens": data.get("max_tokens")}
    for mode in ("protocol", "batch1"):
        if mode in data:
            run = data[mode]
            out[mode] = {"concurrency": run["concurrency"], "summary": run["summary"],
                         "latency_ms": [round(1000 * r["latency_s"], 2) for r in run["requests"]],
                         "completion_tokens": [r["completion_tokens"] for r in run["requests"]]}
    return out


def package_versions(names) -> dict:
    from egm.provenance import package_version

    return {name: package_version(name) for name in names}


def engine_pairs(models: dict) -> list[tuple[str, str]]:
    """Pairs of model keys with the same checkpoint (repo and revision) and different backends.
    Random weights (`load_format: dummy`) are no checkpoint: each engine draws its own."""
    by_repo: dict[tuple, list[str]] = defaultdict(list)
    for key, spec in models.items():
        if spec.get("engine_options", {}).get("load_format") != "dummy":
            by_repo[(spec["repo_id"], spec.get("revision", "main"))].append(key)
    pairs = []
    for keys in by_repo.values():
        for i, a in enumerate(keys):
            for b in keys[i + 1:]:
                if models[a].get("backend", "hf") != models[b].get("backend", "hf"):
                    pairs.append((a, b))
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config/gpu-smoke.yaml")
    parser.add_argument("--root", default=".", help="the run's work directory")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    root = Path(args.root)
    config = yaml.safe_load(Path(args.config).read_text())
    # The schema's default where the config leaves `splits` out.
    models, splits = config["models"], config.get("splits", list(EVAL_SPLITS))
    latency = config.get("latency") or {}

    jobs = [job_entry(j, models, latency, root) for j in snakemake_jobs(root)]
    runs = {}
    for model in models:
        path = root / "results" / "predictions" / model / "run.json"
        if path.exists():
            job = read_json(path).get("job", {})
            runs[model] = {k: job.get(k) for k in ("engine", "device", "egm", "python")}
    agreement = {}
    for a, b in engine_pairs(models):
        dir_a, dir_b = root / "results" / "predictions" / a, root / "results" / "predictions" / b
        if all((d / f"{s}.jsonl").exists() for d in (dir_a, dir_b) for s in splits):
            agreement[f"{a} vs {b}"] = engine_agreement(dir_a, dir_b, splits)
    table = root / "results" / "tables" / "refcoco.csv"
    rows = []
    if table.exists():
        with open(table, newline="") as handle:
            rows = list(csv.DictReader(handle))
    result = {
        "config": args.config,
        # The environment this script runs in: the one the jobs ran in (benchmarks/gpu_pipeline.sh).
        "versions": package_versions(("vllm", "torch", "transformers", "snakemake", "sglang")),
        "runs": runs,
        "jobs": jobs,
        "latency": [latency_entry(p) for p in sorted((root / "results" / "latency").glob("*.json"))],
        "refcoco_table": [{k: v for k, v in row.items() if not k.startswith("provenance")} for row in rows],
        "agreement": agreement,
        "missing": [f"results/predictions/{m}" for m in models if m not in runs],
    }
    write_json(args.out, result)
    for job in jobs:
        if "model" in job:
            print(f"{job['rule']:8s} {job['model']:20s} {job['backend']:7s} {job['wall_s']:8.1f} s "
                  f"{job['records']:5d} records {job['tokens_per_s'] or 0:9.1f} tok/s")
    for name, agree in agreement.items():
        print(f"agreement {name}: {agree['equal_boxes']}/{agree['records']} equal boxes")
    for lat in result["latency"]:
        for mode in ("protocol", "batch1"):
            if mode in lat:
                s = lat[mode]["summary"]
                print(f"latency {lat['model']} {mode}: p50 {s['p50_ms']:.1f} p90 {s['p90_ms']:.1f} p99 {s['p99_ms']:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
