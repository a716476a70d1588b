"""Pins of the GPU images: resolve, write, check.

    python containers/pins.py lock NAME     # resolve containers/NAME.in, rewrite NAME.def's lock
    python containers/pins.py check [NAME|PATH.def ...]  # every pin of the GPU definitions resolves
    python containers/pins.py wheelhouse NAME DIR   # download NAME.def's locked files (build.sh)

The top-level requirements of an image are hand-written in containers/NAME.in; everything the
image installs is the resolution of that file for the image's Python and platform, written by
`lock` into the definition's LOCK block (wheels, `name==version --hash=sha256:...`) and
LOCK_SDIST block (packages published only as source, built in the image after the wheels). The
definition's hash names the image, so a new lock is a new image.

`check` asks pip to resolve each lock exactly (no dependencies followed, hashes required) without
installing it: pip reads the index and each file's metadata but does not fetch the wheels, so CI
can check multi-GB stacks in seconds. Uses the pip of the Python that runs this script, with its
own configuration (index, certificates): no index address is written here.
"""

import hashlib
import json
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
GPU_IMAGES = ("gpu-vllm", "gpu-sglang")

# The images are Debian 12 (debootstrap): CPython 3.11, glibc 2.36, x86_64.
PYTHON_VERSION = "3.11"
GLIBC_MINOR = 36


def target_args():
    """pip options that resolve for the image's interpreter and platform instead of the host's."""
    args = ["--python-version", PYTHON_VERSION, "--implementation", "cp",
            "--abi", "cp" + PYTHON_VERSION.replace(".", ""), "--abi", "abi3", "--abi", "none"]
    for minor in range(GLIBC_MINOR, 4, -1):
        args += ["--platform", f"manylinux_2_{minor}_x86_64"]
    for legacy in ("manylinux2014", "manylinux2010", "manylinux1", "linux"):
        args += ["--platform", f"{legacy}_x86_64"]
    return args + ["--platform", "any"]


def pip(*args, quiet=True, about=""):
    cmd = [sys.executable, "-m", "pip", *args, "--disable-pip-version-check"]
    if quiet:
        cmd.append("--quiet")
    done = subprocess.run(cmd, text=True, capture_output=True)
    if done.returncode:
        # pip's own warnings about unreadable local index folders are noise; its errors are not.
        err = "\n".join(line for line in done.stderr.splitlines() if "is ignored: it is neither" not in line)
        raise SystemExit(f"pins.py: {about + ': ' if about else ''}pip {' '.join(args[:2])} failed:\n{err}")
    return done


def read_blocks(def_path):
    """The LOCK and LOCK_SDIST blocks of a definition: lists of requirement lines."""
    text = Path(def_path).read_text()
    blocks = {}
    for name in ("LOCK", "LOCK_SDIST"):
        match = re.search(rf"<<'{name}'\n((?:.*\n)*?)[ \t]*{name}\n", text)
        blocks[name] = [line.strip() for line in match.group(1).splitlines() if line.strip()] if match else []
    if not blocks["LOCK"]:
        raise SystemExit(f"pins.py: {def_path} has no LOCK block")
    return blocks


def write_blocks(def_path, blocks):
    text = Path(def_path).read_text()
    for name, lines in blocks.items():
        body = "".join(f"        {line}\n" for line in lines)
        text, n = re.subn(rf"(<<'{name}'\n)(?:.*\n)*?([ \t]*{name}\n)", lambda m: m.group(1) + body + m.group(2), text)
        if n == 0 and not lines:
            continue  # an image without source packages needs no LOCK_SDIST block
        if n != 1:
            raise SystemExit(f"pins.py: {def_path} needs exactly one {name} block (found {n})")
    tmp = Path(str(def_path) + ".tmp")
    tmp.write_text(text)
    tmp.replace(def_path)


