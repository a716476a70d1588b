"""`python -m egm <command>`: one thin subcommand per pipeline stage.

Each command parses its arguments, calls the library, and writes its declared outputs; the
Snakemake rules call these and nothing else.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

log = logging.getLogger("egm")


def _require_gpus(gpus: int, what: str) -> None:
    """Fail before loading anything when the job sees fewer GPUs than its config asks for."""
    from egm.runtime import require_gpus

    require_gpus(int(gpus), what=what)


def _provenance(args: argparse.Namespace, options: dict) -> dict:
    """What a result is traced by: the model and data it came from and the job that made it."""
    from egm.provenance import job_record, manifest_record

    record = {
        "model_key": args.model,
        "model": manifest_record(args.model_manifest) if args.model_manifest else None,
        "data": manifest_record(args.data_manifest) if args.data_manifest else None,
    }
    record["job"] = job_record(options["backend"], options.get("engine_options"), config=options)
    return record


def cmd_make_demo(args: argparse.Namespace) -> None:
    from egm.data.demo import write_demo_dataset
    from egm.io import write_json
    from egm.models.tiny import write_tiny_model

    mirror = Path(args.mirror)
    dataset = write_demo_dataset(
        mirror / args.dataset_repo,
        seed=args.seed,
        n_train_images=args.train_images,
        n_eval_per_split=args.eval_per_split,
        width=args.width,
        height=args.height,
    )
    write_tiny_model(mirror / args.model_repo, seed=args.seed)
    write_json(args.summary, {"seed": args.seed, "dataset_repo": args.dataset_repo, "model_repo": args.model_repo, "dataset": dataset})


def cmd_write_architecture(args: argparse.Namespace) -> None:
    from egm.models.architectures import write_architecture_model

    n = write_architecture_model(Path(args.out), args.arch, weights=args.weights, device=args.device)
    log.info("wrote %s (%.3g parameters, %s) to %s", args.arch, n,
             "random bf16 weights" if args.weights else "no weights", args.out)


def cmd_fetch(args: argparse.Namespace) -> None:
    from egm.data.hub import fetch_snapshot
    from egm.io import write_json

    if args.mirror and args.mirror_map is not None:
        raise ValueError("give --mirror or --mirror-map, not both")
    manifest = fetch_snapshot(
        args.repo_id,
        Path(args.dest),
        repo_type=args.repo_type,
        revision=args.revision,
        allow_patterns=args.allow or None,
        mirror=args.mirror_map if args.mirror_map is not None else (args.mirror or None),
        checksums=args.checksums,
        # Rules name the files they need by their paths under --dest; the repo knows them relative.
        required=[os.path.relpath(r, args.dest) if Path(r).is_relative_to(args.dest) else r for r in args.require],
        mirror_files=args.mirror_files,
    )
    manifest["dest"] = args.dest
    write_json(args.manifest, manifest)
    log.info("fetched %s@%s: %d files", args.repo_id, args.revision, len(manifest["files"]))


def cmd_extract(args: argparse.Namespace) -> None:
    from egm.data.archives import archive_files, extract_archive
    from egm.io import read_json, write_json

    parts, expected = archive_files(Path(args.dataset_dir), args.archive, read_json(args.fetch_manifest)["files"])
    manifest = extract_archive(parts, Path(args.dest), expected_parts=expected)
    write_json(args.manifest, manifest)
    log.info("extracted %s: %d files", args.archive, manifest["n_files"])


def cmd_rewrite_parquet(args: argparse.Namespace) -> None:
    from egm.data.parquet import rewrite_image_paths

    stats = rewrite_image_paths(Path(args.src), Path(args.dst), args.image_root)
    log.info("rewrote %s -> %s: %s", args.src, args.dst, stats)


def cmd_predict(args: argparse.Namespace) -> None:
    from egm.infer.predict import run_predict
    from egm.io import write_json
    from egm.options import PredictOptions, parse_options

    from egm.plan.measure import GpuMemoryPeak, job_cost, tokens_in

    started, memory = time.monotonic(), GpuMemoryPeak().start()
    options = parse_options(PredictOptions, args.options)
    _require_gpus(options.gpus, f"predict {args.model_dir}")
    provenance = _provenance(args, args.options)  # first: a bad manifest fails before the engine loads
    summaries = run_predict(args.model_dir, args.model_manifest, args.splits, args.out_dir, args.image_root, options)
    for summary in summaries:
        # One JSON object a line: benchmarks read the answering time from the job's log.
        log.info("done: %s", json.dumps(summary, sort_keys=True))
    if args.run_record:
        # What the job cost (`egm plan --check` puts it beside the plan's estimate).
        answers = [Path(args.out_dir) / f"{s['split']}.jsonl" for s in summaries]
        provenance["cost"] = job_cost(started, options.gpus, tokens_in(p for p in answers if p.exists()), memory)
        write_json(args.run_record, provenance)
    unanswered = [s["split"] for s in summaries if s["problem"]]
    if unanswered:
        # Last, where a user reads first: the job succeeded, but not for every split.
        log.warning("%d split(s) with no valid record, not answered (their metrics say why): %s",
                    len(unanswered), ", ".join(unanswered))


def cmd_validate_split(args: argparse.Namespace) -> None:
    from egm.data.validation import validate_split
    from egm.io import write_json

    report = validate_split(args.split, args.image_root)
    for bad in report["bad_records"]:
        log.warning("%s: bad record, scored as a miss: %s", bad["where"], bad["reason"])
    write_json(args.out, report)
    if report["differs_from_release"]:
        log.warning("%s: %d lines, the released file has %d (scored over the lines it has)", report["name"],
                    report["lines"], report["released_lines"])
    if report["error"]:
        log.warning("%s: NO VALID RECORD, it will have no score (the other splits go on): %s",
                    report["name"], report["error"])
    else:
        log.info("%s: %d valid record(s), %d bad", report["name"], report["valid"], report["bad"])


def cmd_validate_parquet(args: argparse.Namespace) -> None:
    from egm.data.validation import ValidationError, validate_rl_parquet
    from egm.io import write_json

    report = validate_rl_parquet(args.parquet, args.image_root)
    for bad in report["bad_records"]:
        log.warning("%s: bad row: %s", bad["where"], bad["reason"])
    if report["error"]:
        raise ValidationError(report["error"])
    write_json(args.out, report)
    log.info("%s: %d usable row(s) of %d, %d bad (left out by training)", args.parquet, report["valid"],
             report["rows"], report["bad"])


def cmd_score(args: argparse.Namespace) -> None:
    from egm.data.splits import released_size
    from egm.data.validation import unscored
    from egm.io import read_json, sha256_file, write_json
    from egm.metrics import read_prediction_rows, summarize_predictions
    from egm.provenance import code_record, image_record

    metrics = summarize_predictions(read_prediction_rows(args.predictions), args.model, args.split)
    metrics.update(released_size(args.split, metrics["n_records"]))
    metrics.update(unscored(metrics, read_json(args.validation) if args.validation else None))
    if args.run_record:
        metrics["provenance"] = {
            **read_json(args.run_record),
            "predictions": {"path": args.predictions, "sha256": sha256_file(args.predictions)},
            "scored_by": {"egm": code_record(), "image": image_record()},
        }
    write_json(args.out, metrics)
    if "no_score" in metrics:
        log.warning("%s %s: no score: %s", args.model, args.split, metrics["no_score_reason"])
    else:
        log.info("%s %s: Acc@0.5 %s over %d", args.model, args.split, metrics["acc_at_0.5"], metrics["n_scored"])


def _load_metrics(paths: list[str]) -> list[dict]:
    from egm.io import read_json

    return [read_json(p) for p in paths]


def _paper_version(report: dict) -> str:
    """The published version of the paper's table a report compares with (rules always pass it)."""
    from egm.report.paper import DEFAULT_VERSION

    return report.get("paper_version") or DEFAULT_VERSION


