"""One job's price: GPU-seconds, wall time on its GPUs, and whether its model fits, from the
committed measurement records (benchmarks/results/*.json), scaled to the named card by its
published figures (egm.plan.gpus).

Every estimate carries `sources` (record and measurement it comes from) and `assumptions` (what
was not measured and taken instead). A job with nothing measured behind it gets no number and
says so (`unpriced`) rather than a quiet guess.

The regimes, and what each misses:
- predict / scaling / latency: per request at the protocol's concurrency, one engine replica per
  GPU (data parallel), from the latency records' batch-64 runs (the nearest measured regime to
  64 requests in flight): T64(n) = fixed + n x per_token, n the expected tokens per answer. A
  job's time = its engine load + records / 64 x T64(n) per replica (a predict job: one batch
  more, its untimed warm-up); egm's hf engine load = the record's model build + its compiled
  method's largest warm-up (compile and capture). Tensor parallel (the 235B)
  divides a request's work by the TP degree (perfect scaling assumed: optimistic).
- sft: seconds per trained token x parameter count, from a measured run of another model size;
  compute-bound, so scaled by bf16 throughput. N GPUs divide the work (perfect scaling assumed;
  the two-GPU ZeRO-3 record shows it is not: its speedup is named as a source).
- rl (GRPO): seconds per generated rollout token x parameter count, from the measured GRPO steps
  (rollouts by transformers' generate: the vLLM rollouts of the paper recipe are faster, so this
  is a high estimate).
- CPU jobs (data, scoring, reports) cost no GPU time; the scoring record prices `score`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from egm.plan.gpus import ACTIVE_235B, BF16_BYTES, HEADROOM, TOTAL_235B, find_gpu, gpu_of, predict_ms, split_costs

RECORDS_DIR = Path("benchmarks/results")
GPU_RULES = ("predict", "scaling", "scaling_single_point", "latency", "sft", "rl")
PROTOCOL_BATCH = 64  # the latency records' batch closest to the paper's 64 requests in flight
LAYOUTS = (1, 2, 4, 8, 16, 32)  # GPU counts tried for the smallest layout that fits

# The RefCOCO/+/g evaluation splits' sizes (referring expressions) as published with the data
# sets (RefCOCO and RefCOCO+: Yu et al. 2016, UNC splits; RefCOCOg: Mao et al. 2016, UMD split).
PUBLISHED_SPLIT_SIZES = {
    "refcoco_val": 10834, "refcoco_testA": 5657, "refcoco_testB": 5095,
    "refcoco+_val": 10758, "refcoco+_testA": 5726, "refcoco+_testB": 4889,
    "refcocog_val": 4896, "refcocog_test": 5023,
}
# Qwen3-VL-235B-A22B's language model: 94 layers, 4 KV heads of 128 (its config.json).
KV_BYTES_235B = 94 * 4 * 128 * 2 * BF16_BYTES
PAPER_DATASET = "JamesZGQ/EGM_Datasets"  # the data set those sizes are of
SFT_SAMPLES_PAPER = 570_000  # EGM.md section 4: "about 4450 steps (about 570k samples with flips)"


@dataclass
class Estimate:
    gpus: int  # GPUs the job asks for
    gpu_seconds: float | None = None
    wall_s: float | None = None  # on its own `gpus` GPUs
    drivers: dict = field(default_factory=dict)  # what the cost scales with
    memory: dict = field(default_factory=dict)  # per-GPU need, fits, smallest layout that fits
    sources: list[str] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)
    unpriced: str | None = None  # why there is no number


class CostModel:
    """Prices jobs on `gpu` (a gpus.json row) from the records under `records_dir`."""

    def __init__(self, gpus: dict, gpu: str, records_dir: Path = RECORDS_DIR, workdir: Path = Path("."),
                 n_gpus: int | None = None):
        self.gpus = gpus
        # The run's GPUs: a job asking for more gets these, and its memory is checked on them.
        self.n_gpus = n_gpus
        self.gpu_name = find_gpu(gpu, gpus)
        self.gpu = gpus[self.gpu_name]
        self.records_dir = Path(records_dir)
        self.workdir = Path(workdir)
        self.latency = self._latency_costs()
        self.train = self._read("train-h100.json")
        self.multigpu = self._read("multigpu-h200x2.json")
        self.cpu = self._read("load-cpu-2core.json")

    # Records.

    def _read(self, name: str) -> dict | None:
        path = self.records_dir / name
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not JSON ({err})") from err

    def _latency_costs(self) -> list[dict]:
        """(record, method, batch, architecture) -> the split costs, every latency record. A card's
        own record (latency-<card>.json, the newest) comes before the older ones kept for what it
        did not run (latency-sizes-h100.json: the 2B and 4B), so `_pick` takes its numbers first."""
        out = []
        paths = self.records_dir.glob("latency-*.json")
        for path in sorted(paths, key=lambda p: (p.stem.count("-") > 1, p.name)):
            record = json.loads(path.read_text())
            card = gpu_of(record, self.gpus)
            for method in sorted({r["method"] for e in record["models"].values() for r in e["runs"]}):
                for batch in (1, PROTOCOL_BATCH):
                    for arch, costs in split_costs(record, method, batch).items():
                        out.append({"record": path.name, "card": card, "method": method, "batch": batch,
                                    "arch": arch, "costs": costs, "entry": record["models"][arch]})
        return out

    def _pick(self, arch: str, batch: int, serving: bool) -> dict | None:
        """The measurement nearest the job: a serving engine's (vllm) for a serving backend, else
        egm's compiled decode; on this card if measured there, else the first card that has it."""
        methods = ("vllm", "graph_compiled") if serving else ("graph_compiled", "vllm")
        for method in methods:
            hits = [c for c in self.latency if c["arch"] == arch and c["batch"] == batch and c["method"] == method]
            if hits:
                return next((c for c in hits if c["card"] == self.gpu_name), hits[0])
        return None

    # Model facts.

    @staticmethod
    def architecture(params_b: float) -> str | None:
        """The measured architecture a model runs as, by its size (config `params_b`)."""
        if params_b >= 100:
            return "qwen3-vl-235b-a22b"
        for arch, low in (("qwen3-vl-8b", 6), ("qwen3-vl-4b", 3), ("qwen3-vl-2b", 1.5)):
            if params_b >= low:
                return arch
        return None

    def expected_tokens(self, model: str, entry: dict, cap: int) -> tuple[float, str]:
        """Tokens per answer: the paper's where it states them, else our own predictions of this
        model where they exist, else assumed (the paper's closest figure, or the cap)."""
        from egm.report.paper import MEAN_COMPLETION_TOKENS

        paper = entry.get("paper") or ""
        if paper == "EGM-8B":
            return MEAN_COMPLETION_TOKENS["EGM-8B"], "paper: EGM-8B about 101 tokens per answer"
        for size in ("8B", "235B-A22B"):
            key = f"Qwen3-VL-{size} (without EGM)"
            if paper.startswith(f"Qwen3-VL-{size}") and key in MEAN_COMPLETION_TOKENS:
                return MEAN_COMPLETION_TOKENS[key], f"paper: the {size} without EGM about 42 tokens (variant not named)"
        own = self._own_tokens(model)
        if own is not None:
            return own
        if paper.startswith("EGM") or "sft" in model or "rl" in model.split("-")[-1:]:
            return min(cap, MEAN_COMPLETION_TOKENS["EGM-8B"]), "assumed: EGM-8B's 101 tokens (paper)"
        if paper.startswith("Qwen3-VL"):
            return min(cap, MEAN_COMPLETION_TOKENS["Qwen3-VL-8B (without EGM)"]), "assumed: the 8B without EGM's 42"
        return float(cap), f"assumed: the max_tokens cap ({cap}), an upper bound"

    def _own_tokens(self, model: str) -> tuple[float, str] | None:
        folder = self.workdir / "results" / "predictions" / model
        total = count = 0
        for path in sorted(folder.glob("*.jsonl")):
            for line in path.read_text().splitlines():
                row = json.loads(line)
                if row.get("completion_tokens") is not None:
                    total += row["completion_tokens"]
                    count += 1
        if not count:
            return None
        return total / count, f"our predictions: results/predictions/{model} ({count} answers)"

    def split_records(self, config: dict) -> tuple[int | None, str]:
        """Records of the configured eval splits: the demo's count, the fetched split files, or
        the published sizes."""
        splits = config["splits"]
        if "demo" in config:
            n = config["demo"]["n_eval_per_split"]
            return n * len(splits), f"config demo.n_eval_per_split ({n} x {len(splits)} splits)"
        # The fetched data set, else the offline mirror it will be fetched from.
        mirror = config.get("hub", {}).get("mirror")
        roots = [self.workdir / "resources" / "hub"] + ([self.workdir / mirror] if isinstance(mirror, str) else [])
        for root in roots:
            folder = root / config["dataset"]["repo_id"] / "metadata" / "eval"
            files = [folder / f"{s}.jsonl" for s in splits]
            if all(f.exists() for f in files):
                n = sum(1 for f in files for line in f.read_text().splitlines() if line.strip())
                return n, f"the split files ({folder.relative_to(self.workdir)})"
        if config["dataset"]["repo_id"] != PAPER_DATASET or any(s not in PUBLISHED_SPLIT_SIZES for s in splits):
            return None, f"records unknown: the split files of {config['dataset']['repo_id']} are not here yet"
        return sum(PUBLISHED_SPLIT_SIZES[s] for s in splits), "published RefCOCO/+/g split sizes"

    # Memory.

    def memory(self, arch: str, entry: dict | None, concurrency: int, tokens: float, tp: int) -> dict:
        """Per GPU: bf16 weights (with the projection's 20 % room) / TP + the KV cache of
        `concurrency` sequences of prompt + answer; the smallest TP degree that fits."""
        big = arch == "qwen3-vl-235b-a22b"
        parameters = TOTAL_235B if big else entry["parameters"]
        kv = KV_BYTES_235B if big else entry.get("kv_bytes_per_position", 36 * 8 * 128 * 2 * BF16_BYTES)
        prompt = entry.get("prompt_tokens", 336) if entry else 336
        cache = kv * concurrency * (prompt + tokens)
        card = self.gpu["memory_gb"] * 1e9

        def need(n):
            return (parameters * BF16_BYTES * HEADROOM + cache) / n

        smallest = next((n for n in LAYOUTS if need(n) <= card), None)
        return {"per_gpu_gb": round(need(tp) / 1e9, 1), "card_gb": self.gpu["memory_gb"], "fits": need(tp) <= card,
                "smallest_tensor_parallel": smallest, "kv_cache_gb": round(cache / 1e9, 2)}

    def training_memory(self, parameters: float, gpus: int) -> dict:
        """ZeRO-3 shards: bf16 weights and gradients plus fp32 master weights and Adam's two
        moments (16 bytes a parameter) over the GPUs, plus the activations the measured run
        needed beyond its own 16 bytes a parameter."""
        card = self.gpu["memory_gb"] * 1e9
        act = 0.0
        if self.train:
            measured = self.train["sft"]["peak_gpu_mem_gib"] * 2**30
            act = max(0.0, measured - 16 * self.train["params"])

        def need(n):
            return 16 * parameters / n + act

        n = max(gpus, 1)
        smallest = next((k for k in LAYOUTS if need(k) <= card), None)
        return {"per_gpu_gb": round(need(n) / 1e9, 1), "card_gb": self.gpu["memory_gb"], "fits": need(n) <= card,
                "smallest_zero3_gpus": smallest}

    def _at_most(self, gpus: int) -> int:
        return min(gpus, self.n_gpus) if self.n_gpus else gpus

    # Jobs.

    def estimate(self, job, config: dict) -> Estimate:
        rule = job.rule
        if rule not in GPU_RULES:
            return self._cpu_job(job, config)
        est = Estimate(gpus=job.gpus)
        if job.gpus == 0:
            return self._model_job_on_cpu(job, config, est)
        if rule in ("sft", "rl"):
            return self._training(job, config, est)
        return self._inference(job, config, est)

    def _cpu_job(self, job, config: dict) -> Estimate:
        est = Estimate(gpus=0, gpu_seconds=0.0)
        if job.rule == "score" and self.cpu:
            n, how = self.split_records(config)
            if n is None:
                est.unpriced = how
                return est
            per_split = n / len(config["splits"])
            rate = self.cpu["score"]["records_per_s"]
            est.wall_s = self.cpu["python_startup_s_median"] + per_split / rate
            est.drivers = {"records": round(per_split)}
            est.sources = [f"load-cpu-2core.json: score {rate:.0f} records/s (2-core CPU)", how]
        else:
            est.unpriced = "CPU job: no GPU time; its wall time is not modelled"
        return est

    def _model_job_on_cpu(self, job, config: dict, est: Estimate) -> Estimate:
        """A model job with gpus: 0 (the demo): answers priced by the CPU decode record of the
        demo's tiny model (seconds per generated token, float32 `generate`); training has no CPU
        record."""
        record = self._read("decode-equality-cpu.json")
        model = job.wildcards.get("model")
        entry = self._model_entry(config, model) if model else {}
        if job.rule not in ("predict", "scaling", "scaling_single_point") or record is None or \
                self.architecture(entry.get("params_b") or 0) is not None:
            est.unpriced = "a model job on the CPU (gpus: 0) with no CPU record of its kind"
            return est
        run = record["dtypes"]["float32"]
        per_token_s = run["generate_s"] / run["tokens"]
        options = job.params.get("options") or {}
        cap = (options.get("inference") or {}).get("max_tokens") or config["inference"]["max_tokens"]
        tokens, tokens_from = self.expected_tokens(model, entry, cap)
        if job.rule == "predict":
            records, records_from = self.split_records(config)
            if records is None:
                est.unpriced = records_from
                return est
            answers = records * tokens
        else:
            scaling = options.get("scaling") or config.get("scaling") or {}
            records = scaling.get("n_per_split", 1) * len(config["splits"])
            records_from = "scaling.n_per_split"
            answer = scaling.get("answer_max_tokens", cap)
            budgets = scaling.get("budgets", ["unlimited"]) if job.rule == "scaling" else ["unlimited"]
            answers = records * sum(tokens if b in ("unlimited", None) else min(int(b), tokens) + min(answer, tokens)
                                    for b in budgets)
        est.gpu_seconds = 0.0
        est.wall_s = answers * per_token_s
        est.drivers = {"records": records, "tokens_per_answer": round(tokens, 1), "tokens": round(answers)}
        est.sources = [f"decode-equality-cpu.json: float32 generate {run['generate_s']} s for {run['tokens']} tokens "
                       f"of the tiny model at batch {record['batch_size']} ({1000 * per_token_s:.2f} ms a token, "
                       f"{record['device']})", records_from]
        est.assumptions = [f"tokens per answer {tokens:.0f}: {tokens_from}",
                           "the job's batch and decode path cost what the record's did; model load and process "
                           "start not included"]
        return est

    def _model_entry(self, config: dict, model: str) -> dict:
        models = config["models"]
        if model in models:
            return models[model]
        for run, spec in config["train"]["runs"].items():
            for stage in ("sft", "rl"):
                if model == f"{run}-{stage}":
                    return {**models[spec["base"]], "paper": spec[stage].get("paper"), "trained": True}
        raise ValueError(f"model {model!r} is neither in models: nor a training run's")

    def _inference(self, job, config: dict, est: Estimate) -> Estimate:
        model = job.wildcards["model"]
        entry = self._model_entry(config, model)
        options = job.params.get("options") or {}
        arch = self.architecture(entry.get("params_b") or 0)
        if arch is None:
            est.unpriced = f"no latency record of a model this size ({entry.get('params_b')}B)"
            return est
        big = arch == "qwen3-vl-235b-a22b"
        measured_arch = "qwen3-vl-8b" if big else arch
        backend = options.get("backend", "hf")
        engine = options.get("engine_options") or {}
        serving = backend in ("vllm", "sglang", "server")
        tp = int(engine.get("tensor_parallel_size") or 1)
        replicas = max(1, job.gpus // tp)
        cap = (options.get("inference") or {}).get("max_tokens") or config["inference"]["max_tokens"]
        tokens, tokens_from = self.expected_tokens(model, entry, cap)
        picked = self._pick(measured_arch, PROTOCOL_BATCH, serving)
        if picked is None:
            est.unpriced = f"no batch-{PROTOCOL_BATCH} latency record of {measured_arch}"
            return est
        base = self.gpus[picked["card"]]
        scale = (ACTIVE_235B / picked["costs"]["llm_parameters"]) / tp if big else 1.0 / tp

        def request_ms(n):  # one request of a full batch of 64 in flight, one replica
            return predict_ms(picked["costs"], base, self.gpu, n, scale)

        concurrency = PROTOCOL_BATCH
        if job.rule == "latency":
            lat = options.get("latency") or {}
            n_req, b1 = lat.get("n", 0) + lat.get("warmup", 0), lat.get("batch1_n", 0)
            concurrency = lat.get("concurrency", PROTOCOL_BATCH)
            one = self._pick(measured_arch, 1, serving)
            b1_ms = predict_ms(one["costs"], self.gpus[one["card"]], self.gpu, tokens, scale) if one else 0.0
            # The protocol's requests go out `concurrency` at a time over the job's replicas.
            work_s = n_req / PROTOCOL_BATCH * request_ms(tokens) / 1000 / replicas + b1 * b1_ms / 1000
            est.drivers = {"requests": n_req, "batch1_requests": b1, "tokens_per_answer": round(tokens, 1)}
            if one:
                est.sources.append(f"{one['record']}: {one['method']} batch 1 on {one['card']}")
            if replicas > 1:
                est.assumptions.append(f"{concurrency} requests in flight over {replicas} replicas, each request "
                                       f"priced at the batch-{PROTOCOL_BATCH} figure (high: a replica holds fewer)")
        elif job.rule in ("scaling", "scaling_single_point"):
            scaling = options.get("scaling") or config.get("scaling") or {}
            n_per = scaling.get("n_per_split")
            records, records_from = (n_per * len(config["splits"]), "scaling.n_per_split") if n_per else \
                self.split_records(config)
            if records is None:
                est.unpriced = records_from
                return est
            budgets = scaling.get("budgets", ["unlimited"]) if job.rule == "scaling" else ["unlimited"]
            answer = scaling.get("answer_max_tokens", cap)
            work_ms = 0.0
            for b in budgets:
                if b == "unlimited" or b is None:
                    work_ms += request_ms(tokens)
                else:  # two passes: the reasoning (at most b) and the answer after the forced close
                    work_ms += request_ms(min(int(b), tokens)) + request_ms(min(answer, tokens))
            work_s = records / PROTOCOL_BATCH * work_ms / 1000 / replicas
            est.drivers = {"records": records, "budgets": len(budgets), "tokens_per_answer": round(tokens, 1)}
            est.assumptions.append("per budget: min(budget, expected) reasoning tokens + an answer of "
                                   "min(answer_max_tokens, expected) tokens")
        else:
            records, records_from = self.split_records(config)
            if records is None:
                est.unpriced = records_from
                return est
            limit = (options.get("inference") or {}).get("limit")
            if limit:
                records = min(records, limit * len(config["splits"]))
            work_s = records / PROTOCOL_BATCH * request_ms(tokens) / 1000 / replicas
            # The job answers its first batch once, untimed, before the timed ones (each replica its own).
            work_s += request_ms(tokens) / 1000 if records else 0.0
            est.drivers = {"records": records, "tokens_per_answer": round(tokens, 1)}
            est.sources.append(records_from)
            est.sources.append("one batch answered first, untimed (egm.infer.predict.warm_up)")
        load_s, load_from = self._engine_load(picked, serving)
        est.wall_s = load_s + work_s
        est.gpu_seconds = est.wall_s * job.gpus
        est.drivers.update(backend=backend, tensor_parallel=tp, replicas=replicas)
        est.sources.insert(0, f"{picked['record']}: {picked['method']} batch {PROTOCOL_BATCH} on {picked['card']} "
                              f"({picked['costs']['per_token_ms']:.2f} ms/token, {picked['costs']['fixed_ms']:.0f} ms fixed "
                              f"per request), scaled to {self.gpu_name} by bandwidth and bf16 throughput")
        est.sources.append(f"engine load {load_s:.0f} s ({load_from}, not scaled)")
        est.assumptions.insert(0, f"tokens per answer {tokens:.0f}: {tokens_from}")
        if not serving:
            est.assumptions.append("the job's backend is not a serving engine: priced by egm's compiled decode")
        elif "sglang" in (backend, engine.get("server")) and picked["method"] != "sglang":
            est.assumptions.append(f"SGLang has no latency record: priced as {picked['method']}")
        if picked["card"] != self.gpu_name:
            est.assumptions.append(f"measured on {picked['card']}, projected to {self.gpu_name}")
        if big:
            est.assumptions.append("235B: the 8B's measurement x active parameters (22e9 / the 8B's), work split "
                                   f"evenly over tensor parallel {tp}")
        est.memory = self.memory(arch, picked["entry"], max(1, concurrency // replicas), tokens, self._at_most(tp))
        return est

    def _engine_load(self, picked: dict, serving: bool) -> tuple[float, str]:
        """Seconds before the first answer: a serving engine's build as measured (vLLM's, the
        only one recorded), else egm's model build of the picked record plus its method's largest
        warm-up there (the first compiles the decode blocks cold and captures its graphs, as an hf
        engine does when it loads)."""
        if serving:
            for c in self.latency:
                build = (c["entry"].get("vllm") or {}).get("build_s")
                if build:
                    return float(build), f"{c['record']}: vLLM engine build"
        build = float(picked["entry"].get("build_s") or 0.0)
        warm = max((r.get("warmup_s") or 0.0 for r in picked["entry"].get("runs", [])
                    if r.get("method") == picked["method"]), default=0.0)
        if not warm:
            return build, f"{picked['record']}: model build"
        return build + warm, f"{picked['record']}: model build {build:.1f} s + {picked['method']} warm-up {warm:.1f} s"

    def _training(self, job, config: dict, est: Estimate) -> Estimate:
        run = job.wildcards["run"]
        spec = config["train"]["runs"][run]
        base = config["models"][spec["base"]]
        parameters = (base.get("params_b") or 0) * 1e9
        options = job.params.get("options") or {}
        recipe = options.get("recipe") or {}
        n = max(job.gpus, 1)
        est.memory = self.training_memory(parameters, self._at_most(job.gpus))
        if not self.train:
            est.unpriced = "no training record (train-h100.json)"
            return est
        rec_card = self.gpus[gpu_of(self.train, self.gpus)]
        flops_ratio = rec_card["bf16_dense_tflops"] / self.gpu["bf16_dense_tflops"]
        size = parameters / self.train["params"]
        if job.rule == "sft":
            m = self.train["sft"]
            batch = recipe.get("global_batch_size", 1)
            steps = options.get("max_steps")
            if steps:
                samples, how = steps * batch, f"max_steps {steps} x global batch {batch}"
            elif spec["sft"].get("data") == "raw" and "demo" not in config:
                samples, how = SFT_SAMPLES_PAPER, "paper: about 570k samples (EGM.md section 4)"
            else:
                est.unpriced = "SFT samples unknown before the data is fetched (set max_steps to price it)"
                return est
            per_sample_s = m["mean_step_s_after_first"] / 8  # the record's micro (= global) batch of 8
            est.gpu_seconds = samples * per_sample_s * size * flops_ratio
            est.drivers = {"samples": samples, "steps": math.ceil(samples / batch),
                           "tokens_per_sample": round(m["mean_tokens_per_sample"]), "parameters_b": parameters / 1e9}
            est.sources = [f"train-h100.json: SFT mean step {m['mean_step_s_after_first']} s for 8 samples of "
                           f"{m['mean_tokens_per_sample']:.0f} tokens, 2B architecture", how]
            est.assumptions = ["seconds per sample scale with parameters (compute-bound) and bf16 throughput",
                               "samples as long as the record's (about 203 tokens)",
                               f"{n} GPUs divide the work perfectly"]
            if self.multigpu:
                sp = self.multigpu["sft"].get("speedup_steps_per_s")
                est.sources.append(f"multigpu-h200x2.json: ZeRO-3 on 2 GPUs ran {sp}x one GPU's steps (the "
                                   "assumption above is optimistic)")
        else:
            m = self.train["grpo"]
            group = recipe.get("group_size", 1)
            prompts = recipe.get("prompts_per_step", 1)
            steps = options.get("max_steps")
            if not steps:
                rows = self._rl_rows(options)
                if rows is None:
                    est.unpriced = ("RL steps unknown: no max_steps and the RL parquet is not fetched yet "
                                    "(its row count sets the steps)")
                    return est
                steps = math.ceil(rows / prompts) * recipe.get("epochs", 1)
            model = f"{run}-rl"
            tokens, tokens_from = self.expected_tokens(model, {"paper": spec["rl"].get("paper")},
                                                       recipe.get("max_new_tokens", 2048))
            record_tokens = 16 * 128  # the record: 2 prompts x 8 samples x 128 new tokens a step
            per_token_s = m["mean_step_s_after_first"] / record_tokens
            completions = steps * prompts * group
            est.gpu_seconds = completions * tokens * per_token_s * size * flops_ratio
            est.drivers = {"steps": steps, "completions": completions, "tokens_per_completion": round(tokens, 1),
                           "parameters_b": parameters / 1e9}
            est.sources = [f"train-h100.json: GRPO mean step {m['mean_step_s_after_first']} s for 16 completions x "
                           "128 tokens (transformers-generate rollouts), 2B architecture"]
            est.assumptions = [f"tokens per completion {tokens:.0f}: {tokens_from}",
                               "seconds per rollout token scale with parameters and bf16 throughput",
                               "rollouts as slow as transformers' generate (vLLM rollouts are faster: high)",
                               f"{n} GPUs divide the work perfectly"]
        est.wall_s = est.gpu_seconds / n
        if rec_card is not self.gpu:
            est.assumptions.append(f"measured on {gpu_of(self.train, self.gpus)}, scaled to {self.gpu_name}")
        return est

    def _rl_rows(self, options: dict) -> int | None:
        path = self.workdir / "resources" / "rl" / "train.parquet"
        if not path.exists():
            return None
        import pyarrow.parquet as pq

        rows = pq.ParquetFile(path).metadata.num_rows
        return min(rows, options["limit"]) if options.get("limit") else rows
