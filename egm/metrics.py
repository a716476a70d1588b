"""IoU and the paper's split metrics.

Acc@0.5 counts IoU strictly greater than 0.5 (the RL reward uses >=, evaluation does not).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

ACC_THRESHOLD = 0.5


def iou(a: list[float], b: list[float]) -> float:
    """IoU of two (x1, y1, x2, y2) boxes, without the +1 pixel convention."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    if union <= 0:
        return 0.0
    return inter / union


def acc_at_05(ious: Iterable[float]) -> float:
    values = list(ious)
    if not values:
        return float("nan")
    return sum(1 for v in values if v > ACC_THRESHOLD) / len(values)


def mean(values: Iterable[float]) -> float:
    values = list(values)
    if not values:
        return float("nan")
    return sum(values) / len(values)


def mean_iou(ious: Iterable[float]) -> float:
    return mean(ious)


def split_average(per_split: Mapping[str, float]) -> float:
    """The paper's "Avg": the unweighted mean over splits."""
    if not per_split:
        return float("nan")
    return sum(per_split.values()) / len(per_split)


def summarize_predictions(rows: Iterable[dict], model: str, split: str) -> dict:
    """Split metrics from prediction rows (streamed once); IoU is recomputed from the raw answer.

    Bad records (invalid data, not model failures) are counted and listed but excluded from
    the denominator; an answer with no parseable box scores IoU 0 and is counted.
    """
    from egm.grounding import evaluate_answer

    scored, bad, unparseable, n_records = [], [], 0, 0
    tokens, latencies = [], []
    for row in rows:
        n_records += 1
        if row.get("status") == "bad_record":
            bad.append({"line": row["line"], "reason": row.get("error")})
            continue
        result = evaluate_answer(row["answer"], row["bbox"], row["width"], row["height"])
        if result["parsed_box"] is None:
            unparseable += 1
        scored.append(result["iou"])
        tokens.append(row["completion_tokens"])
        latencies.append(row["latency_s"])

    def finite_or_none(value: float) -> float | None:
        return None if value != value else value

    return {
        "model": model,
        "split": split,
        "n_records": n_records,
        "n_scored": len(scored),
        "n_bad_records": len(bad),
        "n_unparseable": unparseable,
        "acc_at_0.5": finite_or_none(acc_at_05(scored)),
        "mean_iou": finite_or_none(mean_iou(scored)),
        "mean_completion_tokens": finite_or_none(mean(tokens)),
        "mean_latency_s": finite_or_none(mean(latencies)),
        "bad_records": bad[:50],
    }


def read_prediction_rows(path) -> Iterator[dict]:
    """Rows of a prediction JSONL, one at a time; a malformed line names the file and line."""
    import json

    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                yield json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: malformed prediction line: {err}") from err
