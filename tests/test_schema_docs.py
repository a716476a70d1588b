"""egm.schema_docs: config/README.md is what the schema says, key by key."""

import yaml

from egm.schema_docs import config_readme, write_config_readme
from tests.workflow_helpers import REPO

SCHEMA = REPO / "workflow/schemas/config.schema.yaml"


def test_committed_config_readme_is_made_from_the_schema(tmp_path):
    """Fails when the schema changed and `python -m egm config-readme` was not run."""
    out = tmp_path / "README.md"
    write_config_readme(SCHEMA, out)
    assert (REPO / "config/README.md").read_text() == out.read_text(), "run `python -m egm config-readme`"


def test_every_key_has_a_row_with_its_meaning():
    text = config_readme(yaml.safe_load(SCHEMA.read_text()))
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) > 80
    assert [row for row in rows if row.endswith("|  |")] == [], "a key without a description in the schema"
    assert "| `resources.gpu_jobs_on_cpu` | boolean | `false` |" in text
    assert "| `models.<name>.repo_id` (required) | string |  |" in text
    assert "| `report.expected.<name>.acc` | array of number |  | [low, high], both included. |" in text


def test_a_key_and_its_description_reach_the_page():
    schema = yaml.safe_load(SCHEMA.read_text())
    schema["properties"]["report"]["properties"]["new_key"] = {"type": "integer", "default": 3,
                                                               "description": "A | new key\n over lines."}
    assert "| `report.new_key` | integer | `3` | A \\| new key over lines. |" in config_readme(schema)
