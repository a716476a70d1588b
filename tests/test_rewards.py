"""The RL reward against the authors' rules (EGM.md section 4), on ordinary and adversarial text."""

import math

import pytest

from egm.grounding import format_sft_target, scale_box
from egm.metrics import iou
from egm.train.rewards import extract_box, grounding_reward, reward_iou, trl_grounding_reward

W = H = 1000  # on a 1000x1000 image the grid is the pixel grid (up to the W-1 clamp)


def mix(value):
    return 0.5 * (value >= 0.5) + 0.5 * value


def test_sft_target_format_scores_its_own_box():
    text = format_sft_target("The image shows a red circle. The target is the red circle.", [100, 200, 300, 400],
                             "the red circle")
    assert extract_box(text) == [100, 200, 300, 400]
    assert grounding_reward(text, [100, 200, 300, 400], 640, 480) == 1.0
    assert grounding_reward(text, [100, 200, 300, 400], 640, 480, split="test") == 1.0


def test_iou_threshold_is_inclusive_unlike_acc():
    # IoU exactly 0.5: a hit for the reward (>=), not for Acc@0.5 (>).
    text = "[0, 0, 200, 200]"
    truth = [0, 0, 400, 200]
    assert reward_iou(text, truth, W, H) == 0.5
    assert grounding_reward(text, truth, W, H) == 0.75
    assert grounding_reward(text, truth, W, H, split="test") == 1.0
    # just below: no bonus, accuracy 0
    below = reward_iou("[0, 0, 199, 200]", truth, W, H)
    assert below < 0.5
    assert grounding_reward("[0, 0, 199, 200]", truth, W, H) == pytest.approx(0.5 * below)
    assert grounding_reward("[0, 0, 199, 200]", truth, W, H, split="test") == 0.0


@pytest.mark.parametrize(
    "text, box",
    [
        # the LAST bracket group, not the first (evaluation takes the first)
        ("I first guessed [0, 0, 10, 10] but it is [100, 100, 300, 300]", [100, 100, 300, 300]),
        ('```json\n[\n\t{"bbox_2d": [1, 2, 3, 4], "label": "a"},\n\t{"bbox_2d": [5, 6, 7, 8]}\n]\n```', [5, 6, 7, 8]),
        # inside <answer>...</answer> when present: boxes outside it are ignored
        ("think [9, 9, 9, 9] </think><answer>[10, 20, 30, 40]</answer> trailing [1, 1, 1, 1]", [10, 20, 30, 40]),
        ("<answer>\nmulti\nline [10, 20, 30, 40]\n</answer>", [10, 20, 30, 40]),
        ("<answer>[1, 2, 3, 4]</answer><answer>[5, 6, 7, 8]</answer>", [1, 2, 3, 4]),  # the first answer
        ("<answer>[1, 2, 3, 4] unclosed", [1, 2, 3, 4]),  # no closed answer: the whole text
        # no usable group: the last four numbers of the searched text
        ("from 100 and 120 to 300 and 330", [100, 120, 300, 330]),
        ("x1 is 100, y1 is 120, x2 is 300 and y2 is 330", [2, 300, 2, 330]),  # digits of names count too
        ("1 2 3 4 5 6", [3, 4, 5, 6]),
        # a group of more than four numbers gives its first four
        ("[1, 2, 3, 4, 5]", [1, 2, 3, 4]),
        # number syntax: signs and decimals, but no exponent (unlike evaluation): `1.5e2` is 1.5 and 2
        ("[1.5e2, -0, 2.0E2, +2e2]", [1.5, 2.0, -0.0, 2.0]),
        ("[6e2, 1, 2, 3]", [6.0, 2.0, 1.0, 2.0]),
        ("[.5, 1., -3.25, 4]", [0.5, 1.0, -3.25, 4.0]),
        ("[1.2.3, 4, 5]", [1.2, 0.3, 4.0, 5.0]),
        ("[+-5, 1, 2, 3]", [-5.0, 1.0, 2.0, 3.0]),
        ("x1=10 y1=20 x2=3e2 y2=4E2", [2.0, 2.0, 4.0, 2.0]),  # ... 2 3 2 | 2 4 2
    ],
)
def test_box_extraction(text, box):
    assert extract_box(text) == box


