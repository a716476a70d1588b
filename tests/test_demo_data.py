"""The synthetic demo dataset must look, file for file, like the hub's EGM_Datasets."""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageChops, ImageStat

from egm.data import demo
from egm.grounding import PROMPTS, SFT_PROMPT, parse_box, to_grid

W = H = 96
SPLITS = list(demo.EVAL_SPLITS)
NAME = re.compile(r"COCO_train2014_(\d{12})\.jpg")


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = tmp_path_factory.mktemp("demo")
    summary = demo.write_demo_dataset(base / "a", seed=0)
    return base, base / "a", summary


@pytest.fixture(scope="module")
def coco(built):
    _, root, summary = built
    blob = b"".join((root / p).read_bytes() for p in summary["parts"])
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        files = {m.name: tar.extractfile(m).read() for m in members.values() if m.isfile()}
    return members, files


@pytest.fixture(scope="module")
def flips(built):
    _, root, _ = built
    with tarfile.open(root / "coco_flip.tar") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


@pytest.fixture(scope="module")
def evals(built):
    _, root, _ = built
    return {
        s: [json.loads(line) for line in (root / "metadata" / "eval" / f"{s}.jsonl").read_text().splitlines()]
        for s in SPLITS
    }


@pytest.fixture(scope="module")
def train_rows(built):
    return pq.read_table(built[1] / "processed_rl_data" / "train_grounding.parquet").to_pylist()


@pytest.fixture(scope="module")
def val_rows(built):
    return pq.read_table(built[1] / "processed_rl_data" / "val_grounding.parquet").to_pylist()


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG"
    return image.convert("RGB")


def test_deterministic_and_seed_sensitive(built):
    base, root, summary = built
    again = demo.write_demo_dataset(base / "b", seed=0)
    demo.write_demo_dataset(base / "c", seed=1)
    assert again == summary
    assert tree_hashes(base / "b") == tree_hashes(root)
    hashes_a, hashes_c = tree_hashes(root), tree_hashes(base / "c")
    for name in ("coco.tar.part_aa", "coco_flip.tar", "processed_rl_data/train_grounding.parquet",
                 "metadata/eval/refcoco_val.jsonl", "README.md"):
        assert hashes_a[name] != hashes_c[name], name
    # Only the finished trees are visible beside them: no temp dirs left behind.
    assert sorted(p.name for p in base.iterdir()) == ["a", "b", "c"]


def test_rewrite_replaces_existing_tree(tmp_path):
    out = tmp_path / "ds"
    demo.write_demo_dataset(out, seed=3, n_train_images=2, n_eval_per_split=1, part_bytes=1 << 20)
    (out / "stale.txt").write_text("old")
    summary = demo.write_demo_dataset(out, seed=3, n_train_images=2, n_eval_per_split=1, part_bytes=1 << 20)
    assert not (out / "stale.txt").exists()
    assert summary["parts"] == ["coco.tar.part_aa"]
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_layout_and_readme(built):
    _, root, summary = built
    expected = {
        *summary["parts"],
        "coco_flip.tar",
        "README.md",
        "processed_rl_data/train_grounding.parquet",
        "processed_rl_data/val_grounding.parquet",
        "vanilla_grounding_reasoning_training_dataset_raw.jsonl",
        "vanilla_grounding_reasoning_training_dataset_cot_subset.jsonl",
        *(f"metadata/eval/{s}.jsonl" for s in SPLITS),
    }
    assert set(tree_hashes(root)) == expected
    readme = (root / "README.md").read_text()
    assert "synthetic" in readme and "egm.data.demo" in readme and "seed 0" in readme


def test_parts_form_one_tar(built, coco):
    _, root, summary = built
    parts = summary["parts"]
    assert len(parts) >= 3
    assert parts == demo.part_names(len(parts)) and parts[:3] == [
        "coco.tar.part_aa", "coco.tar.part_ab", "coco.tar.part_ac"]
    sizes = [(root / p).stat().st_size for p in parts]
    assert all(s == demo.DEFAULT_PART_BYTES for s in sizes[:-1]) and 0 < sizes[-1] <= demo.DEFAULT_PART_BYTES
    members, files = coco
    for m in members.values():
        assert m.mtime == 0 and m.uid == 0 and m.gid == 0
        assert m.isdir() or re.fullmatch(r"coco/train2014/COCO_train2014_\d{12}\.jpg", m.name), m.name
    assert len(files) == summary["n_train_images"] + summary["n_eval_images"]
    for data in list(files.values())[:5]:
        assert decode(data).size == (W, H)


