"""What the commands say when a Unix socket they were given cannot be reached.

``pyvhost status``, ``probe`` and ``mem`` each connect to a socket someone named on the
command line (a control socket, a vhost-user socket, QEMU's QMP monitor). When that
fails, the library's exception says what the connect call saw; this module looks at the
path itself, without connecting again (a second connect would be one more front-end to a
vhost-user back-end), and turns it into one line that says what to check: nothing at
the path, something that is not a socket, or a socket nobody listens on.
"""

from __future__ import annotations

import errno
import os
import stat

_KINDS = ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
          (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"))


def path_problem(path: str, what: str, hint: str) -> str | None:
    """One line about what is wrong at ``path`` (``what``: "QMP socket", ...), or None
    when a socket is there (the caller's own error then says more).

    ``hint`` tells how the socket is normally created, e.g. "is QEMU running with -qmp
    unix:PATH,server=on,wait=off?".
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"no {what} at {path}: {hint}"
    except NotADirectoryError:
        return f"no {what} at {path}: a component of the path is not a directory"
    except PermissionError:
        return f"{path}: permission denied (run as root or as the socket's owner)"
    except OSError as e:
        return f"{path}: {e.strerror or e}"
    if not stat.S_ISSOCK(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a socket")
        return f"{path} is not a socket ({kind}); expected the {what}"
    return None


def connect_failure(path: str, what: str, hint: str, error: BaseException,
                    answered: str | None = None) -> str:
    """The line for a failed connect to ``path``: what is wrong at the path, else what
    the connect call saw (``error`` and its causes). ``answered``: what to say when the
    connection was made and what answered was not the expected protocol (no OSError
    behind ``error``), e.g. "not as QEMU's QMP monitor"."""
    problem = path_problem(path, what, hint)
    if problem is not None:
        return problem
    cause = os_error(error)
    if cause is not None and cause.errno == errno.ECONNREFUSED:
        return (f"{path}: connection refused: nothing listens on this socket (left behind "
                f"by a process that exited?); {hint}")
    if cause is not None and cause.errno == errno.EACCES:
        return f"{path}: permission denied (run as root or as the socket's owner)"
    if cause is None and answered is not None:
        return f"{path} answered, but {answered}: {error.__cause__ or error}"
    return str(error)


def os_error(error: BaseException) -> OSError | None:
    """The OSError behind ``error``: itself, or one in its chain of causes (``raise ...
    from``), or the ``exc`` a wrapping library keeps (qemu.qmp's ConnectError)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e
        wrapped = getattr(e, "exc", None)
        todo += [e.__cause__, e.__context__,
                 wrapped if isinstance(wrapped, BaseException) else None]
    return None
