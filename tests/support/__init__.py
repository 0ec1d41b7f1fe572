"""Test-side helpers shared by every test folder.

- :mod:`.procs`      real peer processes (pyvhost, DPDK testpmd, QEMU), ended by pid
- :mod:`.ring`       the one driver-side split ring, hostile rings and rings given as data
- :mod:`.memfd`      the one place tests make memfds; test-owned regions and guest memory
- :mod:`.poll`       waiting with a deadline
- :mod:`.netdriver`  a virtio-net guest driver on pyvhost's front-end
- :mod:`.testpmd`, :mod:`.guestmem`  reading testpmd's statistics, a guest's MemTotal
"""
