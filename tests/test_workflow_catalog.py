"""The Snakemake workflow catalog's conventions: .snakemake-workflow-catalog.yml in its format,
and the configuration page it links (config/README.md; its content: tests/test_schema_docs.py)."""

import re

import yaml

from tests.workflow_helpers import REPO


def test_catalog_file_has_the_catalogs_keys_and_says_what_holds():
    usage = yaml.safe_load((REPO / ".snakemake-workflow-catalog.yml").read_text())["usage"]
    assert set(usage) == {"mandatory-flags", "software-stack-deployment"}
    assert set(usage["mandatory-flags"]) == {"desc", "flags"}
    stack = usage["software-stack-deployment"]
    assert set(stack) == {"conda", "apptainer", "apptainer+conda", "report"}
    assert all(isinstance(value, bool) for value in stack.values())
    rules = "".join(path.read_text() for path in (REPO / "workflow/rules").glob("*.smk"))
    # apptainer: every rule with a command runs in a named image (a `run:` block runs in
    # Snakemake's own process, on the host: the cost table); conda: no rule has an environment file.
    n_rules = len(re.findall(r"^\s*rule \w+:$", rules, re.M))
    n_host = len(re.findall(r"^\s+run:$", rules, re.M))
    assert n_rules > 15 and n_host == 1
    assert stack["apptainer"] == (len(re.findall(r"^\s+container:$", rules, re.M)) == n_rules - n_host)
    assert stack["conda"] == bool(re.search(r"^\s+conda:$", rules, re.M))
    assert (REPO / "config/README.md").is_file()
