"""The Qwen3-VL processor the trainers get: image-only, with the recipe's pixel budget.

TRL's trainers want a `ProcessorMixin` for a vision-language model. `Qwen3VLProcessor` also
builds a video processor, which imports torchvision (absent from the CPU environment) and is
never used here: every sample is one image and one text. This subclass accepts no video
processor and saves only what a checkpoint needs (tokenizer, image processor, chat template).
"""

from __future__ import annotations

from pathlib import Path


def _processor_class():
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

        def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
            # ProcessorMixin.save_pretrained cannot save a None attribute; a checkpoint only
            # needs these two, and the final model directory takes the base model's files.
            save_directory = Path(save_directory)
            save_directory.mkdir(parents=True, exist_ok=True)
            self.tokenizer.save_pretrained(save_directory)
            self.image_processor.save_pretrained(save_directory)
            return [str(save_directory)]

    return ImageOnlyQwen3VLProcessor


def load_processor(model_dir: str | Path, min_pixels: int | None = None, max_pixels: int | None = None):
    """An image-only Qwen3-VL processor of `model_dir`; the pixel budget overrides its own when given.

    The image processor is the one `AutoProcessor` would pick here (torchvision where importable,
    else PIL), as for inference.
    """
    from egm.models.inputs import load_processor_parts

    tokenizer, image_processor = load_processor_parts(model_dir)
    if min_pixels is not None or max_pixels is not None:
        size = dict(image_processor.size)
        if min_pixels is not None:
            size["shortest_edge"] = int(min_pixels)
        if max_pixels is not None:
            size["longest_edge"] = int(max_pixels)
        if size["shortest_edge"] > size["longest_edge"]:
            raise ValueError(f"image min_pixels {size['shortest_edge']} exceeds max_pixels {size['longest_edge']}")
        image_processor.size = size
    cls = _processor_class()
    return cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=tokenizer.chat_template,
    )
