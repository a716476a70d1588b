"""Per-request latency of Qwen3-VL 2B/4B/8B (random bf16 weights) against the weight-streaming floor.

One 640x480 image (300 visual tokens) and a ~30-token prompt per request; a forced number of new
tokens (42: the baselines' mean answer length in the paper, 101: EGM-8B's), batch 1 and batch 64.
Methods:

- `generate`: plain `model.generate` (eager, dynamic cache): the reference path;
- `graph`: `egm.infer.fast.decoder.GraphDecoder` (static cache, one CUDA graph per decode step; at
  batch 1 its projections and attention through `egm.infer.fast.kernels` where Triton is present);
- `graph_compiled`: the same with each layer's pre/post-attention blocks compiled first;
- `vllm`: vLLM in this process, the peer: the same architecture written as a weightless
  directory (`egm.models.architectures`) and loaded with `load_format: dummy` through
  `egm.infer.backends.vllm.VLLMEngine`, the same image and the paper's prompt through the chat template,
  `min_tokens = max_tokens = n` with `ignore_eos`. Prefix caching and vLLM's cache of processed
  images are off, so each repetition preprocesses and prefills as egm's methods do. Its timing
  ends when `LLM.generate` returns; it runs after egm's methods for a model, once their weights
  are freed;
- `engine_egm` and `engine_vllm`: what a user of the pipeline gets. Requests go through
  `egm.infer.engine.load_engine` (`hf` with `decode: graph`, and `vllm` with its defaults), each
  with a new 640x480 JPEG written to disk before the clock starts (of a photo's size, about 160 KB:
  `benchmarks.common.photo_like_image`; records of 2026-12-08 and before: uniform noise, 276 KB,
  which takes longer to decode; `jpeg_decode_ms` times both on the run's host) and the paper's prompt, capped
  at n new tokens (not forced: the random weights stop on an eos only by chance; a batch where a
  row did is timed again with new images, up to `--reps` such batches per cell, and a cell still
  short is an error, not a number); timed from `engine.generate` to the completions on
  the host, so image decoding, the processor, the chat template and bucketing are in it. One
  engine per method and model, built with `batch_size` = the largest batch, two warm-up batches
  per cell.

Each timed request includes image preprocessing, the vision tower, prefill and decode, ending
when the tokens are on the host. Bandwidth = (bytes read + bytes written) / time of a large
device-to-device copy, measured several times in this run, best taken. Two floors per cell:

- `decode_floor_ms`, what decoding must read: for each of the n new tokens one pass over the
  weights a decode step multiplies with (every decoder layer, the final norm, lm_head) and the
  KV cache at that step's length,

      sum over k = 0 .. n-1 of  W_step + batch x (P + k) x KV_pos   bytes,  / bandwidth

  with W_step = `decode_weight_bytes`, P the prompt length, KV_pos = `kv_bytes_per_position`
  (2 x layers x KV heads x head_dim x element size). The input embedding table is left out: a
  step reads one row of it per sequence (the 8B's untied table is 1.245 GB, about 8 % of its
  weights). Tied models read that matrix as lm_head, where it is counted. The prompt pass gives
  the first token and reads the weights once too, so n passes in all;
- `floor_ms`, the older, looser one: every language-model weight (embedding table included)
  once per new token, no KV cache.

Every cell is timed `--reps` times (5 by default): `ms_per_request` is the median, `min_ms`
and `max_ms` the spread, `all_ms` every repetition. Per model, `split` divides each method's
medians at the two token counts into ms per new token and ms before the first decode step, and
`phases_ms` times the parts of that fixed cost for egm's compiled method (`phases`), and
`stop_cost` what ending on stop ids costs it against the same tokens forced (`stop_cost`). On a
GPU the graph methods' runs hold `device_ms`: the GPU's time for the prompt pass and for the
decode steps (medians), from events around them, beside egm's engine's own (`engine_phases_ms`). With
`--profile-dir`, `profile` holds per batch the kernels of one of that method's decode steps and
their time (`profile_step`; records of 2026-12-07 and before: batch 1 only, not keyed by batch).

    python -m benchmarks.latency --out benchmarks/results/latency-h100.json     # on a GPU
    python -m benchmarks.latency --tiny --out /tmp/latency-tiny.json            # CPU smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    Requests,
    build_model,
    copy_bandwidth,
    device_name,
    image_processor,
    jpeg_decode_ms,
    make_image,
    photo_like_image,
    run_graph,
    sync,
    timed,
)


def _weight_bytes(*modules) -> int:
    """Bytes of the modules' parameters, a tied weight (one Parameter in two modules) once."""
    params = {id(p): p for module in modules for p in module.parameters()}
    return sum(p.numel() * p.element_size() for p in params.values())


