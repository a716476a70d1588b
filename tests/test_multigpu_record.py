"""Issue 17's two-GPU runs, what can be checked without a GPU: the record script on hand-made
outputs, the options each run gets (as the rules would build them), and the commands
benchmarks/multigpu.sh runs (its dry run)."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import multigpu

REPO = Path(__file__).resolve().parents[1]
CONFIG = multigpu.load_config()
SPLIT = CONFIG["predict"]["split"]


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def training_manifest(work, run, stage, world, steps, peaks, losses, micro=8, accumulation=4):
    stage_dir = work / "train" / "results" / "checkpoints" / run / stage
    write_json(stage_dir / "training.json", {"log_history": [{"loss": v, "step": i + 1} for i, v in enumerate(losses)]
                                             + [{"train_runtime": 9.0, "step": len(losses)}]})
    write_json(stage_dir.with_suffix(".json"), {
        "world_size": world, "global_step": len(steps), "wall_s": 60.0, "dest": f"results/checkpoints/{run}/{stage}",
        "trl_args": {"per_device_train_batch_size": micro, "gradient_accumulation_steps": accumulation,
                     **({"deepspeed": "config/recipes/deepspeed_zero3.json"} if world > 1 else {})},
        "train_metrics": {"train_runtime": 9.0}, "log": {"first": {"loss": losses[0]}, "last": {"loss": losses[-1]}},
        "cost": {"step_s": steps, "processes": [{"rank": r, "device": "NVIDIA H200", "peak_allocated_gib": p,
                                                 "peak_reserved_gib": p + 1} for r, p in enumerate(peaks)]},
    })


def predictions(work, key, boxes, answer_s, load_s=30.0, rc=0):
    root = work / "predict"
    rows = [{"split": SPLIT, "id": i, "line": i + 1, "status": "ok", "parsed_box": box, "iou": 0.5,
             "completion_tokens": 10, "answer": str(box)} for i, box in enumerate(boxes)]
    path = root / "results" / "predictions" / key / f"{SPLIT}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"split": SPLIT, "records": len(rows), "newly_answered": len(rows), "bad_records": 0, "problem": None,
               "engine_load_s": load_s, "answer_s": answer_s}
    log = root / "logs" / "predict" / f"{key}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"2026-01-01 00:00:00 INFO egm: {SPLIT}: 8/8 answered\n"
                   f"2026-01-01 00:00:01 INFO egm: done: {json.dumps(summary, sort_keys=True)}\n")
    write_json(work / "status" / f"predict-{key}.json", {"rc": rc, "wall_s": answer_s + load_s, "limit_s": 420})
    return log


@pytest.fixture
def work(tmp_path):
    """A work directory as multigpu.sh leaves it after sft, predict hf and ray pp (GRPO not run)."""
    write_json(tmp_path / "environment.json", {"device": {"gpus": ["NVIDIA H200 (143771 MiB)"] * 2},
                                               "versions": {"deepspeed": "0.19.8"}})
    # SFT: first step slow (set-up), then 2.0 s a step on one GPU, 1.25 s on two.
    training_manifest(tmp_path, "gpus1", "sft", 1, [9.0, 2.0, 2.1, 1.9], [40.0], [2.5, 2.4, 2.3, 2.2])
    training_manifest(tmp_path, "gpus2", "sft", 2, [12.0, 1.25, 1.3, 1.2], [21.0, 20.5], [2.51, 2.4, 2.3, 2.2],
                      accumulation=2)
    write_json(tmp_path / "status" / "sft-gpus1.json", {"rc": 0, "wall_s": 80.0, "limit_s": 330})
    boxes = [[i, i, i + 5, i + 5] for i in range(8)]
    predictions(tmp_path, "tiny-sft-hf-1gpu", boxes, answer_s=8.0)
    predictions(tmp_path, "tiny-sft-hf-2gpu", boxes[:7] + [[0, 0, 1, 1]], answer_s=4.2)
    predictions(tmp_path, "tiny-sft-vllm-1gpu", boxes, answer_s=4.0)
    ray_log = predictions(tmp_path, "tiny-sft-vllm-ray-pp", boxes, answer_s=6.0)
    ray_log.write_text("INFO egm.infer.backends.ray_slurm: ray cluster up: 2 nodes; running python -m egm predict\n"
                       + ray_log.read_text())
    write_json(tmp_path / "status" / "ray-pp.json", {"rc": 0, "wall_s": 200.0, "limit_s": 480})
    return tmp_path


def test_record_compares_two_gpus_with_one(work):
    record = multigpu.record(CONFIG, work)
    sft = record["sft"]
    one, two = sft["runs"]["gpus1"], sft["runs"]["gpus2"]
    # Steady state: the median after the first step, so the set-up's 9 s and 12 s do not count.
    assert one["median_step_s_after_first"] == 2.0 and two["median_step_s_after_first"] == 1.25
    assert sft["speedup_steps_per_s"] == 1.6
    assert one["samples_per_step"] == two["samples_per_step"] == 32 and two["samples_per_s"] == 25.6
    assert two["peak_allocated_gib"] == [21.0, 20.5] and two["peak_reserved_gib"] == [22.0, 21.5]
    assert two["deepspeed"] is True and one["deepspeed"] is False
    assert two["losses"] == [2.51, 2.4, 2.3, 2.2] and one["status"]["rc"] == 0 and two["status"] is None
    loss = sft["first_step_loss"]
    assert loss["relative_difference"] == 0.004 and loss["within_tolerance"] is True
    assert sft["options"]["recipe"]["global_batch_size"] == 32

    hf = record["predict"]["hf"]["tiny-sft"]
    assert hf["runs"]["gpus1"]["samples_per_s"] == 1.0 and hf["runs"]["gpus2"]["samples_per_s"] == 1.905
    assert hf["speedup_samples_per_s"] == 1.905 and hf["meets_target"] is True
    assert hf["runs"]["gpus2"]["engine_load_s"] == 30.0  # reported, not counted in samples/s
    assert hf["agreement"]["records"] == 8 and hf["agreement"]["equal_boxes"] == 7
    assert hf["agreement"]["differences"][0]["id"] == "7"

    ray = record["ray"]["pp"]
    assert ray["nodes_joined"] == 2 and ray["agreement"]["equal_boxes"] == 8
    assert ray["options"]["pipeline_parallel_size"] == 2 and ray["options"]["distributed_executor_backend"] == "ray"
    assert "tp" not in record["ray"]  # an alternative that was not run

    # What did not run is named, as paths inside the work directory, never this machine's.
    assert "grpo.hf.runs.gpus1" in record["missing"] and "predict.vllm.tiny-sft.runs.gpus2" in record["missing"]
    assert "predict.hf.tiny-sft.runs.gpus1" not in record["missing"]
    missing = record["grpo"]["hf"]["runs"]["gpus1"]["missing"]
    assert missing == "train/results/checkpoints/gpus1/rl.json"
    assert record["environment"]["versions"]["deepspeed"] == "0.19.8"


def test_speedup_below_target_and_first_loss_outside_tolerance_are_flagged(work):
    predictions(work, "tiny-sft-hf-2gpu", [[i, i, i + 5, i + 5] for i in range(8)], answer_s=6.0)
    training_manifest(work, "gpus2", "sft", 2, [3.0, 1.0], [20.0, 20.0], [2.7, 2.4], accumulation=2)
    record = multigpu.record(CONFIG, work)
    assert record["predict"]["hf"]["tiny-sft"]["speedup_samples_per_s"] == 1.333
    assert record["predict"]["hf"]["tiny-sft"]["meets_target"] is False
    assert record["predict"]["hf"]["tiny-sft"]["agreement"]["equal_boxes"] == 8
    assert record["sft"]["first_step_loss"]["within_tolerance"] is False


def test_steady_rate_leaves_the_first_chunk_out_and_each_run_names_its_code(work):
    key = "tiny-sft-vllm-1gpu"
    log = work / "predict" / "logs" / "predict" / f"{key}.log"
    # The first chunk (4 records) took 10 s with kernel compilation; the next two 2 s each.
    log.write_text(f"2026-01-01 00:00:10,500 INFO egm.infer.predict: {SPLIT}: 4/12 answered\n"
                   f"2026-01-01 00:00:12,500 INFO egm.infer.predict: {SPLIT}: 8/12 answered\n"
                   f"2026-01-01 00:00:14,500 INFO egm.infer.predict: {SPLIT}: 12/12 answered\n"
                   + log.read_text().splitlines(keepends=True)[-1])  # the job's `done:` line
    write_json(work / "predict" / "results" / "predictions" / key / "run.json",
               {"job": {"egm": {"commit": "abc", "dirty": True}, "engine": {"backend": "vllm"}}})
    record = multigpu.record(CONFIG, work)
    run = record["predict"]["vllm"]["tiny-sft"]["runs"]["gpus1"]
    assert run["steady_samples_per_s"] == 2.0 and run["egm"] == {"commit": "abc", "dirty": True}
    # One chunk: no steady rate to give.
    assert record["predict"]["hf"]["tiny-sft"]["runs"]["gpus1"]["steady_samples_per_s"] is None
    assert record["predict"]["vllm"]["tiny-sft"]["speedup_steady_samples_per_s"] is None


def test_restore_keeps_finished_runs_and_redo_forgets_one(work, tmp_path):
    """The next machine takes an earlier call's archive: its runs count and are skipped, its
    environment and prepared-data steps do not (that machine's data is not in the archive)."""
    write_json(work / "status" / "prep-predict.json", {"rc": 0, "wall_s": 1.0, "limit_s": 300})
    archive = tmp_path / "multigpu-logs.tar.gz"
    subprocess.run(["tar", "-czf", str(archive), "status", "environment.json", "predict", "train"], cwd=work, check=True)
    again = tmp_path / "again"
    env = {**os.environ, "EGM_MGPU_WORK": str(again)}
    script = str(REPO / "benchmarks" / "multigpu.sh")
    subprocess.run(["bash", script, "restore", str(archive)], env=env, check=True, capture_output=True)
    assert (again / "status" / "predict-tiny-sft-hf-1gpu.json").exists()
    assert not (again / "environment.json").exists() and not (again / "status" / "prep-predict.json").exists()
    assert multigpu.record(CONFIG, again)["predict"]["hf"]["tiny-sft"]["speedup_samples_per_s"] == 1.905

    subprocess.run(["bash", script, "redo", "predict-tiny-sft-hf-2gpu", "ray-pp"], env=env, check=True,
                   capture_output=True)
    predictions = again / "predict" / "results" / "predictions"
    assert not (predictions / "tiny-sft-hf-2gpu").exists() and not (predictions / "tiny-sft-vllm-ray-pp").exists()
    assert not (again / "status" / "predict-tiny-sft-hf-2gpu.json").exists()
    assert not (again / "status" / "ray-pp.json").exists()
    assert (predictions / "tiny-sft-hf-1gpu").exists()
    refused = subprocess.run(["bash", script, "redo", "sft-gpus1"], env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "sft-gpus1" in refused.stderr


def test_record_command_writes_the_file(work, tmp_path):
    out = tmp_path / "out" / "multigpu-h200x2.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks.multigpu", "record", "--work", str(work),
                             "--out", str(out)], capture_output=True, text=True, check=True, cwd=REPO)
    assert json.loads(out.read_text())["sft"]["speedup_steps_per_s"] == 1.6
    assert "predict hf tiny-sft: samples/s [1.0, 1.905] speed-up 1.905 equal boxes 7/8" in result.stdout


