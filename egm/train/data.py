"""Training data as the TRL trainers take it, from the dataset's own files.

SFT: the SFT JSONL (`{"messages": [user, assistant], "images": [path]}`, the user turn starting
with `<image>\\n`) becomes conversational prompt-completion rows, so the loss covers the assistant
turn only: `prompt` = the user turn (its text, image placeholder removed; TRL puts the image block
first, as the paper's requests do), `completion` = the assistant turn, `images` = the image.

RL: the rewritten parquet (`resources/rl/{train,val}.parquet`) becomes `prompt`, `images` and
the reward's columns `ground_truth` (0-1000 grid), `width`, `height`, `split` ("train"/"test").

Image paths are relocated onto the extracted images with the authors' rule
(`egm.data.paths.relocate_image_path`); the RL parquet is already rewritten and used as is.
A row whose image is missing or whose placeholders do not match its images is a bad row: it is
counted, the first few are named in the log, and it is left out.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator

from egm.data.paths import relocate_image_path
from egm.data.rows import BadRow, split_user_turn

log = logging.getLogger(__name__)

_REPORTED = 5


def sft_row(row: dict, image_root: str) -> dict:
    """One SFT JSONL row as a prompt-completion example (image paths relocated, not checked)."""
    messages = row.get("messages")
    images = row.get("images") or []
    if not isinstance(messages, list) or len(messages) != 2:
        raise BadRow("expected exactly a user and an assistant message")
    user, assistant = messages
    if user.get("role") != "user" or assistant.get("role") != "assistant":
        raise BadRow(f"roles {user.get('role')!r}, {assistant.get('role')!r}; expected user, assistant")
    if len(images) != 1:
        raise BadRow(f"{len(images)} images; expected one")
    text = split_user_turn(str(user.get("content", "")), len(images))
    return {
        "prompt": [{"role": "user", "content": text}],
        "completion": [{"role": "assistant", "content": str(assistant.get("content", ""))}],
        "images": [relocate_image_path(str(p), image_root) for p in images],
    }


class RowCounter:
    """Counts and names (the first few) bad rows of one input file."""

    def __init__(self, source: str):
        self.source = source
        self.good = 0
        self.bad = 0

    def reject(self, where: str, reason: str) -> None:
        self.bad += 1
        if self.bad <= _REPORTED:
            log.warning("%s:%s: bad row left out: %s", self.source, where, reason)

    def summary(self) -> dict:
        if self.bad > _REPORTED:
            log.warning("%s: %d bad rows in all", self.source, self.bad)
        return {"source": self.source, "rows": self.good, "bad_rows": self.bad}


def iter_sft_rows(path: str | os.PathLike, image_root: str, counter: RowCounter, limit: int | None = None) -> Iterator[dict]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if limit is not None and counter.good >= limit:
                return
            if not line.strip():
                continue
            try:
                example = sft_row(json.loads(line), image_root)
            except (json.JSONDecodeError, BadRow, AttributeError, TypeError) as err:
                counter.reject(str(number), str(err))
                continue
            missing = [p for p in example["images"] if not os.path.isfile(p)]
            if missing:
                counter.reject(str(number), f"image not found: {missing[0]}")
                continue
            counter.good += 1
            yield example


def sft_dataset(path: str | os.PathLike, image_root: str, cache_dir: str | os.PathLike | None = None,
                limit: int | None = None):
    """(datasets.Dataset, summary) of the SFT JSONL; images decode lazily, when a batch is built."""
    from datasets import Dataset, Image, Sequence

    counter = RowCounter(str(path))
    rows = list(iter_sft_rows(path, image_root, counter, limit))
    summary = counter.summary()
    if not rows:
        raise ValueError(f"{path}: no usable SFT rows ({summary['bad_rows']} bad)")
    dataset = Dataset.from_list(rows)
    dataset = dataset.cast_column("images", Sequence(Image()))
    return dataset, summary


def rl_rows(path: str | os.PathLike, counter: RowCounter, limit: int | None = None) -> list[dict]:
    """The rewritten RL parquet as reward-ready rows."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["prompt", "images", "reward_model", "extra_info"])
    rows = []
    for number, row in enumerate(table.to_pylist()):
        if limit is not None and len(rows) >= limit:
            break
        try:
            images = row["images"] or []
            prompt = row["prompt"] or []
            if len(prompt) != 1 or prompt[0]["role"] != "user":
                raise BadRow("expected one user message")
            if len(images) != 1:
                raise BadRow(f"{len(images)} images; expected one")
            text = split_user_turn(prompt[0]["content"], len(images))
            truth = [float(v) for v in row["reward_model"]["ground_truth"]]
            if len(truth) != 4:
                raise BadRow(f"ground truth {truth!r} is not 4 numbers")
            extra = row["extra_info"]
            width, height, split = int(extra["width"]), int(extra["height"]), str(extra["split"])
        except (BadRow, KeyError, TypeError, ValueError) as err:
            counter.reject(f"row {number}", str(err))
            continue
        if not os.path.isfile(images[0]):
            counter.reject(f"row {number}", f"image not found: {images[0]}")
            continue
        rows.append({
            "prompt": [{"role": "user", "content": text}],
            "images": [images[0]],
            "ground_truth": truth,
            "width": width,
            "height": height,
            "split": split,
        })
        counter.good += 1
    return rows


def rl_dataset(path: str | os.PathLike, limit: int | None = None):
    """(datasets.Dataset, summary) of a rewritten RL parquet."""
    from datasets import Dataset, Image, Sequence

    counter = RowCounter(str(path))
    rows = rl_rows(path, counter, limit)
    summary = counter.summary()
    if not rows:
        raise ValueError(f"{path}: no usable RL rows ({summary['bad_rows']} bad)")
    dataset = Dataset.from_list(rows).cast_column("images", Sequence(Image()))
    return dataset, summary

