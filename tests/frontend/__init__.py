"""Front-end tests: pyvhost playing QEMU against fake and real back-ends."""
