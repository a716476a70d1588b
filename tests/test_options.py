import json

import pytest

from egm.cli import main as egm_main
from egm.options import LatencyOptions, OptionsError, PredictOptions, SamplingOptions, ScalingOptions, TrainOptions, parse_options

INFERENCE = {"max_tokens": 8, "temperature": 0.0, "top_p": 1.0, "top_k": 20, "repetition_penalty": 1.0,
             "presence_penalty": 0.0}


def test_predict_options_become_typed():
    options = parse_options(PredictOptions, {"prompt": "qwen3", "backend": "hf", "gpus": 1,
                                             "inference": {**INFERENCE, "batch_size": 4, "limit": None}})
    assert options.inference.batch_size == 4 and options.engine_options == {} and options.gpus == 1
    assert options.inference.sampling() == SamplingOptions(**INFERENCE)


@pytest.mark.parametrize("cls, data, where, key", [
    (PredictOptions, {"prompt": "qwen3", "backend": "hf", "inference": {**INFERENCE, "batch_size": 1}, "engine": {}},
     "--options", "engine"),
    (PredictOptions, {"prompt": "qwen3", "backend": "hf", "inference": {**INFERENCE, "batch_size": 1, "top_n": 3}},
     "--options.inference", "top_n"),
    (LatencyOptions, {"prompt": "qwen3", "backend": "hf", "inference": INFERENCE,
                      "latency": {"n": 4, "seed": 0, "concurrency": 2, "batch1_n": 1, "warmup": 0, "batch": 1}},
     "--options.latency", "batch"),
    (ScalingOptions, {"prompt": "qwen3", "backend": "hf", "inference": INFERENCE,
                      "scaling": {"budgets": [0], "answer_max_tokens": 8, "n_per_split": 2, "seed": 0, "n": 1}},
     "--options.scaling", "n"),
])
def test_unknown_keys_are_refused_by_name(cls, data, where, key):
    with pytest.raises(OptionsError, match=rf"^{where}: unknown key\(s\) '{key}'"):
        parse_options(cls, data)


def test_missing_keys_are_named():
    with pytest.raises(OptionsError, match="missing key.*'backend'"):
        parse_options(PredictOptions, {"prompt": "qwen3", "inference": {**INFERENCE, "batch_size": 1}})
    with pytest.raises(OptionsError, match="batch_size"):
        parse_options(PredictOptions, {"prompt": "qwen3", "backend": "hf", "inference": INFERENCE})


def test_command_fails_naming_the_unknown_key(tmp_path, caplog):
    options = {"prompt": "qwen3", "backend": "hf", "inference": {**INFERENCE, "batch_size": 1}, "typo": 1}
    rc = egm_main(["predict", "--model-dir", str(tmp_path), "--model-manifest", str(tmp_path / "m.json"),
                   "--splits", str(tmp_path / "s.jsonl"), "--image-root", str(tmp_path), "--out-dir", str(tmp_path),
                   "--options", json.dumps(options)])
    assert rc == 1
    assert "unknown key(s) 'typo'" in caplog.records[-1].getMessage()


def test_training_options_keys_of_the_rule_are_known():
    # The object common.smk's train_options passes.
    options = parse_options(TrainOptions, {"run": "r", "recipe": {"learning_rate": 1e-5}, "max_steps": 2, "limit": None})
    assert options.recipe == {"learning_rate": 1e-5} and options.max_steps == 2


@pytest.mark.parametrize("stage, stage_args", [("sft", ["--data", "d.jsonl", "--image-root", "."]),
                                               ("rl", ["--train", "t.parquet"])])
def test_training_command_fails_naming_the_unknown_key(tmp_path, caplog, stage, stage_args):
    options = {"run": "r", "recipe": {}, "max_step": 3, "limit": None}  # max_steps misspelt
    rc = egm_main([stage, "--model-dir", str(tmp_path), "--model-manifest", str(tmp_path / "m.json"),
                   "--out-dir", str(tmp_path / "out"), "--manifest", str(tmp_path / "out.json"),
                   "--work-dir", str(tmp_path / "work"), "--options", json.dumps(options), *stage_args])
    assert rc == 1
    assert "unknown key(s) 'max_step'" in caplog.records[-1].getMessage()
    assert not (tmp_path / "work").exists()  # refused before the stage started
