"""Fetch a snapshot of a Hugging Face repository, from the hub or from an offline mirror.

The returned manifest pins what was fetched (the resolved commit for the hub, and every file's
size and sha256), so that later stages can check that the bytes they read are the bytes that
were fetched, and so that a run records exactly which dataset/model revision it used.

Hub access goes through `huggingface_hub`, which reads HF_ENDPOINT and HF_TOKEN from the
environment itself; this module never touches the token.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Union

from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.utils import filter_repo_objects

from egm.io import sha256_file

log = logging.getLogger(__name__)

REPO_TYPES = ("model", "dataset", "space")

# Bookkeeping folders that are never part of a repository's content: huggingface_hub keeps its
# download metadata in `.cache/` inside `local_dir`, and a mirror may be a git checkout.
_NOT_CONTENT = (".cache", ".git")


class FetchError(RuntimeError):
    """A snapshot could not be fetched (or fetched nothing)."""


class MirrorNotFoundError(FetchError, FileNotFoundError):
    """The offline mirror has no folder for the requested repository."""


class MissingRequiredFilesError(FetchError):
    """The repository (as selected by the allow patterns) lacks files the workflow needs."""


# `hub.mirror` of the config: one folder or a list of folders laid out as <folder>/<repo_id>/...
# (searched in order), or a mapping repo_id -> the folder holding that repository's own files.
MirrorSpec = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]], Mapping[str, Union[str, os.PathLike]], None]


def mirror_repo_dir(repo_id: str, mirror: MirrorSpec) -> Path | None:
    """The folder holding `repo_id`'s files in `mirror`, or None when it comes from the hub.

    A mapping names each repository's folder; a repository it does not name is fetched from the
    hub, so a site can mirror only its big repositories. A folder (or list of folders) must hold
    the repository as `<folder>/<repo_id>/`; the first that does wins, and none is an error that
    lists every folder searched.
    """
    if mirror is None:
        return None
    if isinstance(mirror, Mapping):
        if repo_id not in mirror:
            return None
        root = Path(mirror[repo_id])
        if not root.is_dir():
            raise MirrorNotFoundError(f"hub.mirror maps {repo_id!r} to {root}, which is not a folder")
        return root
    folders = [mirror] if isinstance(mirror, (str, os.PathLike)) else list(mirror)
    if not folders:
        raise ValueError("hub.mirror: an empty list of folders")
    for folder in folders:
        root = Path(folder) / repo_id
        if root.is_dir():
            return root
    searched = ", ".join(str(Path(folder) / repo_id) for folder in folders)
    raise MirrorNotFoundError(
        f"offline mirror {', '.join(map(str, folders))} has no repository {repo_id!r} (looked for the folder(s) {searched})"
    )


def missing_required(available: Sequence[str], required: Sequence[str]) -> list[str]:
    """The entries of `required` that `available` lacks: a path must be there, and a glob pattern
    (matched like allow_patterns) must match at least one file."""
    return [rel for rel in required if not list(filter_repo_objects(list(available), allow_patterns=[rel]))]


def _require(required: Sequence[str], repo_files: Sequence[str], selected: Sequence[str],
             allow_patterns: list[str] | None, what: str) -> None:
    """Fail, before anything is downloaded, when the selection lacks a file the workflow needs.

    Each missing file is named with why: no allow pattern selects it (the config's fault), or the
    repository itself does not have it (the mirror's or the revision's).
    """
    missing = missing_required(selected, required)
    if not missing:
        return
    absent = missing_required(repo_files, missing)
    unselected = [rel for rel in missing if rel not in absent]
    reasons = []
    if absent:
        reasons.append(f"not in the repository: {', '.join(absent)}")
    if unselected:
        reasons.append(f"in the repository but selected by no allow pattern: {', '.join(unselected)}")
    raise MissingRequiredFilesError(
        f"{what}: {len(missing)} file(s) the workflow needs are missing ({'; '.join(reasons)}); "
        f"asked for allow_patterns={allow_patterns}"
    )


def _is_content(rel: str) -> bool:
    return PurePosixPath(rel).parts[0] not in _NOT_CONTENT


def _select(paths: list[str], allow_patterns: list[str] | None) -> list[str]:
    # huggingface_hub's own filter, so that a pattern selects the same files from a mirror as
    # it would from the hub (fnmatch where `*` crosses `/`, and a trailing `/` means a folder).
    return sorted(filter_repo_objects([p for p in paths if _is_content(p)], allow_patterns=allow_patterns))


def _mirror_files(root: Path) -> list[str]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        rel_dir = Path(dirpath).relative_to(root)
        if rel_dir == Path("."):
            # Prune here rather than filter afterwards: a mirror's `.git` can be huge.
            dirnames[:] = [d for d in dirnames if d not in _NOT_CONTENT]
        for name in filenames:
            files.append((rel_dir / name).as_posix())
    return files


def _copy_bytes(src: Path, dst: Path) -> None:
    """Copy `src`'s bytes into the new file `dst`. copy_file_range lets filesystems with reflinks
    (btrfs, XFS) share the blocks copy-on-write, so a multi-GB archive part costs no space there;
    elsewhere it is a kernel-side copy."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        try:
            while os.copy_file_range(fin.fileno(), fout.fileno(), 1 << 30):
                pass
            return
        except OSError:
            # Kernel or filesystem without copy_file_range between these two: start again plainly.
            fin.seek(0)
            fout.seek(0)
            fout.truncate()
        shutil.copyfileobj(fin, fout, 1 << 20)


def _place(src: Path, dst: Path) -> list[int]:
    """Copy `src` to `dst` and return the source's size and mtime as they were when copied.

    A copy, never a link: the working copy is the user's to edit (docs/reruns.md), and a link
    would carry such an edit into their mirror, and an edit of the mirror into the fetched copy
    behind the workflow's back. The file appears under its final name in one rename, so an
    interrupted fetch never leaves a partial file that looks complete.
    """
    before = src.stat()
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        _copy_bytes(src, Path(tmp))
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return [before.st_size, before.st_mtime_ns]


def _file_entries(dest: Path, paths: list[str]) -> list[dict[str, Any]]:
    entries = []
    for rel in sorted(paths):
        local = dest / rel
        if not local.is_file():
            raise FetchError(f"{local}: expected after the fetch but not present")
        entries.append({"path": rel, "bytes": local.stat().st_size, "sha256": sha256_file(local)})
    return entries


def git_blob_sha1(path: Path) -> str:
    """The git object id of a file: how the hub identifies files that are not in LFS."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _digest(path: Path, algorithm: str) -> str:
    return sha256_file(path) if algorithm == "sha256" else git_blob_sha1(path)


def verify_digests(dest: Path, expected: dict[str, tuple[str, str]]) -> list[str]:
    """Paths under `dest` whose digest differs from `expected` ({path: (algorithm, hex)}).

    A missing file counts as bad. Algorithms: "sha256" or "git-sha1".
    """
    bad = []
    for rel, (algorithm, want) in sorted(expected.items()):
        local = Path(dest) / rel
        if not local.is_file() or _digest(local, algorithm) != want.lower():
            bad.append(rel)
    return bad


def _hub_digests(siblings, selected: list[str]) -> dict[str, tuple[str, str]]:
    wanted = set(selected)
    digests = {}
    for sibling in siblings or []:
        if sibling.rfilename not in wanted:
            continue
        if sibling.lfs is not None:
            digests[sibling.rfilename] = ("sha256", sibling.lfs.sha256)
        elif sibling.blob_id:
            digests[sibling.rfilename] = ("git-sha1", sibling.blob_id)
    return digests


def _from_mirror(repo_id: str, dest: Path, allow_patterns: list[str] | None, root: Path,
                 required: Sequence[str]) -> dict[str, list[int]]:
    """Copy the selected files; returns {path: [the mirror file's size, mtime_ns] when copied}."""
    files = _mirror_files(root)
    selected = _select(files, allow_patterns)
    _require(required, [p for p in files if _is_content(p)], selected, allow_patterns, f"{repo_id} from mirror {root}")
    return {rel: _place((root / rel).resolve(), dest / rel) for rel in selected}


def mirror_state(repo_id: str, mirror: MirrorSpec, allow_patterns: list[str] | None,
                 manifest: Mapping[str, Any] | None) -> dict[str, list[int]] | None:
    """{path: [size, mtime_ns]} of the mirror's selected files for `repo_id`, as a value that
    changes only when they differ from what `manifest` (the last fetch's) recorded; None when
    `repo_id` does not come from a mirror, or the mirror is not reachable from here (a compute
    node: fetches run on the submit host).

    The mirror lies outside the workflow's DAG, so Snakemake cannot see it change: the fetch
    rules pass this as a param (a changed param reruns the fetch), and the fetch records it in
    its manifest as `mirror_files`. It costs a directory walk and a stat per file: a multi-GB
    archive part is not read on every run. Only a file whose size or mtime differ from the
    record is read, and when its sha256 still equals the fetched copy's (touched, or copied anew
    with the same bytes) its recorded size and mtime stand, so the fetch does not rerun. Content
    changed under an unchanged size and mtime goes unnoticed: the price of not hashing the mirror
    every run.
    """
    try:
        root = mirror_repo_dir(repo_id, mirror)
    except FetchError:
        return None
    if root is None:
        return None
    if isinstance(allow_patterns, str):
        allow_patterns = [allow_patterns]
    manifest = manifest or {}
    recorded = manifest.get("mirror_files") or {}
    fetched = {entry["path"]: entry["sha256"] for entry in manifest.get("files", [])}
    state = {}
    for rel in _select(_mirror_files(root), allow_patterns):
        stat = (root / rel).stat()
        now, was = [stat.st_size, stat.st_mtime_ns], recorded.get(rel)
        same_bytes = was is not None and (was == now or (was[0] == now[0] and sha256_file(root / rel) == fetched.get(rel)))
        state[rel] = list(was) if same_bytes else now
    return state


def _from_hub(repo_id: str, dest: Path, repo_type: str, revision: str,
              allow_patterns: list[str] | None, checksums: dict[str, str],
              required: Sequence[str]) -> tuple[str, list[str]]:
    # Resolve first and download by sha: a branch that moves during the download would
    # otherwise mix files of two commits, and the manifest must name the commit actually used.
    info = HfApi().repo_info(repo_id, repo_type=repo_type, revision=revision, files_metadata=True)
    commit = info.sha
    if not commit:
        raise FetchError(f"{repo_type} {repo_id}@{revision}: the hub did not report a commit sha")
    files = [s.rfilename for s in (info.siblings or [])]
    selected = _select(files, allow_patterns)
    _require(required, files, selected, allow_patterns, f"{repo_type} {repo_id}@{commit} on the hub")
    if not selected:
        return commit, selected
    expected = _hub_digests(info.siblings, selected)
    expected.update({rel: ("sha256", digest) for rel, digest in checksums.items() if rel in selected})

    def download(patterns: list[str] | None) -> None:
        snapshot_download(repo_id, repo_type=repo_type, revision=commit, local_dir=dest, allow_patterns=patterns)

    download(allow_patterns)
    bad = verify_digests(dest, expected)
    if bad:
        # Only the damaged files are fetched again; everything that verified stays.
        log.warning("%s: %d file(s) failed verification, downloading them again: %s", repo_id, len(bad), bad)
        for rel in bad:
            with contextlib.suppress(FileNotFoundError):
                (dest / rel).unlink()
        download(bad)
        bad = verify_digests(dest, expected)
    if bad:
        raise FetchError(f"{repo_type} {repo_id}@{commit}: downloaded file(s) do not match the hub's digests: {bad}")
    return commit, selected


def fetch_snapshot(
    repo_id: str,
    dest: Path,
    *,
    repo_type: str = "model",
    revision: str = "main",
    allow_patterns: list[str] | None = None,
    mirror: MirrorSpec = None,
    checksums: dict[str, str] | None = None,
    required: Sequence[str] = (),
    mirror_files: Mapping[str, Sequence[int]] | None = None,
) -> dict:
    """Fetch `repo_id` (files matching `allow_patterns`, all if None) into `dest`.

    With `mirror` (see mirror_repo_dir), files are copied from the mirror's folder of the
    repository (no revisions there: `commit` is None; `revision` is only recorded), and the
    manifest's `mirror_files` records each source file's [size, mtime_ns]: as `mirror_files`
    gives them (mirror_state's value that decided this fetch, so that the next run computes the
    same value), else as copied.
    Returns the manifest; writing it is the caller's job. Raises FetchError when nothing matches `allow_patterns`,
    since an empty fetch is always a misconfigured pattern or repository rather than something
    to carry on with.

    `required` lists what the caller cannot do without (paths, or patterns that must match at
    least one file): one missing fails the fetch before any file is placed or downloaded,
    naming it and the allow patterns asked for (MissingRequiredFilesError).

    Every hub download is checked against the hub's digests (LFS sha256, else the git blob id)
    and files that fail are downloaded once more. `checksums` ({path: sha256}, e.g. from the
    config) are checked for both sources; a mirror file that fails them is an error.
    """
    checksums = dict(checksums or {})
    if repo_type not in REPO_TYPES:
        raise ValueError(f"repo_type must be one of {REPO_TYPES}, got {repo_type!r}")
    if isinstance(allow_patterns, str):
        allow_patterns = [allow_patterns]
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)

    root = mirror_repo_dir(repo_id, mirror)
    if root is not None:
        if revision != "main":
            log.warning("%s: a mirror holds one snapshot; revision %r is recorded, not checked", repo_id, revision)
        copied = _from_mirror(repo_id, dest, allow_patterns, root, required)
        given = mirror_files or {}
        mirror_files = {rel: list(given.get(rel, stat)) for rel, stat in copied.items()}
        commit, selected, source = None, sorted(copied), "mirror"
        where = f"mirror {root}"
        bad = verify_digests(dest, {rel: ("sha256", d) for rel, d in checksums.items() if rel in selected})
        if bad:
            raise FetchError(f"{repo_id} from mirror {root}: file(s) do not match the configured checksums: {bad}")
    else:
        if mirror is not None:
            log.info("%s: not named in the mirror mapping, fetched from the hub", repo_id)
        commit, selected = _from_hub(repo_id, dest, repo_type, revision, allow_patterns, checksums, required)
        source, where, mirror_files = "hub", f"the hub (revision {revision})", None
    if not selected:
        raise FetchError(f"{repo_type} {repo_id} from {where}: no file matches allow_patterns={allow_patterns}")
    unfetched = sorted(set(checksums) - set(selected))
    if unfetched:
        raise FetchError(f"{repo_id}: checksums are configured for files that were not fetched: {unfetched}")

    manifest = {
        "repo_id": repo_id,
        "repo_type": repo_type,
        "revision": revision,
        "commit": commit,
        "source": source,
        "files": _file_entries(dest, selected),
    }
    if mirror_files is not None:
        # What mirror_state compares the mirror with on later runs.
        manifest["mirror_files"] = mirror_files
    return manifest