def llm_weight_bytes(model) -> int:
    """Bytes of the language model's weights (decoder, embeddings, lm_head; tied ones once)."""
    return _weight_bytes(model.model.language_model, model.lm_head)


def decode_weight_bytes(model) -> int:
    """Bytes of the weights one decode step multiplies with: decoder layers, final norm, lm_head
    (the input embedding table only where it is lm_head too, i.e. tied)."""
    lm = model.model.language_model
    return _weight_bytes(lm.layers, lm.norm, model.lm_head)


def kv_bytes_per_position(model) -> int:
    """Bytes of keys and values one position holds in the cache, over all layers."""
    text = model.config.text_config
    element = next(model.parameters()).element_size()
    return 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * element


def decode_floor_s(weight_bytes: int, kv_bytes: int, prompt: int, n: int, batch: int, bandwidth: float) -> float:
    """The decode floor of the module docstring, in seconds."""
    kv_positions = batch * (n * prompt + n * (n - 1) // 2)
    return (n * weight_bytes + kv_positions * kv_bytes) / bandwidth


def run_generate(model, make, batch, n, ids, device):
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              eos_token_id=ids["im_end"], pad_token_id=ids["endoftext"])
    sync(device)
    t0 = time.perf_counter()
    inputs = make(batch)
    with torch.inference_mode():
        out = model.generate(**inputs, generation_config=config)
    tokens = out[:, inputs["input_ids"].shape[1]:].cpu()
    return time.perf_counter() - t0, tokens


def agreement(a, b, reference_eos: int) -> float:
    """Mean over rows of the share of leading tokens two greedy runs agree on.

    `b` is plain generate with the eos suppressed (forced length), so wherever greedy would have
    picked the eos it picks the runner-up instead; rows are compared up to that point.
    """
    shares = []
    for ra, rb in zip(a.tolist(), b.tolist()):
        n = min(len(ra), len(rb))
        if reference_eos in ra[:n]:
            n = ra.index(reference_eos)
        if n == 0:
            continue
        k = next((i for i, (x, y) in enumerate(zip(ra[:n], rb[:n])) if x != y), n)
        shares.append(k / n)
    return sum(shares) / len(shares) if shares else float("nan")


def matmul_rate(device: str, n: int = 8192, iters: int = 10) -> float:
    """bf16 matrix product rate (FLOP/s) on random data: the compute ceiling for prefill."""
    import torch

    if device != "cuda":
        return float("nan")
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    end.synchronize()
    return 2 * n**3 * iters / (start.elapsed_time(end) / 1000)


def attention_variants(batch: int, kvh: int, group: int, hd: int, length: int, device: str, iters: int = 200) -> dict:
    """Microseconds per decode-step attention call ([B, kvh, G, hd] against a [B, kvh, L, hd] cache)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(batch, kvh, group, hd, device=device, dtype=torch.bfloat16)
    k = torch.randn(batch, kvh, length, hd, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    bias = torch.zeros(batch, 1, 1, length, device=device, dtype=torch.bfloat16)
    bias[..., length - 50:] = float("-inf")

    def manual():
        scores = (q @ k.transpose(-1, -2)) * hd**-0.5 + bias
        return scores.softmax(-1) @ v

    ref = manual().float()
    variants = {"default": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias), "manual": manual}
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("math", SDPBackend.MATH)):
        def run(backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        variants[name] = run
    out = {}
    for name, fn in variants.items():
        try:
            err = float((fn().float() - ref).norm() / ref.norm())
            for _ in range(5):
                fn()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            out[name] = {"us": round(1000 * start.elapsed_time(end) / iters, 2), "rel_error": round(err, 5)}
        except Exception as exc:
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return out


def diagnose(model, decoder, make, batch: int, pad_to: int, device: str, path: Path) -> dict:
    """Where a batch's fixed cost goes: vision tower, 3D-rope index, whole prefill; kernel tables."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    inputs = make(batch, pad_to=pad_to)
    base = model.model
    with torch.inference_mode():
        out = {
            "preprocess_ms": round(1000 * timed(lambda: make(batch, pad_to=pad_to), device), 2),
            "vision_ms": round(1000 * timed(lambda: base.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]), device), 2),
            "rope_index_ms": round(1000 * timed(lambda: base.get_rope_index(
                inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
                attention_mask=inputs["attention_mask"]), device), 2),
            "prefill_ms": round(1000 * timed(lambda: decoder.prefill(inputs), device), 2),
        }
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            decoder.prefill(inputs)
            sync(device)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=35)
    table += "\n\n" + prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    path.write_text(table)
    cfg = model.model.language_model.config
    out["attention_us"] = attention_variants(batch, cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads,
                                             cfg.head_dim, 512, device)
    return out


