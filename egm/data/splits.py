"""Load and validate an eval split (`metadata/eval/{split}.jsonl`).

A bad line never takes the split down: it becomes a BadRecord with the reason, is reported,
and is scored as such downstream, so the denominator of every metric stays visible. A split with
no valid record at all is `read_split`'s to report (SplitData.problem) and `load_split`'s to
raise; a missing file raises in both.

Decisions:
- bbox is [x1, y1, x2, y2] with strict x1 < x2 and y1 < y2: a zero-area box has IoU 0 with any
  prediction, so the record could never count as correct; it is flagged instead.
- width/height must be positive integers; floats with an integral value (640.0) are accepted
  and booleans are not.
- `id` is str(record["id"]) when present and not null, else the 1-based line number. Ids may
  repeat (the authors never look at them): records are keyed by their line.
- blank lines are skipped without being counted (an editor's trailing empty line is not a
  record; the authors' JSON-lines loader skips them too).
- every other line is a sample of the split's denominator, as the authors count it: a bad
  record is reported by `file:line` and scored as a miss (IoU 0) downstream (egm.metrics).
- the image size is read from the file header only (no decode) and compared with the record's
  width/height as stored, without EXIF rotation, which is what the boxes refer to.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from egm.data.paths import relocate_image_path

# The 8 evaluation splits of EGM_Datasets/metadata/eval, in the paper's column order.
EVAL_SPLITS: tuple[str, ...] = (
    "refcoco_val",
    "refcoco_testA",
    "refcoco_testB",
    "refcoco+_val",
    "refcoco+_testA",
    "refcoco+_testB",
    "refcocog_val",
    "refcocog_test",
)


# Lines of each released split file (JamesZGQ/EGM_Datasets metadata/eval/): every line is a sample
# of the paper's denominator. A file of another length is flagged in the validation report and the
# tables' notes, not refused (a demo, a `limit`, or a different revision of the data).
RELEASED_SPLIT_LINES: dict[str, int] = {
    "refcoco_val": 10834,
    "refcoco_testA": 5657,
    "refcoco_testB": 5095,
    "refcoco+_val": 10758,
    "refcoco+_testA": 5726,
    "refcoco+_testB": 4889,
    "refcocog_val": 4896,
    "refcocog_test": 9602,
}


def released_size(split: str, lines: int) -> dict:
    """`lines` of split `split` against the released file's: the fields reports carry."""
    released = RELEASED_SPLIT_LINES.get(split)
    return {"lines": lines, "released_lines": released,
            "differs_from_release": released is not None and lines != released}


class SplitError(ValueError):
    """The split file is missing or holds no valid record."""


@dataclass(frozen=True)
class EvalRecord:
    line: int
    id: str
    image: str
    image_path: str
    sent: str
    bbox: list[float]
    width: int
    height: int


@dataclass(frozen=True)
class BadRecord:
    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass
class SplitData:
    path: Path
    records: list[EvalRecord] = field(default_factory=list)
    bad: list[BadRecord] = field(default_factory=list)

    def summary(self, max_bad: int = 10) -> dict:
        return {
            "path": str(self.path),
            "records": len(self.records),
            "bad": len(self.bad),
            "first_bad": [str(b) for b in self.bad[:max_bad]],
        }

    @property
    def problem(self) -> str | None:
        """Why the split cannot be scored (no valid record), naming the file; None if it can."""
        if self.records:
            return None
        detail = "; ".join(str(b) for b in self.bad[:3]) or "the file has no records"
        return f"{self.path}: no valid record ({len(self.bad)} bad: {detail})"


class InvalidRecord(Exception):
    """Why one record (a split line, an RL row) cannot be used; the reader collects it as a bad record."""


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_int(obj: dict, key: str) -> int:
    value = obj[key]
    if not is_number(value) or (isinstance(value, float) and not (math.isfinite(value) and value.is_integer())):
        raise InvalidRecord(f"{key}: expected a positive integer, got {value!r}")
    if value <= 0:
        raise InvalidRecord(f"{key}: expected a positive integer, got {value!r}")
    return int(value)


