"""Provenance records: the code's commit, the image digest, input manifests, and their table form."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess

import pytest

from egm import provenance as prov
from egm.cli import main as egm_main

GIT = shutil.which("git")


def _git(repo, *args):
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org"}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env=env).stdout


# Skipped without git on a developer machine only: in CI (EGM_CI=1) a missing git fails the test.
@pytest.mark.skipif(GIT is None and os.environ.get("EGM_CI") != "1", reason="needs git")
def test_code_record_names_the_commit_with_and_without_the_git_binary(tmp_path, monkeypatch):
    _git(tmp_path, "init", "-q", "-b", "main")
    (tmp_path / "a.txt").write_text("1")
    _git(tmp_path, "add", "a.txt")
    _git(tmp_path, "commit", "-q", "-m", "one")
    head = _git(tmp_path, "rev-parse", "HEAD").strip()

    assert prov.code_record(tmp_path) == {"version": prov.code_record()["version"], "commit": head, "dirty": False}
    (tmp_path / "a.txt").write_text("2")
    assert prov.code_record(tmp_path)["dirty"] is True

    # Inside the CPU image there is no git: the commit is read from .git's files, even once
    # refs are packed; whether the tree is dirty is then unknown, not "clean".
    _git(tmp_path, "pack-refs", "--all")
    assert not (tmp_path / ".git/refs/heads/main").exists()
    monkeypatch.setattr(prov.shutil, "which", lambda name: None)
    assert prov.code_record(tmp_path)["commit"] == head
    assert prov.code_record(tmp_path)["dirty"] is None


def test_code_record_outside_a_checkout(tmp_path):
    record = prov.code_record(tmp_path)
    assert record["commit"] is None and record["version"]


def test_image_digest_is_cached_beside_the_image_and_refreshed_when_it_changes(tmp_path):
    image = tmp_path / "cpu-abc.sif"
    image.write_bytes(b"image one")
    env = {"APPTAINER_CONTAINER": str(image), "EGM_IMAGE": "cpu-abc"}
    record = prov.image_record(env)
    assert record == {"name": "cpu-abc", "path": str(image), "sha256": hashlib.sha256(b"image one").hexdigest()}
    cache = tmp_path / "cpu-abc.sif.sha256"
    assert json.loads(cache.read_text())["sha256"] == record["sha256"]

    # An unchanged image is not read again: the cached digest is what comes back.
    cached = json.loads(cache.read_text())
    cache.write_text(json.dumps({**cached, "sha256": "0" * 64}))
    assert prov.image_record(env)["sha256"] == "0" * 64
    # A rebuilt image (new size and mtime) is hashed afresh.
    image.write_bytes(b"image number two")
    assert prov.image_record(env)["sha256"] == hashlib.sha256(b"image number two").hexdigest()


def test_image_record_outside_a_container():
    assert prov.image_record({}) == {"name": None, "path": None, "sha256": None}


def test_manifest_records_of_a_fetched_and_a_trained_model(tmp_path):
    fetched = tmp_path / "model.json"
    fetched.write_text(json.dumps({"repo_id": "org/m", "revision": "main", "commit": "a" * 40, "files": []}))
    record = prov.manifest_record(fetched)
    assert (record["repo_id"], record["revision"], record["commit"]) == ("org/m", "main", "a" * 40)
    assert record["manifest_sha256"] == hashlib.sha256(fetched.read_bytes()).hexdigest()

    trained = tmp_path / "sft.json"
    trained.write_text(json.dumps({"stage": "sft", "run": "tiny", "global_step": 12, "files": []}))
    record = prov.manifest_record(trained)
    assert (record["repo_id"], record["revision"], record["commit"]) == ("trained:tiny/sft", "step 12", None)
    row = prov.flatten({"model": record})
    assert row["model_commit"] == "manifest:" + record["manifest_sha256"]


def _fake_distribution(site, name, version):
    """An installed-looking distribution (just its metadata) that importlib.metadata will find."""
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_engine_record_names_the_package_that_answered(tmp_path, monkeypatch):
    # Versions no real release has, on a path searched first: the record must read the package's
    # own metadata, whatever is (or is not) installed here.
    site = tmp_path / "site"
    _fake_distribution(site, "vllm", "0.0.0.post77")
    _fake_distribution(site, "sglang", "0.0.0.post78")
    _fake_distribution(site, "transformers", "0.0.0.post79")
    _fake_distribution(site, "torch", "0.0.0.post80")
    monkeypatch.syspath_prepend(str(site))

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert prov.engine_record("vllm") == {"backend": "vllm", "package": "vllm", "version": "0.0.0.post77",
                                          "torch": "0.0.0.post80", "protocol": {
                                              "mode": "offline", "data_parallel": 1, "tensor_parallel": 1,
                                              "in_flight": None}}
    assert prov.engine_record("hf")["package"] == "transformers"
    assert prov.engine_record("hf")["version"] == "0.0.0.post79"
    assert prov.engine_record("fast")["version"] == "0.0.0.post79"
    server = prov.engine_record("server", {"server": "sglang"})
    assert (server["package"], server["version"]) == ("sglang", "0.0.0.post78")
    assert prov.engine_record("server")["version"] == "0.0.0.post77"  # vLLM is the default server
    external = prov.engine_record("server", {"url": "http://127.0.0.1:1"})
    assert (external["package"], external["version"]) == ("external", None)
    assert external["protocol"]["mode"] == "external server" and external["protocol"]["data_parallel"] is None
    # A package that is not installed has no version, rather than an error or a guess.
    missing = prov.engine_record("server", {"server": "egm-no-such-engine"})
    assert (missing["package"], missing["version"]) == ("egm-no-such-engine", None)


def test_merge_and_short():
    a = {**dict.fromkeys(prov.FIELDS, ""), "model_commit": "a" * 40, "egm": "0.1.0 @ " + "e" * 40 + "-dirty"}
    b = {**a, "model_commit": "b" * 40}
    merged = prov.merge([a, b, a])
    assert merged["model_commit"] == "a" * 40 + "; " + "b" * 40
    short = prov.short(merged)
    assert short["model_commit"] == "a" * 12 + "; " + "b" * 12
    assert short["egm"] == "0.1.0 @ " + "e" * 12 + "-dirty"


def test_score_copies_the_predict_run_record_into_the_metrics(tmp_path):
    row = {"line": 1, "answer": '{"bbox_2d": [0, 0, 500, 500]}', "bbox": [0, 0, 10, 10], "width": 20,
           "height": 20, "completion_tokens": 5, "latency_s": 0.1, "status": "ok"}
    predictions = tmp_path / "refcoco_val.jsonl"
    predictions.write_text(json.dumps(row) + "\n")
    run = {"model_key": "m", "model": {"repo_id": "org/m", "commit": "a" * 40}, "data": None,
           "job": {"engine": {"backend": "hf"}, "config": {"prompt": "qwen3"}, "config_sha256": "f" * 64}}
    (tmp_path / "run.json").write_text(json.dumps(run))
    out = tmp_path / "metrics.json"
    assert egm_main(["score", str(predictions), str(out), "--model", "m", "--split", "refcoco_val",
                     "--run-record", str(tmp_path / "run.json")]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["acc_at_0.5"] == 1.0
    recorded = metrics["provenance"]
    assert recorded["model"] == run["model"] and recorded["job"] == run["job"]
    assert recorded["predictions"]["sha256"] == hashlib.sha256(predictions.read_bytes()).hexdigest()
    assert recorded["scored_by"]["egm"]["version"]


def test_image_digest_handed_over_by_the_workflow_wins(tmp_path):
    # The job cannot see the file (a symlink whose target is outside its binds): the digest the
    # workflow computed on the host, keyed by file name, is used.
    env = {"APPTAINER_CONTAINER": str(tmp_path / "missing" / "cpu-abc.sif"), "EGM_IMAGE": "cpu-abc",
           prov.IMAGE_DIGESTS_ENV: json.dumps({"cpu-abc.sif": "9" * 64})}
    assert prov.image_record(env)["sha256"] == "9" * 64
    env[prov.IMAGE_DIGESTS_ENV] = json.dumps({"other.sif": "9" * 64})
    assert prov.image_record(env)["sha256"] is None
