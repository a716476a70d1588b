"""What the benchmark scripts share: the repository root, a Qwen3-VL built from its architecture
with random weights and requests built from token ids (latency, scaling, decode_kernels), the
device's copy bandwidth, timing between device syncs, the device's name, and a fresh copy of the
workflow for the plan checks. The scripts import it as `benchmarks.common` and run as
`python -m benchmarks.<script>` from the repository root (benchmarks/README.md)."""

from __future__ import annotations

import platform
import shutil
import statistics
import time
from pathlib import Path

from egm.models.architectures import architecture_config

REPO = Path(__file__).resolve().parents[1]

# Qwen3-VL's special token ids.
IM_START, IM_END, ENDOFTEXT = 151644, 151645, 151643
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = 151652, 151653, 151655, 151656
TINY_IDS = dict(im_end=990, endoftext=991, vision_start=992, vision_end=993, image_pad=994, video_pad=995)


def build_config(name: str):
    """The architecture with Qwen3-VL's own special-token ids (inputs here are built from ids)."""
    ids = TINY_IDS if name == "tiny" else dict(im_end=IM_END, endoftext=ENDOFTEXT, vision_start=VISION_START,
                                               vision_end=VISION_END, image_pad=IMAGE_PAD, video_pad=VIDEO_PAD)
    return architecture_config(name, ids), ids


def build_model(name: str, device: str, dtype):
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    config, ids = build_config(name)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16 directly: an fp32 build of the 8B is twice the memory
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = Qwen3VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    return model, ids


def copy_bandwidth(device: str, gib: float = 2.0, iters: int = 20, rounds: int = 5) -> list[float]:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    import torch

    if device != "cuda":
        return [float("nan")]
    n = int(gib * 2**30)
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    out = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            dst.copy_(src)
        end.record()
        end.synchronize()
        out.append(2 * n * iters / (start.elapsed_time(end) / 1000))
    del src, dst
    torch.cuda.empty_cache()
    return out


def image_processor():
    from transformers.utils import is_torchvision_available

    kwargs = dict(size={"shortest_edge": 65536, "longest_edge": 16777216}, patch_size=16, temporal_patch_size=2,
                  merge_size=2, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    if is_torchvision_available():
        from transformers import Qwen2VLImageProcessor

        return Qwen2VLImageProcessor(**kwargs)
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(**kwargs)


def make_image(width: int, height: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def photo_like_image(width: int, height: int, rng):
    """An image whose JPEG (quality 90) is about as large as a photo of RefCOCO's: smooth colour
    areas (a 16x12 grid of random colours, upscaled) under pixel noise (sd 20), about 160 KB at
    640x480, the mean size of COCO 2014's JPEGs (13 GB for 83k images). How long a JPEG takes to
    decode grows with its size: uniform noise (make_image) makes 276 KB, the worst case, not what
    the pipeline reads. Content does not matter where the image is handed over decoded."""
    import numpy as np
    from PIL import Image

    grid = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    smooth = np.asarray(grid.resize((width, height), Image.BICUBIC), dtype=np.float32)
    return Image.fromarray(np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8))


def jpeg_decode_ms(width: int, height: int, reps: int = 20) -> dict:
    """Per kind of image (`photo_like_image`, uniform noise): its JPEG's size (quality 90, as the
    benchmarks write them) and the median, min and max ms of decoding it as the engines do
    (egm.models.inputs.load_rgb_images), on this host."""
    import tempfile

    import numpy as np

    from egm.models.inputs import load_rgb_images

    rng = np.random.default_rng(5)
    out = {}
    with tempfile.TemporaryDirectory(prefix="egm-jpeg-") as scratch:
        for kind, image in (("photo_like", photo_like_image(width, height, rng)), ("noise", make_image(width, height))):
            path = Path(scratch) / f"{kind}.jpg"
            image.save(path, quality=90)
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                load_rgb_images([str(path)])
                times.append(time.perf_counter() - t0)
            out[kind] = {"jpeg_kb": round(path.stat().st_size / 1000, 1), "ms": round(1000 * statistics.median(times), 3),
                         "min_ms": round(1000 * min(times), 3), "max_ms": round(1000 * max(times), 3)}
    return out


class Requests:
    """The same request B times: the image through the processor, then a Qwen3-VL chat prompt."""

    def __init__(self, processor, image, ids: dict, vocab_text: int, device: str, dtype, text_tokens: int = 24,
                 preprocess_device: str = "cpu"):
        import numpy as np

        self.processor, self.image, self.ids, self.device, self.dtype = processor, image, ids, device, dtype
        # The torchvision processor can resize and normalise on the GPU (64 images on the CPU take
        # a large share of a batch's latency); the PIL one works on the CPU only.
        self.processor_kwargs = {"device": preprocess_device} if preprocess_device != "cpu" else {}
        rng = np.random.default_rng(1)
        # <|im_start|>user\n <vision> Locate ..., output its bbox ... <|im_end|>\n<|im_start|>assistant\n<think>\n
        self.prefix = rng.integers(0, vocab_text, 3).tolist()
        self.text = rng.integers(0, vocab_text, text_tokens).tolist()
        self.suffix = [ids["im_end"]] + rng.integers(0, vocab_text, 6).tolist()

    def __call__(self, batch: int, pad_to: int | None = None) -> dict:
        import torch

        vision = self.processor(images=[self.image] * batch, return_tensors="pt", **self.processor_kwargs)
        grid = vision["image_grid_thw"]
        n_visual = int(grid[0].prod()) // 4
        row = self.prefix + [self.ids["vision_start"]] + [self.ids["image_pad"]] * n_visual + [self.ids["vision_end"]]
        row += self.text + self.suffix
        pad = max(0, (pad_to or 0) - len(row))
        ids = torch.tensor([[self.ids["endoftext"]] * pad + row] * batch)
        mask = torch.tensor([[0] * pad + [1] * len(row)] * batch)
        mm = (ids == self.ids["image_pad"]).long()
        out = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": mm,
               "pixel_values": vision["pixel_values"], "image_grid_thw": grid}
        out = {k: v.to(self.device) for k, v in out.items()}
        out["pixel_values"] = out["pixel_values"].to(self.dtype)
        return out


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def run_graph(decoder, make, batch, n, cache_length, pad_to, device):
    sync(device)
    t0 = time.perf_counter()
    inputs = make(batch, pad_to=pad_to)
    tokens = decoder.generate_ids(inputs, n, eos_ids=None, cache_length=cache_length).cpu()
    return time.perf_counter() - t0, tokens


def timed(fn, device: str, reps: int = 3) -> float:
    """Median wall seconds of fn() between device syncs."""
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return platform.processor() or platform.machine()


def device_label(device: str) -> str:
    """The device's name as the records write it: the card, or "CPU (<processor>)"."""
    name = device_name(device)
    return name if device == "cuda" else f"CPU ({name})"


def fresh_copy(dest: Path) -> Path:
    """The workflow as a new checkout has it (Snakefile, workflow/, config/, the container
    definitions), copied into `dest`: nothing fetched, nothing run."""
    for name in ("Snakefile",):
        shutil.copy(REPO / name, dest / name)
    for name in ("workflow", "config"):
        shutil.copytree(REPO / name, dest / name)
    (dest / "containers").mkdir()
    for definition in (REPO / "containers").glob("*.def"):
        shutil.copy(definition, dest / "containers" / definition.name)
    return dest
