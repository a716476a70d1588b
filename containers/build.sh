#!/usr/bin/env bash
# Builds the pipeline's Apptainer images as containers/images/<name>-<hash>.sif, where <hash> is
# the first 12 hex digits of the SHA-256 of containers/<name>.def. The workflow computes the same
# name (workflow/rules/common.smk), so editing a definition changes the image path every rule
# uses, and Snakemake reruns what the old image produced.
#
#   containers/build.sh [--out DIR] [--force] [cpu|gpu-vllm|gpu-sglang|all ...]   (default: cpu)
#   containers/build.sh --name NAME        # print the image file name only
#   containers/build.sh --lock             # re-pin cpu.def's packages after a pyproject.toml change
#   containers/build.sh --lock NAME        # re-pin a GPU image from containers/NAME.in (pins.py)
#
# After a build, containers/records.py runs the image's checks inside it and writes
# containers/records/NAME.json (beside the image with --out; definition hash, image digest and size, build time, the versions
# inside), from which containers/README.md's table is made (`python containers/records.py readme`).
#
# Environment:
#   DEBIAN_MIRROR  Debian mirror for the CPU image's debootstrap (default: the host's apt sources)
#   TORCH_WHEEL    a torch 2.13.0 CPU wheel (default: `pip download torch==2.13.0 --no-deps`,
#                  which must yield the CPU wheel: set PIP_INDEX_URL to PyTorch's CPU index if not)
#   PYTHON         python used for that download (default: .venv/bin/python, else python3)
#   EGM_BUILD_USER unprivileged user that builds when this runs as root (default: egm-build);
#                  see ci/setup-system.sh. Unprivileged builds use --fakeroot (needs /etc/subuid).
#   EGM_CACHE      download cache (default: ~/.cache/egm)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
OUT_DIR="$HERE/images"
# Builds into containers/images record into containers/records (committed); --out DIR records
# beside the image instead, so test builds leave the repository alone.
RECORD_DIR="$HERE/records"
CACHE="${EGM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/egm}"
BUILD_USER="${EGM_BUILD_USER:-egm-build}"
FORCE=0

say() { echo "build.sh: $*" >&2; }
die() { say "$*"; exit 1; }

image_name() {
    local def="$HERE/$1.def"
    [[ -f "$def" ]] || die "no definition $def (images: cpu, gpu-vllm, gpu-sglang)"
    echo "$1-$(sha256sum "$def" | cut -c1-12)"
}

host_python() {
    if [[ -n "${PYTHON:-}" ]]; then echo "$PYTHON"
    elif [[ -x "$REPO/.venv/bin/python" ]]; then echo "$REPO/.venv/bin/python"
    else echo python3; fi
}

# The image's own pip would need the network's TLS trust set-up inside the image; the host's pip
# already has it, so the locked files are fetched here, for the image's Python (3.11, x86_64), into
# a cache per image that later builds reuse.
wheelhouse() {
    local name="$1" dest="$CACHE/wheels/$1"
    "$(host_python)" "$HERE/pins.py" wheelhouse "$name" "$dest" >&2
    echo "$dest"
}

# Re-resolves pyproject.toml's dependencies (snakemake excluded: it stays on the host) for the
# image's Python and rewrites the LOCK block of cpu.def. Run after changing a pin in pyproject.toml;
# the new definition hash then renames the image, and Snakemake reruns what the old one produced.
relock_cpu() {
    local def="$HERE/cpu.def" reqs report
    reqs="$(mktemp)"; report="$(mktemp)"
    "$(host_python)" - "$REPO/pyproject.toml" >"$reqs" <<'PY'
import re, sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
print("\n".join(d for d in deps if re.split(r"[=<>!~ ;\[]", d)[0].lower() != "snakemake"))
# egm itself is built inside the image without build isolation.
print("setuptools==84.2.1")
PY
    "$(host_python)" -m pip install --quiet --disable-pip-version-check --dry-run --ignore-installed \
        --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any --target "$(mktemp -d)" --report "$report" -r "$reqs" >&2
    "$(host_python)" - "$report" "$def" <<'PY'
import json, re, sys
report, def_path = sys.argv[1:]
pins = sorted(
    (i["metadata"]["name"], i["metadata"]["version"])
    for i in json.load(open(report))["install"]
    if i["metadata"]["name"].lower() != "torch"
)
block = "".join(f"        {name}=={version}\n" for name, version in sorted(pins, key=lambda p: p[0].lower()))
text = open(def_path).read()
new, n = re.subn(r"(<<'LOCK'\n).*?(\nLOCK\n)", lambda m: m.group(1) + block.rstrip("\n") + m.group(2), text, flags=re.S)
assert n == 1, "no LOCK block"
open(def_path, "w").write(new)
print(f"cpu.def: {len(pins)} pinned packages", file=sys.stderr)
PY
    rm -f "$reqs" "$report"
}

torch_wheel() {
    if [[ -n "${TORCH_WHEEL:-}" ]]; then
        [[ -f "$TORCH_WHEEL" ]] || die "TORCH_WHEEL=$TORCH_WHEEL does not exist"
        echo "$TORCH_WHEEL"
        return
    fi
    local wheel
    mkdir -p "$CACHE/wheels"
    "$(host_python)" -m pip download --quiet --disable-pip-version-check torch==2.13.0 --no-deps -d "$CACHE/wheels" >&2
    wheel="$(ls -t "$CACHE"/wheels/torch-2.13.0*.whl | head -n1)"
    [[ "$wheel" == *+cpu* ]] || die "pip took $(basename "$wheel"), not the CPU build: set TORCH_WHEEL to a \
torch-2.13.0+cpu wheel or PIP_INDEX_URL to PyTorch's CPU wheel index"
    echo "$wheel"
}

