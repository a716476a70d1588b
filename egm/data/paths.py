"""Where the data set's files are: the training files' names in its repo (SFT_DATA, RL_DATA), and
the image paths written in its files mapped onto where the images live here.

The eval JSONL and the RL parquet carry the authors' absolute or repo-relative paths
("/data/coco/train2014/...", "data/coco_flip/train2014/..."). The authors relocate them with a
helper that keeps the part from the dataset folder name on; this reproduces its rules exactly,
because a different rule would silently point some records at the wrong (or no) image.
`egm.data.parquet` has a vectorised twin that must stay identical to this function.
"""

from __future__ import annotations

import os

# The SFT JSONL files of the data set repo, by `data`: raw (the full set) or cot_subset (1k rows).
SFT_DATA = "vanilla_grounding_reasoning_training_dataset_{data}.jsonl"
# The RL parquet files of the data set repo, by `part`: train or val.
RL_DATA = "processed_rl_data/{part}_grounding.parquet"

FLIP_MARKER = "coco_flip"
MARKER = "coco"


def relocate_image_path(path: str, image_root: str) -> str:
    """`image_root` joined with the suffix of `path` from its last "coco_flip", else from its
    last "coco" (case-sensitive: "COCO_train2014_..." file names do not count), else with the
    base name of `path`.

    "coco_flip" is looked for first because "coco" also occurs inside it: without that, the
    last "coco" of "x/coco_flip/train2014/a.jpg" would still be the right one, but the last
    "coco" of "x/coco_flip/coco_a.jpg" would drop the "coco_flip/" folder.
    """
    index = path.rfind(FLIP_MARKER)
    if index < 0:
        index = path.rfind(MARKER)
    relative = path[index:] if index >= 0 else os.path.basename(path)
    return os.path.join(image_root, relative)
