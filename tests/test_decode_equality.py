"""benchmarks/decode_equality.py: the record-by-record comparison, and a CPU run of the script on
the embedded tiny model (float32: the fast decode must give generate's answers exactly)."""

import json

from PIL import Image, ImageDraw

from benchmarks import decode_equality
from egm.infer.base import Completion, Request


def test_a_record_differs_on_text_or_token_count():
    labelled = [("s", Request(str(i), "img.png", "p")) for i in range(3)]
    reference = [Completion("[1, 2, 3, 4]", 9, 0.1), Completion("same", 2, 0.1), Completion("abc", 3, 0.1)]
    fast = [Completion("[1, 2, 5, 4]", 9, 0.1), Completion("same", 2, 0.1), Completion("abc", 4, 0.1)]
    out = decode_equality.compare(labelled, reference, fast)
    assert (out["records"], out["equal"], out["differing"]) == (3, 1, 2)
    assert [d["id"] for d in out["differences"]] == ["0", "2"]
    assert out["differences"][0]["first_difference_at_char"] == 7
    # Equal text, one token more: the texts agree to their end.
    assert out["differences"][1]["first_difference_at_char"] == 3


def test_script_on_the_tiny_model_in_float32(tiny_dir, tmp_path):
    images = tmp_path / "images" / "coco" / "train2014"
    images.mkdir(parents=True)
    rows = []
    for i, (colour, sent) in enumerate([("red", "the red circle"), ("blue", "the blue circle left of it"),
                                        ("green", "x")]):
        img = Image.new("RGB", (96 + 32 * i, 96), "white")
        ImageDraw.Draw(img).ellipse((10, 20, 60, 70), fill=colour)
        name = f"COCO_train2014_{i:012d}.jpg"
        img.save(images / name)
        rows.append({"id": i, "image": f"/data/coco/train2014/{name}", "sent": sent, "bbox": [10.0, 20.0, 60.0, 70.0],
                     "width": img.width, "height": img.height})
    split = tmp_path / "refcoco_val.jsonl"
    split.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "equality.json"
    decode_equality.main(["--model-dir", str(tiny_dir), "--splits", str(split), "--image-root",
                          str(tmp_path / "images"), "--out", str(out), "--dtypes", "float32,bfloat16",
                          "--max-tokens", "12", "--batch-size", "2", "--device", "cpu", "--own-spread"])
    result = json.loads(out.read_text())
    entry = result["dtypes"]["float32"]
    assert entry["records"] == 3 and entry["equal"] == 3 and entry["meets_requirement"]
    assert entry["tokens"] > 3 and result["device"].startswith("CPU") and "own_spread" not in entry
    # bf16 answers may differ (the exit status says whether 99 % held); the yardstick is counted.
    spread = result["dtypes"]["bfloat16"]["own_spread"]
    assert set(spread) == {"generate_vs_float32_generate", "graph_vs_float32_generate"}
    assert all(0 <= n <= 3 for n in spread.values())


def test_records_name_the_model_directory_without_a_machine_s_paths(tmp_path):
    inside = decode_equality.REPO / "resources" / "some-model"
    assert decode_equality.named_model_dir(str(inside)) == "resources/some-model"
    assert decode_equality.named_model_dir(str(tmp_path / "elsewhere" / "sft")) == "sft"
