"""Fixtures of the virtqueue tests: guest memory a driver ring and a queue share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from support.memfd import SharedRam


@pytest.fixture
def ram() -> Iterator[SharedRam]:
    r = SharedRam()
    try:
        yield r
    finally:
        r.close()
