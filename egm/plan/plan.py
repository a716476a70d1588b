"""The priced plan of a run: every job Snakemake plans (egm.plan.jobs) with its estimate
(egm.plan.cost), sums per rule, per target and for the run, the run's wall time on N GPUs, and,
after a run, each job's measurement beside its estimate.

Wall time on N GPUs is a list schedule over the job graph: a job starts once every job it
depends on has finished and enough GPUs are free (jobs in Snakemake's job order); a job asking
for more GPUs than there are gets all N and takes its GPU-seconds / N; CPU jobs take no GPU and
run as soon as they are ready (CPU cores are assumed plentiful); a job without an estimate takes
no time (the plan counts and names them).
"""

from __future__ import annotations

import csv
import json
import os
from base64 import urlsafe_b64encode
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

from egm.plan.cost import RECORDS_DIR, CostModel
from egm.plan.gpus import load_gpus
from egm.plan.jobs import PlannedJob, planned_jobs


def schedule(jobs: list[PlannedJob], estimates: dict[int, dict], n_gpus: int) -> float:
    """Seconds from the first job's start to the last one's end (the module docstring's rules)."""
    pending = {j.jobid: j for j in jobs}
    finished_at: dict[int, float] = {}
    running: list[tuple[float, int, int]] = []  # (end, jobid, gpus held)
    free, now = n_gpus, 0.0
    while pending or running:
        started = True
        while started:
            started = False
            for jobid in sorted(pending):
                job = pending[jobid]
                if any(d not in finished_at for d in job.depends_on):
                    continue
                est = estimates[jobid]
                gpus = min(job.gpus, n_gpus)
                if gpus > free:
                    continue
                if job.gpus:
                    seconds = (est["gpu_seconds"] or 0.0) / gpus
                else:
                    seconds = est["wall_s"] or 0.0
                ready = max([now] + [finished_at[d] for d in job.depends_on])
                running.append((ready + seconds, jobid, gpus))
                free -= gpus
                del pending[jobid]
                started = True
        if not running:
            blocked = sorted(pending)
            raise ValueError(f"jobs {blocked} can never start (a dependency outside the plan?)")
        running.sort()
        end, jobid, gpus = running.pop(0)
        now, free = end, free + gpus
        finished_at[jobid] = end
    return max(finished_at.values(), default=0.0)


def _sum(rows: list[dict]) -> dict:
    gpu_s = sum(r["estimate"]["gpu_seconds"] or 0.0 for r in rows)
    unpriced = [r["job"] for r in rows if r["estimate"]["unpriced"] and r["gpus"]]
    unfit = [r["job"] for r in rows if r["estimate"]["memory"] and not r["estimate"]["memory"]["fits"]]
    return {"jobs": len(rows), "gpu_jobs": sum(1 for r in rows if r["gpus"]), "gpu_hours": round(gpu_s / 3600, 2),
            "unpriced_gpu_jobs": unpriced, "does_not_fit": unfit,
            "more_gpus_than_the_run": [r["job"] for r in rows if r.get("short_of_gpus")]}


def make_plan(configfiles: list[Path], gpu: str, n_gpus: int, targets: list[str] | None = None,
              workdir: Path = Path("."), snakefile: Path | None = None, records_dir: Path | None = None,
              forceall: bool = True) -> dict:
    workdir = Path(workdir).resolve()
    snakefile = Path(snakefile or workdir / "Snakefile")
    records = Path(records_dir or workdir / RECORDS_DIR)
    if n_gpus < 1:
        raise ValueError(f"--gpus must be at least 1, got {n_gpus}")
    jobs, config = planned_jobs(snakefile, configfiles, targets, workdir, forceall)
    model = CostModel(load_gpus(), gpu, records, workdir, n_gpus)
    estimates = {j.jobid: asdict(model.estimate(j, config)) for j in jobs}
    rows = [{"jobid": j.jobid, "job": j.name, "rule": j.rule, "wildcards": j.wildcards, "gpus": j.gpus,
             "depends_on": sorted(j.depends_on), "benchmark": j.benchmark, "outputs": j.outputs,
             "estimate": estimates[j.jobid], "short_of_gpus": j.gpus > n_gpus} for j in jobs]
    per_rule = {}
    by_rule = defaultdict(list)
    for row in rows:
        by_rule[row["rule"]].append(row)
    for rule, group in sorted(by_rule.items()):
        per_rule[rule] = _sum(group)
    per_target = {}
    for target in targets or []:
        # Snakemake's own plan of this target alone; its jobs are the run's jobs with the same outputs.
        sub, _ = planned_jobs(snakefile, configfiles, [target], workdir, forceall)
        by_outputs = {tuple(j.outputs): j.jobid for j in jobs}
        ids = {by_outputs[tuple(j.outputs)] for j in sub}
        chosen = [j for j in jobs if j.jobid in ids]
        per_target[target] = {**_sum([r for r in rows if r["jobid"] in ids]),
                              "wall_h": round(schedule(chosen, estimates, n_gpus) / 3600, 2)}
    wall = schedule(jobs, estimates, n_gpus)
    return {
        "config": [str(c) for c in configfiles], "targets": targets or ["(default: rule all)"],
        "gpu": model.gpu_name, "gpu_spec": model.gpu, "n_gpus": n_gpus, "forceall": forceall,
        "schedule": ("list schedule over the job graph: a job starts when its dependencies are done and "
                     "its GPUs are free; CPU jobs take no GPU; jobs without an estimate take no time"),
        "jobs": rows, "per_rule": per_rule, "per_target": per_target,
        "total": {**_sum(rows), "wall_h": round(wall / 3600, 2)},
    }


