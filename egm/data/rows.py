"""The user turn of the data set's training rows (SFT JSONL, RL parquet), which both the RL
parquet's validation (egm.data.validation) and the training data (egm.train.data) read: one
`<image>` placeholder per image, at the start of the turn."""

from __future__ import annotations

IMAGE_PLACEHOLDER = "<image>"


class BadRow(ValueError):
    """A training row the trainers could not use as it is (the reason is the message)."""


def split_user_turn(content: str, n_images: int) -> str:
    """The user text without its leading image placeholders (one per image, `<image>\\n` each)."""
    if content.count(IMAGE_PLACEHOLDER) != n_images:
        raise BadRow(f"{content.count(IMAGE_PLACEHOLDER)} image placeholders for {n_images} images")
    text = content
    for _ in range(n_images):
        text = text.lstrip("\n")
        if not text.startswith(IMAGE_PLACEHOLDER):
            # The paper's requests put the image first; a placeholder inside the text would
            # need interleaving that this data never has.
            raise BadRow("image placeholder not at the start of the user turn")
        text = text[len(IMAGE_PLACEHOLDER):]
    return text.lstrip("\n")
