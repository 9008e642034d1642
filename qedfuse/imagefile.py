"""The one I/O seam: every syscall qedfuse makes on an image or backing file goes through here.

:class:`BlockFile` is the interface the engine, the checker and the tools use.  Tests wrap it
to record, reorder, tear or fail I/O (crash replay, fault injection).

* :class:`FileImage` drives a real file descriptor with positional I/O.  Nothing slow blocks
  the trio loop: ``fdatasync`` goes through io_uring (:mod:`qedfuse.uring`), or a worker
  thread where io_uring is unavailable; ``ftruncate`` always runs in a thread.
  ``pwrite`` runs inline (a page-cached 64 KiB write costs ~9 µs inline against 150-250 µs
  for a thread hop).  ``pread`` runs inline too, unless the file's queue probe
  (:meth:`FileImage.set_queue_probe`) says other requests are waiting and ``cachestat``
  says the data is not all in the page cache: then it goes to an io_uring kernel worker,
  and the loop serves the others while the miss waits for the disk (without ``cachestat``,
  io_uring tries the page cache inside the submit call).
  ``threaded_io=True`` moves pread/pwrite to threads (see ``bench/`` for the measurements
  behind these choices).
* :class:`MemoryImage` is a thread-free in-memory file for tests.

:func:`open_file` is the one way qedfuse opens an existing path (image, backing file, convert
source and target, overlay base, commit target): only regular files and block devices, checked
without ever blocking in ``open`` (a FIFO would wait for a writer for ever).

Only this module imports :mod:`qedfuse.uring`: :func:`uring_statistics` reports its figures.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

import trio

from qedfuse import uring
from qedfuse.records import StatsRecord

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

    def stat(self) -> FileStat | None:
        """Identity and size of the host file; None for a file without one (in memory,
        closed)."""
        ...

    def data_ranges(self, pos: int, end: int) -> list[tuple[int, int, bool]]:
        """[(pos, length, is_data)] covering [pos, end): where the file may hold data and
        where it has holes (which read as zeros).  When unsure, a range is data."""
        ...

    def host_free_bytes(self) -> int | None:
        """Bytes free for unprivileged use on the host filesystem, or None if unknown."""
        ...

    def statistics(self) -> IoStatistics | None:
        """The I/O counters of a file that keeps them (a real file), else None."""
        ...

    def set_queue_probe(self, probe: Callable[[], bool] | None) -> None:
        """How this file sees whether other requests are waiting (see :class:`FileImage`);
        a file that cannot overlap reads ignores it."""
        ...

    async def aclose(self) -> None: ...


class OutputFile(BlockFile, Protocol):
    """A host file a command writes guest bytes to (convert's target, commit's raw base)."""

    @property
    def is_block_device(self) -> bool:
        """A block device: its size is its capacity, it cannot grow, and it is not sparse."""
        ...

    def fileno(self) -> int:
        """The descriptor (QEMU's lock bytes are taken on it)."""
        ...

    async def write_zeroes(self, offset: int, length: int) -> None:
        """Make [offset, offset + length) read as zeros (written out on a block device)."""
        ...


@dataclass(frozen=True, slots=True)
class FileStat:
    """What ``fstat`` says of an open host file."""

    dev: int
    ino: int
    mode: int
    size_bytes: int  # st_size (0 for a block device: see BlockFile.size)
    allocated_bytes: int  # st_blocks * 512

    @property
    def identity(self) -> tuple[int, int]:
        """(st_dev, st_ino): the same file opened twice has the same identity."""
        return self.dev, self.ino

    @property
    def is_block_device(self) -> bool:
        return stat.S_ISBLK(self.mode)


def _file_stat(st: os.stat_result) -> FileStat:
    return FileStat(st.st_dev, st.st_ino, st.st_mode, st.st_size, st.st_blocks * 512)


class FileTypeError(OSError):
    """A path that is neither a regular file nor a block device, or a block device where the
    caller needs a file that can grow.  ``strerror`` is the one-line reason."""


_TYPE_NAMES: Final = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISSOCK, "a socket"),
)


