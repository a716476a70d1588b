"""Build records of the images, and containers/README.md's table made from them.

    python containers/records.py record NAME IMAGE SECONDS [DIR]   # build.sh, after building IMAGE
    python containers/records.py readme [--check]            # rewrite (or check) README's table

`record` runs the image's checks inside it (the engines import, their servers print their help,
`python -m egm --help`, `pip list`) and writes DIR/NAME.json (containers/records/ for the
committed records): the definition's
hash, the image file's SHA-256 and size, the build's wall time, what each check printed, the
versions inside, the date and the machine. It exits non-zero when a required check failed, after
writing the record. A check that may not run on a machine without an NVIDIA driver is recorded
with what it printed, and is not required.
"""

import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECORDS = HERE / "records"
README = HERE / "README.md"
TABLE_START, TABLE_END = "<!-- records table: made by `python containers/records.py readme` -->", "<!-- end of records table -->"

IMPORTS = {
    "cpu": "egm torch transformers trl",
    "gpu-vllm": "egm torch vllm transformers trl deepspeed ray",
    "gpu-sglang": "egm torch sglang transformers",
}
# (command, required): required checks fail the build when they fail.
CHECKS = {
    "gpu-vllm": [("vllm serve --help", False)],
    # sgl_kernel loads libcuda.so.1, the host driver's (apptainer exec --nv), when imported.
    "gpu-sglang": [("python -c 'import sgl_kernel'", False), ("python -c 'import flashinfer'", False),
                   ("python -m sglang.launch_server --help", False)],
}
# The versions the README's table names for each image.
HEADLINE = ("torch", "transformers", "vllm", "sglang", "trl", "deepspeed", "ray", "flashinfer-python")
TAIL = 4000  # characters of each check's output kept in the record
CHECK_TIMEOUT_S = 600


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def apptainer_exec(image, command):
    # Root without CAP_SYS_RESOURCE (CI's sandbox) runs images only in a user namespace.
    userns = ["--userns"] if os.geteuid() == 0 else []
    # From /: the image's own egm is checked, not a checkout's in the working directory.
    cmd = ["apptainer", "exec", *userns, "--cleanenv", "--pwd", "/", str(image), "sh", "-c", command]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired as timeout:
        out = (timeout.stdout or b"").decode(errors="replace") if isinstance(timeout.stdout, bytes) else (timeout.stdout or "")
        return "timeout", out, f"\n[records.py: no exit after {CHECK_TIMEOUT_S} s]"
    return done.returncode, done.stdout, done.stderr


def machine():
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"system": platform.platform(), "cpu": cpu, "cores": os.cpu_count()}


def record(name, image, seconds, out_dir):
    image = Path(image)
    checks = [(f"python -c 'import {', '.join(IMPORTS[name].split())}'", True), ("python -m egm --help", True)]
    checks += CHECKS.get(name, [])
    results, failed = [], []
    for command, required in checks:
        code, out, err = apptainer_exec(image, command)
        results.append({"command": command, "required": required, "returncode": code,
                        "output_tail": (out + err)[-TAIL:]})
        if code and required:
            failed.append(command)
    code, out, err = apptainer_exec(image, "python -m pip list --format=json --disable-pip-version-check")
    if code:
        raise SystemExit(f"records.py: pip list failed in {image}:\n{err}")
    packages = {p["name"]: p["version"] for p in json.loads(out)}
    version = subprocess.run(["apptainer", "--version"], capture_output=True, text=True).stdout.strip()
    rec = {
        "image": image.stem,
        "definition": f"containers/{name}.def",
        "definition_sha256": sha256(HERE / f"{name}.def"),
        "image_sha256": sha256(image),
        "image_bytes": image.stat().st_size,
        "build_seconds": int(seconds),
        "built_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        "apptainer": version,
        "checks": results,
        "packages": dict(sorted(packages.items(), key=lambda kv: kv[0].lower())),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / f"{name}.json"
    tmp = out_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rec, indent=1) + "\n")
    tmp.replace(out_path)
    print(f"records.py: wrote {out_path}", file=sys.stderr)
    if failed:
        raise SystemExit(f"records.py: in {image.name}, required checks failed: {failed} (see {out_path})")


def table():
    """README's table: one row per definition, from its record (or saying there is none)."""
    rows = [
        "| image | built (UTC) | build time | image size | definition SHA-256 | versions inside | checks |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in IMPORTS:
        path = RECORDS / f"{name}.json"
        if not path.exists():
            rows.append(f"| `{name}` | no build record of this definition yet: `make containers IMAGES={name}` "
                        "| | | | | |")
            continue
        rec = json.loads(path.read_text())
        lower = {k.lower(): v for k, v in rec["packages"].items()}
        versions = ", ".join(f"{k} {lower[k]}" for k in HEADLINE if k in lower)
        checks = "; ".join(f"`{c['command']}` {'ok' if c['returncode'] == 0 else 'exit ' + str(c['returncode'])}"
                           for c in rec["checks"])
        minutes = rec["build_seconds"] / 60
        rows.append(
            f"| `{rec['image']}` | {rec['built_utc'][:16].replace('T', ' ')} | {minutes:.0f} min "
            f"on {rec['machine']['cores']} cores | {rec['image_bytes'] / 1e9:.2f} GB | "
            f"`{rec['definition_sha256'][:12]}` | {versions}; {len(rec['packages'])} packages | {checks} |"
        )
    return "\n".join(rows) + "\n"


def readme(check_only):
    text = README.read_text()
    pattern = re.compile(re.escape(TABLE_START) + r"\n.*?" + re.escape(TABLE_END), flags=re.S)
    if not pattern.search(text):
        raise SystemExit(f"records.py: {README} lacks the records table markers")
    new = pattern.sub(lambda m: TABLE_START + "\n" + table() + TABLE_END, text)
    if check_only:
        if new != text:
            raise SystemExit("records.py: containers/README.md's table differs from containers/records/: "
                             "run `python containers/records.py readme`")
        return
    tmp = README.with_suffix(".md.tmp")
    tmp.write_text(new)
    tmp.replace(README)


def main(argv):
    if len(argv) in (4, 5) and argv[0] == "record":
        if argv[1] not in IMPORTS:
            raise SystemExit(f"records.py: unknown image {argv[1]!r} (images: {', '.join(IMPORTS)})")
        if not shutil.which("apptainer"):
            raise SystemExit("records.py: apptainer not found on PATH")
        record(*argv[1:4], argv[4] if len(argv) == 5 else RECORDS)
    elif argv[:1] == ["readme"] and argv[1:] in ([], ["--check"]):
        readme(check_only=argv[1:] == ["--check"])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
