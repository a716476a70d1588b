"""The latency side of the test-time-scaling sweep on a real-size Qwen3-VL (random bf16 weights).

Budget forcing as egm.infer.budget runs it, on the fast engine's decoder (egm.infer.fast.decoder.GraphDecoder:
static cache, CUDA graph per step, compiled layer blocks), at batch 1, one 640x480 image (300
visual tokens) and a ~30-token prompt, per budget N:

- phase 1: the request with N forced new tokens of "reasoning" (none for N = 0);
- phase 2: the same request with those N tokens and the forced "\\n</think>\\n\\n" (3 Qwen tokens)
  appended to its prompt, then a fixed short answer (`--answer`, 20 tokens): a second prefill;
- `one_generation`: the same N + 3 + answer tokens in one generation, what an engine that could
  insert the forced tokens into a running decode would pay; phase 1 + phase 2 minus this is the
  cost of the second prefill.

Each timed request includes image preprocessing, the vision tower, prefill and decode, ending when
the tokens are on the host (as benchmarks/latency.py, whose model builder and request maker are
reused). Lengths are forced (no eos), so the numbers are the latency side only: accuracy per
budget needs the real checkpoints (the sweep rule).

    python -m benchmarks.scaling --out benchmarks/results/scaling-h100.json   # on a GPU
    python -m benchmarks.scaling --tiny --out /tmp/scaling-tiny.json          # CPU smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import time
from pathlib import Path

from benchmarks.common import Requests, build_model, device_name, image_processor, make_image, run_graph

# Qwen tokens of the forced text "\n</think>\n\n": "\n", "</think>", "\n\n".
FORCED_IDS = [198, 151668, 271]
TINY_FORCED_IDS = [5, 6, 7]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="qwen3-vl-8b")
    parser.add_argument("--budgets", default="0,16,32,64,128,256")
    parser.add_argument("--answer", type=int, default=20, help="new tokens of the answer (phase 2)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="graphs without compiled layer blocks")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny random Qwen3-VL")
    args = parser.parse_args(argv)

    import torch
    import transformers

    from egm.infer.fast.decoder import GraphDecoder

    t_start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    name = "tiny" if args.tiny else args.model
    budgets = [int(b) for b in args.budgets.split(",")]
    forced = TINY_FORCED_IDS if args.tiny else FORCED_IDS
    width, height = (640, 480) if not args.tiny else (64, 64)

    t0 = time.perf_counter()
    model, ids = build_model(name, device, dtype)
    build_s = time.perf_counter() - t0
    vocab_text = min(model.config.text_config.vocab_size - 16, 150000)
    processor = image_processor()
    image = make_image(width, height)
    preprocess = device if device == "cuda" else "cpu"
    make = Requests(processor, image, ids, vocab_text, device, dtype, preprocess_device=preprocess)
    try:
        make(1)
    except Exception as err:  # an image processor that cannot run on the GPU: preprocess on the CPU
        print(f"preprocessing on {preprocess} failed ({err}); using the CPU", flush=True)
        preprocess = "cpu"
        make = Requests(processor, image, ids, vocab_text, device, dtype)
    prompt = int(make(1)["input_ids"].shape[1])
    bucket = 128  # the fast engine's length_bucket

    def padded(length: int) -> int:
        return math.ceil(length / bucket) * bucket

    longest = max(budgets) + len(forced) + args.answer
    # One cache length for every run: one captured graph (and one compile) serves them all.
    cache_length = padded(prompt + max(budgets) + len(forced)) + longest
    decoder = GraphDecoder(model, compile_layers=device == "cuda" and not args.no_compile)
    reasoning_ids = list(range(100, 100 + max(budgets)))  # stand-ins for the model's own tokens

    def continued(n: int):
        """The phase-2 request: the prompt with n reasoning tokens and the forced text after it."""
        later = copy.copy(make)
        later.suffix = make.suffix + reasoning_ids[:n] + forced
        return later

    t0 = time.perf_counter()
    run_graph(decoder, make, 1, 4, cache_length, padded(prompt), device)  # capture (and compile)
    warmup_s = time.perf_counter() - t0

    result = {
        "benchmark": "benchmarks/scaling.py",
        "device": device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "model": name,
        "weights": "random, seeded, " + str(dtype).removeprefix("torch."),
        "engine": "egm.infer.fast.decoder.GraphDecoder" + ("" if args.no_compile or device != "cuda" else " (compiled layers)"),
        "batch": 1,
        "image": f"{width}x{height}",
        "prompt_tokens": prompt,
        "forced_tokens": len(forced),
        "answer_tokens": args.answer,
        "cache_length": cache_length,
        "reps": args.reps,
        "preprocess_device": preprocess,
        "build_s": round(build_s, 1),
        "warmup_s": round(warmup_s, 1),
        "protocol": ("phase 1: prompt + N forced tokens (skipped for N = 0); phase 2: prompt + N + the forced "
                     f"'\\n</think>\\n\\n' ({len(forced)} tokens) re-prefilled, then {args.answer} answer tokens; "
                     "ms per request = phase 1 + phase 2 (median over reps, each timed alone); "
                     "one_generation: N + forced + answer tokens in one generation"),
        "budgets": [],
    }
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def save():
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, out_path)

    def timed(fn) -> list[float]:
        times = []
        for _ in range(args.reps):
            wall, _tokens = fn()
            times.append(wall)
        return times

    for n in budgets:
        later = continued(n)
        phase1 = timed(lambda: run_graph(decoder, make, 1, n, cache_length, padded(prompt), device)) if n else [0.0] * args.reps
        phase2 = timed(lambda: run_graph(decoder, later, 1, args.answer, cache_length,
                                               padded(prompt + n + len(forced)), device))
        single = timed(lambda: run_graph(decoder, make, 1, n + len(forced) + args.answer, cache_length,
                                               padded(prompt), device))
        total = [a + b for a, b in zip(phase1, phase2)]
        entry = {
            "budget": n,
            "new_tokens": n + args.answer,  # generated: reasoning + answer (the forced text is not)
            "ms_per_request": round(1000 * statistics.median(total), 2),
            "phase1_ms": round(1000 * statistics.median(phase1), 2),
            "phase2_ms": round(1000 * statistics.median(phase2), 2),
            "one_generation_ms": round(1000 * statistics.median(single), 2),
            "all_ms": [round(1000 * t, 2) for t in total],
        }
        entry["second_prefill_overhead_ms"] = round(entry["ms_per_request"] - entry["one_generation_ms"], 2)
        result["budgets"].append(entry)
        print(f"budget {n:4d}: {entry['ms_per_request']:8.1f} ms/request (phase 1 {entry['phase1_ms']:7.1f}, "
              f"phase 2 {entry['phase2_ms']:6.1f}; one generation {entry['one_generation_ms']:7.1f})", flush=True)
        save()
    rows = result["budgets"]
    if len(rows) >= 2:
        # Decode cost per reasoning token: slope of phase 1 between the smallest and largest N > 0.
        with_phase1 = [r for r in rows if r["budget"] > 0]
        if len(with_phase1) >= 2:
            a, b = with_phase1[0], with_phase1[-1]
            result["ms_per_reasoning_token"] = round((b["phase1_ms"] - a["phase1_ms"]) / (b["budget"] - a["budget"]), 3)
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