def _models_in_order(report: dict) -> dict:
    """The report's models in the config's order (the JSON object itself arrives key-sorted)."""
    models = report["models"]
    return {key: models[key] for key in report.get("order", models)}


def cmd_report_table(args: argparse.Namespace) -> None:
    from egm.report.common import write_table
    from egm.report.tables import expected_comparison, paper_comparison, refcoco_table

    metrics = _load_metrics(args.metrics)
    models, splits = _models_in_order(args.report), args.report["splits"]
    expected = args.report.get("expected")
    if len(args.out_prefixes) != (3 if expected else 2):
        raise ValueError(f"--out-prefixes: {len(args.out_prefixes)} given; the RefCOCO table, the paper comparison"
                         + (" and the expected-range table" if expected else "") + " need one each")
    refcoco, vs_paper, *vs_expected = map(Path, args.out_prefixes)
    write_table(refcoco_table(metrics, models, splits), refcoco, title="RefCOCO/+/g Acc@0.5 (%)")
    write_table(
        paper_comparison(metrics, models, splits, tolerance=args.report["tolerance"],
                         paper_version=_paper_version(args.report)),
        vs_paper,
        title="Reproduced vs paper, Acc@0.5 (%)",
    )
    if expected:
        write_table(
            expected_comparison(metrics, models, splits, expected),
            vs_expected[0],
            title="This run vs its expected ranges",
            signed_columns=(),
        )


