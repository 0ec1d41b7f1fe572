"""Guest memory as the back-end sees it.

- :mod:`.region`  one mapped region: the mmap of a front-end's fd, and who holds it
- :mod:`.guest`   an immutable snapshot of all regions, with GPA and front-end-VA lookups
- :mod:`.manager` the per-connection table: SET_MEM_TABLE / ADD_MEM_REG / REM_MEM_REG
  build a new snapshot and swap it in; old mappings go once no reader holds them
- :mod:`.dirtylog` the dirty log (SET_LOG_BASE): which guest pages the back-end wrote
  while a live migration runs
"""

from .dirtylog import DirtyLog, DirtyLogError
from .guest import GuestAddressError, GuestMemory, MemoryFaultError
from .manager import MemoryManager, MemoryTableError, MemoryUpdate
from .region import MappedRegion

__all__ = ["DirtyLog", "DirtyLogError", "GuestAddressError", "GuestMemory", "MappedRegion",
           "MemoryFaultError", "MemoryManager", "MemoryTableError", "MemoryUpdate"]
