"""Plain transformers backend: batched `generate` on Qwen3-VL checkpoints, CPU or one GPU.

It serves the tiny demo model on CPU and is the reference path for the real checkpoints where
no serving engine is available. Prompts go through `egm.models.inputs`, which reproduces the
Qwen3-VL processor without torchvision.
"""

from __future__ import annotations

import time

from egm.infer.base import Completion, EngineBase, Request, batches_by_settings, request_max_tokens
from egm.options import SamplingOptions

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16", "half": "float16"}


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        # The checkpoints are bf16; on CPU fp32 is both faster and exact enough for the demo.
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto or one of {sorted(_DTYPES)}")
    return getattr(torch, _DTYPES[dtype])


def _presence_penalty_processor(penalty: float, prompt_len: int):
    """vLLM's presence penalty, which transformers lacks: a flat cut for tokens already generated.

    Only the generated part counts (as in vLLM), so the prompt, padding included, is skipped.
    """
    from transformers import LogitsProcessor

    class PresencePenalty(LogitsProcessor):
        def __call__(self, input_ids, scores):
            generated = input_ids[:, prompt_len:]
            if generated.shape[1] == 0:
                return scores
            seen = scores.new_zeros(scores.shape, dtype=scores.dtype)
            seen.scatter_(1, generated, 1.0)
            return scores - penalty * seen

    return PresencePenalty()


LOAD_FORMATS = ("auto", "dummy")


