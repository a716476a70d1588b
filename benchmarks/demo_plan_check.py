"""The demo's plan against its own run on this CPU, per job and per rule (issue 29).

In a fresh copy of the workflow: `egm plan` of the demo config (a shortened demo: fewer images,
records and training steps, so one run takes minutes on two cores), then the run itself through
Snakemake, then `egm plan --check` of the plan made before the run. Written to --out:

    python -m benchmarks.demo_plan_check --out benchmarks/results/demo-plan-check-cpu.json

Every number comes from the plan or from the files the run wrote (Snakemake's benchmark files
and its .snakemake metadata); the machine's load average is recorded beside them, since the
measured wall times on a shared machine include waiting for a core.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.common import REPO, fresh_copy
from egm.io import write_json
from egm.plan.plan import check, check_per_rule, make_plan, markdown


def short_demo() -> dict:
    """config/demo.yaml with the demo's stages all present and each one short."""
    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    config["demo"].update(n_train_images=32, n_eval_per_split=8)
    config["inference"].update(max_tokens=64, batch_size=8)
    for run in config["train"]["runs"].values():
        run["sft"].update(max_steps=10, limit=64)
        run["rl"].update(max_steps=2, limit=8, overrides={"group_size": 2, "prompts_per_step": 4,
                                                          "micro_batch_size": 8, "max_new_tokens": 16})
    config["scaling"] = {"budgets": [0, 8, "unlimited"], "answer_max_tokens": 32, "n_per_split": 2, "seed": 0}
    return config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--cores", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = fresh_copy(Path(tmp))
        config = short_demo()
        configfile = workdir / "config" / "demo-short.yaml"
        configfile.write_text(yaml.safe_dump(config, sort_keys=False))
        plan = make_plan([configfile], "H100", 1, None, workdir, records_dir=REPO / "benchmarks" / "results")
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        load_before = os.getloadavg()
        start = time.monotonic()
        run = subprocess.run(["snakemake", "--cores", str(args.cores), "--configfile", str(configfile)],
                             cwd=workdir, env=env, capture_output=True, text=True)
        wall = time.monotonic() - start
        if run.returncode != 0:
            sys.stderr.write(run.stderr[-4000:])
            return run.returncode
        rows = check(plan, workdir)
    result = {
        "script": "benchmarks/demo_plan_check.py",
        "machine": {"cpu_count": os.cpu_count(), "cores_used": args.cores,
                    "load_average_1_5_15_before": [round(x, 2) for x in load_before],
                    "load_average_1_5_15_after": [round(x, 2) for x in os.getloadavg()]},
        "config": "config/demo.yaml, shortened (short_demo() in the script)",
        "run_wall_s": round(wall, 1),
        "plan": {"gpu": plan["gpu"], "n_gpus": plan["n_gpus"], "total": plan["total"]},
        "per_rule": check_per_rule(rows),
        "jobs": rows,
    }
    write_json(args.out, result)
    if args.markdown:
        args.markdown.write_text(markdown({**plan, "check": rows}, rows))
    for rule, row in result["per_rule"].items():
        print(f"{rule:24s} {row['jobs']:3d} jobs  estimated {row['estimated_s']}  measured {row['measured_s']} s"
              f"  error {row['error_pct']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
