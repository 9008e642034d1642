"""Image locking interoperable with QEMU: open-file-description (OFD) locks on lock bytes.

QEMU expresses what an opener does and what it tolerates from others as byte-range locks on
the image file (all shared/read locks, owned by the open file description):

* byte ``100 + p`` held  = "I use permission p";
* byte ``200 + p`` held  = "I do not let others use permission p";

with p = 0 consistent read, 1 write, 2 write-unchanged, 3 resize.  Observed with QEMU 7.2
(``/proc/locks`` while qemu-io holds a chain): a read-write open of a QED image holds 100,
101, 103 and 201, 203; a read-only one 100 and 201, 203; every QED file *below* it in the
backing chain also 100, 201, 203 (QED's tables are metadata, so nobody may write or resize
them); a raw backing file and any ``-U`` (force-share) open only 100.

Taking a permission conflicts with anyone holding its ``200 + p`` byte, and refusing a
permission conflicts with anyone holding its ``100 + p`` byte.  Conflicts are probed with
``F_OFD_GETLK`` for a write lock, which ignores our own description's locks.

OFD locks show as pid -1 in ``/proc/locks``, so a conflict's holders are found through the
``lock:`` lines of ``/proc/PID/fdinfo/FD`` (bounded scan, error path only).
"""

from __future__ import annotations

import enum
import fcntl
import os
import struct
import time

from qedfuse.errors import LockError

PERM_LOCK_BASE = 100
SHARED_LOCK_BASE = 200
_PERM_NAMES = {0: "consistent read", 1: "write", 2: "write unchanged", 3: "resize"}
_CONSISTENT_READ, _WRITE, _RESIZE = 0, 1, 3
# struct flock on Linux: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid.
_FLOCK = "hhqqi4x"


class LockMode(enum.Enum):
    """How an image is used, in QEMU's permission terms."""

    READ_WRITE = "read-write"  # uses read, write, resize; shares neither write nor resize
    READ_ONLY = "read-only"  # uses read; shares neither write nor resize (also a QED backing)
    SHARED = "shared"  # uses read; shares everything (qemu -U, a raw backing file)
    CREATE = "create"  # uses write, resize; shares all but resize (qemu-img create's file lock)
    WRITE_SHARED = "write-shared"  # uses read, write, resize; shares all (a raw commit target)


_ALL_USED = frozenset({_CONSISTENT_READ, _WRITE, _RESIZE})
_MODE_PERMS: dict[LockMode, tuple[frozenset[int], frozenset[int]]] = {
    LockMode.READ_WRITE: (_ALL_USED, frozenset({_WRITE, _RESIZE})),
    LockMode.READ_ONLY: (frozenset({_CONSISTENT_READ}), frozenset({_WRITE, _RESIZE})),
    LockMode.SHARED: (frozenset({_CONSISTENT_READ}), frozenset()),
    LockMode.CREATE: (frozenset({_WRITE, _RESIZE}), frozenset({_RESIZE})),
    LockMode.WRITE_SHARED: (_ALL_USED, frozenset()),
}


def _perms(mode: LockMode) -> tuple[frozenset[int], frozenset[int]]:
    """(permissions used, permissions not shared) of ``mode``."""
    return _MODE_PERMS[mode]


def _flock(fd: int, cmd: int, lock_type: int, offset: int) -> int:
    packed = struct.pack(_FLOCK, lock_type, os.SEEK_SET, offset, 1, 0)
    result = fcntl.fcntl(fd, cmd, packed)
    return int(struct.unpack(_FLOCK, result)[0])


def _held_by_other(fd: int, offset: int) -> bool:
    return _flock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, offset) != fcntl.F_UNLCK


def _first_conflict(fd: int, mode: LockMode) -> tuple[str, int] | None:
    """(QEMU's refusal text, the byte someone else holds) for ``mode`` on ``fd``, or None."""
    used, unshared = _perms(mode)
    for p in sorted(used):
        if _held_by_other(fd, SHARED_LOCK_BASE + p):
            return f'Failed to get "{_PERM_NAMES[p]}" lock', SHARED_LOCK_BASE + p
    for p in sorted(unshared):
        if _held_by_other(fd, PERM_LOCK_BASE + p):
            return f'Failed to get shared "{_PERM_NAMES[p]}" lock', PERM_LOCK_BASE + p
    return None


def lock_image(fd: int, mode: LockMode, path: str = "") -> None:
    """Take QEMU's lock bytes for ``mode`` on ``fd``; raise :class:`LockError` on conflict.

    The error names who holds the conflicting byte (pid, command, mount point of a qedfuse
    daemon) and records which modes would not have conflicted, for the caller's hint.
    """
    used, unshared = _perms(mode)
    offsets = [PERM_LOCK_BASE + p for p in sorted(used)]
    offsets += [SHARED_LOCK_BASE + p for p in sorted(unshared)]
    try:
        for offset in offsets:
            _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, offset)
        conflict = _first_conflict(fd, mode)
    except OSError as exc:
        unlock_image(fd)
        raise LockError(f"could not lock {path or 'the image'}: {exc.strerror}") from exc
    if conflict is None:
        return
    unlock_image(fd)
    what, offset = conflict
    where = f" [{path}]" if path else ""
    message = f"{what}: is another process using the image{where}?"
    holders = describe_holders(fd, offset)
    if holders:
        message += f" It is held by {holders}."
    try:
        free = frozenset(m for m in LockMode if _first_conflict(fd, m) is None)
    except OSError:
        free = frozenset()
    raise LockError(message, path=path, mode=mode, free_modes=free)


