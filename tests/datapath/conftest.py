"""Fixtures of the data-path tests: :class:`.rings.Ram`, closed after the test."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing

import pytest

from .rings import Ram


@pytest.fixture
def ram() -> Iterator[Ram]:
    with closing(Ram()) as r:
        yield r
