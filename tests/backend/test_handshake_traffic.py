"""A front-end talking like QEMU 7.2 to the back-end, then traffic through ReflectNet."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator

import pytest

from pyvhost.backend import VirtioDevice
from pyvhost.devices.reflect import ReflectNet
from pyvhost.devices.virtio_net import VIRTIO_NET_F_MAC, VIRTIO_NET_S_LINK_UP
from pyvhost.protocol import messages as m
from pyvhost.protocol.constants import (
    FLAG_NEED_REPLY,
    VHOST_USER_MAX_MEM_SLOTS,
    ProtocolFeature,
    Request,
    VirtioFeature,
    VirtioStatus,
)

from .conftest import MAC, Backend
from .harness import NET_FEATURES, QEMU_PROTOCOL, RX, TABLE_PROTOCOL, TX, NetPort
from .rawclient import RawClient, read_eventfd

S = VirtioStatus


@contextlib.contextmanager
def _adopted(factory: Callable[[], VirtioDevice] | None = None) -> Iterator[RawClient]:
    """A back-end serving one end of a socketpair (Server.adopt), with devices from
    ``factory`` (reflectors by default); we hold the other end."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    backend = Backend("(socketpair)")
    if factory is not None:
        backend.server.factory = factory
    client = RawClient(ours)
    try:
        backend.server.adopt(theirs, "pair")
        backend.start()
        yield client
        backend.stop()
    finally:
        client.close()
        backend.server.stop()
        if backend.thread is not None:
            backend.thread.join()
        backend.server.close()


@pytest.fixture
def adopted(socket_dir: object) -> Iterator[RawClient]:
    with _adopted() as client:
        yield client


def test_qemu_72_handshake(adopted: RawClient) -> None:
    c = adopted
    features = c.get_u64(Request.GET_FEATURES)
    for bit in (int(VirtioFeature.VERSION_1), VIRTIO_NET_F_MAC, 1 << 30):
        assert features & bit, f"feature bit {bit:#x} not offered"
    protocol = c.get_u64(Request.GET_PROTOCOL_FEATURES)
    assert protocol & QEMU_PROTOCOL == QEMU_PROTOCOL
    # QEMU sends SET_PROTOCOL_FEATURES without need_reply: no answer may come.
    c.send(Request.SET_PROTOCOL_FEATURES, m.U64(int(QEMU_PROTOCOL)))
    c.reply_ack = True
    assert c.get_u64(Request.GET_QUEUE_NUM) == 1  # queue pairs, for a net device
    assert c.get_u64(Request.GET_MAX_MEM_SLOTS) == VHOST_USER_MAX_MEM_SLOTS == 509
    assert c.ack(Request.SET_OWNER) == 0
    assert c.ack(Request.SET_FEATURES, m.U64(NET_FEATURES)) == 0
    status = 0
    for bit in (S.ACKNOWLEDGE, S.DRIVER, S.FEATURES_OK, S.DRIVER_OK):
        status |= bit
        assert c.ack(Request.SET_STATUS, m.U64(status)) == 0
        assert c.get_u64(Request.GET_STATUS) == status
    # Nothing was sent that we did not ask for.
    c.sync()


def test_config_is_not_offered_for_a_net_device(adopted: RawClient) -> None:
    # QEMU 7.2's vhost-user-net builds the config space itself and logs "vhost-user
    # backend supports VHOST_USER_PROTOCOL_F_CONFIG but QEMU does not" at every start
    # when a net back-end offers it; DPDK 22.11's virtio_user never negotiates it.
    c = adopted
    offered = c.get_u64(Request.GET_PROTOCOL_FEATURES)
    assert not offered & ProtocolFeature.CONFIG
    assert offered & QEMU_PROTOCOL == QEMU_PROTOCOL
    # A front-end that sets it anyway is refused (not offered), and told so.
    c.send(Request.SET_PROTOCOL_FEATURES, m.U64(int(QEMU_PROTOCOL | ProtocolFeature.CONFIG)))
    assert c.wait_closed() == b""


def test_config_space_still_describes_the_device() -> None:
    # The reflector's config space (what a front-end that asked would read) holds its MAC
    # and the link status.
    space = ReflectNet(MAC).config()
    assert space[:6] == MAC
    assert int.from_bytes(space[6:8], "little") == VIRTIO_NET_S_LINK_UP


def test_config_is_offered_when_the_device_serves_it() -> None:
    class ServedConfig(ReflectNet):
        serves_config = True

    with _adopted(lambda: ServedConfig(MAC)) as c:
        assert c.get_u64(Request.GET_PROTOCOL_FEATURES) & ProtocolFeature.CONFIG
        c.send(Request.SET_PROTOCOL_FEATURES, m.U64(int(QEMU_PROTOCOL | ProtocolFeature.CONFIG)))
        c.reply_ack = True
        assert c.ack(Request.SET_OWNER) == 0
        reply = c.request(Request.GET_CONFIG, m.ConfigSpace(0, 12, 0, bytes(12)))
        assert isinstance(reply, m.ConfigSpace)
        assert reply.payload[:6] == MAC


def test_need_reply_is_ignored_until_reply_ack_is_negotiated(adopted: RawClient) -> None:
    # REPLY_ACK: "With this protocol extension negotiated, the sender (QEMU) can set the
    # need_reply [Bit 3] flag to any command." Before, an ack would desync the stream.
    c = adopted
    c.send(Request.SET_OWNER, flags=FLAG_NEED_REPLY)
    c.sync()  # the next reply is GET_FEATURES': no ack came


@pytest.mark.parametrize(("protocol", "extra"), [
    (TABLE_PROTOCOL, 0),
    (QEMU_PROTOCOL, VirtioFeature.RING_EVENT_IDX | VirtioFeature.RING_INDIRECT_DESC),
], ids=["mem-table", "mem-slots+event_idx+indirect"])
def test_traffic_end_to_end(backend: Backend, protocol: int, extra: int) -> None:
    port = NetPort(backend.path, protocol=protocol, features=NET_FEATURES | int(extra))
    try:
        port.start()
        port.check_traffic(100, seed=7)
        # The driver was interrupted on both queues.
        assert read_eventfd(port.rx.call_fd) > 0
        assert read_eventfd(port.tx.call_fd) > 0
        (dev,) = backend.devices
        assert dev.stats["tx_frames"] == dev.stats["rx_frames"] == 100
        assert not any(v for k, v in dev.stats.items() if k.startswith("drop"))
        # GET_VRING_BASE stops each ring and tells the next index it would have read.
        for index in (TX, RX):
            reply = port.client.request(Request.GET_VRING_BASE, m.VringState(index, 0))
            assert reply == m.VringState(index, 100)
        assert port.status() == int(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)
    finally:
        port.close()
