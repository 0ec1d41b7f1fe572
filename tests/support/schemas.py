"""Validate pyvhost's JSON output against the JSON Schema files it ships
(:mod:`pyvhost.schemas`), with the ``jsonschema`` library."""

from __future__ import annotations

import functools
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from pyvhost import schemas


@functools.cache
def registry() -> Registry[Any]:
    """Every shipped schema under its id, so that ``$ref`` between files resolves."""
    return Registry().with_resources(
        (schema_id, Resource.from_contents(schema))
        for schema_id, schema in schemas.every().items())


def validator(schema_id: str) -> Draft202012Validator:
    return Draft202012Validator(schemas.load(schema_id), registry=registry())


def validate(doc: Any, schema_id: str | None = None) -> dict[str, Any]:
    """Check ``doc`` against the schema it names (or ``schema_id``, which it must name);
    AssertionError lists every place it breaks the schema. Returns ``doc``."""
    assert isinstance(doc, dict), f"not a JSON object: {doc!r}"
    named = doc.get("schema")
    assert isinstance(named, str), f"no schema field: {doc!r}"
    if schema_id is not None:
        assert named == schema_id, f"schema {named!r}, expected {schema_id!r}"
    errors = sorted(validator(named).iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "\n".join(
        f"{'/'.join(map(str, e.absolute_path)) or '$'}: {e.message}" for e in errors)
    return doc
