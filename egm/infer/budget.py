"""Budget forcing for reasoning models, and the test-time-scaling sweep of one model.

A Thinking model (Qwen3-VL-*-Thinking, EGM) writes its reasoning after the chat template's
`<think>\\n` and closes it with `</think>` before the answer. Under a budget of N new tokens:

1. phase 1 generates the reasoning with at most N new tokens, stopping at `</think>` (kept);
2. if the reasoning did not close by itself, the forced text "\\n</think>\\n\\n" (the closing tag
   and the blank line the SFT format puts before the answer) is appended;
3. phase 2 continues that assistant turn (phase-1 text, forced text if any) and writes the answer,
   with at most `answer_max_tokens` new tokens.

N = 0 skips phase 1: the reasoning is closed at once ("<think>\\n\\n</think>\\n\\n", Qwen3's
no-thinking form). An unlimited budget is one plain generation, the same request predict sends.
Accounting: tokens = phase-1 + phase-2 generated tokens (the forced text is not generated; its
text is recorded apart); latency = phase-1 + phase-2 wall time as the engine reports them.

Everything goes through `Engine.generate` with `Request.assistant_prefix`, `max_tokens` and `stop`,
so every backend (hf, the fast hf path, vLLM, SGLang, an OpenAI-compatible server) can be swept.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from egm.infer.base import Engine, LazyEngine, Request
from egm.metrics import read_prediction_rows

if TYPE_CHECKING:
    from egm.options import ScalingOptions

log = logging.getLogger(__name__)

END_THINK = "</think>"
# What the SFT targets hold between the reasoning and the answer (egm.grounding.format_sft_target).
FORCED_CLOSE = "\n" + END_THINK + "\n\n"
UNLIMITED = "unlimited"


@dataclass(frozen=True)
class BudgetCompletion:
    """One answer under a reasoning budget (`budget` None: unlimited, one plain generation)."""

    text: str  # the assistant turn after the generation prompt: phase 1, forced text, phase 2
    completion_tokens: int  # generated tokens of both phases (the forced text is not counted)
    latency_s: float  # phase 1 + phase 2
    budget: int | None
    closed_naturally: bool  # the model wrote `</think>` itself (within the budget)
    reasoning_tokens: int  # phase-1 tokens (all of them when unlimited)
    answer_tokens: int  # phase-2 tokens (0 when unlimited)
    forced_text: str  # "" or FORCED_CLOSE, as inserted into `text`
    phase1_latency_s: float
    phase2_latency_s: float
    answer_text: str  # phase 2's text (unlimited: the whole text)

    @property
    def reasoning_text(self) -> str:
        """Phase 1's text, `</think>` included when the model wrote it ("" for budget 0).
        Unlimited: the text up to and including the first `</think>` (all of it if none)."""
        if self.budget is None:
            cut = self.text.find(END_THINK)
            return self.text if cut < 0 else self.text[: cut + len(END_THINK)]
        return self.text[: len(self.text) - len(self.answer_text) - len(self.forced_text)]


def parse_budget(value) -> int | None:
    """A config budget (an integer >= 0, or "unlimited") as an int, or None for unlimited."""
    if value is None or (isinstance(value, str) and value.lower() == UNLIMITED):
        return None
    if isinstance(value, str) and value.isdigit():  # a file label: "16"
        return int(value)
    if isinstance(value, (bool, str)) or int(value) != value or int(value) < 0:
        raise ValueError(f"a budget is an integer >= 0 or {UNLIMITED!r}, got {value!r}")
    return int(value)


def budget_label(budget: int | None) -> str:
    """The budget's name in file names and tables: the number, or "unlimited"."""
    return UNLIMITED if budget is None else str(int(budget))


def generate_with_budget(
    engine: Engine, requests: Sequence[Request], budget: int | None, answer_max_tokens: int
) -> list[BudgetCompletion]:
    """Answers of `requests` with the reasoning capped at `budget` new tokens (None: no cap).

    Two `engine.generate` calls (one when the budget is 0 or unlimited), each over all requests,
    so a batching engine batches them as it would in predict.
    """
    requests = list(requests)
    if not requests:
        return []
    if budget is None:
        plain = engine.generate(requests)
        return [
            BudgetCompletion(c.text, c.completion_tokens, c.latency_s, None, END_THINK in c.text, c.completion_tokens,
                             0, "", c.latency_s, 0.0, c.text)
            for c in plain
        ]
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    if answer_max_tokens < 1:
        raise ValueError(f"answer_max_tokens must be at least 1, got {answer_max_tokens}")

    if budget == 0:
        phase1 = [None] * len(requests)
    else:
        phase1 = engine.generate([replace(r, max_tokens=budget, stop=(END_THINK,)) for r in requests])
    prefixes, closed = [], []
    for req, first in zip(requests, phase1):
        text = first.text if first is not None else ""
        # The stop string is kept by every backend, so a closed reasoning ends with it.
        natural = END_THINK in text
        closed.append(natural)
        prefixes.append(text if natural else text + FORCED_CLOSE)
    phase2 = engine.generate([
        replace(r, assistant_prefix=r.assistant_prefix + prefix, max_tokens=answer_max_tokens, stop=())
        for r, prefix in zip(requests, prefixes)
    ])
    out = []
    for first, prefix, natural, second in zip(phase1, prefixes, closed, phase2):
        tokens1 = first.completion_tokens if first is not None else 0
        latency1 = first.latency_s if first is not None else 0.0
        out.append(BudgetCompletion(
            prefix + second.text,
            tokens1 + second.completion_tokens,
            latency1 + second.latency_s,
            budget,
            natural,
            tokens1,
            second.completion_tokens,
            "" if natural else FORCED_CLOSE,
            latency1,
            second.latency_s,
            second.text,
        ))
    return out


