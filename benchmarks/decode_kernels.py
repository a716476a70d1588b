"""Decode kernels of a Qwen3-VL architecture against the library ones and the copy bandwidth.

Matrix-vector products: for each weight shape one decode step multiplies a single token with
(fused QKV, output projection, fused gate/up, down projection, lm_head), bf16, one row:

- `cublas`: `F.linear` (`torch.matmul`'s library choice), what the decoder used before;
- `triton`: `egm.infer.fast.kernels.gemv` with its launch configuration (`GEMV_CONFIG`);
- `triton_fused`: the same kernel with what the decoder folds into that product (`FUSED`: the
  input's RMS norm, the SwiGLU of the gate/up product's two halves, the residual), against that
  whole computation in float32;
- `triton_prenormed` (products after a norm): the norm in a compiled launch of its own, rounded to
  bf16, then the kernel without it, for the decoder to choose, per product, where the norm goes;
- `triton_best`: the best of a sweep of that kernel's launch configurations (block rows, block
  columns, warps, pipeline stages), and the sweep itself under `sweep`; swept as the decoder
  calls it, with its folds (`sweep_of: fused`; records before 2026-12-08 swept the plain
  product), and `fused_step_ms_by_config` adds a whole step's products up per configuration, so
  the one best for the step (what `GEMV_CONFIG` should be) can be read off;
- `inductor`: the product written as `(w * x).sum(-1)` in fp32 and compiled by `torch.compile`,
  once with default heuristics and once with coordinate-descent tuning (`inductor_tuned`).

Attention (`attention`): one step of one layer for each of `--attention-batches` against a cache
of `--cache-lengths` positions (the last 50 masked, as the room of tokens not yet written is), from
the QKV product on (the new token's per-head norms and rope, its key and value written into the
cache, the attention): through the library's operations (`library`, as the decoder's CPU path
does it) against `egm.infer.fast.kernels.attention` (`triton`, one kernel, reading up to the
written position; `triton_N_programs`: the cache cut into chunks for about N programs, where that
differs from the default split; with `--attention-sweep`, `triton_<block>-<warps>-<stages>`: at
each other launch configuration of `ATTENTION_SWEEP`, from batch 32 on); and `sdpa`,
`F.scaled_dot_product_attention` of grouped queries against the cache alone (its default
backend). GB/s counts the whole cache's bytes.

Beyond batch 1 (`--parts batched`, at `--product-batches`): each product as the decoder's compiled
blocks run it there, through the library (`cublas`, as vLLM does too) and through `torch.compile`'s
max-autotune (`inductor_max_autotune`), for the products at batch 64, which are 5.74 ms of a
7.97 ms step on the H100 against a floor near 5.

Timing: each weight (each cache) has enough copies that one pass over them is several times the
L2 (a decode step reads each weight once and ~15 GB in between, so none is ever in the cache);
one pass is captured as a CUDA graph, so launches cost what they cost inside the decoder's
captured step. Each cell is the median of `--reps` replays (min and max beside it) divided by
the copies. GB/s = weight bytes / time; `of_copy` = that over the best device-to-device copy
bandwidth (bytes read + written / time) measured in the same run, the floor `latency.py` uses.
`step_ms` adds one step's products up: per layer QKV + O + gate/up + down, times the layers,
plus lm_head (`triton_fused_norm_where_faster`: `triton_fused`, or `triton_prenormed` where
faster). `max_rel_error` is against an fp32 computation on the same data.

    python -m benchmarks.decode_kernels --out benchmarks/results/decode-kernels-h200.json   # on a GPU
    python -m benchmarks.decode_kernels --parts batched --out /tmp/batched.json             # batch 64 only
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import build_config, copy_bandwidth, device_name
from egm.infer.fast import kernels

# What egm.infer.fast.decoder folds into each product at batch 1 (egm.infer.fast.kernels.DecodeOps).
FUSED = {"qkv": ("norm",), "o": ("residual",), "gate_up": ("norm", "swiglu"), "down": ("residual",),
         "lm_head": ("norm",)}
# Attention programs per call tried beside the default (kernels.ATTENTION_PROGRAMS).
ATTENTION_PROGRAMS_TRIED = (1024, 4096)
SWEEP = {"block_n": (4, 8, 16, 32), "block_k": (256, 512, 1024), "warps": (2, 4, 8), "stages": (1, 3)}
# The attention kernel's launch configurations swept (kernels.ATTENTION_CONFIG: block, warps, stages).
ATTENTION_SWEEP = {"block": (32, 64, 128), "warps": (2, 4, 8), "stages": (2, 3, 4)}


def shapes(name: str) -> dict:
    """name -> ((N, K), uses per step) of one decode step's projections."""
    config, _ = build_config(name)
    t = config.text_config
    hd = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    layers = t.num_hidden_layers
    return {
        "qkv": ((t.num_attention_heads * hd + 2 * t.num_key_value_heads * hd, t.hidden_size), layers),
        "o": ((t.hidden_size, t.num_attention_heads * hd), layers),
        "gate_up": ((2 * t.intermediate_size, t.hidden_size), layers),
        "down": ((t.hidden_size, t.intermediate_size), layers),
        "lm_head": ((t.vocab_size, t.hidden_size), 1),
    }


