"""``qedfuse mount`` and ``qedfuse umount``: the mount's lifecycle.

Mount
-----
The parent parses ``-o`` and checks the mount point (resolved to its physical path by
:func:`resolve_path`, an existing directory, not already a mount point per mountinfo).
Without ``-f`` it then forks *before* any ``trio.run`` (forking a running trio loop is
unsupported) and waits on a pipe; the child calls ``setsid()`` and runs :func:`_serve` in
``trio.run``:

1. create the ``--overlay`` image if asked, open the image and its backing chain (taking
   QEMU's lock bytes), ``pyfuse3.init()`` (the mount now exists);
2. start the signal watcher, the engine's idle flusher and the control socket
   (:mod:`qedfuse.control`, next to the registry record), write the pidfile, point stdio at
   ``/dev/null`` and logging at syslog (or the ``log=`` file; without a syslog socket, a file
   by the registry record), write ``ok`` and where it logs to the pipe (and ``READY=1`` under
   ``--systemd``), then serve with ``pyfuse3.main()``.

The parent prints where the daemon logs and exits 0 on ``ok``; on anything else it prints
the child's one-line error, waits for the child (which unmounts whatever it mounted) and
exits 1.  ``-f`` runs the same steps in the foreground process; ``--systemd`` implies ``-f``.

Shutdown: SIGTERM, SIGINT and SIGHUP call ``pyfuse3.terminate()``; an external ``umount`` or
``fusermount3 -u`` ends ``pyfuse3.main()`` by itself.  Either way in-flight requests finish,
then the mount is removed (``pyfuse3.close(unmount=True)``), the image gets its ordered flush
(NEED_CHECK cleared) and is closed (locks released), the pidfile is removed and the daemon
exits 0.  If the image cannot be flushed (failsafe) it exits 1 and NEED_CHECK stays set.  A
second signal during that flush exits 1 at once, leaving NEED_CHECK set (the next read-write
open repairs).

Umount
------
``qedfuse umount`` resolves the path it is given to the mount point's physical path (symlinks,
``..``, relative paths; :func:`resolve_path`, which never stats a mount's root), finds the mount
in ``/proc/self/mountinfo`` and its daemon in the registry (keyed by the mount's device number),
runs ``fusermount3 -u`` (``-uz`` with ``--lazy``) and with ``--wait`` polls until that process is
gone, then reports whether the image was left clean.  Nothing it does can block on a daemon
that does not answer (stopped, dead): the one probe into the mount runs in a child process,
and ``--timeout`` bounds the whole command.  A busy mount point names its holders; a dead
(ENOTCONN) mount is detached with ``fusermount3 -uz``; the registry record lives until the
daemon exits, so ``--wait`` after a plain ``umount`` still waits for the final flush.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import glob
import json
import logging
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import time
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import trio

from qedfuse import format as fmt
from qedfuse.errors import QedError
from qedfuse.options import MountOptions, OptionError, parse_options
from qedfuse.procfs import process_state, start_time

if TYPE_CHECKING:
    from qedfuse.control import MountRef
    from qedfuse.engine import QedImage
    from qedfuse.records import StatsRecord

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # as every command on Ctrl-C (cli.py)
#: How long ``umount --wait`` waits for the daemon by default (a large flush takes a while).
DEFAULT_UMOUNT_TIMEOUT = 120.0
_FSTYPE = "fuse.qedfuse"
_FD_MOUNTPOINT = re.compile(r"/dev/fd/[0-9]+")


class MountError(Exception):
    """A failure to report as one line (``qedfuse: <message>``)."""


@dataclass
class MountConfig:
    """Everything the daemon needs, decided in the parent before forking."""

    image_path: str
    mountpoint: str
    options: MountOptions
    foreground: bool = False
    systemd: bool = False
    debug: bool = False
    debug_fuse: bool = False
    pidfile: str | None = None
    overlay_base: str | None = None  # --overlay: image_path is created on top of this


# ---------------------------------------------------------------------------- argparse


def configure_mount_parser(p: argparse.ArgumentParser) -> None:
    """Add the ``qedfuse mount`` arguments (also used for ``qedfuse IMAGE MOUNTPOINT -o …``)."""
    p.description = (
        "Serve a QED image as MOUNTPOINT/<image stem>.raw.  Returns once the mount serves "
        "(or fails with one line and nothing mounted)."
    )
    p.epilog = (
        "-o options: ro, rw, uid=, gid=, umask=, fsname=, cache=auto|none|kernel, log=FILE, "
        "debug, backing=PATH, untrusted, detect_zeroes=on|off, flush_delay=SECONDS, "
        "pidfile=FILE, writeback_cache; passed to FUSE: allow_other, allow_root, "
        "default_permissions, noatime, atime, sync, async, dirsync, noexec, exec, nodev, "
        "nosuid, dev, suid, auto_unmount, "
        "max_read=N; fstab/mount(8)-only options (defaults, nofail, _netdev, x-*, …) are "
        "ignored.  -f means foreground here, also when run by mount(8)."
    )
    p.add_argument(
        "-f", "--foreground", action="store_true", help="serve in the foreground (no fork)"
    )
    p.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPT[,OPT…]",
        help="mount options (may be repeated; see below)",
    )
    p.add_argument("--pidfile", metavar="FILE", help="write the daemon's pid to FILE")
    p.add_argument(
        "--systemd",
        action="store_true",
        help="run as a Type=notify service: foreground, READY=1/STOPPING=1, journal logging",
    )
    p.add_argument(
        "--overlay",
        metavar="NEW.qed",
        help="create NEW.qed backed by IMAGE (raw or QED; never written) and mount NEW.qed",
    )
    p.add_argument("-d", "--debug", action="store_true", help="log qedfuse debug messages")
    p.add_argument("--debug-fuse", action="store_true", help="also log libfuse's request trace")
    # mount(8) calls external mount programs as `SPEC DIR [-sfnv] [-N ns] [-o …] [-t type]`.
    p.add_argument("-n", dest="mount8_n", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("-v", dest="mount8_v", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("-s", dest="mount8_s", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("-t", dest="mount8_type", metavar="TYPE", help=argparse.SUPPRESS)
    p.add_argument("-N", dest="mount8_ns", metavar="NS", help=argparse.SUPPRESS)
    p.add_argument("image", metavar="IMAGE", help="the QED image (the base with --overlay)")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing, empty directory")


def configure_umount_parser(p: argparse.ArgumentParser) -> None:
    """Add the ``qedfuse umount`` arguments."""
    p.description = (
        "Unmount a qedfuse mount.  Plain umount returns before the daemon has flushed the "
        "image; --wait returns only once the daemon has exited."
    )
    p.add_argument(
        "--wait", action="store_true", help="wait until the daemon has flushed and exited"
    )
    p.add_argument(
        "--lazy",
        action="store_true",
        help="detach even if busy (fusermount3 -uz); the daemon ends when the last user does",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_UMOUNT_TIMEOUT,
        metavar="S",
        help=f"give up waiting after S seconds (default {DEFAULT_UMOUNT_TIMEOUT:g}), exit 1",
    )
    p.add_argument("mountpoint", metavar="MOUNTPOINT")


# ---------------------------------------------------------------------------- mount table
# A FUSE mount whose daemon is stopped (SIGSTOP) or busy never answers: any stat, listdir,
# realpath or open of its root or of anything under it blocks, uninterruptibly for the
# caller's purposes.  So a mount point is identified from /proc/self/mountinfo (which names
# mounts by their physical path and never asks a filesystem), paths are resolved component by
# component without touching a mount's root, and the few syscalls that must go into a FUSE
# mount run in a child process that is killed when the time is up (a thread stuck in a FUSE
# request would keep this process from exiting).


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


def _probe(op: str, path: str, timeout: float) -> tuple[int, bytes] | None:
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


def _direct(op: str, path: str) -> tuple[int, bytes]:
    """:func:`_probe`'s syscall in this process, for paths outside every FUSE mount."""
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
            answer = _probe("lstat", candidate, deadline - time.monotonic())
        else:
            answer = _direct("lstat", candidate)
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
                target = _probe("readlink", candidate, deadline - time.monotonic())
            else:
                target = _direct("readlink", candidate)
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


