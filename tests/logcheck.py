"""A test fails on an unexpected WARNING or traceback in the logs (the project rule).

Two sources are checked:

* in-process log records: the autouse fixture in conftest.py installs a
  :class:`ProblemCollector` on the root logger; a record of level WARNING or above, or one
  carrying an exception (``exc_info``), fails the test unless a pattern declared expected
  matches it;
* the log a real-mount daemon wrote (tests/fusehelpers.py ``mounted()``): once the daemon
  exited, :func:`daemon_log_problems` finds its Traceback and WARNING/ERROR/CRITICAL lines,
  in every line format qedfuse/logsetup.py writes.

A test declares what it expects with ``@pytest.mark.expect_log(r"regex", ...)`` or, at run
time, with the ``expect_log`` fixture (``expect_log(r"regex")``); a per-mount pattern can be
passed as ``mounted(..., expect_log=[r"regex"])``.  Each pattern is a :func:`re.search` over
the record's text (message, then its traceback) or over the daemon's log entry (a line and
the traceback lines after it), so keep them narrow.
"""

from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Iterable

#: Patterns the running test declared expected (marker + fixture); set by conftest.py.
current_expected: list[str] = []

# The start of one log line, with its level word (None: a line below WARNING), in each
# format logsetup.py writes: CLI stderr (``qedfuse: warning: …``), --debug stderr and
# --log-file (``2026-01-02 03:04:05.678 [pid ]WARNING name: …``), journald (``<4>…``).
_CLI_LINE = re.compile(r"^qedfuse: (?:(warning|error|critical): )?")
_STAMPED_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} (?:\d+ )?"
    r"(DEBUG|INFO|WARNING|ERROR|CRITICAL|Level \d+) "
)
_JOURNAL_LINE = re.compile(r"^<([0-7])>")
_PROBLEM_LEVELS = frozenset({"warning", "error", "critical"})
_PROBLEM_MARKERS = ("Traceback (most recent call last)", "Fatal Python error")


def _line_start(line: str) -> tuple[bool, bool]:
    """(starts a log record, that record is WARNING or worse) for one daemon log line."""
    m = _CLI_LINE.match(line)
    if m:
        return True, m.group(1) is not None
    m = _STAMPED_LINE.match(line)
    if m:
        return True, m.group(1).lower() in _PROBLEM_LEVELS
    m = _JOURNAL_LINE.match(line)
    if m:
        return True, int(m.group(1)) <= 4
    return False, False


def daemon_log_problems(text: str, expected: Iterable[str] = ()) -> list[str]:
    """The entries of a daemon's log that are problems no pattern in ``expected`` matches.

    An entry is a log line plus the lines after it that start no record (its traceback); it
    is a problem when its level is WARNING or worse or it holds a Python traceback.  A
    journald-prefixed traceback repeats its ``<N>`` on every line: its lines join the record
    before them.
    """
    patterns = [re.compile(p) for p in (*current_expected, *expected)]
    entries: list[tuple[bool, list[str]]] = []
    for line in text.splitlines():
        starts, bad = _line_start(line)
        if (
            starts
            and line.startswith("<")
            and entries
            and line[:3] == entries[-1][1][-1][:3]
            and (_PROBLEM_MARKERS[0] in line or _PROBLEM_MARKERS[0] in "".join(entries[-1][1]))
        ):
            starts = False  # a traceback line of the same journald record
        if starts or not entries:
            entries.append((bad, [line]))
        else:
            entries[-1][1].append(line)
    problems = []
    for bad, lines in entries:
        entry = "\n".join(lines)
        if not (bad or any(marker in entry for marker in _PROBLEM_MARKERS)):
            continue
        if not any(p.search(entry) for p in patterns):
            problems.append(entry)
    return problems


def record_text(record: logging.LogRecord) -> str:
    """A record's message, then its formatted exception if it carries one."""
    try:
        text = record.getMessage()
    except Exception:  # a bad format string must not hide the record
        text = str(record.msg)
    if record.exc_info and record.exc_info[0] is not None:
        text += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
    return text


def is_problem(record: logging.LogRecord) -> bool:
    """WARNING or worse, or carrying an exception."""
    return record.levelno >= logging.WARNING or bool(
        record.exc_info and record.exc_info[0] is not None
    )


class ProblemCollector(logging.Handler):
    """Keeps every problem record (see :func:`is_problem`) emitted while installed."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if is_problem(record):
            self.records.append(record)

    def take_unexpected(self) -> list[str]:
        """Describe (and forget) the collected records no expected pattern matches."""
        patterns = [re.compile(p) for p in current_expected]
        found, self.records = self.records, []
        out = []
        for record in found:
            text = record_text(record)
            if not any(p.search(text) for p in patterns):
                out.append(f"{record.levelname} {record.name}: {text}")
        return out


def failure_message(what: str, problems: list[str]) -> str:
    """The assertion text for unexpected log problems."""
    listed = "\n---\n".join(problems)
    return (
        f"unexpected {what} (declare with @pytest.mark.expect_log(r'regex') or the expect_log "
        f"fixture if the test means it):\n{listed}"
    )
