"""The ``pyvhost`` commands: every one of them, and nothing else imports this package.

Each module here parses options, calls the library, and prints (tables for people, one
JSON object with ``--json``). What a command needs that is not about the command line
lives in the library (:mod:`pyvhost.units`, :mod:`pyvhost.hotplug`, ...), so that the
arrows point one way: commands import the library, never the reverse.
"""

from .main import main

__all__ = ["main"]