# The prefix made by install-apptainer.sh hard-codes its own path as ELF interpreter and RPATH;
# a copy the build user can reach is patched to point at itself.
relocate_apptainer() {
    local src dst="$2" elf
    src="$(dirname "$(dirname "$1")")"
    cp -a "$src" "$dst"
    [[ -d "$dst/lib/runtime" ]] || return 0  # a system install: nothing to patch
    for elf in "$dst/bin/apptainer" "$dst"/lib/*/apptainer/bin/starter; do
        patchelf --set-interpreter "$dst/lib/runtime/ld-linux-x86-64.so.2" --force-rpath \
            --set-rpath "$dst/lib/runtime" "$elf"
    done
}

build_one() {
    local name="$1" image def stage target args=() started
    image="$(image_name "$name")"
    def="$HERE/$name.def"
    target="$OUT_DIR/$image.sif"
    if [[ -f "$target" && $FORCE -eq 0 ]]; then
        say "$target is up to date"
        echo "$target"
        return
    fi
    command -v apptainer >/dev/null || die "apptainer not found on PATH: load your site's apptainer module, \
or on Debian run containers/install-apptainer.sh and put the directory it prints on PATH"

    stage="$(mktemp -d "${TMPDIR:-/tmp}/egm-build.XXXXXX")"
    STAGES+=("$stage")
    chmod 755 "$stage"
    mkdir -p "$stage/src" "$stage/tmp"
    cp "$def" "$stage/$name.def"
    # The package as it is in the working tree, without caches or build leftovers.
    tar -C "$REPO" --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' -cf - pyproject.toml egm \
        | tar -C "$stage/src" -xf -
    args+=(--build-arg "EGM_SRC=$stage/src" --build-arg "EGM_IMAGE=$image")
    local mirror wheels
    mirror="$("$HERE/debian-mirror.sh")"
    wheels="$(wheelhouse "$name")"
    # Hard links where the cache shares the stage's file system: GPU wheel sets are several GB.
    cp -rl "$wheels" "$stage/wheels" 2>/dev/null || { rm -rf "$stage/wheels"; cp -r "$wheels" "$stage/wheels"; }
    args+=(--build-arg "WHEELHOUSE=$stage/wheels" --build-arg "MIRROR_URL=$mirror")
    if [[ "$name" == cpu ]]; then
        local wheel
        wheel="$(torch_wheel)"
        cp "$wheel" "$stage/"
        args+=(--build-arg "TORCH_WHEEL=$stage/$(basename "$wheel")")
    fi

    say "building $image from $def"
    started=$SECONDS
    local apptainer_bin
    apptainer_bin="$(command -v apptainer)"
    if [[ $EUID -eq 0 ]] && id "$BUILD_USER" >/dev/null 2>&1; then
        # Root cannot build here (no CAP_SYS_RESOURCE in containers/sandboxes): an unprivileged
        # user with subordinate ids builds with --fakeroot instead.
        relocate_apptainer "$apptainer_bin" "$stage/apptainer"
        chown -R "$BUILD_USER:" "$stage"
        local keep=() var
        for var in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
            [[ -n "${!var:-}" ]] && keep+=("$var=${!var}")
        done
        (cd "$stage" && runuser -u "$BUILD_USER" -- env -i "${keep[@]}" HOME="$stage" \
            PATH="$stage/apptainer/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin" \
            APPTAINER_TMPDIR="$stage/tmp" APPTAINER_CACHEDIR="$stage/cache" \
            apptainer build --fakeroot "${args[@]}" "$stage/$image.sif" "$stage/$name.def")
    elif [[ $EUID -eq 0 ]]; then
        APPTAINER_TMPDIR="$stage/tmp" apptainer build "${args[@]}" "$stage/$image.sif" "$stage/$name.def"
    else
        APPTAINER_TMPDIR="$stage/tmp" apptainer build --fakeroot "${args[@]}" "$stage/$image.sif" "$stage/$name.def"
    fi
    mkdir -p "$OUT_DIR"
    chown "$(id -u):$(id -g)" "$stage/$image.sif"
    mv "$stage/$image.sif" "$target.partial"
    mv "$target.partial" "$target"
    local seconds=$((SECONDS - started))
    say "built $target in $seconds s"
    "$(host_python)" "$HERE/records.py" record "$name" "$target" "$seconds" "$RECORD_DIR" >&2
    echo "$target"
}

# Build directories hold a whole root file system: removed however the script ends.
STAGES=()
trap 'rm -rf "${STAGES[@]}"' EXIT

names=()
while (($#)); do
    case "$1" in
        --name) image_name "${2:?--name NAME}"; exit 0 ;;
        --lock)
            if [[ -z "${2:-}" || "$2" == cpu ]]; then relock_cpu; else "$(host_python)" "$HERE/pins.py" lock "$2"; fi
            exit 0 ;;
        --out) OUT_DIR="$(mkdir -p "${2:?--out DIR}" && cd "$2" && pwd)"; RECORD_DIR="$OUT_DIR"; shift 2 ;;
        --force) FORCE=1; shift ;;
        -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
        all) names+=(cpu gpu-vllm gpu-sglang); shift ;;
        -*) die "unknown option $1" ;;
        *) names+=("$1"); shift ;;
    esac
done
((${#names[@]})) || names=(cpu)
for name in "${names[@]}"; do build_one "$name"; done