# --------------------------------------------------------------------------- the sweep of one model


def opens_reasoning(tokenizer) -> bool:
    """Whether the model's chat template opens a reasoning block in its generation prompt
    (Thinking models: `...<|im_start|>assistant\\n<think>\\n`; Instruct models do not)."""
    from egm.models.inputs import render_prompt

    return render_prompt(tokenizer, "x").rstrip().endswith("<think>")


def sample_split(records: Sequence, n: int | None, seed: int) -> list:
    """The sweep's records of one split: `n` drawn with `seed` (split order kept), or all."""
    from egm.infer.latency import sample_records

    return list(records) if n is None else sample_records(records, n, seed)


def budget_row(base: dict, prompt: str, completion: BudgetCompletion) -> dict:
    """One JSONL row: predict's fields (answer, boxes, IoU, tokens, latency) plus the budget's."""
    from egm.metrics import evaluate_answer

    row = dict(base)
    row.update(status="ok", error=None, prompt=prompt, answer=completion.text)
    row.update(evaluate_answer(completion.text, base["bbox"], base["width"], base["height"]))
    row.update(
        completion_tokens=completion.completion_tokens,
        latency_s=completion.latency_s,
        budget=budget_label(completion.budget),
        closed_naturally=completion.closed_naturally,
        reasoning_tokens=completion.reasoning_tokens,
        answer_tokens=completion.answer_tokens,
        forced_text=completion.forced_text,
        phase1_latency_s=completion.phase1_latency_s,
        phase2_latency_s=completion.phase2_latency_s,
    )
    return row


