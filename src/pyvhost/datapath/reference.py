"""The data path in pure Python: the reference the compiled one (:mod:`._native`) must agree
with byte for byte, and the fallback where the extension is not built (``PYVHOST_PURE=1``
forces it).

It is written with the virtqueue's own methods (:class:`~pyvhost.virtq.SplitQueue` pop,
push_used_batch, enable_kicks, decide_notify) and :func:`~pyvhost.devices.virtio_net.
write_rx_frame`, so every guest value is checked exactly as their docstrings say.

A truncated region: this path reads guest memory through Python's ``mmap`` objects and can
not catch SIGBUS, so a front-end that shrinks a region's file under a live ring kills the
process (as it kills DPDK 22.11). The compiled path survives it (see :mod:`._native`).
"""

from __future__ import annotations

from pyvhost.devices.virtio_net import HDR_V1, MAX_FRAME, write_rx_frame
from pyvhost.memory import GuestMemory
from pyvhost.virtq import SplitQueue

#: The counters a reflect burst adds to (ReflectNet.stats), in this order.
STATS = ("tx_frames", "tx_bytes", "rx_frames", "rx_bytes", "drop_no_rx_buffer",
         "drop_too_big", "drop_malformed")


class Reflector:
    """One reflecting device's data path: :meth:`burst` takes up to ``limit`` chains from the
    transmit queue and sends each frame back on the receive queue, MACs swapped."""

    def burst(self, mem: GuestMemory, tx: SplitQueue, rx: SplitQueue | None, hdr_len: int,
              mrg_rxbuf: bool, limit: int, stats: dict[str, int]) -> int:
        """Serve up to ``limit`` transmitted chains; returns how many were taken.

        Fewer than ``limit`` means the ring was seen empty with kicks enabled again, so the
        caller may stop; ``limit`` means call again. Used elements are published once, at
        the end, and the notification decision is taken then (``notify_decided`` on the
        queue). A broken invariant raises :class:`~pyvhost.virtq.VirtqueueError` after the
        queue that broke was marked broken; what was done before it is still published
        on the queues that are not broken.

        ``mem`` must be held (``MemoryManager.hold()``) for the whole call.
        """
        taken = 0
        tx_used: list[tuple[int, int]] = []
        rx_used: list[tuple[int, int]] = []
        try:
            tx.enable_kicks(False)
            while taken < limit:
                chain = tx.pop(mem)
                if chain is None:
                    # Empty: kicks back on, then look once more (a chain made available
                    # before the driver saw kicks enabled would otherwise wait).
                    tx.enable_kicks(True)
                    if tx.pending() == 0:
                        break
                    tx.enable_kicks(False)
                    continue
                taken += 1
                tx_used.append((chain.head, 0))
                total = chain.readable_len
                if total < hdr_len + 14:
                    stats["drop_malformed"] += 1
                    continue
                if total > hdr_len + MAX_FRAME:
                    stats["drop_too_big"] += 1
                    continue
                data = bytearray(chain.read(mem))
                frame_len = total - hdr_len
                stats["tx_frames"] += 1
                stats["tx_bytes"] += frame_len
                # Swap destination and source MAC (bytes 0-5 and 6-11 of the frame).
                h = hdr_len
                data[h:h + 6], data[h + 6:h + 12] = data[h + 6:h + 12], data[h:h + 6]
                # The header goes back as a plain "no offload" header.
                data[0:hdr_len] = bytes(hdr_len)
                drop = "no_rx_buffer" if rx is None else write_rx_frame(
                    mem, rx, data, hdr_len=hdr_len, mrg_rxbuf=mrg_rxbuf, used=rx_used)
                if drop is not None:
                    stats["drop_" + drop] += 1
                    continue
                stats["rx_frames"] += 1
                stats["rx_bytes"] += frame_len
        finally:
            if rx is not None and rx_used and rx.broken is None:
                rx.push_used_batch(rx_used)
                rx.decide_notify()
            if tx_used and tx.broken is None:
                tx.push_used_batch(tx_used)
                tx.decide_notify()
        return taken


assert HDR_V1 == 12  # the compiled path writes num_buffers at offset 10 of a 12-byte header