def _own_mount(cfg: MountConfig) -> MountEntry | None:
    """Our FUSE mount, read after init (never by stat'ing it: nobody serves it yet)."""
    entry = mount_entry(cfg.mountpoint)
    if entry is not None:
        return entry if entry.fstype == _FSTYPE else None
    if not cfg.mountpoint.startswith("/dev/fd/"):
        return None
    # mount.fuse3 -o drop_privileges made the mount (source "qedfuse") and handed us its
    # /dev/fuse descriptor: ours is the one such mount no live daemon has registered.
    candidates = [
        e
        for e in mount_entries()
        if e.fstype == _FSTYPE
        and e.source in (cfg.image_path, _FSTYPE.removeprefix("fuse."))
        and daemon_for(e) is None
    ]
    return candidates[0] if len(candidates) == 1 else None


def _check_mountpoint(mountpoint: str) -> str:
    """The physical path of ``mountpoint`` if a new mount may go there; else MountError."""
    target = resolve_path(mountpoint)
    entry = target.mount
    path = target.path
    if entry is not None:
        what = f"{entry.fstype} {entry.source}"
        daemon = daemon_for(entry) if entry.fstype == _FSTYPE else None
        if daemon is not None:
            if _is_stopped(daemon.pid):
                raise MountError(
                    f"{path} is already mounted ({what}) by a stopped daemon (pid "
                    f"{daemon.pid}); resume it with `kill -CONT {daemon.pid}`, or detach it "
                    f"with `qedfuse umount --lazy {path}`"
                )
            raise MountError(f"{path} is already mounted ({what}) by daemon pid {daemon.pid}")
        if entry.is_fuse:
            answer = _probe("listdir", path, PROBE_TIMEOUT_S)  # stat may answer from a cache
            if answer is not None and answer[0] in (errno.ENOTCONN, errno.ECONNABORTED):
                raise MountError(
                    f"{path} is a stale mount (its daemon is gone); clean it up with: "
                    f"qedfuse umount {path}"
                )
            if answer is None:
                raise MountError(
                    f"{path} is already mounted ({what}) and does not answer; detach it with "
                    f"`qedfuse umount --lazy {path}` (or `umount -l {path}`)"
                )
        raise MountError(f"{path} is already mounted ({what})")
    if target.kind == "unknown":
        raise MountError(f"mount point {path}: a FUSE mount on the way does not answer")
    if target.kind == "missing":
        raise MountError(f"mount point {path} does not exist")
    within = target.within
    if within is not None and within.is_fuse:
        answer = _probe("stat", path, PROBE_TIMEOUT_S)
    else:
        answer = _direct("stat", path)
    if answer is None:
        raise MountError(f"mount point {path}: a FUSE mount on the way does not answer")
    if answer[0] == errno.ENOENT:
        raise MountError(f"mount point {path} does not exist")
    if answer[0] != 0:
        raise MountError(f"mount point {path}: {os.strerror(answer[0])}")
    if answer[1] != b"d":
        raise MountError(f"mount point {path} is not a directory")
    return path


