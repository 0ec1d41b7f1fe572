"""The JSON Schema files pyvhost ships: each one a valid draft 2020-12 schema named after
its id, every command's document among them, and the validator strict where it must be.
Real output is checked against them in each command's tests."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from pyvhost import schemas
from pyvhost.hotplug.plan import Code
from support.schemas import registry, validate, validator

ROOT = Path(__file__).resolve().parents[2]
EXPECTED = {"pyvhost.error/1", "pyvhost.status/1", "pyvhost.probe/1", "pyvhost.demo/1",
            "pyvhost.probe.hostile/1", "pyvhost.probe.cases/1",
            "pyvhost.mem.status/1", "pyvhost.mem.add/1", "pyvhost.mem.remove/1",
            "pyvhost.mem.resize/1", "pyvhost.mem.migrate-args/1", "pyvhost.mem.migrate/1"}


def _files() -> list[str]:
    return sorted(e.name for e in resources.files(schemas).iterdir()
                  if e.name.endswith(".json"))


def test_every_command_document_has_a_file() -> None:
    assert set(schemas.available()) >= EXPECTED
    assert len(_files()) == len(schemas.available()), "a .json file not named NAME.N.json"


@pytest.mark.parametrize("name", _files())
def test_each_file_is_a_valid_schema_named_after_its_id(name: str) -> None:
    schema = json.loads(resources.files(schemas).joinpath(name).read_text("utf-8"))
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schemas.file_name(schema["$id"]) == name
    assert schema["title"] and schema["description"]
    # Every $ref resolves (a typo would only surface when a document reaches it).
    resolver = registry().resolver(base_uri=schema["$id"])
    for ref in _refs(schema):
        assert resolver.lookup(ref).contents, ref
    # The document's schema field must name this very file.
    assert list(validator(schema["$id"]).iter_errors({"schema": "pyvhost.other/1"})), name


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_file_names_and_ids() -> None:
    assert schemas.file_name("pyvhost.mem.add/1") == "mem.add.1.json"
    for bad in ("mem.add/1", "pyvhost.mem.add", "pyvhost./1", "pyvhost.x/one"):
        with pytest.raises(ValueError):
            schemas.file_name(bad)
    with pytest.raises(KeyError):
        schemas.load("pyvhost.nothing/1")


def _error(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"schema": "pyvhost.error/1", "ok": False, "command": "mem add",
                           "exit_code": 2, "error": {"kind": "connect", "message": "x"}}
    doc.update(changes)
    return doc


def test_the_validator_rejects_what_it_should() -> None:
    validate(_error())
    for bad in (_error(ok=True), _error(exit_code=1), _error(exit_code="2"),
                _error(error={"kind": "oops", "message": "x"}), _error(more=1),
                {k: v for k, v in _error().items() if k != "command"}):
        with pytest.raises(AssertionError):
            validate(bad)
    with pytest.raises(AssertionError, match="expected"):
        validate(_error(), "pyvhost.probe/1")
    # A $ref into another file is followed: remove's documents are add's shape.
    with pytest.raises(AssertionError, match="dry_run"):
        validate({"schema": "pyvhost.mem.remove/1"})


def test_mem_doc_points_to_the_files_and_names_every_refusal_code() -> None:
    text = (ROOT / "docs" / "mem-json.md").read_text()
    for sid in ("mem.status", "mem.add", "mem.remove", "mem.resize", "error"):
        assert f"src/pyvhost/schemas/{sid}.1.json" in text, sid
    assert "```json\n{\"type\"" not in text, "a schema copied into the doc"
    for code in Code:
        assert f"`{code.value}`" in text
