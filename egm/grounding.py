"""The paper's grounding semantics: prompts, answer parsing, coordinate mapping.

Everything here follows the authors' released evaluation code string for string (see the
README's "Semantics" section); a one-character change to a prompt is a different experiment.
"""

from __future__ import annotations

import json
import math
import re

# Evaluation / RL prompts; `{sent}` is the referring expression.
PROMPTS: dict[str, str] = {
    "qwen3": "Locate {sent}, output its bbox coordinates using JSON format",
    "qwen3_amodal": "Locate {sent} amodally, output its bbox coordinates using JSON format",
    "grounding": (
        "Please provide the bounding box coordinate of the region this sentence describes: "
        "<ref>{sent}</ref> "
    ),
    "amodal": (
        "Please provide the amodal bounding box coordinate of the region this sentence "
        "describes: <ref>{sent}</ref>"
    ),
}

# The SFT data's user prompt ends with a period, unlike the eval/RL prompt.
SFT_PROMPT = "Locate {sent}, output its bbox coordinates using JSON format."

# Qwen3-VL answers in a 0-1000 grid regardless of the image size.
GRID = 1000

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_SEP = r"\s*,\s*"
_QUAD = rf"\[\s*({_NUM}){_SEP}({_NUM}){_SEP}({_NUM}){_SEP}({_NUM})\s*\]"
_BBOX_2D = re.compile(rf'"bbox_2d"\s*:\s*{_QUAD}')
_ANY_QUAD = re.compile(_QUAD)
_ANY_NUM = re.compile(_NUM)


def build_prompt(template: str, sent: str) -> str:
    """The user text for one record; `template` names an entry of PROMPTS."""
    if template not in PROMPTS:
        raise KeyError(f"unknown prompt template {template!r}; known: {sorted(PROMPTS)}")
    return PROMPTS[template].format(sent=sent)


def parse_box(text: str) -> list[float] | None:
    """Raw 0-1000 box from a model answer (reasoning included), or None if it has none.

    Order: the first `"bbox_2d": [a, b, c, d]`, else the first `[a, b, c, d]`, else the
    last four numbers anywhere in the text.
    """
    if not text:
        return None
    match = _BBOX_2D.search(text) or _ANY_QUAD.search(text)
    if match:
        return [float(v) for v in match.groups()]
    numbers = _ANY_NUM.findall(text)
    if len(numbers) >= 4:
        return [float(v) for v in numbers[-4:]]
    return None


def _to_pixels(value: float, size: int, clamp_grid: bool) -> int:
    if not math.isfinite(value):
        value = 0.0
    if clamp_grid:
        value = min(max(value, 0.0), float(GRID))
    # Python's round (half to even) as in the authors' code.
    return min(max(round(value * size / GRID), 0), size - 1)


def scale_box(box: list[float], width: int, height: int, clamp_grid: bool = True) -> list[float]:
    """Map a 0-1000 box to pixels (evaluation variant; boxes are not reordered).

    `clamp_grid=False` is the RL reward's variant, which skips the [0, 1000] pre-clamp.
    """
    x1, x2 = (_to_pixels(v, width, clamp_grid) for v in (box[0], box[2]))
    y1, y2 = (_to_pixels(v, height, clamp_grid) for v in (box[1], box[3]))
    if x1 == x2 and width > 1:
        x2 = min(x1 + 1, width - 1)
    if y1 == y2 and height > 1:
        y2 = min(y1 + 1, height - 1)
    return [float(x1), float(y1), float(x2), float(y2)]


def to_grid(box: list[float], width: int, height: int) -> list[int]:
    """Pixel box -> integer 0-1000 box (how the released RL/SFT targets are expressed)."""
    x1, y1, x2, y2 = box
    return [
        round(x1 * GRID / width),
        round(y1 * GRID / height),
        round(x2 * GRID / width),
        round(y2 * GRID / height),
    ]


def format_sft_target(reasoning: str, box_grid: list[int], sent: str) -> str:
    """The assistant turn of the SFT data: reasoning, `</think>`, then a JSON code block."""
    coords = ", ".join(str(int(v)) for v in box_grid)
    label = json.dumps(sent, ensure_ascii=False)
    return (
        f"{reasoning}\n</think>\n\n```json\n[\n\t"
        f'{{"bbox_2d": [{coords}], "label": {label}}}'
        "\n]\n```"
    )

