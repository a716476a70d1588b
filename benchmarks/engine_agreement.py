"""How much does the engine move the answers? The authors' protocol against our other engines.

The paper's records were answered through an OpenAI-compatible server (SGLang, 64 requests in
flight; vLLM's server is their other script). Greedy decoding through other kernels and batching
can take another path at a near-tie, so a reproduction that answers offline is not the same
experiment. This measures by how much, on the demo's trained SFT model (float32: a model of
hidden size 128 turns bf16 rounding into other digits) over the demo eval set, every answer
through the pipeline's own predict command (`python -m egm predict`, as the predict rule runs it):

- `server`: backend server with vLLM's server (the protocol's code path: the server started by
  the job, the authors' request body, 64 in flight). SGLang is the authors' engine but cannot run
  on the lent GPU machines: every SGLang the registry serves pins a torch the image does not have,
  and a second CUDA stack does not fit what a command may carry.
- `vllm`: backend vllm, offline (vLLM's LLM class, batches of 64).
- `hf`: backend hf with the fast graph decode.

For each pair: the share of records with equal parsed boxes and with equal texts. Then a server
stopped mid-split: the 512 records as one split, the server's process group killed once ~200
answers are in; the job must fail naming the server and what it saw, and its rerun must answer
exactly the records that were missing (none lost, none answered twice).

    python -m benchmarks.engine_agreement --model-dir results/checkpoints/tiny/sft \\
        --splits resources/hub/egm-demo/EGM_Datasets/metadata/eval/*.jsonl --image-root resources/images \\
        --work /tmp/egm-agreement --out benchmarks/results/engine-agreement-h100.json [--steps server,vllm,hf,kill]

On the GPU machine the model is trained there first (`--steps sft,...` with `--model-dir
/tmp/egm-agreement/sft`, the demo's SFT on the GPU: 1500 steps of the demo recipe take seconds
there and most of an hour on a loaded 2-core machine):

    ... --steps sft,server,vllm --model-dir /tmp/egm-agreement/sft --sft-base resources/models/tiny-base \
        --sft-base-manifest resources/manifests/model-tiny-base.json --sft-inputs resources/manifests/dataset.json \
        --sft-data resources/hub/egm-demo/EGM_Datasets/vanilla_grounding_reasoning_training_dataset_raw.jsonl

Steps already done in `--work` are not run again, so the steps may be spread over several calls;
every call ends by writing the record of what is done so far.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.agreement import engine_agreement
from egm.io import read_json, write_json

ENGINES = {
    "server": {"backend": "server", "engine_options": {"server": "vllm", "dtype": "float32", "enforce_eager": True,
                                                         "data_parallel_size": 1}},
    "vllm": {"backend": "vllm", "engine_options": {"dtype": "float32", "enforce_eager": True, "data_parallel_size": 1}},
    "hf": {"backend": "hf", "engine_options": {"dtype": "float32", "decode": "graph", "data_parallel_size": 1}},
}
# config/gpu-smoke.yaml's decoding: the paper's, with the demo answers' length cap.
INFERENCE = {"max_tokens": 192, "temperature": 0.0, "top_p": 1.0, "top_k": 20, "repetition_penalty": 1.0,
             "presence_penalty": 0.0, "batch_size": 64, "limit": None}
PAIRS = (("server", "vllm"), ("server", "hf"), ("vllm", "hf"))
KILL_AFTER = 200  # answers in before the server is stopped (of 512, with 64 in flight)
STEP_TIMEOUT_S = 420
# A step is started only with this much of --budget-s left (a device call must end on its own,
# record written): the longest, the killed server and its rerun, takes two server starts.
STEP_NEEDS_S = {"sft": 120, "server": 150, "vllm": 150, "hf": 120, "kill": 200}


def predict_command(model_dir: str, manifest: Path, splits: list[str], image_root: str, out_dir: Path,
                    engine: str) -> list[str]:
    options = {"prompt": "qwen3", "gpus": 1 if torch_cuda() else 0, "inference": INFERENCE, **ENGINES[engine]}
    return [sys.executable, "-m", "egm", "predict", "--model-dir", model_dir, "--model-manifest", str(manifest),
            "--splits", *splits, "--image-root", image_root, "--out-dir", str(out_dir), "--options",
            json.dumps(options), "--model", f"tiny-sft-{engine}", "--run-record", str(out_dir / "run.json")]


def summaries(log_text: str) -> list[dict]:
    """predict's per-split summaries, one `done: {...}` line each in its log."""
    return [json.loads(m) for m in re.findall(r"done: (\{.*\})", log_text)]


def run_logged(cmd: list[str], log: Path, cwd: Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    with open(log, "ab") as handle:
        code = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=cwd, timeout=STEP_TIMEOUT_S).returncode
    return code, time.perf_counter() - t0


