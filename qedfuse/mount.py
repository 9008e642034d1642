"""``qedfuse mount`` and ``qedfuse umount``: the mount's lifecycle.

Mount
-----
The parent parses ``-o`` and checks the mount point (absolute, an existing directory, not
already a mount point).  Without ``-f`` it then forks *before* any ``trio.run`` (forking a
running trio loop is unsupported) and waits on a pipe; the child calls ``setsid()`` and runs
:func:`_serve` in ``trio.run``:

1. create the ``--overlay`` image if asked, open the image and its backing chain (taking
   QEMU's lock bytes), ``pyfuse3.init()`` (the mount now exists);
2. start the signal watcher and the engine's idle flusher, write the pidfile, point stdio at
   ``/dev/null`` (or the ``log=`` file), write ``ok`` to the pipe (and ``READY=1`` under
   ``--systemd``), then serve with ``pyfuse3.main()``.

The parent exits 0 on ``ok``; on anything else it prints the child's one-line error, waits for
the child (which unmounts whatever it mounted) and exits 1.  ``-f`` runs the same steps in
the foreground process; ``--systemd`` implies ``-f``.

Shutdown: SIGTERM, SIGINT and SIGHUP call ``pyfuse3.terminate()``; an external ``umount`` or
``fusermount3 -u`` ends ``pyfuse3.main()`` by itself.  Either way in-flight requests finish,
then the mount is removed (``pyfuse3.close(unmount=True)``), the image gets its ordered flush
(NEED_CHECK cleared) and is closed (locks released), the pidfile is removed and the daemon
exits 0.  If the image cannot be flushed (failsafe) it exits 1 and NEED_CHECK stays set.  A
second signal during that flush exits 1 at once, leaving NEED_CHECK set (the next read-write
open repairs).

Umount
------
``qedfuse umount`` reads the daemon's pid from the ``user.qedfuse.pid`` xattr on the mount
root, runs ``fusermount3 -u`` (``-uz`` with ``--lazy``) and with ``--wait`` polls until that
process is gone, then reports whether the image was left clean.  A busy mount point names its
holders; a dead (ENOTCONN) mount is detached with ``fusermount3 -uz``.
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
import shutil
import signal
import stat
import subprocess
import sys
import time
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from qedfuse.errors import QedError
from qedfuse.options import MountOptions, OptionError, parse_options

if TYPE_CHECKING:
    from qedfuse.engine import QedImage

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
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


@dataclass(frozen=True, slots=True)
class MountEntry:
    """One line of ``/proc/self/mountinfo``."""

    mountpoint: str
    fstype: str
    source: str
    device: str  # major:minor


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
                if len(fields) >= 5 and len(rest) >= 2:
                    entries.append(
                        MountEntry(_unescape(fields[4]), rest[0], _unescape(rest[1]), fields[2])
                    )
    except OSError:
        pass
    return entries


def mount_entry(path: str) -> MountEntry | None:
    """The topmost mount at ``path`` (absolute), or None."""
    found = [entry for entry in mount_entries() if entry.mountpoint == path]
    return found[-1] if found else None


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
        and find_daemon(e.mountpoint) is None
    ]
    return candidates[0] if len(candidates) == 1 else None


def _check_mountpoint(mountpoint: str) -> None:
    entry = mount_entry(mountpoint)
    if entry is not None:
        try:
            os.listdir(mountpoint)  # stat could answer from cached attributes
        except OSError as exc:
            if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):
                raise MountError(
                    f"{mountpoint} is a stale mount (its daemon is gone); clean it up with: "
                    f"qedfuse umount {mountpoint}"
                ) from None
        raise MountError(f"{mountpoint} is already mounted ({entry.fstype} {entry.source})")
    try:
        os.stat(mountpoint)
    except FileNotFoundError:
        raise MountError(f"mount point {mountpoint} does not exist") from None
    except OSError as exc:
        raise MountError(f"mount point {mountpoint}: {exc.strerror}") from None
    if not os.path.isdir(mountpoint):
        raise MountError(f"mount point {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise MountError(f"{mountpoint} is already a mount point")


# ---------------------------------------------------------------------------- mount_main


def _build_config(ns: argparse.Namespace) -> MountConfig:
    opts = parse_options(ns.options)
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
        mountpoint = os.path.abspath(ns.mountpoint)
        _check_mountpoint(mountpoint)
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


def _setup_logging(cfg: MountConfig, *, detached: bool) -> None:
    from qedfuse.logsetup import setup_logging

    level = None
    if not cfg.debug and not cfg.foreground and cfg.options.log_file is None and not detached:
        level = logging.WARNING  # a daemonizing `mount` prints nothing but problems
    setup_logging(
        cfg.debug, log_file=cfg.options.log_file, systemd=cfg.systemd, level=level, syslog=detached
    )


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
    with os.fdopen(read_fd, "rb") as pipe:
        while True:
            try:
                chunk = pipe.read(4096)
            except KeyboardInterrupt:  # Ctrl-C reaches only us: the daemon has its own session
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGTERM)
                continue
            if not chunk:
                break
            chunks.append(chunk)
    message = b"".join(chunks).decode("utf-8", "replace").strip()
    if message == "ok":
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

    def ready(self) -> None:
        if self.cfg.systemd:
            from qedfuse import sdnotify

            sdnotify.ready(f"serving {self.cfg.image_path} at {self.cfg.mountpoint}")
        self._send("ok\n")

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
    except _StartupError:
        await _abandon(image, created_overlay, cfg.image_path)
        raise
    except (QedError, OSError) as exc:
        await _abandon(image, created_overlay, cfg.image_path)
        message = _one_line(exc)
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
    from qedfuse import sdnotify
    from qedfuse.fs import fuse_close, fuse_main, fuse_terminate

    state.mounted = True
    code = EXIT_OK
    failure: str | None = None
    try:
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(image.run_idle_flusher, cfg.options.flush_delay)
                if cfg.pidfile is not None:
                    _write_pidfile(cfg.pidfile)
                if not cfg.foreground:
                    _detach_stdio(cfg)
                    _setup_logging(cfg, detached=True)
                log.info("serving %s at %s (pid %d)", cfg.image_path, cfg.mountpoint, os.getpid())
                reporter.ready()
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
            _unregister(state.registry_path)
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
    if not reporter.done:
        reporter.fail(failure or "the mount ended before it was ready")
    return code


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
    return name


async def _create_overlay(new_path: str, base_path: str) -> None:
    """Create ``new_path`` (must not exist) as an empty QED overlay of ``base_path``."""
    from qedfuse import format as fmt
    from qedfuse.engine import create_image, read_header
    from qedfuse.imagefile import FileImage

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
# WRITE (one extra round trip per write); replying ENOSYS once turns that off.


def _registry_dirs() -> list[str]:
    """Where registry files live: ours first, then others root may need to look at."""
    if os.geteuid() == 0:
        dirs = ["/run/qedfuse"]
        dirs += sorted(glob.glob("/run/user/*/qedfuse")) + sorted(glob.glob("/tmp/qedfuse-*"))
        return dirs
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    own = os.path.join(runtime, "qedfuse") if runtime else f"/tmp/qedfuse-{os.getuid()}"
    return [own, "/run/qedfuse"]


def _registry_file(directory: str, device: str) -> str:
    return os.path.join(directory, f"mount-{device.replace(':', '-')}.json")


def _register(device: str, mountpoint: str, image: str) -> str | None:
    """Record this daemon (pid, start time, mountpoint, image) for ``qedfuse umount``."""
    directory = _registry_dirs()[0]
    record = {
        "pid": os.getpid(),
        "start": _proc_start_time(os.getpid()),
        "mountpoint": mountpoint,
        "image": image,
    }
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        st = os.lstat(directory)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise OSError(errno.EPERM, f"{directory} is not a directory owned by us")
        _prune_registry(directory)
        path = _registry_file(directory, device)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot record the daemon for `qedfuse umount --wait`: %s", exc)
        return None
    return path


def _read_record(path: str) -> tuple[int, dict[str, object]] | None:
    """(pid, record) of a registry file whose daemon is still alive, else None."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        pid = int(record["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    start = _proc_start_time(pid)
    return (pid, record) if start is not None and start == record.get("start") else None


