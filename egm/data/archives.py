"""Extract the dataset's tar archives safely, streaming split parts as one tar.

`coco.tar` is published as `coco.tar.part_aa, part_ab, ...` (byte chunks made by `split`). The
parts are read back to back as a single stream, so the concatenated tar (as large as all parts
together) is never written to disk.

Safety policy, applied to each member before anything of it is written:
- absolute names and names with a `..` component are refused;
- every link is refused, symbolic or hard, wherever it points: the dataset holds only regular
  files and directories, so any link means the archive is not the one we expect, and a link
  that stays inside `dest` can still be a stepping stone for a later member to escape it;
- device files, fifos and any other special member type are refused;
- as a last guard, the resolved target must lie inside the (fresh) staging folder below.
A refused member stops the extraction with UnsafeMemberError.

The archive is extracted into a hidden staging folder inside `dest` and its top-level entries
are moved into place only once the whole archive has passed every check (members, end of
archive, part checksums): a refused, truncated or corrupt archive leaves `dest` as it was, and an
interrupted run leaves at most the staging folder, which the next extraction of that archive
removes. An archive's top-level entries replace those of the same name in `dest` (a re-extraction
leaves no stale file of the previous one); other entries of `dest` are not touched. Tar
permission bits and owners are not applied: files get the usual 0o666/0o777 less the umask.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import io
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

_BLOCK = 512
_CHUNK = 1 << 20
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_DIGITS = "0123456789"
_PART_RE = re.compile(r"^(?P<stem>.+)\.part_(?P<suffix>[^.]+)$")
# Suffixes of the hidden folders an extraction works in, inside `dest`.
_STAGING = ".extracting"
_REPLACED = ".replaced"


class ArchiveError(ValueError):
    """Base class: an archive cannot be extracted as it is. Carries the part and member names."""

    def __init__(self, message: str, *, part: str | None = None, member: str | None = None):
        super().__init__(message)
        self.part = part
        self.member = member


class MissingPartError(ArchiveError):
    """A part of a split archive is absent (gap in the suffixes, or listed but not on disk)."""


class UnexpectedPartError(ArchiveError):
    """A part is on disk that the fetch manifest did not list (stale or foreign file)."""


class UnsafeMemberError(ArchiveError):
    """A member would write outside `dest`, or is a link, device or other special file."""


class CorruptArchiveError(ArchiveError):
    """The tar stream is not a valid tar (bad header, garbage after the last member, ...)."""


class TruncatedArchiveError(CorruptArchiveError):
    """The tar stream ends before the archive does."""


class PartChecksumError(CorruptArchiveError):
    """A part's size or sha256 differs from what the fetch manifest recorded."""


# --- part naming -------------------------------------------------------------------------


def _alphabet_of(suffix: str) -> str | None:
    if all(c in _LETTERS for c in suffix):
        return _LETTERS
    if all(c in _DIGITS for c in suffix):
        return _DIGITS
    return None


def _value(digits: str, alphabet: str) -> int:
    n = 0
    for c in digits:
        n = n * len(alphabet) + alphabet.index(c)
    return n


def _digits(n: int, width: int, alphabet: str) -> str:
    base = len(alphabet)
    out = []
    for _ in range(width):
        n, r = divmod(n, base)
        out.append(alphabet[r])
    return "".join(reversed(out))


# GNU split without `-a` widens its suffixes instead of failing when they run out:
# aa..yz, then zaaa..zyzz, then zzaaaa..., i.e. group g has g leading last-letters, one
# non-last letter, then g+1 free letters. Mixed suffix widths are read with that scheme.


def _auto_ordinal(suffix: str, alphabet: str) -> int | None:
    base, last = len(alphabet), alphabet[-1]
    if len(suffix) < 2 or len(suffix) % 2:
        return None
    group = (len(suffix) - 2) // 2
    if suffix[:group] != last * group or suffix[group] == last:
        return None
    before = sum((base - 1) * base ** (1 + h) for h in range(group))
    return before + alphabet.index(suffix[group]) * base ** (group + 1) + _value(suffix[group + 1:], alphabet)


