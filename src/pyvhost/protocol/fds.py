"""Ownership of file descriptors received with SCM_RIGHTS.

Every fd that arrives has exactly one owner. A message's fds live in an :class:`FdBag`;
a handler ``take``s the ones it keeps, and whatever it did not take is closed when the bag
is closed. The codec closes the bag of any message it refuses, so no path leaks an fd.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator

from pyvhost.closing import Closing


class FdBag(Closing):
    """The fds that came with one message. Close it when the message is handled."""

    __slots__ = ("_fds",)

    def __init__(self, fds: Iterable[int] = ()) -> None:
        self._fds: list[int | None] = list(fds)

    def __len__(self) -> int:
        return len(self._fds)

    def __iter__(self) -> Iterator[int | None]:
        return iter(self._fds)

    def peek(self, i: int) -> int:
        """The i-th fd, still owned by the bag."""
        fd = self._fds[i]
        if fd is None:
            raise ValueError(f"fd {i} of this message was already taken")
        return fd

    def take(self, i: int) -> int:
        """Take ownership of the i-th fd: the caller must close it from now on."""
        fd = self.peek(i)
        self._fds[i] = None
        return fd

    def close(self) -> None:
        """Close every fd nobody took. Idempotent."""
        for i, fd in enumerate(self._fds):
            if fd is not None:
                self._fds[i] = None
                with contextlib.suppress(OSError):
                    os.close(fd)

    def __repr__(self) -> str:
        return f"FdBag({self._fds!r})"


def close_all(fds: Iterable[int]) -> None:
    """Close fds, ignoring ones that are already gone."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
