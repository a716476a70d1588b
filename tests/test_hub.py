import hashlib
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from egm.data import hub
from egm.data.hub import FetchError, MirrorNotFoundError, fetch_snapshot

REPO = "org/EGM_Datasets"
FILES = {
    "README.md": b"readme\n",
    "metadata/eval/refcoco_val.jsonl": b'{"a": 1}\n',
    "metadata/eval/refcoco_testA.jsonl": b'{"a": 2}\n',
    "processed_rl_data/train_grounding.parquet": b"PAR1 not really",
    "coco.tar.part_aa": b"x" * 1000,
    "coco.tar.part_ab": b"y" * 10,
    ".cache/huggingface/download/README.md.metadata": b"bookkeeping",
}


def _mirror(tmp_path: Path) -> Path:
    mirror = tmp_path / "mirror"
    for rel, data in FILES.items():
        path = mirror / REPO / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return mirror


def test_mirror_fetch_with_patterns_and_manifest(tmp_path):
    mirror = _mirror(tmp_path)
    dest = tmp_path / "dest"
    manifest = fetch_snapshot(REPO, dest, repo_type="dataset", allow_patterns=["metadata/eval/*", "*.parquet"],
                              mirror=mirror)
    assert manifest["source"] == "mirror" and manifest["commit"] is None
    assert manifest["repo_id"] == REPO and manifest["repo_type"] == "dataset" and manifest["revision"] == "main"
    paths = [f["path"] for f in manifest["files"]]
    assert paths == sorted(paths) == [
        "metadata/eval/refcoco_testA.jsonl",
        "metadata/eval/refcoco_val.jsonl",
        "processed_rl_data/train_grounding.parquet",
    ]
    for entry in manifest["files"]:
        data = FILES[entry["path"]]
        assert entry["bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert (dest / entry["path"]).read_bytes() == data
    assert not (dest / "README.md").exists() and not (dest / "coco.tar.part_aa").exists()
    # Copies, never links, even on the mirror's filesystem: the mirror is only read.
    assert not any(os.path.samefile(dest / rel, mirror / REPO / rel) for rel in paths)
    assert manifest["mirror_files"] == {
        rel: [len(FILES[rel]), (mirror / REPO / rel).stat().st_mtime_ns] for rel in paths
    }


def test_mirror_fetch_all_excludes_cache_and_is_rerunnable(tmp_path):
    mirror = _mirror(tmp_path)
    dest = tmp_path / "dest"
    first = fetch_snapshot(REPO, dest, repo_type="dataset", mirror=mirror)
    again = fetch_snapshot(REPO, dest, repo_type="dataset", mirror=mirror)
    assert first == again
    assert {f["path"] for f in first["files"]} == {p for p in FILES if not p.startswith(".cache/")}
    assert not list(dest.rglob("*.tmp"))


def test_editing_the_fetched_copy_leaves_the_mirror_alone_and_vice_versa(tmp_path):
    mirror = _mirror(tmp_path)
    dest = tmp_path / "dest"
    fetch_snapshot(REPO, dest, repo_type="dataset", allow_patterns=["metadata/eval/*"], mirror=mirror)
    split = "metadata/eval/refcoco_val.jsonl"
    # In place (same inode, as an editor that truncates and writes does), then appended to.
    with open(dest / split, "r+b") as handle:
        handle.write(b'{"fixed": 1}\n')
    with open(dest / split, "ab") as handle:
        handle.write(b"more\n")
    assert (mirror / REPO / split).read_bytes() == FILES[split]
    (mirror / REPO / split).write_bytes(b"changed in the mirror\n")
    assert (dest / split).read_bytes() == b'{"fixed": 1}\nmore\n'


def test_mirror_fetch_falls_back_to_a_plain_copy(tmp_path, monkeypatch):
    mirror = _mirror(tmp_path)

    def no_copy_file_range(*args, **kwargs):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(hub.os, "copy_file_range", no_copy_file_range)
    dest = tmp_path / "dest"
    manifest = fetch_snapshot(REPO, dest, repo_type="dataset", allow_patterns=["coco.tar.part_*"], mirror=mirror)
    assert [f["path"] for f in manifest["files"]] == ["coco.tar.part_aa", "coco.tar.part_ab"]
    assert (dest / "coco.tar.part_aa").read_bytes() == FILES["coco.tar.part_aa"]


def test_mirror_state_follows_content_not_touches(tmp_path, monkeypatch):
    """What the fetch rules do: the state is a param (a change reruns the fetch), and the fetch
    records it. It must stay put while the mirror's bytes do, without reading them."""
    mirror = _mirror(tmp_path)
    patterns = ["metadata/eval/*", "coco.tar.part_*"]

    def state(manifest):
        return hub.mirror_state(REPO, mirror, patterns, manifest)

    def fetch(param):
        return fetch_snapshot(REPO, tmp_path / "dest", repo_type="dataset", allow_patterns=patterns, mirror=mirror,
                              mirror_files=param)

    before = state(None)  # the first run: no manifest yet
    manifest = fetch(before)
    assert state(manifest) == before  # the next run: no refetch

    hashed, real_sha256 = [], hub.sha256_file
    monkeypatch.setattr(hub, "sha256_file", lambda path: hashed.append(Path(path).name) or real_sha256(path))
    assert state(manifest) == before and hashed == []  # unchanged: a stat per file, nothing read

    part = mirror / REPO / "coco.tar.part_aa"
    os.utime(part, ns=(part.stat().st_atime_ns, part.stat().st_mtime_ns + 10**9))
    assert state(manifest) == before and hashed == ["coco.tar.part_aa"]  # touched: same bytes, no refetch

    split = mirror / REPO / "metadata/eval/refcoco_val.jsonl"
    split.write_bytes(b'{"a": 9}\n')  # same size, new content
    changed = state(manifest)
    assert changed != before
    manifest = fetch(changed)
    assert (tmp_path / "dest/metadata/eval/refcoco_val.jsonl").read_bytes() == b'{"a": 9}\n'
    assert state(manifest) == changed  # refetched once, then stable (the touched part included)

    (mirror / REPO / "metadata/eval/refcoco_testB.jsonl").write_bytes(b"{}\n")
    assert state(manifest) != changed  # a new file in the selection counts too
    assert hub.mirror_state(REPO, None, patterns, manifest) is None
    assert hub.mirror_state(REPO, tmp_path / "nowhere", patterns, manifest) is None


def test_missing_mirror_repo_is_named(tmp_path):
    mirror = _mirror(tmp_path)
    with pytest.raises(MirrorNotFoundError, match="org/Other"):
        fetch_snapshot("org/Other", tmp_path / "dest", mirror=mirror)


def test_pattern_matching_nothing_fails(tmp_path):
    mirror = _mirror(tmp_path)
    with pytest.raises(FetchError, match="no file matches"):
        fetch_snapshot(REPO, tmp_path / "dest", repo_type="dataset", allow_patterns=["nope/*"], mirror=mirror)


def _siblings():
    # What the hub reports with files_metadata=True: LFS files carry sha256, others a git blob id.
    out = []
    for rel, data in FILES.items():
        if rel.startswith("."):
            continue
        if rel.startswith("coco.tar"):
            out.append(SimpleNamespace(rfilename=rel, lfs=SimpleNamespace(sha256=hashlib.sha256(data).hexdigest()), blob_id=None))
        else:
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            out.append(SimpleNamespace(rfilename=rel, lfs=None, blob_id=blob))
    return out


def test_git_blob_sha1_matches_git(tmp_path):
    import subprocess

    path = tmp_path / "f.txt"
    path.write_bytes(b"hello\nworld\n")
    expected = subprocess.run(["git", "hash-object", str(path)], capture_output=True, text=True, check=True).stdout.strip()
    assert hub.git_blob_sha1(path) == expected


def test_hub_fetch_redownloads_only_the_corrupted_file(tmp_path, monkeypatch):
    downloads = []

    class FakeHubApi:
        def repo_info(self, repo_id, **kwargs):
            assert kwargs.get("files_metadata") is True
            return SimpleNamespace(sha="f" * 40, siblings=_siblings())

    def fake_hub_download(repo_id, *, local_dir=None, allow_patterns=None, **kwargs):
        downloads.append(allow_patterns)
        for rel in ("coco.tar.part_aa", "coco.tar.part_ab"):
            if rel in allow_patterns or "coco.tar.part_*" in allow_patterns:
                data = FILES[rel]
                if len(downloads) == 1 and rel == "coco.tar.part_ab":
                    data = b"z" * len(data)  # corrupted in transit, same size
                (Path(local_dir) / rel).write_bytes(data)

    monkeypatch.setattr(hub, "HfApi", FakeHubApi)
    monkeypatch.setattr(hub, "snapshot_download", fake_hub_download)
    dest = tmp_path / "d"
    manifest = fetch_snapshot(REPO, dest, repo_type="dataset", allow_patterns=["coco.tar.part_*"])
    assert downloads == [["coco.tar.part_*"], ["coco.tar.part_ab"]]
    assert (dest / "coco.tar.part_ab").read_bytes() == FILES["coco.tar.part_ab"]
    assert {f["path"] for f in manifest["files"]} == {"coco.tar.part_aa", "coco.tar.part_ab"}


def test_hub_fetch_fails_naming_a_file_that_stays_corrupt(tmp_path, monkeypatch):
    class FakeHubApi:
        def repo_info(self, repo_id, **kwargs):
            return SimpleNamespace(sha="f" * 40, siblings=_siblings())

    def always_corrupt(repo_id, *, local_dir=None, allow_patterns=None, **kwargs):
        (Path(local_dir) / "coco.tar.part_aa").write_bytes(b"broken")

    monkeypatch.setattr(hub, "HfApi", FakeHubApi)
    monkeypatch.setattr(hub, "snapshot_download", always_corrupt)
    with pytest.raises(FetchError, match="coco.tar.part_aa"):
        fetch_snapshot(REPO, tmp_path / "d", repo_type="dataset", allow_patterns=["coco.tar.part_aa"])


def test_mirror_checksums_are_verified(tmp_path):
    mirror = _mirror(tmp_path)
    good = hashlib.sha256(FILES["README.md"]).hexdigest()
    manifest = fetch_snapshot(REPO, tmp_path / "ok", mirror=mirror, allow_patterns=["README.md"], checksums={"README.md": good})
    assert manifest["files"][0]["sha256"] == good
    with pytest.raises(FetchError, match="README.md"):
        fetch_snapshot(REPO, tmp_path / "bad", mirror=mirror, allow_patterns=["README.md"], checksums={"README.md": "0" * 64})
    with pytest.raises(FetchError, match="not fetched"):
        fetch_snapshot(REPO, tmp_path / "x", mirror=mirror, allow_patterns=["README.md"], checksums={"other.bin": good})


def test_hub_fetch_resolves_revision_and_downloads_by_sha(tmp_path, monkeypatch):
    sha = "0123456789abcdef0123456789abcdef01234567"
    calls = {}

    class FakeApi:
        def repo_info(self, repo_id, *, repo_type=None, revision=None, **kwargs):
            calls["info"] = (repo_id, repo_type, revision)
            return SimpleNamespace(sha=sha, siblings=_siblings())

    def fake_download(repo_id, *, repo_type=None, revision=None, local_dir=None, allow_patterns=None, **kwargs):
        calls["download"] = (repo_id, repo_type, revision, allow_patterns)
        for rel in ("metadata/eval/refcoco_val.jsonl", "metadata/eval/refcoco_testA.jsonl"):
            path = Path(local_dir) / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(FILES[rel])
        (Path(local_dir) / ".cache/huggingface").mkdir(parents=True)
        (Path(local_dir) / ".cache/huggingface/x.metadata").write_text("meta")
        return str(local_dir)

    monkeypatch.setattr(hub, "HfApi", FakeApi)
    monkeypatch.setattr(hub, "snapshot_download", fake_download)
    manifest = fetch_snapshot(REPO, tmp_path / "d", repo_type="dataset", revision="v1",
                              allow_patterns=["metadata/eval/*.jsonl"])
    assert calls["info"] == (REPO, "dataset", "v1")
    assert calls["download"] == (REPO, "dataset", sha, ["metadata/eval/*.jsonl"])
    assert manifest["commit"] == sha and manifest["revision"] == "v1" and manifest["source"] == "hub"
    assert [f["path"] for f in manifest["files"]] == ["metadata/eval/refcoco_testA.jsonl",
                                                      "metadata/eval/refcoco_val.jsonl"]


def test_missing_required_files_fail_before_anything_is_placed(tmp_path):
    """Issue 18 point 3: a mirror without files the DAG needs fails naming them and the patterns,
    instead of 'fetched N files' and a MissingOutputException later."""
    mirror = _mirror(tmp_path)
    dest = tmp_path / "dest"
    patterns = ["metadata/eval/*.jsonl", "coco.tar.part_*", "README.md"]
    required = ["metadata/eval/refcoco_val.jsonl", "metadata/eval/refcocog_test.jsonl",
                "processed_rl_data/train_grounding.parquet", "coco_flip.tar", "coco.tar.part_*"]
    with pytest.raises(hub.MissingRequiredFilesError) as err:
        fetch_snapshot(REPO, dest, repo_type="dataset", allow_patterns=patterns, mirror=mirror, required=required)
    message = str(err.value)
    assert "3 file(s)" in message and str(mirror / REPO) in message
    assert "not in the repository: metadata/eval/refcocog_test.jsonl, coco_flip.tar" in message
    assert "selected by no allow pattern: processed_rl_data/train_grounding.parquet" in message
    assert str(patterns) in message
    assert not dest.exists() or not any(dest.rglob("*"))
    # Present, a pattern matching at least one file: fine.
    manifest = fetch_snapshot(REPO, dest, repo_type="dataset", allow_patterns=patterns, mirror=mirror,
                              required=["metadata/eval/refcoco_val.jsonl", "coco.tar.part_*"])
    assert len(manifest["files"]) == 5


def test_hub_fetch_checks_required_files_before_downloading(tmp_path, monkeypatch):
    class FakeApi:
        def repo_info(self, repo_id, **kwargs):
            return SimpleNamespace(sha="a" * 40, siblings=_siblings())

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded although a required file is missing")

    monkeypatch.setattr(hub, "HfApi", FakeApi)
    monkeypatch.setattr(hub, "snapshot_download", no_download)
    with pytest.raises(hub.MissingRequiredFilesError, match=r"on the hub.*not in the repository: coco_flip\.tar"):
        fetch_snapshot(REPO, tmp_path / "d", repo_type="dataset", required=["coco_flip.tar"])


def test_mirror_may_be_a_list_of_folders_or_a_mapping(tmp_path, monkeypatch):
    """Issue 18 point 5: the data set and the models in folders of their own."""
    datasets = _mirror(tmp_path)  # holds REPO
    models = tmp_path / "models"
    (models / "org/model").mkdir(parents=True)
    (models / "org/model/config.json").write_text("{}")
    # A list: searched in order, the first folder holding the repo wins.
    got = fetch_snapshot("org/model", tmp_path / "m1", mirror=[datasets, models])
    assert got["source"] == "mirror" and [f["path"] for f in got["files"]] == ["config.json"]
    got = fetch_snapshot(REPO, tmp_path / "d1", repo_type="dataset", mirror=[models, datasets], allow_patterns=["README.md"])
    assert [f["path"] for f in got["files"]] == ["README.md"]
    with pytest.raises(MirrorNotFoundError, match=r"org/none.*" + str(models / "org/none")):
        fetch_snapshot("org/none", tmp_path / "x", mirror=[datasets, models])
    # A mapping: repo id -> the folder of that repo's own files, any name.
    flat = tmp_path / "qwen-8b-local"
    flat.mkdir()
    (flat / "weights.bin").write_bytes(b"w")
    mapping = {"org/model": str(flat), REPO: str(datasets / REPO)}
    got = fetch_snapshot("org/model", tmp_path / "m2", mirror=mapping)
    assert [f["path"] for f in got["files"]] == ["weights.bin"]
    assert hub.mirror_repo_dir(REPO, mapping) == datasets / REPO
    with pytest.raises(MirrorNotFoundError, match="not a folder"):
        hub.mirror_repo_dir("org/model", {"org/model": str(tmp_path / "gone")})
    # A repo the mapping does not name comes from the hub.
    assert hub.mirror_repo_dir("org/unnamed", mapping) is None
    monkeypatch.setattr(hub, "HfApi", lambda: SimpleNamespace(
        repo_info=lambda *a, **k: SimpleNamespace(sha="b" * 40, siblings=[])))
    with pytest.raises(FetchError, match="the hub"):
        fetch_snapshot("org/unnamed", tmp_path / "h", mirror=mapping)
