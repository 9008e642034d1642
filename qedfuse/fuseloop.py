"""The FUSE session: init, pyfuse3's request loop (with a cheaper request wait), terminate, close.

With :mod:`qedfuse.fs` (the protocol adapter) this is the FUSE layer, the only modules that
import pyfuse3.  One session per process: :func:`fuse_init` mounts and finds the session's
``/dev/fuse`` descriptor, :func:`fuse_main` serves until :func:`fuse_terminate` or an
external unmount (swapping in :class:`_RequestWait` for pyfuse3's own wait),
:func:`fuse_close` ends the session.
"""

from __future__ import annotations

import inspect
import logging
import os
import select
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pyfuse3
import trio

from qedfuse.engine import GuestSource, QedImage
from qedfuse.imagefile import BlockFile, uring_statistics

if TYPE_CHECKING:
    from qedfuse.fs import QedFS

log = logging.getLogger("qedfuse.fs")  # as before it left fs.py: log lines keep their names


class _DroppedReplies(logging.Filter):
    """pyfuse3 logs an ERROR when the kernel no longer takes a reply: ENOENT (the request was
    interrupted, e.g. its caller was killed, or the unmount forgot it) or ENODEV (the
    connection is gone).  Nothing failed on our side: these become INFO lines that say so."""

    _DROPPED = ("failed with No such file or directory", "failed with No such device")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and "fuse_reply_" in str(record.msg):
            text = record.getMessage()
            if text.endswith(self._DROPPED):
                record.msg = "%s (the kernel had dropped the request: nothing was lost)"
                record.args = (text,)
                record.levelno, record.levelname = logging.INFO, "INFO"
        return True


logging.getLogger("pyfuse3").addFilter(_DroppedReplies())


def fuse_init(ops: QedFS, mountpoint: str, options: set[str]) -> None:
    """Mount: after this the kernel mount exists (requests queue until :func:`fuse_main`).

    Raises RuntimeError when libfuse refuses (its reason is printed on stderr).
    """
    global _wait
    pyfuse3.init(ops, mountpoint, options)
    fd = _find_fuse_fd()
    _set_queue_probe(None)
    if fd is None:
        _wait = None
        return
    poller = select.poll()
    poller.register(fd, select.POLLIN)

    def queued() -> bool:
        return bool(poller.poll(0))

    def others_waiting() -> bool:
        # A request in progress elsewhere (say, parked on an io_uring read) would stall
        # behind an inline read that misses the page cache just as a queued one would.
        return ops.in_progress > 1 or queued()

    _probed.extend(_chain_files(ops.image))
    _set_queue_probe(others_waiting)
    _wait = _RequestWait(fd, queued)


#: The image files (the whole chain) whose reads the request loop's queue probe steers.
_probed: list[BlockFile] = []


def _chain_files(image: QedImage) -> list[BlockFile]:
    """The file of every layer of an open chain."""
    files: list[BlockFile] = []
    layer: GuestSource | None = image
    while layer is not None:
        file: BlockFile | None = getattr(layer, "file", None)
        if file is not None:
            files.append(file)
        layer = layer.backing if isinstance(layer, QedImage) else None
    return files


def _set_queue_probe(probe: Callable[[], bool] | None) -> None:
    for file in _probed:
        file.set_queue_probe(probe)
    if probe is None:
        _probed.clear()


