"""What a hostile case is: a name, the spec sentence it relies on, and what it sends.

A case function gets an :class:`~.attacker.Attacker` (a fresh connection) and a
:class:`Context` (the runner's eyes: the measured process, the witness connection) and
returns the :class:`~.attacker.Response` to its hostile message. It raises
:class:`NotApplicable` when the back-end did not negotiate what the case needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .attacker import Attacker, Response

GROUPS = ("framing", "fds", "memory", "vring", "descriptors", "destructive")


class NotApplicable(Exception):  # noqa: N818 - a verdict, not an error
    """The case does not apply to this back-end (a feature it did not negotiate)."""


@dataclass
class Context:
    """What a case may ask the runner while it runs."""

    #: "" when the witness connection still answers (and, on net, moves frames) within
    #: the case timeout; else what went wrong.
    witness: Callable[[], str]
    #: Whether the measured process holds (an fd on, or a mapping of) a file of ours.
    holds: Callable[[str], bool]
    #: Let the back-end catch up before looking at what it holds.
    settle: Callable[[], None]
    #: Findings a case makes itself, beyond its response.
    leaked: list[str] = field(default_factory=list)
    harmed: list[str] = field(default_factory=list)


CaseFn = Callable[[Attacker, Context], Response]


@dataclass(frozen=True, slots=True)
class Case:
    """One named hostile case."""

    name: str
    group: str
    #: The sentence of QEMU's docs/interop/vhost-user.rst (or the virtio spec) it relies on.
    spec: str
    what: str
    run: CaseFn
    #: A back-end that sends nothing back in time is hung (False: no reply is owed).
    reply_due: bool = True
    #: The case broke the stream's framing on purpose: no follow-up GET_FEATURES.
    desync: bool = False
    #: Only with --include-destructive (it may kill a back-end that is not robust).
    destructive: bool = False


__all__ = ["GROUPS", "Case", "CaseFn", "Context", "NotApplicable"]
