"""The paper reproduction's price (config/config.yaml) on several GPU set-ups, written as
docs/cost.md and its record, by `egm plan` itself (egm.plan) on a fresh copy of the workflow:
nothing fetched, nothing run, so the price is that of a new machine.

    python -m benchmarks.paper_cost --out benchmarks/results/paper-cost.json --doc docs/cost.md

The RL stage has no step count before its data is fetched (the step count follows the RL
parquet's rows); it is priced per 100 steps by planning the same config with `max_steps: 100`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import yaml

from benchmarks.common import REPO, fresh_copy
from egm.io import atomic_write, write_json
from egm.plan.cost import GPU_RULES
from egm.plan.plan import make_plan

SETUPS = (("H100", 1), ("H100", 8), ("H200", 8), ("A100", 8))
RL_STEPS = 100


def rl_priced(config_path: Path, dest: Path) -> Path:
    config = yaml.safe_load(config_path.read_text())
    for run in config["train"]["runs"].values():
        run["rl"]["max_steps"] = RL_STEPS
    out = dest / "config" / "paper-rl-100.yaml"
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def summarise(plan: dict) -> dict:
    per_rule = {rule: s["gpu_hours"] for rule, s in plan["per_rule"].items() if s["gpu_jobs"]}
    return {"gpu": plan["gpu"], "n_gpus": plan["n_gpus"], "total": plan["total"], "per_rule_gpu_hours": per_rule,
            "jobs": [{"job": j["job"], "gpus": j["gpus"], "gpu_hours": None if j["estimate"]["gpu_seconds"] is None
                      else round(j["estimate"]["gpu_seconds"] / 3600, 3), "memory": j["estimate"]["memory"],
                      "drivers": j["estimate"]["drivers"],
                      "unpriced": j["estimate"]["unpriced"]} for j in plan["jobs"] if j["gpus"]]}


def rl_job(plan: dict) -> dict:
    return next(j for j in plan["jobs"] if j["rule"] == "rl")


def document(result: dict) -> str:
    rows = result["setups"]
    base = rows[1]  # 8 x H100
    rules = sorted({r for s in rows for r in s["per_rule_gpu_hours"]})
    total = base["total"]["gpu_hours"]
    top = sorted(base["per_rule_gpu_hours"].items(), key=lambda kv: -kv[1])
    jobs = {j["job"]: j for j in base["jobs"]}
    big = next(j for name, j in jobs.items() if name.startswith("predict model=qwen3-vl-235b"))
    records = next(j["drivers"]["records"] for name, j in jobs.items() if name.startswith("predict"))
    one = {j["job"]: j for j in rows[0]["jobs"]}
    big_one = next(j for name, j in one.items() if name.startswith("predict model=qwen3-vl-235b"))
    sft_one = next(j for name, j in one.items() if name.startswith("sft"))
    lines = [
        "# What the paper reproduction costs",
        "",
        "Written by `benchmarks/paper_cost.py` (record: `benchmarks/results/paper-cost.json`) through",
        "`egm plan` (egm/plan/): every job Snakemake plans for `config/config.yaml` on a fresh machine,",
        "priced from the committed measurement records in `benchmarks/results/` and scaled to each card",
        "by its published bandwidth and bf16 throughput (`egm/plan/gpus.json`). Run `make plan` for the",
        "full table per job with every estimate's source; `make plan PLAN_CONFIG=... PLAN_GPU=... PLAN_GPUS=...`",
        "for another set-up.",
        "",
        "## The price per GPU set-up",
        "",
        "| set-up | GPU-hours (priced jobs) | wall time (h) | GPU jobs without an estimate | "
        "does not fit on the GPUs it gets | RL, per 100 steps (GPU-hours) |",
        "|---|---|---|---|---|---|",
    ]
    for s, rl in zip(rows, result["rl_per_100_steps"]):
        lines.append(f"| {s['n_gpus']} x {s['gpu']} | {s['total']['gpu_hours']} | {s['total']['wall_h']} | "
                     f"{', '.join(s['total']['unpriced_gpu_jobs']) or '-'} | "
                     f"{', '.join(s['total']['does_not_fit']) or '-'} | {rl['gpu_hours']} |")
    lines += ["", "GPU-hours per rule:", "", "| rule | " + " | ".join(f"{s['n_gpus']} x {s['gpu']}" for s in rows) + " |",
              "|---|" + "---|" * len(rows)]
    for rule in rules:
        lines.append(f"| {rule} | " + " | ".join(str(s["per_rule_gpu_hours"].get(rule, "-")) for s in rows) + " |")
    lines += [
        "",
        "## What dominates the bill",
        "",
        f"On 8 x H100 the priced jobs come to {total} GPU-hours; by rule: "
        + ", ".join(f"{rule} {h} ({100 * h / total:.0f} %)" for rule, h in top if total) + ".",
        f"SFT of the 8B on about 570k samples is most of it. RL is not in that total: its steps follow the",
        f"RL parquet's rows, unknown before the data is fetched; at the verl recipe's 256 prompts x 16",
        f"samples a step it costs about {result['rl_per_100_steps'][1]['gpu_hours']} GPU-hours per 100 steps on",
        "8 x H100 (priced from GRPO steps with transformers' generate rollouts: vLLM rollouts, as the",
        f"recipe uses, would be cheaper). Evaluation (predict over {records:,} records per model, the latency",
        "protocol, the scaling sweep) is a few GPU-hours in all.",
        "",
        "Memory: on 8 cards of 80 GB every model fits as configured (the 235B with tensor parallel 8:",
        f"about {big['memory']['per_gpu_gb']} GB a card with the KV cache of 64 requests). On one 80 GB card the 235B",
        f"does not ({big_one['memory']['per_gpu_gb']} GB: {big_one['memory']['smallest_tensor_parallel']} cards at least), "
        "nor does ZeRO-3 SFT of the 8B",
        f"(16 bytes a parameter: {sft_one['memory']['per_gpu_gb']} GB, {sft_one['memory']['smallest_zero3_gpus']} cards "
        "at least); the table's 1 x H100 column prices the work, not a run that could",
        "happen there. On 24 GB cards the 235B would need more (`make plan PLAN_GPU='RTX 4090'`).",
        "",
        "## What the authors state about their compute",
        "",
        "- SFT: DeepSpeed ZeRO-3 on 8 GPUs, global batch 128 (8 GPUs x 8 x 2 accumulation), about 4450",
        "  steps (about 570k samples with flips). The card is not named.",
        "- RL: 8 GPUs (AReaL: 2 for SGLang rollouts + 6 for FSDP training; verl: 8 shared by vLLM",
        "  rollouts and training). Neither the card nor the run's length in hours is stated.",
        "- Latency: 64 requests in flight; the hardware is not stated.",
        "",
        "So nothing here can be checked against a stated GPU-hour figure: the paper gives none.",
        "",
        "## What the estimates rest on, and what they miss",
        "",
        "- Inference (predict, scaling, latency): the latency records' batch-64 runs (64 requests at once,",
        "  the nearest measured regime to the protocol's 64 in flight), split into a fixed and a",
        "  per-token part per request; vLLM's where measured (8B, H200), else egm's compiled decode.",
        "  Tokens per answer: the paper's (EGM-8B 101; the 8B and 235B without EGM 42, a figure the paper",
        "  gives without naming the variant: the Thinking models likely write more, the paper's latency",
        "  figure has the 8B-Thinking at 1.27 s against the 8B-Instruct's 0.41 s) else marked assumed.",
        "  The 235B is the 8B's measurement times active parameters (22e9 / 7.57e9), split evenly over",
        "  tensor parallel 8 (optimistic: no communication cost).",
        "- SFT: `train-h100.json`'s mean step (2B architecture, random weights, 8 samples of about 203",
        "  tokens), per sample and parameter, scaled by bf16 throughput; perfect scaling over 8 GPUs is",
        "  assumed, although `multigpu-h200x2.json` measured ZeRO-3 on two GPUs at "
        f"{result['zero3_two_gpu_speedup']}x one GPU's",
        "  steps: the SFT figure is a floor, not a ceiling.",
        "- An hf job's engine load is the record's model build plus its compiled method's largest",
        "  warm-up there (compile and capture: 0.7 + 8.6 s for the 8B on the H100), and a predict job",
        "  pays one batch more, the one it answers untimed before the timed ones. Both were added after",
        "  the H100 check below (`gpu-plan-check-h100.json`, planned on the machine with the model",
        "  before them), whose hf job was 44 % low: it loaded its engine in 19.9 s against the 1 s",
        "  priced then, and warmed up for 3.6 s (`logs/predict/qwen3-vl-8b-hf.log` in the run).",
        "- Not modelled, and where the checks below miss by more than the 30 % aimed at: egm's hf",
        "  backend's model load from disk (the latency records build random weights in memory, under a",
        "  second) and the rest of its engine load beyond the record's warm-up (19.9 s measured against",
        "  9.3 s priced for the 8B on the H100); and the image size: a batch's fixed cost comes from the",
        "  640x480 image of the latency records, so the smoke runs' small demo images answer faster than",
        "  priced (the H100 run: 8 batches of 64 at 192 tokens in 1.88 s each against about 2.97 s). The",
        "  paper's COCO images are about 640x480, so for the paper config the answering part holds and",
        "  the load is what is missing: about 10 s a job, well under 1 % of a paper-size predict job.",
        "  Models without a latency record of their size (the tiny demo model on any device; CPU model",
        "  jobs) get no estimate;",
        "  a job's process start, its imports (torch, transformers) and its model load: seconds that are",
        "  most of a small CPU job's wall time, so on the demo the plan is low, the more so the shorter",
        "  the job (the demo check below: by a fifth for predict, by half or more for scaling and score;",
        "  the CPU decode record is also at batch 64, the demo answers in batches of 8 or 16); and on a",
        "  shared machine, the wait for a core (several times more on a loaded one).",
        "- Every job's table row in `make plan` names the record and measurement it uses, and every",
        "  assumption; a job with nothing measured behind it has no number.",
        "",
        "## Checked against runs",
        "",
        "- CPU: the demo's plan against its own run, per rule: `benchmarks/results/demo-plan-check-cpu.json`",
        "  (`benchmarks/demo_plan_check.py`).",
        "- GPU: `benchmarks/gpu_pipeline.sh run` plans the smoke targets before it runs them and writes",
        "  `gpu-plan-check-<card>.json` (each job's estimate beside its benchmark file) under `$OUT`; kept",
        "  in `benchmarks/results/`. `gpu-plan-check-h100.json` is such a run, on an H100 on 2026-12-07",
        "  (`gpu-pipeline-h100.json` its record): the 8B's predictions through vLLM and through the fast",
        "  decode, and its latency job, planned on the machine before they ran. Two of the three jobs are",
        "  within 30 % (vLLM predict -0.6 %, latency -16.2 %); the hf predict job is 44 % low, for the",
        "  reason above. The scaling point was left out of that call to fit the device time left.",
        "  `gpu-plan-check-h100-pipeline.json` prices the same run again with today's model",
        "  (`benchmarks/smoke_plan_check.py`, after the fact, from the run's record): vLLM predict",
        "  +1.6 %, hf predict -17.9 %, latency -16.2 %. The same for the H200 run of 2026-11-30",
        "  (`gpu-plan-check-h200-pipeline.json`): vLLM predict +4.4 %, hf predict -34.1 %, latency -6.7 %.",
        "- Every run: the report's `results/tables/cost.{md,json}` (rule `table_cost`, after every other",
        "  table) is `egm plan --check --gpu auto` on the finished run: each job's estimate, for the card",
        "  its predictions name, beside its benchmark file and its own cost record. That plan is made after",
        "  the run, so its tokens per answer come from the run's own predictions: it checks the throughput",
        "  model, not the guess at answer lengths (a plan saved before the run, as `gpu_pipeline.sh` keeps",
        "  one, checks both).",
        "",
    ]
    for name, check in result["checks"].items():
        lines += [f"### `{name}`", "", check_note(check), "",
                  "| rule | jobs | both estimated and measured | estimated (s) | measured (s) | error | "
                  "measured, no estimate (s) | why no estimate |", "|---|---|---|---|---|---|---|---|"]
        for rule, row in check["per_rule"].items():
            err = "n/a" if row["error_pct"] is None else f"{row['error_pct']:+.1f} %"
            lines.append(f"| {rule} | {row['jobs']} | {row['paired']} | {_s(row['estimated_s'])} | "
                         f"{_s(row['measured_s'])} | {err} | {row['measured_unpaired_s']} | "
                         f"{'; '.join(row['unpriced']) or '-'} |")
        model_jobs = [j for j in check.get("jobs", []) if j["rule"] in GPU_RULES]
        if model_jobs:
            lines += ["", "Per model job:", "", "| job | GPUs | estimated (s) | measured (s) | error |", "|---|---|---|---|---|"]
            for j in model_jobs:
                est = "no estimate" if j["estimated_wall_s"] is None else f"{j['estimated_wall_s']:.1f}"
                meas = "not run" if j["measured_wall_s"] is None else f"{j['measured_wall_s']:.1f}"
                err = "n/a" if j["error_pct"] is None else f"{j['error_pct']:+.1f} %"
                lines.append(f"| {j['job']} | {j['gpus']} | {est} | {meas} | {err} |")
        lines.append("")
    return "\n".join(lines)


def _s(value) -> str:
    return "n/a" if value is None else f"{value}"


def check_note(check: dict) -> str:
    machine = check.get("machine") or {}
    load = machine.get("load_average_1_5_15_before")
    total = check["plan"].get("total") or {}
    if total.get("gpu_jobs") == 0:
        where = "every job on the CPU (no GPU job)"
    else:
        where = f"{check['plan']['n_gpus']} x {check['plan']['gpu']} planned"
    if load:
        where += (f"; run on {machine.get('cores_used')} of {machine.get('cpu_count')} CPU cores, load average "
                  f"{load[0]} before and {machine['load_average_1_5_15_after'][0]} after (a shared machine: measured "
                  "times include waiting for a core)")
    return f"{check.get('config', '')}: {where}; whole run {check.get('run_wall_s', 'n/a')} s."


def read_checks(records: Path) -> dict:
    """The committed plan-against-run records, by file name."""
    import json

    out = {}
    for path in sorted(records.glob("*plan-check*.json")):
        data = json.loads(path.read_text())
        if "check_per_rule" in data:  # `egm plan --check --json` as the GPU run wrote it
            data = {"per_rule": data["check_per_rule"], "plan": {"gpu": data["gpu"], "n_gpus": data["n_gpus"]},
                    "config": ", ".join(data["config"]), "jobs": data["check"]}
        out[path.name] = data
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "config" / "config.yaml")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--doc", type=Path, required=True)
    args = parser.parse_args(argv)
    records = REPO / "benchmarks" / "results"
    with tempfile.TemporaryDirectory() as tmp:
        dest = fresh_copy(Path(tmp))
        config = dest / "config" / args.config.name
        rl_config = rl_priced(args.config, dest)
        setups, rl = [], []
        for gpu, n in SETUPS:
            setups.append(summarise(make_plan([config], gpu, n, None, dest, records_dir=records)))
            runs = yaml.safe_load(rl_config.read_text())["train"]["runs"]
            targets = [f"results/checkpoints/{run}/rl.json" for run in runs]
            job = rl_job(make_plan([rl_config], gpu, n, targets, dest, records_dir=records))
            est = job["estimate"]
            rl.append({"gpu": gpu, "n_gpus": n, "steps": RL_STEPS, "gpu_hours": round(est["gpu_seconds"] / 3600, 1),
                       "sources": est["sources"], "assumptions": est["assumptions"]})
    import json

    multigpu = json.loads((records / "multigpu-h200x2.json").read_text())
    result = {"script": "benchmarks/paper_cost.py", "config": "config/config.yaml", "setups": setups,
              "rl_per_100_steps": rl, "zero3_two_gpu_speedup": multigpu["sft"]["speedup_steps_per_s"]}
    write_json(args.out, result)
    result["checks"] = read_checks(records)
    with atomic_write(args.doc) as f:
        f.write(document(result))
    for s in setups:
        print(f"{s['n_gpus']} x {s['gpu']}: {s['total']['gpu_hours']} GPU-h, {s['total']['wall_h']} h")
    return 0


if __name__ == "__main__":
    sys.exit(main())
