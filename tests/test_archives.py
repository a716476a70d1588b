import hashlib
import io
import random
import string
import tarfile
from pathlib import Path

import pytest

from egm.data.archives import (
    ArchiveError,
    CorruptArchiveError,
    MissingPartError,
    PartChecksumError,
    TruncatedArchiveError,
    UnexpectedPartError,
    UnsafeMemberError,
    archive_files,
    extract_archive,
    part_files,
)

LETTERS = string.ascii_lowercase


def suffix(i: int) -> str:
    return LETTERS[i // 26] + LETTERS[i % 26]


def make_tar(files: dict[str, bytes], root: str = "coco") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for d in (root, f"{root}/train2014"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(f"{root}/train2014/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sample_files(n: int = 12, big: bool = True) -> dict[str, bytes]:
    # Sizes not multiples of 512 and a large one, so members straddle part boundaries.
    files = {f"COCO_train2014_{i:012d}.jpg": bytes([i % 250 + 1]) * (700 + 977 * i) for i in range(n)}
    if big:
        files["big.jpg"] = random.Random(0).randbytes(64 * 1024)
    return files


def split_bytes(data: bytes, directory: Path, n_parts: int, stem: str = "coco.tar") -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    size = -(-len(data) // n_parts)
    paths = []
    for i in range(n_parts):
        path = directory / f"{stem}.part_{suffix(i)}"
        path.write_bytes(data[i * size:(i + 1) * size])
        paths.append(path)
    return paths


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def tree_with_hidden(root: Path) -> dict[str, bytes | None]:
    """Every entry under `root`, hidden ones included: folders map to None."""
    return {p.relative_to(root).as_posix(): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def assert_no_leftovers(dest: Path, tar_size: int | None = None):
    for path in dest.rglob("*"):
        assert not path.name.endswith((".partial", ".tmp", ".tar")), path
        if tar_size is not None and path.is_file():
            assert path.stat().st_size < tar_size, path


def test_streamed_parts_equal_plain_extraction(tmp_path):
    data = make_tar(sample_files())
    parts_dir = tmp_path / "parts"
    written = split_bytes(data, parts_dir, 7)
    plain = tmp_path / "plain"
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(plain, filter="data")

    dest = tmp_path / "images"
    parts = part_files(parts_dir)
    assert parts == written
    manifest = extract_archive(parts, dest, expected_parts=[p.name for p in written])
    assert tree(dest) == tree(plain)
    assert manifest["archive"] == "coco.tar"
    assert manifest["dest"] == str(dest)
    assert manifest["n_files"] == len(sample_files())
    assert manifest["n_bytes"] == sum(len(v) for v in sample_files().values())
    assert [p["name"] for p in manifest["parts"]] == [p.name for p in written]
    for entry, path in zip(manifest["parts"], written):
        assert entry["bytes"] == path.stat().st_size
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert_no_leftovers(dest, len(data))
    assert not any(p.name.endswith(".tar") for p in tmp_path.rglob("*"))


def test_single_tar_and_manifest_entries(tmp_path):
    data = make_tar({"a.jpg": b"a" * 10, "b.jpg": b"b" * 600}, root="coco_flip")
    archive = tmp_path / "coco_flip.tar"
    archive.write_bytes(data)
    entry = {"path": "coco_flip.tar", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = extract_archive([archive], tmp_path / "out", expected_parts=[entry])
    assert manifest["archive"] == "coco_flip.tar"
    assert manifest["n_files"] == 2 and manifest["n_bytes"] == 610
    assert (tmp_path / "out/coco_flip/train2014/b.jpg").read_bytes() == b"b" * 600

    bad = dict(entry, sha256="0" * 64)
    with pytest.raises(PartChecksumError, match="coco_flip.tar"):
        extract_archive([archive], tmp_path / "out2", expected_parts=[bad])
    with pytest.raises(PartChecksumError, match="coco_flip.tar"):
        extract_archive([archive], tmp_path / "out3", expected_parts=[dict(entry, bytes=1)])


def test_part_order_beyond_26_parts(tmp_path):
    data = make_tar(sample_files(3))
    written = split_bytes(data, tmp_path / "parts", 28)
    names = [p.name.rsplit("_", 1)[1] for p in part_files(tmp_path / "parts")]
    assert names == [suffix(i) for i in range(28)]
    assert names[25:] == ["az", "ba", "bb"]
    dest = tmp_path / "out"
    extract_archive(part_files(tmp_path / "parts"), dest)
    assert tree(dest)["coco/train2014/big.jpg"] == sample_files(3)["big.jpg"]
    assert len(written) == 28


def test_gnu_widened_suffixes_are_ordered(tmp_path):
    d = tmp_path / "parts"
    d.mkdir()
    for s in ["aa", "yz", "zaaa", "zaab"] + [LETTERS[i // 26] + LETTERS[i % 26] for i in range(1, 649)]:
        (d / f"coco.tar.part_{s}").write_bytes(b"")
    names = [p.name.rsplit("_", 1)[1] for p in part_files(d)]
    assert names[:2] == ["aa", "ab"] and names[-3:] == ["yz", "zaaa", "zaab"]
    (d / "coco.tar.part_zaaa").unlink()
    with pytest.raises(MissingPartError, match=r"coco\.tar\.part_zaaa"):
        part_files(d)


def test_missing_middle_part_is_named(tmp_path):
    split_bytes(make_tar(sample_files(3)), tmp_path / "parts", 4)
    (tmp_path / "parts/coco.tar.part_ab").unlink()
    with pytest.raises(MissingPartError, match=r"coco\.tar\.part_ab") as err:
        part_files(tmp_path / "parts")
    assert err.value.part == "coco.tar.part_ab"


def test_missing_first_part_and_no_parts(tmp_path):
    split_bytes(make_tar(sample_files(3)), tmp_path / "parts", 3)
    (tmp_path / "parts/coco.tar.part_aa").unlink()
    with pytest.raises(MissingPartError, match=r"part_aa"):
        part_files(tmp_path / "parts")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingPartError, match="no coco.tar.part_"):
        part_files(tmp_path / "empty")


def test_missing_last_part_named_from_fetch_manifest(tmp_path):
    written = split_bytes(make_tar(sample_files(3)), tmp_path / "parts", 3)
    expected = [p.name for p in written]
    written[-1].unlink()
    with pytest.raises(MissingPartError, match=r"coco\.tar\.part_ac"):
        extract_archive(part_files(tmp_path / "parts"), tmp_path / "out", expected_parts=expected)
    assert not (tmp_path / "out").exists()
    with pytest.raises(UnexpectedPartError, match="part_ab"):
        extract_archive(written[:2], tmp_path / "out", expected_parts=expected[:1])


def test_truncated_last_part_is_named(tmp_path):
    files = sample_files()
    data = make_tar(files)
    written = split_bytes(data, tmp_path / "parts", 4)
    last = written[-1]
    # Cut inside the data of the last member ("big.jpg", 64 KiB, ends the archive).
    last.write_bytes(last.read_bytes()[: -(1024 + 20000)])
    dest = tmp_path / "out"
    with pytest.raises(TruncatedArchiveError, match=r"coco\.tar\.part_ad") as err:
        extract_archive(written, dest)
    assert "big.jpg" in str(err.value) and err.value.member.endswith("big.jpg")
    assert not (dest / "coco/train2014/big.jpg").exists()
    assert_no_leftovers(dest)


def test_truncated_between_members_is_detected(tmp_path):
    data = make_tar({"a.jpg": b"a" * 512, "b.jpg": b"b" * 512})
    # Drop b's header and everything after: tarfile alone would call that a complete archive.
    cut = data[: 3 * 512 + 512]
    archive = tmp_path / "coco_flip.tar"
    archive.write_bytes(cut)
    with pytest.raises(TruncatedArchiveError, match="coco_flip.tar.*a.jpg"):
        extract_archive([archive], tmp_path / "out")


def test_short_middle_part_is_detected(tmp_path):
    # tar has no data checksums: a short part is only visible when a header follows the cut,
    # or, always, through the fetch manifest's sizes.
    written = split_bytes(make_tar(sample_files(30, big=False)), tmp_path / "parts", 5)
    mid = written[1]
    expected = [{"path": p.name, "bytes": p.stat().st_size} for p in written]
    mid.write_bytes(mid.read_bytes()[:-700])
    with pytest.raises(CorruptArchiveError, match=r"coco\.tar\.part_a[b-e]") as err:
        extract_archive(written, tmp_path / "out")
    assert "invalid tar header" in str(err.value) or "bad tar header" in str(err.value)
    with pytest.raises(PartChecksumError, match=r"coco\.tar\.part_ab"):
        extract_archive(written, tmp_path / "out2", expected_parts=expected)
    assert not (tmp_path / "out2").exists()


def _evil_tar(tmp_path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        ok = tarfile.TarInfo("coco/ok.jpg")
        ok.size = 3
        tar.addfile(ok, io.BytesIO(b"abc"))
        member.size = len(data) if member.isreg() else 0
        tar.addfile(member, io.BytesIO(data) if member.isreg() else None)
        after = tarfile.TarInfo("coco/after.jpg")
        after.size = 3
        tar.addfile(after, io.BytesIO(b"xyz"))
    path = tmp_path / "evil.tar"
    path.write_bytes(buf.getvalue())
    return path


def _link(name, kind, target):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def _device(name):
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    return info


def _fifo(name):
    info = tarfile.TarInfo(name)
    info.type = tarfile.FIFOTYPE
    return info


@pytest.mark.parametrize(
    "member, why",
    [
        (tarfile.TarInfo("/tmp/egm_abs_evil.jpg"), "absolute"),
        (tarfile.TarInfo("coco/../../egm_evil.jpg"), r"'\.\.'"),
        (_link("coco/sym.jpg", tarfile.SYMTYPE, "/etc/passwd"), "symbolic link"),
        (_link("coco/inside.jpg", tarfile.SYMTYPE, "ok.jpg"), "symbolic link"),
        (_link("coco/hard.jpg", tarfile.LNKTYPE, "coco/ok.jpg"), "hard link"),
        (_device("coco/null"), "device"),
        (_fifo("coco/pipe"), "fifo"),
    ],
)
def test_unsafe_members_refused(tmp_path, member, why):
    name = member.name
    archive = _evil_tar(tmp_path, member, b"evil" if member.isreg() else b"")
    dest = tmp_path / "out"
    (dest / "coco").mkdir(parents=True)
    (dest / "coco/earlier.jpg").write_bytes(b"from an earlier extraction")
    with pytest.raises(UnsafeMemberError, match=why) as err:
        extract_archive([archive], dest)
    assert "evil.tar" in str(err.value) and repr(name) in str(err.value)
    assert err.value.member == name and err.value.part == "evil.tar"
    # Nothing of the refused archive lands, not even the members before the refused one, and
    # what was there stays (no staging folder left either).
    assert tree_with_hidden(dest) == {"coco": None, "coco/earlier.jpg": b"from an earlier extraction"}
    assert not (tmp_path / "egm_evil.jpg").exists()
    assert not Path("/tmp/egm_abs_evil.jpg").exists()


def test_not_a_tar_is_named(tmp_path):
    bogus = tmp_path / "coco_flip.tar"
    bogus.write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(CorruptArchiveError, match="coco_flip.tar"):
        extract_archive([bogus], tmp_path / "out")
    assert issubclass(CorruptArchiveError, ArchiveError) and issubclass(ArchiveError, ValueError)


def test_reextraction_overwrites_in_place(tmp_path):
    data = make_tar({"a.jpg": b"a" * 10})
    archive = tmp_path / "x.tar"
    archive.write_bytes(data)
    dest = tmp_path / "out"
    (dest / "coco/train2014").mkdir(parents=True)
    (dest / "coco/train2014/a.jpg").write_bytes(b"stale and longer")
    extract_archive([archive], dest)
    assert (dest / "coco/train2014/a.jpg").read_bytes() == b"a" * 10


def test_refused_archive_leaves_dest_as_it_was(tmp_path):
    """Issue 18 point 6: a truncated or corrupt archive, found out only near its end, leaves
    none of the members extracted before the problem showed."""
    dest = tmp_path / "out"
    (dest / "coco/train2014").mkdir(parents=True)
    (dest / "coco/train2014/old.jpg").write_bytes(b"old")
    (dest / "coco_flip").mkdir()
    before = tree_with_hidden(dest)

    files = sample_files()
    written = split_bytes(make_tar(files), tmp_path / "parts", 4)
    written[-1].write_bytes(written[-1].read_bytes()[: -(1024 + 20000)])
    with pytest.raises(TruncatedArchiveError, match="big.jpg"):
        extract_archive(written, dest)
    assert tree_with_hidden(dest) == before

    # Garbage after the last member: every member was written before the end check failed.
    good = make_tar(files)
    corrupt = tmp_path / "corrupt" / "coco.tar"
    corrupt.parent.mkdir()
    corrupt.write_bytes(good[: len(good) - 1024] + b"garbage!" + bytes(1016))
    with pytest.raises(CorruptArchiveError):
        extract_archive([corrupt], dest)
    assert tree_with_hidden(dest) == before

    # A wrong sha256 is only known once every byte was read.
    written = split_bytes(good, tmp_path / "good", 3)
    expected = [{"path": p.name, "bytes": p.stat().st_size, "sha256": "0" * 64} for p in written]
    with pytest.raises(PartChecksumError, match="part_aa"):
        extract_archive(written, dest, expected_parts=expected)
    assert tree_with_hidden(dest) == before


def test_reextraction_replaces_the_archives_tree_only(tmp_path):
    dest = tmp_path / "out"
    (dest / "coco/train2014").mkdir(parents=True)
    (dest / "coco/train2014/stale.jpg").write_bytes(b"from the previous revision")
    (dest / "coco_flip").mkdir()
    (dest / "coco_flip/flip.jpg").write_bytes(b"another archive's")
    archive = tmp_path / "coco.tar"
    archive.write_bytes(make_tar({"a.jpg": b"a"}))
    manifest = extract_archive([archive], dest)
    assert manifest["dest"] == str(dest) and manifest["n_files"] == 1
    assert tree_with_hidden(dest) == {
        "coco": None, "coco/train2014": None, "coco/train2014/a.jpg": b"a",
        "coco_flip": None, "coco_flip/flip.jpg": b"another archive's",
    }


def test_leftovers_of_a_killed_extraction_are_removed(tmp_path):
    dest = tmp_path / "out"
    for name in (".coco.tar.abc123.extracting", ".coco.tar.def456.replaced"):
        (dest / name / "coco").mkdir(parents=True)
        (dest / name / "coco/half.jpg").write_bytes(b"half")
    (dest / ".coco_flip.tar.zzz.extracting").mkdir()  # another archive's: its job may be running
    archive = tmp_path / "coco.tar"
    archive.write_bytes(make_tar({"a.jpg": b"a"}))
    extract_archive([archive], dest)
    assert sorted(p.name for p in dest.iterdir()) == [".coco_flip.tar.zzz.extracting", "coco"]


def test_archive_files_picks_the_parts_or_the_single_tar(tmp_path):
    for name in ("coco.tar.part_ab", "coco.tar.part_aa", "coco_flip.tar"):
        (tmp_path / name).write_bytes(b"x")
    fetched = [{"path": p} for p in ("coco.tar.part_aa", "coco.tar.part_ab", "coco_flip.tar", "metadata/a.jsonl")]
    parts, expected = archive_files(tmp_path, "coco", fetched)
    assert [p.name for p in parts] == ["coco.tar.part_aa", "coco.tar.part_ab"]
    assert [e["path"] for e in expected] == ["coco.tar.part_aa", "coco.tar.part_ab"]
    parts, expected = archive_files(tmp_path, "coco_flip", fetched)
    assert parts == [tmp_path / "coco_flip.tar"] and expected == [{"path": "coco_flip.tar"}]