def test_eval_records(evals, coco, train_rows):
    _, files = coco
    train_ids = {NAME.search(r["images"][0]).group(1) for r in train_rows}
    seen_ids = set()
    by_image = defaultdict(list)
    for split, records in evals.items():
        assert len(records) == 16, split
        for r in records:
            assert set(r) == {"id", "image", "sent", "bbox", "width", "height"}
            assert r["id"] not in seen_ids
            seen_ids.add(r["id"])
            assert r["image"].startswith("/data/coco/train2014/")
            member = r["image"][len("/data/"):]
            assert member in files
            assert decode(files[member]).size == (r["width"], r["height"])
            assert NAME.search(member).group(1) not in train_ids
            x1, y1, x2, y2 = r["bbox"]
            assert 0 <= x1 < x2 <= r["width"] and 0 <= y1 < y2 <= r["height"]
            by_image[r["image"]].append(r["sent"])
    for image, sents in by_image.items():
        assert len(sents) == len(set(sents)), image


def test_make_scene_targets():
    rng = random.Random(7)
    relations = Counter()
    for _ in range(300):
        image, targets = demo.make_scene(rng, 80, 64)
        assert image.size == (80, 64) and 1 <= len(targets) <= 3
        assert len({t.sent for t in targets}) == len(targets)
        background = image.getpixel((0, 0))
        union = Image.new("L", image.size, 0)
        for t in targets:
            x1, y1, x2, y2 = t.box
            assert 0 <= x1 < x2 <= 80 and 0 <= y1 < y2 <= 64
            assert t.sent.startswith(f"the {t.colour} {t.shape}")
            colour = demo.COLOURS[t.colour]
            # Tight: every edge row/column of the box holds a pixel of the shape's colour.
            crop = image.crop(t.box)
            px = crop.load()
            w, h = crop.size
            assert any(px[0, y] == colour for y in range(h)) and any(px[w - 1, y] == colour for y in range(h))
            assert any(px[x, 0] == colour for x in range(w)) and any(px[x, h - 1] == colour for x in range(w))
            union.paste(255, t.box)
            relations[t.relation] += 1
        # Nothing is drawn outside the targets' boxes.
        outside = Image.composite(Image.new("RGB", image.size, background), image, union)
        assert ImageChops.difference(outside, Image.new("RGB", image.size, background)).getbbox() is None
        for a in targets:
            for b in targets:
                if a is not b:
                    assert (a.box[2] <= b.box[0] or b.box[2] <= a.box[0]
                            or a.box[3] <= b.box[1] or b.box[3] <= a.box[1])
    assert relations[None] > 0 and sum(v for k, v in relations.items() if k) > 0


def test_make_scene_rejects_tiny():
    with pytest.raises(ValueError):
        demo.make_scene(random.Random(0), 16, 96)


def test_rl_train_parquet(built, train_rows, coco, flips):
    _, root, summary = built
    table = pq.read_table(root / "processed_rl_data" / "train_grounding.parquet")
    assert table.column_names == ["data_source", "prompt", "images", "ability", "reward_model", "extra_info"]
    assert len(train_rows) == summary["n_train_samples"]
    _, files = coco
    for i, row in enumerate(train_rows):
        assert row["data_source"] == "grounding" and row["ability"] == "grounding"
        sent = row["extra_info"]["question"]
        assert row["prompt"] == [{"role": "user", "content": f"<image>\nLocate {sent}, output its bbox coordinates using JSON format"}]
        assert row["prompt"][0]["content"] == "<image>\n" + PROMPTS["qwen3"].format(sent=sent)
        (path,) = row["images"]
        assert re.fullmatch(r"data/coco(_flip)?/train2014/COCO_train2014_\d{12}\.jpg", path)
        assert path[len("data/"):] in (flips if "coco_flip" in path else files)
        assert row["reward_model"]["style"] == "rule"
        gt = row["reward_model"]["ground_truth"]
        assert len(gt) == 4 and all(isinstance(v, int) and 0 <= v <= 1000 for v in gt)
        assert gt[0] < gt[2] and gt[1] < gt[3]
        assert row["extra_info"] == {"split": "train", "index": i, "id": row["extra_info"]["id"],
                                     "height": H, "width": W, "question": sent}
    assert len({r["extra_info"]["id"] for r in train_rows}) == len(train_rows)


