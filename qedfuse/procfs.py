"""What ``/proc/PID/stat`` says about a process (no I/O beyond that one read)."""

from __future__ import annotations


def stat_fields(pid: int) -> list[str] | None:
    """The fields after the command name in ``/proc/PID/stat`` (state first), None if gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split() or None


def process_state(pid: int) -> str | None:
    """The state letter (``R``, ``S``, ``T`` …), None if the process is gone."""
    fields = stat_fields(pid)
    return fields[0] if fields else None


def start_time(pid: int) -> str | None:
    """The process's start time (field 22), None if it is gone or a zombie."""
    fields = stat_fields(pid)
    if not fields or fields[0] in ("Z", "X"):
        return None
    return fields[19]
