#!/usr/bin/env bash
# The wheels issue 17's two-GPU runs need on the GPU machine beside vLLM's set
# (../shared/tools/vllm-wheels.sh, parts in .vllm/): DeepSpeed, TRL, datasets and Ray, with what
# they need that neither the machine's image nor vLLM's set has. Packed as tar parts of at most
# 60 MiB (one part per device call: at most 64 MiB travel with one), plus SHA256SUMS naming every
# part of both sets, which `benchmarks/multigpu.sh install` checks before unpacking.
#
#   benchmarks/multigpu_wheels.sh                # in the project root, on the CPU machine: .mgpu/
#   benchmarks/multigpu_wheels.sh grpo           # only what one GPU's GRPO needs (TRL, datasets; issue 32)
#   benchmarks/multigpu_wheels.sh pipeline       # grpo's set and Snakemake's (issues 29 and 32 on one machine)
#
# .mgpu/ (where `benchmarks/multigpu.sh park` looks for the parts) must be ignored by git: add
# /.mgpu/ to .git/info/exclude; wheels are never committed.
# DeepSpeed is an sdist: its wheel is built here with no compiled ops (DS_BUILD_OPS=0; ZeRO-3
# with the Trainer's own optimizer needs none) against this environment's torch, without build
# isolation (isolation would download a CUDA torch to build with). Every other wheel is
# downloaded for CPython 3.12 on manylinux x86_64, the GPU machine's platform, without
# dependencies: torch and the rest are the image's, and anything the image lacks is named here.
#
# Environment: PYTHON (default python3; must import torch, for the DeepSpeed build),
# VLLM_PARTS (default .vllm), IMAGE_PACKAGES (the GPU image's package names, one a line; default
# ../shared/tools/gpu-machine-packages.txt).
set -euo pipefail
out=.mgpu
py=${PYTHON:-python3}
vparts=${VLLM_PARTS:-.vllm}
image=${IMAGE_PACKAGES:-../shared/tools/gpu-machine-packages.txt}
[ -f "$image" ] || { echo "no list of the GPU image's packages at $image (set IMAGE_PACKAGES)" >&2; exit 1; }
compgen -G "$vparts/part-*" >/dev/null || { echo "no vLLM parts in $vparts (../shared/tools/vllm-wheels.sh $vparts)" >&2; exit 1; }

# One version of each package across all sets: these pins are the project's own (pyproject.toml)
# where it has them; multiprocess is the newest datasets accepts; Ray is the release checked on
# the CPU machine (ENVIRONMENT.md), and vLLM 0.25.1 needs Ray >= 2.43.
# TRL 1.16 accepts vLLM 0.22-0.31 (0.25.1 is the GPU machine's) and transformers >= 4.56.2 (5.17 there).
PURE_SDISTS=()
GRPO=(trl==1.16.0 datasets==5.2.0 multiprocess==0.70.19)
case "${1:-all}" in
  all) WANTED=(deepspeed==0.19.8 "${GRPO[@]}" hjson==3.1.0 ray==2.60.0) ;;
  grpo) WANTED=("${GRPO[@]}") ;;
  # GRPO's set and Snakemake with what it needs (versions as resolved in the project's venv), for
  # one held machine that runs both the rollouts and the smoke pipeline (benchmarks/gpu_pipeline.sh).
  pipeline) WANTED=("${GRPO[@]}" snakemake==9.27.1
                    snakemake-interface-common==1.23.0 snakemake-interface-executor-plugins==9.4.0
                    snakemake-interface-logger-plugins==2.1.0 snakemake-interface-report-plugins==1.3.0
                    snakemake-interface-scheduler-plugins==2.0.2 snakemake-interface-storage-plugins==4.4.1
                    argparse-dataclass==2.0.0 conda-inject==1.3.2 configargparse==1.9.0
                    docutils==0.22.4 dpath==2.2.0 fastjsonschema==2.22.3 gitdb==4.0.12 gitpython==3.2.1
                    humanfriendly==10.0 immutables==0.21 jupyter-core==5.9.1 nbformat==5.11.1 pulp==3.3.2
                    smart-open==7.7.1 smmap==5.0.3 throttler==1.2.3 traitlets==5.16.1
                    yte==1.9.4 platformdirs==4.14.9 sqlmodel==0.0.37 tenacity==9.2.1 sqlalchemy==2.0.59 greenlet==3.5.6)
            # Published as a source distribution only: built into a wheel here (pure Python).
            PURE_SDISTS=(connection-pool==0.0.3) ;;
  *) echo "usage: multigpu_wheels.sh [all|grpo|pipeline]" >&2; exit 2 ;;
esac
BUILT=()  # sdists built here: DeepSpeed when wanted
[ "${WANTED[0]%%==*}" = deepspeed ] && { BUILT=("${WANTED[0]}"); WANTED=("${WANTED[@]:1}"); }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
plat=(--only-binary=:all: --python-version 3.12 --implementation cp)
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_26_x86_64 \
         manylinux_2_27_x86_64 manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 \
         manylinux_2_35_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64 linux_x86_64 any; do
  plat+=(--platform "$p")
done
mkdir -p "$work/whl" "$work/vllm"
[ ${#BUILT[@]} -eq 0 ] || DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$work/whl" "${BUILT[@]}"
"$py" -m pip download -q --no-deps "${plat[@]}" -d "$work/whl" "${WANTED[@]}"
[ ${#PURE_SDISTS[@]} -eq 0 ] || "$py" -m pip wheel -q --no-deps -w "$work/whl" "${PURE_SDISTS[@]}"
cat "$vparts"/part-* | tar -x -C "$work/vllm"

# Every requirement of the new wheels must be met by the image, vLLM's set or this set, and no
# package may come twice: a second version would stop the whole install on the GPU machine.
"$py" - "$work/whl" "$work/vllm" "$image" <<'EOF'
import re, sys, zipfile
from pathlib import Path
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
new, vllm, image = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])

def name(wheel):
    return canonicalize_name(wheel.name.split("-")[0])

def requires(wheel):
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    for line in lines:
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(env):
                yield req

have_image = {canonicalize_name(l.strip()) for l in image.read_text().splitlines() if l.strip()}
have_vllm = {name(w) for w in vllm.glob("*.whl")}
mine = {name(w): w for w in new.glob("*.whl")}
twice = sorted((set(mine) & (have_vllm | have_image)))
if twice:
    sys.exit(f"already on the GPU machine or in vLLM's set, would be a second version: {twice}")
have = have_image | have_vllm | set(mine)
missing = {f"{name(w)} needs {r}" for w in mine.values() for r in requires(w) if canonicalize_name(r.name) not in have}
if missing:
    sys.exit("unmet requirements:\n  " + "\n  ".join(sorted(missing)))
for n, w in sorted(mine.items()):
    print(f"  {w.name} ({w.stat().st_size / 2**20:.1f} MiB)")
EOF

mkdir -p "$out"
rm -f "$out"/part-* "$out/SHA256SUMS"
(cd "$work/whl" && tar -cf - ./*.whl) | split -b 60M -d -a 2 - "$out/part-"
# Named as `multigpu.sh park` lays the parts out (.vllm/, .mgpu/): `install` checks them all.
{ (cd "$vparts" && sha256sum part-*) | sed 's|  |  .vllm/|'; (cd "$out" && sha256sum part-*) | sed 's|  |  .mgpu/|'; } \
  >"$out/SHA256SUMS"
ls -l "$out"
