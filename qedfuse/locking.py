"""Image locking interoperable with QEMU: open-file-description (OFD) locks on lock bytes.

QEMU expresses what an opener does and what it tolerates from others as byte-range locks on
the image file (all shared/read locks, owned by the open file description):

* byte ``100 + p`` held  = "I use permission p";
* byte ``200 + p`` held  = "I do not let others use permission p";

with p = 0 consistent read, 1 write, 2 write-unchanged, 3 resize.  Observed with QEMU 7.2:
a read-write open holds 100, 101, 103 and 201, 203; a read-only open holds 100 and 201, 203;
a read-only open with force-share (``-U``) and a backing file hold only 100.

Taking a permission conflicts with anyone holding its ``200 + p`` byte, and refusing a
permission conflicts with anyone holding its ``100 + p`` byte.  Conflicts are probed with
``F_OFD_GETLK`` for a write lock, which ignores our own description's locks.
"""

from __future__ import annotations

import enum
import fcntl
import os
import struct

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
    READ_ONLY = "read-only"  # uses read; shares neither write nor resize
    SHARED = "shared"  # uses read; shares everything (qemu -U, backing files)


def _perms(mode: LockMode) -> tuple[set[int], set[int]]:
    if mode is LockMode.READ_WRITE:
        return {_CONSISTENT_READ, _WRITE, _RESIZE}, {_WRITE, _RESIZE}
    if mode is LockMode.READ_ONLY:
        return {_CONSISTENT_READ}, {_WRITE, _RESIZE}
    return {_CONSISTENT_READ}, set()


def _flock(fd: int, cmd: int, lock_type: int, offset: int) -> int:
    packed = struct.pack(_FLOCK, lock_type, os.SEEK_SET, offset, 1, 0)
    result = fcntl.fcntl(fd, cmd, packed)
    return int(struct.unpack(_FLOCK, result)[0])


def _held_by_other(fd: int, offset: int) -> bool:
    return _flock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, offset) != fcntl.F_UNLCK


def _conflict(what: str, path: str) -> str:
    where = f" [{path}]" if path else ""
    return f"{what}: is another process using the image{where}?"


def lock_image(fd: int, mode: LockMode, path: str = "") -> None:
    """Take QEMU's lock bytes for ``mode`` on ``fd``; raise :class:`LockError` on conflict."""
    used, unshared = _perms(mode)
    offsets = [PERM_LOCK_BASE + p for p in sorted(used)]
    offsets += [SHARED_LOCK_BASE + p for p in sorted(unshared)]
    try:
        for offset in offsets:
            _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, offset)
        for p in sorted(used):
            if _held_by_other(fd, SHARED_LOCK_BASE + p):
                raise LockError(_conflict(f'Failed to get "{_PERM_NAMES[p]}" lock', path))
        for p in sorted(unshared):
            if _held_by_other(fd, PERM_LOCK_BASE + p):
                raise LockError(_conflict(f'Failed to get shared "{_PERM_NAMES[p]}" lock', path))
    except OSError as exc:
        unlock_image(fd)
        raise LockError(f"could not lock {path or 'the image'}: {exc.strerror}") from exc
    except LockError:
        unlock_image(fd)
        raise


def unlock_image(fd: int) -> None:
    """Release every lock byte qedfuse may hold on ``fd``."""
    for base in (PERM_LOCK_BASE, SHARED_LOCK_BASE):
        for p in _PERM_NAMES:
            try:
                _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, base + p)
            except OSError:
                pass
