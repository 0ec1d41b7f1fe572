"""The golden vhost-user captures of tests/data/captures, loaded (README.md there)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CAPTURES = Path(__file__).parent.parent / "data" / "captures"


@dataclass(frozen=True)
class Captured:
    to_backend: bool
    request: int
    flags: int
    raw: bytes
    nfds: int


def load(name: str) -> list[Captured]:
    out = []
    for line in (CAPTURES / name).read_text().splitlines():
        d = json.loads(line)
        out.append(Captured(d["dir"] == "frontend->backend", d["request"], d["flags"],
                            bytes.fromhex(d["hex"]), d["nfds"]))
    return out
