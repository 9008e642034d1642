"""``qedfuse mount``: the command line, the mount's configuration, and its start.

The parent parses ``-o`` and checks the mount point (resolved to its physical path by
:func:`qedfuse.mounttable.resolve_path`, an existing directory, not already a mount point per
mountinfo), then builds a :class:`MountConfig`.  Without ``-f`` it forks and waits
(:mod:`qedfuse.daemonize`); the daemon itself is :mod:`qedfuse.serve`.  ``-f`` runs the same
steps in the foreground process; ``--systemd`` implies ``-f``.  A bad option or mount point
raises a :class:`~qedfuse.errors.UserError` that ``cli`` prints as one line.

The other mount modules, each with one job: :mod:`qedfuse.mounttable` (mountinfo, path
resolution that never hangs), :mod:`qedfuse.registry` (which daemon serves which mount),
:mod:`qedfuse.umount` (``qedfuse umount``), :mod:`qedfuse.daemonize` and :mod:`qedfuse.serve`.
Opening the image and creating an ``--overlay`` are the composition root's,
:mod:`qedfuse.opening`.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import trio

from qedfuse.daemonize import Reporter, fork_and_wait, setup_daemon_logging
from qedfuse.errors import EXIT_OK, QedError, UserError, say
from qedfuse.logsetup import open_log_file
from qedfuse.mounttable import FSTYPE, PROBE_TIMEOUT_S, MountError, direct, probe, resolve_path
from qedfuse.options import MountOptions, parse_options, timeout_arg
from qedfuse.registry import daemon_for, is_stopped, mount_state
from qedfuse.serve import run_daemon
from qedfuse.umount import umount_main

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

#: How long ``umount --wait`` waits for the daemon by default (a large flush takes a while).
DEFAULT_UMOUNT_TIMEOUT = 120.0
_FD_MOUNTPOINT = re.compile(r"/dev/fd/[0-9]+")


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
        "nosuid, dev, suid, auto_unmount; fstab/mount(8)-only options (defaults, nofail, "
        "_netdev, x-*, …) are ignored.  -f means foreground here, also when run by mount(8)."
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
    p.add_argument(
        "mountpoint",
        metavar="MOUNTPOINT",
        help="an existing directory (what it holds is hidden while mounted)",
    )


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
        type=timeout_arg,
        default=DEFAULT_UMOUNT_TIMEOUT,
        metavar="S",
        help=f"give up waiting after S seconds (default {DEFAULT_UMOUNT_TIMEOUT:g}), exit 1",
    )
    p.add_argument("mountpoint", metavar="MOUNTPOINT")


def _check_mountpoint(mountpoint: str) -> str:
    """The physical path of ``mountpoint`` if a new mount may go there; else MountError."""
    target = resolve_path(mountpoint)
    entry = target.mount
    path = target.path
    if entry is not None:
        what = f"{entry.fstype} {entry.source}"
        daemon = daemon_for(entry) if entry.fstype == FSTYPE else None
        if daemon is not None:
            if is_stopped(daemon.pid):
                raise MountError(
                    f"{path} is already mounted ({what}) by a stopped daemon (pid "
                    f"{daemon.pid}); resume it with `kill -CONT {daemon.pid}`, or detach it "
                    f"with `qedfuse umount --lazy {path}`"
                )
            raise MountError(f"{path} is already mounted ({what}) by daemon pid {daemon.pid}")
        if entry.is_fuse:
            answer = probe("listdir", path, PROBE_TIMEOUT_S)  # stat may answer from a cache
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
        answer = probe("stat", path, PROBE_TIMEOUT_S)
    else:
        answer = direct("stat", path)
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
    _check_own_files(
        image,
        overlay_base,
        [os.path.abspath(ns.mountpoint), mountpoint],
        {"log file": opts.log_file, "pidfile": os.path.abspath(pidfile) if pidfile else None},
    )
    if opts.log_file is not None:
        # Checked here, in the caller, so that a FIFO or a directory is a one-line error
        # and never a daemon stuck in open(); the daemon opens it the same way again.
        try:
            os.close(open_log_file(opts.log_file))
        except OSError as exc:
            raise UserError(f"cannot open log file: {exc.strerror or exc}") from None
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


#: A pidfile qedfuse may replace holds a pid: a few digits and a newline.
_PIDFILE_MAX_BYTES = 32


def _check_own_files(
    image: str, overlay_base: str | None, mountpoints: list[str], files: dict[str, str | None]
) -> None:
    """The daemon's own files (log, pidfile) are never an image it serves, a file of its
    backing chain, or a path inside its own mount point (opening that from the daemon would
    wait on the daemon itself); an existing pidfile must look like one (it is replaced)."""
    served: set[tuple[int, int]] | None = None  # read only when a given file exists
    overlay = resolve_path(image).path if overlay_base is not None else None
    for what, path in files.items():
        if path is None:
            continue
        # Symlinks anywhere in the path resolved (without a syscall into a hung mount), so
        # that a link into the mount point or onto the overlay is seen for what it is.
        real = resolve_path(path).path
        if any(_within(p, mnt) for p in (path, real) for mnt in mountpoints):
            raise MountError(f"the {what} {path} is inside the mount point; put it elsewhere")
        if overlay is not None and real == overlay:
            raise MountError(f"the {what} {path} is the overlay to create")
        try:
            st = os.stat(real)
        except OSError:
            continue  # created by the daemon (a missing directory is its one-line error)
        if served is None:
            served = _served_identities(overlay_base or image)
        if (st.st_dev, st.st_ino) in served:
            raise MountError(f"the {what} {path} is the image or one of its backing files")
        if what == "pidfile" and not _is_pidfile(real, st):
            raise MountError(
                f"the pidfile {path} exists and is not a pidfile; refusing to replace it"
            )


def _within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _is_pidfile(path: str, st: os.stat_result) -> bool:
    """A regular file holding a pid and a newline, as the daemon writes it."""
    if not stat.S_ISREG(st.st_mode) or not 0 < st.st_size <= _PIDFILE_MAX_BYTES:
        return False
    try:
        with open(path, "rb") as f:
            return re.fullmatch(rb"[0-9]+\n?", f.read(_PIDFILE_MAX_BYTES + 1)) is not None
    except OSError:
        return False


def _served_identities(image: str) -> set[tuple[int, int]]:
    """(st_dev, st_ino) of the image and of every backing file it names that can be found."""
    from qedfuse.opening import backing_chain

    paths = [image]
    with contextlib.suppress(QedError, OSError):
        paths = [path for path, _ in trio.run(backing_chain, image)]
    out: set[tuple[int, int]] = set()
    for path in paths:
        with contextlib.suppress(OSError):
            st = os.stat(path)
            out.add((st.st_dev, st.st_ino))
    return out


def mount_main(ns: argparse.Namespace) -> int:
    """Run ``qedfuse mount``; returns the exit status (a bad option or mount point raises a
    :class:`~qedfuse.errors.UserError`: ``cli`` prints it)."""
    cfg = _build_config(ns)
    if cfg.foreground:
        try:
            setup_daemon_logging(cfg, detached=False)
        except OSError as exc:
            raise UserError(f"cannot open log file: {exc}") from None
        return run_daemon(cfg, Reporter(cfg, None))
    return fork_and_wait(cfg, run_daemon)


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
    try:
        if ns.command == "state":
            state, physical = mount_state(ns.mountpoint)
            print(f"{state}\n{physical}")
            return EXIT_OK
        handler: Callable[[argparse.Namespace], int] = (
            mount_main if ns.command == "mount" else umount_main
        )
        return handler(ns)
    except UserError as exc:  # what cli._guarded_main does for the qedfuse command
        say(exc)
        return exc.exit_code


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