@pytest.mark.parametrize(
    "text",
    ["", "no box here", "1 2 3", "[1, 2, 3]", "<answer>[1, 2, 3]</answer> 4 5 6 7", "<answer></answer>",
     "[a, b, c, d]", None, 42,
     # the last group decides: fewer than four numbers in it is no box, whatever surrounds it
     "[1, 2, 3] 10 20 30 40", "[100, 100, 200, 200] and a footnote [1]", "[10, 20, 30, 40] []",
     "[1e2, 3]", "[2, " + "9" * 400 + ", 3, 4]"],  # the last: a number that is not finite as a float
)
def test_unparseable_scores_zero(text):
    assert extract_box(text) is None
    assert grounding_reward(text, [0, 0, 500, 500], W, H) == 0.0
    assert grounding_reward(text, [0, 0, 500, 500], W, H, split="test") == 0.0


def test_reversed_corners_are_swapped():
    truth = [100, 100, 300, 300]
    for text in ("[300, 300, 100, 100]", "[100, 300, 300, 100]", "[300, 100, 100, 300]"):
        assert grounding_reward(text, truth, W, H) == 1.0
    # evaluation does not reorder: the same reversed box scores 0 there
    assert iou(scale_box([300, 300, 100, 100], W, H), scale_box(truth, W, H)) == 0.0


def test_scaling_to_pixels_like_evaluation_without_the_grid_clamp():
    # 640x480: grid 0-1000 -> pixels with round-half-even and the image clamp.
    text, truth = "[125, 250, 625, 750]", [125, 250, 625, 750]
    pred = scale_box([125, 250, 625, 750], 640, 480, clamp_grid=False)
    assert pred == [80.0, 120.0, 400.0, 360.0]
    assert reward_iou(text, truth, 640, 480) == 1.0
    # Out-of-grid predictions are clamped to the image, not rejected.
    assert reward_iou("[-500, -500, 1500, 1500]", [0, 0, 1000, 1000], 100, 100) == 1.0
    huge = "9" * 308  # finite, but times the image size it overflows a double
    assert reward_iou(f"[{huge}, 0, -{huge}, 1000]", [0, 0, 1000, 1000], 100, 100) == 1.0
    # A degenerate box is widened by one pixel (scale_box), so it still has an area.
    value = reward_iou("[500, 500, 500, 500]", [500, 500, 510, 510], 1000, 1000)
    assert value == pytest.approx(1 / 100)


def test_mix_reward_values():
    truth = [0, 0, 400, 400]
    for text in ("[0, 0, 400, 400]", "[0, 0, 300, 400]", "[0, 0, 100, 400]", "[500, 500, 600, 600]"):
        value = reward_iou(text, truth, W, H)
        assert grounding_reward(text, truth, W, H) == pytest.approx(mix(value))
        assert 0.0 <= grounding_reward(text, truth, W, H) <= 1.0
    assert grounding_reward("[500, 500, 600, 600]", truth, W, H) == 0.0


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="split"):
        grounding_reward("[1, 2, 3, 4]", [1, 2, 3, 4], W, H, split="val")
    with pytest.raises(ValueError, match="4 coordinates"):
        grounding_reward("[1, 2, 3, 4]", [1, 2, 3], W, H)


def test_trl_wrapper_takes_dataset_columns_and_conversational_completions():
    completions = [
        "[0, 0, 400, 400]",
        [{"role": "assistant", "content": "[0, 0, 400, 400]"}],
        [{"role": "assistant", "content": [{"type": "text", "text": "[0, 0, 200, 200]"}]}],
        "nothing",
    ]
    rewards = trl_grounding_reward(
        prompts=[None] * 4,
        completions=completions,
        completion_ids=[None] * 4,
        ground_truth=[[0, 0, 400, 400]] * 4,
        width=[W] * 4,
        height=[H] * 4,
        split=["train", "train", "test", "train"],
        images=[None] * 4,
        trainer_state=None,
    )
    assert rewards[:2] == [1.0, 1.0]
    assert rewards[2] == 0.0  # IoU 0.25, accuracy reward
    assert rewards[3] == 0.0
    assert all(isinstance(r, float) and math.isfinite(r) for r in rewards)


# ------------------------------------------------------------------ the rule, written out again
#
# An independent reading of EGM.md section 4, deliberately without regular expressions or any
# egm code, so that a shared mistake (a pattern, a helper) cannot make both sides agree.


def _is_digit(char):
    return char.isdecimal()  # what `\d` matches in a Python str pattern (Unicode category Nd)


