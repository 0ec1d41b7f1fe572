"""Labs: real QEMU guests started by pyvhost for tests and demonstrations.

:mod:`pyvhost.lab.qemu` starts QEMU 7.2, connects to its QMP monitors and boots the test
guest; :mod:`pyvhost.lab.image` builds that guest's kernel and initramfs;
:mod:`pyvhost.lab.guest` talks to it over its console; :mod:`pyvhost.lab.scenario` is
what ``pyvhost lab`` runs (its command line is :mod:`pyvhost.cli.lab`). The relay that
times a back-end's memory updates and the process helpers are in :mod:`pyvhost.tools`.
"""
