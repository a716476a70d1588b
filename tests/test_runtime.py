"""egm.runtime: a GPU job on a machine without the GPUs it asked for fails at once, saying why."""

import pytest

from egm.runtime import RuntimeCheckError, require_gpus


def test_no_gpus_needed_checks_nothing():
    assert require_gpus(0) == 0


def test_missing_gpus_fail_with_what_to_fix(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setenv("EGM_IMAGE", "gpu-vllm-0123456789ab")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    with pytest.raises(RuntimeCheckError) as err:
        require_gpus(2, what="predict egm-8b")
    message = str(err.value)
    assert "predict egm-8b needs 2 GPU(s) but 0 are visible" in message
    assert "CUDA_VISIBLE_DEVICES='0'" in message
    assert "--nv" in message and "SLURM job 42" in message
    assert err.value.code != 0  # a SystemExit with a message exits non-zero


def test_enough_gpus_pass(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert require_gpus(8) == 8
