"""Fixtures of the front-end tests: short socket paths and scripted fake back-ends."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .fake_backend import FakeBackend


@pytest.fixture
def short_dir() -> Iterator[str]:
    """A fresh directory with a short path (a Unix socket path has at most 107 bytes)."""
    path = tempfile.mkdtemp(prefix="pvfe-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_backend(short_dir: str) -> Iterator[Callable[..., FakeBackend]]:
    """Start fake back-ends on sockets in ``short_dir``; all are stopped at teardown."""
    started: list[FakeBackend] = []

    def make(**kwargs: Any) -> FakeBackend:
        backend = FakeBackend(f"{short_dir}/be{len(started)}.sock", **kwargs)
        started.append(backend)
        return backend

    try:
        yield make
    finally:
        for backend in started:
            backend.close()