# ---------------------------------------------------------------------------- mount_main


def _build_config(ns: argparse.Namespace) -> MountConfig:
    opts = parse_options(ns.options)
    # The daemon chdirs to / before it opens anything: every path the user typed is made
    # absolute here, against the caller's cwd (the mountpoint by _check_mountpoint).
    opts = replace(
        opts,
        backing=os.path.abspath(opts.backing) if opts.backing else opts.backing,
        log_file=os.path.abspath(opts.log_file) if opts.log_file else opts.log_file,
        pidfile=os.path.abspath(opts.pidfile) if opts.pidfile else opts.pidfile,
    )
    image = os.path.abspath(ns.image)
    overlay_base: str | None = None
    if ns.overlay:
        overlay_base = image
        image = os.path.abspath(ns.overlay)
        if os.path.lexists(image):
            raise MountError(f"overlay {image} already exists; refusing to overwrite it")
        if not os.path.exists(overlay_base):
            raise MountError(f"Could not open '{overlay_base}': No such file or directory")
        if opts.read_only:
            raise MountError("--overlay creates a new image to write to; it cannot be 'ro'")
    if _FD_MOUNTPOINT.fullmatch(ns.mountpoint):
        # mount.fuse3 -o drop_privileges mounted already and passes the /dev/fuse descriptor
        # (libfuse >= 3.3 serves it); there is no directory to check.
        mountpoint = ns.mountpoint
    else:
        mountpoint = _check_mountpoint(ns.mountpoint)
    if ns.mount8_ns:
        log.warning("ignoring -N %s: qedfuse mounts in its own mount namespace", ns.mount8_ns)
    systemd = bool(ns.systemd)
    pidfile = ns.pidfile or opts.pidfile
    return MountConfig(
        image_path=image,
        mountpoint=mountpoint,
        options=opts,
        foreground=bool(ns.foreground) or systemd,
        systemd=systemd,
        debug=bool(ns.debug) or opts.debug,
        debug_fuse=bool(ns.debug_fuse),
        pidfile=os.path.abspath(pidfile) if pidfile else None,
        overlay_base=overlay_base,
    )


def _setup_logging(cfg: MountConfig, *, detached: bool, fallback_file: str | None = None) -> None:
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


