"""Tests of pyvhost mem (src/pyvhost/hotplug) and the QEMU launcher (src/pyvhost/lab/qemu.py)."""
