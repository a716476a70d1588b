"""Does the fast hf decode (`decode: graph`) answer exactly as plain `generate`, on a trained model?

`benchmarks/latency.py` checks the fast path on random weights, where greedy decoding is a run of
near-ties: two correct implementations part ways after a few tokens, so only the first step's
logits can be compared there. A trained model has margins, so here the comparison is the whole
answer: the demo's trained tiny model over the demo eval set, through both engines of the hf
backend in the same process, once per dtype. A record is equal when both answers have the same
text and the same number of tokens. What we require: every record in float32, and at least 99 %
in bfloat16, where the two paths' different kernels (batched prompt pass with other padding, fused
weights, graph-replayed steps) may round a near-tie differently.

With `--own-spread` the record also holds the yardstick for a low-precision dtype: how often
`generate` in that dtype answers as `generate` in float32 does (the model's own rounding spread),
and how often the fast decode in that dtype does. A fast path no further from float32 than
`generate` is adds no error of its own.

    python -m benchmarks.decode_equality --model-dir results/checkpoints/tiny/sft \\
        --splits resources/hub/egm-demo/EGM_Datasets/metadata/eval/*.jsonl --image-root resources/images \\
        --out benchmarks/results/decode-equality-h200.json        # on a GPU, after `make demo`
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.common import device_label
from egm.data.splits import load_split
from egm.grounding import build_prompt
from egm.infer.base import Request
from egm.infer.engine import load_engine
from egm.io import write_json
from egm.options import SamplingOptions

REPO = Path(__file__).resolve().parents[1]
REQUIRED_SHARE = {"float32": 1.0, "bfloat16": 0.99}
SHOWN_DIFFERENCES = 20


def eval_requests(split_files: list[str], image_root: str, prompt: str, limit: int | None) -> list[tuple[str, Request]]:
    out = []
    for path in split_files:
        split = load_split(Path(path), image_root, limit=limit)
        name = Path(path).name.removesuffix(".jsonl")
        out += [(name, Request(str(rec.id), rec.image_path, build_prompt(prompt, rec.sent))) for rec in split.records]
    return out


def answer(decode: str, model_dir: str, sampling: SamplingOptions, requests: list[Request], options: dict):
    engine = load_engine("hf", model_dir, sampling, {**options, "decode": decode, "data_parallel_size": 1})
    try:
        t0 = time.perf_counter()
        completions = engine.generate(requests)
        return completions, time.perf_counter() - t0
    finally:
        engine.close()


def compare(labelled: list[tuple[str, Request]], reference, fast) -> dict:
    differences = []
    for (split, req), a, b in zip(labelled, reference, fast):
        if a.text != b.text or a.completion_tokens != b.completion_tokens:
            at = next((i for i, (x, y) in enumerate(zip(a.text, b.text)) if x != y), min(len(a.text), len(b.text)))
            differences.append({"split": split, "id": req.id, "first_difference_at_char": at,
                                "generate": {"text": a.text, "tokens": a.completion_tokens},
                                "graph": {"text": b.text, "tokens": b.completion_tokens}})
    n = len(labelled)
    return {"records": n, "equal": n - len(differences), "share_equal": (n - len(differences)) / n if n else None,
            "differing": len(differences), "differences": differences[:SHOWN_DIFFERENCES]}


def named_model_dir(path: str) -> str:
    """The model directory as a record names it: relative to the repository where it lies inside
    it, else its own name (a record holds no machine's paths)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else resolved.name


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--splits", nargs="+", required=True, help="eval JSONL files")
    parser.add_argument("--image-root", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--prompt", default="qwen3", help="prompt template (egm.grounding.PROMPTS)")
    parser.add_argument("--max-tokens", type=int, default=128, help="the demo config's inference.max_tokens")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--limit", type=int, default=None, help="records per split")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--own-spread", action="store_true",
                        help="also compare each non-float32 dtype's answers with float32 generate's")
    args = parser.parse_args(argv)

    import torch
    import transformers

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    labelled = eval_requests(args.splits, args.image_root, args.prompt, args.limit)
    requests = [req for _, req in labelled]
    sampling = SamplingOptions(max_tokens=args.max_tokens)
    result = {
        "benchmark": "decode_equality", "device": device_label(device), "torch": torch.__version__,
        "transformers": transformers.__version__, "model_dir": named_model_dir(args.model_dir),
        "splits": len(args.splits),
        "max_tokens": args.max_tokens, "batch_size": args.batch_size, "dtypes": {},
    }
    ok = True
    float32 = None
    for dtype in args.dtypes.split(","):
        options = {"dtype": dtype, "device": device, "batch_size": args.batch_size}
        reference, generate_s = answer("generate", args.model_dir, sampling, requests, options)
        fast, graph_s = answer("graph", args.model_dir, sampling, requests, options)
        entry = compare(labelled, reference, fast)
        if args.own_spread and dtype != "float32":
            if float32 is None:
                float32, _ = answer("generate", args.model_dir, sampling, requests, {**options, "dtype": "float32"})
            entry["own_spread"] = {
                "generate_vs_float32_generate": compare(labelled, float32, reference)["equal"],
                "graph_vs_float32_generate": compare(labelled, float32, fast)["equal"],
            }
        elif dtype == "float32":
            float32 = reference
        entry.update(required_share=REQUIRED_SHARE.get(dtype), generate_s=round(generate_s, 2),
                     graph_s=round(graph_s, 2), tokens=sum(c.completion_tokens for c in reference))
        entry["meets_requirement"] = entry["required_share"] is None or entry["share_equal"] >= entry["required_share"]
        ok &= entry["meets_requirement"]
        result["dtypes"][dtype] = entry
        print(f"{dtype}: {entry['equal']}/{entry['records']} records equal "
              f"(generate {entry['generate_s']} s, graph {entry['graph_s']} s)"
              + (f"; equal to float32 generate: {entry['own_spread']}" if "own_spread" in entry else ""), flush=True)
        write_json(args.out, result)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
