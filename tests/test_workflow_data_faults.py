"""Issue 18 through real Snakemake, as a new user meets it: an offline mirror with the faults of
real downloads (files missing, an empty split), and mirrors kept in folders of their own."""

import json
import re
import shutil

import pytest

from egm.data.demo import write_demo_dataset
from tests.workflow_helpers import copy_workflow, plan, run_snakemake, small_demo_config, write_config

DATASET = "egm-demo/EGM_Datasets"


def _offline_config(mirror) -> dict:
    """The demo's settings against a mirror the user made (no `demo:` key: nothing generates it)."""
    config = small_demo_config()
    del config["demo"]
    config["hub"]["mirror"] = mirror
    return config


def test_fetch_names_the_missing_files_and_patterns(tmp_path):
    """Point 3: a mirror without the RL parquet and coco_flip.tar fails in fetch_dataset, naming
    them and the allow patterns, instead of 'fetched N files' and a MissingOutputException."""
    copy_workflow(tmp_path)
    sites = tmp_path / "site-datasets"
    write_demo_dataset(sites / DATASET, n_train_images=2, n_eval_per_split=1)
    for rel in ("processed_rl_data/train_grounding.parquet", "processed_rl_data/val_grounding.parquet", "coco_flip.tar"):
        (sites / DATASET / rel).unlink()
    # Point 5 on the way: the data set's folder named by a mapping (models would be elsewhere).
    config = _offline_config({DATASET: str(sites / DATASET)})
    result = run_snakemake(tmp_path, write_config(tmp_path, config), "--show-failed-logs", "resources/manifests/dataset.json")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "MissingOutputException" not in output and "latency-wait" not in output
    log_line = (tmp_path / "logs/fetch_dataset.log").read_text().strip().splitlines()[-1]
    assert log_line in output  # shown on the console, not only in the file
    assert "ERROR egm: fetch failed:" in log_line and "Traceback" not in (tmp_path / "logs/fetch_dataset.log").read_text()
    assert ("not in the repository: processed_rl_data/train_grounding.parquet, "
            "processed_rl_data/val_grounding.parquet, coco_flip.tar") in log_line
    assert "asked for allow_patterns=['coco.tar.part_*', 'coco_flip.tar'" in log_line
    dest = tmp_path / "resources/hub" / DATASET
    assert not dest.exists() or not any(p.is_file() for p in dest.rglob("*"))


def test_required_files_follow_the_config(tmp_path):
    """Point 3: what fetch_dataset requires is what this config's DAG reads. A mirror without one
    split and one SFT file fails a config that needs them, naming exactly those two, and serves
    a config that needs neither."""
    copy_workflow(tmp_path)
    sites = tmp_path / "site-datasets"
    write_demo_dataset(sites / DATASET, n_train_images=2, n_eval_per_split=1)
    cot = "vanilla_grounding_reasoning_training_dataset_cot_subset.jsonl"
    for rel in ("metadata/eval/refcoco_testA.jsonl", cot):
        (sites / DATASET / rel).unlink()

    needs_them = _offline_config(str(sites))
    needs_them["train"]["runs"]["tiny"]["sft"]["data"] = "cot_subset"
    result = run_snakemake(tmp_path, write_config(tmp_path, needs_them), "--show-failed-logs",
                           "resources/manifests/dataset.json")
    assert result.returncode != 0
    log_line = (tmp_path / "logs/fetch_dataset.log").read_text().strip().splitlines()[-1]
    assert ("2 file(s) the workflow needs are missing "
            f"(not in the repository: metadata/eval/refcoco_testA.jsonl, {cot})") in log_line

    needs_neither = _offline_config(str(sites))
    needs_neither["splits"] = [s for s in needs_neither["splits"] if s != "refcoco_testA"]
    result = run_snakemake(tmp_path, write_config(tmp_path, needs_neither), "--show-failed-logs",
                           "resources/manifests/dataset.json")
    assert result.returncode == 0, result.stderr[-3000:]
    fetched = {f["path"] for f in json.loads((tmp_path / "resources/manifests/dataset.json").read_text())["files"]}
    assert {"coco_flip.tar", "metadata/eval/refcocog_test.jsonl", "processed_rl_data/val_grounding.parquet"} <= fetched