def _prune_registry(directory: str) -> None:
    """Drop records of daemons that died without cleaning up (SIGKILL)."""
    for path in glob.glob(os.path.join(directory, "mount-*.json")):
        if _read_record(path) is None:
            with contextlib.suppress(OSError):
                os.unlink(path)


def _unregister(path: str | None) -> None:
    if path is not None:
        with contextlib.suppress(OSError):
            os.unlink(path)


def find_daemon(mountpoint: str) -> tuple[int, str] | None:
    """(pid, image) of the live daemon serving ``mountpoint``, or None."""
    mountpoint = os.path.abspath(mountpoint)
    entry = mount_entry(mountpoint)
    if entry is None or entry.fstype != _FSTYPE:
        return None
    for directory in _registry_dirs():
        found = _read_record(_registry_file(directory, entry.device))
        if found is not None and found[1].get("mountpoint") == mountpoint:
            return found[0], str(found[1].get("image", entry.source))
    return None


# ---------------------------------------------------------------------------- umount


def _fusermount(args: list[str]) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is None:
        raise MountError("fusermount3 not found (install the fuse3 package)")
    return subprocess.run([tool, *args], capture_output=True, text=True, check=False)


def _proc_start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/PID/stat), None if gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    if not fields or fields[0] in ("Z", "X"):
        return None
    return fields[19]


