"""The jobs of a run as Snakemake itself plans them: its API builds the DAG for a config and
targets, and each job comes back with its rule, wildcards, GPUs, decoded params, dependencies
and benchmark file. No second DAG of ours: a changed config or target changes this list because
it changes Snakemake's.

Snakemake is imported here, inside the function: `egm` stays importable without it.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class PlannedJob:
    jobid: int
    rule: str
    wildcards: dict
    gpus: int
    params: dict
    outputs: list[str]
    depends_on: list[int]
    benchmark: str | None
    log: list[str]
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.rule + "".join(f" {k}={v}" for k, v in sorted(self.wildcards.items()))


def _decode(value):
    """A rule param as the job's command gets it: the JSON options (common.smk's json_arg) are
    shell-quoted JSON; anything else is kept as Snakemake holds it."""
    if isinstance(value, str):
        try:
            parts = shlex.split(value)
            if len(parts) == 1:
                return json.loads(parts[0])
        except ValueError:
            pass
    return value


def planned_jobs(snakefile: Path, configfiles: list[Path], targets: list[str] | None = None,
                 workdir: Path | None = None, forceall: bool = True) -> tuple[list[PlannedJob], dict]:
    """(jobs, the validated config) of the run `snakemake --configfile ... targets` would make.

    forceall: every job the targets need, as on a fresh machine (what a reproduction costs);
    otherwise only the jobs that would run now. The DAG is built as `snakemake --dry-run` builds
    it, with the lock left alone (a running pipeline may hold it)."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, DAGSettings, OutputSettings, Quietness, ResourceSettings

    workdir = Path(workdir or Path(snakefile).parent).resolve()
    with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
        workflow_api = api.workflow(
            resource_settings=ResourceSettings(cores=1),
            config_settings=ConfigSettings(configfiles=[Path(c).resolve() for c in configfiles]),
            snakefile=Path(snakefile).resolve(),
            workdir=workdir,
        )
        settings = DAGSettings(targets=set(targets or []), forceall=forceall)
        dag_api = workflow_api.dag(dag_settings=settings)
        # What DAGApi.printdag() does before it prints: the DAG built, nothing executed.
        workflow = dag_api.workflow_api._workflow
        workflow._prepare_dag(forceall=forceall, ignore_incomplete=True, lock_warn_only=True, nolock=True)
        workflow._build_dag()
        dag = workflow.dag
        needed = set(dag.needrun_jobs())
        jobs = []
        for job in needed:
            jobs.append(PlannedJob(
                jobid=job.jobid,
                rule=job.rule.name,
                wildcards=dict(job.wildcards),
                gpus=int(job.resources.get("gpu", 0) or 0),
                params={k: _decode(v) for k, v in job.params.items()},
                outputs=[str(o) for o in job.output],
                depends_on=[d.jobid for d in dag.dependencies[job] if d in needed],
                benchmark=str(job.benchmark) if job.benchmark else None,
                log=[str(x) for x in job.log],
            ))
        config = dict(workflow.config)
    jobs.sort(key=lambda j: j.jobid)
    return jobs, config
