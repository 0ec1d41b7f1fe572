"""The compiled burst survives guest memory that shrinks under its mapping (SIGBUS), in
this process: a region's memfd is truncated, the burst faults, the guard turns the fault
into MemoryFaultError, and the process (this test) goes on. Also: the guard stays first
after faulthandler is enabled again (pytest enables it before any test runs)."""

from __future__ import annotations

import faulthandler
import os
import signal
import subprocess
import sys

import pytest

from pyvhost.datapath import reference
from pyvhost.memory import MemoryFaultError
from pyvhost.virtq import SplitQueue
from support.ring import Buffer

from .rings import Ram, make_queue

native = pytest.importorskip("pyvhost.datapath._native",
                             reason="the compiled data path is not built")

TX_RING = (0x1000, 0x1400, 0x1600)
RX_RING = (0x2000, 0x2400, 0x2600)


def one_frame(ram: Ram) -> tuple[SplitQueue, SplitQueue]:
    tx, txr = make_queue(ram, 1, 8, TX_RING, event_idx=False, base=0)
    rx, rxr = make_queue(ram, 0, 8, RX_RING, event_idx=False, base=0)
    ram.write(0x8000, bytes(12) + bytes(range(64)))
    txr.post(txr.write_chain([0], [Buffer(0x8000, 76)]))
    rxr.post(rxr.write_chain([0], [Buffer(0x9000, 2048, writable=True)]))
    return tx, rx


def test_truncated_region_raises_instead_of_killing(ram: Ram) -> None:
    tx, rx = one_frame(ram)
    stats = dict.fromkeys(reference.STATS, 0)
    path = native.Reflector()
    os.ftruncate(ram.fd, 0)  # every page of every region is now past the end of the file
    with ram.manager.hold() as mem, pytest.raises(MemoryFaultError, match="SIGBUS"):
        path.burst(mem, tx, rx, 12, False, 64, stats)
    # Nothing was written back: the connection that owns this memory is closed for it.
    assert (tx.last_avail_idx, tx.used_idx, stats["tx_frames"]) == (0, 0, 0)


def test_the_guard_stays_first_after_faulthandler_is_enabled_again(ram: Ram) -> None:
    native.Reflector()
    assert native.guard_installed()
    # Enabled again after a disable(), faulthandler installs its handler over ours.
    faulthandler.disable()
    faulthandler.enable(file=sys.stderr)
    try:
        assert not native.guard_installed()
        path = native.Reflector()  # a new device checks, and puts the guard first again
        assert native.guard_installed()
        tx, rx = one_frame(ram)
        os.ftruncate(ram.fd, 0)
        with ram.manager.hold() as mem, pytest.raises(MemoryFaultError):
            path.burst(mem, tx, rx, 12, False, 64, dict.fromkeys(reference.STATS, 0))
        assert native.guard_installed()
    finally:
        faulthandler.enable(file=sys.stderr)
        native.install_guard()


def test_a_burst_that_does_not_fault_is_unaffected(ram: Ram) -> None:
    tx, rx = one_frame(ram)
    stats = dict.fromkeys(reference.STATS, 0)
    with ram.manager.hold() as mem:
        assert native.Reflector().burst(mem, tx, rx, 12, False, 64, stats) == 1
    assert stats["rx_frames"] == 1
    got = ram.read(0x9000, 76)
    assert got[:12] == bytes(10) + b"\x01\x00"
    assert got[12:24] == bytes(range(6, 12)) + bytes(range(6))
    assert got[24:] == bytes(range(12, 64))


OUTSIDE_A_BURST = """
import faulthandler, mmap, os, sys
if sys.argv[1] == "faulthandler":
    faulthandler.enable()
from pyvhost.datapath import _native
_native.Reflector()  # installs the guard (chaining to faulthandler, if enabled)
assert _native.guard_installed()
fd = os.memfd_create("outside")
os.ftruncate(fd, 4096)
mm = mmap.mmap(fd, 4096)
os.ftruncate(fd, 0)
print("faulting", flush=True)
mm[0]  # SIGBUS here, outside any burst
print("survived", flush=True)
"""


@pytest.mark.parametrize("before", ["default", "faulthandler"])
def test_a_fault_outside_a_burst_still_kills(before: str) -> None:
    """Outside a burst the guard hands SIGBUS on: to faulthandler (which prints the
    Python traceback) or to the default action. The process dies of SIGBUS either way."""
    p = subprocess.run([sys.executable, "-c", OUTSIDE_A_BURST, before], capture_output=True,
                       text=True, timeout=60, check=False)
    assert p.returncode == -signal.SIGBUS, (p.returncode, p.stdout, p.stderr)
    assert "faulting" in p.stdout and "survived" not in p.stdout
    assert ("Bus error" in p.stderr) == (before == "faulthandler"), p.stderr
