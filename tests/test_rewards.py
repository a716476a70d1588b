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
        ("[100, 100, 200, 200] and a footnote [1]", [100, 200, 200, 1]),
        ("1 2 3 4 5 6", [3, 4, 5, 6]),
        # a group of more than four numbers gives its first four
        ("[1, 2, 3, 4, 5]", [1, 2, 3, 4]),
        # number syntax: signs, decimals, exponents
        ("[1.5e2, -0, 2.0E2, +2e2]", [150.0, 0.0, 200.0, 200.0]),
        ("[.5, 1., -3.25, 4]", [0.5, 1.0, -3.25, 4.0]),
    ],
)
def test_box_extraction(text, box):
    assert extract_box(text) == box


@pytest.mark.parametrize(
    "text",
    ["", "no box here", "1 2 3", "[1, 2, 3]", "<answer>[1, 2, 3]</answer> 4 5 6 7", "<answer></answer>",
     "[a, b, c, d]", None, 42],
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
    assert reward_iou("[1e308, 0, -1e308, 1000]", [0, 0, 1000, 1000], 100, 100) == 1.0  # no overflow
    # inf is ordered first (x2 = inf), then scaled to 0 like any non-finite value: x1 > x2, no area.
    assert reward_iou("[1e999, 0, 1000, 1000]", [0, 0, 1000, 1000], 100, 100) == 0.0
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
