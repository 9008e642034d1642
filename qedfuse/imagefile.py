"""The one I/O seam: every syscall qedfuse makes on an image or backing file goes through here.

:class:`BlockFile` is the interface the engine, the checker and the tools use.  Tests wrap it
to record, reorder, tear or fail I/O (crash replay, fault injection).

* :class:`FileImage` drives a real file descriptor with positional I/O.  Nothing slow blocks
  the trio loop: ``fdatasync`` goes through io_uring (:mod:`qedfuse.uring`), or a worker
  thread where io_uring is unavailable; ``ftruncate`` always runs in a thread.
  ``pwrite`` runs inline (a page-cached 64 KiB write costs ~9 µs inline against 150-250 µs
  for a thread hop).  ``pread`` runs inline too, unless :func:`set_queue_probe` says other
  requests are waiting and ``cachestat`` says the data is not all in the page cache: then it
  goes to an io_uring kernel worker, and the loop serves the others while the miss waits for
  the disk (without ``cachestat``, io_uring tries the page cache inside the submit call).
  ``threaded_io=True`` moves pread/pwrite to threads (see ``bench/`` for the measurements
  behind these choices).
* :class:`MemoryImage` is a thread-free in-memory file for tests.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol

import trio

from qedfuse import uring

Buffer = bytes | bytearray | memoryview


class BlockFile(Protocol):
    """Positional I/O on one file.  Reads past the end of the file return zeros."""

    @property
    def read_only(self) -> bool: ...

    async def pread(self, offset: int, size: int) -> bytes:
        """Read exactly ``size`` bytes at ``offset``, zero-padded past the end of the file."""
        ...

    async def pwrite(self, offset: int, data: Buffer) -> None:
        """Write all of ``data`` at ``offset`` (extending the file if needed)."""
        ...

    async def fdatasync(self) -> None:
        """Make written data (and the file size) durable."""
        ...

    async def ftruncate(self, size: int) -> None: ...

    async def size(self) -> int:
        """Current file length in bytes (fstat)."""
        ...

    async def aclose(self) -> None: ...


_queue_probe: Callable[[], bool] | None = None


def set_queue_probe(probe: Callable[[], bool] | None) -> None:
    """Tell every :class:`FileImage` how to see whether other requests are waiting.

    The FUSE layer installs a poll of ``/dev/fuse``.  Without a probe (the tools), reads
    stay plain inline ``pread``.
    """
    global _queue_probe
    _queue_probe = probe


def _supports_nowait(fd: int) -> bool:
    """Whether reads of this file can fail fast instead of waiting (``RWF_NOWAIT``).

    io_uring needs that to serve page-cache hits inside the submit call; without it every
    read would go to a kernel worker.  tmpfs can't, but its reads never wait for a disk.
    """
    try:
        os.preadv(fd, [bytearray(1)], 0, os.RWF_NOWAIT)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return True


class FileImage:
    """A :class:`BlockFile` on a real file descriptor (which it owns)."""

    def __init__(self, fd: int, *, read_only: bool, threaded_io: bool = False) -> None:
        self.fd = fd
        self._read_only = read_only
        self._threaded_io = threaded_io
        self._limiter = trio.CapacityLimiter(16)
        self._async_reads_ok = _supports_nowait(fd)
        self._cachestat_ok = True
        self.async_reads = 0  # reads that went through io_uring (for tests and the bench)

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], *, read_only: bool, threaded_io: bool = False
    ) -> FileImage:
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        return cls(os.open(path, flags), read_only=read_only, threaded_io=threaded_io)

    @property
    def read_only(self) -> bool:
        return self._read_only

    def fileno(self) -> int:
        return self.fd

    def _pread_sync(self, offset: int, size: int) -> bytes:
        data = os.pread(self.fd, size, offset)
        if len(data) == size:
            return data
        parts = [data]
        got = len(data)
        while got < size:
            more = os.pread(self.fd, size - got, offset + got)
            if not more:
                parts.append(bytes(size - got))
                break
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def _pwrite_sync(self, offset: int, data: Buffer) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, offset)
            view = view[written:]
            offset += written

    async def pread(self, offset: int, size: int) -> bytes:
        if self._threaded_io:
            return await trio.to_thread.run_sync(
                self._pread_sync, offset, size, limiter=self._limiter
            )
        # Cancellable, but no scheduler pass: ~0.2 µs instead of ~5 µs per call (bench/).
        await trio.lowlevel.checkpoint_if_cancelled()
        probe = _queue_probe
        ring = uring.ring() if probe and self._async_reads_ok and size and probe() else None
        if ring is None:  # nothing to overlap with: inline is the fastest
            return self._pread_sync(offset, size)
        cached = uring.page_cache_covers(self.fd, offset, size) if self._cachestat_ok else None
        if cached is None:
            self._cachestat_ok = False  # this kernel or file can't say (e.g. EPERM): stop asking
        buf = bytearray(size)
        got = 0
        if cached:
            # cachestat also counts pages still being read in: let the read itself refuse
            # to wait for those (RWF_NOWAIT), and send only what isn't ready to the ring.
            try:
                got = os.preadv(self.fd, [buf], offset, os.RWF_NOWAIT)
            except BlockingIOError:
                got = 0
            if got == size:
                return bytes(buf)
        self.async_reads += 1
        # A known miss goes straight to a kernel worker: its readahead, bio and device
        # notification then run on another CPU, not inside our submit call.
        n = await ring.read_into(
            self.fd, memoryview(buf)[got:], offset + got, in_worker=cached is not None
        )
        if 0 < n < size - got:  # short only at the end of the file: finish as _pread_sync does
            buf[got + n :] = self._pread_sync(offset + got + n, size - got - n)
        return bytes(buf)

    async def pwrite(self, offset: int, data: Buffer) -> None:
        if self._read_only:
            raise OSError(9, "image file is open read-only")
        if self._threaded_io:
            await trio.to_thread.run_sync(self._pwrite_sync, offset, data, limiter=self._limiter)
            return
        await trio.lowlevel.checkpoint_if_cancelled()
        self._pwrite_sync(offset, data)

    async def fdatasync(self) -> None:
        ring = uring.ring()
        if ring is not None:
            await ring.fdatasync(self.fd)
            return
        await trio.to_thread.run_sync(os.fdatasync, self.fd, limiter=self._limiter)

    async def ftruncate(self, size: int) -> None:
        await trio.to_thread.run_sync(os.ftruncate, self.fd, size, limiter=self._limiter)

    async def size(self) -> int:
        return os.fstat(self.fd).st_size

    async def aclose(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


class MemoryImage:
    """An in-memory :class:`BlockFile` (no threads), for tests and fuzzing."""

    def __init__(self, data: Buffer = b"", *, read_only: bool = False) -> None:
        self.data = bytearray(data)
        self._read_only = read_only
        self.closed = False

    @property
    def read_only(self) -> bool:
        return self._read_only

    async def pread(self, offset: int, size: int) -> bytes:
        await trio.lowlevel.checkpoint()
        chunk = bytes(self.data[offset : offset + size])
        return chunk + bytes(size - len(chunk)) if len(chunk) < size else chunk

    async def pwrite(self, offset: int, data: Buffer) -> None:
        if self._read_only:
            raise OSError(9, "image file is open read-only")
        await trio.lowlevel.checkpoint()
        end = offset + len(data)
        if end > len(self.data):
            self.data.extend(bytes(end - len(self.data)))
        self.data[offset:end] = data

    async def fdatasync(self) -> None:
        await trio.lowlevel.checkpoint()

    async def ftruncate(self, size: int) -> None:
        await trio.lowlevel.checkpoint()
        if size < len(self.data):
            del self.data[size:]
        else:
            self.data.extend(bytes(size - len(self.data)))

    async def size(self) -> int:
        return len(self.data)

    async def aclose(self) -> None:
        self.closed = True
