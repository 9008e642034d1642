"""The mount's daemon: the trio serve loop, its signals, and the close or abandon at the end.

:func:`run_daemon` runs :func:`_serve` in ``trio.run`` (in the forked child, or in the
foreground with ``-f``):

1. create the ``--overlay`` image if asked, open the image and its backing chain (taking
   QEMU's lock bytes), ``fuse_init`` (the mount now exists) and register the daemon
   (:mod:`qedfuse.registry`);
2. start the signal watcher, the engine's idle flusher and the control socket
   (:mod:`qedfuse.control`, next to the registry record), write the pidfile, point stdio at
   ``/dev/null`` and logging at syslog (or the ``log=`` file; without a syslog socket, a file
   by the registry record), report ``ok`` and where it logs to (and ``READY=1`` under
   ``--systemd``), then serve with :func:`qedfuse.fuseloop.fuse_main`.

Shutdown: SIGTERM, SIGINT and SIGHUP call ``fuse_terminate()``; an external ``umount`` or
``fusermount3 -u`` ends ``fuse_main()`` by itself.  Either way in-flight requests finish,
then the mount is removed (``fuse_close(unmount=True)``), the image gets its ordered flush
(NEED_CHECK cleared) and is closed (locks released), the pidfile is removed, the registry
record last, and the daemon exits 0.  If the image cannot be flushed (failsafe) it exits 1 and
NEED_CHECK stays set.  A second signal during that flush exits 1 at once, leaving NEED_CHECK
set (the next read-write open repairs).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from qedfuse.daemonize import (
    Reporter,
    StartupError,
    detach_stdio,
    remove_pidfile,
    setup_daemon_logging,
    write_pidfile,
)
from qedfuse.errors import EXIT_FAILURE, EXIT_OK, QedError, UserError, one_line
from qedfuse.mounttable import FSTYPE, MountEntry, MountError, mount_entries, mount_entry
from qedfuse.registry import daemon_for, register, unregister
from qedfuse.umount import fusermount

if TYPE_CHECKING:
    from qedfuse.engine import QedImage
    from qedfuse.mount import MountConfig
    from qedfuse.options import MountOptions
    from qedfuse.records import StatsRecord

log = logging.getLogger("qedfuse.mount")  # as before the mount modules were split


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


def run_daemon(cfg: MountConfig, reporter: Reporter) -> int:
    """Run the daemon (in the forked child, or in the foreground); returns the exit status."""
    try:
        return trio.run(_serve, cfg, reporter)
    except StartupError as exc:
        reporter.fail(str(exc))
        return EXIT_FAILURE
    except Exception as exc:  # the daemon must explain any death
        log.critical("qedfuse daemon failed", exc_info=exc)
        reporter.fail(f"internal error: {type(exc).__name__}: {exc}")
        return EXIT_FAILURE


async def _serve(cfg: MountConfig, reporter: Reporter) -> int:
    state = _State()
    code = EXIT_FAILURE
    failure: StartupError | None = None
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, signals, state)
            try:
                code = await _serve_mount(cfg, reporter, state)
            except StartupError as exc:
                failure = exc
            finally:
                nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return code


async def _watch_signals(signals: AsyncIterator[int], state: _State) -> None:
    from qedfuse.fuseloop import fuse_terminate

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


async def _serve_mount(cfg: MountConfig, reporter: Reporter, state: _State) -> int:
    from qedfuse.fs import QedFS, raw_file_name
    from qedfuse.fuseloop import fuse_init
    from qedfuse.opening import create_overlay, open_for_mount, with_read_only_hint

    created_overlay = False
    image: QedImage | None = None
    try:
        with trio.CancelScope() as startup:
            state.startup_scope = startup
            if cfg.overlay_base is not None:
                try:
                    await create_overlay(cfg.image_path, cfg.overlay_base)
                except UserError as exc:
                    raise StartupError(str(exc)) from None
                created_overlay = True
            image = await open_for_mount(cfg.image_path, cfg.options)
        state.startup_scope = None
        if image is None or startup.cancelled_caught:
            raise StartupError(f"interrupted by {state.signal_name} before the mount was ready")
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
            raise StartupError(
                f"cannot mount {cfg.mountpoint}: {exc} (libfuse's reason, if any, is above)"
            ) from None
        entry = _own_mount(cfg)
        if entry is not None:
            state.mount_device = entry.device
            state.registry_path = register(entry.device, entry.mountpoint, cfg.image_path)
        state.request_statistics = ops.statistics
    except StartupError:
        await _abandon(image, created_overlay, cfg.image_path)
        raise
    except (QedError, OSError) as exc:
        await _abandon(image, created_overlay, cfg.image_path)
        read_only = cfg.options.read_only or cfg.overlay_base is not None
        message = one_line(with_read_only_hint(exc, read_only=read_only))
        if cfg.image_path not in message:
            message = f"Could not open '{cfg.image_path}': {message}"
        raise StartupError(message) from None
    except BaseException:
        await _abandon(image, created_overlay, cfg.image_path)
        raise
    return await _serve_mounted(cfg, reporter, state, image)


async def _serve_mounted(
    cfg: MountConfig, reporter: Reporter, state: _State, image: QedImage
) -> int:
    from qedfuse import control, logsetup, sdnotify
    from qedfuse.fuseloop import fuse_close, fuse_main

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
                    write_pidfile(cfg.pidfile)
                if not cfg.foreground:
                    detach_stdio(cfg)
                    setup_daemon_logging(
                        cfg, detached=True, fallback_file=_fallback_log_file(state, cfg)
                    )
                destination = logsetup.destination() if not cfg.foreground else ""
                nursery.start_soon(_report_when_serving, cfg, reporter, state, destination)
                await fuse_main()
                nursery.cancel_scope.cancel()
                if not state.served:
                    if state.signal_name is not None:
                        raise StartupError(
                            f"interrupted by {state.signal_name} before the mount was ready"
                        )
                    raise StartupError(
                        f"the mount at {cfg.mountpoint} does not serve (its FUSE session ended "
                        "at once: libfuse refused the kernel's INIT); nothing is mounted "
                        "(--debug-fuse shows libfuse's reason)"
                    )
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
        if isinstance(inner, StartupError):
            failure = str(inner)
        else:
            log.critical("FUSE loop failed", exc_info=exc)
            failure = f"internal error: {type(inner).__name__}: {inner}"
        code = EXIT_FAILURE
    finally:
        with trio.CancelScope(shield=True):
            code = max(code, await _close_image(image, quiet=not state.served))
            if cfg.pidfile is not None:
                remove_pidfile(cfg.pidfile)
            unregister(state.registry_path)  # only now: `umount --wait` waits for the flush
    if not reporter.done:
        reporter.fail(failure or "the mount ended before it was ready")
    return code


#: How long the first request through a new mount may take before the start fails.
SERVE_PROBE_TIMEOUT_S = 30.0


async def _report_when_serving(
    cfg: MountConfig, reporter: Reporter, state: _State, destination: str
) -> None:
    """Report the mount ready once a request through it has been answered.

    The kernel's INIT is answered inside the request loop, and libfuse may still refuse it
    there (the mount is then gone although every call before succeeded): only a ``stat`` of
    the disk file, from a thread while the loop serves it, shows that the mount serves.  A
    mount made by mount.fuse3 on ``/dev/fd/N`` has no path to stat: it is reported at once.
    """
    from qedfuse.fs import raw_file_name
    from qedfuse.fuseloop import fuse_terminate

    if not cfg.mountpoint.startswith("/dev/fd/"):
        path = os.path.join(cfg.mountpoint, raw_file_name(cfg.image_path))
        try:
            with trio.fail_after(SERVE_PROBE_TIMEOUT_S):
                await trio.to_thread.run_sync(os.stat, path, abandon_on_cancel=True)
        except (OSError, trio.TooSlowError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "no answer"
            raise StartupError(
                f"the mount at {cfg.mountpoint} does not serve ({reason}); "
                "nothing was mounted (--debug-fuse shows libfuse's reason)"
            ) from None
    log.info("serving %s at %s (pid %d)", cfg.image_path, cfg.mountpoint, os.getpid())
    reporter.ready(destination)
    state.served = True
    if state.signal_name is not None:  # a signal raced the start-up
        fuse_terminate()


def _own_mount(cfg: MountConfig) -> MountEntry | None:
    """Our FUSE mount, read after init (never by stat'ing it: nobody serves it yet)."""
    entry = mount_entry(cfg.mountpoint)
    if entry is not None:
        return entry if entry.fstype == FSTYPE else None
    if not cfg.mountpoint.startswith("/dev/fd/"):
        return None
    # mount.fuse3 -o drop_privileges made the mount (source "qedfuse") and handed us its
    # /dev/fuse descriptor: ours is the one such mount no live daemon has registered.
    candidates = [
        e
        for e in mount_entries()
        if e.fstype == FSTYPE
        and e.source in (cfg.image_path, FSTYPE.removeprefix("fuse."))
        and daemon_for(e) is None
    ]
    return candidates[0] if len(candidates) == 1 else None


def _fallback_log_file(state: _State, cfg: MountConfig) -> str | None:
    """Where a detached daemon logs when there is no syslog socket: by its registry record."""
    if state.registry_path is None:
        return None
    stem = os.path.splitext(os.path.basename(cfg.image_path))[0] or "image"
    return os.path.join(os.path.dirname(state.registry_path), f"{stem}.log")


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
        log.error("could not flush the image: %s; NEED_CHECK stays set", one_line(exc))
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


def _detach_if_still_mounted(mountpoint: str, device: str | None) -> None:
    """After an aborted connection libfuse cannot unmount: detach our dead mount ourselves."""
    entry = mount_entry(mountpoint)
    if device is None or entry is None or entry.device != device:
        return
    try:
        cp = fusermount(["-u", "-z", mountpoint])
    except MountError as exc:
        log.error("%s is still mounted but dead: %s", mountpoint, exc)
        return
    if cp.returncode == 0:
        log.warning("the FUSE connection was aborted; detached the dead mount %s", mountpoint)
    else:
        log.error("could not detach the dead mount %s: %s", mountpoint, cp.stderr.strip())