def _auto_suffix(ordinal: int, alphabet: str) -> str:
    base, last = len(alphabet), alphabet[-1]
    group = 0
    while ordinal >= (base - 1) * base ** (1 + group):
        ordinal -= (base - 1) * base ** (1 + group)
        group += 1
    lead, rest = divmod(ordinal, base ** (group + 1))
    return last * group + alphabet[lead] + _digits(rest, group + 1, alphabet)


def archive_files(dataset_dir: Path, archive: str, fetched: list[dict]) -> tuple[list[Path], list[dict]]:
    """(the files of one data set archive in order, their fetch manifest entries).

    `coco` is split into `coco.tar.part_*` (streamed as one tar), any other archive is one
    `<archive>.tar`. The manifest entries (not just names) let extraction check each part's
    size and sha256, and see a missing last part.
    """
    dataset_dir = Path(dataset_dir)
    if archive == "coco":
        return part_files(dataset_dir, "coco.tar"), [f for f in fetched if f["path"].startswith("coco.tar.part_")]
    return [dataset_dir / f"{archive}.tar"], [f for f in fetched if f["path"] == f"{archive}.tar"]


def part_files(directory: Path, stem: str = "coco.tar") -> list[Path]:
    """The `<stem>.part_*` files of `directory` in `split` order, checked for gaps.

    Suffixes may be letters (split's default) or digits (`split -d`), of one fixed width or
    widening like GNU split's default. A gap, including a missing first part, raises
    MissingPartError naming the missing part(s). A missing *last* part cannot be seen here;
    pass the fetch manifest's list to `extract_archive(expected_parts=...)` for that.
    """
    directory = Path(directory)
    prefix = f"{stem}.part_"
    if not directory.is_dir():
        raise MissingPartError(f"{directory}: no such directory, so no {prefix}* parts", part=f"{prefix}*")
    found: dict[str, Path] = {}
    for path in directory.iterdir():
        if path.name.startswith(prefix) and not path.is_dir():
            found[path.name[len(prefix):]] = path
    if not found:
        raise MissingPartError(f"{directory}: no {prefix}* parts found", part=f"{prefix}*")

    alphabets = {_alphabet_of(s) for s in found}
    if None in alphabets or len(alphabets) != 1:
        odd = sorted(found[s].name for s in found if _alphabet_of(s) is None) or sorted(p.name for p in found.values())
        raise ArchiveError(f"{directory}: part names with unrecognised or mixed suffixes: {odd}", part=odd[0])
    alphabet = alphabets.pop()

    widths = {len(s) for s in found}
    if len(widths) == 1:
        width = widths.pop()
        ordinals = {s: _value(s, alphabet) for s in found}

        def name_of(i: int) -> str:
            return prefix + _digits(i, width, alphabet)
    else:
        ordinals = {}
        for s in found:
            o = _auto_ordinal(s, alphabet)
            if o is None:
                raise ArchiveError(f"{found[s]}: suffix {s!r} does not fit split's suffix sequence", part=found[s].name)
            ordinals[s] = o

        def name_of(i: int) -> str:
            return prefix + _auto_suffix(i, alphabet)

    present = set(ordinals.values())
    missing = [i for i in range(max(present) + 1) if i not in present]
    if missing:
        names = [name_of(i) for i in missing[:5]] + (["..."] if len(missing) > 5 else [])
        raise MissingPartError(
            f"{directory}: {stem} is split into parts but {len(missing)} part(s) are missing: "
            f"{', '.join(names)}",
            part=name_of(missing[0]),
        )
    return [found[s] for s in sorted(found, key=ordinals.__getitem__)]


def archive_name(part: Path | str) -> str:
    """`coco.tar` for `coco.tar.part_ab`; a whole archive's own name otherwise."""
    name = Path(part).name
    m = _PART_RE.match(name)
    return m.group("stem") if m else name


# --- streaming ---------------------------------------------------------------------------