def rule_numbers(text):
    """The successive matches of `[-+]?\\d*\\.?\\d+`, scanned by hand, left to right."""
    found, i, n = [], 0, len(text)
    while i < n:
        body = i + 1 if text[i] in "+-" else i
        end = body
        while end < n and _is_digit(text[end]):
            end += 1
        if end + 1 < n and text[end] == "." and _is_digit(text[end + 1]):
            end += 1
            while end < n and _is_digit(text[end]):
                end += 1
        elif end == body:  # neither digits nor ".digit" here: no number starts at i
            i += 1
            continue
        found.append(text[i:end])
        i = end
    return found


def rule_region(text):
    start = text.find("<answer>")
    if start >= 0:
        stop = text.find("</answer>", start + len("<answer>"))
        if stop >= 0:
            return text[start + len("<answer>"):stop]
    return text


def rule_last_group(text):
    """Body of the last `[...]` with no bracket inside, or None."""
    last, opened = None, None
    for i, char in enumerate(text):
        if char == "[":
            opened = i
        elif char == "]":
            if opened is not None:
                last = text[opened + 1:i]
            opened = None
    return last


def rule_box(text):
    region = rule_region(text)
    group = rule_last_group(region)
    picked = rule_numbers(group)[:4] if group is not None else rule_numbers(region)[-4:]
    if len(picked) != 4:
        return None
    values = [float(v) for v in picked]
    if any(v in (math.inf, -math.inf) or v != v for v in values):
        return None
    return values


def rule_pixel(value, size):
    scaled = value * size / 1000
    if scaled == math.inf:
        return size - 1
    if scaled == -math.inf:
        return 0
    return min(max(round(scaled), 0), size - 1)


def rule_pixels(box, width, height):
    x1, y1, x2, y2 = (rule_pixel(v, width if k % 2 == 0 else height) for k, v in enumerate(box))
    if x1 == x2 and width > 1:
        x2 = min(x1 + 1, width - 1)
    if y1 == y2 and height > 1:
        y2 = min(y1 + 1, height - 1)
    return x1, y1, x2, y2


def rule_reward(text, truth, width, height, split):
    box = rule_box(text)
    if box is None:
        return 0.0
    x1, y1, x2, y2 = box
    if x1 > x2:
        x1, x2 = x2, x1
    if y1 > y2:
        y1, y2 = y2, y1
    p = rule_pixels([x1, y1, x2, y2], width, height)
    t = rule_pixels(truth, width, height)
    inter_w = max(0, min(p[2], t[2]) - max(p[0], t[0]))
    inter_h = max(0, min(p[3], t[3]) - max(p[1], t[1]))
    inter = inter_w * inter_h
    union = max(0, p[2] - p[0]) * max(0, p[3] - p[1]) + max(0, t[2] - t[0]) * max(0, t[3] - t[1]) - inter
    overlap = inter / union if union > 0 else 0.0
    hit = 1.0 if overlap >= 0.5 else 0.0
    return hit if split == "test" else 0.5 * hit + 0.5 * overlap


# ------------------------------------------------------------------ random answers

NOISE = list("0123456789") * 3 + list("+-.eE,[]{} :\"x\n") + [
    "<answer>", "</answer>", '"bbox_2d": ', "</think>", "٣", "５", "e-", "E+", "..", "[]"]


def random_number(rng, near):
    """A number written the ways a model (or a broken one) might, near a coordinate or not."""
    value = near + rng.gauss(0, 30) if rng.random() < 0.85 else rng.uniform(-2000, 3000)
    kind = rng.randrange(14)
    if kind >= 9:
        return str(round(value))
    if kind == 1:
        return f"{value:.{rng.randrange(4)}f}"
    if kind == 2:  # exponent: one number to the evaluation parser, two to the reward
        return f"{value:.{rng.randrange(3)}e}".replace("e+0", rng.choice(["e", "E", "e+", "e0"]))
    if kind == 3:
        return f"{value / 100:.1f}e2"
    if kind == 4:
        return ("+" if value >= 0 else "") + str(round(value))
    if kind == 5:
        return f"{abs(value) / 1000:.3f}"[1:]  # ".123"
    if kind == 6:
        return f"{round(value)}.{rng.randrange(10)}.{rng.randrange(10)}"  # "1.2.3"
    if kind == 7:
        return rng.choice(["9" * rng.choice([20, 310, 400]), "0", "-0", "1000", "00012"])
    if kind == 8:
        return str(round(value)) + rng.choice([".", "px"])
    return str(round(value))