def fused_reference(fused: tuple, w, x, norm_w, residual, eps: float):
    """What the fused kernel computes, in float32 as the library would: the product of the input
    (RMS-normed with "norm"), then silu(gate) * up of its two halves ("swiglu"), plus the residual."""
    import torch.nn.functional as F

    x = x.float()
    if "norm" in fused:
        x = F.rms_norm(x, (x.shape[-1],), norm_w.float(), eps)
    y = w.float() @ x
    if "swiglu" in fused:
        gate, up = y.chunk(2)
        y = F.silu(gate) * up
    return y + residual.float() if "residual" in fused else y


def time_pass(calls, reps: int) -> list[float]:
    """Seconds per call: the calls captured once as a graph, replayed `reps` times."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:  # warm-up: compiles, autotunes, library handles
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / 1000 / len(calls))
    del graph
    return out


def step_total_ms(cells) -> float:
    """A decode step's ms from (us per call, calls per step) pairs."""
    return round(sum(us * uses for us, uses in cells) / 1000, 3)


def cell(times: list[float], nbytes: int, bandwidth: float, error: float) -> dict:
    med = statistics.median(times)
    return {"us": round(med * 1e6, 2), "min_us": round(min(times) * 1e6, 2), "max_us": round(max(times) * 1e6, 2),
            "GBps": round(nbytes / med / 1e9, 1), "of_copy": round(nbytes / med / bandwidth, 3),
            "max_rel_error": float(f"{error:.3g}")}


