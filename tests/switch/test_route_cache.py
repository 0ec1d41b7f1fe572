"""The switch port's route cache (``SwitchPort._route``) decides as a fresh computation.

Two identical switches see the same random bursts: on one every port keeps its cached
routes, on the other the cache is dropped before every burst. Their routes, counters and
MAC tables must agree after each burst, whatever moves in between: a MAC moving to
another port, entries aging out (the clock jumps past the aging time), ports leaving and
joining, broadcast and multicast destinations, a destination learned in its own burst.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pyvhost.switch import Switch, SwitchPort

AGING = 300.0
MACS = [bytes([0x02, 0, 0, 0, 0, n]) for n in range(5)] + [b"\xff" * 6,
                                                            bytes([1, 0, 0x5E, 0, 0, 1])]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Twin:
    def __init__(self, n: int) -> None:
        self.clock = Clock()
        self.switch = Switch(aging=AGING, clock=self.clock)
        self.devs = [SwitchPort(self.switch, bytes([0x52, 0x54, 0, 0, 0, i])) for i in range(n)]
        for i, dev in enumerate(self.devs):
            dev.port.name = f"p{i}"
            dev._join()

    def route(self, i: int, srcs: list[bytes], dsts: list[bytes], src_at: list[int],
              *, cached: bool) -> tuple[object, ...]:
        dev = self.devs[i]
        if not cached:
            dev._routes = None
        with self.switch.lock:
            now, ports, targets, same_at = dev._route(srcs, dsts, src_at, 3, 180)
        return (now, [p.name for p in ports], list(targets), list(same_at))

    def state(self) -> tuple[object, ...]:
        entries = sorted((mac, port.name, age)
                         for mac, port, age in self.switch.table.entries(self.clock()))
        counters = [(d.port.counters.rx_frames, d.port.counters.rx_bytes) for d in self.devs]
        return entries, counters, [p.name for p in self.switch.ports]


flow = st.tuples(
    st.integers(0, 2),                                              # the ingress port
    st.lists(st.sampled_from(MACS[:5]), min_size=1, max_size=3, unique=True),   # srcs
    st.lists(st.sampled_from(MACS), min_size=1, max_size=3, unique=True))       # dsts
step = st.tuples(
    st.integers(0, 3),                                              # which flow
    st.sampled_from([0.0] * 6 + [1.0, 150.0, AGING, AGING + 1]),    # clock step before
    st.sampled_from([""] * 12 + ["leave", "join"]),                # a port event before
    st.integers(0, 2))                                              # the port of the event


@settings(max_examples=300, deadline=None)
@given(st.lists(flow, min_size=1, max_size=4), st.lists(step, min_size=1, max_size=60))
def test_cached_routes_equal_fresh_ones(flows: list[tuple[int, list[bytes], list[bytes]]],
                                        steps: list[tuple[int, float, str, int]]) -> None:
    # A few flows repeated (as traffic is: the cache holds), with the clock moving, MACs
    # moving between ports and ports leaving and joining in between.
    cached, fresh = Twin(3), Twin(3)
    for f, delta, event, which in steps:
        ingress, srcs, dsts = flows[f % len(flows)]
        for twin in (cached, fresh):
            twin.clock.now += delta
            dev = twin.devs[which]
            if event == "leave":
                dev.reset()
            elif event == "join":
                dev._join()
        if not cached.devs[ingress].joined:
            continue
        # src_at as the forward step gives it: for each destination that is a unicast
        # source of the burst, the first frame it came from.
        src_at = [srcs.index(d) if d in srcs and not d[0] & 1 else 0x7FFFFFFF
                  for d in dsts]
        got = cached.route(ingress, list(srcs), list(dsts), src_at, cached=True)
        want = fresh.route(ingress, list(srcs), list(dsts), src_at, cached=False)
        assert got == want
        assert cached.state() == fresh.state()


def test_a_steady_flow_is_served_from_the_cache() -> None:
    twin = Twin(2)
    a, b = MACS[0], MACS[1]
    twin.route(0, [a], [b], [0x7FFFFFFF], cached=True)
    assert twin.devs[0]._routes is None        # a was learned: the table moved
    first = twin.route(0, [a], [b], [0x7FFFFFFF], cached=True)
    cache = twin.devs[0]._routes
    assert cache is not None
    twin.clock.now += 1.0
    again = twin.route(0, [a], [b], [0x7FFFFFFF], cached=True)
    assert again[1:] == first[1:]
    assert twin.devs[0]._routes is cache      # not recomputed
    twin.route(1, [b], [a], [0x7FFFFFFF], cached=True)     # b learned on port 1: moved
    _, ports, targets, _ = twin.route(0, [a], [b], [0x7FFFFFFF], cached=True)
    assert ports == ["p1"] and targets == [1]
