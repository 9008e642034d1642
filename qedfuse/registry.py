"""The pid/mount registry: which live daemon serves which mount.

The daemon's pid is published in a small file keyed by the mount's device number, not as an
xattr: answering getxattr at all makes the kernel ask for security.capability before every
WRITE (one extra round trip per write); replying ENOSYS once turns that off.  The file also
carries the daemon's pid in its name and lives until the daemon exits, after the unmount and
the final flush: `umount --wait` after a plain `umount` still finds the daemon, and a new
mount that gets the same device number meanwhile has a record of its own.

A record is believed only if its directory, its file and the recorded process belong to one
user (:func:`_read_record`).  Nothing here touches a mount itself: a stopped daemon would hang
the caller (:func:`mount_state` probes in a child process, bounded).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qedfuse.mounttable import (
    FSTYPE,
    PROBE_TIMEOUT_S,
    MountEntry,
    fuse_owners,
    mount_entries,
    probe,
    resolve_path,
)
from qedfuse.procfs import process_state, start_time

if TYPE_CHECKING:
    from qedfuse.control import MountRef

log = logging.getLogger("qedfuse.mount")  # as before the mount modules were split


def _registry_dirs() -> list[str]:
    """Where registry files live: ours first, then others root may need to look at."""
    if os.geteuid() == 0:
        dirs = ["/run/qedfuse"]
        dirs += sorted(glob.glob("/run/user/*/qedfuse")) + sorted(glob.glob("/tmp/qedfuse-*"))
        return dirs
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    own = os.path.join(runtime, "qedfuse") if runtime else f"/tmp/qedfuse-{os.getuid()}"
    return [own, "/run/qedfuse"]


def _device_key(device: str) -> str:
    return device.replace(":", "-")


def _registry_file(directory: str, device: str, pid: int) -> str:
    return os.path.join(directory, f"mount-{_device_key(device)}-{pid}.json")


def register(device: str, mountpoint: str, image: str) -> str | None:
    """Record this daemon (pid, start time, mountpoint, image) for ``qedfuse umount``."""
    directory = _registry_dirs()[0]
    record = {
        "pid": os.getpid(),
        "start": start_time(os.getpid()),
        "mountpoint": mountpoint,
        "image": image,
        "device": device,
    }
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        st = os.lstat(directory)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise OSError(errno.EPERM, f"{directory} is not a directory owned by us")
        _prune_registry(directory)
        path = _registry_file(directory, device, os.getpid())
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot record the daemon for `qedfuse umount --wait`: %s", exc)
        return None
    return path


@dataclass(frozen=True, slots=True)
class Daemon:
    """A live qedfuse daemon as its registry record describes it."""

    pid: int
    start: str  # /proc/PID/stat start time: tells it from a later process with the same pid
    mountpoint: str
    image: str
    device: str
    owner: int = -1  # uid owning the registry directory and file (the daemon's real uid)
    record: str = ""  # the registry file

    def alive(self) -> bool:
        return start_time(self.pid) == self.start


def _trusted_owner(path: str, *, kind: Callable[[int], bool]) -> int | None:
    """The owner of ``path`` if what it holds may be believed, else None.

    Trusted: of the right ``kind`` (no symlink), not group/other-writable, and owned by the
    caller or root (root also looks at other users' own directories: see :func:`_read_record`).
    """
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not kind(st.st_mode) or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return None
    me = os.geteuid()
    return st.st_uid if me == 0 or st.st_uid in (me, 0) else None


def _proc_uid(pid: int) -> int | None:
    """The real uid of process ``pid``, None if gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _holds_dev_fuse(pid: int) -> bool | None:
    """True if ``pid`` has /dev/fuse open, False if not, None if we may not look."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except PermissionError:
        return None
    except OSError:
        return False
    for name in names:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{name}") == "/dev/fuse":
                return True
    return False


def _read_record(path: str) -> Daemon | None:
    """The daemon a registry file describes, if it is alive and to be trusted, else None.

    Anyone can create ``/tmp/qedfuse-*``: a record counts only if its directory and file are
    owned by one user (the caller or root, or any user when root asks), neither is
    group/other-writable, and the recorded process runs as that user.
    """
    owner = _trusted_owner(os.path.dirname(path), kind=stat.S_ISDIR)
    if owner is None or _trusted_owner(path, kind=stat.S_ISREG) != owner:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        pid = int(record["pid"])
        found = Daemon(
            pid,
            str(record["start"]),
            str(record["mountpoint"]),
            str(record.get("image", "")),
            str(record.get("device", "")),
            owner,
            path,
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not found.alive() or _proc_uid(pid) != owner:
        return None
    return found


def _prune_registry(directory: str) -> None:
    """Drop records of daemons that died without cleaning up (SIGKILL)."""
    for path in glob.glob(os.path.join(directory, "mount-*.json")):
        if _read_record(path) is None:
            with contextlib.suppress(OSError):
                os.unlink(path)
            with contextlib.suppress(OSError):
                os.unlink(path.removesuffix(".json") + ".sock")  # see qedfuse.control


def unregister(path: str | None) -> None:
    if path is not None:
        with contextlib.suppress(OSError):
            os.unlink(path)


def live_daemons() -> list[Daemon]:
    """Every registered daemon still running (also those already unmounted and flushing)."""
    found: dict[int, Daemon] = {}
    for directory in _registry_dirs():
        for path in sorted(glob.glob(os.path.join(directory, "mount-*.json"))):
            daemon = _read_record(path)
            if daemon is not None:
                found.setdefault(daemon.pid, daemon)
    return sorted(found.values(), key=lambda d: int(d.start) if d.start.isdigit() else 0)


def daemon_for(entry: MountEntry) -> Daemon | None:
    """The live daemon serving the mount ``entry`` (the newest, if a device was reused)."""
    if entry.fstype != FSTYPE:
        return None
    mounted_by = fuse_owners().get(entry.device)
    matching = [
        d
        for d in live_daemons()
        if d.mountpoint == entry.mountpoint
        and d.device in ("", entry.device)
        and (d.owner == 0 or mounted_by in (None, d.owner))  # its daemon runs as its mounter
        and _holds_dev_fuse(d.pid) is not False  # and serves a FUSE connection
    ]
    return matching[-1] if matching else None


def find_daemon(mountpoint: str) -> tuple[int, str] | None:
    """(pid, image) of the live daemon serving ``mountpoint`` (any path naming it), or None."""
    entry = resolve_path(mountpoint).mount
    daemon = daemon_for(entry) if entry is not None else None
    return (daemon.pid, daemon.image or entry.source) if daemon and entry else None


def is_stopped(pid: int) -> bool:
    """True if ``pid`` is stopped (SIGSTOP, Ctrl-Z) or traced: it answers nothing."""
    return process_state(pid) in ("T", "t")


def mountpoint_of_daemon(pid: int) -> str | None:
    """The mount point the live qedfuse daemon ``pid`` serves, per the registry, or None."""
    for directory in _registry_dirs():
        for path in glob.glob(os.path.join(directory, "mount-*.json")):
            found = _read_record(path)
            if found is not None and found.pid == pid:
                return found.mountpoint
    return None


def _foreign_fuse_devices() -> dict[str, int]:
    """major:minor → owner of the FUSE mounts made by another user (``user_id=``)."""
    mine = os.getuid()
    return {device: uid for device, uid in fuse_owners().items() if uid != mine}


def qedfuse_mounts(mountpoint: str | None = None) -> list[MountRef]:
    """Every qedfuse mount in mountinfo (or the one at ``mountpoint``), with its daemon.

    Never touches the mounts themselves: a stopped daemon would hang the caller.
    """
    from qedfuse.control import MountRef

    if mountpoint is not None:  # any path naming the mount point, resolved as umount does
        entry = resolve_path(mountpoint).mount
        entries = [entry] if entry is not None else []
    else:
        entries = mount_entries()
    others = _foreign_fuse_devices() if os.geteuid() != 0 else {}
    refs: list[MountRef] = []
    for entry in entries:
        if entry.fstype != FSTYPE:
            continue
        if entry.device in others:  # another user's: its registry is not ours to read
            if mountpoint is not None:
                owner = others[entry.device]
                refs.append(MountRef(entry.mountpoint, entry.source, None, None, owner))
            continue
        daemon = daemon_for(entry)
        if daemon is None:
            refs.append(MountRef(entry.mountpoint, entry.source, None, None))
            continue
        refs.append(
            MountRef(
                entry.mountpoint,
                daemon.image or entry.source,
                daemon.pid,
                daemon.record,
                owner_uid=daemon.owner,
            )
        )
    return refs


def mount_state(path: str) -> tuple[str, str]:
    """(state, physical path) of ``path`` without waiting on its daemon.

    state: ``none`` (nothing mounted there), ``serving PID``, ``stopped PID`` (SIGSTOP),
    ``stale`` (the daemon died), ``unanswering`` (a FUSE mount that does not answer and has no
    registered daemon), or ``other FSTYPE``.
    """
    target = resolve_path(path)
    entry = target.mount
    if entry is None:
        return "none", target.path
    daemon = daemon_for(entry)
    if daemon is not None:
        return f"{'stopped' if is_stopped(daemon.pid) else 'serving'} {daemon.pid}", target.path
    if not entry.is_fuse:
        return f"other {entry.fstype}", target.path
    answer = probe("listdir", target.path, PROBE_TIMEOUT_S)
    if answer is None:
        return "unanswering", target.path
    if answer[0] in (errno.ENOTCONN, errno.ECONNABORTED):
        return "stale", target.path
    return ("serving ?" if entry.fstype == FSTYPE else f"other {entry.fstype}"), target.path
