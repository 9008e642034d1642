"""``qedfuse umount``: detach a mount without ever blocking on its daemon.

``qedfuse umount`` resolves the path it is given to the mount point's physical path (symlinks,
``..``, relative paths; :func:`qedfuse.mounttable.resolve_path`, which never stats a mount's
root), finds the mount in ``/proc/self/mountinfo`` and its daemon in the registry (keyed by the
mount's device number, :mod:`qedfuse.registry`), runs ``fusermount3 -u`` (``-uz`` with
``--lazy``) and with ``--wait`` polls until that process is gone, then reports whether the
image was left clean.  Nothing it does can block on a daemon that does not answer (stopped,
dead): the one probe into the mount runs in a child process, and ``--timeout`` bounds the
whole command.  A busy mount point names its holders; a dead (ENOTCONN) mount is detached with
``fusermount3 -uz``; the registry record lives until the daemon exits, so ``--wait`` after a
plain ``umount`` still waits for the final flush.  Failures raise :class:`MountError` (one
line, exit status 1, printed by ``cli``).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import shutil
import subprocess
import time

from qedfuse import format as fmt
from qedfuse.errors import EXIT_OK, QedError, say
from qedfuse.mounttable import (
    FSTYPE,
    PROBE_TIMEOUT_S,
    MountEntry,
    MountError,
    probe,
    resolve_path,
)
from qedfuse.procfs import start_time
from qedfuse.registry import Daemon, daemon_for, is_stopped, live_daemons

log = logging.getLogger("qedfuse.mount")  # as before the mount modules were split


def fusermount(
    args: list[str], timeout: float = PROBE_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """Run fusermount3, killed after ``timeout`` seconds (MountError then).

    As root it only resolves the parent directory and calls umount2 on the last component;
    it never stats the mount's root.  The bound is for what it might do elsewhere.
    """
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is None:
        raise MountError("fusermount3 not found (install the fuse3 package)")
    proc = subprocess.Popen(
        [tool, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=max(timeout, 0.1))
    except subprocess.TimeoutExpired:
        proc.kill()  # a process stuck in a FUSE request dies at SIGKILL; do not wait for it
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=0.5)
        target = args[-1]
        raise MountError(
            f"fusermount3 {' '.join(args[:-1])} {target} did not finish within "
            f"{max(timeout, 0.1):g} s; try `umount -l {target}`"
        ) from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _uses_mount(pid: str, entry: MountEntry, maps_device: str) -> bool:
    """Whether process ``pid`` has a file, mapping, cwd or root in the mount (from /proc only:
    fdinfo's mnt_id, maps' device; nothing here asks the mount itself)."""
    prefix = entry.mountpoint.rstrip("/") + "/"
    for link in ("cwd", "root"):
        with contextlib.suppress(OSError):
            where = os.readlink(f"/proc/{pid}/{link}")
            if where == entry.mountpoint or where.startswith(prefix):
                return True
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fdinfo"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/fdinfo/{fd}") as f:
                for line in f:
                    if line.startswith("mnt_id:"):
                        if int(line.split()[1]) == entry.mount_id:
                            return True
                        break
    with contextlib.suppress(OSError), open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split(None, 5)
            if len(fields) >= 4 and fields[3] == maps_device:
                return True
    return False


def _holders(entry: MountEntry) -> list[str]:
    """Processes and loop devices using the mount (best effort, from /proc and /sys)."""
    found: list[str] = []
    major, _, minor = entry.device.partition(":")
    maps_device = (
        f"{int(major):02x}:{int(minor):02x}" if major.isdigit() and minor.isdigit() else ""
    )
    try:
        pids = sorted((p for p in os.listdir("/proc") if p.isdigit()), key=int)
    except OSError:
        pids = []
    for pid in pids:
        if int(pid) == os.getpid() or not _uses_mount(pid, entry, maps_device):
            continue
        try:
            with open(f"/proc/{pid}/comm", encoding="utf-8") as f:
                comm = f.read().strip()
        except OSError:
            comm = "?"
        found.append(f"pid {pid} ({comm})")
    prefix = entry.mountpoint.rstrip("/") + "/"
    try:
        loops = sorted(os.listdir("/sys/block"))
    except OSError:
        loops = []
    for dev in loops:
        if not dev.startswith("loop"):
            continue
        try:
            with open(f"/sys/block/{dev}/loop/backing_file", encoding="utf-8") as f:
                backing = f.read().strip()
        except OSError:
            continue
        if backing.startswith(prefix):
            found.append(f"/dev/{dev} (loop device on {backing})")
    return found


def _image_needs_check(path: str) -> bool | None:
    try:
        with open(path, "rb") as f:
            header = fmt.Header.unpack(f.read(fmt.HEADER_STRUCT_SIZE))
    except (OSError, QedError, ValueError):
        return None
    return header.need_check


def umount_main(ns: argparse.Namespace) -> int:
    """Run ``qedfuse umount``; returns the exit status."""
    from qedfuse.logsetup import setup_logging

    debug = bool(getattr(ns, "debug", False))
    setup_logging(debug, level=logging.DEBUG if debug else logging.WARNING)
    return _umount(ns)  # a MountError reaches cli's one user-error branch


def _process_age() -> float:
    """Seconds since this process started (interpreter start-up and imports included)."""
    start = start_time(os.getpid())
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        return max(time.clock_gettime(time.CLOCK_BOOTTIME) - int(start or "") / ticks, 0.0)
    except (ValueError, OSError):
        return 0.0


def _resume_hint(pid: int) -> str:
    return f"resume it with `kill -CONT {pid}` (it then flushes the image and exits)"


def _umount(ns: argparse.Namespace) -> int:
    # Everything counts against --timeout, from the moment this process started.
    deadline = time.monotonic() - _process_age() + max(float(ns.timeout), 0.0)

    def left(cap: float = float("inf")) -> float:
        return max(min(deadline - time.monotonic(), cap), 0.1)

    target = resolve_path(ns.mountpoint, time.monotonic() + left(PROBE_TIMEOUT_S))
    mountpoint, entry = target.path, target.mount
    serving = daemon_for(entry) if entry is not None else None
    # daemons unmounted from here (a plain umount, an external one) that are still flushing
    flushing = [d for d in live_daemons() if d.mountpoint == mountpoint and d != serving]
    if entry is None:
        if flushing and ns.wait:
            return _wait_for(flushing, deadline, ns.timeout)
        hint = ""
        if flushing:
            pids = ", ".join(str(d.pid) for d in flushing)
            hint = (
                f"; its daemon (pid {pids}) is still flushing the image: "
                f"`qedfuse umount --wait {mountpoint}` waits for it"
            )
        raise MountError(f"{mountpoint} is not mounted{hint}")
    if entry.fstype != FSTYPE:
        raise MountError(f"{mountpoint} is not a qedfuse mount (it is {entry.fstype})")
    if serving is None:
        # No live daemon is registered: dead (SIGKILL), or unknown.  Ask the kernel, bounded.
        answer = probe("listdir", mountpoint, left(PROBE_TIMEOUT_S))
        if answer is not None and answer[0] in (errno.ENOTCONN, errno.ECONNABORTED):
            return _detach_stale(mountpoint, entry, left())
        if answer is None and not ns.lazy:
            raise MountError(
                f"{mountpoint} does not answer and no running qedfuse daemon is registered for "
                f"it; detach it with `qedfuse umount --lazy {mountpoint}` (or `umount -l "
                f"{mountpoint}`)"
            )
    stopped = serving is not None and is_stopped(serving.pid)
    cp = fusermount(["-uz" if ns.lazy else "-u", mountpoint], left())
    if cp.returncode != 0:
        text = cp.stderr.strip()
        if "busy" in text.lower():
            holders = _holders(entry)
            who = f" (in use by: {', '.join(holders)})" if holders else ""
            pause = ""
            if stopped and serving is not None:
                pause = f"; its daemon (pid {serving.pid}) is stopped: {_resume_hint(serving.pid)}"
            raise MountError(
                f"{mountpoint} is busy{who}; close them, or use --lazy to detach it now and "
                f"let the daemon finish when the last user is done{pause}"
            )
        raise MountError(f"unmounting {mountpoint} failed: {' '.join(text.splitlines())}")
    if ns.lazy:
        log.info("lazily detached %s; the daemon ends when its last user closes it", mountpoint)
    if not ns.wait:
        if stopped and serving is not None:
            say(
                f"unmounted {mountpoint}, but its daemon (pid {serving.pid}) is "
                f"stopped; {_resume_hint(serving.pid)}"
            )
        return EXIT_OK
    if serving is None:
        raise MountError(f"cannot tell which process serves {mountpoint}; not waiting")
    if stopped or is_stopped(serving.pid):
        # A stopped daemon never finishes its flush: waiting out --timeout says nothing more.
        raise MountError(
            f"unmounted {mountpoint}, but its daemon (pid {serving.pid}) is stopped and cannot "
            f"finish its flush; {_resume_hint(serving.pid)}"
        )
    return _wait_for([serving, *flushing], deadline, ns.timeout)


def _detach_stale(mountpoint: str, entry: MountEntry, timeout: float) -> int:
    cp = fusermount(["-uz", mountpoint], timeout)
    if cp.returncode != 0:
        raise MountError(
            f"{mountpoint} is a stale mount and fusermount3 -uz failed: {cp.stderr.strip()}"
        )
    say(
        f"{mountpoint} was a stale mount (its daemon had died); detached it. "
        f"The image may have NEED_CHECK set: its next read-write open repairs it, or "
        f"run `qedfuse check -r all {entry.source}`"
    )
    return EXIT_OK


def _wait_for(daemons: list[Daemon], deadline: float, timeout: float) -> int:
    """Wait until every one of ``daemons`` has exited, then report NEED_CHECK left set."""
    delay = 0.01
    while alive := [d for d in daemons if d.alive()]:
        now = time.monotonic()
        if now >= deadline:
            pid = alive[0].pid
            if is_stopped(pid):
                message = (
                    f"the daemon (pid {pid}) is stopped (SIGSTOP or Ctrl-Z) and was still "
                    f"running after {timeout:g} s; {_resume_hint(pid)}"
                )
            else:
                message = (
                    f"the daemon (pid {pid}) is still running after {timeout:g} s (still "
                    "flushing, or held open after --lazy); not waiting any longer"
                )
            raise MountError(message)
        time.sleep(min(delay, deadline - now))
        delay = min(delay * 2, 0.2)
    for daemon in daemons:
        if daemon.image and _image_needs_check(daemon.image):
            raise MountError(
                f"the daemon exited but left NEED_CHECK set on {daemon.image}; its "
                f"next read-write open repairs it (or run `qedfuse check -r all {daemon.image}`)"
            )
    return EXIT_OK