class _RequestWait:
    """A cheaper stand-in for pyfuse3's wait for the next request on ``/dev/fuse``.

    pyfuse3's worker tasks (``_session_loop``) call the module function
    ``_wait_fuse_readable()`` before each ``read(/dev/fuse)``; it takes a lock and always
    parks in ``trio.lowlevel.wait_readable`` (epoll re-arm, a scheduler pass), even when
    requests are already queued.  That was ~2/3 of the per-request CPU (bench/).  This one
    first polls the descriptor without blocking: when a request is queued it returns at
    once, and the caller reads it without yielding in between, so the read can't block.
    Otherwise one task waits in epoll and the others park, newest first, so a few tasks
    (and their 1 MiB request buffers) stay hot.  A task woken by epoll polls again before
    returning, because a task on the fast path may have taken the request meanwhile.

    Stop the session with :func:`fuse_terminate` (it sets ``terminating`` before pyfuse3
    closes the descriptor): unlike pyfuse3's own wait, this one can't see libfuse's exit
    flag, so a bare ``pyfuse3.terminate()`` only stops the tasks already waiting.

    The worker loop (pyfuse3 3.4/3.5) reads no state of ours, so :func:`fuse_main` bounds
    the pool with ``max_tasks``; every 8th call takes the slow path so that other trio
    tasks (the idle flusher, io_uring completions) get their turn under sustained load.
    """

    def __init__(self, fd: int, probe: Callable[[], bool]) -> None:
        self.fd = fd
        self.probe = probe
        self.terminating = False
        self._reader = False  # a task is in wait_readable
        self._parked: list[trio.lowlevel.Task] = []
        self._calls = 0
        self.fast = 0  # requests found queued by the poll (no epoll wait)
        self.waits = 0  # epoll waits

    def _wake_one(self) -> None:
        if self._parked:
            trio.lowlevel.reschedule(self._parked.pop())

    async def _park(self) -> None:
        task = trio.lowlevel.current_task()
        self._parked.append(task)

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._parked.remove(task)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def _ready(self) -> bool:
        if not self._reader:
            self._wake_one()  # someone must watch the descriptor while this task works
        return True

    async def __call__(self) -> bool:
        """True: a request (or the end of the session) can be read now; False: stop."""
        while not self.terminating:
            self._calls = (self._calls + 1) & 7
            if self._calls and self.probe():
                self.fast += 1
                return self._ready()
            if self._reader:
                await self._park()
                continue
            self._reader = True
            self.waits += 1
            try:
                await trio.lowlevel.wait_readable(self.fd)
            except trio.ClosedResourceError:  # pyfuse3.terminate(), however it was called
                self.terminating = True  # the descriptor is closing: nobody may wait on it
                break
            finally:
                self._reader = False
            if self.probe():
                return self._ready()
        self._wake_one()  # pass the news on: every parked task must see it and stop
        return False


_wait: _RequestWait | None = None


def request_wait() -> _RequestWait | None:
    """The session's request wait (its counters are in ``qedfuse status``), None if none."""
    return _wait


_DEV_FUSE = os.makedev(10, 229)


def _find_fuse_fd() -> int | None:
    """The session's ``/dev/fuse`` descriptor.

    pyfuse3 doesn't expose it, so it is found among ours (one session per process, so one
    ``/dev/fuse``).
    """
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            st = os.stat(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == _DEV_FUSE:
            found.append(int(name))
    if len(found) != 1:
        log.debug("no single /dev/fuse descriptor (%s): page-cache misses stay inline", found)
        return None
    return found[0]


_MAX_TASKS = 32  # requests in progress at once (pyfuse3's default is 99)


async def fuse_main() -> None:
    """Serve requests until :func:`fuse_terminate` or an external unmount."""
    hooked = (
        _wait is not None
        and os.environ.get("QEDFUSE_FAST_WAIT", "1") != "0"
        and inspect.iscoroutinefunction(getattr(pyfuse3, "_wait_fuse_readable", None))
    )
    original = getattr(pyfuse3, "_wait_fuse_readable", None)
    if hooked:
        pyfuse3._wait_fuse_readable = _wait  # type: ignore[attr-defined]
    try:
        await pyfuse3.main(1, _MAX_TASKS)
    except* ConnectionAbortedError as group:
        # The kernel's teardown of the connection (the last close after a lazy unmount, or
        # an abort) can meet a read that has already taken a request off the queue: that
        # read fails with ECONNABORTED instead of the usual ENODEV.  Either way the session
        # is over and the caller flushes the image; it is no internal error.
        log.info("the FUSE session ended during a read (%s)", _first_line(group))
    finally:
        if hooked:
            pyfuse3._wait_fuse_readable = original  # type: ignore[attr-defined]
        _log_session_stats(hooked)


def _first_line(group: BaseExceptionGroup[ConnectionAbortedError]) -> str:
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return str(first).splitlines()[0] if str(first) else type(first).__name__


def _log_session_stats(hooked: bool) -> None:
    ring = uring_statistics()
    if ring.active:
        io = f"io_uring: {ring.operations} operations, {ring.waited} waited for"
    elif ring.unavailable_reason is not None:
        io = f"io_uring unavailable ({ring.unavailable_reason})"
    else:
        io = "io_uring: 0 operations, 0 waited for"
    if hooked and _wait is not None:
        loop = f"{_wait.fast} requests found queued, {_wait.waits} epoll waits"
    else:
        loop = "pyfuse3's own request wait"
    log.info("request loop: %s; %s", loop, io)


def fuse_terminate() -> None:
    """Make :func:`fuse_main` return once the requests in flight are answered."""
    if _wait is not None:
        _wait.terminating = True
    pyfuse3.terminate()


def fuse_close(*, unmount: bool) -> None:
    """End the session; with ``unmount`` also remove the mount (lazily, as libfuse does)."""
    _set_queue_probe(None)
    pyfuse3.close(unmount=unmount)


__all__ = [
    "fuse_close",
    "fuse_init",
    "fuse_main",
    "fuse_terminate",
    "request_wait",
]
