"""The pieces of the GPU smoke run (config/gpu-smoke.yaml) that run on a CPU: weightless
architecture directories and `load_format: dummy`, the server command lines that serve them,
the latency jobs a config asks for, engine agreement, and the record script's job table."""

import base64
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from benchmarks.agreement import engine_agreement
from egm.infer.backends.server import ServerSpec, server_command
from egm.infer.backends.vllm import vllm_engine_kwargs
from egm.infer.base import Request
from egm.infer.engine import load_engine
from egm.options import SamplingOptions
from tests.workflow_helpers import REPO, copy_workflow, plan, stage_of, write_config


@pytest.fixture(scope="module")
def arch_dir(tmp_path_factory):
    from egm.models.architectures import write_architecture_model

    out = tmp_path_factory.mktemp("arch") / "tiny-arch"
    n_params = write_architecture_model(out, "tiny")
    assert n_params > 0
    return out


def test_weightless_directory_points_at_its_tokenizers_special_tokens(arch_dir):
    from transformers import AutoTokenizer

    from egm.models.architectures import ARCHS

    config = json.loads((arch_dir / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(arch_dir))
    assert config["image_token_id"] == tok.convert_tokens_to_ids("<|image_pad|>")
    assert config["vision_start_token_id"] == tok.convert_tokens_to_ids("<|vision_start|>")
    assert config["text_config"]["eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    assert config["text_config"]["vocab_size"] == ARCHS["tiny"]["vocab"]
    assert not list(arch_dir.glob("*.safetensors"))
    # vLLM chooses its runner from this: without it, LLM.generate refused the weightless 8B on
    # the H200 ("only supported for generative models").
    assert config["architectures"] == ["Qwen3VLForConditionalGeneration"]


def test_eight_b_architecture_has_the_published_size(tmp_path):
    from egm.models.architectures import write_architecture_model

    from PIL import Image

    from egm.models.inputs import build_inputs, load_processor_parts

    # EGM.md section 6: the 8B built this way has 8.767e9 parameters (built on the meta device).
    n = write_architecture_model(tmp_path / "8b", "qwen3-vl-8b")
    assert round(n / 1e9, 3) == 8.767
    # ... and its preprocessing is the released model's: a 640x480 image is 300 visual tokens.
    tok, processor = load_processor_parts(str(tmp_path / "8b"))
    inputs = build_inputs([Image.new("RGB", (640, 480))], ["Locate the cat"], tok, processor)
    assert int((inputs["input_ids"] == tok.convert_tokens_to_ids("<|image_pad|>")).sum()) == 300


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "a.jpg"
    Image.new("RGB", (96, 96), (200, 30, 30)).save(path)
    return path


@pytest.mark.parametrize("decode", ["generate", "graph"])
def test_dummy_load_format_is_seeded_random_init(arch_dir, image, decode):
    request = Request("a", str(image), "Locate the red circle, output its bbox coordinates using JSON format")
    sampling = SamplingOptions(max_tokens=6)
    answers = []
    for _ in range(2):
        engine = load_engine("hf", str(arch_dir), sampling,
                             {"load_format": "dummy", "dtype": "float32", "device": "cpu", "decode": decode})
        answers.append(engine.generate([request])[0])
        engine.close()
    assert answers[0].text == answers[1].text and answers[0].completion_tokens == 6
    # Without the dummy format the same directory has nothing to load.
    with pytest.raises(OSError):
        load_engine("hf", str(arch_dir), sampling, {"dtype": "float32", "device": "cpu"})
    with pytest.raises(ValueError, match="load_format"):
        load_engine("hf", str(arch_dir), sampling, {"load_format": "pt", "device": "cpu"})


def test_dummy_weights_reach_every_engine():
    assert vllm_engine_kwargs("/m", {"load_format": "dummy", "enforce_eager": True})["load_format"] == "dummy"
    vllm = server_command(ServerSpec(kind="vllm", model_dir="/m", load_format="dummy", enforce_eager=True))
    assert "--load-format dummy" in " ".join(vllm) and "--enforce-eager" in vllm
    sglang = server_command(ServerSpec(kind="sglang", model_dir="/m", load_format="dummy", enforce_eager=True))
    assert "--load-format dummy" in " ".join(sglang) and "--disable-cuda-graph" in sglang
    plain = " ".join(server_command(ServerSpec(kind="vllm", model_dir="/m")))
    assert "--load-format" not in plain and "--enforce-eager" not in plain
    with pytest.raises(ValueError, match="load_format"):
        server_command(ServerSpec(kind="transformers", model_dir="/m", load_format="dummy"))


def test_gpu_smoke_config_plans_predict_latency_and_tables(tmp_path):
    copy_workflow(tmp_path)
    outputs = plan(tmp_path, tmp_path / "config" / "gpu-smoke.yaml",
                   targets=["table_refcoco", "table_latency", "figure_tradeoff"])
    stages = Counter(stage_of(p) for p in outputs)
    assert stages["predict"] == 4 * 9 and stages["score"] == 4 * 8
    # latency.models: only the two vLLM models are served and timed.
    latency = sorted(p for p in outputs if p.startswith("results/latency/"))
    assert latency == ["results/latency/qwen3-vl-8b-vllm.json", "results/latency/tiny-sft-vllm.json"]


def test_latency_models_must_be_evaluated_models(tmp_path):
    import yaml

    copy_workflow(tmp_path)
    config = yaml.safe_load((tmp_path / "config" / "gpu-smoke.yaml").read_text())
    config["latency"]["models"] = ["tiny-sft-vllm", "no-such-model"]
    with pytest.raises(Exception, match="no-such-model"):
        plan(tmp_path, write_config(tmp_path, config))


def _predictions(directory: Path, rows: list[dict]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    by_split: dict[str, list] = {}
    for row in rows:
        by_split.setdefault(row["split"], []).append(row)
    for split, split_rows in by_split.items():
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in split_rows))


def _row(split, rid, box, tokens=10, answer="x"):
    return {"split": split, "line": rid, "id": rid, "status": "ok", "parsed_box": box, "iou": 0.5,
            "completion_tokens": tokens, "answer": answer}


def test_engine_agreement_counts_equal_boxes_and_lists_the_rest(tmp_path):
    a = [_row("s1", 1, [1, 2, 3, 4]), _row("s1", 2, [1, 2, 3, 4]), _row("s2", 3, None), _row("s2", 4, [5, 5, 6, 6])]
    b = [_row("s1", 1, [1, 2, 3, 4]), _row("s1", 2, [1, 2, 3, 5], tokens=11), _row("s2", 3, None)]
    _predictions(tmp_path / "a", a)
    _predictions(tmp_path / "b", b)
    result = engine_agreement(tmp_path / "a", tmp_path / "b", ["s1", "s2"])
    assert result["records"] == 4 and result["both_answered"] == 3
    assert result["equal_boxes"] == 2 and result["share_equal_boxes"] == 0.5
    assert result["only_in_a"] == ["s2/4"] and result["only_in_b"] == []
    assert [(d["split"], d["id"]) for d in result["differences"]] == [("s1", "2")]
    assert result["differences"][0]["b"]["completion_tokens"] == 11
    assert result["equal_token_counts"] == 2


def test_record_script_groups_each_jobs_outputs(tmp_path):
    """benchmarks/gpu_pipeline.py on a made-up run: one predict job with two outputs is one job."""
    meta = tmp_path / ".snakemake" / "metadata"
    meta.mkdir(parents=True)
    pred = tmp_path / "results" / "predictions" / "m"
    _predictions(pred, [_row("refcoco_val", 1, [1, 2, 3, 4], tokens=30), _row("refcoco_val", 2, None, tokens=10)])
    (pred / "run.json").write_text(json.dumps({"job": {"engine": {"backend": "vllm", "version": "0"}}}))
    for out, start in (("results/predictions/m/refcoco_val.jsonl", 100.0), ("results/predictions/m/run.json", 100.2)):
        name = base64.b64encode(out.encode()).decode().replace("/", "@")
        (meta / name).write_text(json.dumps({"rule": "predict", "job_hash": 7, "starttime": start, "endtime": 104.0,
                                             "incomplete": False}))
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"splits": ["refcoco_val"], "models": {"m": {"repo_id": "r", "backend": "vllm"}}}))
    out = tmp_path / "record.json"
    subprocess.run([sys.executable, "-m", "benchmarks.gpu_pipeline", "--config", str(config),
                    "--root", str(tmp_path), "--out", str(out)], check=True, capture_output=True, cwd=REPO)
    record = json.loads(out.read_text())
    (job,) = record["jobs"]
    assert job["rule"] == "predict" and job["model"] == "m" and job["backend"] == "vllm"
    assert job["wall_s"] == 4.0 and job["records"] == 2 and job["completion_tokens"] == 40
    assert job["tokens_per_s"] == 10.0
    assert record["runs"]["m"]["engine"]["backend"] == "vllm"


def test_agreement_pairs_are_one_checkpoint_through_two_engines():
    import yaml

    from benchmarks import gpu_pipeline

    models = yaml.safe_load((REPO / "config" / "gpu-smoke.yaml").read_text())["models"]
    # The random 8B is drawn by each engine on its own: not a pair to compare.
    assert gpu_pipeline.engine_pairs(models) == [("tiny-sft-vllm", "tiny-sft-hf")]
