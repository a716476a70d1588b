"""The whole pipeline through real Snakemake: the demo end to end, then incremental reruns."""

import json
import os
import re
from collections import Counter

import pytest

from tests.report_browser import check_report_or_skip
from tests.workflow_helpers import (
    copy_workflow,
    files_containing,
    plan,
    run_snakemake,
    small_demo_config,
    stage_of,
    write_config,
)

PAPER_SPLITS = 8
# Canary secrets: the demo runs with them set and no file it writes may contain them.
SECRETS = {"HF_TOKEN": "hf_canaryTOKEN0123456789abcdef", "WANDB_API_KEY": "wandbcanary0123456789abcdef0123456789"}


def test_paper_config_plans_every_stage_without_network(tmp_path):
    copy_workflow(tmp_path)
    outputs = plan(tmp_path)  # config/config.yaml by default; planning touches no network
    stages = Counter(stage_of(p) for p in outputs)
    n_models = 6
    n_trained = 2  # the training run's reproduced SFT and RL models (workflow/rules/train.smk)
    assert stages["predict"] == (n_models + n_trained) * (PAPER_SPLITS + 1)  # + run.json (provenance)
    assert stages["score"] == (n_models + n_trained) * PAPER_SPLITS
    assert stages["fetch_model"] == n_models
    assert stages["extract_images"] == 2
    assert stages["rewrite_rl_parquet"] == 2
    # refcoco, vs-paper, thresholds, scaling, latency tables (csv, md, tex); 4 figures (png, pdf); cost (md, json)
    assert stages["report"] == 25
    # Test-time scaling: 7 budgets (jsonl + json) per swept model, the two 235B models at one point.
    assert stages["scaling"] == (n_models - 2 + n_trained) * 7 * 2 + 2 * 2
    assert "demo_mirror" not in stages


def test_named_artifact_targets_plan_only_what_they_need(tmp_path):
    copy_workflow(tmp_path)
    outputs = plan(tmp_path, targets=["table_refcoco"])
    stages = set(map(stage_of, outputs))
    assert "train" in stages  # the table has the reproduced (trained) models' rows
    assert not any(p.startswith("results/figures/") for p in outputs)
    # A released model's scores need neither the training stages nor the RL data.
    stages = set(map(stage_of, plan(tmp_path, targets=["results/metrics/egm-8b/refcoco_val.json"])))
    assert "rewrite_rl_parquet" not in stages and "train" not in stages


def test_unknown_config_key_fails_before_any_job(tmp_path):
    copy_workflow(tmp_path)
    config = small_demo_config()
    config["inference"]["max_token"] = 3  # typo
    result = run_snakemake(tmp_path, write_config(tmp_path, config), "-n")
    assert result.returncode != 0
    assert "max_token" in result.stdout + result.stderr


