"""Issue 28, item 4, through real Snakemake: a user's offline mirror is read, never written. Editing
the fetched copy leaves the mirror's bytes alone; a mirror file whose bytes change is noticed (its
checksum differs from the fetch manifest) and fetched again on the next run, while a mere touch
of it is not a change."""

import json
import os

from egm.data.demo import write_demo_dataset
from tests.workflow_helpers import copy_workflow, plan, run_snakemake, small_demo_config, write_config

DATASET = "egm-demo/EGM_Datasets"
SPLIT = "metadata/eval/refcoco_val.jsonl"
MANIFEST = "resources/manifests/dataset.json"


def test_mirror_is_never_written_and_a_changed_mirror_file_is_refetched(tmp_path):
    copy_workflow(tmp_path)
    mirror = tmp_path / "site"
    write_demo_dataset(mirror / DATASET, n_train_images=2, n_eval_per_split=1)
    config = small_demo_config()
    del config["demo"]  # nothing generates this mirror: the user made it
    config["hub"]["mirror"] = str(mirror)
    configfile = write_config(tmp_path, config)
    result = run_snakemake(tmp_path, configfile, "--printshellcmds", MANIFEST)
    assert result.returncode == 0, result.stderr[-3000:]

    in_mirror, fetched = mirror / DATASET / SPLIT, tmp_path / "resources/hub" / DATASET / SPLIT
    original = in_mirror.read_bytes()
    # The fix docs/reruns.md suggests, made in place (same inode, as an editor writing the file).
    with open(fetched, "r+b") as handle:
        handle.truncate(0)
        handle.write(b'{"edited": "in the working copy"}\n')
    assert in_mirror.read_bytes() == original
    assert plan(tmp_path, configfile, [MANIFEST]) == []

    # Touched (rsync without -t, a restore): same bytes, nothing to fetch.
    stat = in_mirror.stat()
    os.utime(in_mirror, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert plan(tmp_path, configfile, [MANIFEST]) == []

    # Repaired in the mirror: the next run fetches again, and then is settled.
    in_mirror.write_bytes(original.rstrip(b"\n") + b"\n" + original)
    assert MANIFEST in plan(tmp_path, configfile, [MANIFEST])
    result = run_snakemake(tmp_path, configfile, "--printshellcmds", MANIFEST)
    assert result.returncode == 0, result.stderr[-3000:]
    assert fetched.read_bytes() == in_mirror.read_bytes()
    recorded = {f["path"]: f["sha256"] for f in json.loads((tmp_path / MANIFEST).read_text())["files"]}
    assert len(recorded) > 1 and SPLIT in recorded
    assert plan(tmp_path, configfile, [MANIFEST]) == []
