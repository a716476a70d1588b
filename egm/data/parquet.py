"""Rewrite the image paths of the RL parquet files to this machine's image root.

The rewrite is done column-wise with pyarrow compute (regexes over the flattened list values,
the list array rebuilt on the same offsets), so it costs the same whatever the row count and
leaves every other column, the schema and its metadata as they were. The rules are those of
`egm.data.paths.relocate_image_path`; tests hold the two to the same outputs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from egm.data.paths import FLIP_MARKER, MARKER
from egm.io import atomic_write

IMAGES = "images"
_REPORTED = 5


class ParquetRewriteError(ValueError):
    """The parquet file cannot be rewritten as asked."""


class ParquetSchemaError(ParquetRewriteError):
    """The `images` column is absent or not a list of strings."""


class MissingImagesError(ParquetRewriteError, FileNotFoundError):
    """Some rewritten image paths do not exist (nothing is written then)."""


def _relocate_values(values: pa.Array, image_root: str) -> pa.Array:
    """Vectorised relocate_image_path over a string array (nulls stay null)."""
    # `(?s)` lets `.` cross newlines like str.rfind does; the greedy `^.*` makes the
    # replacement start at the LAST occurrence of the marker.
    from_flip = pc.replace_substring_regex(values, pattern=f"(?s)^.*{FLIP_MARKER}", replacement=FLIP_MARKER,
                                           max_replacements=1)
    from_coco = pc.replace_substring_regex(values, pattern=f"(?s)^.*{MARKER}", replacement=MARKER,
                                           max_replacements=1)
    basename = pc.replace_substring_regex(values, pattern="(?s)^.*/", replacement="", max_replacements=1)
    relative = pc.if_else(
        pc.match_substring(values, FLIP_MARKER),
        from_flip,
        pc.if_else(pc.match_substring(values, MARKER), from_coco, basename),
    )
    # The relative part never starts with "/", so os.path.join(root, rel) is this prefix + rel.
    prefix = pa.scalar(os.path.join(image_root, ""), type=values.type)
    return pc.binary_join_element_wise(prefix, relative, pa.scalar("", type=values.type))


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _check_schema(src: Path, schema: pa.Schema) -> int:
    index = schema.get_field_index(IMAGES)
    if index < 0:
        raise ParquetSchemaError(f"{src}: no {IMAGES!r} column (columns: {', '.join(schema.names)})")
    t = schema.field(index).type
    if not ((pa.types.is_list(t) or pa.types.is_large_list(t)) and _is_string(t.value_type)):
        raise ParquetSchemaError(f"{src}: column {IMAGES!r} is {t}, expected list<string>")
    return index


def _rewrite_chunk(chunk: pa.Array, image_root: str) -> pa.Array:
    # `.values` is the whole child array and `.offsets` the chunk's (not rebased) offsets into
    # it, so rebuilding from these two keeps a sliced chunk consistent.
    new_values = _relocate_values(chunk.values, image_root)
    cls = pa.LargeListArray if pa.types.is_large_list(chunk.type) else pa.ListArray
    mask = chunk.is_null() if chunk.null_count else None
    return cls.from_arrays(chunk.offsets, new_values, type=chunk.type, mask=mask)


def _missing_images(column: pa.ChunkedArray) -> tuple[int, list[tuple[int, str]]]:
    """(number of image references whose file is absent, the first few as (row, path))."""
    flat = pc.list_flatten(column)
    unique = [p for p in pc.unique(flat).to_pylist() if p is not None]
    absent = [p for p in unique if not os.path.isfile(p)]
    if not absent:
        return 0, []
    is_absent = pc.is_in(flat, value_set=pa.array(absent, type=flat.type))
    count = pc.sum(is_absent).as_py() or 0
    first: list[tuple[int, str]] = []
    row_base = 0
    for chunk in column.chunks:
        if len(first) >= _REPORTED:
            break
        values = pc.list_flatten(chunk)
        hits = pc.is_in(values, value_set=pa.array(absent, type=values.type))
        positions = pc.indices_nonzero(hits).to_pylist()[: _REPORTED - len(first)]
        if positions:
            parents = pc.list_parent_indices(chunk)
            for pos in positions:
                first.append((row_base + parents[pos].as_py(), values[pos].as_py()))
        row_base += len(chunk)
    return count, first


def rewrite_image_paths(src: Path, dst: Path, image_root: str, check_exists: bool = True) -> dict:
    """Write `src` to `dst` with every `images` path relocated under `image_root`.

    Returns `{"rows", "images", "missing", "first_missing"}`: `images` counts image references
    (non-null list items), `missing` those whose file does not exist (always counted), and
    `first_missing` the first few missing paths. With `check_exists`, any missing image raises
    MissingImagesError naming the file, rows and paths, and `dst` is not written.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ParquetRewriteError(f"{src}: parquet file not found")
    table = pq.read_table(src)
    index = _check_schema(src, table.schema)
    field = table.schema.field(index)
    column = table.column(index)
    rewritten = pa.chunked_array([_rewrite_chunk(chunk, image_root) for chunk in column.chunks], type=field.type)
    out = table.set_column(index, field, rewritten)

    n_images = int(pc.count(pc.list_flatten(rewritten)).as_py()) if len(rewritten) else 0
    missing, first = _missing_images(rewritten) if len(rewritten) else (0, [])
    stats = {"rows": out.num_rows, "images": n_images, "missing": missing, "first_missing": [p for _, p in first]}
    if check_exists and missing:
        shown = "; ".join(f"row {row}: {path}" for row, path in first)
        raise MissingImagesError(
            f"{src}: {missing} of {n_images} image references do not exist under {image_root!r} "
            f"(first: {shown})"
        )

    with atomic_write(dst, "wb") as handle:
        pq.write_table(out, handle)
    return stats