# After a run: what each job cost.

def _metadata(workdir: Path, path: str) -> dict | None:
    """Snakemake's record of the job that wrote `path` (.snakemake/metadata, one file a path)."""
    name = urlsafe_b64encode(path.encode()).decode()
    parts = [name[i:i + 254] for i in range(0, len(name), 254)]
    parts = ["@" + s for s in parts[:-1]] + [parts[-1]]
    file = workdir / ".snakemake" / "metadata" / os.path.join(*parts)
    return json.loads(file.read_text()) if file.exists() else None


def _benchmark(path: Path) -> dict | None:
    """Snakemake's benchmark file: wall seconds and peak resident memory (MB) of the job."""
    if not path.exists():
        return None
    with path.open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows:
        raise ValueError(f"{path}: a benchmark file without a row")
    row = rows[-1]
    try:
        return {"wall_s": float(row["s"]), "max_rss_mb": float(row["max_rss"]) if row.get("max_rss") not in (None, "", "-") else None}
    except (KeyError, ValueError) as err:
        raise ValueError(f"{path}: row {len(rows)} has no usable 's' column ({err})") from err


def _job_cost_record(workdir: Path, job: dict) -> dict | None:
    """The cost block a GPU job writes itself: predict's run.json, a training stage's manifest,
    the latency record."""
    for out in job["outputs"]:
        path = workdir / out
        if path.suffix == ".json" and path.is_file() and (out.endswith("run.json") or job["rule"] in ("sft", "rl", "latency")):
            data = json.loads(path.read_text())
            if "cost" in data:
                return data["cost"]
    return None


def measured(workdir: Path, job: dict) -> dict | None:
    """What the job cost in a finished run: the benchmark file where the rule has one, else
    Snakemake's start and end times of the job's first output; the job's own cost record beside."""
    workdir = Path(workdir)
    out: dict = {}
    if job["benchmark"]:
        bench = _benchmark(workdir / job["benchmark"])
        if bench:
            out.update(bench, source=job["benchmark"])
    if "wall_s" not in out:
        meta = next((m for m in (_metadata(workdir, o) for o in job["outputs"]) if m and m.get("endtime")), None)
        if meta is None:
            return None
        out.update(wall_s=meta["endtime"] - meta["starttime"], source=".snakemake/metadata (start, end)")
    own = _job_cost_record(workdir, job)
    if own:
        out["recorded"] = own
    out["gpu_seconds"] = out["wall_s"] * job["gpus"]
    return out


def check(plan: dict, workdir: Path) -> list[dict]:
    """Each job's estimate beside its measurement; the error where both exist."""
    rows = []
    for job in plan["jobs"]:
        est = job["estimate"]
        meas = measured(workdir, job)
        error = None
        if meas and est["wall_s"] is not None and meas["wall_s"] > 0:
            error = round(100 * (est["wall_s"] - meas["wall_s"]) / meas["wall_s"], 1)
        rows.append({"job": job["job"], "rule": job["rule"], "gpus": job["gpus"], "estimated_wall_s": est["wall_s"],
                     "measured_wall_s": None if meas is None else round(meas["wall_s"], 3),
                     "error_pct": error, "measured_from": None if meas is None else meas["source"],
                     "recorded": None if meas is None else meas.get("recorded"),
                     "unpriced": est["unpriced"]})
    return rows


def check_per_rule(rows: list[dict]) -> dict:
    """Per rule: the sums over the jobs that have both an estimate and a measurement (`paired`),
    and why the others have no estimate."""
    out = {}
    for rule in sorted({r["rule"] for r in rows}):
        group = [r for r in rows if r["rule"] == rule]
        paired = [r for r in group if r["estimated_wall_s"] is not None and r["measured_wall_s"]]
        e = sum(r["estimated_wall_s"] for r in paired)
        m = sum(r["measured_wall_s"] for r in paired)
        out[rule] = {"jobs": len(group), "paired": len(paired),
                     "estimated_s": round(e, 1) if paired else None, "measured_s": round(m, 1) if paired else None,
                     "measured_unpaired_s": round(sum(r["measured_wall_s"] or 0 for r in group if r not in paired), 1),
                     "error_pct": round(100 * (e - m) / m, 1) if paired else None,
                     "unpriced": sorted({r["unpriced"] for r in group if r["unpriced"]})}
    return out


# Markdown.

