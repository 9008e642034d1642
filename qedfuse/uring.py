"""A minimal io_uring for trio, through ctypes: reads and fdatasync that never block the loop.

Why: the trio loop serves every FUSE request on one thread.  An inline ``pread`` that misses
the page cache stalls all requests for the disk's latency, and a worker-thread hop costs
~150-250 µs of CPU here (the GIL hand-over dominates).  io_uring runs the read in the kernel
(a page-cache hit completes inside ``io_uring_enter``; a miss completes later) and signals an
eventfd that trio waits on, so no Python thread is involved.  Measured in ``bench/``.

Only what qedfuse needs: ``IORING_OP_READ`` into a caller's ``bytearray`` and
``IORING_OP_FSYNC`` with ``IORING_FSYNC_DATASYNC`` (kernel ≥ 5.6).  One :class:`Ring` per
thread and process (:func:`ring`); it returns ``None`` when io_uring is unavailable (old
kernel, seccomp, ``kernel.io_uring_disabled``, a non-x86-64 machine — the completion ring
is read without acquire barriers, which only x86's memory model makes safe — or
``QEDFUSE_IO_URING=0``), and callers then use inline I/O or threads as before.

Completion: each operation has a ``user_data`` id.  Completions found right after
submission are returned without a scheduler pass; otherwise the task parks and a trio system
task (one per ring and ``trio.run``) drains the completion queue whenever the eventfd fires.
A parked operation cannot be cancelled (like a blocking syscall): its buffer belongs to the
kernel until the completion arrives.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
import threading
from typing import Any

import outcome
import trio

_SYS_IO_URING_SETUP = 425  # same number on every architecture since Linux 5.1
_SYS_IO_URING_ENTER = 426
_SYS_IO_URING_REGISTER = 427
_OFF_SQ_RING = 0
_OFF_CQ_RING = 0x8000000
_OFF_SQES = 0x10000000
_FEAT_SINGLE_MMAP = 1 << 0
_FEAT_NODROP = 1 << 1
_FEAT_RW_CUR_POS = 1 << 3  # Linux 5.6: also the release of IORING_OP_READ and IOSQE_ASYNC
_OP_FSYNC = 3
_OP_READ = 22
_FSYNC_DATASYNC = 1
_REGISTER_EVENTFD = 4
_SQE_ASYNC = 1 << 4  # IOSQE_ASYNC: skip the inline attempt, run in a kernel worker
_SYS_CACHESTAT = 451  # Linux 6.5+, same number on every architecture
_SQE = struct.Struct("<BBHiQQIIQHHiQQ")  # struct io_uring_sqe, 64 bytes
_CQE = struct.Struct("<QiI")  # struct io_uring_cqe, 16 bytes
_U32 = 0xFFFFFFFF

_PROT_RW = 0x1 | 0x2
_MAP_SHARED_POPULATE = 0x01 | 0x8000


class _Params(ctypes.Structure):
    """struct io_uring_params (120 bytes)."""

    _fields_ = [
        ("sq_entries", ctypes.c_uint32),
        ("cq_entries", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("sq_thread_cpu", ctypes.c_uint32),
        ("sq_thread_idle", ctypes.c_uint32),
        ("features", ctypes.c_uint32),
        ("wq_fd", ctypes.c_uint32),
        ("resv", ctypes.c_uint32 * 3),
        # io_sqring_offsets: head tail ring_mask ring_entries flags dropped array resv1 user_addr
        ("sq_off", ctypes.c_uint32 * 10),
        # io_cqring_offsets: head tail ring_mask ring_entries overflow cqes flags resv1 user_addr
        ("cq_off", ctypes.c_uint32 * 10),
    ]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def _oserror(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


class Ring:
    """One io_uring instance.  Use it only from the thread (and process) that made it."""

    def __init__(self, entries: int = 128) -> None:
        params = _Params()
        fd = _libc.syscall(_SYS_IO_URING_SETUP, ctypes.c_uint(entries), ctypes.byref(params))
        if fd < 0:
            raise _oserror("io_uring_setup")
        self.fd = int(fd)
        self._maps: list[tuple[int, int]] = []
        self.efd = -1
        try:
            self._setup(params)
        except BaseException:
            self.close()
            raise
        self._owner = (os.getpid(), threading.get_ident())
        self._next_id = 1
        self._done: dict[int, int] = {}  # id → result, completed before anyone waited
        self._waiters: dict[int, trio.lowlevel.Task] = {}
        self._buffers: dict[int, object] = {}  # id → buffer the kernel may still write
        self._reaper_token: trio.lowlevel.TrioToken | None = None
        self.submitted = 0  # operations, for logs and tests
        self.parked = 0  # of which the caller had to wait for (not complete at submit)

    def _mmap(self, size: int, offset: int) -> int:
        addr = _libc.mmap(None, size, _PROT_RW, _MAP_SHARED_POPULATE, self.fd, offset)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            raise _oserror("mmap io_uring")
        self._maps.append((addr, size))
        return int(addr)

    def _setup(self, p: _Params) -> None:
        needed = _FEAT_SINGLE_MMAP | _FEAT_NODROP | _FEAT_RW_CUR_POS
        if p.features & needed != needed:
            raise OSError(0, "io_uring: kernel too old (needs Linux 5.6 or later)")
        sq_off, cq_off = p.sq_off, p.cq_off
        ring_size = max(sq_off[6] + p.sq_entries * 4, cq_off[5] + p.cq_entries * _CQE.size)
        base = self._mmap(ring_size, _OFF_SQ_RING)
        sqes = self._mmap(p.sq_entries * _SQE.size, _OFF_SQES)
        u32 = ctypes.c_uint32
        self._sq_head = u32.from_address(base + sq_off[0])
        self._sq_tail = u32.from_address(base + sq_off[1])
        self._sq_mask = u32.from_address(base + sq_off[2]).value
        self._sq_entries = p.sq_entries
        array = (u32 * p.sq_entries).from_address(base + sq_off[6])
        for i in range(p.sq_entries):
            array[i] = i  # SQE slot i is always ring index i
        self._sqes = (ctypes.c_char * (p.sq_entries * _SQE.size)).from_address(sqes)
        self._cq_head = u32.from_address(base + cq_off[0])
        self._cq_tail = u32.from_address(base + cq_off[1])
        self._cq_mask = u32.from_address(base + cq_off[2]).value
        self._cqes = (ctypes.c_char * (p.cq_entries * _CQE.size)).from_address(base + cq_off[5])
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        efd = ctypes.c_int32(self.efd)
        if _libc.syscall(_SYS_IO_URING_REGISTER, self.fd, _REGISTER_EVENTFD, ctypes.byref(efd), 1):
            raise _oserror("io_uring_register eventfd")

    def owned_here(self) -> bool:
        return self._owner == (os.getpid(), threading.get_ident())

    def close(self) -> None:
        """Release the ring (only when no operation is in flight)."""
        for addr, size in self._maps:
            _libc.munmap(addr, size)
        self._maps = []
        for fd in (self.efd, self.fd):
            if fd >= 0:
                os.close(fd)
        self.efd = self.fd = -1

    # ------------------------------------------------------------------ submission

    def _submit(
        self,
        opcode: int,
        fd: int,
        offset: int,
        addr: int,
        length: int,
        flags: int,
        keep: object,
        sqe_flags: int = 0,
    ) -> int:
        tail = self._sq_tail.value
        if (tail - self._sq_head.value) & _U32 >= self._sq_entries:
            self._enter()  # unsent entries from a failed enter: push them first
            if (tail - self._sq_head.value) & _U32 >= self._sq_entries:
                raise OSError(errno.EAGAIN, "io_uring submission queue full")
        op_id = self._next_id
        self._next_id += 1
        self.submitted += 1
        _SQE.pack_into(
            self._sqes,
            (tail & self._sq_mask) * _SQE.size,
            opcode,
            sqe_flags,
            0,
            fd,
            offset,
            addr,
            length,
            flags,
            op_id,
            0,
            0,
            0,
            0,
            0,
        )
        if keep is not None:
            self._buffers[op_id] = keep
        self._sq_tail.value = (tail + 1) & _U32  # the enter syscall below is the barrier
        try:
            self._enter()
        except OSError:
            if self._sq_head.value == tail:  # the kernel never took it: take it back
                self._sq_tail.value = tail
                self._buffers.pop(op_id, None)
            raise
        return op_id

    def _unsent(self) -> int:
        return (self._sq_tail.value - self._sq_head.value) & _U32

    def _enter(self) -> None:
        while pending := self._unsent():
            if _libc.syscall(_SYS_IO_URING_ENTER, self.fd, pending, 0, 0, None, 0) >= 0:
                continue
            err = ctypes.get_errno()
            if err in (errno.EAGAIN, errno.EBUSY):  # short of memory or completions backed up;
                return  # the entries stay queued and _wait pushes them again
            if err != errno.EINTR:  # again; anything else is not going to get better
                raise OSError(err, f"io_uring_enter: {os.strerror(err)}")

    # ------------------------------------------------------------------ completion

    def _reap(self) -> None:
        head = self._cq_head.value
        tail = self._cq_tail.value
        while head != tail:
            op_id, res, _ = _CQE.unpack_from(self._cqes, (head & self._cq_mask) * _CQE.size)
            head = (head + 1) & _U32
            self._buffers.pop(op_id, None)
            task = self._waiters.pop(op_id, None)
            if task is None:
                self._done[op_id] = res
            else:
                trio.lowlevel.reschedule(task, outcome.Value(res))
        self._cq_head.value = head

    async def _reaper(self) -> None:
        while True:
            await trio.lowlevel.wait_readable(self.efd)
            try:
                os.read(self.efd, 8)
            except BlockingIOError:
                pass
            self._reap()

    async def _wait(self, op_id: int) -> int:
        with trio.CancelScope(shield=True):  # once queued, the result must be collected
            while self._unsent():
                await trio.sleep(0.001)
                self._reap()  # collecting completions is what frees the kernel to take more
                self._enter()
        self._reap()
        res = self._done.pop(op_id, None)
        if res is not None:
            await trio.lowlevel.checkpoint_if_cancelled()
            return res
        token = trio.lowlevel.current_trio_token()
        if self._reaper_token is not token:
            self._reaper_token = token
            trio.lowlevel.spawn_system_task(self._reaper, name="qedfuse io_uring reaper")
        self._waiters[op_id] = trio.lowlevel.current_task()
        self.parked += 1

        def abort(_: Any) -> trio.lowlevel.Abort:
            return trio.lowlevel.Abort.FAILED  # the kernel still owns the buffer

        result: int = await trio.lowlevel.wait_task_rescheduled(abort)
        return result

    # ------------------------------------------------------------------ operations

    async def read_into(
        self, fd: int, buf: bytearray | memoryview, offset: int, *, in_worker: bool = False
    ) -> int:
        """Read up to ``len(buf)`` bytes at ``offset``; the byte count (short at EOF).

        ``in_worker``: hand the read straight to a kernel worker thread (for data known not
        to be cached: the miss path's kernel work — readahead, bio submission, the device
        notification — then runs on another CPU instead of inside our submit call).
        """
        if not buf:
            return 0
        addr = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
        flags = _SQE_ASYNC if in_worker else 0
        return await self._result(self._submit(_OP_READ, fd, offset, addr, len(buf), 0, buf, flags))

    async def fdatasync(self, fd: int) -> None:
        await self._result(self._submit(_OP_FSYNC, fd, 0, 0, 0, _FSYNC_DATASYNC, None))

    async def _result(self, op_id: int) -> int:
        """The operation's result; a negative one (-errno) raised as OSError."""
        res = await self._wait(op_id)
        if res < 0:
            raise OSError(-res, os.strerror(-res))
        return res