def phases(model, decoder, make, batch: int, pad_to: int, cache_length: int, cpu_make, device: str, reps: int) -> dict:
    """Milliseconds of each part of a request before its first decode step (median of `reps`).

    `prefill` is the prompt pass as a request runs it (a captured graph where the shape was
    captured); `prefill_eager` the same work launched op by op, `vision_eager` its vision part,
    `plan` its host part, `model_forward` the model's own forward (what the prompt pass was).
    """
    import torch
    from transformers import DynamicCache

    inputs = make(batch, pad_to=pad_to)
    state = decoder.cache_state(batch, cache_length)
    plan = decoder.prefiller.plan(inputs)
    names = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")

    def model_forward():
        with torch.inference_mode():
            cache = {decoder_cache_kwarg(model): DynamicCache(config=model.config)}
            model.model(**{k: inputs[k] for k in names}, use_cache=True, **cache)

    def vision():
        with torch.inference_mode():
            decoder.prefiller.vision(plan, inputs["pixel_values"])

    parts = {
        "preprocess": lambda: make(batch, pad_to=pad_to),
        "preprocess_on_cpu": lambda: cpu_make(batch, pad_to=pad_to),
        "plan": lambda: decoder.prefiller.plan(inputs),
        "vision_eager": vision,
        "prefill_eager": lambda: decoder.prefill(inputs),
        "prefill": lambda: decoder.prefill(inputs, state),
        "model_forward": model_forward,
    }
    out = {name: round(1000 * timed(fn, device, reps), 2) for name, fn in parts.items()}
    out["prefill_captured"] = bool(state.prefills)
    gc.collect()  # the model's own forward leaves its cache in reference cycles
    return out


