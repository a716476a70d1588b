"""Where a result came from: recorded by every job that writes results, carried into every table.

`job_record()` describes the job itself (egm version and git commit, container image and its
digest, engine package and version, the device, the config keys it used); `manifest_record()`
describes one of its inputs from that input's manifest (a fetched model or data set: repo,
revision and the commit it resolved to; a trained model: its run, stage and step). Metrics files
hold both under "provenance"; `flatten()` turns one into the columns a table row is traced by.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from egm.io import sha256_file, sha256_json

# The package whose version names each backend's engine in a table.
ENGINE_PACKAGES = {"hf": "transformers", "fast": "transformers", "vllm": "vllm", "sglang": "sglang", "trl": "trl"}
IMAGE_DIGESTS_ENV = "EGM_IMAGE_DIGESTS"  # image file name -> sha256, set by the workflow
SHORT = 12  # hex digits of a commit or digest shown in Markdown tables
# Table columns, in order; values are strings (unknown: "").
FIELDS = (
    "model_key", "model_repo", "model_revision", "model_commit", "data_repo", "data_revision", "data_commit",
    "engine", "protocol", "device", "image", "image_sha256", "egm", "config_sha256",
)


def package_version(package: str) -> str | None:
    """The installed version of `package`, None where it is not installed."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- code


