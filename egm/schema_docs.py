"""config/README.md from the config schema (workflow/schemas/config.schema.yaml).

The schema is where each key's type, default and meaning are kept (Snakemake validates every
config against it); the README is made from it by `python -m egm config-readme`, so the two never
disagree (tests/test_schema_docs.py checks the committed file is what this writes). The Snakemake
workflow catalog shows config/README.md as the workflow's configuration page.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

HEADER = """\
# Configuration

<!-- Made by `python -m egm config-readme` from workflow/schemas/config.schema.yaml: edit the
schema's descriptions, not this file. -->

A run is configured by one YAML file: `config/config.yaml` (the paper) unless `--configfile`
names another, which then replaces it (`config/demo.yaml`: the embedded demo on the CPU;
`config/gpu-smoke.yaml`: one GPU, no hub; `config/cluster-smoke.yaml`: the paper's GPU requests
on the demo, through SLURM). Snakemake checks the file against the schema before any job starts:
an unknown key, or a value of the wrong type, stops the run naming it. Keys left out take the
defaults below. `<name>` stands for a key you choose (a model, a training run).
"""


def _type(node: dict) -> str:
    if "enum" in node:
        return "one of " + ", ".join(f"`{json.dumps(v)}`" for v in node["enum"])
    if "const" in node:
        return f"`{json.dumps(node['const'])}`"
    if "oneOf" in node:
        return " or ".join(_type(option) for option in node["oneOf"])
    kinds = node.get("type")
    if kinds is None:
        return "any"
    kinds = [kinds] if isinstance(kinds, str) else kinds
    if "array" in kinds and isinstance(node.get("items"), dict) and node["items"]:
        kinds = [f"array of {_type(node['items'])}" if k == "array" else k for k in kinds]
    return " or ".join(kinds)


def _text(value: str) -> str:
    # Table cells are one line: folded YAML text may still hold newlines, and `|` ends a cell.
    return " ".join(str(value).split()).replace("|", "\\|")


def _resolve(node: dict, defs: dict) -> dict:
    """`{$ref: "#/$defs/x"}` as the definition it names (the schema's own $defs only)."""
    if "$ref" not in node:
        return node
    return {**defs[node["$ref"].rsplit("/", 1)[-1]], **{k: v for k, v in node.items() if k != "$ref"}}


def _rows(node: dict, path: str, defs: dict) -> Iterator[tuple[str, dict]]:
    """(dotted key, schema node) for `node` and every key below it, depth first in schema order.
    An object whose keys are listed below it gets no row of its own unless it says something."""
    node = _resolve(node, defs)
    extra = node.get("additionalProperties")
    nested = isinstance(extra, dict) and (extra.get("properties") or isinstance(extra.get("additionalProperties"), dict))
    if "description" in node or not (node.get("properties") or nested):
        yield path, node
    for key, child in (node.get("properties") or {}).items():
        yield from _rows(child, f"{path}.{key}" if path else key, defs)
    if nested:
        yield from _rows(extra, f"{path}.<name>", defs)


def _default(node: dict) -> str:
    if "default" not in node:
        return ""
    value = node["default"]
    if value in ({}, []) and node.get("type") in ("object", "array"):
        return "empty"
    return f"`{json.dumps(value)}`"


def config_readme(schema: dict[str, Any]) -> str:
    """The Markdown page: the header, then one table per top-level key."""
    required, defs = set(schema.get("required", [])), schema.get("$defs", {})
    out = [HEADER]
    for top, node in schema["properties"].items():
        out.append(f"\n## `{top}`{' (required)' if top in required else ''}\n")
        if node.get("description"):
            out.append(f"\n{_text(node['description'])}\n")
        rows = [(path, child) for path, child in _rows(node, top, defs) if path != top]
        if not rows:
            out.append(f"\nType: {_type(node)}. Default: {_default(node) or 'none'}.\n")
            continue
        out.append("\n| key | type | default | meaning |\n|---|---|---|---|\n")
        for path, child in rows:
            key = f"`{path}`" + (" (required)" if path.rsplit(".", 1)[-1] in _required_of(node, path) else "")
            out.append(f"| {key} | {_text(_type(child))} | {_text(_default(child))} | {_text(child.get('description', ''))} |\n")
    return "".join(out)


def _required_of(top: dict, path: str) -> set[str]:
    """The keys required beside the last one of `path` (the parent's `required`)."""
    parent = top
    for part in path.split(".")[1:-1]:
        parent = parent["additionalProperties"] if part == "<name>" else parent["properties"][part]
    return set(parent.get("required", []))


def write_config_readme(schema_path: Path, out: Path) -> None:
    """Write config/README.md from the schema file (temp file + rename)."""
    from egm.io import atomic_write

    text = config_readme(yaml.safe_load(Path(schema_path).read_text()))
    with atomic_write(out) as handle:
        handle.write(text)
