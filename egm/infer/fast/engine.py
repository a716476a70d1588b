"""The `hf` backend with `decode: graph` (egm.infer.engine.load_engine): HFEngine's model and
processor, decoded by egm.infer.fast.decoder.GraphDecoder, with requests sorted and padded so a
run captures few graph shapes."""

from __future__ import annotations

import math
import time

from egm.infer.backends.hf import HFEngine
from egm.infer.base import Completion, Request, batches_by_settings, request_max_tokens
from egm.infer.fast.decoder import GraphDecoder
from egm.options import SamplingOptions


def image_token_count(image_processor, width: int, height: int) -> int:
    """Visual tokens the processor makes of an image of this size (after its resize and merge)."""
    patches = image_processor.get_number_of_image_patches(height, width, {})
    return int(patches) // int(image_processor.merge_size) ** 2


def pad_left(inputs: dict, to_length: int, pad_id: int) -> dict:
    """Extra left padding so prompts fall into few length buckets (few graph shapes)."""
    import torch

    ids = inputs["input_ids"]
    extra = to_length - ids.shape[1]
    if extra <= 0:
        return inputs
    out = dict(inputs)
    b = ids.shape[0]
    out["input_ids"] = torch.cat([ids.new_full((b, extra), pad_id), ids], dim=1)
    out["attention_mask"] = torch.cat([inputs["attention_mask"].new_zeros((b, extra)), inputs["attention_mask"]], dim=1)
    out["mm_token_type_ids"] = torch.cat(
        [inputs["mm_token_type_ids"].new_zeros((b, extra)), inputs["mm_token_type_ids"]], dim=1
    )
    return out


def image_device(image_processor, device: str, choice: str = "auto") -> str | None:
    """Where `build_inputs` preprocesses images: None (the CPU, the processor's default) or a device."""
    from transformers.utils import is_torchvision_available

    # transformers 5 names the PIL processor `...Pil`; the default one runs on torchvision.
    torchvision = is_torchvision_available() and not type(image_processor).__name__.endswith("Pil")
    if choice == "auto":
        return device if torchvision and not device.startswith("cpu") else None
    if choice.startswith("cpu"):
        return None
    if not torchvision:
        raise ValueError(f"preprocess_device {choice!r} needs the torchvision image processor; "
                         f"this one is {type(image_processor).__name__}")
    return choice