def step_answer(engine: str, args, work: Path) -> dict:
    out = work / f"pred-{engine}"
    out.mkdir(parents=True, exist_ok=True)
    log = work / f"pred-{engine}.log"
    code, wall = run_logged(predict_command(args.model_dir, work / "model.json", args.splits, args.image_root, out,
                                             engine), log, work)
    done = summaries(log.read_text(errors="replace"))
    return {"rc": code, "wall_s": round(wall, 1), "records": sum(s["records"] for s in done),
            "answer_s": round(sum(s["answer_s"] for s in done), 2),
            "engine_load_s": round(sum(s["engine_load_s"] for s in done), 2),
            "protocol": (read_json(out / "run.json").get("job", {}).get("engine") if (out / "run.json").exists() else None)}


def step_sft(args, work: Path) -> dict:
    """The demo's SFT of the tiny model, as the `sft` rule runs it (demo recipe, 1500 steps), on the
    GPU: the model the engines are compared on, trained where it takes seconds."""
    from egm.train.recipes import resolve_recipe

    recipe = resolve_recipe("config/recipes/demo_sft.yaml", {}, Path(__file__).resolve().parents[1])
    options = {"run": "tiny", "recipe": recipe, "max_steps": args.sft_steps, "limit": None}
    out = work / "sft"
    gpus = "1" if torch_cuda() else "0"
    cmd = [sys.executable, "-m", "egm", "sft", "--model-dir", args.sft_base, "--model-manifest", args.sft_base_manifest,
           "--data", args.sft_data, "--image-root", args.image_root, "--inputs", args.sft_inputs,
           "--out-dir", str(out), "--manifest", str(work / "sft.json"), "--work-dir", str(work / ".work-sft"),
           "--options", json.dumps(options), "--gpus", gpus]
    code, wall = run_logged(cmd, work / "sft.log", work)
    return {"rc": code, "wall_s": round(wall, 1), "options": options}


def work_lines(out: Path) -> int:
    return sum(p.read_bytes().count(b"\n") for p in (out / ".work").glob("*.jsonl")) if (out / ".work").exists() else 0


def step_kill(args, work: Path) -> dict:
    """All records as one split; the server killed mid-split; the rerun answers only what is missing."""
    split = work / "kill" / "refcoco_val.jsonl"
    split.parent.mkdir(parents=True, exist_ok=True)
    lines = [line for path in args.splits for line in Path(path).read_text().splitlines() if line.strip()]
    split.write_text("\n".join(lines) + "\n")
    out = work / "pred-kill"
    shutil.rmtree(out, ignore_errors=True)  # a fresh run: every answer comes from this step's server
    cmd = predict_command(args.model_dir, work / "model.json", [str(split)], args.image_root, out, "server")
    log = work / "pred-kill.log"
    server_logs = work / "logs" / "server"
    with open(log, "ab") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=work)
        deadline = time.monotonic() + STEP_TIMEOUT_S
        killed_at = None
        while proc.poll() is None and time.monotonic() < deadline:
            answered = work_lines(out)
            pids = list(server_logs.glob("*.pid")) if server_logs.exists() else []
            if answered >= KILL_AFTER and pids:
                os.killpg(int(pids[0].read_text()), signal.SIGKILL)
                killed_at = answered
                break
            time.sleep(0.01)
        first_rc = proc.wait(timeout=120)
    first_log = log.read_text(errors="replace")
    answered_before = work_lines(out)
    error = [line for line in first_log.splitlines() if "ERROR" in line or "went away" in line][-3:]
    rerun_code, rerun_wall = run_logged(cmd, work / "pred-kill-rerun.log", work)
    rerun = summaries((work / "pred-kill-rerun.log").read_text(errors="replace"))
    final = [json.loads(line) for line in (out / "refcoco_val.jsonl").read_text().splitlines()] if rerun_code == 0 else []
    total = len(lines)
    return {
        "records": total, "killed_after_answers": killed_at, "first_run_rc": first_rc,
        "first_run_error": error, "answered_before_kill": answered_before,
        "rerun_rc": rerun_code, "rerun_wall_s": round(rerun_wall, 1),
        "rerun_newly_answered": sum(s["newly_answered"] for s in rerun),
        "work_file_lines_after_rerun": work_lines(out),
        "final_records": len(final), "final_distinct_lines": len({row["line"] for row in final}),
        "none_lost": len(final) == total and {row["line"] for row in final} == set(range(1, total + 1)),
        "none_answered_twice": work_lines(out) == total and sum(s["newly_answered"] for s in rerun) == total - answered_before,
    }


