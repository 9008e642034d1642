"""The mount table: ``/proc/self/mountinfo`` parsing and path resolution that never hangs.

A FUSE mount whose daemon is stopped (SIGSTOP) or busy never answers: any stat, listdir,
realpath or open of its root or of anything under it blocks, uninterruptibly for the
caller's purposes.  So a mount point is identified from /proc/self/mountinfo (which names
mounts by their physical path and never asks a filesystem), paths are resolved component by
component without touching a mount's root (:func:`resolve_path`), and the few syscalls that
must go into a FUSE mount run in a child process that is killed when the time is up
(:func:`probe`; a thread stuck in a FUSE request would keep this process from exiting).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal
import stat
import time
from dataclasses import dataclass

from qedfuse.errors import UserError

# The mount modules log as qedfuse.mount, as before they were split (log lines keep their names).
log = logging.getLogger("qedfuse.mount")

#: The filesystem type of a qedfuse mount in mountinfo.
FSTYPE = "fuse.qedfuse"


class MountError(UserError):
    """A mount or umount failure to report as one line (``qedfuse: <message>``, exit 1)."""


@dataclass(frozen=True, slots=True)
class MountEntry:
    """One line of ``/proc/self/mountinfo``."""

    mountpoint: str
    fstype: str
    source: str
    device: str  # major:minor
    mount_id: int = 0
    parent_id: int = 0

    @property
    def is_fuse(self) -> bool:
        """Served by a userspace daemon that may not answer."""
        return self.fstype in ("fuse", "fuseblk") or self.fstype.startswith(("fuse.", "fuseblk."))


def _unescape(field_text: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as ``\\ooo``."""
    out: list[str] = []
    i = 0
    while i < len(field_text):
        if field_text[i] == "\\" and field_text[i + 1 : i + 4].isdigit():
            out.append(chr(int(field_text[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field_text[i])
            i += 1
    return "".join(out)


def mount_entries() -> list[MountEntry]:
    """Every mount in our namespace, in mountinfo order (later ones stack on earlier)."""
    entries: list[MountEntry] = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                rest = right.split()
                if len(fields) >= 5 and len(rest) >= 2 and fields[0].isdigit():
                    entries.append(
                        MountEntry(
                            _unescape(fields[4]),
                            rest[0],
                            _unescape(rest[1]),
                            fields[2],
                            int(fields[0]),
                            int(fields[1]) if fields[1].isdigit() else 0,
                        )
                    )
    except OSError:
        pass
    return entries


def mount_entry(path: str) -> MountEntry | None:
    """The topmost mount whose mountinfo path is exactly ``path`` (physical), or None."""
    found = [entry for entry in mount_entries() if entry.mountpoint == path]
    return found[-1] if found else None


def _covering(entries: list[MountEntry], parent: MountEntry | None, path: str) -> MountEntry | None:
    """The mount visible at ``path`` (a directory of ``parent``), following stacked mounts."""
    top: MountEntry | None = None
    while True:
        if parent is None:  # no tree (odd /proc): match the path alone
            here = [e for e in entries if e.mountpoint == path and e is not top]
            return here[-1] if here else top
        below = parent
        here = [e for e in entries if e.parent_id == below.mount_id and e.mountpoint == path]
        here = [e for e in here if e.mount_id != below.mount_id]
        if not here:
            return top
        top = parent = here[-1]


def _root_mount(entries: list[MountEntry]) -> MountEntry | None:
    ids = {e.mount_id for e in entries}
    roots = [e for e in entries if e.mountpoint == "/" and e.parent_id not in ids]
    if not roots:
        roots = [e for e in entries if e.mountpoint == "/"]
    if not roots:
        return None
    return _covering(entries, roots[0], "/") or roots[0]


#: Longest a probe into a FUSE mount may take when no larger timeout applies (a live daemon
#: answers in milliseconds; its request loop never waits for a flush).
PROBE_TIMEOUT_S = 5.0
_MAX_SYMLINKS = 40


def probe(op: str, path: str, timeout: float) -> tuple[int, bytes] | None:
    """Run one syscall (lstat, stat, readlink, listdir) on ``path`` in a child process.

    Returns (errno or 0, payload) - payload: b"l"/b"d"/b"f" for the file type, the link
    target for readlink - or None if it did not answer within ``timeout`` seconds (the child
    is killed and left to the kernel: it ends when the mount answers or goes away).
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read_fd)
            code, out = 0, b""
            try:
                if op == "readlink":
                    out = os.fsencode(os.readlink(path))
                elif op == "listdir":
                    os.listdir(path)
                else:
                    mode = (os.lstat(path) if op == "lstat" else os.stat(path)).st_mode
                    out = b"l" if stat.S_ISLNK(mode) else b"d" if stat.S_ISDIR(mode) else b"f"
            except OSError as exc:
                code = exc.errno or errno.EIO
            os.write(write_fd, code.to_bytes(4, "little") + out)
        finally:
            os._exit(0)
    os.close(write_fd)
    data = b""
    deadline = time.monotonic() + max(timeout, 0.0)
    try:
        while True:
            ready, _, _ = select.select([read_fd], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
                return None
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(read_fd)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)  # it wrote its answer and exits
    if len(data) < 4:
        return errno.EIO, b""
    return int.from_bytes(data[:4], "little"), data[4:]


def direct(op: str, path: str) -> tuple[int, bytes]:
    """:func:`probe`'s syscall in this process, for paths outside every FUSE mount."""
    try:
        if op == "readlink":
            return 0, os.fsencode(os.readlink(path))
        if op == "listdir":
            os.listdir(path)
            return 0, b""
        mode = (os.lstat(path) if op == "lstat" else os.stat(path)).st_mode
    except OSError as exc:
        return exc.errno or errno.EIO, b""
    return 0, b"l" if stat.S_ISLNK(mode) else b"d" if stat.S_ISDIR(mode) else b"f"


@dataclass(frozen=True, slots=True)
class ResolvedPath:
    """A path as the kernel sees it, found without asking any mount's root."""

    path: str  # physical: absolute, no symlinks, no `.`/`..`, no trailing slash
    mount: MountEntry | None  # the mount whose root ``path`` is, if any
    #: the file type ("dir", "file", "mount") or "missing"; "unknown" if a FUSE mount on
    #: the way did not answer (the rest of the path was then taken literally)
    kind: str
    #: the mount ``path`` lies in (the one that would answer for it)
    within: MountEntry | None


def resolve_path(path: str, deadline: float | None = None) -> ResolvedPath:
    """Resolve ``path`` like the kernel does, without a syscall into a mount that may hang.

    Symlinks in any component, relative paths, ``.``, ``..`` and trailing slashes all give
    the same result for the same directory.  Mount points come from mountinfo and are never
    stat'ed; a component inside a FUSE mount is looked at by a child process bounded by
    ``deadline`` (``time.monotonic()``; default :data:`PROBE_TIMEOUT_S` from now).
    """
    if deadline is None:
        deadline = time.monotonic() + PROBE_TIMEOUT_S
    entries = mount_entries()
    root = _root_mount(entries)
    # stack of (physical path, mount containing it, True if it is that mount's root)
    stack: list[tuple[str, MountEntry | None, bool]] = [("/", root, True)]
    if not path.startswith("/"):
        todo = [*os.getcwd().split("/"), *path.split("/")]  # getcwd asks no filesystem
    else:
        todo = path.split("/")
    todo.reverse()  # a stack: the next component is last
    links = 0
    kind = "mount" if root is not None else "dir"
    answering = True
    while todo:
        name = todo.pop()
        if name in ("", "."):
            if kind == "file":
                kind = "missing"  # "file/" and "file/." are ENOTDIR
            continue
        if name == "..":
            if len(stack) > 1:
                stack.pop()
            if kind in ("dir", "mount"):
                kind = "mount" if stack[-1][2] and stack[-1][1] is not None else "dir"
            elif kind == "file":
                kind = "missing"
            continue
        parent_path, parent_mount, _ = stack[-1]
        candidate = os.path.join(parent_path, name)
        covering = _covering(entries, parent_mount, candidate)
        if covering is not None and covering is not parent_mount:
            stack.append((candidate, covering, True))
            kind = "mount"  # a mount's root is never a symlink: no need to look
            continue
        if kind in ("missing", "unknown") or not answering:
            stack.append((candidate, parent_mount, False))
            continue
        fuse = parent_mount is not None and parent_mount.is_fuse
        if fuse:
            answer = probe("lstat", candidate, deadline - time.monotonic())
        else:
            answer = direct("lstat", candidate)
        if answer is None:
            log.debug("%s does not answer; taking the rest of %s literally", candidate, path)
            answering = False
            kind = "unknown"
            stack.append((candidate, parent_mount, False))
            continue
        code, what = answer
        if code == 0 and what == b"l":
            links += 1
            if links > _MAX_SYMLINKS:
                raise MountError(f"{path}: too many levels of symbolic links")
            if fuse:
                target = probe("readlink", candidate, deadline - time.monotonic())
            else:
                target = direct("readlink", candidate)
            if target is None or target[0] != 0:
                answering = target is not None
                kind = "unknown"
                stack.append((candidate, parent_mount, False))
                continue
            text = os.fsdecode(target[1])
            if text.startswith("/"):
                del stack[1:]
            todo.extend(reversed(text.split("/")))
            continue
        stack.append((candidate, parent_mount, False))
        if code == 0:
            kind = "dir" if what == b"d" else "file"
        else:
            kind = "missing" if code in (errno.ENOENT, errno.ENOTDIR) else "unknown"
    final, within, is_root = stack[-1]
    return ResolvedPath(final, within if is_root else None, kind, within)


def fuse_owners() -> dict[str, int]:
    """major:minor → the user who made each FUSE mount (``user_id=``)."""
    found: dict[str, int] = {}
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields, rest = left.split(), right.split()
                if len(fields) >= 3 and len(rest) >= 3 and rest[0].startswith("fuse"):
                    for option in rest[2].split(","):
                        key, _, value = option.partition("=")
                        if key == "user_id" and value.isdigit():
                            found[fields[2]] = int(value)
    except OSError:
        pass
    return found
