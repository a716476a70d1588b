"""SGLang backend: the offline `sglang.Engine`, with its own data and tensor parallelism.

Prompts are the model's chat template rendered with one image placeholder (SGLang expands it to
the image's tokens); images go as file paths. The option and request mapping are plain
functions, tested without SGLang installed.

Engine options: tensor_parallel_size (tp_size), data_parallel_size (dp_size; "auto" = every GPU
the job was given, divided by tp), dtype, max_model_len (context_length),
gpu_memory_utilization (mem_fraction_static), seed (random_seed), and `engine_args` passed to
`sglang.Engine` as is.
"""

from __future__ import annotations

import time

from egm.infer.backends.gpus import resolve_data_parallel
from egm.infer.base import CONTAINERS, Completion, EngineBase, Request, engine_sampling, require_module
from egm.options import SamplingOptions

# Our option name -> sglang.Engine's.
OPTION_NAMES = {
    "tensor_parallel_size": "tp_size",
    "data_parallel_size": "dp_size",
    "dtype": "dtype",
    "max_model_len": "context_length",
    "gpu_memory_utilization": "mem_fraction_static",
    "seed": "random_seed",
}


def sglang_request_params(sampling: SamplingOptions, request: Request | None = None) -> dict:
    """SGLang's per-request `sampling_params` dict for the config's decoding settings and, given
    one, the request's own max_tokens and stop strings (egm.infer.base.engine_sampling)."""
    return engine_sampling(sampling, request, max_tokens_key="max_new_tokens", seed_key="sampling_seed",
                           keep_stop_key="no_stop_trim")


def sglang_engine_kwargs(model_dir: str, options: dict, gpus: list[str] | None = None) -> dict:
    options = dict(options)
    extra = dict(options.pop("engine_args", {}) or {})
    options.pop("batch_size", None)
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise ValueError(f"unknown sglang engine option(s) {unknown}; put engine-specific ones under engine_args")
    tp = int(options.get("tensor_parallel_size") or 1)
    kwargs = {"model_path": str(model_dir), "trust_remote_code": False, "tp_size": tp,
              "dp_size": resolve_data_parallel(options.get("data_parallel_size", "auto"), tp, gpus)}
    for ours, theirs in OPTION_NAMES.items():
        if ours in ("tensor_parallel_size", "data_parallel_size"):
            continue
        if options.get(ours) is not None:
            kwargs[theirs] = options[ours]
    kwargs.update(extra)
    return kwargs


def sglang_inputs(tokenizer, requests: list[Request]) -> tuple[list[str], list[str]]:
    """(prompts, image paths) for `Engine.generate(prompt=..., image_data=...)`."""
    from egm.models.inputs import render_prompt

    prompts = [render_prompt(tokenizer, r.prompt) + r.assistant_prefix for r in requests]
    return prompts, [r.image_path for r in requests]


class SGLangEngine(EngineBase):
    name = "sglang"

    def __init__(self, model_dir: str, sampling: SamplingOptions, batch_size: int = 64, **options):
        require_module("sglang", "backend sglang", CONTAINERS["sglang"])
        import sglang
        from transformers import AutoTokenizer

        self.model_dir = str(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        kwargs = sglang_engine_kwargs(self.model_dir, options)
        self.data_parallel_size = kwargs["dp_size"]
        self.engine = sglang.Engine(**kwargs)
        self.sampling = sampling
        self.params = sglang_request_params(sampling)
        self.chunk_size = max(int(batch_size), 256)

    def generate(self, requests: list[Request]) -> list[Completion]:
        t0 = time.perf_counter()
        prompts, images = sglang_inputs(self.tokenizer, requests)
        params = self.params
        if any(r.max_tokens is not None or r.stop for r in requests):
            params = [sglang_request_params(self.sampling, r) for r in requests]
        outputs = self.engine.generate(prompt=prompts, image_data=images, sampling_params=params)
        latency = time.perf_counter() - t0  # the whole call's wall time, as in the hf backend
        return [Completion(text=o["text"], completion_tokens=int(o["meta_info"]["completion_tokens"]), latency_s=latency)
                for o in outputs]

    def close(self) -> None:
        engine = getattr(self, "engine", None)
        self.engine = None
        if engine is not None:
            engine.shutdown()
