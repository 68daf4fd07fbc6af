"""SIGTERM/SIGINT during a trial: the exceptions the trial body and the worker loop act on.

SIGTERM raises :class:`Terminated` and SIGINT ``KeyboardInterrupt`` in the main thread while
:func:`terminate_on_sigterm` is active; the running trial ends FAIL (``failed:terminated`` /
``failed:interrupted``), and after SIGTERM the worker loop re-queues it. A handler's exception can be swallowed
(it may land in a destructor), so :func:`check_signals` raises it again at the next epoch or trial.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class Terminated(BaseException):
    """Raised in the main thread by SIGTERM (BaseException: no `except Exception` swallows it)."""


_pending: list[type[BaseException]] = []  # a signal whose exception may have been swallowed


def check_signals() -> None:
    """Raise the exception of a SIGTERM/SIGINT received earlier. A signal handler's exception can be swallowed
    when it lands inside a destructor or GC callback ("Exception ignored in ..."); the trial loop calls this at
    every epoch and every trial so the signal still takes effect."""
    if _pending:
        raise _pending[0]()


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """SIGTERM -> :class:`Terminated`, SIGINT -> KeyboardInterrupt in the main thread for the duration (raised
    at once, and again at the next :func:`check_signals` in case the first was swallowed)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if _pending:  # a repeated signal (Ctrl-C reaches the whole process group, `run` forwards it too):
            return  # the first one is being handled; raising again could interrupt the trial's FAIL write
        exc = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        _pending.append(exc)
        raise exc()

    _pending.clear()
    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
