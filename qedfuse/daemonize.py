"""Daemonizing the mount: fork and wait, the start-up reporter, stdio detach, the pidfile.

Without ``-f`` the parent forks *before* any ``trio.run`` (forking a running trio loop is
unsupported) and waits on a pipe; the child calls ``setsid()`` and runs the daemon
(:func:`qedfuse.serve.run_daemon`), which reports through :class:`Reporter` exactly once:
``ok`` and where it logs to, or ``error: <one line>``.  The parent prints where the daemon
logs and exits 0 on ``ok``; on anything else it prints the child's one-line error, waits for
the child (which unmounts whatever it mounted) and exits 1.  With ``-f`` (and ``--systemd``)
the same reporter prints the error itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING

from qedfuse.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, UserError, one_line, say
from qedfuse.logsetup import open_log_file
from qedfuse.mounttable import FSTYPE, MountError, mount_entry
from qedfuse.umount import fusermount

if TYPE_CHECKING:
    from qedfuse.mount import MountConfig

log = logging.getLogger("qedfuse.mount")  # as before the mount modules were split


class StartupError(UserError):
    """Start-up failed before the mount served; the message is the one line to show (the
    daemon reports it through :class:`Reporter`; it never reaches ``cli``)."""


def setup_daemon_logging(
    cfg: MountConfig, *, detached: bool, fallback_file: str | None = None
) -> None:
    """Logging for the mount's process: only problems from a daemonizing ``mount`` until it
    detaches, then syslog (or ``log=``, or ``fallback_file``)."""
    from qedfuse.logsetup import setup_logging

    level = None
    if not cfg.debug and not cfg.foreground and cfg.options.log_file is None and not detached:
        level = logging.WARNING  # a daemonizing `mount` prints nothing but problems
    setup_logging(
        cfg.debug,
        log_file=cfg.options.log_file,
        systemd=cfg.systemd,
        level=level,
        syslog=detached,
        fallback_file=fallback_file,
    )


def fork_and_wait(cfg: MountConfig, run: Callable[[MountConfig, Reporter], int]) -> int:
    """Fork; the child starts a session and runs ``run`` (the daemon), the parent waits on a
    pipe for ``ok`` or the one-line error and returns the exit status."""
    sys.stdout.flush()
    sys.stderr.flush()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_fd)
        code = EXIT_FAILURE
        try:
            os.setsid()
            os.chdir("/")
            try:
                setup_daemon_logging(cfg, detached=False)
            except OSError as exc:
                Reporter(cfg, write_fd).fail(f"cannot open log file: {exc}")
            else:
                code = run(cfg, Reporter(cfg, write_fd))
        except BaseException:
            with contextlib.suppress(BaseException):
                traceback.print_exc()
        finally:
            os._exit(code)
    os.close(write_fd)
    chunks: list[bytes] = []
    interrupted = False
    with os.fdopen(read_fd, "rb") as pipe:
        while True:
            try:
                chunk = pipe.read(4096)
            except KeyboardInterrupt:  # Ctrl-C reaches only us: the daemon has its own session
                interrupted = True
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGTERM)
                continue
            if not chunk:
                break
            chunks.append(chunk)
    message = b"".join(chunks).decode("utf-8", "replace").strip()
    if interrupted:
        # Our Ctrl-C stopped the start-up: the daemon got SIGTERM from us and unmounts (if it
        # got that far), flushes and exits; wait for that, so nothing is left behind.
        os.waitpid(pid, 0)
        _detach_leftover(cfg.mountpoint)
        say("interrupted (nothing is mounted)")
        return EXIT_INTERRUPTED
    if message == "ok" or message.startswith("ok "):
        where = message[3:].strip()
        if where:
            say(f"the daemon (pid {pid}) logs to {where}")
        return EXIT_OK
    _, status = os.waitpid(pid, 0)
    if message.startswith("error:"):
        say(message[6:].strip())
    else:
        say(f"the mount daemon exited before the mount was ready ({_describe_status(status)})")
    _detach_leftover(cfg.mountpoint)
    return EXIT_FAILURE


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def _detach_leftover(mountpoint: str) -> None:
    """Belt and braces: a failed start must leave nothing mounted."""
    entry = mount_entry(mountpoint)
    if entry is not None and entry.fstype == FSTYPE:
        with contextlib.suppress(MountError):
            fusermount(["-uz", mountpoint])


class Reporter:
    """Tells whoever waits for the mount that it serves, or why it failed (exactly once)."""

    def __init__(self, cfg: MountConfig, fd: int | None) -> None:
        self.cfg = cfg
        self.fd = fd
        self.done = False

    def _send(self, text: str) -> None:
        self.done = True
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.write(fd, text.encode("utf-8", "replace"))
        except OSError:
            pass
        finally:
            os.close(fd)

    def ready(self, log_destination: str = "") -> None:
        """The mount serves; ``log_destination`` (where the daemon logs) is for the parent."""
        if self.cfg.systemd:
            from qedfuse import sdnotify

            sdnotify.ready(f"serving {self.cfg.image_path} at {self.cfg.mountpoint}")
        self._send(f"ok {' '.join(log_destination.split())}".strip() + "\n")

    def fail(self, message: str) -> None:
        if self.done:
            log.error("%s", message)
            return
        line = one_line(message)
        if self.fd is None:
            say(line)
            self.done = True
        else:
            self._send(f"error: {line}\n")


def detach_stdio(cfg: MountConfig) -> None:
    """Point stdin/stdout/stderr at /dev/null (stderr at the log file if there is one)."""
    null = os.open(os.devnull, os.O_RDWR)
    err = null
    if cfg.options.log_file is not None:
        with contextlib.suppress(OSError):
            err = open_log_file(cfg.options.log_file)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(err, 2)
    if err != null:
        os.close(err)
    os.close(null)


# ---------------------------------------------------------------------------- the daemon


def write_pidfile(path: str) -> None:
    """Write our pid to ``path`` (atomically); StartupError if that fails."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="ascii") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise StartupError(f"cannot write pidfile {path}: {exc.strerror}") from None


def remove_pidfile(path: str) -> None:
    """Remove ``path`` if it still holds our pid."""
    try:
        with open(path, encoding="ascii") as f:
            if f.read().strip() != str(os.getpid()):
                return
        os.unlink(path)
    except OSError:
        pass
