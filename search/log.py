"""Messages through ``logging``: the ``regsweep`` logger hierarchy, its one handler and the CLI's ``-v``/``-q``.

Every module logs to ``logging.getLogger(__name__)`` through :func:`get` (a child of ``regsweep``). The first
:func:`get` gives the ``regsweep`` logger ONE handler (:class:`Handler`; it does not propagate to the root
logger): INFO goes to stdout, DEBUG, WARNING and above to stderr, each as its bare message with ``debug: ``,
``warning: `` or ``error: `` in front, so the default output is exactly what ``print`` gave before. The CLI sets the
level (:func:`set_verbosity`): ``-q`` WARNING (info and progress chatter off; warnings and errors stay), ``-v``
DEBUG (details), neither INFO. A program embedding regsweep may replace the handler on ``logging.getLogger(
"regsweep")``.

Code that writes to an ``out`` stream it was given (tests pass a ``StringIO``) gets :class:`InfoStream` as its
default ``out``: each whole line written to it is one INFO record, so ``-q`` silences it too.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Optional

ROOT = "regsweep"
PREFIX = {logging.DEBUG: "debug: ", logging.WARNING: "warning: ", logging.ERROR: "error: ",
          logging.CRITICAL: "error: "}
LEVELS = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}  # -q, neither, -v


class Handler(logging.Handler):
    """INFO to stdout, the rest (DEBUG, WARNING and up, and an info :func:`note`) to stderr, so ``-v`` never mixes
    into a command's output (``export > train_best.py``); the streams are looked up at each record (redirections
    and pytest's capture see them), flushed after each line."""

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stdout if record.levelno == logging.INFO and not getattr(record, "stderr", False) else sys.stderr
        try:
            stream.write(self.format(record) + "\n")
            stream.flush()
        except BrokenPipeError:  # the reader went away (`regsweep ... | head`): cli.main ends quietly
            raise
        except Exception:  # noqa: BLE001 - logging's rule: a failing handler reports and never raises
            self.handleError(record)


class Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return PREFIX.get(record.levelno, "") + record.getMessage()


def root() -> logging.Logger:
    """The ``regsweep`` logger with its handler (installed once, on first use, never at import)."""
    logger = logging.getLogger(ROOT)
    if not logger.handlers:
        handler = Handler()
        handler.setFormatter(Formatter())
        logger.addHandler(handler)
        logger.propagate = False
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
    return logger


def get(name: str) -> logging.Logger:
    """The logger ``name`` (a module's ``__name__``, under ``regsweep``), the hierarchy's handler installed."""
    root()
    return logging.getLogger(name if name == ROOT or name.startswith(ROOT + ".") else f"{ROOT}.{name}")


def note(name: str, message: str) -> None:
    """An INFO record that goes to stderr (a side note beside a command's real output: ``export``'s "wrote ...")."""
    get(name).info(message, extra={"stderr": True})


def set_verbosity(verbosity: int) -> None:
    """-1 (``-q``): warnings and errors only; 0: the default output; 1 (``-v``): debug details too."""
    root().setLevel(LEVELS[max(-1, min(1, verbosity))])


def verbosity_flags() -> list[str]:
    """The flag that gives a child process (a ``regsweep worker``) this process's verbosity."""
    level = root().level
    return ["-q"] if level >= logging.WARNING else ["-v"] if level <= logging.DEBUG else []


class InfoStream:
    """A text stream whose every whole line is one INFO record of ``logger`` (a partial line waits for its end)."""

    def __init__(self, logger: logging.Logger):
        self.logger = logger
        self.partial = ""
        self.lock = threading.Lock()  # the workers' relays (one thread each) share one stream

    def write(self, text: str) -> int:
        with self.lock:
            self.partial += text
            *lines, self.partial = self.partial.split("\n")
        for line in lines:
            self.logger.info(line)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def info_stream(name: str, out: Optional[object] = None):
    """``out`` when given, else an :class:`InfoStream` of the logger ``name``."""
    return out if out is not None else InfoStream(get(name))