def load_model(model_dir: str, dtype, device: str, load_format: str = "auto", trust_remote_code: bool = False):
    """The checkpoint's model on `device`; `load_format: dummy` builds the architecture from the
    directory's config with seeded random weights instead (vLLM's option of the same name), so a
    weightless directory of a real-size architecture can be timed and smoke-run."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown load_format {load_format!r}; use one of {', '.join(LOAD_FORMATS)}")
    # Remote code stays off unless asked: Qwen3-VL is native to transformers, and a checkpoint
    # directory should not be able to run code just by being loaded.
    if load_format == "auto":
        model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype, trust_remote_code=trust_remote_code)
        return model.to(device)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    previous = torch.get_default_dtype()
    # Built on the device in its dtype: an fp32 CPU build of an 8B is slow and twice the memory.
    torch.set_default_dtype(dtype)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            with torch.device(device):
                model = AutoModelForImageTextToText.from_config(config, trust_remote_code=trust_remote_code)
    finally:
        torch.set_default_dtype(previous)
    return model


class HFEngine(EngineBase):
    name = "hf"

    def __init__(
        self,
        model_dir: str,
        sampling: SamplingOptions,
        batch_size: int = 8,
        dtype: str = "auto",
        device: str = "auto",
        trust_remote_code: bool = False,
        load_format: str = "auto",
    ):
        import torch

        from egm.models.inputs import load_processor_parts

        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model_dir = str(model_dir)
        self.sampling = sampling
        self.batch_size = int(batch_size)
        self.device = _resolve_device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        self.tokenizer, self.image_processor = load_processor_parts(self.model_dir)
        self.model = load_model(self.model_dir, self.dtype, self.device, load_format, trust_remote_code)
        self.model.eval()
        self._eos_ids = self._eos_token_ids()
        self._pad_id = self._pad_token_id()
        # generate() fills unset fields of the config it is given from the checkpoint's own, so
        # the checkpoint's sampling defaults (top_k, temperature) would ride along into greedy
        # runs; a neutral default leaves SamplingOptions as the only source of decoding settings.
        from transformers import GenerationConfig

        self.model.generation_config = GenerationConfig(eos_token_id=self._eos_ids, pad_token_id=self._pad_id)
        self._torch = torch

    def _eos_token_ids(self) -> list[int]:
        ids: list[int] = []
        for source in (self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            if source is None:
                continue
            for i in source if isinstance(source, (list, tuple)) else [source]:
                if int(i) not in ids:
                    ids.append(int(i))
        if not ids:
            raise ValueError(f"{self.model_dir}: no eos token in its generation config or tokenizer")
        return ids

    def _pad_token_id(self) -> int:
        for candidate in (self.tokenizer.pad_token_id, self.model.generation_config.pad_token_id):
            if candidate is not None:
                return int(candidate)
        return self._eos_ids[0]

    def _stop_token_ids(self, stop: tuple[str, ...]) -> list[int]:
        """One token id per stop string (generation stops on them like on an eos)."""
        ids = []
        for text in stop:
            encoded = self.tokenizer.encode(text, add_special_tokens=False)
            if len(encoded) != 1:
                raise ValueError(f"stop string {text!r} is {len(encoded)} tokens for this tokenizer; the hf backend "
                                 "stops on single tokens only")
            ids.append(int(encoded[0]))
        return ids

    def _generation_kwargs(self, prompt_len: int, max_new_tokens: int | None = None, stop_ids: list[int] = ()) -> dict:
        from transformers import GenerationConfig, LogitsProcessorList

        s = self.sampling
        greedy = s.temperature == 0
        # A fresh config, not the checkpoint's: its sampling defaults must not leak into greedy runs.
        config = GenerationConfig(
            max_new_tokens=int(s.max_tokens if max_new_tokens is None else max_new_tokens),
            do_sample=not greedy,
            temperature=None if greedy else float(s.temperature),
            top_p=None if greedy else float(s.top_p),
            top_k=None if greedy else (int(s.top_k) if s.top_k and s.top_k > 0 else None),
            repetition_penalty=float(s.repetition_penalty),
            eos_token_id=self._eos_ids + [i for i in stop_ids if i not in self._eos_ids],
            pad_token_id=self._pad_id,
        )
        kwargs = {"generation_config": config}
        if s.presence_penalty:
            kwargs["logits_processor"] = LogitsProcessorList(
                [_presence_penalty_processor(float(s.presence_penalty), prompt_len)]
            )
        return kwargs

    def _completions(self, new_tokens, latency: float, stop_ids: list[int] = ()) -> list[Completion]:
        """Each row cut at its first eos (dropped from the text) or stop token (kept in it)."""
        stops = set(stop_ids) - set(self._eos_ids)
        eos = set(self._eos_ids) | stops
        out = []
        for row in new_tokens.tolist():
            # Everything after the first eos is padding from rows that finished earlier.
            length = next((i + 1 for i, tok in enumerate(row) if tok in eos), len(row))
            ended = length and row[length - 1] in eos and row[length - 1] not in stops
            kept = row[: length - 1] if ended else row[:length]
            # Special tokens are kept: `</think>` and the reasoning are part of what gets parsed.
            text = self.tokenizer.decode(kept, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            out.append(Completion(text=text, completion_tokens=length, latency_s=latency))
        return out

    def generate(self, requests: list[Request]) -> list[Completion]:
        from egm.models.inputs import build_inputs, load_rgb_images

        torch = self._torch
        seed = self.sampling.extra.get("seed")
        if seed is not None and self.sampling.temperature != 0:
            # One seed per call: results then depend on the batch layout too, which is fixed by
            # the request order and batch_size.
            torch.manual_seed(int(seed))

        results: list[Completion] = []
        # Batches hold consecutive requests with the same max_tokens and stop strings.
        for index in batches_by_settings(requests, self.batch_size):
            chunk = [requests[i] for i in index]
            stop_ids = self._stop_token_ids(chunk[0].stop)
            t0 = time.perf_counter()
            images = load_rgb_images([req.image_path for req in chunk])
            inputs = build_inputs(images, [r.prompt for r in chunk], self.tokenizer, self.image_processor,
                                  prefixes=[r.assistant_prefix for r in chunk])
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            prompt_len = inputs["input_ids"].shape[1]
            max_new = request_max_tokens(chunk[0], self.sampling)
            with torch.inference_mode():
                output = self.model.generate(**inputs, **self._generation_kwargs(prompt_len, max_new, stop_ids))
            sequences = output if isinstance(output, torch.Tensor) else output.sequences
            new_tokens = sequences[:, prompt_len:].cpu()
            # A batch finishes together, so every request in it reports the batch's wall time
            # (image loading and preprocessing included): the latency a caller of this backend sees.
            latency = time.perf_counter() - t0
            results.extend(self._completions(new_tokens, latency, stop_ids))
        return results

    def close(self) -> None:
        model = getattr(self, "model", None)
        self.model = None
        if model is None:
            return
        del model
        import gc

        gc.collect()
        if self._torch.cuda.is_available():
            self._torch.cuda.empty_cache()
