"""Qwen3-VL model inputs built the way `Qwen3VLProcessor` builds them, without torchvision.

`AutoProcessor` for Qwen3-VL also constructs the video processor, which imports torchvision; the
CPU environment has none. The steps below are the processor's own for an image+text request:
chat template, image preprocessing, one `<|image_pad|>` per merged visual token, tokenisation,
and the multimodal token-type ids the model needs for its 3D rotary positions.
"""

from __future__ import annotations

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


def chat_messages(prompt: str) -> list[dict]:
    """The paper's request: one user turn, image first, then the text, no system prompt."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]


def render_prompt(tokenizer, prompt: str) -> str:
    """The templated text of one request, up to and including the generation prompt."""
    return tokenizer.apply_chat_template(chat_messages(prompt), tokenize=False, add_generation_prompt=True)


def expand_image_tokens(text: str, grid_thw, merge_size: int, image_token: str = IMAGE_TOKEN) -> str:
    """Replace each image placeholder by one token per merged patch of its image, in order."""
    pieces = text.split(image_token)
    if len(pieces) - 1 != len(grid_thw):
        raise ValueError(f"text has {len(pieces) - 1} image placeholders but {len(grid_thw)} images were given")
    out = [pieces[0]]
    for grid, rest in zip(grid_thw, pieces[1:]):
        t, h, w = (int(v) for v in grid)
        out.append(image_token * (t * h * w // merge_size**2))
        out.append(rest)
    return "".join(out)


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
    vision = image_processor(images=list(images), return_tensors="pt", **kwargs)
    grids = vision["image_grid_thw"].cpu()
    merge = int(image_processor.merge_size)
    prefixes = [_feedable(p) for p in prefixes] if prefixes else [""] * len(prompts)
    if len(prefixes) != len(prompts):
        raise ValueError(f"{len(prefixes)} assistant prefixes for {len(prompts)} prompts")
    texts = [
        expand_image_tokens(render_prompt(tokenizer, prompt), grids[i : i + 1], merge) + prefixes[i]
        for i, prompt in enumerate(prompts)
    ]
    # Left padding keeps every row's last prompt token at the end, where generation continues.
    text = tokenizer(texts, padding=True, padding_side="left", return_tensors="pt", return_token_type_ids=False)
    image_id, video_id = token_id(tokenizer, IMAGE_TOKEN), token_id(tokenizer, VIDEO_TOKEN)
    if image_id is None:
        raise ValueError(f"tokenizer has no {IMAGE_TOKEN} token; not a Qwen3-VL tokenizer")
    input_ids = text["input_ids"]
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
        "attention_mask": text["attention_mask"],
        "mm_token_type_ids": mm_types,
        "pixel_values": vision["pixel_values"],
        "image_grid_thw": grids,
    }
