"""Check the eval splits and the RL parquet right after extraction, before any GPU job.

The checks are the ones the consumers make (`egm.data.splits` for predict: fields, types, image
present, size as recorded; `egm.train.data` for RL training (`egm.data.rows`): one user turn whose image
placeholders match one image, a 4-number ground truth, width/height), run on the CPU as soon as
the images are on disk, so an empty or broken file is known hours before a GPU job would have
found it. Each file gets a small JSON report: how many records are valid, the bad ones by
`file:line` (parquet: `file: row N`, 0-based like the training log) with the reason, and
`error` when the file cannot be used at all.

A split with no valid record is not a failure of the validation job: the split's predictions and
metrics say why it has no score and the other splits go on (`unscored`). An RL parquet with no
usable row is (`ValidationError`): training on it cannot start.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from egm.data.paths import relocate_image_path
from egm.data.rows import BadRow, split_user_turn
from egm.data.splits import InvalidRecord, image_size, is_number, positive_int, read_split, released_size

# Bad records listed in a report (all are counted): enough to see the pattern, small to read.
LISTED = 100
NO_VALID_RECORD = "no valid record"
RL_COLUMNS = ("prompt", "images", "reward_model", "extra_info")


class ValidationError(ValueError):
    """A data file the workflow needs cannot be used at all (the message names it)."""


def split_name(path: str | Path) -> str:
    return Path(path).name.removesuffix(".jsonl")


def validate_split(path: str | Path, image_root: str, listed: int = LISTED) -> dict:
    """The report of one eval split: valid records, bad ones as `file:line` and reason (each a
    miss in the split's score), and the file's length against the released one's."""
    split = read_split(Path(path), image_root)
    name = split_name(path)
    return {
        "kind": "eval split",
        "name": name,
        "path": str(path),
        "image_root": image_root,
        "valid": len(split.records),
        "bad": len(split.bad),
        **released_size(name, len(split.records) + len(split.bad)),
        "bad_records": [{"where": f"{path}:{b.line}", "reason": b.reason} for b in split.bad[:listed]],
        "error": split.problem,
    }


def _ground_truth(reward_model: Any) -> list[float]:
    truth = (reward_model or {}).get("ground_truth") if isinstance(reward_model, dict) else None
    if not isinstance(truth, list) or len(truth) != 4 or not all(is_number(v) for v in truth):
        raise InvalidRecord(f"reward_model.ground_truth: expected 4 numbers, got {truth!r}")
    if not all(math.isfinite(float(v)) for v in truth):
        raise InvalidRecord(f"reward_model.ground_truth: non-finite value in {truth!r}")
    return [float(v) for v in truth]


def _rl_row(row: dict, image_root: str, sizes: dict) -> None:
    """Raise InvalidRecord with the reason when RL training could not use this row as it is."""
    images, prompt = row.get("images"), row.get("prompt")
    if not isinstance(images, list) or len(images) != 1 or not isinstance(images[0], str) or not images[0]:
        raise InvalidRecord(f"images: expected one image path, got {images!r}")
    if not isinstance(prompt, list) or len(prompt) != 1 or not isinstance(prompt[0], dict) or prompt[0].get("role") != "user":
        raise InvalidRecord("prompt: expected one user message")
    try:
        split_user_turn(str(prompt[0].get("content") or ""), 1)
    except BadRow as err:
        raise InvalidRecord(f"prompt: {err}") from None
    _ground_truth(row.get("reward_model"))
    extra = row.get("extra_info")
    if not isinstance(extra, dict):
        raise InvalidRecord(f"extra_info: expected a struct with width and height, got {extra!r}")
    missing = [k for k in ("width", "height") if extra.get(k) is None]
    if missing:
        raise InvalidRecord(f"extra_info: missing {', '.join(missing)}")
    width, height = positive_int(extra, "width"), positive_int(extra, "height")
    image_path = relocate_image_path(images[0], image_root)
    got = image_size(image_path, sizes)
    if got != (width, height):
        raise InvalidRecord(f"image: {image_path} is {got[0]}x{got[1]}, row says {width}x{height}")


def validate_rl_parquet(path: str | Path, image_root: str, listed: int = LISTED) -> dict:
    """The report of one RL parquet (image paths as fetched, relocated the way the rewrite does)."""
    import pyarrow.parquet as pq

    report: dict[str, Any] = {
        "kind": "RL parquet", "name": Path(path).name.removesuffix(".parquet"), "path": str(path),
        "image_root": image_root, "rows": 0, "valid": 0, "bad": 0, "bad_records": [], "error": None,
    }
    try:
        schema = pq.read_schema(path)
    except FileNotFoundError:
        report["error"] = f"{path}: parquet file not found"
        return report
    except Exception as err:  # pyarrow raises several types for a damaged file
        report["error"] = f"{path}: not a readable parquet file ({type(err).__name__}: {err})"
        return report
    absent = [c for c in RL_COLUMNS if c not in schema.names]
    if absent:
        report["error"] = f"{path}: no column(s) {', '.join(absent)} (columns: {', '.join(schema.names)})"
        return report
    sizes: dict = {}
    first: list[str] = []
    for index, row in enumerate(pq.read_table(path, columns=list(RL_COLUMNS)).to_pylist()):
        report["rows"] += 1
        try:
            _rl_row(row, image_root, sizes)
        except InvalidRecord as bad:
            report["bad"] += 1
            if len(report["bad_records"]) < listed:
                report["bad_records"].append({"where": f"{path}: row {index}", "reason": str(bad)})
            if len(first) < 3:
                first.append(f"row {index}: {bad}")
            continue
        report["valid"] += 1
    if not report["valid"]:
        detail = "; ".join(first) or "the file has no rows"
        report["error"] = f"{path}: no usable row ({report['bad']} bad: {detail})"
    return report


def unscored(metrics: dict, report: dict | None) -> dict:
    """Fields that mark a split's metrics as having no score, and say why; {} when it has one.

    `report` is the split's validation report: its error is the reason when the split had no
    valid record.
    """
    if metrics.get("n_answered"):
        return {}
    reason = (report or {}).get("error")
    if reason:
        return {"no_score": NO_VALID_RECORD, "no_score_reason": reason}
    return {"no_score": "nothing scored", "no_score_reason": "the split's prediction file holds no answered record"}