def _fallback_log_file(state: _State, cfg: MountConfig) -> str | None:
    """Where a detached daemon logs when there is no syslog socket: by its registry record."""
    if state.registry_path is None:
        return None
    stem = os.path.splitext(os.path.basename(cfg.image_path))[0] or "image"
    return os.path.join(os.path.dirname(state.registry_path), f"{stem}.log")


def mount_main(ns: argparse.Namespace) -> int:
    """Run ``qedfuse mount``; returns the exit status."""
    try:
        cfg = _build_config(ns)
    except OptionError as exc:
        print(f"qedfuse: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except MountError as exc:
        print(f"qedfuse: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if cfg.foreground:
        try:
            _setup_logging(cfg, detached=False)
        except OSError as exc:
            print(f"qedfuse: cannot open log file: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        return _run_daemon(cfg, _Reporter(cfg, None))
    return _fork_and_wait(cfg)


def _fork_and_wait(cfg: MountConfig) -> int:
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
                _setup_logging(cfg, detached=False)
            except OSError as exc:
                _Reporter(cfg, write_fd).fail(f"cannot open log file: {exc}")
            else:
                code = _run_daemon(cfg, _Reporter(cfg, write_fd))
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
        print("qedfuse: interrupted (nothing is mounted)", file=sys.stderr)
        return EXIT_INTERRUPTED
    if message == "ok" or message.startswith("ok "):
        where = message[3:].strip()
        if where:
            print(f"qedfuse: the daemon (pid {pid}) logs to {where}", file=sys.stderr)
        return EXIT_OK
    _, status = os.waitpid(pid, 0)
    if message.startswith("error:"):
        print(f"qedfuse: {message[6:].strip()}", file=sys.stderr)
    else:
        print(
            f"qedfuse: the mount daemon exited before the mount was ready "
            f"({_describe_status(status)})",
            file=sys.stderr,
        )
    _detach_leftover(cfg.mountpoint)
    return EXIT_FAILURE


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def _detach_leftover(mountpoint: str) -> None:
    """Belt and braces: a failed start must leave nothing mounted."""
    entry = mount_entry(mountpoint)
    if entry is not None and entry.fstype == _FSTYPE:
        with contextlib.suppress(MountError):
            _fusermount(["-uz", mountpoint])


class _Reporter:
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
        line = " ".join(message.splitlines())
        if self.fd is None:
            print(f"qedfuse: {line}", file=sys.stderr)
            self.done = True
        else:
            self._send(f"error: {line}\n")


def _detach_stdio(cfg: MountConfig) -> None:
    """Point stdin/stdout/stderr at /dev/null (stderr at the log file if there is one)."""
    null = os.open(os.devnull, os.O_RDWR)
    err = null
    if cfg.options.log_file is not None:
        with contextlib.suppress(OSError):
            err = os.open(cfg.options.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(err, 2)
    if err != null:
        os.close(err)
    os.close(null)


# ---------------------------------------------------------------------------- the daemon


@dataclass
class _State:
    """What the signal watcher needs to know about the daemon's progress."""

    startup_scope: trio.CancelScope | None = None  # while starting
    mounted: bool = False
    served: bool = False  # readiness was reported
    n_signals: int = 0
    signal_name: str | None = None
    interrupted: bool = False
    pending: list[str] = field(default_factory=list)
    #: major:minor of our FUSE mount (from mountinfo after init: never stat our own mount).
    mount_device: str | None = None
    registry_path: str | None = None
    #: The request loop's statistics() (set once the FUSE operations exist).
    request_statistics: Callable[[], StatsRecord] | None = None


class _StartupError(Exception):
    """Start-up failed before the mount served; the message is the one line to show."""


def _run_daemon(cfg: MountConfig, reporter: _Reporter) -> int:
    try:
        return trio.run(_serve, cfg, reporter)
    except _StartupError as exc:
        reporter.fail(str(exc))
        return EXIT_FAILURE
    except Exception as exc:  # the daemon must explain any death
        log.critical("qedfuse daemon failed", exc_info=exc)
        reporter.fail(f"internal error: {type(exc).__name__}: {exc}")
        return EXIT_FAILURE


async def _serve(cfg: MountConfig, reporter: _Reporter) -> int:
    state = _State()
    code = EXIT_FAILURE
    failure: _StartupError | None = None
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, signals, state)
            try:
                code = await _serve_mount(cfg, reporter, state)
            except _StartupError as exc:
                failure = exc
            finally:
                nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return code


async def _watch_signals(signals: AsyncIterator[int], state: _State) -> None:
    from qedfuse.fs import fuse_terminate

    async for signum in signals:
        state.n_signals += 1
        name = signal.Signals(signum).name
        if state.n_signals > 1:
            log.error(
                "%s during shutdown: exiting without finishing the flush; NEED_CHECK stays set "
                "(the next read-write open repairs the image)",
                name,
            )
            os._exit(EXIT_FAILURE)
        state.signal_name = name
        if state.mounted:
            log.info("%s: unmounting", name)
            fuse_terminate()
        else:
            state.interrupted = True
            if state.startup_scope is not None:
                state.startup_scope.cancel()


async def _serve_mount(cfg: MountConfig, reporter: _Reporter, state: _State) -> int:
    from qedfuse.fs import QedFS, fuse_init, raw_file_name

    created_overlay = False
    image: QedImage | None = None
    try:
        with trio.CancelScope() as startup:
            state.startup_scope = startup
            if cfg.overlay_base is not None:
                await _create_overlay(cfg.image_path, cfg.overlay_base)
                created_overlay = True
            image = await _open_image(cfg)
        state.startup_scope = None
        if image is None or startup.cancelled_caught:
            raise _StartupError(f"interrupted by {state.signal_name} before the mount was ready")
        opts = cfg.options
        ops = QedFS(
            image,
            file_name=raw_file_name(cfg.image_path),
            image_path=cfg.image_path,
            read_only=opts.read_only,
            uid=opts.uid,
            gid=opts.gid,
            umask=opts.umask,
            cache=opts.cache,
            writeback_cache=opts.writeback_cache,
        )
        fuse_options = opts.fuse_options(cfg.image_path, debug_fuse=cfg.debug_fuse)
        log.debug("mounting %s with %s", cfg.mountpoint, sorted(fuse_options))
        try:
            fuse_init(ops, cfg.mountpoint, fuse_options)
        except RuntimeError as exc:
            raise _StartupError(
                f"cannot mount {cfg.mountpoint}: {exc} (libfuse's reason, if any, is above)"
            ) from None
        entry = _own_mount(cfg)
        if entry is not None:
            state.mount_device = entry.device
            state.registry_path = _register(entry.device, entry.mountpoint, cfg.image_path)
        state.request_statistics = ops.statistics
    except _StartupError:
        await _abandon(image, created_overlay, cfg.image_path)
        raise
    except (QedError, OSError) as exc:
        await _abandon(image, created_overlay, cfg.image_path)
        message = _one_line(_with_read_only_hint(exc, cfg))
        if cfg.image_path not in message:
            message = f"Could not open '{cfg.image_path}': {message}"
        raise _StartupError(message) from None
    except BaseException:
        await _abandon(image, created_overlay, cfg.image_path)
        raise
    return await _serve_mounted(cfg, reporter, state, image)


async def _serve_mounted(
    cfg: MountConfig, reporter: _Reporter, state: _State, image: QedImage
) -> int:
    from qedfuse import control, logsetup, sdnotify
    from qedfuse.fs import fuse_close, fuse_main, fuse_terminate

    state.mounted = True
    code = EXIT_OK
    failure: str | None = None
    logsetup.set_subject(cfg.image_path)  # every warning and error names the image
    try:
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(image.run_idle_flusher, cfg.options.flush_delay)
                if state.registry_path is not None and state.request_statistics is not None:
                    view = control.DaemonView(
                        image=image,
                        image_path=cfg.image_path,
                        mountpoint=cfg.mountpoint,
                        options=_option_words(cfg.options),
                        requests=state.request_statistics,
                        started_at=time.time(),
                    )
                    path = control.socket_path(state.registry_path)
                    await nursery.start(control.serve_or_warn, path, view)
                if cfg.pidfile is not None:
                    _write_pidfile(cfg.pidfile)
                if not cfg.foreground:
                    _detach_stdio(cfg)
                    _setup_logging(cfg, detached=True, fallback_file=_fallback_log_file(state, cfg))
                log.info("serving %s at %s (pid %d)", cfg.image_path, cfg.mountpoint, os.getpid())
                reporter.ready(logsetup.destination() if not cfg.foreground else "")
                state.served = True
                if state.signal_name is not None:  # a signal raced the start-up
                    fuse_terminate()
                await fuse_main()
                nursery.cancel_scope.cancel()
        finally:
            if cfg.systemd:
                sdnotify.stopping()
            with contextlib.suppress(Exception):
                fuse_close(unmount=True)
            _detach_if_still_mounted(cfg.mountpoint, state.mount_device)
            if state.served:
                log.info("unmounted %s; flushing the image", cfg.mountpoint)
    except BaseException as exc:  # start-up or main() failed: still flush the image below
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        inner = _single(exc)
        if isinstance(inner, _StartupError):
            failure = str(inner)
        else:
            log.critical("FUSE loop failed", exc_info=exc)
            failure = f"internal error: {type(inner).__name__}: {inner}"
        code = EXIT_FAILURE
    finally:
        with trio.CancelScope(shield=True):
            code = max(code, await _close_image(image, quiet=not state.served))
            if cfg.pidfile is not None:
                _remove_pidfile(cfg.pidfile)
            _unregister(state.registry_path)  # only now: `umount --wait` waits for the flush
    if not reporter.done:
        reporter.fail(failure or "the mount ended before it was ready")
    return code


def _option_words(opts: MountOptions) -> list[str]:
    """The mount's effective options, as ``-o`` words (for ``qedfuse status``)."""
    words = ["ro" if opts.read_only else "rw", f"cache={opts.cache.value}"]
    words.append(f"detect_zeroes={'on' if opts.detect_zeroes else 'off'}")
    words.append(f"flush_delay={opts.flush_delay:g}")
    words += [f"uid={opts.uid}"] if opts.uid is not None else []
    words += [f"gid={opts.gid}"] if opts.gid is not None else []
    words.append(f"umask={opts.umask:03o}")
    for flag, word in ((opts.writeback_cache, "writeback_cache"), (opts.untrusted, "untrusted")):
        if flag:
            words.append(word)
    if opts.backing is not None:
        words.append(f"backing={opts.backing}")
    if opts.log_file is not None:
        words.append(f"log={opts.log_file}")
    return words + list(opts.fuse)


def _single(exc: BaseException) -> BaseException:
    """The one exception inside (nested) single-member exception groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


async def _close_image(image: QedImage, *, quiet: bool = False) -> int:
    try:
        await image.close()
    except (QedError, OSError) as exc:
        log.error("could not flush the image: %s; NEED_CHECK stays set", _one_line(exc))
        return EXIT_FAILURE
    if image.failsafe and not image.read_only:
        log.error(
            "the image was in failsafe mode (%s); it was not flushed; NEED_CHECK is set, so "
            "the next read-write open repairs it (or run `qedfuse check -r all`)",
            image.failsafe_reason,
        )
        return EXIT_FAILURE
    if not quiet:
        log.info("image flushed and closed cleanly")
    return EXIT_OK


async def _abandon(image: QedImage | None, created_overlay: bool, path: str) -> None:
    """Undo a failed start-up: close the image, delete an overlay we just created."""
    with trio.CancelScope(shield=True):
        if image is not None:
            with contextlib.suppress(Exception):
                await image.close()
        if created_overlay:
            with contextlib.suppress(OSError):
                os.unlink(path)


#: What a read-write mount refused by a lock or by permissions suggests (when it would work).
READ_ONLY_HINT = "Mount it with -o ro to share it read-only."


def _with_read_only_hint(exc: Exception, cfg: MountConfig) -> Exception:
    """Suggest ``-o ro`` where it helps: a reader's lock on the image, or no write access."""
    from qedfuse.errors import BackingFileError, LockError
    from qedfuse.locking import LockMode, with_hint

    if cfg.options.read_only or cfg.overlay_base is not None:
        return exc
    if isinstance(exc, LockError):
        return with_hint(exc, LockMode.READ_ONLY, READ_ONLY_HINT)
    cause = exc if isinstance(exc, OSError) else exc.__cause__
    refused = isinstance(cause, OSError) and cause.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
    if refused and not isinstance(exc, BackingFileError):
        return QedError(f"{_one_line(exc)}. Mount it with -o ro to open it read-only.")
    return exc


async def _open_image(cfg: MountConfig) -> QedImage:
    from qedfuse.backing import BackingPolicy, open_path
    from qedfuse.engine import OpenOptions

    opts = cfg.options
    return await open_path(
        cfg.image_path,
        read_only=opts.read_only,
        options=OpenOptions(detect_zeroes=opts.detect_zeroes),
        policy=BackingPolicy(allow=not opts.untrusted, override=opts.backing),
        lock=True,
    )


def overlay_backing_name(new_path: str, base_path: str) -> str:
    """The backing name stored in an overlay: ``base_path`` relative to the overlay's directory."""
    name = os.path.relpath(base_path, os.path.dirname(new_path))
    if ":" in name.split("/", 1)[0]:
        name = "./" + name  # a relative name must never look like a protocol prefix
    if len(os.fsencode(name)) > fmt.MAX_BACKING_NAME_SIZE:
        # Too long to store (QEMU reads at most 4095 bytes): the absolute path may be shorter;
        # if it is not either, creating the overlay refuses it with a one-line error.
        absolute = os.path.abspath(base_path)
        if len(os.fsencode(absolute)) < len(os.fsencode(name)):
            return absolute
    return name


async def _create_overlay(new_path: str, base_path: str) -> None:
    """Create ``new_path`` (must not exist) as an empty QED overlay of ``base_path``."""
    from qedfuse.imagefile import FileImage
    from qedfuse.tables import create_image, read_header

    try:
        base = FileImage.open(base_path, read_only=True)
    except OSError as exc:
        raise _StartupError(f"Could not open '{base_path}': {exc.strerror}") from None
    try:
        detected = fmt.probe_format(await base.pread(0, 8))
        if detected == "qed":
            header, _, _ = await read_header(base)
            size, raw = header.image_size, False
        elif detected == "raw":
            size = -(-(await base.size()) // fmt.SECTOR_SIZE) * fmt.SECTOR_SIZE
            raw = True
        else:
            raise _StartupError(
                f"{base_path} is a {detected} image; an overlay base must be raw or QED"
            )
    finally:
        await base.aclose()
    if size == 0:
        raise _StartupError(f"{base_path} is empty; nothing to overlay")
    name = overlay_backing_name(new_path, base_path)
    try:
        fd = os.open(new_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        raise _StartupError(
            f"overlay {new_path} already exists; refusing to overwrite it"
        ) from None
    except OSError as exc:
        raise _StartupError(f"cannot create overlay {new_path}: {exc.strerror}") from None
    file = FileImage(fd, read_only=False)
    try:
        await create_image(file, size, backing_name=os.fsencode(name), backing_raw=raw)
    except BaseException:
        await file.aclose()
        with contextlib.suppress(OSError):
            os.unlink(new_path)
        raise
    await file.aclose()
    log.info("created overlay %s on %s (%s, %d bytes)", new_path, base_path, name, size)


def _write_pidfile(path: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="ascii") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise _StartupError(f"cannot write pidfile {path}: {exc.strerror}") from None


def _remove_pidfile(path: str) -> None:
    try:
        with open(path, encoding="ascii") as f:
            if f.read().strip() != str(os.getpid()):
                return
        os.unlink(path)
    except OSError:
        pass


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.splitlines())


def _detach_if_still_mounted(mountpoint: str, device: str | None) -> None:
    """After an aborted connection libfuse cannot unmount: detach our dead mount ourselves."""
    entry = mount_entry(mountpoint)
    if device is None or entry is None or entry.device != device:
        return
    try:
        cp = _fusermount(["-u", "-z", mountpoint])
    except MountError as exc:
        log.error("%s is still mounted but dead: %s", mountpoint, exc)
        return
    if cp.returncode == 0:
        log.warning("the FUSE connection was aborted; detached the dead mount %s", mountpoint)
    else:
        log.error("could not detach the dead mount %s: %s", mountpoint, cp.stderr.strip())


# ---------------------------------------------------------------------------- registry
# The daemon's pid is published in a small file keyed by the mount's device number, not as an
# xattr: answering getxattr at all makes the kernel ask for security.capability before every
# WRITE (one extra round trip per write); replying ENOSYS once turns that off.  The file also
# carries the daemon's pid in its name and lives until the daemon exits, after the unmount and
# the final flush: `umount --wait` after a plain `umount` still finds the daemon, and a new
# mount that gets the same device number meanwhile has a record of its own.


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


def _register(device: str, mountpoint: str, image: str) -> str | None:
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


def _unregister(path: str | None) -> None:
    if path is not None:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _live_daemons() -> list[Daemon]:
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
    if entry.fstype != _FSTYPE:
        return None
    mounted_by = _fuse_owners().get(entry.device)
    matching = [
        d
        for d in _live_daemons()
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


def _is_stopped(pid: int) -> bool:
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
    return {device: uid for device, uid in _fuse_owners().items() if uid != mine}


def _fuse_owners() -> dict[str, int]:
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
        if entry.fstype != _FSTYPE:
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


# ---------------------------------------------------------------------------- umount


def _fusermount(
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
    from qedfuse import format as fmt

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
    try:
        return _umount(ns)
    except MountError as exc:
        print(f"qedfuse: {exc}", file=sys.stderr)
        return EXIT_FAILURE


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
    flushing = [d for d in _live_daemons() if d.mountpoint == mountpoint and d != serving]
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
    if entry.fstype != _FSTYPE:
        raise MountError(f"{mountpoint} is not a qedfuse mount (it is {entry.fstype})")
    if serving is None:
        # No live daemon is registered: dead (SIGKILL), or unknown.  Ask the kernel, bounded.
        answer = _probe("listdir", mountpoint, left(PROBE_TIMEOUT_S))
        if answer is not None and answer[0] in (errno.ENOTCONN, errno.ECONNABORTED):
            return _detach_stale(mountpoint, entry, left())
        if answer is None and not ns.lazy:
            raise MountError(
                f"{mountpoint} does not answer and no running qedfuse daemon is registered for "
                f"it; detach it with `qedfuse umount --lazy {mountpoint}` (or `umount -l "
                f"{mountpoint}`)"
            )
    stopped = serving is not None and _is_stopped(serving.pid)
    cp = _fusermount(["-uz" if ns.lazy else "-u", mountpoint], left())
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
            print(
                f"qedfuse: unmounted {mountpoint}, but its daemon (pid {serving.pid}) is "
                f"stopped; {_resume_hint(serving.pid)}",
                file=sys.stderr,
            )
        return EXIT_OK
    if serving is None:
        print(
            f"qedfuse: cannot tell which process serves {mountpoint}; not waiting",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    return _wait_for([serving, *flushing], deadline, ns.timeout)


def _detach_stale(mountpoint: str, entry: MountEntry, timeout: float) -> int:
    cp = _fusermount(["-uz", mountpoint], timeout)
    if cp.returncode != 0:
        raise MountError(
            f"{mountpoint} is a stale mount and fusermount3 -uz failed: {cp.stderr.strip()}"
        )
    print(
        f"qedfuse: {mountpoint} was a stale mount (its daemon had died); detached it. "
        f"The image may have NEED_CHECK set: its next read-write open repairs it, or "
        f"run `qedfuse check -r all {entry.source}`",
        file=sys.stderr,
    )
    return EXIT_OK


def _wait_for(daemons: list[Daemon], deadline: float, timeout: float) -> int:
    """Wait until every one of ``daemons`` has exited, then report NEED_CHECK left set."""
    delay = 0.01
    while alive := [d for d in daemons if d.alive()]:
        now = time.monotonic()
        if now >= deadline:
            pid = alive[0].pid
            if _is_stopped(pid):
                message = (
                    f"the daemon (pid {pid}) is stopped (SIGSTOP or Ctrl-Z) and was still "
                    f"running after {timeout:g} s; {_resume_hint(pid)}"
                )
            else:
                message = (
                    f"the daemon (pid {pid}) is still running after {timeout:g} s (still "
                    "flushing, or held open after --lazy); not waiting any longer"
                )
            print(f"qedfuse: {message}", file=sys.stderr)
            return EXIT_FAILURE
        time.sleep(min(delay, deadline - now))
        delay = min(delay * 2, 0.2)
    for daemon in daemons:
        if daemon.image and _image_needs_check(daemon.image):
            print(
                f"qedfuse: the daemon exited but left NEED_CHECK set on {daemon.image}; its "
                f"next read-write open repairs it (or run `qedfuse check -r all {daemon.image}`)",
                file=sys.stderr,
            )
            return EXIT_FAILURE
    return EXIT_OK


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
        return f"{'stopped' if _is_stopped(daemon.pid) else 'serving'} {daemon.pid}", target.path
    if not entry.is_fuse:
        return f"other {entry.fstype}", target.path
    answer = _probe("listdir", target.path, PROBE_TIMEOUT_S)
    if answer is None:
        return "unanswering", target.path
    if answer[0] in (errno.ENOTCONN, errno.ECONNABORTED):
        return "stale", target.path
    return ("serving ?" if entry.fstype == _FSTYPE else f"other {entry.fstype}"), target.path


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m qedfuse.mount mount|umount|state …``).

    ``state MOUNTPOINT`` prints :func:`mount_state`'s two lines (``make run`` uses it).
    """
    parser = argparse.ArgumentParser(prog="qedfuse")
    sub = parser.add_subparsers(dest="command", required=True)
    configure_mount_parser(sub.add_parser("mount"))
    configure_umount_parser(sub.add_parser("umount"))
    sub.add_parser("state").add_argument("mountpoint")
    ns = parser.parse_args(argv)
    if ns.command == "state":
        try:
            state, physical = mount_state(ns.mountpoint)
        except MountError as exc:
            print(f"qedfuse: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        print(f"{state}\n{physical}")
        return EXIT_OK
    handler: Callable[[argparse.Namespace], int] = (
        mount_main if ns.command == "mount" else umount_main
    )
    return handler(ns)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