def _holders(mountpoint: str) -> list[str]:
    """Processes and loop devices using the mount (best effort)."""
    found: list[str] = []
    fuser = shutil.which("fuser") or next(
        (p for p in ("/usr/bin/fuser", "/bin/fuser") if os.path.exists(p)), None
    )
    if fuser is not None:
        try:
            cp = subprocess.run(
                [fuser, "-m", mountpoint], capture_output=True, text=True, timeout=10, check=False
            )
            for token in cp.stdout.split():
                pid = "".join(ch for ch in token if ch.isdigit())
                if not pid or int(pid) == os.getpid():
                    continue
                try:
                    with open(f"/proc/{pid}/comm", encoding="utf-8") as f:
                        comm = f.read().strip()
                except OSError:
                    comm = "?"
                found.append(f"pid {pid} ({comm})")
        except (OSError, subprocess.TimeoutExpired):
            pass
    prefix = mountpoint.rstrip("/") + "/"
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


def _umount(ns: argparse.Namespace) -> int:
    mountpoint = os.path.abspath(ns.mountpoint)
    entry = mount_entry(mountpoint)
    if entry is None:
        raise MountError(f"{mountpoint} is not mounted")
    if entry.fstype != _FSTYPE:
        raise MountError(f"{mountpoint} is not a qedfuse mount (it is {entry.fstype})")
    pid: int | None = None
    image: str | None = None
    try:
        os.listdir(mountpoint)  # is the daemon alive? (stat could answer from the cache)
        found = find_daemon(mountpoint)
        if found is not None:
            pid, image = found
    except OSError as exc:
        if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):
            cp = _fusermount(["-uz", mountpoint])
            if cp.returncode != 0:
                raise MountError(
                    f"{mountpoint} is a stale mount and fusermount3 -uz failed: {cp.stderr.strip()}"
                ) from None
            print(
                f"qedfuse: {mountpoint} was a stale mount (its daemon had died); detached it. "
                f"The image may have NEED_CHECK set: its next read-write open repairs it, or "
                f"run `qedfuse check -r all {entry.source}`",
                file=sys.stderr,
            )
            return EXIT_OK
        log.debug("cannot list %s: %s", mountpoint, exc)
    start_time = _proc_start_time(pid) if pid is not None else None
    cp = _fusermount(["-uz" if ns.lazy else "-u", mountpoint])
    if cp.returncode != 0:
        text = cp.stderr.strip()
        if "busy" in text.lower():
            holders = _holders(mountpoint)
            who = f" (in use by: {', '.join(holders)})" if holders else ""
            raise MountError(
                f"{mountpoint} is busy{who}; close them, or use --lazy to detach it now and "
                "let the daemon finish when the last user is done"
            )
        raise MountError(f"unmounting {mountpoint} failed: {' '.join(text.splitlines())}")
    if ns.lazy:
        log.info("lazily detached %s; the daemon ends when its last user closes it", mountpoint)
    if not ns.wait:
        return EXIT_OK
    if pid is None or start_time is None:
        print(
            f"qedfuse: cannot tell which process serves {mountpoint}; not waiting",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    deadline = time.monotonic() + ns.timeout
    delay = 0.01
    while _proc_start_time(pid) == start_time:
        if time.monotonic() >= deadline:
            print(
                f"qedfuse: the daemon (pid {pid}) is still running after {ns.timeout:g} s "
                "(still flushing, or held open after --lazy); not waiting any longer",
                file=sys.stderr,
            )
            return EXIT_FAILURE
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
    if image is not None and _image_needs_check(image):
        print(
            f"qedfuse: the daemon exited but left NEED_CHECK set on {image}; its next "
            f"read-write open repairs it (or run `qedfuse check -r all {image}`)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m qedfuse.mount mount|umount …``) for debugging."""
    parser = argparse.ArgumentParser(prog="qedfuse")
    sub = parser.add_subparsers(dest="command", required=True)
    configure_mount_parser(sub.add_parser("mount"))
    configure_umount_parser(sub.add_parser("umount"))
    ns = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = (
        mount_main if ns.command == "mount" else umount_main
    )
    return handler(ns)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