@pytest.mark.parametrize("gpus", [1, 2])
def test_training_options_are_the_rules_and_fit_the_gpu_count(gpus):
    from egm.train.recipes import rl_args, sft_args

    sft = multigpu.train_options(CONFIG, "sft", f"gpus{gpus}")
    assert set(sft) == {"run", "recipe", "max_steps", "limit"}  # common.smk's train_options
    args = sft_args(sft["recipe"], world_size=gpus, on_gpu=True, max_steps=sft["max_steps"])
    assert args["per_device_train_batch_size"] * args["gradient_accumulation_steps"] * gpus == 32
    assert args["bf16"] is True and ("deepspeed" in args) == (gpus > 1) and sft["max_steps"] >= 10
    for rollout in CONFIG["train"]["rl"]["rollouts"]:
        rl = multigpu.train_options(CONFIG, "rl", multigpu.train_run(gpus, rollout), rollout)
        server = rollout == "vllm-server"
        if server and gpus == 1:
            continue  # the server takes a GPU of its own: two GPUs only
        # Server mode trains on the GPUs the server leaves (egm.train.cli), with the address it gets.
        world = gpus - rl["recipe"]["rollout_gpus"] if server else gpus
        args = rl_args(rl["recipe"], world_size=world, on_gpu=True, vllm_available=True,
                       server_url="http://127.0.0.1:8000" if server else None)
        assert args["per_device_train_batch_size"] * args["gradient_accumulation_steps"] * world == 32
        assert args["use_vllm"] is (rollout != "hf")
        assert args.get("vllm_mode") == {"hf": None, "vllm": "colocate", "vllm-server": "server"}[rollout]