_cachestat_range = ctypes.c_uint64 * 2  # struct cachestat_range {off, len}
_cachestat = ctypes.c_uint64 * 5  # struct cachestat: nr_cache, nr_dirty, ...
_cachestat_works = True


def page_cache_covers(fd: int, offset: int, size: int) -> bool | None:
    """Whether every page of ``[offset, offset+size)`` is in the page cache (cachestat(2),
    ~2 µs); ``None`` when the kernel can't say (before Linux 6.5, some filesystems)."""
    global _cachestat_works
    if not _cachestat_works or size <= 0:
        return None
    first, last = offset // 4096, (offset + size - 1) // 4096
    pages = last - first + 1
    rng = _cachestat_range(first * 4096, pages * 4096)
    out = _cachestat()
    if _libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(out), 0) != 0:
        if ctypes.get_errno() in (38, 95):  # ENOSYS, EOPNOTSUPP: never ask again
            _cachestat_works = False
        return None
    return bool(out[0] >= pages)


_local = threading.local()
_unavailable: str | None = None if platform.machine() in ("x86_64", "AMD64") else "not x86-64"


def _forget_after_fork() -> None:
    """In a forked child, the parent's ring is not ours: close our copy right away, before
    its descriptor numbers can be reused for something else."""
    r: Ring | None = getattr(_local, "ring", None)
    if r is not None:
        _local.ring = None
        r.close()


os.register_at_fork(after_in_child=_forget_after_fork)


def ring() -> Ring | None:
    """This thread's ring, made on first use; ``None`` when io_uring can't be used here."""
    global _unavailable
    if _unavailable is not None or os.environ.get("QEDFUSE_IO_URING", "1") == "0":
        return None
    r = current()
    if r is not None:
        return r
    try:
        r = Ring()
    except OSError as exc:
        _unavailable = exc.strerror or str(exc)
        return None
    _local.ring = r
    return r


def current() -> Ring | None:
    """This thread's ring if one was made (never makes one)."""
    r: Ring | None = getattr(_local, "ring", None)
    return r if r is not None and r.owned_here() else None


def unavailable_reason() -> str | None:
    """Why :func:`ring` returns ``None`` (after it was called), for logs and the bench."""
    if os.environ.get("QEDFUSE_IO_URING", "1") == "0":
        return "QEDFUSE_IO_URING=0"
    return _unavailable