class _PartStream(io.RawIOBase):
    """The parts read back to back as one file, hashing each part's bytes on the way."""

    def __init__(self, parts: list[Path]):
        super().__init__()
        self.parts = parts
        self.index = 0
        self.position = 0
        self.hashers = [hashlib.sha256() for _ in parts]
        self.counts = [0] * len(parts)
        self._handle: io.BufferedReader | None = None

    def readable(self) -> bool:
        return True

    @property
    def current(self) -> Path:
        return self.parts[min(self.index, len(self.parts) - 1)]

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        if not len(view):
            return 0
        while self.index < len(self.parts):
            if self._handle is None:
                try:
                    self._handle = open(self.parts[self.index], "rb")
                except FileNotFoundError:
                    raise MissingPartError(f"{self.parts[self.index]}: part vanished during extraction",
                                           part=self.parts[self.index].name) from None
            n = self._handle.readinto(view)
            if n:
                self.hashers[self.index].update(view[:n])
                self.counts[self.index] += n
                self.position += n
                return n
            self._handle.close()
            self._handle = None
            self.index += 1
        return 0

    def drain(self) -> None:
        buf = bytearray(_CHUNK)
        while self.readinto(buf):
            pass

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        super().close()


class _Layout:
    """Where a byte offset of the joined stream lies: which part, and a label for messages."""

    def __init__(self, parts: list[Path], sizes: list[int]):
        self.parts = parts
        self.sizes = sizes
        self.starts = [0]
        for s in sizes:
            self.starts.append(self.starts[-1] + s)
        self.total = self.starts[-1]
        self.archive = archive_name(parts[0])

    def part_at(self, offset: int) -> int:
        return max(0, min(bisect.bisect_right(self.starts, offset) - 1, len(self.parts) - 1))

    def label(self, index: int) -> str:
        if len(self.parts) == 1:
            return str(self.parts[0])
        return f"{self.parts[index]} (part {index + 1} of {len(self.parts)} of {self.archive})"

    def first_nonzero(self, start: int) -> int | None:
        """Offset of the first non-zero byte at or after `start`, reading the part files."""
        offset = start
        while offset < self.total:
            i = self.part_at(offset)
            with open(self.parts[i], "rb") as handle:
                handle.seek(offset - self.starts[i])
                while True:
                    block = handle.read(_CHUNK)
                    if not block:
                        break
                    stripped = block.lstrip(b"\x00")
                    if stripped:
                        return offset + len(block) - len(stripped)
                    offset += len(block)
            offset = max(offset, self.starts[i + 1])
        return None