def kill_agreement(work: Path) -> dict | None:
    """The killed-and-resumed answers against the uninterrupted server run's, record by record."""
    out = work / "pred-kill" / "refcoco_val.jsonl"
    if not out.exists():
        return None
    resumed = {row["image"] + "|" + row["sent"] + "|" + json.dumps(row["bbox"]): row
               for row in map(json.loads, out.read_text().splitlines()) if row.get("status") == "ok"}
    whole = {}
    for path in sorted((work / "pred-server").glob("*.jsonl")):
        for row in map(json.loads, path.read_text().splitlines()):
            if row.get("status") == "ok":
                whole[row["image"] + "|" + row["sent"] + "|" + json.dumps(row["bbox"])] = row
    both = resumed.keys() & whole.keys()
    return {"compared": len(both), "equal_text": sum(resumed[k]["answer"] == whole[k]["answer"] for k in both),
            "equal_boxes": sum(resumed[k]["parsed_box"] == whole[k]["parsed_box"] for k in both)}


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def device() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "unknown"


def versions() -> dict:
    from egm.provenance import package_version

    return {name: package_version(name) for name in ("vllm", "torch", "transformers", "egm")}


def record(args, work: Path) -> dict:
    status = {p.stem: read_json(p) for p in sorted((work / "status").glob("*.json"))}
    split_names = [Path(p).name.removesuffix(".jsonl") for p in args.splits]
    pairs = {}
    for a, b in PAIRS:
        if status.get(a, {}).get("rc") == 0 and status.get(b, {}).get("rc") == 0:
            result = engine_agreement(work / f"pred-{a}", work / f"pred-{b}", split_names, max_listed=10)
            pairs[f"{a} vs {b}"] = {k: result[k] for k in ("records", "both_answered", "equal_boxes",
                                                           "share_equal_boxes", "equal_text", "differing")}
            pairs[f"{a} vs {b}"]["share_equal_text"] = result["equal_text"] / result["records"] if result["records"] else None
            pairs[f"{a} vs {b}"]["differences"] = result["differences"]
    return {
        "what": "the demo SFT model's eval set through egm predict: vLLM's server (the protocol's code path), "
                "vLLM offline, hf graph decode; float32; then a server stopped mid-split and the rerun",
        "device": device(), "versions": versions(), "model_dir": args.model_dir, "splits": split_names,
        "inference": INFERENCE, "engines": ENGINES, "steps": status, "agreement": pairs,
        "kill_rerun_against_uninterrupted": kill_agreement(work),
        "sglang": "not run: every SGLang the registry serves pins a torch the GPU machine's image does not have",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--splits", nargs="+", required=True)
    parser.add_argument("--image-root", required=True)
    parser.add_argument("--work", default="/tmp/egm-agreement")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", default="server,vllm,hf,kill")
    parser.add_argument("--budget-s", type=float, default=0, help="seconds this call may take (0: no limit)")
    # The `sft` step (the demo's SFT on the GPU, its output then being --model-dir).
    parser.add_argument("--sft-base", help="the untrained tiny model's directory")
    parser.add_argument("--sft-base-manifest")
    parser.add_argument("--sft-data", help="the demo's SFT JSONL")
    parser.add_argument("--sft-inputs", help="the data set's fetch manifest")
    parser.add_argument("--sft-steps", type=int, default=1500, help="config/demo.yaml's SFT steps")
    args = parser.parse_args()
    started = time.monotonic()
    for name in ("model_dir", "image_root", "sft_base", "sft_base_manifest", "sft_data", "sft_inputs"):
        if getattr(args, name):
            setattr(args, name, str(Path(getattr(args, name)).resolve()))
    args.splits = [str(Path(p).resolve()) for p in args.splits]
    work = Path(args.work)
    (work / "status").mkdir(parents=True, exist_ok=True)
    if not (work / "model.json").exists():
        (work / "model.json").write_text(json.dumps({"model_dir": args.model_dir}))
    for step in [s for s in args.steps.split(",") if s]:
        status = work / "status" / f"{step}.json"
        if status.exists() and read_json(status).get("rc") == 0 or (step == "kill" and status.exists()):
            print(f"{step}: done before", flush=True)
            continue
        left = args.budget_s - (time.monotonic() - started)
        if args.budget_s and left < STEP_NEEDS_S[step]:
            print(f"{step}: skipped, {left:.0f} s left of the call's budget", flush=True)
            continue
        print(f"== {time.strftime('%T')} {step}", flush=True)
        result = (step_kill(args, work) if step == "kill" else step_sft(args, work) if step == "sft"
                  else step_answer(step, args, work))
        if step == "kill":
            result["rc"] = 0 if result["none_lost"] and result["none_answered_twice"] else 1
        write_json(status, result)
        print(json.dumps({k: v for k, v in result.items() if k != "protocol"}), flush=True)
    write_json(args.out, record(args, work))
    print(f"record: {args.out}", flush=True)


if __name__ == "__main__":
    main()