def _bbox(value: Any) -> list[float]:
    if not isinstance(value, list) or len(value) != 4:
        raise InvalidRecord(f"bbox: expected a list of 4 numbers [x1, y1, x2, y2], got {value!r}")
    if not all(is_number(v) for v in value):
        raise InvalidRecord(f"bbox: non-numeric coordinate in {value!r}")
    box = [float(v) for v in value]
    if not all(math.isfinite(v) for v in box):
        raise InvalidRecord(f"bbox: non-finite coordinate in {value!r}")
    x1, y1, x2, y2 = box
    if not x1 < x2:
        raise InvalidRecord(f"bbox: x2 ({x2:g}) must be greater than x1 ({x1:g})")
    if not y1 < y2:
        raise InvalidRecord(f"bbox: y2 ({y2:g}) must be greater than y1 ({y1:g})")
    return box


def _parse(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidRecord(f"not valid UTF-8: {err}") from None
    try:
        # NaN/Infinity are not JSON; parse them anyway so the reason says "non-finite bbox"
        # rather than "malformed JSON".
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise InvalidRecord(f"malformed JSON: {err}") from None
    if not isinstance(obj, dict):
        raise InvalidRecord(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _fields(obj: dict) -> tuple[str, str, list[float], int, int]:
    missing = [k for k in ("image", "sent", "bbox", "width", "height") if k not in obj]
    if missing:
        raise InvalidRecord(f"missing field(s): {', '.join(missing)}")
    image, sent = obj["image"], obj["sent"]
    if not isinstance(image, str) or not image:
        raise InvalidRecord(f"image: expected a non-empty string, got {image!r}")
    if not isinstance(sent, str) or not sent.strip():
        raise InvalidRecord(f"sent: expected a non-empty string, got {sent!r}")
    box = _bbox(obj["bbox"])
    return image, sent, box, positive_int(obj, "width"), positive_int(obj, "height")


def image_size(path: str, cache: dict[str, tuple[int, int] | str]) -> tuple[int, int]:
    # Many expressions share one image: open each file once.
    if path not in cache:
        try:
            with Image.open(path) as im:
                cache[path] = im.size
        except FileNotFoundError:
            cache[path] = f"image: file not found: {path}"
        except (UnidentifiedImageError, OSError) as err:
            cache[path] = f"image: cannot read {path}: {err}"
    got = cache[path]
    if isinstance(got, str):
        raise InvalidRecord(got)
    return got


def load_split(path: Path, image_root: str, check_images: bool = True, limit: int | None = None) -> SplitData:
    """read_split, raising SplitError when the split has no valid record."""
    split = read_split(path, image_root, check_images=check_images, limit=limit)
    if split.problem:
        raise SplitError(split.problem)
    return split


def read_split(path: Path, image_root: str, check_images: bool = True, limit: int | None = None) -> SplitData:
    """Read `path`, keeping valid records (up to `limit`) and reporting the others as bad.

    With `check_images`, each record's image must exist and have the record's width/height.
    With `limit`, reading stops after that many valid records (smoke and demo runs). A split
    with no valid record is returned as it is (its `problem` says so); a missing file raises.
    """
    path = Path(path)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    if not path.is_file():
        raise SplitError(f"{path}: eval split file not found")

    split = SplitData(path=path)
    sizes: dict[str, tuple[int, int] | str] = {}
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                obj = _parse(raw)
                image, sent, box, width, height = _fields(obj)
                rid = str(obj["id"]) if obj.get("id") is not None else str(number)
                image_path = relocate_image_path(image, image_root)
                if check_images:
                    got = image_size(image_path, sizes)
                    if got != (width, height):
                        raise InvalidRecord(f"image: {image_path} is {got[0]}x{got[1]}, record says {width}x{height}")
            except InvalidRecord as bad:
                split.bad.append(BadRecord(number, str(bad)))
                continue
            split.records.append(EvalRecord(number, rid, image, image_path, sent, box, width, height))
            if limit is not None and len(split.records) >= limit:
                break
    return split