def random_box(rng, truth, count=4):
    numbers = [random_number(rng, truth[k % 4]) for k in range(count)]
    if count >= 3 and rng.random() < 0.2:  # reversed corners
        numbers[0], numbers[2] = numbers[2], numbers[0]
    sep = rng.choice([", ", ",", " ", " , ", ",\n\t"])
    body = sep.join(numbers)
    if rng.random() < 0.3:
        return f'{{"bbox_2d": [{body}], "label": "the thing {rng.randrange(5)}"}}'
    return f"[{body}]"


def random_noise(rng, length):
    return "".join(rng.choice(NOISE) for _ in range(length))


def random_answer(rng, truth):
    parts = []
    for _ in range(rng.randrange(1, 5)):
        roll = rng.random()
        if roll < 0.45:
            parts.append(random_box(rng, truth, count=rng.choice([4, 4, 4, 3, 5, 2])))
        elif roll < 0.65:
            parts.append(random_noise(rng, rng.randrange(0, 30)))
        elif roll < 0.8:
            parts.append(" ".join(random_number(rng, truth[k]) for k in range(4)))
        else:
            parts.append(rng.choice(["I think ", "</think>\n\n", "```json\n", "\n```", " and ", "; ", "[", "]"]))
    text = rng.choice(["", " "]).join(parts)
    roll = rng.random()
    if roll < 0.3:
        cut = rng.randrange(len(text) + 1)
        text = text[:cut] + "<answer>" + text[cut:] + "</answer>" + random_noise(rng, rng.randrange(10))
    elif roll < 0.4:
        text = "<answer>" + text  # unclosed: the whole text is searched
    return text


def random_case(rng):
    width, height = rng.choice([(1, 1), (1, 7), (2, 3), (96, 96), (640, 480)] + [(rng.randrange(1, 2500),) * 2])
    x1, x2 = sorted(rng.uniform(0, 1000) for _ in range(2))
    y1, y2 = sorted(rng.uniform(0, 1000) for _ in range(2))
    truth = [round(v) for v in (x1, y1, x2, y2)]
    text = random_answer(rng, truth) if rng.random() < 0.85 else random_noise(rng, rng.randrange(0, 60))
    return text, truth, width, height


CASES = 6000


def has_exponent(text):
    """Whether the text has what the evaluation parser would read as an exponent (`6e2`, `1.5E-3`)."""
    for k in range(1, len(text) - 1):
        if text[k] in "eE" and text[k - 1].isdigit():
            rest = text[k + 1:k + 3]
            if rest[:1].isdigit() or (rest[:1] in "+-" and rest[1:2].isdigit()):
                return True
    return False


def test_reward_follows_the_rule_on_random_answers():
    import random

    rng = random.Random(20240915)
    seen = {"box": 0, "no box": 0, "hit": 0, "partial": 0, "exponent box": 0}
    for _ in range(CASES):
        text, truth, width, height = random_case(rng)
        expected_box = rule_box(text)
        assert extract_box(text) == expected_box, text
        for split in ("train", "test"):
            expected = rule_reward(text, truth, width, height, split)
            got = grounding_reward(text, truth, width, height, split)
            assert got == expected, (text, truth, width, height, split, got, expected)
        mixed = rule_reward(text, truth, width, height, "train")
        seen["box" if expected_box else "no box"] += 1
        seen["hit"] += mixed >= 0.75
        seen["partial"] += 0 < mixed < 0.5
        seen["exponent box"] += expected_box is not None and has_exponent(text)
    # The generator must reach every branch often, or agreement would prove little.
    assert all(count >= CASES // 50 for count in seen.values()), seen


@pytest.mark.parametrize(
    "text, box",
    [
        ("[6e2, 1, 2, 3]", [6.0, 2.0, 1.0, 2.0]),
        ("[.5, 1, 2, 3]", [0.5, 1.0, 2.0, 3.0]),
        ("[1.2.3, 4, 5]", [1.2, 0.3, 4.0, 5.0]),
        ("[1, 2, 3] then 10 20 30 40", None),
        ("10 20 30 40 then [1, 2, 3]", None),
        ("a [1, [2, 3, 4, 5], 6] b", [2.0, 3.0, 4.0, 5.0]),
        ("<answer>1 2 3 4</answer> [5, 6, 7, 8]", [1.0, 2.0, 3.0, 4.0]),
        ("1-2-3-4", [1.0, -2.0, -3.0, -4.0]),
        ("٣ ٣ ٣ ٣", [3.0, 3.0, 3.0, 3.0]),
    ],
)
def test_the_rule_itself_on_hand_picked_cases(text, box):
    # The reference is checked by hand too, so that the property test compares against the rule.
    assert rule_box(text) == box
    assert extract_box(text) == box