def time_attention(name: str, lengths: list[int], batches: list[int], reps: int, pass_gb: float,
                   bandwidth: float, sweep: bool = False) -> dict:
    """One decode step's attention in one layer, per batch and cache length: from the QKV product
    on (per-head norms, rope, cache write, attention) through the library (`library`) and egm's
    kernel (`triton`), and the library's attention alone (`sdpa`). With `sweep`, also the kernel
    at each launch configuration of ATTENTION_SWEEP (`triton_<block>-<warps>-<stages>`)."""
    import torch
    import torch.nn.functional as F

    config, _ = build_config(name)
    t = config.text_config
    kvh, group = t.num_key_value_heads, t.num_attention_heads // t.num_key_value_heads
    hd = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    scale, eps = hd**-0.5, float(t.rms_norm_eps)
    out = {}
    for batch, length in itertools.product(batches, lengths):
        # The last 50 positions not yet written (a step's cache has its new tokens' room at the end).
        last = length - 51
        nbytes = 2 * batch * kvh * length * hd * 2
        copies = max(2, math.ceil(pass_gb * 1e9 / 10 / nbytes))
        bf16 = dict(device="cuda", dtype=torch.bfloat16)
        qkv = torch.randn(batch, (kvh * group + 2 * kvh) * hd, **bf16)
        q_norm_w, k_norm_w = torch.rand(hd, **bf16) + 0.5, torch.rand(hd, **bf16) + 0.5
        angle = torch.rand(batch, hd // 2, device="cuda") * 6
        cos, sin = (torch.cat((angle, angle), -1).cos().to(torch.bfloat16),
                    torch.cat((angle, angle), -1).sin().to(torch.bfloat16))
        caches = [torch.randn(2, batch, kvh, length, hd, **bf16) for _ in range(copies)]
        bias = torch.zeros(batch, 1, 1, length, **bf16)
        bias[..., last + 1:] = float("-inf")
        last_at = torch.tensor([last], device="cuda")
        first = torch.zeros(batch, dtype=torch.long, device="cuda")
        counts = torch.zeros(batch * kvh, dtype=torch.int32, device="cuda")
        q = torch.randn(batch, kvh, group, hd, **bf16)
        outs = [torch.empty_like(q) for _ in range(copies)]
        args = (qkv, q_norm_w, k_norm_w, cos, sin, eps)
        full = [a.float() if torch.is_tensor(a) else a for a in args]
        reference = kernels.library_attention(*full, caches[0].float(), bias.float(), scale, last_at)
        sdpa_reference = F.scaled_dot_product_attention(q.float(), caches[0][0].float(), caches[0][1].float(),
                                                        attn_mask=bias.float(), scale=scale)

        def error(y, against):
            return float((y.float() - against).abs().max() / against.abs().max())

        methods = {
            "sdpa": (lambda kv, o: F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=bias, scale=scale),
                     sdpa_reference),
            "library": (lambda kv, o: kernels.library_attention(*args, kv, bias, scale, last_at), reference),
            "triton": (lambda kv, o: kernels.attention(*args, kv, bias, scale, o, last_at, first, counts), reference),
        }
        # The same kernel with the cache cut into more chunks than the default split (more, shorter
        # programs: at batch 64 the default gives each (sequence, KV head) one program).
        default_split = kernels.attention_split(batch, kvh, length)
        for programs in ATTENTION_PROGRAMS_TRIED:
            if kernels.attention_split(batch, kvh, length, programs) != default_split:
                methods[f"triton_{programs}_programs"] = (
                    lambda kv, o, p=programs: kernels.attention(*args, kv, bias, scale, o, last_at, first, counts,
                                                                programs=p), reference)
        # Swept where the attention is a large share of a step (at batch 64, about a quarter; at
        # batch 1 a few microseconds of start-up a layer).
        for launch in itertools.product(*ATTENTION_SWEEP.values()) if sweep and batch >= 32 else ():
            if launch != kernels.ATTENTION_CONFIG:
                methods["triton_" + "-".join(map(str, launch))] = (
                    lambda kv, o, c=launch: kernels.attention(*args, kv, bias, scale, o, last_at, first, counts,
                                                              config=c), reference)
        entry = {"batch": batch, "kv_heads": kvh, "group": group, "head_dim": hd, "cache_bytes": nbytes,
                 "copies": copies, "last": last, "split": list(default_split)}
        for method, (fn, against) in methods.items():
            try:
                y = fn(caches[0], outs[0])
                y = outs[0] if y is None else y
                times = time_pass([lambda kv=kv, o=o: fn(kv, o) for kv, o in zip(caches, outs)], reps)
                entry[method] = cell(times, nbytes, bandwidth, error(y, against))
            except Exception as err:
                entry[method] = {"error": f"{type(err).__name__}: {err}"[:500]}
        out[f"batch {batch} cache {length}"] = entry
        print("attention", batch, length, json.dumps(entry), flush=True)
        del caches, outs
        torch.cuda.empty_cache()
    return out


