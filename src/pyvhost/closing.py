"""The context-manager half of everything pyvhost opens and closes.

:class:`Closing` gives a class with a ``close()`` its ``with`` statement: ``with X(...) as
x:`` closes ``x`` however the block ends. What closing means (and that closing twice is
harmless) is each class's own ``close``; this module owns nothing else.
"""

from __future__ import annotations

from typing import Self


class Closing:
    """``__enter__`` returns the object, ``__exit__`` calls :meth:`close` (exceptions go on)."""

    __slots__ = ()

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
