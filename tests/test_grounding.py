import math

import pytest

from egm.grounding import (
    PROMPTS,
    SFT_PROMPT,
    build_prompt,
    format_sft_target,
    parse_box,
    scale_box,
    to_grid,
)


def test_prompts_are_the_authors_strings():
    assert build_prompt("qwen3", "the red car") == "Locate the red car, output its bbox coordinates using JSON format"
    assert PROMPTS["qwen3_amodal"].format(sent="x") == "Locate x amodally, output its bbox coordinates using JSON format"
    assert PROMPTS["grounding"].endswith("<ref>{sent}</ref> ")  # trailing space is part of it
    assert PROMPTS["amodal"].endswith("<ref>{sent}</ref>")
    assert SFT_PROMPT.endswith("JSON format.")
    with pytest.raises(KeyError, match="unknown prompt template"):
        build_prompt("nope", "x")


@pytest.mark.parametrize(
    "text, expected",
    [
        ('```json\n[{"bbox_2d": [10, 20, 30, 40], "label": "a"}]\n```', [10, 20, 30, 40]),
        # bbox_2d wins over an earlier bare list
        ('first [9, 9, 9, 9] then "bbox_2d": [1, 2, 3, 4]', [1, 2, 3, 4]),
        # the first bbox_2d of several
        ('"bbox_2d": [1, 2, 3, 4] and "bbox_2d": [5, 6, 7, 8]', [1, 2, 3, 4]),
        # signed, decimal and exponent numbers, odd spacing and newlines
        ('"bbox_2d" :[ -1.5e2 , +3,.5,\n 7. ]', [-150.0, 3.0, 0.5, 7.0]),
        # single-quoted key is no bbox_2d match, but a bare list
        ("{'bbox_2d': [11, 12, 13, 14]}", [11, 12, 13, 14]),
        # a five-number list is no box; the last four numbers are
        ("[1, 2, 3, 4, 5]", [2, 3, 4, 5]),
        # nested list: the inner quadruple
        ("[[1, 2, 3, 4]]", [1, 2, 3, 4]),
        # the first quadruple after a triple
        ("[1, 2, 3] then [4, 5, 6, 7] and [8, 9, 10, 11]", [4, 5, 6, 7]),
        # reasoning numbers before the answer do not matter when a list exists
        ("I count 3 cars and 2 people.\n</think>\n\n[100, 200, 300, 400]", [100, 200, 300, 400]),
        # no list at all: the last four numbers
        ("left 5 top 6 right 7 bottom 8 (2 objects, score 9)", [7, 8, 2, 9]),
        # digits inside words count too, as in the authors regex
        ("x1=5 y1=6 x2=7 y2=8", [2, 7, 2, 8]),
    ],
)
def test_parse_box_order_of_rules(text, expected):
    assert parse_box(text) == [float(v) for v in expected]


@pytest.mark.parametrize("text", ["", "no box here", "only 1, 2 and 3", "[a, b, c, d]"])
def test_parse_box_none(text):
    assert parse_box(text) is None


def test_parse_box_overflowing_number_is_infinite_and_scales_to_zero():
    box = parse_box('"bbox_2d": [1e400, 0, 500, 500]')
    assert math.isinf(box[0])
    assert scale_box(box, 100, 100)[0] == 0.0


def test_scale_box_rounding_is_half_to_even():
    # 500 * 3 / 1000 = 1.5 -> 2 (even); 500 * 5 / 1000 = 2.5 -> 2 (even)
    assert scale_box([500, 500, 1000, 1000], 3, 5)[:2] == [2.0, 2.0]


def test_scale_box_clamps_to_grid_and_image():
    assert scale_box([-50, 2000, 1000, 1000], 640, 480) == [0.0, 479.0, 639.0, 479.0 + 0.0]


def test_scale_box_degenerate_boxes_get_one_pixel():
    assert scale_box([500, 500, 500, 500], 640, 480) == [320.0, 240.0, 321.0, 241.0]
    # at the far edge there is no room: it stays degenerate
    assert scale_box([1000, 1000, 1000, 1000], 640, 480) == [639.0, 479.0, 639.0, 479.0]
    # a one-pixel-wide image never expands
    assert scale_box([0, 0, 0, 0], 1, 1) == [0.0, 0.0, 0.0, 0.0]


def test_scale_box_does_not_reorder():
    assert scale_box([800, 800, 200, 200], 1000, 1000) == [800.0, 800.0, 200.0, 200.0]


def test_scale_box_without_grid_clamp_is_the_reward_variant():
    # 1200 on the grid is past the image either way, but -10 differs only by rounding
    assert scale_box([-10, 0, 1200, 10], 1000, 1000, clamp_grid=False) == [0.0, 0.0, 999.0, 10.0]


def test_to_grid_and_sft_target_round_trip():
    grid = to_grid([32, 24, 64, 48], 96, 96)
    assert grid == [333, 250, 667, 500]
    target = format_sft_target("The red circle is on the left.", grid, "the red circle")
    assert target.startswith("The red circle is on the left.\n</think>\n\n```json\n[\n\t{")
    assert target.endswith('"label": "the red circle"}\n]\n```')
    assert parse_box(target) == [float(v) for v in grid]