@pytest.mark.slow
def test_demo_end_to_end_then_incremental(tmp_path):
    copy_workflow(tmp_path)
    # One split short of the demo's 8, so that adding it can be checked at the end.
    config = small_demo_config()
    all_splits, config["splits"] = config["splits"], config["splits"][:-1]
    configfile = write_config(tmp_path, config)
    result = run_snakemake(tmp_path, configfile, env_extra=SECRETS)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / ".snakemake" / "metadata").is_dir()  # where Snakemake stores params
    assert files_containing(tmp_path, list(SECRETS.values())) == []
    assert not any(value in result.stdout + result.stderr for value in SECRETS.values())

    for name in ("refcoco.csv", "refcoco.md", "refcoco_vs_paper.csv", "refcoco_vs_paper.md"):
        assert (tmp_path / "results/tables" / name).stat().st_size > 0
    assert (tmp_path / "results/figures/tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "results/figures/tradeoff.pdf").read_bytes()[:4] == b"%PDF"
    assert (tmp_path / "results/figures/scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "reproduced RL" in (tmp_path / "results/tables/scaling.md").read_text()
    # The run's price checked: each model job's estimate beside its benchmark file.
    cost = json.loads((tmp_path / "results/tables/cost.json").read_text())
    predicted = [r for r in cost["check"] if r["rule"] == "predict"]
    assert predicted and all(r["measured_wall_s"] > 0 and r["estimated_wall_s"] > 0 for r in predicted)
    assert "## Estimate against measurement" in (tmp_path / "results/tables/cost.md").read_text()
    scaled = [json.loads(line) for line in (tmp_path / "results/scaling/tiny-sft/budget-4.jsonl").read_text().splitlines()]
    assert len(scaled) == PAPER_SPLITS - 1 and all(row["budget"] == "4" for row in scaled)
    for part in ("train", "val"):
        assert (tmp_path / f"resources/rl/{part}.parquet").exists()

    split_files = sorted((tmp_path / "results/predictions/tiny-base").glob("*.jsonl"))
    assert len(split_files) == PAPER_SPLITS - 1
    for path in split_files:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(rows) == 4
        assert len({row["line"] for row in rows}) == 4
        for row in rows:
            for field in ("id", "image", "sent", "bbox", "width", "height", "answer", "parsed_box",
                          "pred_box", "iou", "completion_tokens", "latency_s"):
                assert field in row, (path, field)
        metrics = json.loads((tmp_path / "results/metrics/tiny-base" / path.name.replace(".jsonl", ".json")).read_text())
        assert metrics["n_scored"] == 4

    # --- report check: `snakemake --report` works and, in headless Chromium, shows every figure.
    result = run_snakemake(tmp_path, configfile, "--report", "results/report.html")
    assert result.returncode == 0, result.stderr[-4000:]
    check_report_or_skip(tmp_path / "results/report.html", shots=tmp_path / "report-shots",
                         required=["results/figures/tradeoff.png", "results/figures/scaling.png"])
    # --- end of report check

    # The rerun table (docs/reruns.md), row by row, planned through the Snakemake API.
    def stages_after(change) -> set[str]:
        changed = small_demo_config()
        changed["splits"] = config["splits"]
        change(changed)
        return set(map(stage_of, plan(tmp_path, write_config(tmp_path, changed, "changed.yaml"))))

    assert plan(tmp_path, configfile) == []  # touch nothing -> nothing
    assert stages_after(lambda c: c["inference"].update(max_tokens=12)) == {"predict", "score", "scaling", "report"}
    assert stages_after(lambda c: c["report"].update(tolerance=1.0)) == {"report"}
    assert stages_after(lambda c: c["dataset"].update(revision="v2")) == {
        "fetch_dataset", "extract_images", "validate", "rewrite_rl_parquet", "train", "predict", "score", "scaling",
        "report"}
    assert stages_after(lambda c: c["models"]["tiny-base"].update(revision="v2")) == {
        "fetch_model", "train", "predict", "score", "scaling", "report"}  # the training run starts from tiny-base
    assert stages_after(lambda c: c["scaling"].update(answer_max_tokens=6)) == {"scaling", "report"}

    # Training: an SFT hyperparameter reruns SFT, RL and both trained models' predictions onward;
    # an RL one reruns RL onward only; a row label reruns the report only.
    def trained_after(stage):
        changed = small_demo_config()
        changed["splits"] = config["splits"]
        changed["train"]["runs"]["tiny"][stage].setdefault("overrides", {})["learning_rate"] = 5e-4
        outputs = plan(tmp_path, write_config(tmp_path, changed, "changed.yaml"))
        return ({p.split("/")[3].split(".")[0] for p in outputs if p.startswith("results/checkpoints/")},
                {p.split("/")[2] for p in outputs if p.startswith("results/predictions/")})

    assert trained_after("sft") == ({"sft", "rl"}, {"tiny-sft", "tiny-rl"})
    assert trained_after("rl") == ({"rl"}, {"tiny-rl"})
    assert stages_after(lambda c: c["train"]["runs"]["tiny"]["rl"].update(display="RL'd")) == {"report"}
    table = (tmp_path / "results/tables/refcoco.md").read_text()
    assert "random init" in table and "reproduced SFT" in table and "reproduced RL" in table

    # Provenance: a metrics file names the model and data it came from (here mirror copies, traced
    # by their manifests' digests), the engine and the config keys; table rows carry the same.
    from egm.io import sha256_file

    record = json.loads((tmp_path / "results/metrics/tiny-base/refcoco_val.json").read_text())["provenance"]
    model_digest = sha256_file(tmp_path / "resources/manifests/model-tiny-base.json")
    assert record["model"]["manifest_sha256"] == model_digest
    assert record["data"]["manifest_sha256"] == sha256_file(tmp_path / "resources/manifests/dataset.json")
    assert record["job"]["engine"]["package"] == "transformers" and record["job"]["config"]["inference"]["max_tokens"] == 16
    assert f"manifest:{model_digest}" in (tmp_path / "results/tables/refcoco.csv").read_text()
    trained = json.loads((tmp_path / "results/metrics/tiny-rl/refcoco_val.json").read_text())["provenance"]
    assert trained["model"]["repo_id"] == "trained:tiny/rl"

    # Each artifact rebuilds alone: without its files, its target plans exactly them.
    artifacts = {
        "table_refcoco": [f"results/tables/{t}{e}" for t in ("refcoco", "refcoco_vs_paper", "refcoco_vs_expected")
                          for e in (".csv", ".md", ".tex")],
        "table_latency": [f"results/tables/latency{e}" for e in (".csv", ".md", ".tex")],
        "table_scaling": [f"results/tables/scaling{e}" for e in (".csv", ".md", ".tex")],
        **{f"figure_{name}": [f"results/figures/{name}.png", f"results/figures/{name}.pdf"]
           for name in ("tradeoff", "tokens", "training", "scaling")},
    }
    for rule, outputs in artifacts.items():
        for path in outputs:
            os.replace(tmp_path / path, tmp_path / (path + ".aside"))
        try:
            assert sorted(plan(tmp_path, configfile, targets=[rule])) == sorted(outputs), rule
        finally:
            for path in outputs:
                os.replace(tmp_path / (path + ".aside"), tmp_path / path)
    for path in artifacts["figure_tradeoff"]:
        (tmp_path / path).unlink()
    result = run_snakemake(tmp_path, configfile, "--printshellcmds", "figure_tradeoff")  # a flag ends --configfile's list
    assert result.returncode == 0, result.stderr[-4000:]
    assert re.search(r"^total\s+1$", result.stdout + result.stderr, re.M), result.stdout[-3000:]
    assert plan(tmp_path, configfile) == []

    # Add a split: the model's one predict job reruns but answers only the new split.
    config["splits"] = all_splits
    result = run_snakemake(tmp_path, write_config(tmp_path, config))
    assert result.returncode == 0, result.stderr[-4000:]
    log = (tmp_path / "logs/predict/tiny-base.log").read_text()
    assert log.count("4 already answered") == PAPER_SPLITS - 1
    assert f"{all_splits[-1]}: 4 records, 0 already answered" in log
