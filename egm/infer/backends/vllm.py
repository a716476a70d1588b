"""vLLM backend: the offline `vllm.LLM` with multi-modal inputs.

The prompt is the model's own chat template rendered with one image placeholder (the paper's
request: one user turn, image then text, no system prompt); vLLM expands the placeholder to the
image's visual tokens itself. Everything that does not need vLLM (prompt, sampling and engine
options) is a plain function here, tested without vLLM installed.

Engine options (a model's `engine_options` in the config): tensor_parallel_size, dtype,
max_model_len, gpu_memory_utilization, max_num_seqs, seed, enforce_eager, load_format (`dummy`:
random weights, for a weightless architecture directory), and `engine_args`
(a dict passed to `vllm.LLM` as is). data_parallel_size is handled by load_engine (one replica
per GPU group); the 235B models use tensor_parallel_size 8 on one node.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from egm.infer.base import CONTAINERS, Completion, EngineBase, Request, engine_sampling, require_module
from egm.options import SamplingOptions

ENGINE_KEYS = ("tensor_parallel_size", "dtype", "max_model_len", "gpu_memory_utilization", "max_num_seqs", "seed",
               "enforce_eager", "pipeline_parallel_size", "distributed_executor_backend", "load_format")


def vllm_request_sampling_kwargs(sampling: SamplingOptions, request: Request | None = None) -> dict:
    """Keyword arguments of `vllm.SamplingParams` for the config's decoding settings and, given
    one, the request's own max_tokens and stop strings (egm.infer.base.engine_sampling)."""
    return engine_sampling(sampling, request, max_tokens_key="max_tokens", seed_key="seed",
                           keep_stop_key="include_stop_str_in_output")


# The causal-LM architecture of a multimodal config's nested text config, by its model type.
TEXT_ARCHITECTURES = {"qwen3_vl": "Qwen3ForCausalLM", "qwen3_vl_moe": "Qwen3MoeForCausalLM"}


def pipeline_text_overrides(model_dir: str) -> dict:
    """`hf_overrides` naming the text model's architecture, for pipeline-parallel Qwen3-VL.

    vLLM 0.25 builds Qwen3-VL's language model from the nested text config, which names no
    architecture; under pipeline parallelism its config check then fails ("No model
    architectures are specified": vLLM issue 43271, fixed upstream after 0.25), as it did for
    our two-node Ray run on two H200s. Empty where the config names one or is not Qwen3-VL.
    """
    import json

    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return {}
    config = json.loads(path.read_text())
    text = config.get("text_config") or {}
    architecture = TEXT_ARCHITECTURES.get(config.get("model_type"))
    if architecture is None or text.get("architectures"):
        return {}
    return {"text_config": {"architectures": [architecture]}}


def vllm_engine_kwargs(model_dir: str, options: dict) -> dict:
    """Keyword arguments of `vllm.LLM`: the known option names, then `engine_args` verbatim."""
    options = dict(options)
    extra = dict(options.pop("engine_args", {}) or {})
    unknown = sorted(set(options) - set(ENGINE_KEYS) - {"batch_size", "data_parallel_size"})
    if unknown:
        raise ValueError(f"unknown vllm engine option(s) {unknown}; put engine-specific ones under engine_args")
    # An absolute path: Ray's workers (a multi-node engine) do not start in our working directory,
    # and vLLM reads a relative path that is not there as a hub repo id.
    model = Path(model_dir).resolve() if Path(model_dir).exists() else model_dir
    kwargs = {"model": str(model), "limit_mm_per_prompt": {"image": 1}, "trust_remote_code": False}
    for key in ENGINE_KEYS:
        if options.get(key) is not None:
            kwargs[key] = options[key]
    overrides = pipeline_text_overrides(model_dir) if int(options.get("pipeline_parallel_size") or 1) > 1 else {}
    if overrides:
        kwargs["hf_overrides"] = overrides
    kwargs.update(extra)  # the config's own hf_overrides, if any, win
    return kwargs


def vllm_prompt(tokenizer, request: Request, image) -> dict:
    """One request as vLLM's prompt dict: templated text with one image placeholder, and the image."""
    from egm.models.inputs import render_prompt

    text = render_prompt(tokenizer, request.prompt) + request.assistant_prefix
    return {"prompt": text, "multi_modal_data": {"image": image}}


def use_spawned_engine_process() -> None:
    """Start vLLM's engine process by spawn, not fork. Our jobs count GPUs before an engine is built
    (egm.runtime), which leaves torch's CUDA state in the parent that a forked child cannot
    re-initialise; vLLM forks unless CUDA is fully initialised, so it does not see this case. A
    user's own setting wins."""
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")


class VLLMEngine(EngineBase):
    name = "vllm"

    def __init__(self, model_dir: str, sampling: SamplingOptions, batch_size: int = 64, **options):
        require_module("vllm", "backend vllm", CONTAINERS["vllm"])
        from transformers import AutoTokenizer
        from vllm import LLM, SamplingParams

        self.model_dir = str(model_dir)
        self.batch_size = int(batch_size)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        use_spawned_engine_process()
        self.llm = LLM(**vllm_engine_kwargs(self.model_dir, options))
        self.sampling = sampling
        self.params = SamplingParams(**vllm_request_sampling_kwargs(sampling))
        # vLLM schedules everything it is given; predict hands it bigger chunks than a batch.
        self.chunk_size = max(self.batch_size, 256)

    def generate(self, requests: list[Request]) -> list[Completion]:
        from egm.models.inputs import load_rgb_images

        t0 = time.perf_counter()
        images = load_rgb_images([req.image_path for req in requests])
        prompts = [vllm_prompt(self.tokenizer, req, img) for req, img in zip(requests, images)]
        params = self.params
        if any(r.max_tokens is not None or r.stop for r in requests):
            from vllm import SamplingParams

            params = [SamplingParams(**vllm_request_sampling_kwargs(self.sampling, r)) for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        # Offline generation returns when the whole call is done: every request reports that wall
        # time, as in the hf backend (the server backend measures requests one by one).
        latency = time.perf_counter() - t0
        return [Completion(text=o.outputs[0].text, completion_tokens=len(o.outputs[0].token_ids), latency_s=latency)
                for o in outputs]

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        self.llm = None
        if llm is None:
            return
        del llm
        import gc

        gc.collect()
