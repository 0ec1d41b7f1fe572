"""``python -m pyvhost``: the same as the ``pyvhost`` command."""

from pyvhost.cli import main

if __name__ == "__main__":
    main()