def parse_in(in_path):
    """Wheel requirements and source-only requirements (lines marked `# sdist`) of NAME.in."""
    wheels, sdists = [], []
    for number, raw in enumerate(Path(in_path).read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if "# sdist" in raw:
            if not re.fullmatch(r"[A-Za-z0-9_.\-]+==[^\s;]+", line):
                raise SystemExit(f"pins.py: {in_path}:{number}: a `# sdist` requirement must be pinned exactly: {line!r}")
            sdists.append(line)
        else:
            wheels.append(line)
    return wheels, sdists


def lock(name):
    in_path, def_path = HERE / f"{name}.in", HERE / f"{name}.def"
    wheels, sdists = parse_in(in_path)
    with tempfile.TemporaryDirectory() as tmp:
        reqs, report = Path(tmp, "requirements.txt"), Path(tmp, "report.json")
        reqs.write_text("\n".join(wheels) + "\n")
        pip("install", "--dry-run", "--ignore-installed", "--only-binary=:all:", *target_args(),
            "--target", str(Path(tmp, "target")), "--report", str(report), "-r", str(reqs))
        installs = json.loads(report.read_text())["install"]
        locked = sorted(
            (item["metadata"]["name"], item["metadata"]["version"], item["download_info"]["archive_info"]["hashes"]["sha256"])
            for item in installs
        )
        sdist_lines = []
        for requirement in sdists:
            dest = Path(tmp, "sdist", requirement)
            pip("download", "--no-deps", "--no-binary=:all:", "-d", str(dest), requirement)
            (archive,) = dest.iterdir()
            digest = hashlib.sha256(archive.read_bytes()).hexdigest()
            sdist_lines.append(f"{requirement} --hash=sha256:{digest}")
    names = {n.lower() for n, _, _ in locked}
    for requirement in sdists:
        if requirement.split("==")[0].lower() in names:
            raise SystemExit(f"pins.py: {requirement} is also in the wheel resolution of {in_path}")
    lines = [f"{n}=={v} --hash=sha256:{h}" for n, v, h in sorted(locked, key=lambda p: p[0].lower())]
    write_blocks(def_path, {"LOCK": lines, "LOCK_SDIST": sdist_lines})
    print(f"pins.py: {def_path.name}: {len(lines)} wheels, {len(sdist_lines)} source packages", file=sys.stderr)


def definition(name):
    """containers/NAME.def, or a definition file given by its path."""
    return Path(name) if name.endswith(".def") else HERE / f"{name}.def"


def check_chunk(name, block, lines):
    """pip resolves these lines of NAME.def's block exactly (no dependencies followed) for the
    image's platform, without installing anything. Wheels are not downloaded: pip reads their
    metadata through HTTP range requests (`fast-deps`), and the hash it reports is the one the
    index publishes for the file it chose, which must be the locked one. Source packages are
    small: they are fetched and hash-checked."""
    with tempfile.TemporaryDirectory() as tmp:
        reqs, report = Path(tmp, "requirements.txt"), Path(tmp, "report.json")
        if block == "LOCK":
            reqs.write_text("\n".join(line.split()[0] for line in lines) + "\n")
            how = ["--use-feature=fast-deps", "--only-binary=:all:", *target_args()]
        else:
            reqs.write_text("\n".join(lines) + "\n")
            how = ["--require-hashes", "--no-binary=:all:"]
        pip("install", "--dry-run", "--ignore-installed", "--no-deps", *how,
            "--target", str(Path(tmp, "target")), "--report", str(report), "-r", str(reqs),
            about=f"{definition(name)} {block} block")
        got = {(i["metadata"]["name"].lower(), i["metadata"]["version"], i["download_info"]["archive_info"]["hashes"]["sha256"])
               for i in json.loads(report.read_text())["install"]}
    want = {(line.split("==")[0].lower(), line.split("==")[1].split()[0], line.split("--hash=sha256:")[1].split()[0])
            for line in lines}
    if got != want:
        raise SystemExit(f"pins.py: {definition(name)} {block} block: the index offers other files than the "
                         f"lock names: locked {sorted(want - got)}, offered {sorted(got - want)}")
    return len(lines)


def check(names, chunk=24):
    """Every pin of each definition resolves for the image's platform, with the locked hash. No
    download of the wheels themselves: `--dry-run --no-deps` needs only the index and the
    metadata. The time goes to waiting on the index, so several pips ask side by side."""
    tasks = []
    for name in names:
        for block, lines in read_blocks(definition(name)).items():
            tasks += [(name, block, lines[k:k + chunk]) for k in range(0, len(lines), chunk)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        counts = list(pool.map(lambda task: check_chunk(*task), tasks))
    for name in names:
        total = sum(c for (n, _, _), c in zip(tasks, counts) if n == name)
        print(f"pins.py: {definition(name).name}: {total} pins resolve", file=sys.stderr)


def wheelhouse(name, dest):
    """Downloads the files of NAME.def's lock blocks into dest (the build's WHEELHOUSE)."""
    blocks = read_blocks(HERE / f"{name}.def")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for block, lines in blocks.items():
        if not lines:
            continue
        reqs = dest / f"{block}.txt"
        reqs.write_text("\n".join(lines) + "\n")
        binary = ["--only-binary=:all:", *target_args()] if block == "LOCK" else ["--no-binary=:all:"]
        pip("download", "--no-deps", *binary, "-d", str(dest), "-r", str(reqs))
        reqs.unlink()


def main(argv):
    if len(argv) >= 1 and argv[0] == "lock" and len(argv) == 2:
        lock(argv[1])
    elif len(argv) == 3 and argv[0] == "wheelhouse":
        wheelhouse(argv[1], argv[2])
    elif len(argv) >= 1 and argv[0] == "check":
        check(argv[1:] or GPU_IMAGES)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
