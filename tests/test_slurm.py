"""The cluster smoke config (config/cluster-smoke.yaml: the paper config's GPU asks on the demo)
through a real one-node SLURM cluster (slurmctld + slurmd + munge, started and stopped here, with
two GPUs as a generic resource), submitted by snakemake-executor-plugin-slurm via profiles/slurm,
every job in the CPU image."""

from __future__ import annotations

import fcntl
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.container_helpers import (
    CANARY_TOKEN,
    APPTAINER_ARGS,
    IS_ROOT,
    apptainer_bin,
    container_workflow,
    cpu_image,
    files_holding,
    image_marker,
    job_logs,
    record_timing,
    snakemake,
    unavailable,
)
from tests.workflow_helpers import REPO, write_config

pytestmark = pytest.mark.slow

LOCAL_RULES = {"demo_mirror", "fetch_dataset", "fetch_model"}
GPU_RULES = {"predict", "scaling", "sft", "rl"}  # the rules whose jobs ask for the models' `gpus:`
SUBMITTED = re.compile(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: (\S+)\)\.")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if not IS_ROOT:
        unavailable("the one-node SLURM cluster runs its daemons as root")
    missing = [t for t in ("munged", "slurmctld", "slurmd", "sbatch", "squeue") if not shutil.which(t)]
    if missing:
        unavailable(f"{', '.join(missing)} missing (ci/setup-system.sh installs them)")
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        unavailable("snakemake-executor-plugin-slurm missing: pip install -e '.[cluster]'")
    # One cluster per machine (fixed config path, fixed ports): concurrent test runs take turns.
    lock = open(Path(tempfile.gettempdir()) / "egm-slurm-cluster.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    rundir = tmp_path_factory.mktemp("slurm")
    start = subprocess.run([str(REPO / "ci" / "slurm-cluster.sh"), "start", str(rundir)],
                           capture_output=True, text=True, timeout=180)
    try:
        if start.returncode != 0:
            pytest.fail(f"starting SLURM failed:\n{start.stderr}")
        yield rundir
    finally:
        subprocess.run([str(REPO / "ci" / "slurm-cluster.sh"), "stop", str(rundir)], capture_output=True, timeout=120)
        lock.close()  # releases the flock


@pytest.fixture(scope="module")
def tools():
    bin_dir = apptainer_bin()
    return bin_dir, cpu_image(bin_dir)


def slurm_snakemake(workdir: Path, bin_dir: Path, configfile: Path, *extra: str) -> subprocess.CompletedProcess:
    return snakemake(
        workdir, bin_dir, *extra, "--profile", "profiles/slurm", "--configfile", str(configfile),
        f"--apptainer-args=--nv {APPTAINER_ARGS}",
        # This cluster has no accounting database: squeue is the status source, no account to guess.
        "--slurm-status-command", "squeue", "--slurm-no-account",
        "--slurm-keep-successful-logs", "--jobs", "4",
        # Poll a one-node cluster every 2 s instead of the plugin's production pacing.
        "--slurm-init-seconds-before-status-checks", "2", "--seconds-between-status-checks", "2",
        timeout=600,
    )


def slurm_job_states(job_ids: list[str]) -> dict[str, str]:
    out = subprocess.run(["squeue", "-t", "all", "-h", "-o", "%i %T", "-j", ",".join(job_ids)],
                         capture_output=True, text=True, check=True).stdout
    return dict(line.split() for line in out.splitlines())


def cluster_smoke_config(image: Path) -> dict:
    """config/cluster-smoke.yaml as CI must run it: this cluster's GPUs are a generic resource with
    no device behind them, and the GPU image (~10 GB) is not built here, so the GPU jobs run in the
    CPU image and, seeing no CUDA device, on the CPU, because these two keys say so."""
    config = yaml.safe_load((REPO / "config/cluster-smoke.yaml").read_text())
    config["containers"]["vllm"] = str(image)
    config["resources"]["gpu_jobs_on_cpu"] = True
    return config


def held_by_slurm(job_id: str) -> dict[str, str]:
    """What slurmctld allocated to a job, as `scontrol show job -d` prints it (sacct needs the
    accounting daemon this cluster lacks; the controller remembers a job for MinJobAge)."""
    out = subprocess.run(["scontrol", "show", "job", "-d", job_id], capture_output=True, text=True, check=True).stdout
    return dict(re.findall(r"(\w[\w/:]*)=(\S*)", out))


def test_cluster_smoke_every_job_through_sbatch_inside_the_image(cluster, tools, tmp_path):
    bin_dir, image = tools
    workdir = container_workflow(tmp_path / "wf", image)
    config = cluster_smoke_config(image)
    configfile = write_config(workdir, config)

    started = time.monotonic()
    result = slurm_snakemake(workdir, bin_dir, configfile)
    record_timing("slurm_demo_s", time.monotonic() - started)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert (workdir / "results/tables/refcoco.md").exists()

    # What the main Snakemake ran: `localrule X:` on this host, `rule X:` handed to the executor.
    ran = re.findall(r"^(local)?rule (\w+):$", output, re.M)
    remote = [rule for local, rule in ran if not local]
    local = {rule for local, rule in ran if local} - {"all"}
    assert local >= LOCAL_RULES and GPU_RULES <= set(remote) and "score" in remote
    submitted = {job_id: Path(log) for job_id, log in SUBMITTED.findall(output)}
    assert len(submitted) == len(remote)  # every non-local job went through sbatch
    slurm_logs = workdir / ".snakemake/slurm_logs"
    rule_of = {job_id: log.relative_to(slurm_logs).parts[0].removeprefix("rule_") for job_id, log in submitted.items()}
    assert set(rule_of.values()) == set(remote)
    logs = job_logs(workdir)
    # SLURM's own record: every submitted id ran to completion on the cluster.
    assert set(slurm_job_states(list(submitted)).items()) == {(job_id, "COMPLETED") for job_id in submitted}
    for job_id, log in submitted.items():
        assert log.name == f"{job_id}.log" and "slurm-jobstep" in log.read_text(), log

    # Each GPU job held, by the controller's account, the GPU, the CPUs per GPU, the memory per
    # GPU and the partition the config asks for; each CPU job held no GPU, in the CPU partition.
    res = config["resources"]
    gpu_jobs = [job_id for job_id, rule in rule_of.items() if rule in GPU_RULES]
    assert len(gpu_jobs) == 8  # predict and scaling of three models, sft, rl
    for job_id, rule in rule_of.items():
        held = held_by_slurm(job_id)
        if rule in GPU_RULES:
            assert held["JOB_GRES"] == "gpu:1" and held["TresPerJob"] == "gres:gpu:1", (rule, held)
            assert held["NumCPUs"] == str(res["cpus_per_gpu"]) and held["CpusPerTres"] == f"gres:gpu:{res['cpus_per_gpu']}"
            assert held["MinMemoryNode"] == f"{res['mem_mb_per_gpu']}M" and held["Partition"] == res["gpu_partition"]
        else:
            assert held.get("JOB_GRES", "(null)") == "(null)" and "TresPerJob" not in held, (rule, held)
            assert held["Partition"] == res["partition"]

    # Inside the job, every egm command ran in the image (its log's first line names it); local
    # rules ran in it on this host. GPU jobs went on without CUDA only because the config said so.
    markers = {str(p.relative_to(workdir)): image_marker(p) for p in logs}
    # But the report's cost table, a local rule on the host by design (it plans through
    # Snakemake's API, which the images leave out).
    assert markers.pop("logs/table_cost.log") == "none", markers
    assert set(markers.values()) == {image.stem}, markers
    for log in ["logs/predict/tiny-base.log", "logs/train/tiny/sft.log", "logs/train/tiny/rl.log"]:
        assert "running on the CPU, as the config's resources.gpu_jobs_on_cpu says" in (workdir / log).read_text(), log
    assert files_holding(workdir, CANARY_TOKEN) == []


def test_unknown_partition_fails_with_sbatchs_error(cluster, tools, tmp_path):
    bin_dir, image = tools
    workdir = container_workflow(tmp_path / "wf", image)
    config = cluster_smoke_config(image)
    config["resources"] = {"partition": "no-such-partition", "cpu_mem_mb": 500}
    configfile = write_config(workdir, config)
    result = slurm_snakemake(workdir, bin_dir, configfile, "resources/manifests/images-coco.json")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "invalid partition specified: no-such-partition" in output, output[-3000:]


def test_gpu_job_gets_a_gpu_and_fails_clearly_without_cuda(cluster, tools, tmp_path):
    """Without resources.gpu_jobs_on_cpu, the same GPU job, granted its (device-less) GPU by SLURM,
    finds no CUDA device and stops at once saying so, instead of running on the CPU."""
    bin_dir, image = tools
    workdir = container_workflow(tmp_path / "wf", image)
    config = cluster_smoke_config(image)
    del config["resources"]["gpu_jobs_on_cpu"]  # the default: refuse
    configfile = write_config(workdir, config)
    result = slurm_snakemake(workdir, bin_dir, configfile, "results/predictions/tiny-base/refcoco_val.jsonl")
    output = result.stdout + result.stderr

    predict = [job_id for job_id, log in SUBMITTED.findall(output) if "/rule_predict/" in log]
    assert len(predict) == 1, output[-4000:]
    assert held_by_slurm(predict[0])["JOB_GRES"] == "gpu:1"  # --gpus=1 reached SLURM and was granted

    assert result.returncode != 0
    reason = (workdir / "logs/predict/tiny-base.log").read_text().strip().splitlines()[-1]
    # Names the job and what it saw: no CUDA device, the GPU SLURM gave it, the image.
    assert "predict resources/models/tiny-base needs 1 GPU(s) but 0 are visible" in reason, reason
    assert "CUDA_VISIBLE_DEVICES='0'" in reason and f"inside image {image.stem}" in reason, reason
    # The failure is reported with the reason on the console and where to look: the job's own
    # log and its SLURM log.
    error = output[output.index("Error in rule predict"):]
    assert "logs/predict/tiny-base.log" in error and reason in error, error[:3000]
    assert re.search(r"slurm_logs/rule_predict/\S+\.log", output), output[-3000:]