def test_predict_options_parse_as_the_predict_command_does():
    from egm.infer.backends.vllm import vllm_engine_kwargs
    from egm.options import PredictOptions, parse_options

    for model, spec in CONFIG["predict"]["models"].items():
        for engine in spec["engines"]:
            for gpus in (1, 2):
                options = parse_options(PredictOptions, multigpu.predict_options(CONFIG, model, engine, gpus))
                assert options.gpus == gpus and options.engine_options["data_parallel_size"] == gpus
                assert options.inference.batch_size == 64
                if engine == "vllm":
                    vllm_engine_kwargs("m", options.engine_options)  # no unknown engine option
    for variant in CONFIG["ray"]["variants"]:
        options = parse_options(PredictOptions, multigpu.ray_options(CONFIG, variant))
        assert options.engine_options["data_parallel_size"] == 1 and options.gpus == 1
        assert vllm_engine_kwargs("m", options.engine_options)["distributed_executor_backend"] == "ray"
    # A multiple of every engine's chunk times two replicas: the replicas get one GPU's batches.
    assert CONFIG["predict"]["records"] % (2 * 512) == 0


def dry_run(*args) -> list[list[str]]:
    """The commands `multigpu.sh ARGS` would run, each as its argument list (cwd and log kept)."""
    env = {**os.environ, "EGM_DRY_RUN": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", str(REPO / "benchmarks" / "multigpu.sh"), *args], capture_output=True, text=True,
                         env=env, check=True).stdout
    commands = []
    for line in out.splitlines():
        assert line.startswith("(cd ") and line.endswith(" 2>&1)"), line
        words = shlex.split(line[1:-len(" 2>&1)")])
        commands.append(words)
    return commands


