"""Fixtures of the command tests: long socket paths (what a pipe must not cut) and real
QEMU 7.2 guests from tests/hotplug's fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from hotplug.conftest import qemu_under_test, start_qemu  # noqa: F401 - fixtures, used by name

#: Longer than the 80 columns rich assumes when it cannot ask a terminal, shorter than
#: the 107 bytes a Unix socket path may have.
LONG = 92


@pytest.fixture
def long_name(short_dir: Path) -> str:
    """A file name that makes a path in ``short_dir`` exactly LONG characters long."""
    pad = LONG - len(str(short_dir)) - len("/.sock")
    assert pad > 10, short_dir
    return ("pyvhost-socket-with-a-long-name-" * 4)[:pad] + ".sock"
