"""IoU, the scoring of one answer, the paper's split metrics, and lmms-eval's RefCOCO metrics over the same answers.

Acc@0.5 counts IoU strictly greater than 0.5 (the RL reward uses >=, evaluation does not).

lmms-eval's RefCOCO task (lmms_eval/tasks/refcoco/utils_rec.py, EvolvingLMMs-Lab/lmms-eval)
scores each record with IoU, ACC@t for t in 0.1, 0.3, 0.5, 0.7, 0.9 and Center_ACC. We follow
its definitions where they are about the boxes:

- ACC@t: IoU >= t (inclusive), so a record at IoU exactly 0.5 counts for its ACC@0.5 and not
  for the paper's Acc@0.5;
- Center_ACC: the predicted box's centre ((x1 + x2) / 2, (y1 + y2) / 2) lies inside the ground
  truth box, its edges included;
- every metric is the plain mean of the per-record values over the split.

Where we differ, on purpose, so that the paper's numbers and these come from the same boxes:

- Boxes: lmms-eval prompts for 0-1 coordinates and compares them with the ground truth divided
  by the image size; we use the paper's parser and its 0-1000 -> pixel boxes (egm.grounding).
  IoU and centre containment do not change when both boxes are rescaled per axis, so pixels vs
  normalised coordinates change nothing; the parser and the prompt do, so these are lmms-eval's
  metrics over the paper's answers, not lmms-eval's run of the model.
- IoU: the paper's (areas clipped at 0, an empty union gives 0). lmms-eval's does not clip, so
  a reversed box has a negative area there (and an empty union divides by zero).
- An answer without a box: lmms-eval scores [0, 0, 0, 0] in its place, IoU 0, but its centre
  (0, 0) is "inside" a ground truth touching the image's top-left corner. Here it is a miss for
  every metric, Center_ACC included, as the paper counts it for Acc@0.5.
- Bad records (invalid data) are misses for every metric, as for the paper's: every line of a
  split is a sample; lmms-eval has no such records.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from egm.grounding import parse_box, scale_box

ACC_THRESHOLD = 0.5
LMMS_THRESHOLDS = (0.1, 0.3, 0.5, 0.7, 0.9)
# lmms-eval's own metric names, so a reader can match our numbers with its output.
LMMS_METRICS = ("IoU", *(f"ACC@{t}" for t in LMMS_THRESHOLDS), "Center_ACC")


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


def evaluate_answer(answer: str, gt_box: list[float], width: int, height: int) -> dict:
    """Parse, scale and score one answer: the fields every prediction record carries."""
    parsed = parse_box(answer)
    if parsed is None:
        return {"parsed_box": None, "pred_box": None, "iou": 0.0}
    pred = scale_box(parsed, width, height)
    return {"parsed_box": parsed, "pred_box": pred, "iou": iou(pred, gt_box)}


def acc_at_05(ious: Iterable[float]) -> float:
    values = list(ious)
    if not values:
        return float("nan")
    return sum(1 for v in values if v > ACC_THRESHOLD) / len(values)


def hit_at(value: float, threshold: float) -> bool:
    """lmms-eval's ACC@t for one record: IoU at or above the threshold (the paper's is strictly above)."""
    return value >= threshold


def center_inside(pred: Sequence[float] | None, gt: Sequence[float]) -> bool:
    """lmms-eval's Center_ACC for one record: the predicted box's centre inside the ground truth,
    edges included. No predicted box is a miss (lmms-eval would test the centre of [0, 0, 0, 0])."""
    if pred is None:
        return False
    cx, cy = (pred[0] + pred[2]) / 2, (pred[1] + pred[3]) / 2
    return gt[0] <= cx <= gt[2] and gt[1] <= cy <= gt[3]


def lmms_record(iou_value: float, pred: Sequence[float] | None, gt: Sequence[float]) -> dict[str, float]:
    """One record's lmms-eval metrics (LMMS_METRICS), hits as 1.0 or 0.0."""
    record = {"IoU": float(iou_value)}
    for threshold in LMMS_THRESHOLDS:
        record[f"ACC@{threshold}"] = float(hit_at(iou_value, threshold))
    record["Center_ACC"] = float(center_inside(pred, gt))
    return record


def nan_to_none(value: float) -> float | None:
    """A metric as JSON has it: NaN (nothing to average) becomes null, which json.dump cannot write portably."""
    return None if value != value else value


def mean(values: Iterable[float]) -> float:
    values = list(values)
    if not values:
        return float("nan")
    return sum(values) / len(values)


def summarize_predictions(rows: Iterable[dict], model: str, split: str) -> dict:
    """Split metrics from prediction rows (streamed once); IoU is recomputed from the raw answer.

    The denominator is every row, as the authors count every line of the split file: an answer
    with no parseable box and a bad record (invalid data, never sent to the model) both score
    IoU 0; both are counted, and the bad ones listed by `file:line` with the reason. Tokens and
    latency average over the answered records. "lmms_eval" holds lmms-eval's RefCOCO metrics
    (LMMS_METRICS, fractions) over the same samples.
    """
    scored, bad, unparseable, n_records = [], [], 0, 0
    tokens, latencies = [], []
    lmms_sums = dict.fromkeys(LMMS_METRICS, 0.0)
    for row in rows:
        n_records += 1
        if row.get("status") == "bad_record":
            bad.append({"where": row.get("where") or f"line {row['line']}", "line": row["line"],
                        "reason": row.get("error")})
            scored.append(0.0)
            continue
        result = evaluate_answer(row["answer"], row["bbox"], row["width"], row["height"])
        if result["parsed_box"] is None:
            unparseable += 1
        scored.append(result["iou"])
        for name, value in lmms_record(result["iou"], result["pred_box"], row["bbox"]).items():
            lmms_sums[name] += value
        tokens.append(row["completion_tokens"])
        latencies.append(row["latency_s"])

    return {
        "model": model,
        "split": split,
        "n_records": n_records,
        "n_scored": len(scored),
        "n_answered": len(scored) - len(bad),
        "n_bad_records": len(bad),
        "n_unparseable": unparseable,
        "acc_at_0.5": nan_to_none(acc_at_05(scored)),
        "mean_iou": nan_to_none(mean(scored)),
        "mean_completion_tokens": nan_to_none(mean(tokens)),
        "mean_latency_s": nan_to_none(mean(latencies)),
        "lmms_eval": {name: total / len(scored) if scored else None for name, total in lmms_sums.items()},
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
