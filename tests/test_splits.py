import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from egm.data.splits import EVAL_SPLITS, BadRecord, EvalRecord, SplitError, load_split


@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "images"
    (root / "coco/train2014").mkdir(parents=True)
    Image.new("RGB", (64, 48), "red").save(root / "coco/train2014/COCO_train2014_000000000001.jpg")
    Image.new("RGB", (32, 32), "blue").save(root / "coco/train2014/COCO_train2014_000000000002.jpg")
    return str(root)


IMG1 = "/data/coco/train2014/COCO_train2014_000000000001.jpg"
IMG2 = "/data/coco/train2014/COCO_train2014_000000000002.jpg"


def rec(**over):
    base = {"image": IMG1, "sent": "the red thing", "bbox": [1, 2, 30, 40], "width": 64, "height": 48}
    base.update(over)
    return json.dumps(base)


def write(tmp_path, lines, name="refcoco_val.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_good_split_loads(tmp_path, image_root):
    path = write(tmp_path, [
        rec(id=7),
        rec(image=IMG2, width=32.0, height=32, bbox=[0, 0, 31.5, 32], sent="blue"),
        "",
        rec(id="x-1", sent="again"),
    ])
    split = load_split(path, image_root)
    assert split.bad == [] and split.path == path
    assert [r.id for r in split.records] == ["7", "2", "x-1"]
    assert [r.line for r in split.records] == [1, 2, 4]
    first = split.records[0]
    assert isinstance(first, EvalRecord)
    assert first.image == IMG1
    assert first.image_path == f"{image_root}/coco/train2014/COCO_train2014_000000000001.jpg"
    assert first.bbox == [1.0, 2.0, 30.0, 40.0] and all(isinstance(v, float) for v in first.bbox)
    assert split.records[1].width == 32 and isinstance(split.records[1].width, int)


BAD_LINES = [
    ('{"image": "x", "sent": ', "malformed JSON"),
    ('[1, 2, 3]', "JSON object"),
    (json.dumps({"image": IMG1, "sent": "s", "width": 64, "height": 48}), "bbox"),
    (rec(sent=5), "sent"),
    (rec(sent="   "), "sent"),
    (rec(image=None), "image"),
    (rec(bbox=[1, 2, 3]), "bbox"),
    (rec(bbox=[1, 2, "3", 4]), "bbox"),
    (rec(bbox=[1, 2, True, 4]), "bbox"),
    (rec(bbox=[30, 2, 1, 40]), "x2"),
    (rec(bbox=[1, 40, 30, 2]), "y2"),
    (rec(bbox=[1, 2, 1, 40]), "x2"),
    (rec(bbox=[1, 2, float("nan"), 40]), "non-finite"),
    (rec(bbox=[1, 2, float("inf"), 40]), "non-finite"),
    (rec(width=0), "width"),
    (rec(width=64.5), "width"),
    (rec(height="48"), "height"),
    (rec(height=True), "height"),
    (rec(image="/data/coco/train2014/nope.jpg"), "not found"),
    (rec(width=65), "64x48"),
    (rec(image="/data/coco/train2014/COCO_train2014_000000000002.jpg"), "32x32"),
]


@pytest.mark.parametrize("line, why", BAD_LINES)
def test_each_bad_kind_is_reported(tmp_path, image_root, line, why):
    path = write(tmp_path, [rec(id="good"), line, rec(id="good2")])
    split = load_split(path, image_root)
    assert [r.id for r in split.records] == ["good", "good2"]
    assert len(split.bad) == 1
    bad = split.bad[0]
    assert isinstance(bad, BadRecord) and bad.line == 2
    assert why in bad.reason, bad.reason
    assert str(bad).startswith("line 2: ")


def test_all_bad_kinds_together_and_duplicates(tmp_path, image_root):
    lines = [rec(id="a")] + [line for line, _ in BAD_LINES] + [rec(id="a"), rec(), rec(id=1)]
    path = write(tmp_path, lines)
    with path.open("ab") as handle:
        handle.write(b'{"image": "\xff\xfe"}\n')
    split = load_split(path, image_root)
    n = len(BAD_LINES)
    # Line n+2 repeats id "a", a record like any other (ids may repeat; records are keyed by line);
    # line n+3 falls back to its line number; a numeric id is str()-ed.
    assert [r.id for r in split.records] == ["a", "a", str(n + 3), "1"]
    assert [r.line for r in split.records] == [1, n + 2, n + 3, n + 4]
    assert [b.line for b in split.bad] == list(range(2, n + 2)) + [n + 5]
    assert "UTF-8" in split.bad[-1].reason
    summary = split.summary()
    assert summary["records"] == 4 and summary["bad"] == n + 1


def test_no_image_check_skips_filesystem(tmp_path):
    path = write(tmp_path, [rec(image="/elsewhere/coco/a.jpg", width=999)])
    split = load_split(path, "/not/here", check_images=False)
    assert split.records[0].image_path == "/not/here/coco/a.jpg"


def test_empty_or_all_bad_split_raises(tmp_path, image_root):
    with pytest.raises(SplitError, match=r"refcoco_val\.jsonl"):
        load_split(write(tmp_path, [""]), image_root)
    with pytest.raises(SplitError, match=r"refcoco_testA\.jsonl.*2 bad"):
        load_split(write(tmp_path, ["{", rec(width=1)], name="refcoco_testA.jsonl"), image_root)
    with pytest.raises(SplitError, match=r"missing\.jsonl"):
        load_split(tmp_path / "missing.jsonl", image_root)


def test_limit_keeps_first_valid_records(tmp_path, image_root):
    path = write(tmp_path, ["{", rec(id=1), rec(width=3), rec(id=2), rec(id=3), "{"])
    split = load_split(path, image_root, limit=2)
    assert [r.id for r in split.records] == ["1", "2"]
    assert [b.line for b in split.bad] == [1, 3]
    with pytest.raises(ValueError):
        load_split(path, image_root, limit=0)


def test_the_schema_and_configs_name_the_package_splits():
    """One list of eval splits: the schema's enum is it, in its order; every config picks from it."""
    repo = Path(__file__).resolve().parent.parent
    schema = yaml.safe_load((repo / "workflow/schemas/config.schema.yaml").read_text())
    assert schema["properties"]["splits"]["items"]["enum"] == list(EVAL_SPLITS)
    # A config that leaves `splits` out gets all eight: the shipped full configs do.
    assert schema["properties"]["splits"]["default"] == list(EVAL_SPLITS)
    assert schema["properties"]["latency"]["properties"]["split"]["enum"] == list(EVAL_SPLITS)
    for config in sorted((repo / "config").glob("*.yaml")):
        splits = yaml.safe_load(config.read_text()).get("splits")
        assert splits is None or set(splits) <= set(EVAL_SPLITS), config.name
