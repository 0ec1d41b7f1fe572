"""The back-end's one table of vhost-user requests: when each is allowed, and its handler.

A request is declared once, where its handler is written::

    @REQUEST_TABLE.handles(Request.ADD_MEM_REG, needs=ProtocolFeature.CONFIGURE_MEM_SLOTS)
    def _add_mem_reg(c: Connection, msg: Message) -> None: ...

The decorator records a :class:`Rule` (owner and protocol feature needed) beside the
handler in a :class:`RequestTable`. What each request carries on the wire (payload type,
fd count, reply type) stays the codec's business (:data:`pyvhost.protocol.codec.REQUESTS`),
because the front-end decodes with the same codec and handles nothing. :meth:`RequestTable.check`
ties the two together and is run when the table is complete, at import: every request the
back-end handles has a codec entry, and every request the codec decodes is either handled
or listed, with its reason, as unsupported. Adding a request therefore means a codec entry
and one decorated handler; forgetting either fails the import, not a front-end.

This module knows nothing of connections: the table is generic over what its handlers
take, so that :mod:`.connection` can build one without an import cycle.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from pyvhost.errors import LocalError
from pyvhost.protocol import messages as m
from pyvhost.protocol.codec import Message
from pyvhost.protocol.constants import ProtocolFeature, Request, request_name

C = TypeVar("C")


class RegistryError(LocalError):
    """The request table and the codec disagree: a bug in pyvhost, found at import."""


@dataclass(frozen=True, slots=True)
class Rule:
    """When a request is allowed."""

    needs_owner: bool = True
    #: Protocol feature that must have been negotiated (SET_PROTOCOL_FEATURES).
    needs: ProtocolFeature | None = None


@dataclass(frozen=True, slots=True)
class Registration(Generic[C]):
    """A handled request: its rule and its handler (reply payload, or None)."""

    rule: Rule
    handler: Callable[[C, Message], m.Payload | None]


class RequestTable(Generic[C]):
    """Request code -> :class:`Registration`, filled by :meth:`handles`."""

    def __init__(self) -> None:
        self._entries: dict[int, Registration[C]] = {}

    def handles(self, request: Request, *, needs_owner: bool = True,
                needs: ProtocolFeature | None = None,
                ) -> Callable[[Callable[[C, Message], m.Payload | None]],
                              Callable[[C, Message], m.Payload | None]]:
        """Register the decorated function as the handler of ``request``."""
        def register(handler: Callable[[C, Message], m.Payload | None],
                     ) -> Callable[[C, Message], m.Payload | None]:
            if request in self._entries:
                raise RegistryError(f"{request.name} is registered twice")
            self._entries[request] = Registration(Rule(needs_owner, needs), handler)
            return handler
        return register

    def get(self, request: int) -> Registration[C] | None:
        return self._entries.get(request)

    def __contains__(self, request: object) -> bool:
        return request in self._entries

    def __iter__(self) -> Iterator[int]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def rules(self) -> Mapping[int, Rule]:
        """Request code -> rule, for reading (status pages, tests)."""
        return {request: entry.rule for request, entry in self._entries.items()}

    def check(self, codec: Collection[int], unsupported: Mapping[int, str]) -> None:
        """Raise :class:`RegistryError` unless this table, the codec's requests (``codec``:
        the codes it decodes) and the ``unsupported`` list (code -> why) agree."""
        handled = set(self._entries)
        problems = []
        for request in sorted(handled - set(codec)):
            problems.append(f"{request_name(request)} has a handler but no codec entry "
                            "(payload type, fd rule)")
        for request in sorted(handled & set(unsupported)):
            problems.append(f"{request_name(request)} has a handler and is listed as "
                            "unsupported")
        for request in sorted(set(unsupported) - set(codec)):
            problems.append(f"{request_name(request)} is listed as unsupported but the codec "
                            "does not decode it")
        for request in sorted(set(codec) - handled - set(unsupported)):
            problems.append(f"{request_name(request)} is decoded by the codec but neither "
                            "handled nor listed as unsupported")
        if problems:
            raise RegistryError("request table and codec disagree: " + "; ".join(problems))