def test_flipped_images_and_boxes(train_rows, coco, flips):
    _, files = coco
    groups = defaultdict(lambda: {"coco": [], "coco_flip": []})
    for row in train_rows:
        root, image_id = re.search(r"data/(coco|coco_flip)/.*_(\d{12})\.jpg", row["images"][0]).groups()
        groups[image_id][root].append(row)
    assert len(groups) == 64
    checked_pixels = 0
    for image_id, pair in groups.items():
        assert len(pair["coco"]) == len(pair["coco_flip"]) >= 1
        for orig, flip in zip(pair["coco"], pair["coco_flip"]):
            g, f = orig["reward_model"]["ground_truth"], flip["reward_model"]["ground_truth"]
            assert f == [1000 - g[2], g[1], 1000 - g[0], g[3]]
            swapped = orig["extra_info"]["question"].replace("left of", "\0").replace("right of", "left of").replace("\0", "right of")
            assert flip["extra_info"]["question"] == swapped
        if checked_pixels < 8:
            name = f"train2014/COCO_train2014_{image_id}.jpg"
            original = decode(files[f"coco/{name}"])
            flipped = decode(flips[f"coco_flip/{name}"])
            mirrored = original.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            # Each side went through JPEG on its own, so allow codec noise only.
            err = ImageStat.Stat(ImageChops.difference(mirrored, flipped)).mean
            assert max(err) < 1.0, (image_id, err)
            checked_pixels += 1


def test_sft_rows_match_rl(built, train_rows):
    _, root, summary = built
    raw = (root / "vanilla_grounding_reasoning_training_dataset_raw.jsonl").read_text().splitlines()
    cot = (root / "vanilla_grounding_reasoning_training_dataset_cot_subset.jsonl").read_text().splitlines()
    assert len(raw) == len(train_rows) == summary["n_sft"]
    assert cot == raw[: min(1000, len(raw))]
    for line, rl in zip(raw, train_rows):
        row = json.loads(line)
        assert set(row) == {"messages", "images"}
        user, assistant = row["messages"]
        sent = rl["extra_info"]["question"]
        assert user == {"role": "user", "content": "<image>\n" + SFT_PROMPT.format(sent=sent)}
        assert assistant["role"] == "assistant"
        text = assistant["content"]
        reasoning, answer = text.split("\n</think>\n\n```json\n")
        # One sentence on where the target is (egm.data.demo.reasoning); the JSON names the target.
        assert re.fullmatch(r"The [a-z]+ [a-z]+ is near the [a-z ]+\.", reasoning), reasoning
        assert f'"label": "{sent}"' in answer
        assert parse_box(text) == [float(v) for v in rl["reward_model"]["ground_truth"]]
        assert row["images"] == rl["images"]


def test_val_parquet(val_rows, evals):
    where = {r["id"]: (split, r) for split, records in evals.items() for r in records}
    per_split = Counter()
    assert demo.val_take(16) == 2 and demo.val_take(3) == 1
    for i, row in enumerate(val_rows):
        split, record = where[row["extra_info"]["id"]]
        per_split[split] += 1
        assert row["extra_info"] == {"split": "test", "index": i, "id": record["id"],
                                     "height": record["height"], "width": record["width"],
                                     "question": record["sent"]}
        assert row["images"] == [record["image"].lstrip("/")]
        assert row["reward_model"] == {"style": "rule",
                                       "ground_truth": to_grid(record["bbox"], record["width"], record["height"])}
        assert row["prompt"][0]["content"] == "<image>\n" + PROMPTS["qwen3"].format(sent=record["sent"])
    assert per_split == {s: demo.val_take(16) for s in SPLITS}
    # Not simply the eval files' order: the paper shuffles after concatenating.
    assert [where[r["extra_info"]["id"]][0] for r in val_rows] != sorted(
        (where[r["extra_info"]["id"]][0] for r in val_rows), key=SPLITS.index)


def test_custom_size_and_parts(tmp_path):
    summary = demo.write_demo_dataset(tmp_path / "x", seed=5, n_train_images=3, n_eval_per_split=4,
                                      width=128, height=72, part_bytes=10_000)
    root = tmp_path / "x"
    blob = b"".join((root / p).read_bytes() for p in summary["parts"])
    assert len(blob) == summary["tar_bytes"] and len(summary["parts"]) == -(-len(blob) // 10_000)
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        for m in tar.getmembers():
            if m.isfile():
                assert decode(tar.extractfile(m).read()).size == (128, 72)
    val = pq.read_table(root / "processed_rl_data" / "val_grounding.parquet").num_rows
    assert val == len(SPLITS) * demo.val_take(4)
