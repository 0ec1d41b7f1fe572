"""2 MiB hugepages and a hugetlbfs directory for tests, given back afterwards.

``.ci/run`` reserves a pool for the run and mounts hugetlbfs (``PYVHOST_HUGETLBFS``), and
releases both after, also on failure; a test then works in a directory of its own on that
mount. Elsewhere (a developer's machine) the test mounts its own hugetlbfs in a temporary
directory, unmounted at the end. When fewer pages are free than it needs (other tests or
programs hold some), it raises ``nr_hugepages`` by the shortfall, as root, and lowers it by
the same amount at the end. Without root it fails with what to do (a skip would pass for
a pass: CI=true counts skips as failures anyway).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvhost.hotplug.host import read_host

PAGE = 2 << 20
NR = Path("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages")
#: A hugetlbfs mount (2 MiB pages) prepared by .ci/run.
MOUNT_ENV = "PYVHOST_HUGETLBFS"


@contextlib.contextmanager
def hugetlbfs(pages: int) -> Iterator[Path]:
    """A hugetlbfs mount with at least ``pages`` free 2 MiB pages behind it."""
    if not NR.exists():
        pytest.fail("this kernel has no 2 MiB hugepages (/sys/kernel/mm/hugepages)")
    pool = read_host().pool(PAGE)
    short = max(0, pages - (pool.available if pool else 0))
    if os.geteuid() != 0 and short:
        pytest.fail(f"{pages} free 2 MiB hugepages needed, {pages - short} free: run as "
                    f"root, or reserve them (echo N > {NR})")
    raised = 0
    shared = os.environ.get(MOUNT_ENV)
    if shared:
        mount = Path(tempfile.mkdtemp(prefix="pyvhost-huge-", dir=shared))
    else:
        mount = Path(tempfile.mkdtemp(prefix="pyvhost-huge-"))
    mounted = False
    try:
        if short:
            before = int(NR.read_text())
            NR.write_text(str(before + short))
            raised = int(NR.read_text()) - before
            if raised < short:
                pytest.fail(f"the kernel gave {raised} of {short} more 2 MiB hugepages "
                            f"(memory too fragmented?)")
        if not shared:
            subprocess.run(["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "none",
                            str(mount)], check=True, capture_output=True)
            mounted = True
        yield mount
    finally:
        if mounted:
            subprocess.run(["umount", str(mount)], check=False, capture_output=True)
        shutil.rmtree(mount, ignore_errors=True)
        if raised:
            with contextlib.suppress(OSError, ValueError):
                NR.write_text(str(max(0, int(NR.read_text()) - raised)))
