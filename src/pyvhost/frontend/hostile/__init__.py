"""``pyvhost probe --hostile``: a robustness suite any vhost-user back-end can be run against.

- :mod:`.attacker`  a connection that can send anything and read what comes back
- :mod:`.case`      what a named case is (its spec sentence, its time and reply rules)
- :mod:`.wire`      framing and fd cases
- :mod:`.state`     memory-table and vring set-up cases
- :mod:`.rings`     hostile descriptor chains, and the destructive case
- :mod:`.witness`   the other VM: a started device that must keep getting answers and frames
- :mod:`.runner`    the per-case verdicts, the time bound
"""

from .case import GROUPS, Case, NotApplicable
from .runner import (
    BY_NAME,
    CASES,
    FAILING,
    OUTCOMES,
    CaseResult,
    HostileConfig,
    HostileError,
    HostileReport,
    WitnessError,
    run_hostile,
)
from .witness import FrameCheck, Witness

__all__ = ["BY_NAME", "CASES", "FAILING", "GROUPS", "OUTCOMES", "Case", "CaseResult",
           "FrameCheck", "HostileConfig", "HostileError", "HostileReport", "NotApplicable",
           "Witness", "WitnessError", "run_hostile"]