def _read_git_head(git_dir: Path) -> str | None:
    """The checked-out commit from .git's files, for images that have no git binary."""
    try:
        head = (git_dir / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head or None
        ref = head[5:]
        ref_file = git_dir / ref
        if ref_file.exists():
            return ref_file.read_text().strip()
        packed = git_dir / "packed-refs"
        for line in packed.read_text().splitlines() if packed.exists() else []:
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return None


def code_record(root: Path | None = None) -> dict:
    """egm's version and, when it runs from a git checkout, that checkout's commit.

    `dirty` (tracked files changed since the commit) needs the git binary; without it (inside
    the CPU image) it is None, not False.
    """
    from egm import __version__

    root = Path(__file__).resolve().parent.parent if root is None else Path(root)
    record: dict[str, Any] = {"version": __version__, "commit": None, "dirty": None}
    dot_git = root / ".git"
    if dot_git.is_file():  # a worktree or submodule: ".git" names the real git directory
        text = dot_git.read_text().strip()
        dot_git = (root / text[len("gitdir: "):]).resolve() if text.startswith("gitdir: ") else dot_git
    if not dot_git.is_dir():
        return record
    git = shutil.which("git")
    if git:
        def run(*args: str) -> str | None:
            try:
                done = subprocess.run([git, "-C", str(root), *args], capture_output=True, text=True, timeout=30)
            except (OSError, subprocess.SubprocessError):
                return None
            return done.stdout if done.returncode == 0 else None

        commit = run("rev-parse", "HEAD")
        status = run("status", "--porcelain", "--untracked-files=no")
        record["commit"] = commit.strip() if commit else _read_git_head(dot_git)
        record["dirty"] = bool(status.strip()) if status is not None else None
    else:
        record["commit"] = _read_git_head(dot_git)
    return record


# --------------------------------------------------------------------------- container image


def image_sha256(path: Path) -> str:
    """SHA-256 of an image file, cached beside it (`<image>.sha256`, keyed by size and mtime) so
    that only the first job after a build reads the whole image."""
    stat = path.stat()
    key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    cache = path.with_name(path.name + ".sha256")
    try:
        cached = json.loads(cache.read_text())
        if {k: cached.get(k) for k in key} == key and cached.get("sha256"):
            return cached["sha256"]
    except (OSError, ValueError, AttributeError):
        pass
    digest = sha256_file(path)
    try:
        from egm.io import write_json

        write_json(cache, {**key, "sha256": digest})
    except OSError:
        pass  # a read-only image store: the digest is still right, just not cached
    return digest


def image_record(environ: Mapping[str, str] | None = None) -> dict:
    """The Apptainer image this job runs in (None fields outside one).

    EGM_IMAGE is set by our images (containers/*.def); Apptainer itself sets APPTAINER_CONTAINER
    to the image file, whose digest is the image's identity (its name only names its definition).
    The workflow passes the digests it computed on the host (IMAGE_DIGESTS_ENV, by file name);
    otherwise the job hashes the image file if it can see it.
    """
    env = os.environ if environ is None else environ
    path = env.get("APPTAINER_CONTAINER") or env.get("SINGULARITY_CONTAINER")
    record = {"name": env.get("EGM_IMAGE"), "path": path, "sha256": None}
    try:
        known = json.loads(env.get(IMAGE_DIGESTS_ENV) or "{}")
    except ValueError:
        known = {}
    if path and isinstance(known, dict) and known.get(os.path.basename(path)):
        record["sha256"] = known[os.path.basename(path)]
    elif path and Path(path).is_file():
        try:
            record["sha256"] = image_sha256(Path(path))
        except OSError:
            pass
    return record


# --------------------------------------------------------------------------- device


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_device() -> dict:
    """The hardware this ran on: the visible GPUs by name, else the CPU model."""
    from egm.infer.backends.gpus import visible_gpus

    info = {"host": platform.node(), "cpu": _cpu_model(), "cpu_count": os.cpu_count()}
    gpus = visible_gpus()
    if gpus and shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout
            rows = [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]
            info["gpus"] = [f"{r[2]} ({r[3]})" for r in rows if r[0] in gpus or r[1] in gpus]
        except (OSError, subprocess.SubprocessError, IndexError):
            info["gpus"] = [f"GPU {g}" for g in gpus]
    else:
        info["gpus"] = []
    info["name"] = f"{len(info['gpus'])}x {info['gpus'][0]}" if info["gpus"] else f"CPU: {info['cpu']}"
    return info


# --------------------------------------------------------------------------- records


def protocol_record(backend: str | None, engine_options: Mapping[str, Any] | None, in_flight: int | None) -> dict:
    """How the requests were served, the stamp that tells the authors' protocol (an SGLang server,
    data parallel 8, tensor parallel 1, 64 in flight) from ours: server or offline, the data and
    tensor parallel sizes (data parallel "auto" resolved against the job's GPUs), requests in
    flight (a server's concurrency; an offline engine's batch)."""
    from egm.infer.backends.gpus import resolve_data_parallel

    options = dict(engine_options or {})
    tp = int(options.get("tensor_parallel_size") or 1) if backend in ("vllm", "sglang", "server") else 1
    if backend == "server":
        mode = "external server" if options.get("url") else "server"
        in_flight = int(options.get("concurrency") or in_flight or 0) or None
        single = options.get("url") or options.get("server") == "transformers"
    else:
        mode, single = "offline", False
    dp = None if options.get("url") else 1 if single else resolve_data_parallel(options.get("data_parallel_size"), tp)
    return {"mode": mode, "data_parallel": dp, "tensor_parallel": tp, "in_flight": in_flight}


def engine_record(backend: str | None, engine_options: Mapping[str, Any] | None = None,
                  in_flight: int | None = None) -> dict:
    """The backend and the package (with version) that answered; for the server backend the
    engine it started, or "external" when it only sent requests to a given URL; and the protocol."""
    options = dict(engine_options or {})
    if backend == "server" and options.get("url"):
        package, version = "external", None
    else:
        package = options.get("server", "vllm") if backend == "server" else ENGINE_PACKAGES.get(backend or "", backend)
        version = package_version(package) if package else None
    return {"backend": backend, "package": package, "version": version, "torch": package_version("torch"),
            "protocol": protocol_record(backend, options, in_flight)}


def job_record(backend: str | None = None, engine_options: Mapping[str, Any] | None = None,
               config: Any = None, device: bool = True) -> dict:
    """The running job: code, image, engine, device and the config keys it was given."""
    record = {
        "egm": code_record(),
        "image": image_record(),
        "python": platform.python_version(),
    }
    if backend is not None:
        settings = config if isinstance(config, Mapping) else {}
        in_flight = settings.get("concurrency") or (settings.get("inference") or {}).get("batch_size")
        record["engine"] = engine_record(backend, engine_options, in_flight)
    if device:
        record["device"] = describe_device()
    if config is not None:
        record["config"] = config
        record["config_sha256"] = sha256_json(config)
    return record


def manifest_record(path: str | os.PathLike) -> dict:
    """An input as its manifest names it (fetch manifests: repo, revision, resolved commit;
    training manifests: run, stage, step), plus the manifest's own digest."""
    from egm.io import read_json, sha256_file

    manifest = read_json(path)
    record = {key: manifest.get(key) for key in ("repo_id", "revision", "commit")}
    if manifest.get("stage"):  # a model this pipeline trained
        record.update(repo_id=f"trained:{manifest.get('run')}/{manifest['stage']}",
                      revision=f"step {manifest.get('global_step')}", run=manifest.get("run"),
                      stage=manifest["stage"])
    record["manifest"] = str(path)
    record["manifest_sha256"] = sha256_file(path)
    return record


# --------------------------------------------------------------------------- tables


def _short(value: Any) -> str:
    return str(value)[:SHORT] if value else ""


def flatten(provenance: Mapping[str, Any] | None, model_key: str = "") -> dict[str, str]:
    """The FIELDS of one result's provenance, as strings ("" where unknown)."""
    p = provenance or {}
    model, data, job = p.get("model") or {}, p.get("data") or {}, p.get("job") or {}
    code, image, engine = job.get("egm") or {}, job.get("image") or {}, job.get("engine") or {}

    def commit(source: Mapping[str, Any]) -> str:
        # A trained model or a mirror copy has no hub commit: its manifest's digest (which lists
        # every file's sha256) identifies it.
        if source.get("commit"):
            return str(source["commit"])
        return f"manifest:{source['manifest_sha256']}" if source.get("manifest_sha256") else ""

    egm = str(code.get("version") or "")
    if code.get("commit"):
        egm += f" @ {code['commit']}" + ("-dirty" if code.get("dirty") else "")
    engine_text = " ".join(str(v) for v in (engine.get("backend"), engine.get("package"), engine.get("version")) if v)
    stamp = engine.get("protocol") or {}
    protocol = ", ".join(part for part in (
        str(stamp.get("mode") or ""),
        f"dp {stamp['data_parallel']} x tp {stamp['tensor_parallel']}" if stamp.get("data_parallel") else "",
        f"{stamp['in_flight']} in flight" if stamp.get("in_flight") else "",
    ) if part)
    return {
        "model_key": model_key or str(p.get("model_key") or ""),
        "model_repo": str(model.get("repo_id") or ""),
        "model_revision": str(model.get("revision") or ""),
        "model_commit": commit(model),
        "data_repo": str(data.get("repo_id") or ""),
        "data_revision": str(data.get("revision") or ""),
        "data_commit": commit(data),
        "engine": engine_text,
        "protocol": protocol,
        "device": str((job.get("device") or {}).get("name") or ""),
        "image": str(image.get("name") or "none"),
        "image_sha256": str(image.get("sha256") or ""),
        "egm": egm,
        "config_sha256": str(job.get("config_sha256") or ""),
    }


def merge(rows: Iterable[Mapping[str, str]]) -> dict[str, str]:
    """One table row's provenance from its results' (e.g. one per split): each field's distinct
    values joined by "; ", so a row built from mixed runs says so instead of hiding it."""
    rows = list(rows)
    return {field: "; ".join(sorted({row.get(field, "") for row in rows} - {""})) for field in FIELDS}


def short(row: Mapping[str, str]) -> dict[str, str]:
    """The same fields with commits and digests cut to SHORT hex digits, for Markdown."""
    out = dict(row)
    for field in ("model_commit", "data_commit", "image_sha256", "config_sha256"):
        out[field] = "; ".join(
            (v.split(":", 1)[0] + ":" + v.split(":", 1)[1][:SHORT]) if ":" in v else _short(v)
            for v in row.get(field, "").split("; ") if v
        )
    out["egm"] = "; ".join(
        (v.split(" @ ")[0] + " @ " + v.split(" @ ")[1][:SHORT] + ("-dirty" if v.endswith("-dirty") else ""))
        if " @ " in v else v
        for v in row.get("egm", "").split("; ") if v
    )
    return out
