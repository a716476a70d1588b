"""egm.plan: the jobs are Snakemake's own plan, every estimate names its measurement, a model that
does not fit is flagged with the layout that does, the schedule respects dependencies and GPUs,
and --check puts a finished job's measurement beside its estimate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from egm.plan.cost import CostModel
from egm.plan.gpus import load_gpus
from egm.plan.jobs import PlannedJob
from egm.plan.plan import check, check_per_rule, make_plan, markdown, schedule
from tests.workflow_helpers import REPO, copy_workflow, plan as dry_run, shipped_config, small_demo_config, write_config

RECORDS = REPO / "benchmarks" / "results"


@pytest.fixture()
def workdir(tmp_path):
    return copy_workflow(tmp_path)


def paper(workdir, edit=None) -> Path:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    if edit:
        edit(config)
    return write_config(workdir, config, "paper.yaml")


def _plan(workdir, configfile, gpu="H100", n=8, targets=None):
    return make_plan([configfile], gpu, n, targets, workdir, records_dir=RECORDS)


def test_the_plan_is_snakemakes_dry_run_and_follows_the_config(workdir):
    configfile = write_config(workdir, small_demo_config())
    planned = _plan(workdir, configfile)
    outputs = {o for job in planned["jobs"] for o in job["outputs"]}
    # Nothing exists yet: Snakemake's dry run would create exactly these jobs' outputs.
    expected = set(dry_run(workdir, configfile))
    assert expected == outputs
    assert len(planned["jobs"]) == len({j["jobid"] for j in planned["jobs"]})
    rules = [j["rule"] for j in planned["jobs"]]
    assert rules.count("predict") == 3  # tiny-base, tiny-sft, tiny-rl
    # On the CPU: answers priced by the tiny model's CPU decode record, training named as unpriced.
    predict = next(j for j in planned["jobs"] if j["job"] == "predict model=tiny-base")["estimate"]
    assert predict["sources"][0].startswith("decode-equality-cpu.json") and predict["wall_s"] > 0
    assert predict["drivers"]["tokens"] == 8 * 4 * 16  # 8 splits x 4 records x the 16-token cap
    sft = next(j for j in planned["jobs"] if j["rule"] == "sft")["estimate"]
    assert sft["unpriced"] and sft["wall_s"] is None

    # One more model in the config: one more predict job, and its scores, in the plan.
    config = small_demo_config()
    config["models"]["tiny-base-2"] = dict(config["models"]["tiny-base"])
    again = _plan(workdir, write_config(workdir, config, "more.yaml"))
    predicts = sorted(j["job"] for j in again["jobs"] if j["rule"] == "predict")
    assert "predict model=tiny-base-2" in predicts and len(predicts) == 4
    assert len(again["jobs"]) > len(planned["jobs"])


def test_targets_narrow_the_plan_to_what_they_need(workdir):
    configfile = paper(workdir)
    full = _plan(workdir, configfile)
    one = _plan(workdir, configfile, targets=["results/predictions/egm-8b/run.json"])
    rules = {j["rule"] for j in one["jobs"]}
    assert "predict" in rules and "sft" not in rules and "latency" not in rules
    assert [j["job"] for j in one["jobs"] if j["rule"] == "predict"] == ["predict model=egm-8b"]
    target = one["per_target"]["results/predictions/egm-8b/run.json"]
    assert 0 < target["gpu_hours"] < full["total"]["gpu_hours"]


def test_every_paper_gpu_job_names_its_measurement_or_says_it_has_none(workdir):
    planned = _plan(workdir, paper(workdir))
    gpu_jobs = [j for j in planned["jobs"] if j["gpus"]]
    assert {j["rule"] for j in gpu_jobs} >= {"predict", "latency", "sft", "rl", "scaling"}
    record_names = {p.name for p in RECORDS.glob("*.json")}
    for job in gpu_jobs:
        est = job["estimate"]
        if est["unpriced"]:
            assert est["gpu_seconds"] is None  # no quiet guess
            continue
        assert est["gpu_seconds"] > 0 and est["wall_s"] > 0
        named = {s.split(":")[0] for s in est["sources"]}
        assert named & record_names, (job["job"], est["sources"])
        if job["rule"] in ("predict", "latency", "scaling"):
            assert any(a.startswith("tokens per answer") for a in est["assumptions"])
    egm8b = next(j for j in gpu_jobs if j["job"] == "predict model=egm-8b")["estimate"]
    assert "paper" in egm8b["assumptions"][0] and egm8b["drivers"]["tokens_per_answer"] == 101
    egm4b = next(j for j in gpu_jobs if j["job"] == "predict model=egm-4b")["estimate"]
    assert "assumed" in egm4b["assumptions"][0]
    # The RL steps depend on the RL parquet, which a fresh machine has not fetched yet.
    rl = next(j for j in gpu_jobs if j["rule"] == "rl")["estimate"]
    assert rl["unpriced"] and "parquet" in rl["unpriced"]
    assert planned["total"]["unpriced_gpu_jobs"] == ["rl run=egm-8b-repro"]


def test_slower_card_costs_more_and_more_gpus_finish_sooner(workdir):
    configfile = paper(workdir)
    h100 = _plan(workdir, configfile, "H100", 8)
    a100 = _plan(workdir, configfile, "A100", 8)
    h100_one = _plan(workdir, configfile, "H100", 1)
    assert a100["total"]["gpu_hours"] > h100["total"]["gpu_hours"]
    assert h100_one["total"]["wall_h"] > h100["total"]["wall_h"]
    # GPU-hours are the work; the number of GPUs only changes how long it takes.
    assert h100_one["total"]["gpu_hours"] == pytest.approx(h100["total"]["gpu_hours"], rel=1e-6)


def test_a_model_that_does_not_fit_is_flagged_with_the_smallest_layout(workdir):
    def one_gpu_235b(config):
        entry = config["models"]["qwen3-vl-235b-a22b-instruct"]
        entry.update(gpus=1, engine_options={})

    planned = _plan(workdir, paper(workdir, one_gpu_235b))
    job = next(j for j in planned["jobs"] if j["job"] == "predict model=qwen3-vl-235b-a22b-instruct")
    memory = job["estimate"]["memory"]
    assert not memory["fits"] and memory["smallest_tensor_parallel"] == 8  # 470 GB of weights on 80 GB cards
    assert "predict model=qwen3-vl-235b-a22b-instruct" in planned["total"]["does_not_fit"]
    assert "does not fit" in markdown(planned)
    # As configured (tensor parallel 8) it fits an H100 ...
    fine = _plan(workdir, paper(workdir))
    ok = next(j for j in fine["jobs"] if j["job"] == "predict model=qwen3-vl-235b-a22b-instruct")
    assert ok["estimate"]["memory"]["fits"]
    # ... but not on a run of one GPU, which it asks 8 of.
    alone = _plan(workdir, paper(workdir), "H100", 1)
    assert "predict model=qwen3-vl-235b-a22b-instruct" in alone["total"]["does_not_fit"]
    assert "sft run=egm-8b-repro" in alone["total"]["more_gpus_than_the_run"]
    # ... and not a 24 GB card, where it would need 32.
    small = _plan(workdir, paper(workdir), "RTX 4090", 8)
    big = next(j for j in small["jobs"] if j["job"] == "predict model=qwen3-vl-235b-a22b-instruct")
    assert not big["estimate"]["memory"]["fits"] and big["estimate"]["memory"]["smallest_tensor_parallel"] == 32


def _job(jobid, gpus, deps=(), rule="predict"):
    return PlannedJob(jobid, rule, {"model": str(jobid)}, gpus, {}, [f"out{jobid}"], list(deps), None, [])


def test_the_schedule_waits_for_dependencies_and_free_gpus():
    jobs = [_job(1, 1), _job(2, 1), _job(3, 2, deps=[1, 2]), _job(4, 0, deps=[3], rule="score")]
    est = {1: {"gpu_seconds": 100.0, "wall_s": 100.0}, 2: {"gpu_seconds": 60.0, "wall_s": 60.0},
           3: {"gpu_seconds": 80.0, "wall_s": 40.0}, 4: {"gpu_seconds": 0.0, "wall_s": 5.0}}
    # Two GPUs: 1 and 2 side by side (100 s), then 3 on both (40 s), then the CPU job (5 s).
    assert schedule(jobs, est, 2) == pytest.approx(145.0)
    # One GPU: 1 then 2 (160 s), then 3 on the one GPU (80 s), then 5 s.
    assert schedule(jobs, est, 1) == pytest.approx(245.0)


def test_check_pairs_each_job_with_its_measurement(workdir):
    configfile = paper(workdir)
    planned = _plan(workdir, configfile, targets=["results/predictions/egm-8b/run.json"])
    job = next(j for j in planned["jobs"] if j["rule"] == "predict")
    estimated = job["estimate"]["wall_s"]
    bench = workdir / job["benchmark"]
    bench.parent.mkdir(parents=True)
    # Snakemake's benchmark file: a header and one row per repeat.
    bench.write_text("s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
                     f"{estimated * 2:.4f}\t0:00:10\t2048.5\t4096.1\t1.0\t1.0\t0\t0\t90.0\t9.0\n")
    run = workdir / "results" / "predictions" / "egm-8b" / "run.json"
    run.parent.mkdir(parents=True)
    run.write_text(json.dumps({"cost": {"wall_s": estimated * 2, "gpu_seconds": estimated * 2, "tokens_generated": 7}}))
    rows = {r["job"]: r for r in check(planned, workdir)}
    row = rows["predict model=egm-8b"]
    assert row["measured_wall_s"] == pytest.approx(estimated * 2, rel=1e-3)
    assert row["error_pct"] == pytest.approx(-50.0, abs=0.1)
    assert row["measured_from"] == job["benchmark"] and row["recorded"]["tokens_generated"] == 7
    # A job that did not run is not given a measurement.
    assert all(r["measured_wall_s"] is None for name, r in rows.items() if name != "predict model=egm-8b")
    per_rule = check_per_rule(list(rows.values()))
    assert per_rule["predict"]["error_pct"] == pytest.approx(-50.0, abs=0.1) and per_rule["predict"]["paired"] == 1

    bench.write_text("s\tmax_rss\n")
    with pytest.raises(ValueError, match=str(bench.name)):
        check(planned, workdir)


def test_tokens_come_from_our_own_predictions_when_the_paper_has_none(tmp_path):
    model = CostModel(load_gpus(), "H100", RECORDS, tmp_path)
    assert model.expected_tokens("egm-4b", {"paper": "EGM-4B"}, 4096)[1].startswith("assumed")
    folder = tmp_path / "results" / "predictions" / "egm-4b"
    folder.mkdir(parents=True)
    (folder / "refcoco_val.jsonl").write_text("\n".join(json.dumps({"completion_tokens": n}) for n in (80, 120)))
    tokens, source = model.expected_tokens("egm-4b", {"paper": "EGM-4B"}, 4096)
    assert tokens == 100 and source.startswith("our predictions")
    # The paper's figure wins over ours.
    assert model.expected_tokens("egm-8b", {"paper": "EGM-8B"}, 4096)[0] == 101


def test_cli_writes_the_plan(workdir, tmp_path):
    out = tmp_path / "plan.json"
    md = tmp_path / "plan.md"
    result = subprocess.run([sys.executable, "-m", "egm", "plan", "--configfile", str(paper(workdir)), "--gpu", "H200",
                             "--gpus", "8", "--json", str(out), "--markdown", str(md), "--directory", str(workdir),
                             "--records", str(RECORDS)],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    planned = json.loads(out.read_text())
    assert planned["gpu"] == "H200 SXM" and planned["n_gpus"] == 8
    assert "| predict model=egm-8b |" in md.read_text()
    bad = subprocess.run([sys.executable, "-m", "egm", "plan", "--configfile", str(paper(workdir)), "--gpu", "B300",
                          "--directory", str(workdir)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode == 1 and "B300" in bad.stderr


def test_check_plans_for_the_card_the_run_used(workdir, tmp_path):
    # The report's cost table (rule table_cost): --gpu auto takes the card from the run's predictions.
    def check_on(gpus):
        run = workdir / "results" / "predictions" / "egm-8b" / "run.json"
        run.parent.mkdir(parents=True, exist_ok=True)
        run.write_text(json.dumps({"job": {"device": {"gpus": gpus}}, "cost": {"wall_s": 60.0}}))
        out, md = tmp_path / "cost.json", tmp_path / "cost.md"
        result = subprocess.run(
            [sys.executable, "-m", "egm", "plan", "--check", "--gpu", "auto", "--gpus", "1", "--configfile",
             str(paper(workdir)), "--json", str(out), "--markdown", str(md), "--directory", str(workdir),
             "--records", str(RECORDS), "results/predictions/egm-8b/run.json"],
            capture_output=True, text=True, cwd=REPO, timeout=120)
        assert result.returncode == 0, result.stderr
        return json.loads(out.read_text()), md.read_text()

    planned, text = check_on(["NVIDIA H200 (143771 MiB)"])
    assert planned["gpu"] == "H200 SXM" and planned["gpu_from"] == "results/predictions/egm-8b/run.json"
    assert "The card: results/predictions/egm-8b/run.json." in text and "## Estimate against measurement" in text
    on_h200 = next(r for r in planned["check"] if r["job"] == "predict model=egm-8b")["estimated_wall_s"]
    planned, _ = check_on([])  # a CPU run: no card to take
    assert planned["gpu"].startswith("H100") and "H100 assumed" in planned["gpu_from"]
    # Priced from the other card's records (which card is faster is the records' say: the H100's
    # vLLM batch-64 run of 2026-12-07 came out a little ahead of the H200's of 2026-11-30).
    assert next(r for r in planned["check"] if r["job"] == "predict model=egm-8b")["estimated_wall_s"] != on_h200


def test_records_are_counted_in_the_offline_mirror_before_the_fetch(workdir):
    config = shipped_config("gpu-smoke.yaml")
    configfile = write_config(workdir, config, "smoke.yaml")
    target = ["results/predictions/qwen3-vl-8b-vllm/run.json"]
    before = _plan(workdir, configfile, targets=target)
    job = next(j for j in before["jobs"] if j["rule"] == "predict")
    # Not the paper's data set: no published sizes to fall back on, so no number.
    assert job["estimate"]["unpriced"].startswith("records unknown")
    folder = workdir / config["hub"]["mirror"] / config["dataset"]["repo_id"] / "metadata" / "eval"
    folder.mkdir(parents=True)
    for split in config["splits"]:
        (folder / f"{split}.jsonl").write_text("{}\n" * 5)
    after = _plan(workdir, configfile, targets=target)
    est = next(j for j in after["jobs"] if j["rule"] == "predict")["estimate"]
    assert est["drivers"]["records"] == 5 * len(config["splits"]) and est["gpu_seconds"] > 0


def test_a_predict_job_records_what_it_cost(tiny_dir, tmp_path):
    from tests.test_predict import make_split, predict_cmd

    split, manifest = make_split(tmp_path, n=3)
    out = tmp_path / "pred"
    run = tmp_path / "run.json"
    done = subprocess.run(predict_cmd(tiny_dir, split, manifest, out, tmp_path) + ["--run-record", str(run)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    cost = json.loads(run.read_text())["cost"]
    rows = [json.loads(line) for line in (out / "refcoco_val.jsonl").read_text().splitlines()]
    assert cost["tokens_generated"] == sum(r["completion_tokens"] for r in rows) > 0
    assert cost["wall_s"] > 0 and cost["gpu_seconds"] == cost["wall_s"] * cost["gpus"]
    assert cost["peak_gpu_mem_gib"] is None and cost["peak_gpu_mem_from"].startswith("not measured")


def test_gpu_memory_peak_reads_the_jobs_gpus_from_nvidia_smi(tmp_path, monkeypatch):
    from egm.plan.measure import GpuMemoryPeak

    # A mock nvidia-smi (no GPU here): GPU 1's use rises, then falls; GPU 0 is another job's.
    mock = tmp_path / "mock-bin"
    mock.mkdir()
    count = tmp_path / "calls"
    (mock / "nvidia-smi").write_text(
        "#!/bin/sh\nn=$(cat %s 2>/dev/null || echo 0); echo $((n+1)) > %s\n"
        "case $n in 0) echo '0, 70000'; echo '1, 1024';; 1) echo '0, 70000'; echo '1, 6144';;"
        " *) echo '0, 70000'; echo '1, 2048';; esac\n" % (count, count))
    (mock / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{mock}:{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    sampler = GpuMemoryPeak(every=0.05).start()
    deadline = time.monotonic() + 10
    while int(count.read_text() if count.exists() else 0) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    peak, how = sampler.stop()
    assert peak == 6.0 and how.startswith("nvidia-smi")  # 6144 MiB on GPU 1, not GPU 0's 70000

    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    assert GpuMemoryPeak().start().stop() == (None, "not measured: no nvidia-smi")


def test_an_hf_job_pays_its_compile_and_one_untimed_batch(workdir):
    """egm's hf engine compiles and captures as it loads, and a predict job answers its first batch
    once untimed: both in the price, from the record's own warm-up (the H100 smoke check: 19.9 s
    of engine load against 1 s when only the model build was priced)."""
    def hf(config):
        config["models"]["egm-8b"].update(backend="hf", engine_options={"decode": "graph"})

    planned = _plan(workdir, paper(workdir, hf), n=1, targets=["results/predictions/egm-8b/run.json"])
    est = next(j for j in planned["jobs"] if j["job"] == "predict model=egm-8b")["estimate"]
    picked = est["sources"][0].split(":")[0]
    entry = json.loads((RECORDS / picked).read_text())["models"]["qwen3-vl-8b"]
    warm = max(r.get("warmup_s") or 0 for r in entry["runs"] if r["method"] == "graph_compiled")
    assert warm > 1
    assert f"engine load {entry['build_s'] + warm:.0f} s ({picked}: model build {entry['build_s']:.1f} s + " \
           f"graph_compiled warm-up {warm:.1f} s, not scaled)" in est["sources"]
    assert "one batch answered first, untimed (egm.infer.predict.warm_up)" in est["sources"]
