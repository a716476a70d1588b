#!/usr/bin/env bash
# The GPU smoke run (config/gpu-smoke.yaml) through Snakemake itself, on a GPU machine that has
# torch and transformers but none of the pipeline's other packages and no network.
#
#   benchmarks/gpu_pipeline.sh install WHEELS...   # pip-install wheel files into $EGM_SITE (once)
#   benchmarks/gpu_pipeline.sh run TARGETS...      # snakemake those targets, then write the record
#
# The record (benchmarks/gpu_pipeline.py) goes to $OUT/gpu-pipeline-<card>.json where OUT is set,
# else under results/; the run's logs and small outputs are packed beside it.
# Every GPU job runs alone (--resources gpu=1), so each job's wall time is its own.
set -uo pipefail
site=${EGM_SITE:-/tmp/egm-site}
out=${OUT:-results}
cmd=${1:?usage: gpu_pipeline.sh install WHEELS... | run TARGETS...}
shift

if [ "$cmd" = install ]; then
  [ -f "$site/.installed" ] && exit 0
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$@" || exit
  touch "$site/.installed"
  exit 0
fi

# Every step is time-boxed and logs, with a timestamp, to $out/gpu-run.log as it goes: on the
# GPU machine a call that outlives its limit returns nothing under $OUT, so the command must end
# on its own, well inside that limit (EGM_RUN_TIMEOUT: seconds for Snakemake, the rest ~2 min).
mkdir -p "$out"
runlog="$out/gpu-run.log"
step() { echo "== $(date +%T) $*" | tee -a "$runlog"; }

# Rules call `python -m egm`; console scripts (vllm serve, snakemake) live in the site's bin.
# A wrapper, not a symlink: a venv's python reached through a symlink elsewhere loses the venv.
# Written beside and moved into place: writing to a path that is a symlink (a /tmp/egm-bin/python
# left by another run) would overwrite its target, the interpreter itself.
mkdir -p /tmp/egm-bin && wrapper=$(mktemp /tmp/egm-bin/.python.XXXXXX) &&
  printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" >"$wrapper" && chmod +x "$wrapper" &&
  mv -f "$wrapper" /tmp/egm-bin/python
export PATH="$site/bin:/tmp/egm-bin:$PATH" PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 VLLM_USE_FLASHINFER_SAMPLER=0 TOKENIZERS_PARALLELISM=false
step "device"; timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$runlog" 2>&1
step "python -m egm starts"; timeout 60 python -m egm --help >/dev/null 2>>"$runlog"
# A run cut short (SIGINT: Snakemake marks what it stopped as incomplete) still gets its record
# written; the next run unlocks the directory and answers what is missing.
step "unlock"; timeout 60 python3 -m snakemake --unlock --configfile config/gpu-smoke.yaml >/dev/null 2>&1
# The price before the run (egm plan, docs/cost.md): the same targets on this card, one GPU.
card=$(timeout 30 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
# Files named for the card: h100, h200 (the records of different cards sit side by side).
slug=$(echo "$card" | grep -o -i -E 'h100|h200|a100' | head -n 1 | tr 'A-Z' 'a-z')
slug=${slug:-gpu}
# Made once, before the first run of these targets: results/ outlives the calls on a held machine.
step "plan on ${card:-H100}"
before=results/plan/plan-before.json
[ -f "$before" ] || timeout 120 python -m egm plan --configfile config/gpu-smoke.yaml \
  --gpu "${card:-H100}" --gpus 1 --json "$before" --markdown "${before%.json}.md" "$@" >>"$runlog" 2>&1
cp -f "$before" "${before%.json}.md" "$out/" 2>/dev/null
step "snakemake $*"
# Targets first: --resources and --configfile take every word after them.
timeout -s INT -k 60 "${EGM_RUN_TIMEOUT:-0}" python3 -m snakemake "$@" --cores "$(nproc)" --keep-going \
  --rerun-incomplete --scheduler greedy --resources gpu=1 --configfile config/gpu-smoke.yaml >>"$runlog" 2>&1
status=$?
step "snakemake exit $status; record"
timeout 60 python3 -m benchmarks.gpu_pipeline --config config/gpu-smoke.yaml --out "$out/gpu-pipeline-$slug.json" \
  >>"$runlog" 2>&1
# Each job's estimate beside what it cost (benchmark files, the jobs' own cost records).
step "plan --check"; timeout 120 python -m egm plan --check --saved "$before" --configfile config/gpu-smoke.yaml \
  --json "$out/gpu-plan-check-$slug.json" --markdown "$out/gpu-plan-check-$slug.md" >>"$runlog" 2>&1
step "pack"
timeout 30 tar -czf "$out/gpu-run.tar.gz" logs results/metrics results/latency results/tables results/figures \
  results/scaling results/benchmarks results/predictions/*/run.json results/predictions/*/*.jsonl 2>/dev/null
step "done"
tail -n 40 "$runlog"
exit $status
