import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from egm.data.parquet import MissingImagesError, ParquetSchemaError, rewrite_image_paths
from egm.data.paths import relocate_image_path

TRICKY = [
    "data/coco_flip/train2014/x.jpg",
    "/data/coco/train2014/COCO_train2014_000000000001.jpg",
    "foo/bar.jpg",
    "bar.jpg",
    "",
    "dir/",
    "x/COCO/y.jpg",
    "a/coco_flip/b/coco/c.jpg",
    "a/coco/b/coco_flip_x/c.jpg",
    "x/coco_flip/coco_a.jpg",
    "coco_flipcoco/x.jpg",
    "coco/x/coco_flip",
    "x/cocoa/y.jpg",
    "coco",
    "a.b/(coco)+/x[1].jpg",
    "a\nb/coco/x.jpg",
    "line\nbreak/only.jpg",
    "é/coco/ünï.jpg",
    "C:\\data\\coco\\x.jpg",
    "/abs/no/marker/file.png",
]


@pytest.mark.parametrize(
    "path, expected",
    [
        ("data/coco_flip/train2014/x.jpg", "root/coco_flip/train2014/x.jpg"),
        ("/data/coco/train2014/COCO_train2014_1.jpg", "root/coco/train2014/COCO_train2014_1.jpg"),
        ("foo/bar.jpg", "root/bar.jpg"),
        ("x/COCO/y.jpg", "root/y.jpg"),
        ("a/coco_flip/b/coco/c.jpg", "root/coco_flip/b/coco/c.jpg"),
        ("a/coco/b/coco/c.jpg", "root/coco/c.jpg"),
        ("x/coco_flip/coco_a.jpg", "root/coco_flip/coco_a.jpg"),
    ],
)
def test_relocate_semantics(path, expected):
    assert relocate_image_path(path, "root") == expected
    assert relocate_image_path(path, "root/") == expected


def test_relocate_root_forms():
    assert relocate_image_path("foo/bar.jpg", "") == "bar.jpg"
    assert relocate_image_path("d/coco/x.jpg", "/mnt/img") == "/mnt/img/coco/x.jpg"


def _table(images, n_extra=True):
    rows = len(images)
    cols = {
        "data_source": pa.array([f"src{i}" for i in range(rows)]),
        "images": pa.array(images, type=pa.list_(pa.string())),
        "reward_model": pa.array([{"style": "rule", "ground_truth": f"[{i}]"} for i in range(rows)]),
        "extra_info": pa.array([{"index": i, "split": "train"} for i in range(rows)]),
    }
    schema = pa.schema([pa.field(k, v.type) for k, v in cols.items()], metadata={b"origin": b"test"})
    return pa.table(cols, schema=schema)


@pytest.mark.parametrize("root", ["root", "/abs/root/", ""])
def test_vectorised_equals_scalar(tmp_path, root):
    images = [[p] for p in TRICKY] + [TRICKY[:3], [], None, [TRICKY[5], TRICKY[7], TRICKY[0]]]
    src, dst = tmp_path / "src.parquet", tmp_path / "dst.parquet"
    table = _table(images)
    # Several row groups, so the rewrite meets several chunks.
    pq.write_table(table, src, row_group_size=5)
    stats = rewrite_image_paths(src, dst, root, check_exists=False)
    out = pq.read_table(dst)
    expected = [None if row is None else [relocate_image_path(p, root) for p in row] for row in images]
    assert out.column("images").to_pylist() == expected
    assert out.schema == table.schema and out.schema.metadata == table.schema.metadata
    for name in ("data_source", "reward_model", "extra_info"):
        assert out.column(name).to_pylist() == table.column(name).to_pylist()
    assert stats["rows"] == len(images)
    assert stats["images"] == sum(len(r) for r in images if r)
    assert stats["missing"] == stats["images"]


def test_large_and_sliced_lists(tmp_path):
    values = pa.array(["skip/coco/a.jpg", "d/coco_flip/b.jpg", "q/c.jpg", "d/coco/e.jpg"])
    sliced = pa.ListArray.from_arrays(pa.array([0, 1, 3, 4], type=pa.int32()), values).slice(1)
    large = pa.array([["d/coco/z.jpg"], ["x/y.jpg"], None], type=pa.large_list(pa.large_string()))
    from egm.data.parquet import _rewrite_chunk

    assert _rewrite_chunk(sliced, "r").to_pylist() == [["r/coco_flip/b.jpg", "r/c.jpg"], ["r/coco/e.jpg"]]
    assert _rewrite_chunk(large, "r").to_pylist() == [["r/coco/z.jpg"], ["r/y.jpg"], None]
    assert _rewrite_chunk(large, "r").type == large.type


def test_existing_images_pass_and_missing_are_named(tmp_path):
    root = tmp_path / "images"
    for rel in ("coco_flip/train2014/a.jpg", "coco/train2014/b.jpg"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"jpg")
    images = [["data/coco_flip/train2014/a.jpg"], ["/data/coco/train2014/b.jpg", "data/coco_flip/train2014/a.jpg"]]
    src, dst = tmp_path / "train_grounding.parquet", tmp_path / "out/train.parquet"
    pq.write_table(_table(images), src)
    stats = rewrite_image_paths(src, dst, str(root))
    assert stats == {"rows": 2, "images": 3, "missing": 0, "first_missing": []}
    assert pq.read_table(dst).column("images").to_pylist()[1][0] == f"{root}/coco/train2014/b.jpg"

    images.append(["x/coco/train2014/gone.jpg"])
    pq.write_table(_table(images), src)
    dst2 = tmp_path / "out/train2.parquet"
    with pytest.raises(MissingImagesError, match=r"train_grounding\.parquet") as err:
        rewrite_image_paths(src, dst2, str(root))
    assert "row 2" in str(err.value) and "gone.jpg" in str(err.value)
    assert not dst2.exists()
    stats = rewrite_image_paths(src, dst2, str(root), check_exists=False)
    assert stats["missing"] == 1 and stats["first_missing"] == [f"{root}/coco/train2014/gone.jpg"]


def test_wrong_schema_is_named(tmp_path):
    src = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"images": ["data/coco/a.jpg"]}), src)
    with pytest.raises(ParquetSchemaError, match=r"bad\.parquet.*list<string>"):
        rewrite_image_paths(src, tmp_path / "o.parquet", "r", check_exists=False)
    pq.write_table(pa.table({"image": [["data/coco/a.jpg"]]}), src)
    with pytest.raises(ParquetSchemaError, match=r"bad\.parquet.*no 'images' column"):
        rewrite_image_paths(src, tmp_path / "o.parquet", "r", check_exists=False)
    pq.write_table(pa.table({"images": pa.array([[1, 2]], type=pa.list_(pa.int64()))}), src)
    with pytest.raises(ParquetSchemaError, match=r"bad\.parquet"):
        rewrite_image_paths(src, tmp_path / "o.parquet", "r", check_exists=False)
    assert not (tmp_path / "o.parquet").exists()