def _refuse_type(mode: int, *, growable: bool) -> None:
    if stat.S_ISREG(mode):
        return
    if stat.S_ISBLK(mode):
        if growable:
            raise FileTypeError(
                errno.EROFS,
                "it is a block device, which cannot grow: a QED image on a block device can "
                "only be opened read-only",
            )
        return
    if stat.S_ISDIR(mode):
        raise FileTypeError(errno.EISDIR, os.strerror(errno.EISDIR))
    kind = next((name for test, name in _TYPE_NAMES if test(mode)), "not a regular file")
    raise FileTypeError(
        errno.EINVAL, f"it is {kind}; only regular files and block devices are supported"
    )


def open_file(path: str | os.PathLike[str], *, read_only: bool, growable: bool = False) -> int:
    """Open an existing regular file or block device (symlinks followed) and return the fd.

    Anything else raises :class:`FileTypeError` before any data is read, and ``open`` never
    blocks: the type is checked by ``stat`` first (a character device is never opened), the
    open itself is ``O_NONBLOCK`` (a FIFO swapped in meanwhile cannot hang it), then ``fstat``
    checks what was really opened and ``O_NONBLOCK`` is cleared.  ``growable`` refuses a block
    device too (for a QED image opened read-write: its allocations extend the file).  A block
    device opened read-write is opened exclusively (``O_EXCL``): one that holds a mounted
    filesystem or is claimed by another exclusive opener is refused (``EBUSY``).
    """
    mode = os.stat(path).st_mode
    _refuse_type(mode, growable=growable)
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC | os.O_NOCTTY
    if stat.S_ISBLK(mode) and not read_only:
        flags |= os.O_EXCL
    try:
        fd = os.open(path, flags | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.EBUSY and flags & os.O_EXCL:
            raise OSError(errno.EBUSY, "the block device is in use (mounted?)") from None
        raise
    try:
        _refuse_type(os.fstat(fd).st_mode, growable=growable)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def is_block_device(fd: int) -> bool:
    return stat.S_ISBLK(os.fstat(fd).st_mode)


#: ``ioctl(BLKZEROOUT, {start, length})``: let the device zero a range (loop: a hole punch).
_BLKZEROOUT: Final = 0x127F
#: BLKZEROOUT wants whole logical blocks; 4 KiB is a multiple of every common size.
_ZEROOUT_ALIGN: Final = 4096
_ZERO_CHUNK: Final = 1 << 20
_ZERO_IOCTL_CHUNK: Final = 256 << 20


@dataclass(frozen=True, slots=True)
class IoStatistics(StatsRecord):
    """What the I/O seam did on one image file, and the file's size now."""

    preads: int
    bytes_read: int
    async_reads: int  # preads that went through io_uring
    pwrites: int
    bytes_written: int
    fdatasyncs: int
    file_bytes: int  # st_size
    host_allocated_bytes: int  # st_blocks * 512


def io_statistics(file: BlockFile) -> IoStatistics | None:
    """``file.statistics()`` for files that keep I/O counters (a real file), else None."""
    method: Callable[[], IoStatistics | None] | None = getattr(file, "statistics", None)
    return method() if method is not None else None


@dataclass(frozen=True, slots=True)
class UringStatistics(StatsRecord):
    """What io_uring did in this process (all files share one ring)."""

    operations: int  # submitted
    waited: int  # completions a task parked for
    #: Why io_uring is not used (e.g. ``QEDFUSE_IO_URING=0``), or None.
    unavailable_reason: str | None
    #: Whether a ring was set up in this process.
    active: bool


def uring_statistics() -> UringStatistics:
    """The io_uring figures of this process (zeros when no ring was set up)."""
    ring = uring.current()
    return UringStatistics(
        operations=ring.submitted if ring is not None else 0,
        waited=ring.parked if ring is not None else 0,
        unavailable_reason=uring.unavailable_reason(),
        active=ring is not None,
    )


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

    def __init__(
        self,
        fd: int,
        *,
        read_only: bool,
        threaded_io: bool = False,
        path: str | None = None,
        unnamed: bool = False,
    ) -> None:
        self.fd = fd
        #: Created without a name (``O_TMPFILE``, linked when done): no name is no change.
        self.unnamed = unnamed
        #: A block device has no file size to grow or truncate; its size is its capacity.
        self.is_block_device = is_block_device(fd)
        self.path = None if path is None else os.path.abspath(path)
        self._read_only = read_only
        self._threaded_io = threaded_io
        self._limiter = trio.CapacityLimiter(16)
        self._async_reads_ok = _supports_nowait(fd)
        self._cachestat_ok = True
        #: Whether other requests are waiting (the FUSE layer polls ``/dev/fuse``); without
        #: a probe (the offline commands) reads stay plain inline ``pread``.
        self._queue_probe: Callable[[], bool] | None = None
        self.async_reads = 0  # reads that went through io_uring (for tests and the bench)
        # Plain int counters (see statistics()): two increments per call on the I/O path.
        self.preads = 0
        self.bytes_read = 0
        self.pwrites = 0
        self.bytes_written = 0
        self.fdatasyncs = 0

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        read_only: bool,
        threaded_io: bool = False,
        growable: bool = False,
    ) -> FileImage:
        """Open ``path`` with :func:`open_file` (regular file or block device only)."""
        fd = open_file(path, read_only=read_only, growable=growable)
        return cls(fd, read_only=read_only, threaded_io=threaded_io, path=os.fspath(path))

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

    def set_queue_probe(self, probe: Callable[[], bool] | None) -> None:
        """Send reads that miss the page cache to io_uring while ``probe()`` says other
        requests are waiting; None: always read inline."""
        self._queue_probe = probe

    def stat(self) -> FileStat | None:
        if self.fd < 0:
            return None
        return _file_stat(os.fstat(self.fd))

    def host_free_bytes(self) -> int | None:
        if self.fd < 0:
            return None
        vfs = os.fstatvfs(self.fd)
        return vfs.f_bavail * vfs.f_frsize

    def data_ranges(self, pos: int, end: int) -> list[tuple[int, int, bool]]:
        """From ``SEEK_DATA``/``SEEK_HOLE``; where the filesystem cannot tell, data."""
        if self.fd < 0:
            return [(pos, end - pos, True)]
        out: list[tuple[int, int, bool]] = []
        while pos < end:
            try:
                data_pos = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole up to the end of the file
                    out.append((pos, end - pos, False))
                else:  # the filesystem cannot tell: assume data
                    out.append((pos, end - pos, True))
                break
            data_pos = min(data_pos, end)
            if data_pos > pos:
                out.append((pos, data_pos - pos, False))
            if data_pos >= end:
                break
            try:
                hole_pos = min(os.lseek(self.fd, data_pos, os.SEEK_HOLE), end)
            except OSError:
                hole_pos = end
            out.append((data_pos, hole_pos - data_pos, True))
            pos = hole_pos
        return out

    def statistics(self) -> IoStatistics:
        """The counters, and the file's size now (one fstat)."""
        try:
            st = os.fstat(self.fd)
            file_bytes, allocated = st.st_size, st.st_blocks * 512
        except OSError:  # closed
            file_bytes = allocated = 0
        return IoStatistics(
            preads=self.preads,
            bytes_read=self.bytes_read,
            async_reads=self.async_reads,
            pwrites=self.pwrites,
            bytes_written=self.bytes_written,
            fdatasyncs=self.fdatasyncs,
            file_bytes=file_bytes,
            host_allocated_bytes=allocated,
        )

    async def pread(self, offset: int, size: int) -> bytes:
        self.preads += 1
        self.bytes_read += size
        if self._threaded_io:
            return await trio.to_thread.run_sync(
                self._pread_sync, offset, size, limiter=self._limiter
            )
        # Cancellable, but no scheduler pass: ~0.2 µs instead of ~5 µs per call (bench/).
        await trio.lowlevel.checkpoint_if_cancelled()
        probe = self._queue_probe
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
            raise OSError(errno.EBADF, "image file is open read-only")
        self.pwrites += 1
        self.bytes_written += len(data)
        if self._threaded_io:
            await trio.to_thread.run_sync(self._pwrite_sync, offset, data, limiter=self._limiter)
            return
        await trio.lowlevel.checkpoint_if_cancelled()
        self._pwrite_sync(offset, data)

    async def fdatasync(self) -> None:
        self.fdatasyncs += 1
        ring = uring.ring()
        if ring is not None:
            await ring.fdatasync(self.fd)
            return
        await trio.to_thread.run_sync(os.fdatasync, self.fd, limiter=self._limiter)

    async def ftruncate(self, size: int) -> None:
        if self.is_block_device:
            raise OSError(errno.EINVAL, "a block device cannot be truncated or grown")
        await trio.to_thread.run_sync(os.ftruncate, self.fd, size, limiter=self._limiter)

    async def size(self) -> int:
        """File length; for a block device its capacity (``fstat`` says 0 there)."""
        if self.is_block_device:
            return os.lseek(self.fd, 0, os.SEEK_END)
        return os.fstat(self.fd).st_size

    async def write_zeroes(self, offset: int, length: int) -> None:
        """Make [offset, offset + length) read as zeros (a device is not sparse: written).

        On a block device the aligned middle goes to ``BLKZEROOUT`` (in a thread: it may
        write every byte) where the device supports it; the rest is written as zeros.
        """
        end = offset + length
        if self.is_block_device:
            start = -(-offset // _ZEROOUT_ALIGN) * _ZEROOUT_ALIGN
            stop = end // _ZEROOUT_ALIGN * _ZEROOUT_ALIGN
            if start < stop and await self._zeroout(start, stop):
                await self._write_zeros(offset, start)
                await self._write_zeros(stop, end)
                return
        await self._write_zeros(offset, end)

    async def _zeroout(self, start: int, stop: int) -> bool:
        """BLKZEROOUT [start, stop) in chunks; False (nothing done) if unsupported."""
        pos = start
        while pos < stop:
            n = min(stop - pos, _ZERO_IOCTL_CHUNK)
            arg = struct.pack("QQ", pos, n)
            try:
                await trio.to_thread.run_sync(
                    fcntl.ioctl, self.fd, _BLKZEROOUT, arg, limiter=self._limiter
                )
            except OSError as exc:
                if pos == start and exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                    return False
                raise
            pos += n
        return True

    async def _write_zeros(self, pos: int, end: int) -> None:
        zeros = bytes(min(_ZERO_CHUNK, max(0, end - pos)))
        while pos < end:
            n = min(end - pos, _ZERO_CHUNK)
            await self.pwrite(pos, memoryview(zeros)[:n])
            pos += n

    async def still_named(self) -> bool:
        """Whether the file is still reachable by the path it was opened with (not deleted,
        renamed away or replaced); without a known path, whether it still has a name (an
        ``unnamed`` file is expected to have none)."""
        st = os.fstat(self.fd)
        if st.st_nlink == 0:
            return self.unnamed
        if self.path is None:
            return True
        try:
            named = os.stat(self.path)
        except OSError:
            return False
        return (named.st_dev, named.st_ino) == (st.st_dev, st.st_ino)

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
            raise OSError(errno.EBADF, "image file is open read-only")
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

    def stat(self) -> FileStat | None:
        return None  # no host file

    def data_ranges(self, pos: int, end: int) -> list[tuple[int, int, bool]]:
        """Data up to the end of the buffer, a hole past it."""
        data_end = min(max(pos, len(self.data)), end)
        out = [(pos, data_end - pos, True)] if data_end > pos else []
        return out + ([(data_end, end - data_end, False)] if end > data_end else [])

    def host_free_bytes(self) -> int | None:
        return None

    def statistics(self) -> IoStatistics | None:
        return None

    def set_queue_probe(self, probe: Callable[[], bool] | None) -> None:
        pass  # reads never wait for a disk

    async def aclose(self) -> None:
        self.closed = True
