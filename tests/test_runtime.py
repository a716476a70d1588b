"""egm.runtime: a GPU job on a machine without the GPUs it asked for fails at once, saying why."""

import pytest

from egm.runtime import GPU_JOBS_ON_CPU_ENV, RuntimeCheckError, require_gpus


def test_no_gpus_needed_checks_nothing():
    assert require_gpus(0) == 0


def test_missing_gpus_fail_with_what_to_fix(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setenv("EGM_IMAGE", "gpu-vllm-0123456789ab")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.delenv(GPU_JOBS_ON_CPU_ENV, raising=False)
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


def test_gpu_jobs_run_on_cpu_only_when_the_config_says_so(monkeypatch, caplog):
    """resources.gpu_jobs_on_cpu reaches the job as GPU_JOBS_ON_CPU_ENV=1; anything else refuses."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    for value in ("0", "", "yes"):
        monkeypatch.setenv(GPU_JOBS_ON_CPU_ENV, value)
        with pytest.raises(RuntimeCheckError, match="predict tiny needs 1 GPU"):
            require_gpus(1, what="predict tiny")
    monkeypatch.setenv(GPU_JOBS_ON_CPU_ENV, "1")
    with caplog.at_level("WARNING", logger="egm.runtime"):
        assert require_gpus(1, what="predict tiny") == 0
    assert "predict tiny needs 1 GPU(s) but 0 are visible (CUDA_VISIBLE_DEVICES='0'): running on the CPU" in caplog.text
    assert "resources.gpu_jobs_on_cpu" in caplog.text
