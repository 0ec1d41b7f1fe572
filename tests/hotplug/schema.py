"""The JSON schemas of docs/mem-json.md, and a validator for the subset of JSON Schema
they use (type, properties, required, items, enum, additionalProperties)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

DOC = Path(__file__).resolve().parents[2] / "docs" / "mem-json.md"
_BLOCK = re.compile(r"<!-- schema: (\w+) -->\s*```json\n(.*?)```", re.DOTALL)
_TYPES: dict[str, Any] = {"object": dict, "array": list, "string": str, "boolean": bool,
                          "null": type(None), "integer": int, "number": (int, float)}


def schemas() -> dict[str, dict[str, Any]]:
    return {name: json.loads(body) for name, body in _BLOCK.findall(DOC.read_text())}


def _is(value: Any, type_name: str) -> bool:
    if type_name in ("integer", "number") and isinstance(value, bool):
        return False
    return isinstance(value, _TYPES[type_name])


def validate(value: Any, schema: dict[str, Any], where: str = "$") -> None:
    """Raise AssertionError naming the first place ``value`` breaks ``schema``."""
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        assert any(_is(value, t) for t in types), f"{where}: {value!r} is not {types}"
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            assert key in value, f"{where}: missing {key!r}"
        if schema.get("additionalProperties") is False:
            extra = set(value) - set(props)
            assert not extra, f"{where}: unexpected {sorted(extra)}"
        for key, sub in props.items():
            if key in value:
                validate(value[key], sub, f"{where}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            validate(item, schema["items"], f"{where}[{i}]")