def budget_metrics(rows: list[dict], model: str, budget: int | None, reasoning: bool, extra: dict | None = None) -> dict:
    """summarize_predictions over the pooled sample, per split, and the budget's own counts."""
    from egm.metrics import mean, nan_to_none, summarize_predictions

    metrics = summarize_predictions(rows, model, "scaling-sample")
    ok = [r for r in rows if r.get("status") == "ok"]

    def avg(key):
        return nan_to_none(mean(r[key] for r in ok))

    splits = sorted({r["split"] for r in rows}, key=[r["split"] for r in rows].index)
    metrics.update(
        budget=budget_label(budget),
        budget_tokens=budget,
        reasoning_model=reasoning,
        n_closed_naturally=sum(1 for r in ok if r["closed_naturally"]),
        closed_share=(sum(1 for r in ok if r["closed_naturally"]) / len(ok)) if ok else None,
        n_forced=sum(1 for r in ok if r["forced_text"]),
        mean_reasoning_tokens=avg("reasoning_tokens"),
        mean_answer_tokens=avg("answer_tokens"),
        mean_phase1_latency_s=avg("phase1_latency_s"),
        mean_phase2_latency_s=avg("phase2_latency_s"),
        per_split={s: {k: summarize_predictions([r for r in rows if r["split"] == s], model, s)[k]
                       for k in ("n_scored", "acc_at_0.5", "mean_iou")} for s in splits},
        **(extra or {}),
    )
    return metrics


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    from egm.io import atomic_write

    with atomic_write(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def sweep_model(
    model: str,
    split_files: Sequence[Path],
    image_root: str,
    get_engine: Callable[[], Engine],
    tokenizer_dir: str,
    prompt_template: str,
    budgets: Sequence[int | None],
    answer_max_tokens: int,
    n_per_split: int | None,
    seed: int,
    out_dir: Path,
    work_dir: Path | None = None,
    warmup: bool = True,
    provenance: dict | None = None,
) -> list[dict]:
    """Every budget over one fixed, seeded sample of the splits, with one engine load.

    Writes `{out_dir}/budget-{label}.jsonl` (predict's row format plus the budget's fields) and
    `budget-{label}.json` (metrics) per budget; returns the metrics. A finished budget's rows are
    kept in `work_dir` (keyed by the caller), so a rerun after a kill redoes only what is missing.
    `provenance` (egm.provenance records) goes into every budget's metrics.
    Budgets run from the largest down, unlimited first: a warm engine times every budget alike.
    """
    from transformers import AutoTokenizer

    from egm.data.splits import load_split
    from egm.grounding import build_prompt
    from egm.infer.predict import record_base, split_name_of
    from egm.io import write_json

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    reasoning = opens_reasoning(tokenizer)
    budgets = list(budgets)
    if not reasoning and budgets != [None]:
        raise ValueError(
            f"{model}: its chat template opens no reasoning block (an Instruct model), so there is "
            "nothing to force; add it to scaling.single_point, which answers it once, unlimited"
        )

    bases, prompts, requests, n_bad = [], [], [], 0
    for path in split_files:
        name = split_name_of(path)
        split = load_split(Path(path), image_root)
        n_bad += len(split.bad)
        for rec in sample_split(split.records, n_per_split, seed):
            prompt = build_prompt(prompt_template, rec.sent)
            bases.append(record_base(name, rec))
            prompts.append(prompt)
            requests.append(Request(f"{name}:{rec.line}", rec.image_path, prompt))
    log.info("%s: %d sampled records (%s per split, seed %d), budgets %s", model, len(requests),
             n_per_split if n_per_split is not None else "all", seed, [budget_label(b) for b in budgets])

    if work_dir is not None:
        # The caller's key covers the settings; this one the sample itself (records and prompts).
        from egm.infer.predict import cache_key

        work_dir = Path(work_dir) / cache_key([(r.id, r.image_path, r.prompt) for r in requests])

    def warm_up(loaded: Engine) -> None:
        if warmup and requests:
            # Not timed: first-call costs (allocator, kernels, graph capture) stay out of the sweep.
            loaded.generate([replace(requests[0], max_tokens=2)])

    order = sorted(budgets, key=lambda b: math.inf if b is None else b, reverse=True)
    results = {}
    with LazyEngine(get_engine, on_load=warm_up) as engine:
        for budget in order:
            label = budget_label(budget)
            work = work_dir / f"budget-{label}.jsonl" if work_dir else None
            rows = list(read_prediction_rows(work)) if work and work.exists() else []
            if len(rows) == len(requests):
                log.info("%s budget %s: from the resume cache %s", model, label, work)
            else:
                completions = generate_with_budget(engine(), requests, budget, answer_max_tokens)
                rows = [budget_row(b, p, c) for b, p, c in zip(bases, prompts, completions)]
                if work:  # written whole (atomically) once the budget is done
                    work.parent.mkdir(parents=True, exist_ok=True)
                    _write_jsonl(work, rows)
            metrics = budget_metrics(rows, model, budget, reasoning, {
                "n_per_split": n_per_split, "seed": seed, "answer_max_tokens": answer_max_tokens,
                "n_bad_records_in_splits": n_bad,
            })
            if provenance is not None:
                metrics["provenance"] = provenance
            out_dir.mkdir(parents=True, exist_ok=True)
            _write_jsonl(out_dir / f"budget-{label}.jsonl", rows)
            write_json(out_dir / f"budget-{label}.json", metrics)
            results[label] = metrics
            log.info("%s budget %s: Acc@0.5 %s, %.1f tokens, %.1f ms, %d/%d closed naturally", model, label,
                     metrics["acc_at_0.5"], metrics["mean_completion_tokens"] or 0,
                     1000 * (metrics["mean_latency_s"] or 0), metrics["n_closed_naturally"], metrics["n_scored"])
    return [results[budget_label(b)] for b in budgets]


def run_scaling(model: str, model_dir: str, model_manifest: str, split_files: Sequence[str], image_root: str,
                out_dir: str, work_dir: str | None, options: ScalingOptions, provenance: dict | None = None
                ) -> list[dict]:
    """The scaling job: its resume key from every setting an answer depends on, then the sweep."""
    from egm.infer.engine import engine_loader
    from egm.infer.predict import cache_key
    from egm.io import sha256_file

    settings, sampling = options.scaling, options.inference.sampling()
    batch_size = settings.batch_size or options.inference.batch_size
    engine_options = dict(options.engine_options)
    # A changed setting starts a fresh resume cache.
    key = cache_key(sha256_file(model_manifest), options.prompt, options.backend, engine_options, sampling, batch_size,
                    {"answer_max_tokens": settings.answer_max_tokens, "n_per_split": settings.n_per_split,
                     "seed": settings.seed})
    return sweep_model(
        model,
        [Path(p) for p in split_files],
        image_root,
        engine_loader(options.backend, model_dir, sampling, {"batch_size": batch_size, **engine_options}),
        model_dir,
        options.prompt,
        [parse_budget(b) for b in settings.budgets],
        int(settings.answer_max_tokens),
        settings.n_per_split,
        int(settings.seed),
        Path(out_dir),
        work_dir=Path(work_dir) / key if work_dir else None,
        provenance=provenance,
    )
