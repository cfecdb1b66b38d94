"""The docs stay true: the configuration reference and the schema list the same keys, every
message the troubleshooting page quotes is still printed by the code, and every ``ray-cml``
command is documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ray_cml_provider.cli import SUBCOMMANDS
from ray_cml_provider.provider.config import NODE_CONFIG_SCHEMA, PROVIDER_SCHEMA

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SOURCE = "\n".join(p.read_text() for p in (ROOT / "ray_cml_provider").rglob("*.py"))


def tables_under(markdown: str, heading: str) -> list[list[str]]:
    """The rows (as cell lists, header first) of the first table after ``heading``."""
    section = markdown.split(heading, 1)[1]
    rows = []
    for line in section.splitlines()[1:]:
        if line.startswith("|"):
            if not re.fullmatch(r"\|[-| ]+\|", line):
                rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
        elif rows:
            break
    return rows


def documented_keys(heading: str) -> set[str]:
    rows = tables_under((DOCS / "configuration.md").read_text(), heading)
    assert rows[0][0] == "key"
    return {re.fullmatch(r"`([a-z_]+)`", row[0]).group(1) for row in rows[1:]}


@pytest.mark.parametrize(
    ("heading", "schema"),
    [
        ("## Provider section (`provider:`)", PROVIDER_SCHEMA),
        ("## `node_config` of each node type", NODE_CONFIG_SCHEMA),
    ],
)
def test_the_configuration_reference_and_the_schema_list_the_same_keys(heading, schema):
    in_schema = set(schema["properties"])
    in_docs = documented_keys(heading)
    assert in_docs - in_schema == set(), "documented but the schema rejects them"
    assert in_schema - in_docs == set(), "accepted by the schema but not documented"
    for key in schema.get("required", []):
        row = next(
            r
            for r in tables_under((DOCS / "configuration.md").read_text(), heading)
            if r[0] == f"`{key}`"
        )
        assert row[2] == "required", key


def quoted_messages() -> list[str]:
    """Backquoted fragments of the message columns of troubleshooting.md (Ray's own
    messages, marked "(Ray's)", and placeholders like ``<field>`` left out)."""
    fragments = []
    markdown = (DOCS / "troubleshooting.md").read_text()
    tables = re.findall(r"(?:^\|.*\n)+", markdown, re.M)
    for table in tables:
        lines = table.splitlines()
        header = [c.strip() for c in lines[0].strip("|").split(" | ")]
        columns = [i for i, name in enumerate(header) if name.startswith(("message", "line"))]
        for line in lines[2:]:
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            for i in columns:
                if cells[i].startswith("(Ray's)"):
                    continue
                for fragment in re.findall(r"`([^`]+)`", cells[i]):
                    fragments += [
                        part.strip()
                        for part in fragment.split("...")
                        if part.strip() and "<" not in part
                    ]
    return fragments


def test_every_message_in_troubleshooting_is_still_printed_by_the_code():
    fragments = quoted_messages()
    assert len(fragments) > 50
    missing = [f for f in fragments if f not in SOURCE]
    assert missing == [], "troubleshooting.md quotes messages the code no longer prints"


def test_every_command_is_documented():
    readme = (ROOT / "README.md").read_text()
    for command in SUBCOMMANDS:
        assert f"ray-cml {command}" in readme, command
    for page in ("configuration", "troubleshooting", "migration", "security", "architecture"):
        assert (DOCS / f"{page}.md").exists() and f"docs/{page}.md" in readme, page