def time_batched_products(name: str, batches: list[int], reps: int, pass_gb: float, bandwidth: float) -> dict:
    """Each product of a decode step at `batch` rows (bf16, plain), as the decoder's compiled blocks
    run them beyond batch 1: `cublas` (`F.linear`, the library's choice: what the decoder and vLLM
    use there) against `inductor_max_autotune` (`torch.compile` with max-autotune, which benchmarks
    its Triton matrix-product templates against the library and takes the fastest), per batch with
    `step_ms` adding a step's products up."""
    import torch
    import torch.nn.functional as F

    tuned = torch.compile(lambda x, w: F.linear(x, w), mode="max-autotune-no-cudagraphs", dynamic=False)
    out = {}
    for batch in batches:
        entries = {}
        for product, ((n, k), uses) in shapes(name).items():
            nbytes = n * k * 2
            copies = max(2, math.ceil(pass_gb * 1e9 / nbytes))
            weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5 for _ in range(copies)]
            x = torch.randn(batch, k, device="cuda", dtype=torch.bfloat16)
            reference = x.float() @ weights[0].float().T
            entry = {"N": n, "K": k, "uses_per_step": uses, "weight_bytes": nbytes, "copies": copies}
            for method, fn in (("cublas", F.linear), ("inductor_max_autotune", tuned)):
                try:
                    y = fn(x, weights[0])  # compiles and autotunes before the timing
                    error = float((y.float() - reference).abs().max() / reference.abs().max())
                    times = time_pass([lambda w=w, fn=fn: fn(x, w) for w in weights], reps)
                    entry[method] = cell(times, nbytes, bandwidth, error)
                except Exception as err:
                    entry[method] = {"error": f"{type(err).__name__}: {err}"[:500]}
            entries[product] = entry
            print("batch", batch, product, json.dumps(entry), flush=True)
            del weights
            torch.cuda.empty_cache()
        step = {method: step_total_ms((e[method]["us"], e["uses_per_step"]) for e in entries.values())
                for method in ("cublas", "inductor_max_autotune") if all("us" in e[method] for e in entries.values())}
        out[f"batch {batch}"] = {"shapes": entries, "step_ms": step}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="qwen3-vl-8b")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--pass-gb", type=float, default=1.5, help="weight bytes per timed pass (copies of one shape)")
    parser.add_argument("--no-sweep", action="store_true", help="no sweep of the products' launch configurations")
    parser.add_argument("--attention-sweep", action="store_true",
                        help="the attention at each launch configuration of ATTENTION_SWEEP, from batch 32")
    parser.add_argument("--cache-lengths", default="512,1024")
    parser.add_argument("--attention-batches", default="1,8,64")
    parser.add_argument("--parts", default="products,attention",
                        help="of products (batch 1), attention, batched (the products at --product-batches)")
    parser.add_argument("--product-batches", default="64")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    if parts - {"products", "attention", "batched"}:
        parser.error(f"unknown parts: {sorted(parts - {'products', 'attention', 'batched'})}")

    import torch

    t_start = time.perf_counter()
    torch.manual_seed(0)
    bandwidth = max(copy_bandwidth("cuda"))
    dtype = torch.bfloat16
    result = {"benchmark": "benchmarks/decode_kernels.py", "device": device_name("cuda"), "torch": torch.__version__,
              "model": args.model, "reps": args.reps, "copy_bandwidth_Bps": bandwidth, "shapes": {}}
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        result["triton"] = None

    def reduction(x, w):
        return (w.float() * x.float()).sum(-1).to(x.dtype)

    for name, ((n, k), uses) in shapes(args.model).items() if "products" in parts else ():
        nbytes = n * k * 2
        copies = max(2, math.ceil(args.pass_gb * 1e9 / nbytes))
        weights = [torch.randn(n, k, device="cuda", dtype=dtype) * k**-0.5 for _ in range(copies)]
        x = torch.randn(k, device="cuda", dtype=dtype)
        outs = [torch.empty(n, device="cuda", dtype=dtype) for _ in range(copies)]
        # What the decoder folds into this product (FUSED): its input's norm, the SwiGLU of its
        # two halves (gate/up), the residual added to its output.
        fused = FUSED[name]
        norm_w = torch.rand(k, device="cuda", dtype=dtype) + 0.5
        residual = torch.randn(n, device="cuda", dtype=dtype)
        fused_outs = outs
        if "swiglu" in fused:  # half as many outputs as the weight has rows
            fused_outs = [torch.empty(n // 2, device="cuda", dtype=dtype) for _ in range(copies)]
        references = {"plain": weights[0].float() @ x.float(),
                      "fused": fused_reference(fused, weights[0], x, norm_w, residual, 1e-6)}

        def error(y, which="plain"):
            reference = references[which]
            return float((y.float() - reference).abs().max() / reference.abs().max())

        def fused_call(w, o, config=None):
            """The product as the decoder calls it, with its folds (config: GEMV_CONFIG by default)."""
            kernels.gemv(x, w, o, config, norm_w=norm_w if "norm" in fused else None, eps=1e-6,
                         residual=residual if "residual" in fused else None, swiglu="swiglu" in fused)

        entry = {"N": n, "K": k, "uses_per_step": uses, "weight_bytes": nbytes, "copies": copies, "fused": fused}
        methods = {
            "cublas": lambda w, o: torch.nn.functional.linear(x.view(1, k), w),
            "triton": lambda w, o: kernels.gemv(x, w, o),
            "triton_fused": fused_call,
        }
        if "norm" in fused:
            # The norm in a launch of its own (compiled: one kernel) and rounded to bf16, as the
            # library rounds it, then the product without it: every program of the folded product
            # loads the norm's weight beside the input, which costs lm_head's 38k programs more
            # than one launch does.
            normed = torch.compile(lambda x: torch.nn.functional.rms_norm(x, (k,), norm_w, 1e-6), dynamic=False)

            def prenormed_call(w, o):
                kernels.gemv(normed(x), w, o, residual=residual if "residual" in fused else None,
                             swiglu="swiglu" in fused)

            methods["triton_prenormed"] = prenormed_call
        compiled = torch.compile(reduction, dynamic=False)
        methods["inductor"] = lambda w, o: compiled(x, w)
        for method, fn in methods.items():
            folded = method in ("triton_fused", "triton_prenormed")  # computes what the decoder folds in
            method_outs = fused_outs if folded else outs
            try:
                y = fn(weights[0], method_outs[0])
                y = method_outs[0] if y is None else y
                times = time_pass([lambda w=w, o=o: fn(w, o) for w, o in zip(weights, method_outs)], args.reps)
                entry[method] = cell(times, nbytes, bandwidth, error(y.view(-1), "fused" if folded else "plain"))
            except Exception as err:  # one failed method must not lose the others
                entry[method] = {"error": f"{type(err).__name__}: {err}"[:500]}
        try:
            import torch._inductor.config as inductor_config

            with inductor_config.patch(coordinate_descent_tuning=True):
                tuned = torch.compile(lambda x, w: reduction(x, w), dynamic=False)
                y = tuned(x, weights[0])
                times = time_pass([lambda w=w: tuned(x, w) for w in weights], args.reps)
            entry["inductor_tuned"] = cell(times, nbytes, bandwidth, error(y))
        except Exception as err:
            entry["inductor_tuned"] = {"error": f"{type(err).__name__}: {err}"[:500]}
        if not args.no_sweep and result["triton"]:
            # Swept as the decoder calls it: the folds change what a program loads (the norm's
            # input and weight, the up rows), so the best launch can differ from the plain product's.
            sweep = {}
            for config in itertools.product(*SWEEP.values()):
                if config[0] * config[1] > 16384:  # register budget of the fp32 partial sums
                    continue
                try:
                    fused_call(weights[0], fused_outs[0], config)
                    err = error(fused_outs[0], "fused")
                    times = time_pass([lambda w=w, o=o: fused_call(w, o, config) for w, o in zip(weights, fused_outs)],
                                      max(3, args.reps // 2))
                    sweep["-".join(map(str, config))] = cell(times, nbytes, bandwidth, err)
                except Exception as err:
                    sweep["-".join(map(str, config))] = {"error": f"{type(err).__name__}: {err}"[:300]}
            good = {c: v for c, v in sweep.items() if "us" in v and v["max_rel_error"] < 1e-2}
            if good:
                best = min(good, key=lambda c: good[c]["us"])
                config = tuple(int(v) for v in best.split("-"))
                times = time_pass([lambda w=w, o=o: fused_call(w, o, config) for w, o in zip(weights, fused_outs)],
                                  args.reps)
                entry["triton_best"] = dict(cell(times, nbytes, bandwidth, good[best]["max_rel_error"]), config=best)
            entry["sweep"] = sweep
            entry["sweep_of"] = "fused"
        result["shapes"][name] = entry
        print(name, json.dumps({m: entry[m] for m in entry if m not in ("sweep",)}), flush=True)
        del weights, outs, fused_outs
        torch.cuda.empty_cache()

    if "attention" in parts:
        result["attention"] = time_attention(args.model, [int(n) for n in args.cache_lengths.split(",")],
                                             [int(n) for n in args.attention_batches.split(",")], args.reps,
                                             args.pass_gb, bandwidth, sweep=args.attention_sweep)
    if "batched" in parts:
        result["batched_products"] = time_batched_products(
            args.model, [int(b) for b in args.product_batches.split(",")], args.reps, args.pass_gb, bandwidth)
    step = {}
    for method in ("cublas", "triton", "triton_fused", "triton_best", "inductor", "inductor_tuned"):
        cells = [(e.get(method), e["uses_per_step"]) for e in result["shapes"].values()]
        if cells and all(c and "us" in c for c, _ in cells):
            step[method] = step_total_ms((c["us"], uses) for c, uses in cells)
    # The folded products with each norm where it is faster: in the product or in its own launch.
    cells = [(min(e[m]["us"] for m in ("triton_fused", "triton_prenormed") if "us" in e.get(m, {})), e["uses_per_step"])
             for e in result["shapes"].values() if "us" in e.get("triton_fused", {})]
    if cells and len(cells) == len(result["shapes"]):
        step["triton_fused_norm_where_faster"] = step_total_ms(cells)
    sweeps = [(e.get("sweep", {}), e["uses_per_step"]) for e in result["shapes"].values()]
    if sweeps and all(sweep for sweep, _ in sweeps):
        configs = set.intersection(*({c for c, v in sweep.items() if "us" in v} for sweep, _ in sweeps))
        result["fused_step_ms_by_config"] = dict(sorted(
            ((c, step_total_ms((sweep[c]["us"], uses) for sweep, uses in sweeps)) for c in configs),
            key=lambda item: item[1]))
    total_bytes = sum(n * k * 2 * uses for (n, k), uses in shapes(args.model).values())
    result["step_ms"] = step
    result["step_floor_ms"] = round(total_bytes / bandwidth * 1000, 3)
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    print("step (ms):", step, "floor", result["step_floor_ms"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
