"""Which data path serves a queue that carries a dirty log, and the compiled path's refusal
of a log it can not reach (the differential tests hold the marks of both paths equal).

The compiled path marks a log through its address (``DirtyLog.address``); a log without
one (no libatomic, or closed) must never be handed to it: ``pyvhost.datapath.serves_log``
says no, and a burst given one anyway refuses before it touches guest memory.
"""

from __future__ import annotations

import pytest

from pyvhost import datapath
from pyvhost.datapath import reference
from pyvhost.memory.dirtylog import ATOMIC

from .rings import LogFile, Ram, make_queue, queue_state
from .test_differential import RX_RING, TX_RING

native = pytest.importorskip("pyvhost.datapath._native",
                             reason="the compiled data path is not built")


def test_the_logging_data_path_is_the_compiled_one_where_it_runs() -> None:
    compiled = datapath.name() == "compiled" and ATOMIC
    assert datapath.COMPILED_LOGS
    assert datapath.logging_name() == ("compiled" if compiled else "python")
    assert datapath.LoggingReflector is (native.Reflector if compiled
                                         else reference.Reflector)


def test_a_closed_log_is_not_served_by_the_compiled_path(ram: Ram) -> None:
    tx, _ = make_queue(ram, 1, 8, TX_RING, event_idx=False, base=0)
    rx, _ = make_queue(ram, 0, 8, RX_RING, event_idx=False, base=0)
    log = LogFile(8)
    try:
        assert datapath.serves_log(log.log) == (datapath.logging_name() == "compiled")
        tx.log = rx.log = log.log
        tx.log_guest_addr = 0x1000
        log.log.close()
        assert not datapath.serves_log(log.log)
        before = ram.image(), queue_state(tx), queue_state(rx)
        stats = dict.fromkeys(reference.STATS, 0)
        with ram.manager.hold() as mem, pytest.raises(ValueError, match="no address"):
            native.Reflector().burst(mem, tx, rx, 12, False, 64, stats)
        assert (ram.image(), queue_state(tx), queue_state(rx)) == before
        assert log.log.marks == 0
    finally:
        log.close()
