"""The arrows point one way: the library never imports the commands (:mod:`pyvhost.cli`).

Two looks, because each misses what the other sees. The source of every library module
is read (an import inside a function counts, though it has not run yet); and every
library module is imported in a fresh interpreter, after which ``pyvhost.cli`` must not
be in ``sys.modules`` (an import through another package counts). Only
``pyvhost.__main__`` (``python -m pyvhost``, the command itself) may import it.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pyvhost

PACKAGE = Path(pyvhost.__file__).resolve().parent
#: Modules that are the commands, or start them.
COMMANDS = ("pyvhost.cli", "pyvhost.__main__")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_command(name: str) -> bool:
    return any(name == c or name.startswith(c + ".") for c in COMMANDS)


def _library_modules() -> list[tuple[str, Path]]:
    found = [(_module_name(p), p) for p in sorted(PACKAGE.rglob("*.py"))]
    return [(name, p) for name, p in found if not _is_command(name)]


def _imported(name: str, path: Path) -> set[str]:
    """Every module an ``import`` or ``from ... import`` in ``path`` names, relative ones
    resolved against the module ``name``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            out.add(module)
            out.update(f"{module}.{a.name}" for a in node.names)  # from pyvhost import cli
    return out


def test_the_scan_sees_what_it_looks_for() -> None:
    """The scan resolves absolute, relative and ``from package import module`` imports."""
    main = PACKAGE / "__main__.py"
    assert "pyvhost.cli" in _imported("pyvhost.__main__", main)
    net = PACKAGE / "cli" / "net.py"
    assert any(_is_command(m) for m in _imported("pyvhost.cli.net", net))
    names = {name for name, _ in _library_modules()}
    assert {"pyvhost", "pyvhost.units", "pyvhost.backend.server"} <= names
    assert not any(_is_command(n) for n in names)


def test_no_library_module_imports_the_commands() -> None:
    offenders = {name: sorted(m for m in _imported(name, path) if _is_command(m))
                 for name, path in _library_modules()}
    assert {k: v for k, v in offenders.items() if v} == {}


_IMPORT_ALL = """
import importlib, json, sys
failed = {}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except ImportError as e:  # an optional dependency missing: reported, not hidden
        failed[name] = str(e)
print(json.dumps({"cli": sorted(m for m in sys.modules if m == "pyvhost.cli"
                                or m.startswith("pyvhost.cli.")),
                  "failed": failed, "loaded": len([m for m in sys.modules
                                                   if m.startswith("pyvhost")])}))
"""


def test_importing_the_whole_library_does_not_load_the_commands() -> None:
    names = [name for name, _ in _library_modules()]
    done = subprocess.run([sys.executable, "-c", _IMPORT_ALL, *names], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["failed"] == {}
    assert result["loaded"] >= len(names)
    assert result["cli"] == []