def cmd_report_thresholds(args: argparse.Namespace) -> None:
    from egm.report.common import write_table
    from egm.report.thresholds import TITLE, thresholds_table

    table = thresholds_table(_load_metrics(args.metrics), _models_in_order(args.report), args.report["splits"])
    write_table(table, Path(args.out_prefix), title=TITLE, signed_columns=())


def cmd_report_tradeoff(args: argparse.Namespace) -> None:
    from egm.report.tradeoff import latency_by_model, tradeoff_figure

    metrics = _load_metrics(args.metrics)
    latency = latency_by_model(_load_metrics(args.latency)) if args.latency else None
    tradeoff_figure(metrics, _models_in_order(args.report), Path(args.out_prefix), args.report["splits"], latency=latency,
                    paper_version=_paper_version(args.report))


def cmd_latency(args: argparse.Namespace) -> None:
    from egm.infer.latency import run_latency
    from egm.io import write_json
    from egm.options import LatencyOptions, parse_options

    from egm.plan.measure import GpuMemoryPeak, job_cost

    started, memory = time.monotonic(), GpuMemoryPeak().start()
    options = parse_options(LatencyOptions, args.options)
    _require_gpus(options.gpus, f"latency {args.model_dir}")
    provenance = _provenance(args, args.options)
    result = run_latency(args.model, args.model_dir, args.split, args.image_root, options, provenance)
    tokens = sum(r["completion_tokens"] or 0 for part in ("protocol", "batch1") if part in result
                 for r in result[part]["requests"])
    result["cost"] = job_cost(started, options.gpus, tokens, memory)
    write_json(args.out, result)


def cmd_scaling(args: argparse.Namespace) -> None:
    from egm.infer.budget import run_scaling
    from egm.options import ScalingOptions, parse_options

    options = parse_options(ScalingOptions, args.options)
    _require_gpus(options.gpus, f"scaling {args.model_dir}")
    run_scaling(args.model, args.model_dir, args.model_manifest, args.splits, args.image_root, args.out_dir,
                args.work_dir, options, provenance=_provenance(args, args.options))


def cmd_report_scaling(args: argparse.Namespace) -> None:
    from egm.report.scaling import scaling_figure, write_scaling_table

    metrics = _load_metrics(args.metrics)
    models = _models_in_order(args.report)
    if args.table_prefix:
        write_scaling_table(metrics, models, Path(args.table_prefix))
    if args.figure_prefix:
        scaling_figure(metrics, models, Path(args.figure_prefix))


def cmd_report_tokens(args: argparse.Namespace) -> None:
    from egm.report.tokens import tokens_figure

    tokens_figure(_load_metrics(args.metrics), _models_in_order(args.report), Path(args.out_prefix), args.report["splits"],
                  paper_version=_paper_version(args.report))


def cmd_report_latency(args: argparse.Namespace) -> None:
    from egm.report.latency_table import write_latency_table

    write_latency_table(_load_metrics(args.metrics), _models_in_order(args.report), args.report["splits"],
                        _load_metrics(args.latency), Path(args.out_prefix))


def cmd_plan(args: argparse.Namespace) -> None:
    from egm.plan.gpus import load_gpus, run_gpu
    from egm.plan.plan import run_plan

    gpu, gpu_from = args.gpu, None
    if gpu == "auto":
        found = run_gpu(Path(args.directory), load_gpus())
        gpu, gpu_from = found or ("H100", "no prediction ran on a GPU: H100 assumed; only CPU jobs compare")
    run_plan([Path(c) for c in args.configfile], gpu, args.gpus, args.targets or None, args.json, args.markdown,
             args.check, Path(args.directory), forceall=not args.only_missing, records_dir=args.records,
             saved=args.saved, gpu_from=gpu_from)


