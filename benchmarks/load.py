"""Scoring and the RL parquet rewrite at full RefCOCO scale (issue: load).

Generates a synthetic prediction file of N records (60k by default, about the size of all 8
RefCOCO splits together) with realistic answers, and an RL parquet of N rows whose images
exist on disk, then times `python -m egm score` and `python -m egm rewrite-parquet` as the
pipeline runs them (separate processes, so peak memory is each command's own).

    python -m benchmarks.load --out benchmarks/results/load-<machine>.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def write_predictions(path: Path, n: int, rng: random.Random) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for line in range(1, n + 1):
            w, h = rng.choice([(640, 480), (480, 640), (640, 427)])
            x1, y1 = rng.randint(0, w // 2), rng.randint(0, h // 2)
            gt = [x1, y1, x1 + rng.randint(20, w // 2), y1 + rng.randint(20, h // 2)]
            grid = [round(v * 1000 / s) + rng.randint(-30, 30) for v, s in zip(gt, (w, h, w, h))]
            reasoning = "The person on the left wears a red shirt; the target is the leftmost person. " * 2
            answer = f'{reasoning}\n</think>\n\n```json\n[\n\t{{"bbox_2d": {grid}, "label": "person"}}\n]\n```'
            if line % 50 == 0:
                answer = "I cannot find it."
            row = {"split": "refcoco_val", "line": line, "id": str(line), "image": f"/data/coco/train2014/{line}.jpg",
                   "sent": "the person on the left", "bbox": gt, "width": w, "height": h, "status": "ok",
                   "error": None, "prompt": "Locate the person on the left, output its bbox coordinates using JSON format",
                   "answer": answer, "parsed_box": None, "pred_box": None, "iou": 0.0,
                   "completion_tokens": rng.randint(40, 140), "latency_s": rng.random()}
            handle.write(json.dumps(row) + "\n")


def write_rl_parquet(path: Path, image_root: Path, n: int) -> None:
    names = [f"coco{'_flip' if i % 2 else ''}/train2014/COCO_train2014_{i:012d}.jpg" for i in range(n)]
    for name in names:
        target = image_root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch()
    table = pa.table({
        "data_source": ["grounding"] * n,
        "images": [[f"data/{name}"] for name in names],
        "ability": ["grounding"] * n,
        "extra_info": [{"index": i, "question": "the person on the left"} for i in range(n)],
    })
    pq.write_table(table, path)


# Runs one command and prints its wall time and peak RSS. A child's peak RSS includes its
# parent's at fork time, so the fork must happen in this small process, not in the benchmark
# (which holds the generated tables).
_LAUNCHER = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
seconds = time.perf_counter() - start
print(json.dumps([seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))
"""


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and the command's own peak RSS in MiB."""
    out = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], check=True, capture_output=True, text=True).stdout
    seconds, peak_kib = json.loads(out)
    return seconds, peak_kib // 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=60_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        preds, rl = tmp / "preds.jsonl", tmp / "rl.parquet"
        write_predictions(preds, args.records, rng)
        write_rl_parquet(rl, tmp / "images", args.records)
        py = [sys.executable, "-m", "egm"]
        # Start-up (imports) is part of what a rule pays; measure it once to separate it out.
        startup = [timed(py + ["--help"])[0] for _ in range(args.repeats)]
        score = [timed(py + ["score", str(preds), str(tmp / "m.json"), "--model", "m", "--split", "s"]) for _ in range(args.repeats)]
        rewrite = [timed(py + ["rewrite-parquet", str(rl), str(tmp / "out.parquet"), "--image-root", str(tmp / "images")])
                   for _ in range(args.repeats)]
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "note": "the project's 2-core CPU development/CI machine"},
        "records": args.records,
        "repeats": args.repeats,
        "python_startup_s_median": statistics.median(startup),
        "score": {"seconds_median": statistics.median(s for s, _ in score),
                  "peak_rss_mib_max": max(m for _, m in score),
                  "records_per_s": args.records / statistics.median(s for s, _ in score)},
        "rewrite_parquet": {"seconds_median": statistics.median(s for s, _ in rewrite),
                            "peak_rss_mib_max": max(m for _, m in rewrite),
                            "rows_per_s": args.records / statistics.median(s for s, _ in rewrite)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
