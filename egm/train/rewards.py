"""The RL reward of the authors' code (EGM.md section 4), and its TRL reward-function wrapper.

Differences from evaluation (egm.grounding / egm.metrics), all on purpose, all the authors':

- the box is looked for inside `<answer>...</answer>` when the text has one (else the whole
  text), and it is the LAST `[...]` group, not the first `"bbox_2d"`/`[a, b, c, d]`;
- numbers are the matches of `[-+]?\\d*\\.?\\d+`, not the evaluation parser's pattern: there is no
  exponent, so `6e2` is the two numbers 6 and 2, and `1.2.3` is 1.2 and .3;
- the box is reordered so that x1 <= x2 and y1 <= y2;
- both the prediction and the ground truth (0-1000 grid) are scaled to pixels WITHOUT the
  [0, 1000] pre-clamp (`scale_box(..., clamp_grid=False)`), still clamped to the image;
- training ("mix"): 0.5 * [IoU >= 0.5] + 0.5 * IoU; validation ("test"): [IoU >= 0.5]; note
  `>=` here where Acc@0.5 uses `>`;
- no format reward: a text without a box scores 0.

Why two number patterns: the authors' evaluation script and their AReaL reward were written
separately and read numbers differently (the evaluation one accepts `1.5e2`, the reward one does
not). Evaluation must match the paper's table and RL must optimise the signal the authors' runs
optimised, so egm.grounding keeps the evaluation pattern and this module has its own; a shared
pattern would silently change one of the two on every answer written with an exponent.

The rule, made precise where the release notes leave room:

- a "[...] group" is a bracket pair with no bracket inside (`\\[[^\\[\\]]*\\]`), i.e. an innermost
  group, so that in the SFT answer format `[{"bbox_2d": [x1, y1, x2, y2], ...}]` the last group is
  the box; `[]` is a group too (with no numbers);
- when the searched text has a group, only the LAST group counts: its first four numbers are the
  box, and with fewer than four there is no box (numbers outside it are NOT used as a fallback);
- when it has no group, the last four numbers of the searched text are the box (fewer: no box);
- a number whose float is not finite (a digit string too long for a double) means no box.
"""

from __future__ import annotations

import math
import re

from egm.grounding import scale_box
from egm.metrics import iou

SPLITS = ("train", "test")
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_GROUP = re.compile(r"\[([^\[\]]*)\]")
# The authors' reward pattern; deliberately not egm.grounding's (see the module docstring).
_NUMBER = re.compile(r"[-+]?\d*\.?\d+")


def answer_region(completion: str) -> str:
    """The text the box is looked for in: the first `<answer>...</answer>` body, else everything."""
    match = _ANSWER.search(completion)
    return match.group(1) if match else completion


def extract_box(completion: str) -> list[float] | None:
    """The raw (0-1000, unordered) box the reward reads from a completion, or None."""
    if not isinstance(completion, str) or not completion:
        return None
    region = answer_region(completion)
    groups = _GROUP.findall(region)
    if groups:
        numbers = _NUMBER.findall(groups[-1])[:4]
    else:
        numbers = _NUMBER.findall(region)[-4:]
    if len(numbers) < 4:
        return None
    box = [float(v) for v in numbers]
    if not all(math.isfinite(v) for v in box):
        return None
    return box


# Without the [0, 1000] pre-clamp, `v * size` can overflow to inf for a huge finite v (a few
# hundred digits), and round(inf) raises. Any |v| beyond this bound lands outside every image and
# is clamped to its edge anyway, so bounding it first changes no result the formula can compute.
_BOUND = 1e12


def _bounded(value: float) -> float:
    return min(max(value, -_BOUND), _BOUND)


def _ordered(box: list[float]) -> list[float]:
    x1, y1, x2, y2 = box
    return [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]


def reward_iou(completion: str, ground_truth: list, width: int, height: int) -> float | None:
    """IoU in pixels as the reward computes it, or None when the completion has no box."""
    box = extract_box(completion)
    if box is None:
        return None
    pred = scale_box(_ordered([_bounded(v) for v in box]), int(width), int(height), clamp_grid=False)
    truth = scale_box([float(v) for v in ground_truth], int(width), int(height), clamp_grid=False)
    return iou(pred, truth)


def grounding_reward(completion: str, ground_truth: list, width: int, height: int, split: str = "train") -> float:
    """The authors' reward for one completion.

    `ground_truth` is the parquet's `reward_model.ground_truth` (0-1000 grid), `width`/`height`
    the image size in pixels, `split` the parquet's `extra_info.split` ("train" -> the "mix"
    reward, "test" -> accuracy at IoU >= 0.5).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown reward split {split!r}; expected one of {SPLITS}")
    if len(ground_truth) != 4:
        raise ValueError(f"ground truth must have 4 coordinates, got {ground_truth!r}")
    value = reward_iou(completion, ground_truth, width, height)
    if value is None:
        return 0.0
    hit = 1.0 if value >= 0.5 else 0.0
    if split == "test":
        return hit
    return 0.5 * hit + 0.5 * value


def _text(completion) -> str:
    # TRL hands conversational completions as [{"role": "assistant", "content": "..."}].
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion:
        content = completion[-1].get("content", "")
        if isinstance(content, list):
            return "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return str(content)
    return ""


def trl_grounding_reward(prompts, completions, ground_truth, width, height, split, **_) -> list[float]:
    """TRL reward function: called as f(prompts=, completions=, completion_ids=, **dataset columns)."""
    return [
        grounding_reward(_text(c), list(gt), int(w), int(h), str(s))
        for c, gt, w, h, s in zip(completions, ground_truth, width, height, split, strict=True)
    ]


trl_grounding_reward.__name__ = "grounding_reward"