def cmd_report_training(args: argparse.Namespace) -> None:
    from egm.report.training import read_stage, training_figure

    models = _models_in_order(args.report) if args.report else {}
    training_figure([read_stage(d, models) for d in args.stages], Path(args.out_prefix))


def cmd_config_readme(args: argparse.Namespace) -> None:
    from egm.schema_docs import write_config_readme

    write_config_readme(Path(args.schema), Path(args.out))


def add_engine_job_arguments(p: argparse.ArgumentParser, options_keys: str, model_required: bool = True,
                             manifest_required: bool = True) -> None:
    """The arguments of every command that loads an engine for one model (predict, latency, scaling)."""
    from egm.options import json_arg

    p.add_argument("--model", required=model_required, default=None,
                   help="the model's key in the config, named in the provenance (and the figures)")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--model-manifest", required=manifest_required, default=None,
                   help="the model's manifest, named in the provenance; predict and scaling key their resume cache by its hash")
    p.add_argument("--image-root", required=True)
    p.add_argument("--options", type=json_arg, required=True,
                   help=f"JSON: prompt, backend, engine_options, inference{options_keys}")
    p.add_argument("--data-manifest", default=None, help="the data set's fetch manifest, named in the provenance")


def build_parser() -> argparse.ArgumentParser:
    from egm.options import json_arg

    parser = argparse.ArgumentParser(prog="egm", description="EGM reproduction pipeline stages")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    p = sub.add_parser("make-demo", help="write the synthetic demo data set and tiny model into an offline hub mirror")
    p.add_argument("--mirror", required=True)
    p.add_argument("--dataset-repo", required=True)
    p.add_argument("--model-repo", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-images", type=int, default=64)
    p.add_argument("--eval-per-split", type=int, default=16)
    p.add_argument("--width", type=int, default=96, help="image width in pixels (every image is this size)")
    p.add_argument("--height", type=int, default=96)
    p.add_argument("--summary", required=True, help="JSON written last, the rule's output")
    p.set_defaults(func=cmd_make_demo)

    p = sub.add_parser("write-architecture",
                       help="write a paper architecture as a model directory, weightless (load_format: dummy) "
                            "or with random weights")
    p.add_argument("--arch", required=True, help="qwen3-vl-2b, qwen3-vl-4b, qwen3-vl-8b (EGM.md section 6)")
    p.add_argument("--out", required=True)
    p.add_argument("--weights", action="store_true",
                   help="save seeded random bf16 weights (training needs real tensors; inference does not)")
    p.add_argument("--device", default="cpu", help="where the random weights are drawn (cuda: seconds for the 8B)")
    p.set_defaults(func=cmd_write_architecture)

    p = sub.add_parser("fetch", help="download a hub repo at a revision (or copy it from an offline mirror)")
    p.add_argument("--repo-id", required=True)
    p.add_argument("--repo-type", choices=["model", "dataset"], default="model")
    p.add_argument("--revision", default="main")
    p.add_argument("--allow", nargs="*", default=[], help="allow patterns")
    p.add_argument("--mirror", nargs="+", default=None,
                   help="offline mirror folder(s) laid out as <mirror>/<repo_id>/..., searched in order")
    p.add_argument("--mirror-map", type=json_arg, default=None,
                   help='JSON {"repo_id": "folder of its files"}; a repo not named comes from the hub')
    p.add_argument("--require", nargs="*", default=[],
                   help="files (or patterns matching at least one) that must be fetched; checked before fetching")
    p.add_argument("--checksums", type=json_arg, default={}, help='JSON {"path": "sha256"} to verify')
    p.add_argument("--mirror-files", type=json_arg, default=None,
                   help="JSON {path: [bytes, mtime_ns]}: the mirror's state that decided this fetch "
                        "(egm.data.hub.mirror_state), recorded in the manifest")
    p.add_argument("--dest", required=True)
    p.add_argument("--manifest", required=True)
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("extract", help="stream-extract coco.tar.part_* (or coco_flip.tar) with a safe member filter")
    p.add_argument("--archive", choices=["coco", "coco_flip"], required=True)
    p.add_argument("--dataset-dir", required=True)
    p.add_argument("--fetch-manifest", required=True)
    p.add_argument("--dest", required=True)
    p.add_argument("--manifest", required=True)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("validate-split", help="check one eval split before predict; write its report")
    p.add_argument("split", help="eval split JSONL")
    p.add_argument("--image-root", required=True)
    p.add_argument("--out", required=True, help="JSON report: valid and bad records (file:line, reason)")
    p.set_defaults(func=cmd_validate_split)

    p = sub.add_parser("validate-parquet", help="check one RL parquet before training; fail when no row is usable")
    p.add_argument("parquet", help="RL parquet as fetched (image paths are relocated as the rewrite does)")
    p.add_argument("--image-root", required=True)
    p.add_argument("--out", required=True, help="JSON report: usable and bad rows (file: row N, reason)")
    p.set_defaults(func=cmd_validate_parquet)

    p = sub.add_parser("rewrite-parquet", help="point the RL parquet's image paths at the extracted images")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--image-root", required=True)
    p.set_defaults(func=cmd_rewrite_parquet)

    p = sub.add_parser("predict", help="answer every record of the given splits with one model (resumable)")
    add_engine_job_arguments(p, "", model_required=False)
    p.add_argument("--splits", nargs="+", required=True, help="eval split JSONL files")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--run-record", default=None, help="JSON written at the end: what produced these answers")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("score", help="metrics of one prediction file")
    p.add_argument("predictions")
    p.add_argument("out")
    p.add_argument("--model", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--run-record", default=None, help="predict's provenance record: copied into the metrics")
    p.add_argument("--validation", default=None, help="the split's validation report: why a split has no score")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("report-table", help="the RefCOCO table and the paper comparison")
    p.add_argument("--metrics", nargs="+", required=True)
    p.add_argument("--report", type=json_arg, required=True, help="JSON: models, splits, tolerance, expected")
    p.add_argument("--out-prefixes", nargs="+", required=True,
                   help="paths without extension of the RefCOCO table, the paper comparison and, with "
                        "`expected` in --report, the expected-range table")
    p.set_defaults(func=cmd_report_table)

    p = sub.add_parser("report-thresholds",
                       help="lmms-eval's RefCOCO metrics (IoU, ACC@0.1-0.9, Center_ACC) beside the paper's Acc@0.5")
    p.add_argument("--metrics", nargs="+", required=True)
    p.add_argument("--report", type=json_arg, required=True, help="JSON: models, splits")
    p.add_argument("--out-prefix", required=True)
    p.set_defaults(func=cmd_report_thresholds)

    p = sub.add_parser("report-tradeoff", help="the accuracy vs latency trade-off figure")
    p.add_argument("--metrics", nargs="+", required=True)
    p.add_argument("--report", type=json_arg, required=True, help="JSON: models, splits")
    p.add_argument("--out-prefix", required=True)
    p.add_argument("--latency", nargs="*", default=[], help="results/latency/*.json: preferred over the predictions' latency")
    p.set_defaults(func=cmd_report_tradeoff)

    p = sub.add_parser("latency", help="one model's latency under the paper's protocol and at batch 1")
    add_engine_job_arguments(p, ", latency", manifest_required=False)
    p.add_argument("--split", required=True, help="eval split JSONL the sample is drawn from")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_latency)

    p = sub.add_parser("scaling", help="one model's test-time-scaling sweep: budget forcing over a seeded sample")
    add_engine_job_arguments(p, ", scaling (budgets, answer_max_tokens, ...)")
    p.add_argument("--splits", nargs="+", required=True, help="eval split JSONL files the sample is drawn from")
    p.add_argument("--out-dir", required=True, help="budget-{N}.jsonl and budget-{N}.json go here")
    p.add_argument("--work-dir", default=None, help="resume cache: finished budgets, by settings")
    p.set_defaults(func=cmd_scaling)

    p = sub.add_parser("report-scaling", help="the test-time-scaling table and/or figure")
    p.add_argument("--metrics", nargs="+", required=True, help="results/scaling/*/budget-*.json")
    p.add_argument("--report", type=json_arg, required=True, help="JSON: models, order")
    p.add_argument("--table-prefix", default=None)
    p.add_argument("--figure-prefix", default=None)
    p.set_defaults(func=cmd_report_scaling)

    p = sub.add_parser("report-tokens", help="the accuracy vs generated tokens figure")
    p.add_argument("--metrics", nargs="+", required=True)
    p.add_argument("--report", type=json_arg, required=True, help="JSON: models, order, splits")
    p.add_argument("--out-prefix", required=True)
    p.set_defaults(func=cmd_report_tokens)

    p = sub.add_parser("report-latency", help="the latency table: protocol runs or predictions, beside the paper")
    p.add_argument("--metrics", nargs="+", required=True)
    p.add_argument("--latency", nargs="*", default=[], help="results/latency/*.json: preferred over the predictions' latency")
    p.add_argument("--report", type=json_arg, required=True, help="JSON: models, order, splits")
    p.add_argument("--out-prefix", required=True)
    p.set_defaults(func=cmd_report_latency)

    p = sub.add_parser("report-training", help="the training curves: SFT loss, RL reward and loss per run")
    p.add_argument("--stages", nargs="+", required=True, help="finished stage directories, each with training.json")
    p.add_argument("--report", type=json_arg, default=None, help="JSON: models, order (display names of the stages)")
    p.add_argument("--out-prefix", required=True)
    p.set_defaults(func=cmd_report_training)

    p = sub.add_parser("plan", help="price the jobs Snakemake would run (GPU-hours, wall time, memory fit); "
                                    "--check: beside a finished run's measurements")
    p.add_argument("--configfile", nargs="+", required=True)
    p.add_argument("--gpu", default="H100", help="a card of egm/plan/gpus.json (a prefix of its name: H100, A100, H200); "
                                                 "auto: the card the finished run's predictions name (for --check)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs the run has")
    p.add_argument("--json", type=Path, default=None, help="the plan as JSON")
    p.add_argument("--markdown", type=Path, default=None, help="the tables as Markdown (default: stdout)")
    p.add_argument("--check", action="store_true", help="put each job's measurement beside its estimate")
    p.add_argument("--saved", type=Path, default=None,
                   help="with --check: the plan (--json) written before the run, instead of planning anew")
    p.add_argument("--only-missing", action="store_true",
                   help="only the jobs that would run now (default: every job, as on a fresh machine)")
    p.add_argument("--directory", default=".", help="the workflow's directory (Snakefile, results/, .snakemake/)")
    p.add_argument("--records", type=Path, default=None,
                   help="the measurement records (default: benchmarks/results of --directory)")
    p.add_argument("targets", nargs="*", help="Snakemake targets (files or rules); none: rule all")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("config-readme", help="write config/README.md from the config schema's descriptions")
    p.add_argument("--schema", default="workflow/schemas/config.schema.yaml")
    p.add_argument("--out", default="config/README.md")
    p.set_defaults(func=cmd_config_readme)

    from egm.train.cli import add_train_parsers

    add_train_parsers(sub)  # sft, rl
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from egm import __version__

    # EGM_IMAGE is set only inside our Apptainer images: the log shows where each job ran.
    log.info("egm %s %s (image: %s)", __version__, args.command, os.environ.get("EGM_IMAGE", "none"))
    try:
        args.func(args)
    except Exception as err:
        # The reason goes on the log's last line, the one a user reads (Snakemake's
        # show-failed-logs prints the log): one line, and no traceback for bad data or missing
        # files, which are the user's to fix, not the code's.
        if not _expected(err):
            traceback.print_exc()
        log.error("%s failed: %s", args.command, one_line(err))
        return 1
    return 0


def _expected(err: BaseException) -> bool:
    """Failures caused by the data, files or hub access rather than by the code."""
    from egm.data.archives import ArchiveError
    from egm.data.hub import FetchError
    from egm.data.parquet import ParquetRewriteError
    from egm.data.splits import SplitError
    from egm.data.validation import ValidationError
    from egm.options import OptionsError

    if isinstance(err, (ArchiveError, FetchError, ParquetRewriteError, SplitError, ValidationError, OptionsError,
                        FileNotFoundError)):
        return True
    # The hub client's own errors (unknown repo, gated, offline, HTTP): their messages say it all.
    return type(err).__module__.split(".")[0] == "huggingface_hub"


def one_line(err: BaseException) -> str:
    """The exception as one line: its message's lines joined, its type where the message is bare."""
    text = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
    if not text:
        return type(err).__name__
    return text if _expected(err) else f"{type(err).__name__}: {text}"
