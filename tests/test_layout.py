"""The code's layout, as the README and docs promise it: `egm` imports run one way (no cycle, no
module importing another's private name), rule files hold rules only and reach their shell
commands through the rule's own fields, and the README's stage -> module table names files and
functions that exist. Read as text and syntax trees: nothing is imported or run."""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Where the helpers and shared globals of the rules live (README, STYLE of the workflow).
RULE_HELPERS = ("common.smk", "resources.smk")


def egm_modules() -> dict[str, Path]:
    modules = {}
    for path in sorted((REPO / "egm").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports(module: str, path: Path, modules: dict[str, Path]):
    """(imported egm module, imported name or None, line) for every import, lazy ones included."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base, a.name) for a in node.names]
        else:
            continue
        for target, name in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != module:
                yield target, name, node.lineno


def test_egm_imports_have_no_cycle_and_no_private_name():
    modules = egm_modules()
    graph, private = {}, []
    for module, path in modules.items():
        for target, name, line in imports(module, path, modules):
            graph.setdefault(module, set()).add(target)
            if name and name.startswith("_") and not name.startswith("__"):
                private.append(f"{path.relative_to(REPO)}:{line} imports {target}.{name}")
    assert not private, "a private name wants a public home:\n" + "\n".join(private)

    def cycle_from(start, node, seen):
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                return [node, nxt]
            if nxt not in seen:
                seen.add(nxt)
                rest = cycle_from(start, nxt, seen)
                if rest:
                    return [node, *rest]
        return None

    cycles = [c for m in sorted(graph) if (c := cycle_from(m, m, {m}))]
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_egm_folders_import_one_way():
    """Between the folders of egm/ (data, models, train, infer, report, plan), imports run one
    way: a folder that imports another is never imported back by it, lazily or not."""
    modules = egm_modules()

    def folder(module):
        parts = module.split(".")
        return parts[1] if len(parts) > 2 or (REPO / "egm" / parts[-1]).is_dir() else None

    edges = {}
    for module, path in modules.items():
        for target, _, line in imports(module, path, modules):
            a, b = folder(module), folder(target)
            if a and b and a != b:
                edges.setdefault((a, b), f"{path.relative_to(REPO)}:{line} imports {target}")
    loops = [f"{a} <-> {b}: {edges[a, b]}; {edges[b, a]}" for a, b in sorted(edges) if a < b and (b, a) in edges]
    assert not loops, "folders of egm/ that import each other:\n" + "\n".join(loops)


def benchmark_scripts() -> list[Path]:
    return sorted((REPO / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("path", benchmark_scripts(), ids=lambda p: p.name)
def test_benchmarks_import_one_way(path):
    """The benchmark scripts are modules of the repository (`python -m benchmarks.<name>` from its
    root): none edits sys.path or loads a file by its path, and a sibling is imported one way,
    `from benchmarks.<module> import ...`, never as a top-level module of the scripts' folder."""
    tree = ast.parse(path.read_text(), str(path))
    siblings = {p.stem for p in benchmark_scripts()}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", None) == "sys":
            found.append(f"line {node.lineno}: sys.path")
        elif isinstance(node, ast.Attribute) and node.attr == "spec_from_file_location":
            found.append(f"line {node.lineno}: a module loaded from its file")
        elif isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] in siblings or a.name.startswith("benchmarks")]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            top = (node.module or "").split(".")[0]
            if top in siblings or (node.module == "benchmarks"):
                found.append(f"line {node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.ImportFrom) and node.level:
            found.append(f"line {node.lineno}: a relative import")
    assert not found, f"{path.name}: import benchmarks' shared code as `from benchmarks.<module> import ...`: {found}"


def rule_files() -> list[Path]:
    return [p for p in sorted((REPO / "workflow" / "rules").glob("*.smk")) if p.name not in RULE_HELPERS]


@pytest.mark.parametrize("path", rule_files(), ids=lambda p: p.name)
def test_rule_file_holds_rules_only(path):
    text = path.read_text()
    # Top-level Python (a function, a global, an import) belongs in common.smk or resources.smk.
    python = [line for line in text.splitlines() if re.match(r"(def |class |import |from |[A-Za-z_]\w*\s*=)", line)]
    assert not python, f"{path.name}: move to {' or '.join(RULE_HELPERS)}: {python}"
    # A shell command sees only its rule's fields, never a workflow global.
    for block in re.findall(r"shell:\n((?:[ \t]+(?:\"[^\n]*\"|'[^\n]*')\n?)+)", text):
        names = set(re.findall(r"(?<!\{)\{([A-Za-z_]\w*)", block))
        outside = names - {"input", "output", "params", "wildcards", "log", "threads", "resources"}
        assert not outside, f"{path.name}: a shell command reads {sorted(outside)}: pass it through params:"
        # Nor does it spell a path: the rule's output:, input: or params: hold each one once.
        paths = re.findall(r"(?:results|resources|logs)/[^\s\"']*", block)
        assert not paths, f"{path.name}: a shell command writes the path(s) {paths}: take them from the rule's fields"


# Names of modules and classes the rule files use without a prefix.
IMPORTED_NAMES = ("os", "json", "re", "shlex", "shutil", "Path", "WorkflowError")


@pytest.mark.parametrize("path", sorted((REPO / "workflow" / "rules").glob("*.smk")), ids=lambda p: p.name)
def test_rule_file_imports_what_it_uses(path):
    """Snakemake runs every included file in one namespace, so a name imported in common.smk is
    visible everywhere; each file still imports what it uses, so it reads on its own."""
    text = path.read_text()
    code = "\n".join(line.split("#")[0] for line in text.splitlines())
    imported = set(re.findall(r"^import (\w+)", text, re.M))
    imported |= {name.strip() for names in re.findall(r"^from \S+ import (.+)$", text, re.M) for name in names.split(",")}
    used = {name for name in IMPORTED_NAMES if re.search(rf"(?<![\w.]){name}\b(?=[.(])", code)}
    assert used <= imported, f"{path.name} uses {sorted(used - imported)} without importing them"


def test_readme_stage_table_names_what_exists():
    readme = (REPO / "README.md").read_text()
    table = re.search(r"^\| stage \| rule file \| logic \|\n\|[-|]+\|\n((?:\|.*\|\n)+)", readme, re.M)
    assert table, "README: the stage -> module table is gone"
    checked = 0
    for row in table.group(1).splitlines():
        for cell in row.strip("|").split("|")[1:]:
            folder, last_file = None, None
            for token in re.findall(r"`([^`]+)`", cell):
                if token.endswith("/"):
                    folder = token
                    assert (REPO / token).is_dir(), f"README stage table: {token} is not a folder"
                    continue
                if "." in token:  # a file: as written, or in the folder the cell named before it
                    path = REPO / token if (REPO / token).exists() or not folder else REPO / folder / token
                    assert path.is_file(), f"README stage table: {token} does not exist ({path.relative_to(REPO)})"
                    last_file = path
                else:  # a function or class of the file named before it
                    assert last_file and re.search(rf"^(def|class) {token}\b", last_file.read_text(), re.M), \
                        f"README stage table: {token} is not defined in {last_file}"
                checked += 1
    assert checked > 30  # the table is read, not skipped
