"""The plan of the GPU smoke run (config/gpu-smoke.yaml) against a committed record of that run
(benchmarks/results/gpu-pipeline-*.json, written by gpu_pipeline.py from the run's own files).

That run predates `egm plan`, so this is the plan made afterwards for the card the record names,
with nothing of the run's own answers in it: a fresh copy of the workflow, whose offline mirror
holds split files of the size the record answered (its predict jobs' records / the splits), as the
real mirror did. Each model job of the record is put beside the plan's estimate of that job.

    python -m benchmarks.smoke_plan_check --record benchmarks/results/gpu-pipeline-h200.json \\
        --out benchmarks/results/gpu-plan-check-h200-pipeline.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import yaml

from benchmarks.common import REPO, fresh_copy
from egm.data.splits import EVAL_SPLITS
from egm.io import write_json
from egm.plan.gpus import find_gpu, load_gpus
from egm.plan.plan import check_per_rule, make_plan


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    record = json.loads(args.record.read_text())
    device = next(iter(record["runs"].values()))["device"]["name"]  # "1x NVIDIA H200 (143771 MiB)"
    card = find_gpu(device.split("x ", 1)[1].split(" (")[0], load_gpus())
    with tempfile.TemporaryDirectory() as tmp:
        workdir = fresh_copy(Path(tmp))
        config = yaml.safe_load((workdir / "config" / "gpu-smoke.yaml").read_text())
        predicted = [j for j in record["jobs"] if j["rule"] == "predict"]
        splits = config.get("splits", EVAL_SPLITS)  # the schema's default where the config has none
        per_split = predicted[0]["records"] // len(splits)
        folder = workdir / config["hub"]["mirror"] / config["dataset"]["repo_id"] / "metadata" / "eval"
        folder.mkdir(parents=True)
        for split in splits:
            (folder / f"{split}.jsonl").write_text("{}\n" * per_split)
        plan = make_plan([workdir / "config" / "gpu-smoke.yaml"], card, 1, None, workdir,
                         records_dir=REPO / "benchmarks" / "results")
    rows = []
    for job in plan["jobs"]:
        model = job["wildcards"].get("model")
        if job["rule"] not in ("predict", "latency", "scaling") or model is None:
            continue
        measured = [j for j in record["jobs"] if j["rule"] == job["rule"] and j.get("model") == model]
        est = job["estimate"]["wall_s"]
        wall = measured[0]["wall_s"] if measured else None
        rows.append({"job": job["job"], "rule": job["rule"], "gpus": job["gpus"], "estimated_wall_s": est,
                     "measured_wall_s": wall, "measured_from": f"{args.record.name}: jobs[] wall_s" if measured else None,
                     "error_pct": round(100 * (est - wall) / wall, 1) if est is not None and wall else None,
                     "unpriced": job["estimate"]["unpriced"], "drivers": job["estimate"]["drivers"],
                     "sources": job["estimate"]["sources"], "assumptions": job["estimate"]["assumptions"]})
    result = {"script": "benchmarks/smoke_plan_check.py", "record": args.record.name,
              "config": f"config/gpu-smoke.yaml (mirror splits of {per_split} records, as the record answered)",
              "plan": {"gpu": plan["gpu"], "n_gpus": 1}, "per_rule": check_per_rule(rows), "jobs": rows}
    write_json(args.out, result)
    for r in rows:
        print(f"{r['job']:40s} est {r['estimated_wall_s']} s  measured {r['measured_wall_s']} s  error {r['error_pct']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
