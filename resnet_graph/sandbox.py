"""Run a risky read in a forked child with a time limit.

C code cannot be interrupted from Python: a damaged file that sends a C
library (libhdf5) into an endless loop, or makes it crash, would take the
whole process with it. :func:`run_in_child` lets a forked child take that
risk: the child runs the read and exits; the parent waits at most ``seconds``,
then kills it. Only for files from outside: a fork of a process whose other
threads hold locks (TensorFlow's) can leave the child blocked on one of them.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Callable


class Hung(Exception):
    """The read did not finish in time (the child was killed)."""


class Crashed(Exception):
    """The read killed the child with a signal; ``args[0]`` is its number."""


def available() -> bool:
    """Whether this platform can fork (where it cannot, reads run unguarded)."""
    return hasattr(os, "fork")


def run_in_child(read: Callable[[], object], seconds: float) -> None:
    """Run ``read()`` in a forked child; :class:`Hung` if it takes longer than
    ``seconds``, :class:`Crashed` if a signal ends it. A ``read`` that raises an
    ordinary exception counts as done: the caller reads again and reports it."""
    pid = os.fork()
    if pid == 0:   # the child: report by exit code only
        code = 0
        try:
            read()
        except BaseException:  # noqa: BLE001 - the parent reads again and reports it
            code = 3
        os._exit(code)
    deadline = time.monotonic() + seconds
    status = None
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.005)
    else:
        with contextlib.suppress(OSError):
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        raise Hung(seconds)
    if os.WIFSIGNALED(status):
        raise Crashed(os.WTERMSIG(status))
