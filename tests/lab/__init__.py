"""Lab tests: real guests under QEMU, memory hot-plugged while traffic flows."""
