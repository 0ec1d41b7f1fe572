"""The back-end's request table against the codec's: a gap on either side fails the import.

The table is filled by ``@REQUEST_TABLE.handles(...)`` in :mod:`pyvhost.backend.connection`
and checked there against :data:`pyvhost.protocol.codec.REQUESTS`; these tests take a
request out of one side at a time and show the check names it.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from pyvhost.backend.connection import REQUEST_TABLE, UNSUPPORTED, Connection
from pyvhost.backend.registry import RegistryError, RequestTable, Rule
from pyvhost.protocol import messages as m
from pyvhost.protocol.codec import REQUESTS, Message
from pyvhost.protocol.constants import ProtocolFeature, Request


def _copy_without(*left_out: Request) -> RequestTable[Connection]:
    """The back-end's table, less the handlers of ``left_out``."""
    table: RequestTable[Connection] = RequestTable()
    for request in REQUEST_TABLE:
        entry = REQUEST_TABLE.get(request)
        assert entry is not None
        if request not in left_out:
            table.handles(Request(request), needs_owner=entry.rule.needs_owner,
                          needs=entry.rule.needs)(entry.handler)
    return table


def test_every_codec_request_is_handled_or_unsupported() -> None:
    REQUEST_TABLE.check(REQUESTS, UNSUPPORTED)  # what the import did
    assert set(REQUEST_TABLE) | set(UNSUPPORTED) == set(REQUESTS)
    assert not set(REQUEST_TABLE) & set(UNSUPPORTED)
    assert all(UNSUPPORTED.values()), "every unsupported request says why"


def test_rules_are_where_the_handlers_are() -> None:
    rules = REQUEST_TABLE.rules
    assert rules[Request.GET_FEATURES] == Rule(needs_owner=False)
    assert rules[Request.SET_MEM_TABLE] == Rule()
    assert rules[Request.ADD_MEM_REG] == Rule(needs=ProtocolFeature.CONFIGURE_MEM_SLOTS)
    assert rules[Request.GET_MAX_MEM_SLOTS] == Rule(
        needs_owner=False, needs=ProtocolFeature.CONFIGURE_MEM_SLOTS)
    assert rules[Request.GET_STATUS] == Rule(needs=ProtocolFeature.STATUS)


def test_a_missing_codec_entry_is_caught() -> None:
    codec = dict(REQUESTS)
    del codec[Request.SET_MEM_TABLE]
    with pytest.raises(RegistryError,
                       match="SET_MEM_TABLE has a handler but no codec entry"):
        REQUEST_TABLE.check(codec, UNSUPPORTED)


def test_a_missing_handler_is_caught() -> None:
    table = _copy_without(Request.GET_STATUS)
    with pytest.raises(RegistryError, match="GET_STATUS is decoded by the codec but neither "
                                            "handled nor listed as unsupported"):
        table.check(REQUESTS, UNSUPPORTED)
    # Listing it as unsupported, with a reason, is the other way to make it agree.
    table.check(REQUESTS, {**UNSUPPORTED, Request.GET_STATUS: "not offered"})


def test_a_new_codec_entry_needs_a_decision() -> None:
    codec = {**REQUESTS, Request.GET_INFLIGHT_FD: REQUESTS[Request.GET_STATUS]}
    with pytest.raises(RegistryError, match="GET_INFLIGHT_FD is decoded by the codec"):
        REQUEST_TABLE.check(codec, UNSUPPORTED)


def test_handled_and_unsupported_at_once_is_caught() -> None:
    with pytest.raises(RegistryError, match="SET_OWNER has a handler and is listed"):
        REQUEST_TABLE.check(REQUESTS, {**UNSUPPORTED, Request.SET_OWNER: "?"})


def test_unsupported_but_unknown_to_the_codec_is_caught() -> None:
    with pytest.raises(RegistryError, match="IOTLB_MSG is listed as unsupported but"):
        REQUEST_TABLE.check(REQUESTS, {**UNSUPPORTED, Request.IOTLB_MSG: "no IOMMU"})


def test_every_problem_is_named_at_once() -> None:
    codec = dict(REQUESTS)
    del codec[Request.ADD_MEM_REG]
    with pytest.raises(RegistryError) as info:
        _copy_without(Request.SET_VRING_ERR).check(codec, UNSUPPORTED)
    assert "ADD_MEM_REG has a handler" in str(info.value)
    assert "SET_VRING_ERR is decoded" in str(info.value)


def test_a_request_registered_twice_is_refused() -> None:
    table: RequestTable[None] = RequestTable()

    @table.handles(Request.GET_FEATURES, needs_owner=False)
    def first(c: None, msg: Message) -> m.Payload:
        return m.U64(0)

    with pytest.raises(RegistryError, match="GET_FEATURES is registered twice"):
        table.handles(Request.GET_FEATURES)(first)
    assert table.rules == {Request.GET_FEATURES: Rule(needs_owner=False)}


def test_the_import_itself_fails_on_a_gap() -> None:
    """The check runs when the connection module is imported, not only in tests."""
    code = ("import pyvhost.protocol.codec as codec\n"
            "del codec.REQUESTS[codec.Request.SET_VRING_KICK]\n"
            "import pyvhost.backend.connection\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    assert "RegistryError" in result.stderr
    assert "SET_VRING_KICK has a handler but no codec entry" in result.stderr
