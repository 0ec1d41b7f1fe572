"""Fixtures of the virtqueue tests: guest memory a driver ring and a queue share."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing

import pytest

from support.memfd import SharedRam


@pytest.fixture
def ram() -> Iterator[SharedRam]:
    with closing(SharedRam()) as r:
        yield r
