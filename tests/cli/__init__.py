"""Command tests: each ``pyvhost`` command run as a process, its exit codes and documents."""