def stop_cost(decoder, make, batch: int, pad_to: int, cache_length: int, max_new: int, device: str, reps: int) -> dict:
    """What ending on stop ids costs the compiled method: the same request decoded with stop ids
    against the same tokens forced without any (median ms of `reps`). The stop ids are tokens the
    rows make anyway (each row's at step `max_new // 2`), so the batch has stopped at the step where
    the last row meets one (`tokens`); `steps_run` is how many the decoder ran for it."""
    import torch

    inputs = make(batch, pad_to=pad_to)
    free = decoder.generate_ids(inputs, max_new, None, cache_length).cpu()
    stops = sorted(set(free[:, max_new // 2].tolist()))
    tokens = max(int(row.nonzero()[0]) for row in torch.isin(free, torch.tensor(stops))) + 1
    forced = timed(lambda: decoder.generate_ids(inputs, tokens, None, cache_length).cpu(), device, reps)
    for _ in range(2):  # a new stop set drops the captures: the step and the prompt pass again
        decoder.generate_ids(inputs, max_new, stops, cache_length)
    stopped = timed(lambda: decoder.generate_ids(inputs, max_new, stops, cache_length).cpu(), device, reps)
    return {"tokens": tokens, "steps_run": decoder.steps_run, "lookahead": decoder.lookahead,
            "stopped_ms": round(1000 * stopped, 2), "forced_ms": round(1000 * forced, 2)}


def decoder_cache_kwarg(model) -> str:
    """The name of the cache argument of the model's forward (it was renamed in transformers 5)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.model.forward).parameters else "past_key_values"


def before_and_per_token(entry: dict) -> dict:
    """Per method and batch, from the medians at two token counts: ms per new token, and ms before
    the first decode step (the request's fixed cost: the prompt pass gives the first token, so
    n tokens take n - 1 decode steps) = median(n1) - (n1 - 1) x per token."""
    cells = {}
    for run in entry["runs"]:
        cells.setdefault((run["method"], run["batch"]), {})[run["new_tokens"]] = run["ms_per_request"]
    out = {}
    for (method, batch), by_n in cells.items():
        if len(by_n) < 2:
            continue
        (n1, t1), (n2, t2) = sorted(by_n.items())[0], sorted(by_n.items())[-1]
        per_token = (t2 - t1) / (n2 - n1)
        out.setdefault(method, {})[f"batch {batch}"] = {"ms_per_token": round(per_token, 3),
                                                        "ms_before_first_step": round(t1 - (n1 - 1) * per_token, 2)}
    return out


def profile_step(decoder, device: str, path: Path) -> dict:
    """Kernels of one decode step (run eagerly, outside the graph): what a replay executes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    state = next(iter(decoder._states.values()))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.inference_mode():
        decoder._step(state)
        sync(device)
        with profile(activities=activities) as prof:
            decoder._step(state)
            sync(device)
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_us = sum(e.device_time for e in events) if events else float("nan")
    path.write_text(prof.key_averages().table(sort_by="cuda_time_total" if device == "cuda" else "cpu_time_total",
                                              row_limit=40))
    return {"kernels_per_step": len(events), "kernel_time_per_step_ms": round(kernel_us / 1000, 3)}


def add_floors(result: dict) -> None:
    """Each model's split and each run's floors (module docstring) at the best copy bandwidth
    measured so far, and the prefill-inclusive floor where a matrix-product rate was measured."""
    bw = [b for b in result["bandwidth_Bps"] if not math.isnan(b)]
    result["bandwidth_best_Bps"] = max(bw) if bw else None
    for entry in result["models"].values():
        entry["split"] = before_and_per_token(entry)
        for run in entry["runs"]:
            if bw:
                floor = entry["llm_weight_bytes"] * run["new_tokens"] / max(bw)
                run["floor_ms"] = round(1000 * floor, 2)
                run["ratio_to_floor"] = round(run["ms_per_request"] / 1000 / floor, 3)
                decode = decode_floor_s(entry["decode_weight_bytes"], entry["kv_bytes_per_position"],
                                        entry["prompt_tokens"], run["new_tokens"], run["batch"], max(bw))
                run["decode_floor_ms"] = round(1000 * decode, 2)
                run["ratio_to_decode_floor"] = round(run["ms_per_request"] / 1000 / decode, 3)
                flops = result.get("matmul_flops")
                if flops and not math.isnan(flops):
                    # Prefill is compute-bound: 2 x parameters x tokens for the LLM (prompt)
                    # and the vision tower (patches), at the measured matrix-product rate.
                    prefill = 2 * run["batch"] * (entry["llm_parameters"] * entry["prompt_tokens"]
                                                  + entry["vision_parameters"] * 4 * entry["visual_tokens"]) / flops
                    run["floor_with_prefill_ms"] = round(1000 * (floor + prefill), 2)
                    run["ratio_to_floor_with_prefill"] = round(run["ms_per_request"] / 1000 / (floor + prefill), 3)


def model_entry(model, make, ids: dict, build_s: float) -> dict:
    """A model's sizes (the floors' inputs) and its prompt, before any run."""
    entry = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "llm_weight_bytes": llm_weight_bytes(model),
        "decode_weight_bytes": decode_weight_bytes(model),
        "kv_bytes_per_position": kv_bytes_per_position(model),
        "llm_parameters": sum(p.numel() for p in model.model.language_model.parameters()),
        "vision_parameters": sum(p.numel() for p in model.model.visual.parameters()),
        "build_s": round(build_s, 1),
        "prompt_tokens": int(make(1)["input_ids"].shape[1]),
        "runs": [],
    }
    entry["visual_tokens"] = int((make(1)["input_ids"] == ids["image_pad"]).sum())
    return entry


def record_header(device: str, dtype, width: int, height: int, tokens: list[int], batches: list[int]) -> dict:
    """The record's description of the run, before any model: versions, settings, the floors' definitions."""
    import torch
    import transformers

    return {
        "benchmark": "benchmarks/latency.py",
        "device": device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "image": f"{width}x{height}",
        "new_tokens": tokens,
        "batches": batches,
        "weights": "random, seeded, " + str(dtype).removeprefix("torch."),
        "floor": "LLM weight bytes x new tokens / best measured copy bandwidth (read+write bytes / time)",
        "decode_floor": "sum over the n new tokens of (decode_weight_bytes + batch x cache length x "
                        "kv_bytes_per_position) / best measured copy bandwidth (module docstring)",
        "bandwidth_Bps": [],
        "models": {},
        "skipped": [],
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", default="qwen3-vl-8b,qwen3-vl-4b,qwen3-vl-2b")
    parser.add_argument("--tokens", default="42,101")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--methods", default="generate,graph,graph_compiled",
                        help="generate, graph, graph_compiled, vllm, engine_egm, engine_vllm")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions of the graph methods")
    parser.add_argument("--generate-reps", type=int, default=5, help="timed repetitions of plain generate")
    parser.add_argument("--budget-s", type=float, default=1e9, help="skip what would start after this many seconds")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny random Qwen3-VL")
    parser.add_argument("--preprocess", default="auto", help="where images are resized/normalised: cpu, cuda, auto")
    parser.add_argument("--profile-dir", default=None,
                        help="write one decode step's kernel table per model and batch here (graph_compiled)")
    parser.add_argument("--diagnose", action="store_true", help="only break down the fixed costs (needs --profile-dir)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    import torch

    from egm.infer.fast.decoder import GraphDecoder

    t_start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    models = ["tiny"] if args.tiny else args.models.split(",")
    tokens = [int(t) for t in args.tokens.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    methods = args.methods.split(",")
    width, height = (640, 480) if not args.tiny else (64, 64)
    max_new = max(tokens)

    result = record_header(device, dtype, width, height, tokens, batches)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def save():
        add_floors(result)
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, out_path)

    def over_budget(what: str) -> bool:
        if time.perf_counter() - t_start > args.budget_s:
            result["skipped"].append(what)
            print(f"skipped (budget): {what}", flush=True)
            return True
        return False

    import importlib.util

    if device != "cuda" or importlib.util.find_spec("vllm") is None:
        for method in [m for m in methods if m in ("vllm", "engine_vllm")]:
            methods.remove(method)
            result["skipped"].append(f"{method}: " + ("not installed" if device == "cuda" else "needs a GPU"))
    result["bandwidth_Bps"] += copy_bandwidth(device)
    result["matmul_flops"] = matmul_rate(device)
    if any(m in ENGINE_METHODS for m in methods):
        result["jpeg_decode_ms"] = jpeg_decode_ms(width, height)
    processor = image_processor()
    preprocess = args.preprocess
    if preprocess == "auto":
        from transformers.utils import is_torchvision_available

        preprocess = device if is_torchvision_available() else "cpu"
    result["preprocess_device"] = preprocess
    image = make_image(width, height)
    for name in models:
        if over_budget(name):
            continue
        t0 = time.perf_counter()
        model, ids = build_model(name, device, dtype)
        build_s = time.perf_counter() - t0
        vocab_text = min(model.config.text_config.vocab_size - 16, 150000)
        make = Requests(processor, image, ids, vocab_text, device, dtype, preprocess_device=preprocess)
        try:
            make(1)
        except Exception as err:  # an image processor that cannot run on the GPU: time it on the CPU
            print(f"preprocessing on {preprocess} failed ({err}); using the CPU", flush=True)
            preprocess = result["preprocess_device"] = "cpu"
            make = Requests(processor, image, ids, vocab_text, device, dtype)
        entry = result["models"][name] = model_entry(model, make, ids, build_s)
        print(f"{name}: {entry['parameters'] / 1e9:.3f}B parameters, LLM {entry['llm_weight_bytes'] / 1e9:.2f} GB, "
              f"prompt {entry['prompt_tokens']} tokens ({entry['visual_tokens']} visual), built in {build_s:.1f}s", flush=True)
        bucket = 128
        pad_to = math.ceil(entry["prompt_tokens"] / bucket) * bucket
        cache_length = pad_to + max_new
        decoder = None
        reference = {}
        if args.diagnose:
            decoder = GraphDecoder(model, compile_layers=True)
            for batch in batches:
                run_graph(decoder, make, batch, max_new, cache_length, pad_to, device)
                diag = diagnose(model, decoder, make, batch, pad_to, device, Path(args.profile_dir) / f"prefill-{name}-b{batch}.txt")
                entry.setdefault("diagnosis", {})[f"batch {batch}"] = diag
                print(f"  batch {batch}: {json.dumps(diag)}", flush=True)
                save()
            batches_to_time = []
        else:
            batches_to_time = batches
        for batch in batches_to_time:
            for method in [m for m in methods if m in IN_PROCESS_METHODS]:
                what = f"{name} batch {batch} {method}"
                if over_budget(what):
                    continue
                try:
                    if method == "generate":
                        run_generate(model, make, batch, 2, ids, device)  # warm-up
                        for n in tokens:
                            times = []
                            for _ in range(args.generate_reps):
                                wall, toks = run_generate(model, make, batch, n, ids, device)
                                times.append(wall)
                            reference[(batch, n)] = toks
                            record(entry, method, batch, n, times, toks.shape[1])
                        save()
                        continue
                    if decoder is None:
                        decoder = GraphDecoder(model, compile_layers=False)
                    decoder.set_compile(method == "graph_compiled")
                    t0 = time.perf_counter()
                    # Two warm-ups: the first compiles and captures the decode step, the second
                    # captures the prompt pass (a shape is captured when it recurs).
                    for _ in range(2):
                        run_graph(decoder, make, batch, max_new, cache_length, pad_to, device)
                    warm_s = time.perf_counter() - t0
                    for n in tokens:
                        times, device_times = [], []
                        for _ in range(args.reps):
                            wall, toks = run_graph(decoder, make, batch, n, cache_length, pad_to, device)
                            times.append(wall)
                            device_times.append(decoder.device_ms())
                        run = record(entry, method, batch, n, times, toks.shape[1])
                        run["warmup_s"] = round(warm_s, 1)
                        if device_times[0]:  # the GPU's time for the prompt pass and the steps (medians)
                            run["device_ms"] = {k: round(statistics.median(d[k] for d in device_times), 3)
                                                for k in device_times[0]}
                        if (batch, n) in reference:
                            run["agreement_with_generate"] = round(agreement(toks, reference[(batch, n)], ids["im_end"]), 3)
                    if method == "graph_compiled":
                        key = f"batch {batch}"
                        entry.setdefault("checks", {})[key] = decoder.check_step(make(batch, pad_to=pad_to), cache_length,
                                                                                  eager_reference=batch == 1)
                        gc.collect()  # the check's generate() leaves its cache in reference cycles
                        if device == "cuda":
                            torch.cuda.empty_cache()
                        for _ in range(2):  # the check dropped the captures: capture again
                            run_graph(decoder, make, batch, max_new, cache_length, pad_to, device)
                        entry.setdefault("phases_ms", {})[key] = phases(model, decoder, make, batch, pad_to, cache_length,
                                                                        Requests(processor, image, ids, vocab_text, device,
                                                                                 dtype), device, args.reps)
                        if args.profile_dir:
                            entry.setdefault("profile", {})[key] = profile_step(
                                decoder, device, Path(args.profile_dir) / f"profile-{name}-b{batch}.txt")
                        entry.setdefault("stop_cost", {})[key] = stop_cost(decoder, make, batch, pad_to, cache_length,
                                                                           max_new, device, args.reps)
                        print(f"  {key}: checks {entry['checks'][key]} phases {entry['phases_ms'][key]} "
                              f"stop {entry['stop_cost'][key]} {entry.get('profile', {}).get(key, '')}", flush=True)
                except Exception as err:  # one failed variant must not lose the others' numbers
                    import traceback

                    traceback.print_exc()
                    entry.setdefault("errors", []).append(f"{what}: {type(err).__name__}: {err}"[:2000])
                    if device == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.empty_cache()
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
                    print(f"  GPU memory in use after {what}: {torch.cuda.memory_allocated() / 2**30:.1f} GiB", flush=True)
                save()
        del decoder, model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        if "vllm" in methods and not args.diagnose and not over_budget(f"{name} vllm"):
            try:
                # The weightless model directory goes to a scratch folder, not beside the record.
                with tempfile.TemporaryDirectory(prefix="egm-vllm-") as scratch:
                    time_vllm(name, image, entry, tokens, batches, args.reps, Path(scratch))
            except Exception as err:  # the egm numbers of this model stay
                import traceback

                traceback.print_exc()
                entry.setdefault("errors", []).append(f"{name} vllm: {type(err).__name__}: {err}"[:2000])
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        for method in [m for m in methods if m in ENGINE_METHODS]:
            if args.diagnose or over_budget(f"{name} {method}"):
                continue
            try:
                with tempfile.TemporaryDirectory(prefix="egm-engine-") as scratch:
                    time_engine(method, name, entry, tokens, batches, args.reps, Path(scratch), device, (width, height))
            except Exception as err:
                import traceback

                traceback.print_exc()
                entry.setdefault("errors", []).append(f"{name} {method}: {type(err).__name__}: {err}"[:2000])
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
            save()
        result["bandwidth_Bps"] += copy_bandwidth(device)
        save()
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    save()
    print_table(result)
    return 0


def time_vllm(name: str, image, entry: dict, tokens: list[int], batches: list[int], reps: int, workdir: Path) -> None:
    """The `vllm` method (module docstring): appends its runs to `entry["runs"]`."""
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")  # flashinfer is not in the carried wheels
    from vllm import SamplingParams

    from egm.grounding import PROMPTS
    from egm.infer.base import Request
    from egm.options import SamplingOptions
    from egm.infer.backends.vllm import VLLMEngine, vllm_prompt
    from egm.models.architectures import write_architecture_model

    model_dir = workdir / name
    write_architecture_model(model_dir, name)
    t0 = time.perf_counter()
    engine = VLLMEngine(str(model_dir), SamplingOptions(max_tokens=max(tokens)), batch_size=max(batches),
                        dtype="bfloat16", load_format="dummy", max_model_len=2048, gpu_memory_utilization=0.85,
                        engine_args={"enable_prefix_caching": False, "mm_processor_cache_gb": 0})
    vllm = {"build_s": round(time.perf_counter() - t0, 1)}
    entry["vllm"] = vllm
    try:
        request = Request("0", "", PROMPTS["qwen3"].format(sent="the red car on the left"))
        prompt = vllm_prompt(engine.tokenizer, request, image)
        for batch in batches:
            for n in tokens:
                params = SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True, temperature=0.0)
                engine.llm.generate([prompt] * batch, params, use_tqdm=False)  # warm-up
                times = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    outputs = engine.llm.generate([prompt] * batch, params, use_tqdm=False)
                    times.append(time.perf_counter() - t0)
                vllm["prompt_tokens"] = len(outputs[0].prompt_token_ids)
                produced = {len(o.outputs[0].token_ids) for o in outputs}
                record(entry, "vllm", batch, n, times, produced.pop() if len(produced) == 1 else -1)
    finally:
        engine.close()


# The engine-path methods: (backend, engine options beyond batch size, dtype and dummy weights).
ENGINE_METHODS = {"engine_egm": ("hf", {"decode": "graph"}), "engine_vllm": ("vllm", {})}
IN_PROCESS_METHODS = ("generate", "graph", "graph_compiled")


def time_engine(method: str, name: str, entry: dict, tokens: list[int], batches: list[int], reps: int,
                workdir: Path, device: str, size: tuple[int, int]) -> None:
    """An `engine_*` method (module docstring): appends its runs to `entry["runs"]`. For egm's
    engine each run also holds `engine_phases_ms`: the medians over its timed batches of the engine's own
    `last_phases` (egm.infer.fast.engine.FastHFEngine.PHASES: decoding the JPEGs, `build_inputs`,
    the copies to the device, the decode, the completions; on a GPU also the GPU's time for the
    prompt pass and the steps, as the graph methods' `device_ms`) and the decode steps run."""
    import numpy as np

    from egm.grounding import PROMPTS
    from egm.infer.base import Request
    from egm.infer.engine import load_engine
    from egm.models.architectures import write_architecture_model
    from egm.options import SamplingOptions

    backend, options = ENGINE_METHODS[method]
    if backend == "vllm":
        if device != "cuda":
            raise RuntimeError("vLLM needs a GPU")
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")  # flashinfer is not in the carried wheels
    model_dir = workdir / name
    write_architecture_model(model_dir, name)
    options = {**options, "batch_size": max(batches), "load_format": "dummy",
               "dtype": "bfloat16" if device == "cuda" else "float32"}
    if backend == "hf":
        options["device"] = device
    t0 = time.perf_counter()
    engine = load_engine(backend, str(model_dir), SamplingOptions(max_tokens=max(tokens)), options)
    stats = entry.setdefault("engine_build_s", {})
    stats[method] = round(time.perf_counter() - t0, 3)
    rng = np.random.default_rng(2)
    prompt = PROMPTS["qwen3"].format(sent="the red car on the left")
    width, height = size
    sizes: list[int] = []

    def requests(batch: int, n: int) -> list[Request]:
        """`batch` requests, each with an image file of its own (vLLM and our engines may cache by
        content), of a photo's JPEG size (benchmarks.common.photo_like_image)."""
        out = []
        for i in range(batch):
            path = workdir / f"image-{i}.jpg"
            photo_like_image(width, height, rng).save(path, quality=90)
            sizes.append(path.stat().st_size)
            out.append(Request(str(i), str(path), prompt, max_tokens=n))
        return out

    def timed_batch(batch: int, n: int) -> tuple[float, list, dict]:
        batch_requests = requests(batch, n)
        t0 = time.perf_counter()
        completions = engine.generate(batch_requests)
        return time.perf_counter() - t0, completions, dict(getattr(engine, "last_phases", {}))

    try:
        for batch in batches:
            for n in tokens:
                warm = [timed_batch(batch, n)[0] for _ in range(2)]
                times, phases, short, shortest = [], [], 0, n
                # A batch in which a row stopped early (an eos by chance) is timed again with new
                # images, at most `reps` times in all; the record counts them.
                while len(times) < reps and short < reps:
                    wall, completions, batch_phases = timed_batch(batch, n)
                    lengths = [c.completion_tokens for c in completions]
                    if min(lengths) == max(lengths) == n:
                        times.append(wall)
                        phases.append(batch_phases)
                    else:
                        short += 1
                        shortest = min(shortest, *lengths)
                run = record(entry, method, batch, n, times, n if len(times) == reps else shortest)
                run["warmup_ms"] = [round(1000 * t, 2) for t in warm]
                run["short_batches_retimed"] = short
                if phases and phases[0]:
                    run["engine_phases_ms"] = {k: round(1000 * statistics.median(p[k] for p in phases), 3)
                                               for k in phases[0] if k != "decode_steps"}
                    run["decode_steps"] = sorted({p["decode_steps"] for p in phases})
    finally:
        engine.close()
        if sizes:
            entry.setdefault("engine_jpeg_kb", {})[method] = round(statistics.mean(sizes) / 1000, 1)


def record(entry, method, batch, n, times, produced: int) -> dict:
    if produced != n:
        raise RuntimeError(f"{method}: {produced} new tokens instead of the forced {n}")
    wall = statistics.median(times)
    run = {
        "method": method,
        "batch": batch,
        "new_tokens": n,
        "ms_per_request": round(1000 * wall, 2),  # every request of a batch waits for the whole batch
        "min_ms": round(1000 * min(times), 2),
        "max_ms": round(1000 * max(times), 2),
        "ms_per_request_amortized": round(1000 * wall / batch, 2),
        "tokens_per_s": round(batch * n / wall, 1),
        "all_ms": [round(1000 * t, 2) for t in times],
    }
    entry["runs"].append(run)
    print(f"  {method:15s} batch {batch:3d} {n:4d} tokens: {run['ms_per_request']:9.1f} ms/request, "
          f"{run['tokens_per_s']:8.1f} tokens/s", flush=True)
    return run


def print_table(result) -> None:
    bw = result.get("bandwidth_best_Bps")
    print(f"\n{result['device']}, copy bandwidth {bw / 1e12:.2f} TB/s" if bw else f"\n{result['device']}")
    print(f"{'model':12s} {'method':15s} {'batch':>5s} {'tokens':>6s} {'ms/req':>9s} {'floor':>8s} {'ratio':>6s} {'tok/s':>9s}")
    for name, entry in result["models"].items():
        for r in entry["runs"]:
            print(f"{name:12s} {r['method']:15s} {r['batch']:5d} {r['new_tokens']:6d} {r['ms_per_request']:9.1f} "
                  f"{r.get('floor_ms', float('nan')):8.1f} {r.get('ratio_to_floor', float('nan')):6.2f} {r['tokens_per_s']:9.1f}")


if __name__ == "__main__":
    sys.exit(main())
