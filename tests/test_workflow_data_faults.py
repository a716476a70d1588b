"""Issue 18 through real Snakemake, as a new user meets it: an offline mirror with the faults of
real downloads (files missing), and mirrors kept in folders of their own."""

import re

from egm.data.demo import write_demo_dataset
from tests.workflow_helpers import copy_workflow, run_snakemake, small_demo_config, write_config

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
    for bad in ([], {}, "", [1]):
        rc, out = planned_fetches(bad)
        assert rc != 0 and "mirror" in out, bad