def _h(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


def markdown(plan: dict, checked: list[dict] | None = None) -> str:
    lines = [f"# Plan: {', '.join(plan['config'])} on {plan['n_gpus']} x {plan['gpu']}", "",
             f"Targets: {', '.join(plan['targets'])}. {plan['schedule']}.", "",
             *([f"The card: {plan['gpu_from']}.", ""] if plan.get("gpu_from") else []),
             f"**Run total: {plan['total']['gpu_hours']} GPU-hours, {plan['total']['wall_h']} h wall on "
             f"{plan['n_gpus']} x {plan['gpu']}**, {plan['total']['jobs']} jobs ({plan['total']['gpu_jobs']} GPU jobs; "
             f"{len(plan['total']['unpriced_gpu_jobs'])} GPU jobs without an estimate; "
             f"{len(plan['total']['does_not_fit'])} whose model does not fit on the GPUs they get; "
             f"{len(plan['total']['more_gpus_than_the_run'])} asking for more GPUs than the run has).", "",
             "## GPU jobs", "",
             "| job | GPUs | drivers | GPU-hours | wall (own GPUs) | memory per GPU | sources and assumptions |",
             "|---|---|---|---|---|---|---|"]
    for row in plan["jobs"]:
        est = row["estimate"]
        if not row["gpus"] and row["rule"] not in ("predict", "scaling", "scaling_single_point", "latency", "sft", "rl"):
            continue
        mem = est["memory"]
        if mem:
            layout = mem.get("smallest_tensor_parallel", mem.get("smallest_zero3_gpus"))
            memtext = f"{mem['per_gpu_gb']} / {mem['card_gb']} GB" + ("" if mem["fits"] else
                                                                      f" **does not fit**; smallest that fits: {layout} GPUs")
        else:
            memtext = ""
        drivers = ", ".join(f"{k} {v}" for k, v in est["drivers"].items())
        why = "; ".join(est["sources"] + [f"assumed: {a}" if not a.startswith("assumed") else a for a in est["assumptions"]])
        if est["unpriced"]:
            why = f"**no estimate**: {est['unpriced']}"
        gpu_h = "n/a" if est["gpu_seconds"] is None else f"{est['gpu_seconds'] / 3600:.2f}"
        lines.append(f"| {row['job']} | {row['gpus']} | {drivers} | {gpu_h} | {_h(est['wall_s'])} | {memtext} | {why} |")
    lines += ["", "## Per rule", "", "| rule | jobs | GPU jobs | GPU-hours | without estimate | does not fit |",
              "|---|---|---|---|---|---|"]
    for rule, s in plan["per_rule"].items():
        lines.append(f"| {rule} | {s['jobs']} | {s['gpu_jobs']} | {s['gpu_hours']} | {len(s['unpriced_gpu_jobs'])} | "
                     f"{len(s['does_not_fit'])} |")
    if plan["per_target"]:
        lines += ["", "## Per target", "", "| target | jobs | GPU-hours | wall (h) |", "|---|---|---|---|"]
        for target, s in plan["per_target"].items():
            lines.append(f"| {target} | {s['jobs']} | {s['gpu_hours']} | {s['wall_h']} |")
    if checked is not None:
        lines += ["", "## Estimate against measurement", "",
                  "| job | GPUs | estimated wall | measured wall | error | measured from |", "|---|---|---|---|---|---|"]
        for r in checked:
            err = "n/a" if r["error_pct"] is None else f"{r['error_pct']:+.1f} %"
            est = "no estimate" if r["estimated_wall_s"] is None else _h(r["estimated_wall_s"])
            lines.append(f"| {r['job']} | {r['gpus']} | {est} | {_h(r['measured_wall_s'])} | {err} | "
                         f"{r['measured_from'] or 'not run'} |")
    return "\n".join(lines) + "\n"


def run_plan(configfiles: list[Path], gpu: str, n_gpus: int, targets: list[str] | None, out_json: Path | None,
             out_md: Path | None, do_check: bool, workdir: Path = Path("."), forceall: bool = True,
             records_dir: Path | None = None, saved: Path | None = None, gpu_from: str | None = None) -> dict:
    """`egm plan`: the plan (and with do_check the finished run's measurements beside it),
    written as JSON and Markdown; the Markdown also goes to stdout when no file is named.

    saved: a plan written before the run, checked instead of a new one (a plan made after the
    run would take its tokens per answer from the run's own predictions)."""
    from egm.io import atomic_write, read_json, write_json

    if saved:
        plan = read_json(saved)
        missing = {"jobs", "per_rule", "total", "gpu", "n_gpus"} - set(plan)
        if missing:
            raise ValueError(f"{saved}: not a plan written by `egm plan --json` (no {sorted(missing)})")
    else:
        plan = make_plan(configfiles, gpu, n_gpus, targets, workdir, records_dir=records_dir, forceall=forceall)
    if gpu_from:
        plan["gpu_from"] = gpu_from
    checked = check(plan, workdir) if do_check else None
    if checked is not None:
        plan["check"] = checked
        plan["check_per_rule"] = check_per_rule(checked)
    text = markdown(plan, checked)
    if out_json:
        write_json(out_json, plan)
    if out_md:
        with atomic_write(out_md) as f:
            f.write(text)
    else:
        print(text)
    return plan
