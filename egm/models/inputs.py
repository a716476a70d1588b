"""Qwen3-VL model inputs built the way `Qwen3VLProcessor` builds them, without torchvision.

`AutoProcessor` for Qwen3-VL also constructs the video processor, which imports torchvision; the
CPU environment has none. The steps below are the processor's own for an image+text request:
chat template, image preprocessing, one `<|image_pad|>` per merged visual token, tokenisation,
and the multimodal token-type ids the model needs for its 3D rotary positions.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"


def load_processor_parts(model_dir: str | Path, backend: str | None = None):
    """(tokenizer, image processor) of any Qwen3-VL model directory, the tiny one or a real one.

    `backend=None` picks what `AutoProcessor` would pick here: the torchvision image processor
    where torchvision is importable, else the PIL one. Their resizes differ slightly, so pass
    "pil" to get the same pixels in every environment.
    """
    from transformers import AutoImageProcessor, AutoTokenizer

    model_dir = str(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if backend is None:
        from transformers.utils import is_torchvision_available

        backend = "torchvision" if is_torchvision_available() else "pil"
    image_processor = AutoImageProcessor.from_pretrained(model_dir, backend=backend)
    return tokenizer, image_processor


def load_rgb_images(paths: list[str]) -> list:
    """The images at `paths`, decoded and converted to RGB, in threads: PIL releases the GIL
    while it decodes, so a batch of JPEGs takes about one image's time per core instead of the
    sum (64 images of 640x480: about 5 ms each on the GPU machine's host)."""
    from PIL import Image

    def load(path: str):
        with Image.open(path) as img:
            img.load()  # decoded now; closing the file leaves the pixels
            return img if img.mode == "RGB" else img.convert("RGB")  # convert copies even an RGB image

    if len(paths) <= 1:
        return [load(p) for p in paths]
    return list(_image_pool().map(load, paths))


@functools.cache
def _image_pool():
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1), thread_name_prefix="egm-images")


def chat_messages(prompt: str) -> list[dict]:
    """The paper's request: one user turn, image first, then the text, no system prompt."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]


def render_prompt(tokenizer, prompt: str) -> str:
    """The templated text of one request, up to and including the generation prompt."""
    return tokenizer.apply_chat_template(chat_messages(prompt), tokenize=False, add_generation_prompt=True)


def expand_image_ids(ids: list[int], image_id: int, counts: list[int]) -> list[int]:
    """Replace the k-th `image_id` in `ids` by counts[k] copies of it (one per merged patch of
    image k). The same ids as tokenising the expanded text: the placeholder is an added token,
    which the tokenizer splits out before anything else, so one or 300 of them in a row tokenise
    each to its id; a prompt's ~30 other tokens are then all the tokenizer has to do."""
    positions = [i for i, t in enumerate(ids) if t == image_id]
    if len(positions) != len(counts):
        raise ValueError(f"text has {len(positions)} image placeholders but {len(counts)} images were given")
    out, start = [], 0
    for position, count in zip(positions, counts):
        out += ids[start:position] + [image_id] * count
        start = position + 1
    return out + ids[start:]


def _feedable(prefix: str) -> str:
    """An assistant prefix without image/video placeholders: fed back, each would claim an
    image's visual slot (a random-weight model can emit them; a trained one does not)."""
    return prefix.replace(IMAGE_TOKEN, "").replace(VIDEO_TOKEN, "")


def token_id(tokenizer, token: str) -> int | None:
    """The id of `token` in the vocabulary, None if it has none. convert_tokens_to_ids alone maps a
    missing token to unk (Qwen's unk is <|endoftext|>, the pad token, which would then be marked as
    video), so the id must map back to the token; get_vocab() would build a dict of the whole
    vocabulary (151k entries for Qwen) on every batch."""
    i = tokenizer.convert_tokens_to_ids(token)
    return int(i) if i is not None and tokenizer.convert_ids_to_tokens(int(i)) == token else None


def build_inputs(images, prompts: list[str], tokenizer, image_processor, prefixes: list[str] | None = None,
                 image_device: str | None = None) -> dict:
    """Left-padded batch for `generate`: one image and one prompt per row.

    `prefixes` (optional, one per row) is text the assistant turn already holds, appended after
    the generation prompt, so generation continues it (egm.infer.budget). `image_device` (the
    torchvision processor only) resizes and normalises the images there, pixel_values staying on it.
    Returns input_ids, attention_mask, mm_token_type_ids (1 at image tokens, else 0),
    pixel_values and image_grid_thw as torch tensors.
    """
    import torch

    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    kwargs = {"device": image_device} if image_device else {}
    if all(getattr(image, "mode", None) == "RGB" for image in images):
        kwargs["do_convert_rgb"] = False  # its conversion of an RGB image is a copy of it
    vision = image_processor(images=list(images), return_tensors="pt", **kwargs)
    grids = vision["image_grid_thw"].cpu()
    merge = int(image_processor.merge_size)
    prefixes = [_feedable(p) for p in prefixes] if prefixes else [""] * len(prompts)
    if len(prefixes) != len(prompts):
        raise ValueError(f"{len(prefixes)} assistant prefixes for {len(prompts)} prompts")
    image_id, video_id = token_id(tokenizer, IMAGE_TOKEN), token_id(tokenizer, VIDEO_TOKEN)
    if image_id is None:
        raise ValueError(f"tokenizer has no {IMAGE_TOKEN} token; not a Qwen3-VL tokenizer")
    texts = [render_prompt(tokenizer, prompt) + prefixes[i] for i, prompt in enumerate(prompts)]
    rows = [expand_image_ids(row, image_id, [int(grids[i].prod()) // merge**2])
            for i, row in enumerate(tokenizer(texts, return_attention_mask=False)["input_ids"])]
    # Left padding keeps every row's last prompt token at the end, where generation continues.
    if tokenizer.pad_token_id is None and len({len(r) for r in rows}) > 1:
        raise ValueError("the tokenizer has no pad token to pad prompts of different lengths with")
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    # transformers 5 refuses image_grid_thw without these: they drive Qwen3-VL's 3D positions.
    mm_types = torch.zeros_like(input_ids)
    mm_types[input_ids == image_id] = 1
    if video_id is not None:
        mm_types[input_ids == video_id] = 2

    n_image_tokens = int((mm_types == 1).sum())
    expected = int(grids.prod(dim=-1).sum()) // merge**2
    if n_image_tokens != expected:
        # A tokenizer without the image token as one id would silently misalign the features.
        raise ValueError(f"{n_image_tokens} image tokens after tokenisation, expected {expected}")
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "mm_token_type_ids": mm_types,
        "pixel_values": vision["pixel_values"],
        "image_grid_thw": grids,
    }