class FastHFEngine(HFEngine):
    """The `hf` backend with `decode: graph`: greedy, static cache, graph-replayed decode steps.

    Requests are sorted by their number of visual tokens before batching, so a batch holds
    images of similar size and little padding; prompt lengths are bucketed (`length_bucket`)
    so a run captures few graph shapes. Each request reports its batch's wall time, as in `hf`.
    """

    name = "hf"
    # What `last_phases` times of a batch, in seconds, one after another on the host: its images
    # opened and decoded, `build_inputs` (the GPU's part of the processor may still be running when
    # it returns), padding and the copies to the device, the decode up to the new tokens on the
    # host, the completions made of them. A batch's latency ends before the last. On CUDA also the
    # GPU's time for the prompt pass and the steps inside `decode` (`gpu_prefill`, `gpu_steps`).
    PHASES = ("load_images", "build_inputs", "to_device", "decode", "completions")

    def __init__(
        self,
        model_dir: str,
        sampling: SamplingOptions,
        compile_layers: bool = True,
        length_bucket: int = 128,
        lookahead: int = 2,
        use_graphs: bool | None = None,
        use_kernels: bool | None = None,
        preprocess_device: str = "auto",
        **hf_options,
    ):
        """`hf_options` are HFEngine's (batch_size, dtype, device, ...); the rest tune the decoder.

        `preprocess_device`: where images are resized and normalised. `auto` is the model's device
        when the image processor is the torchvision one (the processor AutoProcessor picks where
        torchvision is installed; on the GPU its resize is the same algorithm, its float rounding
        may differ in the last bits), else the CPU: on the host, 640x480 images cost ~10 ms of
        every batch's latency.
        """
        greedy = sampling.temperature == 0
        if not greedy or sampling.presence_penalty or sampling.repetition_penalty != 1.0:
            raise ValueError(
                "decode: graph does greedy decoding only (temperature 0, no penalties); "
                "use the default decode for sampling"
            )
        super().__init__(model_dir, sampling, **hf_options)
        on_cuda = self.device.startswith("cuda")
        self.decoder = GraphDecoder(
            self.model,
            use_graphs=on_cuda if use_graphs is None else use_graphs,
            compile_layers=bool(compile_layers and on_cuda),
            lookahead=lookahead,
            use_kernels=use_kernels,
        )
        self.length_bucket = max(1, int(length_bucket))
        self.preprocess_device = image_device(self.image_processor, self.device, preprocess_device)
        self.decoder.warm_up(self.batch_size)
        self.last_phases: dict = {}  # the last batch's, by PHASES, and the decode steps it ran
        # predict hands this engine bigger chunks than a batch, so sorting by size has room to work.
        self.chunk_size = self.batch_size * 8

    def _visual_tokens(self, path: str) -> int:
        from PIL import Image

        with Image.open(path) as img:
            width, height = img.size
        return image_token_count(self.image_processor, width, height)

    def generate(self, requests: list[Request]) -> list[Completion]:
        from egm.models.inputs import build_inputs, load_rgb_images

        # Requests with the same max_tokens and stop strings together (one decode setting per
        # batch), then by image size. A new stop set or length means a new graph capture.
        def settings(i: int) -> tuple:
            return (request_max_tokens(requests[i], self.sampling), tuple(requests[i].stop))

        if len(requests) <= self.batch_size and len({settings(i) for i in range(len(requests))}) == 1:
            order = list(range(len(requests)))  # one batch: nothing to sort, no image to open twice
        else:
            order = sorted(range(len(requests)),
                           key=lambda i: (settings(i), self._visual_tokens(requests[i].image_path)))
        results: list[Completion | None] = [None] * len(requests)
        for batch in batches_by_settings([requests[i] for i in order], self.batch_size):
            index = [order[j] for j in batch]
            max_new = request_max_tokens(requests[index[0]], self.sampling)
            stop_ids = self._stop_token_ids(requests[index[0]].stop)
            stamps = [time.perf_counter()]
            images = load_rgb_images([requests[i].image_path for i in index])
            stamps.append(time.perf_counter())
            inputs = build_inputs(images, [requests[i].prompt for i in index], self.tokenizer, self.image_processor,
                                  prefixes=[requests[i].assistant_prefix for i in index],
                                  image_device=self.preprocess_device)
            stamps.append(time.perf_counter())
            bucket = math.ceil(inputs["input_ids"].shape[1] / self.length_bucket) * self.length_bucket
            inputs = pad_left(inputs, bucket, self._pad_id)
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            eos_ids = self._eos_ids + [i for i in stop_ids if i not in self._eos_ids]
            stamps.append(time.perf_counter())
            new_tokens = self.decoder.generate_ids(inputs, max_new, eos_ids, cache_length=bucket + max_new).cpu()
            stamps.append(time.perf_counter())
            completions = self._completions(new_tokens, stamps[-1] - stamps[0], stop_ids)
            stamps.append(time.perf_counter())
            self.last_phases = dict(zip(self.PHASES, (b - a for a, b in zip(stamps, stamps[1:]))),
                                    decode_steps=self.decoder.steps_run)
            self.last_phases.update({f"gpu_{k}": ms / 1000 for k, ms in self.decoder.device_ms().items()})
            for i, completion in zip(index, completions):
                results[i] = completion
        return results  # type: ignore[return-value]

    def close(self) -> None:
        self.decoder = None  # its static caches and graphs hold GPU memory and the weights
        super().close()