def test_mirror_as_list_or_mapping_in_the_schema(tmp_path):
    """Point 5: hub.mirror takes one folder, folders searched in order, or repo_id -> folder."""
    copy_workflow(tmp_path)

    def planned_fetches(mirror):
        result = run_snakemake(tmp_path, write_config(tmp_path, _offline_config(mirror)), "-n", "-p")
        return result.returncode, result.stdout + result.stderr

    rc, out = planned_fetches(["/srv/hf/datasets", "/srv/hf/models"])
    assert rc == 0, out[-3000:]
    assert len(re.findall(r"fetch --repo-type \w+ .*--mirror /srv/hf/datasets /srv/hf/models", out)) == 2
    rc, out = planned_fetches({DATASET: "/srv/data/egm", "egm-demo/tiny-qwen3-vl": "/srv/models/tiny"})
    assert rc == 0, out[-3000:]
    # The data set's fetch sees only its own entry: editing a model's entry does not refetch it.
    assert "--mirror-map '{\"egm-demo/EGM_Datasets\": \"/srv/data/egm\"}'" in out
    # ... and each model's fetch sees only its own.
    assert "--mirror-map '{\"egm-demo/tiny-qwen3-vl\": \"/srv/models/tiny\"}'" in out
    assert "/srv/data/egm\", \"egm-demo" not in out and "/srv/models/tiny\", \"egm-demo" not in out
    for bad in ([], {}, "", [1]):
        rc, out = planned_fetches(bad)
        assert rc != 0 and "mirror" in out, bad


def test_predict_waits_for_every_splits_validation(tmp_path):
    """Point 2, in the DAG itself: predict's plan holds the validation report of every configured
    split (and training's, those of the RL parquet), so no scheduling order can start a GPU job
    before a split is checked."""
    copy_workflow(tmp_path)
    config = small_demo_config()
    configfile = write_config(tmp_path, config)
    predict = set(plan(tmp_path, configfile, ["results/predictions/tiny-base/run.json"]))
    assert {f"results/validation/{split}.json" for split in config["splits"]} <= predict
    assert not any(path.startswith("results/validation/rl_") for path in predict)  # predict does not read them
    rl = set(plan(tmp_path, configfile, ["results/checkpoints/tiny/rl.json"]))
    assert {"results/validation/rl_train.json", "results/validation/rl_val.json"} <= rl


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_one_empty_split_costs_only_itself_then_rerun_answers_only_it(tmp_path):
    """Points 1 and 2: with refcocog_test empty, the validation rule reports it before predict
    starts; the other splits are predicted, scored and tabled; the empty one's metrics say why it
    has no score and the table marks it. Fixing the split answers only that split."""
    copy_workflow(tmp_path)
    config = small_demo_config()
    config["train"]["runs"] = {}
    config["report"]["expected"] = {"tiny-base": {"acc": [0, 100]}}
    configfile = write_config(tmp_path, config)
    result = run_snakemake(tmp_path, configfile, "--show-failed-logs", "resources/manifests/demo-mirror.json")
    assert result.returncode == 0, result.stderr[-4000:]
    split_in_mirror = tmp_path / "resources/demo_mirror" / DATASET / "metadata/eval/refcocog_test.jsonl"
    original = split_in_mirror.read_text()
    split_in_mirror.write_text("")

    result = run_snakemake(tmp_path, configfile, "--show-failed-logs", "table_refcoco")
    assert result.returncode == 0, result.stderr[-4000:]
    log = result.stderr
    validated = log.index("wildcards: split=refcocog_test")
    assert log.rindex("rule validate_split:", 0, validated) < log.index("rule predict:")
    report = json.loads((tmp_path / "results/validation/refcocog_test.json").read_text())
    assert report["valid"] == 0 and "no valid record (0 bad: the file has no records)" in report["error"]
    assert "NO VALID RECORD" in (tmp_path / "logs/validate/refcocog_test.log").read_text().strip().splitlines()[-1]

    predictions, metrics = tmp_path / "results/predictions/tiny-base", tmp_path / "results/metrics/tiny-base"
    for split in config["splits"]:
        scores = json.loads((metrics / f"{split}.json").read_text())
        if split == "refcocog_test":
            assert (predictions / f"{split}.jsonl").read_text() == ""
            assert scores["acc_at_0.5"] is None and scores["n_scored"] == 0
            assert scores["no_score"] == "no valid record" and scores["no_score_reason"] == report["error"]
        else:
            assert len(_rows(predictions / f"{split}.jsonl")) == 4 and scores["n_scored"] == 4
    table = (tmp_path / "results/tables/refcoco.md").read_text()
    assert "n/a (no valid record)" in table and report["error"] in table

    # The fix: the split file put right where the workflow reads it; only it is answered.
    (tmp_path / "resources/hub" / DATASET / "metadata/eval/refcocog_test.jsonl").write_text(original)
    result = run_snakemake(tmp_path, configfile, "--show-failed-logs", "table_refcoco")
    assert result.returncode == 0, result.stderr[-4000:]
    predict_log = (tmp_path / "logs/predict/tiny-base.log").read_text()
    for split in config["splits"]:
        answered = "0 already answered" if split == "refcocog_test" else "4 already answered"
        assert f"{split}: 4 records, {answered}" in predict_log, split
    assert predict_log.count("loading ") == 1  # one engine load, for the one split left
    assert json.loads((metrics / "refcocog_test.json").read_text())["n_scored"] == 4
    assert "n/a" not in (tmp_path / "results/tables/refcoco.md").read_text()
    shutil.rmtree(tmp_path / "resources/demo_mirror", ignore_errors=True)
