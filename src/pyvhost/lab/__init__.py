"""Labs: real QEMU guests started by pyvhost for tests and demonstrations.

:mod:`pyvhost.lab.qemu` starts QEMU 7.2 and connects to its QMP monitors.
"""
