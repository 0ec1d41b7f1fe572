"""``pyvhost mem``: memory hot-plug through QMP that stays safe for vhost-user back-ends.

- :mod:`.qmp`      the one QMP connection (``qemu.qmp``), errors and events
- :mod:`.state`    QEMU's memory state read into frozen dataclasses
- :mod:`.flatview` vhost-user regions counted the way QEMU 7.2 counts them
- :mod:`.host`     hugepages, host NUMA nodes, mem-path facts from sysfs and /proc
- :mod:`.plan`     the pure planner: request + state + host -> steps with undo, or refusals
- :mod:`.execute`  runs a plan through QMP, waits for events, undoes on failure

The command ``pyvhost mem`` is :mod:`pyvhost.cli.mem`.
"""
