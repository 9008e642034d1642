"""Minimal sd_notify(3) client: tell systemd about readiness and shutdown (no dependencies).

A ``Type=notify`` service manager passes ``$NOTIFY_SOCKET``: the address of an AF_UNIX
datagram socket, either a filesystem path (``/run/systemd/notify``) or an abstract-namespace
name written with a leading ``@``.  Each message is one datagram of newline-separated
``KEY=VALUE`` assignments (``READY=1``, ``STOPPING=1``, ``STATUS=...``).

Without ``$NOTIFY_SOCKET`` every call is a no-op returning False, so callers need no "am I
under systemd?" test.  Send failures never raise: readiness reporting must not take down a
mount that otherwise works; they are logged at debug level and reported as False.

With ``NotifyAccess=main`` systemd accepts messages only from the service's main PID, so the
process that calls :func:`ready` must be the one systemd started (no daemonizing).
"""

from __future__ import annotations

import logging
import os
import socket

from qedfuse.errors import one_line

log = logging.getLogger(__name__)

#: Upper bound on one send; the manager drains its socket at once, so this only matters when
#: it is wedged, and then a mount that serves is worth more than a readiness message.
SEND_TIMEOUT_S = 2.0


def _socket_address(value: str) -> str | None:
    """Translate a ``$NOTIFY_SOCKET`` value to a Python AF_UNIX address, or None if unusable."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    # systemd >= 254 also speaks vsock:CID:PORT; relative paths are meaningless here.
    return None


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to ``$NOTIFY_SOCKET``; True if it was sent."""
    value = os.environ.get("NOTIFY_SOCKET", "")
    if not value:
        return False
    address = _socket_address(value)
    if address is None:
        log.debug("sd_notify: unsupported NOTIFY_SOCKET %r; not sending %r", value, state)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT_S)
            sock.sendto(state.encode(), address)
    except (OSError, ValueError) as exc:
        # ValueError: an embedded NUL in a filesystem path.
        log.debug("sd_notify: sending %r to %r failed: %s", state, value, exc)
        return False
    return True


def ready(status_text: str | None = None) -> bool:
    """Report that start-up finished (the mount serves); optionally with a status line."""
    if status_text is None:
        return notify("READY=1")
    return notify(f"READY=1\nSTATUS={one_line(status_text)}")


def stopping() -> bool:
    """Report that shutdown began (flush and unmount in progress)."""
    return notify("STOPPING=1")


def status(text: str) -> bool:
    """Set the free-form status line ``systemctl status`` shows."""
    return notify(f"STATUS={one_line(text)}")
