#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for the workflow's SLURM tests:
# munged + slurmctld + slurmd from Debian (22.05), no accounting daemon, two GPUs that exist only as
# a generic resource (count only: SLURM schedules them and sets CUDA_VISIBLE_DEVICES in the job, but
# no device is behind them), and two partitions on the one node: `main` and `gpu`.
#
#   ci/slurm-cluster.sh start RUNDIR     # state, spool and logs under RUNDIR; waits until idle
#   ci/slurm-cluster.sh stop RUNDIR      # stops only the daemons `start` launched
#
# Needs root and the Debian packages slurmctld slurmd slurm-client munge (ci/setup-system.sh).
# slurm.conf must live at /etc/slurm/slurm.conf: the job step drops SLURM_CONF, so a config
# elsewhere is not seen inside jobs. A config this script did not write is never replaced, and
# `stop` removes the one it wrote.
set -euo pipefail

CONF_DIR=/etc/slurm
MARKER="# written by egm ci/slurm-cluster.sh"

say() { echo "slurm-cluster: $*" >&2; }
die() { say "$*"; exit 1; }

cmd="${1:-}"
rundir="${2:-}"
[[ "$cmd" == start || "$cmd" == stop ]] && [[ -n "$rundir" ]] || die "usage: $0 start|stop RUNDIR"
mkdir -p "$rundir"
rundir="$(cd "$rundir" && pwd)"

stop_pidfile() {
    local pidfile="$1" pid
    [[ -f "$pidfile" ]] || return 0
    pid="$(cat "$pidfile")"
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

if [[ "$cmd" == stop ]]; then
    stop_pidfile "$rundir/slurmd.pid"
    stop_pidfile "$rundir/slurmctld.pid"
    # munged only if this script started it (another munged may serve a real cluster).
    [[ -f "$rundir/munged.ours" ]] && stop_pidfile "$rundir/munged.pid"
    rm -f "$rundir/munged.ours"
    # A config naming a controller that is gone makes every SLURM client (and Snakemake's SLURM
    # plugin, at each start) wait for a timeout: remove ours.
    # Only the config of this run directory: another run's cluster may be using its own.
    for conf in "$CONF_DIR/slurm.conf" "$CONF_DIR/gres.conf"; do
        if [[ -f "$conf" ]] && grep -qF "$MARKER (run directory $rundir)" "$conf"; then rm -f "$conf"; fi
    done
    say "stopped"
    exit 0
fi

[[ $EUID -eq 0 ]] || die "needs root (slurmd runs jobs as their owner)"
for tool in munged slurmctld slurmd sbatch squeue sinfo; do
    command -v "$tool" >/dev/null || die "$tool missing: apt-get install slurmctld slurmd slurm-client munge"
done
if [[ -f "$CONF_DIR/slurm.conf" ]] && ! grep -qF "$MARKER" "$CONF_DIR/slurm.conf"; then
    die "$CONF_DIR/slurm.conf belongs to another SLURM set-up; not replacing it"
fi

if pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null; then
    die "slurmctld/slurmd already running (pids $(pgrep -d, -x 'slurmctld|slurmd')): stop that cluster first"
fi

host="$(hostname -s)"
gpu_files=(/dev/null /dev/zero)
gpus=${#gpu_files[@]}
cpus="$(nproc)"
mem_mb="$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)"
mkdir -p "$rundir/state" "$rundir/spool" "$CONF_DIR"

cat >"$CONF_DIR/slurm.conf" <<EOF
$MARKER (run directory $rundir)
ClusterName=egmci
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$rundir/state
SlurmdSpoolDir=$rundir/spool
SlurmctldPidFile=$rundir/slurmctld.pid
SlurmdPidFile=$rundir/slurmd.pid
SlurmctldLogFile=$rundir/slurmctld.log
SlurmdLogFile=$rundir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Finished jobs stay visible to squeue and scontrol for an hour: without slurmdbd they are the only
# status source, and the tests read each job's allocation back after the whole run.
MinJobAge=3600
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
ReturnToService=2
SlurmdTimeout=60
GresTypes=gpu
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb Gres=gpu:$gpus State=UNKNOWN
PartitionName=main Nodes=$host Default=YES MaxTime=INFINITE State=UP
# What config/cluster-smoke.yaml's resources.gpu_partition names: GPU jobs are scheduled apart.
PartitionName=gpu Nodes=$host MaxTime=INFINITE State=UP
EOF
# SLURM counts and indexes a GPU by its device file; any character device stands in for one.
{
    echo "$MARKER (run directory $rundir)"
    for dev in "${gpu_files[@]}"; do echo "NodeName=$host Name=gpu File=$dev"; done
} >"$CONF_DIR/gres.conf"

if echo | munge 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "using the munged already running"
else
    mkdir -p /run/munge && chown munge: /run/munge
    rm -f /run/munge/munged.pid
    runuser -u munge -- munged 2>>"$rundir/munged.log" || die "munged failed to start (see $rundir/munged.log)"
    for _ in $(seq 50); do [[ -s /run/munge/munged.pid ]] && break; sleep 0.1; done
    cp /run/munge/munged.pid "$rundir/munged.pid" || die "munged wrote no pid file"
    touch "$rundir/munged.ours"
fi

slurmctld -c -f "$CONF_DIR/slurm.conf" || die "slurmctld failed (see $rundir/slurmctld.log)"
slurmd -f "$CONF_DIR/slurm.conf" || die "slurmd failed (see $rundir/slurmd.log)"

for _ in $(seq 60); do
    state="$(sinfo -h -N -o '%T' 2>/dev/null | head -n1 || true)"
    [[ "$state" == idle ]] && break
    if [[ "$state" == down* || "$state" == drain* ]]; then
        scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true
    fi
    sleep 1
done
[[ "$state" == idle ]] || die "node not idle after 60 s (state: ${state:-none}); see $rundir/slurm*.log"
say "up: node $host, $cpus CPUs, $gpus GPUs (a generic resource, no devices), partitions main and gpu"
