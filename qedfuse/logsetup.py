"""Logging configuration: the only place that installs handlers (modules only log).

* stderr by default: ``qedfuse: warning: …`` lines, so a warning reads like the one-line
  errors the CLI prints; with ``debug`` every record carries a timestamp and logger name;
* journald level prefixes (``<4>…``) when ``systemd`` is set or ``JOURNAL_STREAM`` says
  stderr is connected to the journal (systemd then files each line at its level);
* ``log_file``: records go to that file (with timestamps) instead of stderr, and fatal
  tracebacks from :mod:`faulthandler` go there too;
* ``syslog`` (a detached daemon): the syslog socket (the journal reads it) when it exists,
  else ``fallback_file``; :func:`destination` says where, so the parent can print it;
* :mod:`faulthandler` is enabled, and ``SIGUSR1`` dumps every thread's stack.

Whatever the destination, the last :data:`RECENT_LIMIT` WARNING-or-worse records are kept in
memory (:func:`recent_problems`, shown by ``qedfuse status``), and after
:func:`set_subject` (the daemon calls it with the image path) every such line names the image.
"""

from __future__ import annotations

import errno
import faulthandler
import logging
import logging.handlers
import os
import signal
import stat
import sys
from collections import deque
from typing import IO, Any, Final

#: syslog priorities journald understands as ``<N>`` line prefixes.
_JOURNAL_PRIORITY: Final = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}
_TIME_FORMAT: Final = "%Y-%m-%d %H:%M:%S"
#: How many WARNING-or-worse records :func:`recent_problems` keeps.
RECENT_LIMIT: Final = 20

# Handlers and the faulthandler file we installed, so a second call replaces them, and the
# levels we changed, so reset_logging() can put them back (for in-process callers: tests).
_installed: list[logging.Handler] = []
_fault_file: IO[str] | None = None
_saved_levels: dict[str, int] = {}
_destination = "stderr"


class _Subject(logging.Filter):
    """Prefix WARNING-or-worse messages with what they are about (the image), once."""

    def __init__(self) -> None:
        super().__init__()
        self.subject: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        subject = self.subject
        if (
            subject is not None
            and record.levelno >= logging.WARNING
            and not getattr(record, "qedfuse_subject", False)
        ):
            record.qedfuse_subject = True
            message = record.getMessage()
            if subject not in message:
                record.msg, record.args = f"{subject}: {message}", ()
        return True


class _Recent(logging.Handler):
    """Keeps the last WARNING-or-worse records (time, level, message) in memory."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: deque[dict[str, Any]] = deque(maxlen=RECENT_LIMIT)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not lose the record
            message = str(record.msg)
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            message = f"{message} ({type(exc).__name__}: {exc})"
        self.records.append({"time": record.created, "level": record.levelname, "message": message})


_subject = _Subject()
_recent = _Recent()
_recent.addFilter(_subject)


class _JournalFormatter(logging.Formatter):
    """Prefix each line with its journald priority (``<3>`` error … ``<7>`` debug)."""

    def format(self, record: logging.LogRecord) -> str:
        priority = _JOURNAL_PRIORITY.get(record.levelno)
        if priority is None:
            priority = 7 if record.levelno < logging.INFO else 3
        text = super().format(record)
        # A multi-line record (a traceback) keeps its priority on every line.
        return "\n".join(f"<{priority}>{line}" for line in text.splitlines())


class _CliFormatter(logging.Formatter):
    """``qedfuse: warning: message`` (levels below WARNING show no level word)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"qedfuse: {record.levelname.lower()}: {text}"
        return f"qedfuse: {text}"


def journal_wanted(systemd: bool) -> bool:
    """True when stderr lines should carry journald priority prefixes."""
    return systemd or bool(os.environ.get("JOURNAL_STREAM"))


def syslog_address() -> str:
    return os.environ.get("QEDFUSE_SYSLOG_SOCKET", "/dev/log")


