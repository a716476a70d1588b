"""Do two engines give the same answers? Record by record, over the prediction files of two models.

The check behind "our engines agree": the same checkpoint answered through two backends (vLLM
and the hf decode, say) at temperature 0 should give the same parsed box for nearly every
record. Exact text equality is too strict to be useful (a single near-tie in the reasoning can
change a word and nothing else); the parsed box is what the metrics see.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from egm.metrics import read_prediction_rows


def _by_key(path: Path) -> dict[tuple[str, str], dict]:
    # By line: ids may repeat within a split (egm.data.splits).
    return {(row["split"], str(row["line"])): row for row in read_prediction_rows(path) if row.get("status") == "ok"}


def engine_agreement(dir_a: Path, dir_b: Path, splits: Iterable[str], max_listed: int = 50) -> dict:
    """Share of records whose parsed boxes are equal between two models' prediction directories.

    Records answered by only one side count as differences (`only_in_a`/`only_in_b`); the first
    `max_listed` differing records are listed with both answers' boxes, token counts and texts.
    """
    n = equal = same_text = same_tokens = 0
    only_a: list[str] = []
    only_b: list[str] = []
    differences: list[dict] = []
    n_differing = 0
    for split in splits:
        a = _by_key(Path(dir_a) / f"{split}.jsonl")
        b = _by_key(Path(dir_b) / f"{split}.jsonl")
        only_a += [f"{s}/{i}" for s, i in sorted(a.keys() - b.keys())]
        only_b += [f"{s}/{i}" for s, i in sorted(b.keys() - a.keys())]
        for key in sorted(a.keys() & b.keys()):
            ra, rb = a[key], b[key]
            n += 1
            same_text += ra["answer"] == rb["answer"]
            same_tokens += ra["completion_tokens"] == rb["completion_tokens"]
            if ra["parsed_box"] == rb["parsed_box"]:
                equal += 1
                continue
            n_differing += 1
            if len(differences) < max_listed:
                differences.append({
                    "split": key[0], "line": int(key[1]), "id": str(ra.get("id")),
                    "a": {k: ra[k] for k in ("parsed_box", "iou", "completion_tokens", "answer")},
                    "b": {k: rb[k] for k in ("parsed_box", "iou", "completion_tokens", "answer")},
                })
    compared = n + len(only_a) + len(only_b)
    return {
        "records": compared,
        "both_answered": n,
        "equal_boxes": equal,
        "share_equal_boxes": equal / compared if compared else None,
        "equal_text": same_text,
        "equal_token_counts": same_tokens,
        "differing": n_differing,
        "only_in_a": only_a,
        "only_in_b": only_b,
        "differences": differences,
    }