def _expected_entries(expected: Sequence[str | Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    entries: dict[str, Mapping[str, Any]] = {}
    for item in expected:
        if isinstance(item, Mapping):
            name = Path(item.get("path") or item["name"]).name
            entries[name] = item
        else:
            entries[Path(item).name] = {}
    return entries


def _check_parts(parts: list[Path], expected: Sequence[str | Mapping[str, Any]] | None) -> list[int]:
    names = [p.name for p in parts]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ArchiveError(f"{dup}: given twice in the part list", part=dup)
    entries = _expected_entries(expected) if expected is not None else None
    if entries is not None:
        absent = [name for name in entries if name not in names]
        if absent:
            raise MissingPartError(f"{', '.join(absent)}: listed in the fetch manifest but not among the parts "
                                   f"to extract ({', '.join(names) or 'none'})", part=absent[0])
        extra = [n for n in names if n not in entries]
        if extra:
            raise UnexpectedPartError(f"{', '.join(extra)}: on disk but not listed in the fetch manifest", part=extra[0])
    sizes = []
    for path in parts:
        if not path.is_file():
            raise MissingPartError(f"{path}: part not found on disk", part=path.name)
        size = path.stat().st_size
        want = (entries or {}).get(path.name, {}).get("bytes")
        if want is not None and want != size:
            # Checked before extracting: a short part would otherwise surface as a confusing
            # corrupt header in the *next* part.
            raise PartChecksumError(f"{path}: {size} bytes on disk, fetch manifest says {want}", part=path.name)
        sizes.append(size)
    return sizes


def _is_compressed(parts: list[Path]) -> bool:
    for path in parts:
        with open(path, "rb") as handle:
            head = handle.read(8)
        if head:
            return head.startswith(_COMPRESSED_MAGIC)
    return False


# --- members -----------------------------------------------------------------------------


def _member_path(member: tarfile.TarInfo, where: str, part: str) -> PurePosixPath | None:
    """The member's path relative to dest, or None for the archive root itself ("./")."""
    name = member.name

    def refuse(why: str) -> UnsafeMemberError:
        return UnsafeMemberError(f"{where}: member {name!r} refused: {why}", part=part, member=name)

    if not name or "\x00" in name:
        raise refuse("empty or NUL in its name")
    if name.startswith("/") or re.match(r"^[A-Za-z]:[\\/]", name):
        raise refuse("absolute path")
    parts = [p for p in PurePosixPath(name).parts if p != "."]
    if ".." in parts:
        raise refuse("'..' component")
    if member.issym():
        raise refuse(f"symbolic link (to {member.linkname!r}); links are not allowed")
    if member.islnk():
        raise refuse(f"hard link (to {member.linkname!r}); links are not allowed")
    if member.ischr() or member.isblk():
        raise refuse("device file")
    if member.isfifo():
        raise refuse("fifo")
    if not (member.isreg() or member.isdir()):
        raise refuse(f"unsupported member type {member.type!r}")
    if not parts:
        if member.isdir():
            return None
        raise refuse("a file with an empty path")
    return PurePosixPath(*parts)


def _inside(root_real: str, path: Path) -> bool:
    real = os.path.realpath(path)
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_member(source, target: Path, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), mode)
            shutil.copyfileobj(source, out, _CHUNK)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def extract_archive(
    parts: list[Path],
    dest: Path,
    expected_parts: Sequence[str | Mapping[str, Any]] | None = None,
) -> dict:
    """Extract the tar made of `parts` (in order; one path for a whole tar) into `dest`.

    `expected_parts` lists the part names the fetch manifest holds (repo paths are fine, only
    the base name is compared); a listed part that is not in `parts`, or a part in `parts`
    that is not listed, is an error. Items may also be the manifest's file entries
    (`{"path", "bytes", "sha256"}`): sizes are then checked before extracting and sha256
    after streaming.

    Returns the manifest `{"archive", "dest", "parts": [{"name", "bytes", "sha256"}],
    "n_files", "n_bytes"}`; writing it is the caller's job, and it should be written only
    after this returns (it marks a complete extraction).
    """
    parts = [Path(p) for p in parts]
    if not parts:
        raise ArchiveError("no archive parts given")
    dest = Path(dest)
    sizes = _check_parts(parts, expected_parts)
    layout = _Layout(parts, sizes)
    dest.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(dest, layout.archive)
    staging = Path(tempfile.mkdtemp(prefix=f".{layout.archive}.", suffix=_STAGING, dir=dest))
    try:
        manifest = _extract_into(parts, layout, staging, expected_parts)
        _move_into_place(staging, dest, layout.archive)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    manifest["dest"] = str(dest)
    return manifest


def _remove_leftovers(dest: Path, archive: str) -> None:
    """Staging and replaced trees of an earlier extraction of `archive` that was killed."""
    for path in dest.glob(f".{archive}.*"):
        if path.is_dir() and not path.is_symlink() and path.name.endswith((_STAGING, _REPLACED)):
            shutil.rmtree(path, ignore_errors=True)


def _move_into_place(staging: Path, dest: Path, archive: str) -> None:
    """Rename each top-level entry of `staging` into `dest`, replacing an entry of that name.

    rename() cannot replace a non-empty directory, so a previous tree is first moved aside (into
    a folder removed at the end); every step is a rename within one file system.
    """
    entries = sorted(staging.iterdir())
    if not entries:
        return
    replaced = Path(tempfile.mkdtemp(prefix=f".{archive}.", suffix=_REPLACED, dir=dest))
    try:
        for entry in entries:
            target = dest / entry.name
            if target.exists() or target.is_symlink():
                os.replace(target, replaced / entry.name)
            os.replace(entry, target)
    finally:
        shutil.rmtree(replaced, ignore_errors=True)


def _extract_into(
    parts: list[Path],
    layout: _Layout,
    dest: Path,
    expected_parts: Sequence[str | Mapping[str, Any]] | None,
) -> dict:
    """extract_archive's work, into `dest` (the staging folder): raises on the first problem."""
    compressed = _is_compressed(parts)
    dest_real = os.path.realpath(dest)
    umask = _umask()
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask

    stream = _PartStream(parts)

    def part_index(offset: int | None = None) -> int:
        # Offsets of a compressed stream are not positions in the part files.
        if offset is None or compressed:
            return min(stream.index, len(parts) - 1)
        return layout.part_at(offset)

    def where(offset: int | None = None) -> str:
        return layout.label(part_index(offset))

    def part_name(offset: int | None = None) -> str:
        return parts[part_index(offset)].name

    n_files = n_bytes = 0
    last_member: str | None = None
    with stream:
        try:
            tar = tarfile.open(fileobj=stream, mode="r|*", bufsize=_CHUNK)
        except (tarfile.TarError, EOFError, zlib.error) as err:
            raise CorruptArchiveError(f"{where(0)}: not a readable tar stream: {err}", part=parts[0].name) from err
        with tar:
            while True:
                try:
                    member = tar.next()
                except (tarfile.TarError, EOFError, zlib.error) as err:
                    after = f"after member {last_member!r}" if last_member else "at the first member"
                    raise CorruptArchiveError(
                        f"{where(tar.offset)}: bad tar header {after}: {err}",
                        part=part_name(tar.offset), member=last_member,
                    ) from err
                if member is None:
                    break
                here = where(member.offset)
                rel = _member_path(member, here, part_name(member.offset))
                if rel is None:
                    continue
                target = dest / rel
                if not _inside(dest_real, target.parent if member.isreg() else target):
                    raise UnsafeMemberError(f"{here}: member {member.name!r} refused: resolves outside {dest}",
                                            part=part_name(member.offset), member=member.name)
                if member.isdir():
                    target.mkdir(mode=dir_mode, parents=True, exist_ok=True)
                    last_member = member.name
                    continue
                target.parent.mkdir(mode=dir_mode, parents=True, exist_ok=True)
                try:
                    _write_member(tar.extractfile(member), target, file_mode)
                except (tarfile.TarError, EOFError, zlib.error) as err:
                    raise TruncatedArchiveError(
                        f"{where(None)}: archive data ends inside member {member.name!r} "
                        f"({member.size} bytes expected): {err}",
                        part=part_name(None), member=member.name,
                    ) from err
                n_files += 1
                n_bytes += member.size
                last_member = member.name
            end = tar.offset
        stream.drain()

    if not compressed:
        _check_end(layout, end, last_member)

    entries = _expected_entries(expected_parts) if expected_parts is not None else {}
    manifest_parts = []
    for path, hasher, count in zip(parts, stream.hashers, stream.counts):
        digest = hasher.hexdigest()
        want = entries.get(path.name, {}).get("sha256")
        if want is not None and want != digest:
            raise PartChecksumError(f"{path}: sha256 {digest}, fetch manifest says {want}", part=path.name)
        manifest_parts.append({"name": path.name, "bytes": count, "sha256": digest})

    return {
        "archive": layout.archive,
        "dest": str(dest),
        "parts": manifest_parts,
        "n_files": n_files,
        "n_bytes": n_bytes,
    }


def _check_end(layout: _Layout, end: int, last_member: str | None) -> None:
    """Require a proper end-of-archive after the last member.

    tarfile stops quietly at a damaged header once past the first member, and at a stream
    that simply ends between members, which would turn a truncated or corrupt archive into a
    silently partial extraction. After the last member there must be at least one zero block
    (tar writes two) and nothing but zeros up to the end.
    """
    after = f"after member {last_member!r}" if last_member else "before any member"
    if layout.total - end < _BLOCK:
        index = len(layout.parts) - 1
        raise TruncatedArchiveError(
            f"{layout.label(index)}: stream ends {after} without tar's end-of-archive blocks "
            f"(archive truncated?)",
            part=layout.parts[index].name, member=last_member,
        )
    bad = layout.first_nonzero(end)
    if bad is not None:
        index = layout.part_at(bad)
        raise CorruptArchiveError(
            f"{layout.label(index)}: invalid tar header or data at byte {bad - layout.starts[index]} of this part, "
            f"{after} (a part truncated, corrupt or out of order?)",
            part=layout.parts[index].name, member=last_member,
        )