def setup_logging(
    debug: bool,
    *,
    log_file: str | None = None,
    systemd: bool = False,
    level: int | None = None,
    syslog: bool = False,
    fallback_file: str | None = None,
) -> None:
    """Install qedfuse's log handlers on the root logger (replacing earlier ones).

    ``level`` overrides the threshold (default: DEBUG with ``debug``, else INFO).  With
    ``syslog`` and no ``log_file``, log to the syslog socket (``$QEDFUSE_SYSLOG_SOCKET`` or
    ``/dev/log``) when it exists, else to ``fallback_file`` if given: a detached daemon has
    no stderr.  Raises OSError if a log file cannot be opened.
    """
    global _destination
    root = logging.getLogger()
    _remove_handlers()
    for name in ("", "trio", "pyfuse3"):
        _saved_levels.setdefault(name, logging.getLogger(name).level)

    if syslog and log_file is None and not os.path.exists(syslog_address()):
        log_file = fallback_file
    new: logging.Handler
    if log_file is not None:
        new = logging.StreamHandler(os.fdopen(open_log_file(log_file), "a", encoding="utf-8"))
        new.setFormatter(
            logging.Formatter(
                "%(asctime)s.%(msecs)03d %(process)d %(levelname)s %(name)s: %(message)s",
                _TIME_FORMAT,
            )
        )
        _destination = f"the file {log_file}"
    elif syslog and os.path.exists(syslog_address()):
        new = logging.handlers.SysLogHandler(
            address=syslog_address(), facility=logging.handlers.SysLogHandler.LOG_DAEMON
        )
        new.setFormatter(logging.Formatter("qedfuse[%(process)d]: %(levelname)s %(message)s"))
        _destination = f"syslog ({syslog_address()}; journalctl -t qedfuse)"
    else:
        new = logging.StreamHandler(sys.stderr)
        if journal_wanted(systemd):
            detail = "%(name)s: " if debug else ""
            new.setFormatter(_JournalFormatter(detail + "%(message)s"))
        elif debug:
            new.setFormatter(
                logging.Formatter(
                    "%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s", _TIME_FORMAT
                )
            )
        else:
            new.setFormatter(_CliFormatter("%(message)s"))
        _destination = "the journal (stderr)" if journal_wanted(systemd) else "stderr"
    new.addFilter(_subject)
    root.addHandler(new)
    _installed.append(new)
    if _recent not in root.handlers:
        root.addHandler(_recent)
    if level is None:
        level = logging.DEBUG if debug else logging.INFO
    root.setLevel(level)
    # trio and pyfuse3 are chatty at DEBUG; keep them at INFO unless asked for (--debug only
    # covers qedfuse's own loggers).
    for name in ("trio", "pyfuse3"):
        logging.getLogger(name).setLevel(max(level, logging.INFO))

    _enable_faulthandler(log_file)


def destination() -> str:
    """Where :func:`setup_logging` sends records, for a person (``syslog (/dev/log)`` …)."""
    return _destination


def set_subject(subject: str | None) -> None:
    """Name ``subject`` (the image path) in every WARNING-or-worse line that doesn't."""
    _subject.subject = subject


def recent_problems() -> list[dict[str, Any]]:
    """The last WARNING-or-worse records, oldest first: ``{time, level, message}``."""
    return list(_recent.records)


def _remove_handlers() -> None:
    root = logging.getLogger()
    for handler in _installed:
        root.removeHandler(handler)
        handler.close()
    _installed.clear()


def reset_logging() -> None:
    """Undo :func:`setup_logging`: remove its handlers and restore the levels it changed."""
    _remove_handlers()
    logging.getLogger().removeHandler(_recent)
    _recent.records.clear()
    set_subject(None)
    for name, level in _saved_levels.items():
        logging.getLogger(name).setLevel(level)
    _saved_levels.clear()


def open_log_file(path: str) -> int:
    """Open ``path`` to append log lines to (created if missing), never blocking: a FIFO,
    socket, directory or block device is refused (a FIFO with no reader would hang the
    open); a regular file or a character device (a terminal, ``/dev/null``) is taken."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    fd = os.open(path, flags, 0o644)
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISCHR(mode)):
            kind = "FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "device"
            raise OSError(errno.EINVAL, f"{path} is a {kind}, not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _enable_faulthandler(log_file: str | None) -> None:
    """Fatal-error tracebacks to the log file, else to stderr (unless already enabled, e.g.
    by ``PYTHONFAULTHANDLER`` or pytest, whose target is kept)."""
    global _fault_file
    if _fault_file is not None:
        _fault_file.close()
        _fault_file = None
    target: IO[str] = sys.stderr
    if log_file is not None:
        _fault_file = os.fdopen(open_log_file(log_file), "a", encoding="utf-8")
        target = _fault_file
    elif faulthandler.is_enabled():
        return
    try:
        faulthandler.enable(file=target, all_threads=True)
        faulthandler.register(signal.SIGUSR1, file=target, all_threads=True, chain=False)
    except (ValueError, OSError, RuntimeError):
        # stderr may be closed (daemonized without a log): nothing useful to enable.
        pass


__all__ = [
    "destination",
    "journal_wanted",
    "recent_problems",
    "reset_logging",
    "set_subject",
    "setup_logging",
]