# ------------------------------------------------------------------ who holds a lock byte

#: Bounds of the holder scan: it runs only after a conflict, but must never take long.
MAX_SCANNED_FDS = 50_000
MAX_SCAN_SECONDS = 1.0
MAX_SHOWN_HOLDERS = 3
_MAX_COMMAND_CHARS = 80


def _lock_covers(line: str, ident: str, offset: int) -> bool:
    """Whether one ``lock:`` line of fdinfo holds ``offset`` of the file ``ident``."""
    fields = line.split()
    if "->" in fields or ident not in fields:  # "->": a blocked waiter, not a holder
        return False
    start, end = fields[-2], fields[-1]
    try:
        return int(start) <= offset and (end == "EOF" or offset <= int(end))
    except ValueError:
        return False


def find_holders(fd: int, offset: int) -> list[int]:
    """Pids whose open files hold lock byte ``offset`` of ``fd``'s file (bounded, best effort).

    Reads ``/proc/PID/fdinfo/*`` only, never the files themselves (a file on a stopped FUSE
    mount would hang a ``stat``).  Processes of other users are invisible unless we are root.
    """
    st = os.fstat(fd)
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    ino_line = f"ino:\t{st.st_ino}\n"
    deadline = time.monotonic() + MAX_SCAN_SECONDS
    budget = MAX_SCANNED_FDS
    found: list[int] = []
    try:
        pids = sorted((int(n) for n in os.listdir("/proc") if n.isdigit()), reverse=True)
    except OSError:
        return found
    for pid in pids:
        if budget <= 0 or time.monotonic() > deadline:
            break
        directory = f"/proc/{pid}/fdinfo"
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names[:budget]:
            budget -= 1
            try:
                with open(f"{directory}/{name}", encoding="ascii", errors="replace") as f:
                    text = f.read()
            except OSError:
                continue
            if ino_line not in text:
                continue
            if any(_lock_covers(line, ident, offset) for line in text.splitlines()
                   if line.startswith("lock:")):  # fmt: skip
                found.append(pid)
                break
    return found


def _command(pid: int) -> str:
    """``NAME ARGS`` of ``pid`` (an interpreter's script shows as the script), clipped.

    Absolute paths show as their last component, to keep the one-line error short.
    """
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except OSError:
        argv = []
    if len(argv) > 1 and os.path.basename(argv[0]).startswith("python"):
        argv = argv[1:]
    if not argv:
        try:
            with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
                return f.read().strip() or "?"
        except OSError:
            return "?"
    # file names without their directories: the message already names the image's path
    text = " ".join(os.path.basename(a) if a.startswith("/") else a for a in argv)
    if len(text) > _MAX_COMMAND_CHARS:
        text = text[: _MAX_COMMAND_CHARS - 1] + "…"
    return text


def _describe_pid(pid: int) -> str:
    from qedfuse.registry import mountpoint_of_daemon

    mountpoint = mountpoint_of_daemon(pid)
    if mountpoint is not None:
        return f"pid {pid} (the qedfuse mount on {mountpoint})"
    return f"pid {pid} ({_command(pid)})"


def describe_holders(fd: int, offset: int) -> str:
    """``pid 12 (qemu-io -f qed a.qed)``, …, for the holders of ``offset``; '' if unknown."""
    try:
        pids = find_holders(fd, offset)
        shown = [_describe_pid(pid) for pid in pids[:MAX_SHOWN_HOLDERS]]
    except Exception:  # naming the holder is a courtesy: never lose the lock error over it
        return ""
    if len(pids) > MAX_SHOWN_HOLDERS:
        shown.append(f"{len(pids) - MAX_SHOWN_HOLDERS} more")
    return ", ".join(shown)


def with_hint(exc: LockError, instead: LockMode, advice: str) -> LockError:
    """``exc`` plus ``advice`` when opening in mode ``instead`` would not have conflicted."""
    if exc.mode is None or exc.mode is instead or instead not in exc.free_modes:
        return exc
    return LockError(f"{exc} {advice}", path=exc.path, mode=exc.mode, free_modes=exc.free_modes)


def unlock_image(fd: int) -> None:
    """Release every lock byte qedfuse may hold on ``fd``."""
    for base in (PERM_LOCK_BASE, SHARED_LOCK_BASE):
        for p in _PERM_NAMES:
            try:
                _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, base + p)
            except OSError:
                pass
