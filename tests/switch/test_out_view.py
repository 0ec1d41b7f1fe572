"""A port's view as the forward step's egress (``vhost._out``) is kept from one burst to
the next only while nothing it holds changed.

The switch builds one :class:`~pyvhost.switch.forward.Out` per egress port and burst; it
keeps the last one on the port and hands it out again when the snapshot, the ready
receive queues, the header, MRG_RXBUF, the mtu and the offloads are those it was made
with. A stale view would write into an old snapshot or miss a queue: each change below
must give a new one.
"""

from __future__ import annotations

from pyvhost.backend.device import QueueContext
from pyvhost.memory import GuestMemory
from pyvhost.switch import Switch, SwitchPort
from pyvhost.switch.offload import Offload
from pyvhost.switch.vhost import _out
from pyvhost.virtq import SplitQueue


def _ctx(mem: GuestMemory, *queues: SplitQueue) -> QueueContext:
    return QueueContext(mem, {q.index: q for q in queues}, lambda index: None)


def test_the_view_is_kept_while_nothing_changes_and_made_anew_on_each_change() -> None:
    dev = SwitchPort(Switch(), queue_pairs=2)
    mem, rx0, rx2 = GuestMemory(), SplitQueue(0), SplitQueue(2)
    first = _out(dev.port, _ctx(mem, rx0))
    assert first is not None and first.mem is mem and first.queues == (rx0,)
    assert _out(dev.port, _ctx(mem, rx0)) is first            # a new context, same state

    newer = GuestMemory(generation=1)                        # a table update
    view = _out(dev.port, _ctx(newer, rx0))
    assert view is not None and view is not first and view.mem is newer

    both = _out(dev.port, _ctx(newer, rx0, rx2))              # the second pair enabled
    assert both is not None and both is not view and both.queues == (rx0, rx2)
    assert both.more_rx == (rx2,)

    dev.hdr_len, dev.mrg_rxbuf = 10, True                    # negotiated again
    again = _out(dev.port, _ctx(newer, rx0, rx2))
    assert again is not None and again is not both
    assert (again.hdr_len, again.mrg_rxbuf) == (10, True)

    dev.rx_offload = Offload.CSUM
    csum = _out(dev.port, _ctx(newer, rx0, rx2))
    assert csum is not None and csum is not again and csum.accepts == int(Offload.CSUM)

    dev.mtu = 9000
    jumbo = _out(dev.port, _ctx(newer, rx0, rx2))
    assert jumbo is not None and jumbo is not csum and jumbo.max_eth == 9018
    assert _out(dev.port, _ctx(newer, rx0, rx2)) is jumbo


def test_a_broken_queue_sends_the_port_to_the_python_path_whatever_was_kept() -> None:
    dev = SwitchPort(Switch())
    mem, rx0 = GuestMemory(), SplitQueue(0)
    assert _out(dev.port, _ctx(mem, rx0)) is not None
    rx0.broken = "bad descriptor"
    assert _out(dev.port, _ctx(mem, rx0)) is None
    assert _out(dev.port, _ctx(mem)) is None                 # no ready receive queue
