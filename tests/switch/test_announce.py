"""SEND_RARP (PROTOCOL_F_RARP): after a live migration QEMU asks the destination's
back-end to announce the guest's MAC address; the switch then sends the guest's frames
to the destination's port at once, not to the source's (whose rings are stopped) until
the MAC ages out or the source quits."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from backend.harness import QEMU_PROTOCOL, NetPort
from pyvhost.protocol import messages as m
from pyvhost.protocol.constants import ProtocolFeature, Request
from pyvhost.switch.vhost import rarp_frame
from support.ring import Buffer

from .conftest import Guest, Switched
from .test_vhost_ports import frame, mac

GUEST = mac(7)


@pytest.fixture
def destination(switched: Switched) -> Iterator[NetPort]:
    port = NetPort(switched.path, tag="dest", protocol=QEMU_PROTOCOL | ProtocolFeature.RARP)
    try:
        port.start()
        yield port
    finally:
        port.close()


def test_the_announced_mac_moves_to_the_destination(switched: Switched,
                                                    destination: NetPort) -> None:
    src, other = Guest(switched, "src"), Guest(switched, "other")
    try:
        other.post_rx(8)
        src.send([frame(mac(2), GUEST)])        # the guest's MAC is learned on the source
        other.recv(1)
        names = {d.port.name for d in switched.devices} - {src.device.port.name,
                                                            other.device.port.name}
        (dest_name,) = names
        assert switched.learned()[GUEST] == src.device.port.name
        assert destination.client.get_u64(Request.GET_PROTOCOL_FEATURES) & \
            ProtocolFeature.RARP
        assert destination.client.ack(Request.SEND_RARP, m.Raw(GUEST + b"\0\0")) == 0
        assert switched.learned()[GUEST] == dest_name
        (announced,) = other.recv(1)
        assert announced == rarp_frame(GUEST)
        assert announced[:6] == b"\xff" * 6 and announced[12:14] == b"\x80\x35"
        # A frame for the guest now reaches the destination only.
        gpa = destination.pool.alloc()
        head = destination.rx.add([Buffer(gpa, 2048, True)])
        destination.rx.kick()
        other.send([frame(GUEST, mac(2), fill=0x5A)])
        ((got_head, written),) = destination.rx.wait_used(1)
        assert got_head == head
        assert destination.guest.read(gpa + 12, written - 12) == frame(GUEST, mac(2), fill=0x5A)
        assert src.recv_now() == []
    finally:
        src.close()
        other.close()


@pytest.mark.parametrize("payload", [GUEST, b"\x01\0\0\0\0\x01\0\0", GUEST + bytes(4)],
                         ids=["short", "multicast", "long"])
def test_a_bad_announcement_is_refused(switched: Switched, destination: NetPort,
                                       payload: bytes) -> None:
    assert destination.client.ack(Request.SEND_RARP, m.Raw(payload)) != 0
    assert GUEST not in switched.learned()
    # NACKed: the connection goes on, and a good one is taken.
    assert destination.client.ack(Request.SEND_RARP, m.Raw(GUEST + b"\0\0")) == 0
    assert GUEST in switched.learned()


def test_send_rarp_needs_the_protocol_feature(switched: Switched) -> None:
    port = NetPort(switched.path, tag="plain")
    try:
        port.start()
        assert port.client.ack(Request.SEND_RARP, m.Raw(GUEST + b"\0\0")) != 0
        assert GUEST not in switched.learned()
    finally:
        port.close()
