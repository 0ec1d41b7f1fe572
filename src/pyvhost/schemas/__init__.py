"""The JSON Schema files of every ``--json`` document pyvhost prints.

A document names its schema in its ``schema`` field, ``pyvhost.<command>/<version>``
(``pyvhost.mem.add/1``); the file is ``<command>.<version>.json`` in this package
(``mem.add.1.json``). A change that removes or retypes a field bumps the version. The
files are JSON Schema (draft 2020-12); the tests validate real output against them with
the ``jsonschema`` library, and so can any script that reads pyvhost's output.

A file's ``$id`` is its schema id. Some files refer to parts of others (``mem.remove``
has the shape of ``mem.add``; ``demo`` embeds a ``probe`` report); such a ``$ref`` is
resolved against the referring file's ``$id`` as a URI reference, so it reads
``../pyvhost.probe/1``. To validate, register every file under its id::

    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource
    from pyvhost import schemas

    registry = Registry().with_resources(
        (sid, Resource.from_contents(s)) for sid, s in schemas.every().items())
    Draft202012Validator(schemas.load(doc["schema"]), registry=registry).validate(doc)
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

PREFIX = "pyvhost."


def file_name(schema_id: str) -> str:
    """``pyvhost.mem.add/1`` -> ``mem.add.1.json``."""
    name, sep, version = schema_id.removeprefix(PREFIX).partition("/")
    if not schema_id.startswith(PREFIX) or not sep or not version.isdigit() or not name:
        raise ValueError(f"{schema_id!r} is not a pyvhost schema id like pyvhost.mem.add/1")
    return f"{name}.{version}.json"


def load(schema_id: str) -> dict[str, Any]:
    """The JSON Schema of ``schema_id``; KeyError if pyvhost ships none."""
    try:
        text = resources.files(__name__).joinpath(file_name(schema_id)).read_text("utf-8")
    except FileNotFoundError:
        raise KeyError(schema_id) from None
    schema = json.loads(text)
    if not isinstance(schema, dict):
        raise ValueError(f"{file_name(schema_id)} is not a JSON object")
    return schema


def available() -> list[str]:
    """Every schema id pyvhost ships a file for."""
    out = []
    for entry in resources.files(__name__).iterdir():
        stem = entry.name.removesuffix(".json")
        name, _, version = stem.rpartition(".")
        if entry.name.endswith(".json") and version.isdigit():
            out.append(f"{PREFIX}{name}/{version}")
    return sorted(out)


def every() -> dict[str, dict[str, Any]]:
    """Every schema pyvhost ships, by id (for a validator's registry)."""
    return {schema_id: load(schema_id) for schema_id in available()}