def option(words, name):
    return words[words.index(name) + 1]


def test_sft_runs_the_rules_command_on_one_gpu_then_two():
    commands = [w for w in dry_run("sft") if "sft" in w]
    assert len(commands) == 2
    for words, gpus, visible in zip(commands, (1, 2), ("0", "0,1")):
        assert words[3:5] == ["env", f"CUDA_VISIBLE_DEVICES={visible}"] and words[5:9] == ["python", "-m", "egm", "sft"]
        assert option(words, "--gpus") == str(gpus)
        run = f"gpus{gpus}"
        assert option(words, "--manifest") == f"results/checkpoints/{run}/sft.json"  # where the record reads it
        assert words[-1] == f">logs/train/{run}/sft.log"
        assert json.loads(option(words, "--options")) == multigpu.train_options(CONFIG, "sft", run)


def test_grpo_and_predict_and_ray_write_where_the_record_reads():
    grpo = [w for w in dry_run("grpo", "vllm") if "rl" in w]
    assert [option(w, "--out-dir") for w in grpo] == ["results/checkpoints/gpus1-vllm/rl",
                                                      "results/checkpoints/gpus2-vllm/rl"]
    assert all(option(w, "--model-dir") == "results/checkpoints/gpus1/sft" for w in grpo)
    assert json.loads(option(grpo[1], "--options"))["recipe"]["rollout"] == "vllm"

    predict = [w for w in dry_run("predict", "hf", "qwen3-vl-8b") if "predict" in w]
    keys = [multigpu.predict_key("qwen3-vl-8b", "hf", g) for g in (1, 2)]
    assert [option(w, "--model") for w in predict] == keys
    assert [w[-1] for w in predict] == [f">logs/predict/{k}.log" for k in keys]
    assert json.loads(option(predict[1], "--options"))["engine_options"]["data_parallel_size"] == 2

    ray = [w for w in dry_run("ray", "tp") if "egm.infer.backends.ray_slurm" in w]
    assert len(ray) == 1
    words = ray[0]
    assert option(words, "--local-nodes") == "2" and option(words, "--gpus-per-node") == "1"
    assert option(words, "--model") == multigpu.ray_key("tiny-sft", "tp")
    assert json.loads(option(words, "--options"))["engine_options"]["tensor_parallel_size"] == 2


def test_prepare_commands_draw_weights_and_size_images(tmp_path):
    """What `multigpu.sh prepare` asks of the pipeline's commands: an architecture with random
    weights saved (training needs tensors), demo images at the paper's 640x480."""
    from egm.cli import main
    from egm.train.common import weight_names

    assert main(["write-architecture", "--arch", "tiny", "--weights", "--out", str(tmp_path / "arch")]) == 0
    assert weight_names(tmp_path / "arch")  # real tensors, unlike the weightless default
    assert main(["write-architecture", "--arch", "tiny", "--out", str(tmp_path / "bare")]) == 0
    assert weight_names(tmp_path / "bare") is None
    assert main(["make-demo", "--mirror", str(tmp_path / "m"), "--dataset-repo", "d/ds", "--model-repo", "d/tiny",
                 "--train-images", "2", "--eval-per-split", "1", "--width", "64", "--height", "48",
                 "--summary", str(tmp_path / "demo.json")]) == 0
    dataset = json.loads((tmp_path / "demo.json").read_text())["dataset"]
    assert (dataset["width"], dataset["height"]) == (64, 48)
