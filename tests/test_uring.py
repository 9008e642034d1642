"""qedfuse.uring (io_uring through ctypes) and the async read path of FileImage.

Pipes make the "completes later" path deterministic: an io_uring read of an empty pipe
waits until the test writes to it, so the task must park and the reaper must wake it.
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from qedfuse import uring
from qedfuse.imagefile import FileImage
from support import tools_required


@pytest.fixture
def ring() -> uring.Ring:
    r = uring.ring()
    if r is None:
        reason = f"io_uring unavailable: {uring.unavailable_reason()}"
        if tools_required():
            pytest.fail(reason + " (CI must exercise the io_uring path)")
        pytest.skip(reason)
    return r


@pytest.fixture
def data_file(tmp_path: Path) -> tuple[str, bytes]:
    data = random.Random(7).randbytes(3 * 65536 + 1234)
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    return os.fspath(path), data


async def test_read_into_matches_pread(ring: uring.Ring, data_file: tuple[str, bytes]) -> None:
    path, data = data_file
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset, size in [(0, 4096), (5, 1), (65536, 65536), (len(data) - 100, 4096)]:
            buf = bytearray(size)
            n = await ring.read_into(fd, buf, offset)
            expect = data[offset : offset + size]
            assert n == len(expect)
            assert bytes(buf[:n]) == expect
        buf = bytearray(10)
        assert await ring.read_into(fd, buf, len(data) + 4096) == 0  # past the end
        assert await ring.read_into(fd, bytearray(), 0) == 0
    finally:
        os.close(fd)


async def test_errors_come_back_as_oserror(ring: uring.Ring, tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError, match="Bad file descriptor") as info:
            await ring.read_into(fd, bytearray(16), 0)  # write-only descriptor
        assert info.value.errno == errno.EBADF
    finally:
        os.close(fd)
    with pytest.raises(OSError, match="Bad file descriptor") as info:
        await ring.fdatasync(fd)  # closed
    assert info.value.errno == errno.EBADF


async def test_parked_reads_are_woken_in_any_order(ring: uring.Ring) -> None:
    """64 reads of empty pipes park; writes in shuffled order wake exactly their reader."""
    pipes = [os.pipe() for _ in range(64)]
    got: dict[int, bytes] = {}
    parked_before = ring.parked

    async def reader(i: int) -> None:
        buf = bytearray(8)
        n = await ring.read_into(pipes[i][0], buf, 0)
        got[i] = bytes(buf[:n])

    try:
        async with trio.open_nursery() as nursery:
            for i in range(len(pipes)):
                nursery.start_soon(reader, i)
            await trio.sleep(0.05)
            assert not got  # all parked
            order = list(range(len(pipes)))
            random.Random(3).shuffle(order)
            for i in order:
                os.write(pipes[i][1], f"p{i}".encode())
                await trio.lowlevel.checkpoint()
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)
    assert got == {i: f"p{i}".encode() for i in range(len(pipes))}
    assert ring.parked - parked_before == len(pipes)


async def test_a_parked_read_is_not_abandoned_on_cancel(ring: uring.Ring) -> None:
    """The kernel owns the buffer until completion: cancel waits for it, then raises."""
    r, w = os.pipe()
    buf = bytearray(4)
    try:
        async with trio.open_nursery() as nursery:

            async def later() -> None:
                await trio.sleep(0.1)
                os.write(w, b"late")

            nursery.start_soon(later)
            with trio.move_on_after(0.01) as scope:
                await ring.read_into(r, buf, 0)
                await trio.lowlevel.checkpoint()
        assert scope.cancelled_caught
        assert bytes(buf) == b"late"
    finally:
        os.close(r)
        os.close(w)


def test_one_ring_serves_successive_trio_runs(ring: uring.Ring) -> None:
    """The reaper belongs to one trio.run; the next run must get its own."""
    for _ in range(3):
        r, w = os.pipe()

        async def main(r: int = r, w: int = w) -> bytes:
            buf = bytearray(2)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, lambda: os.write(w, b"ok"))
                n = await ring.read_into(r, buf, 0)
            return bytes(buf[:n])

        try:
            assert trio.run(main) == b"ok"
        finally:
            os.close(r)
            os.close(w)
        assert uring.ring() is ring


def test_disabled_by_environment_falls_back_to_inline_and_threads(
    monkeypatch: pytest.MonkeyPatch, data_file: tuple[str, bytes]
) -> None:
    monkeypatch.setenv("QEDFUSE_IO_URING", "0")
    assert uring.ring() is None
    assert uring.unavailable_reason() == "QEDFUSE_IO_URING=0"
    path, data = data_file

    async def main() -> None:
        file = FileImage.open(path, read_only=False)
        file.set_queue_probe(lambda: True)  # others are waiting
        try:
            assert await file.pread(10, 4096) == data[10:4106]  # others "waiting", no ring
            await file.pwrite(0, b"new")
            await file.fdatasync()  # through a worker thread
            assert await file.pread(0, 3) == b"new"
            assert file.async_reads == 0
        finally:
            await file.aclose()

    trio.run(main)


def test_a_forked_child_gets_its_own_ring(ring: uring.Ring) -> None:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            if uring.current() is not None:  # the parent's ring was dropped at fork
                os._exit(3)
            child = uring.ring()
            ok = child is not None and child is not ring and child.fd >= 0

            async def read_pipe() -> bool:
                r, w = os.pipe()
                os.write(w, b"x")
                assert child is not None
                return await child.read_into(r, bytearray(1), 0) == 1

            os._exit(0 if ok and trio.run(read_pipe) else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# ------------------------------------------------------------------ FileImage on top


def _evict(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


async def test_fileimage_misses_go_to_io_uring_when_others_wait(
    ring: uring.Ring, data_file: tuple[str, bytes]
) -> None:
    path, data = data_file
    _evict(path)
    file = FileImage.open(path, read_only=True)
    file.set_queue_probe(lambda: True)  # others are waiting
    try:
        for offset, size in [(0, 4096), (65536 - 10, 20), (len(data) - 10, 4096)]:
            _evict(path)  # (readahead of an earlier read would make this one a hit)
            got = await file.pread(offset, size)
            expect = data[offset : offset + size]
            assert got == expect + bytes(size - len(expect))  # zero-padded past the end
        assert file.async_reads == 3
    finally:
        await file.aclose()


async def test_fileimage_page_cache_hits_stay_inline(
    ring: uring.Ring, data_file: tuple[str, bytes]
) -> None:
    """A hit is cheapest inline even when others wait (cachestat tells, Linux 6.5+)."""
    path, data = data_file
    file = FileImage.open(path, read_only=True)
    file.set_queue_probe(lambda: True)  # others are waiting
    try:
        await file.pread(0, len(data))  # now all cached
        assert uring.page_cache_covers(file.fd, 0, len(data)) is True
        before = file.async_reads
        assert await file.pread(65536, 8192) == data[65536 : 65536 + 8192]
        assert file.async_reads == before
        _evict(path)
        assert uring.page_cache_covers(file.fd, 65536, 8192) is False
    finally:
        await file.aclose()


async def test_fileimage_reads_inline_when_nothing_waits(
    ring: uring.Ring, data_file: tuple[str, bytes]
) -> None:
    path, data = data_file
    file = FileImage.open(path, read_only=True)
    try:
        file.set_queue_probe(lambda: False)
        assert await file.pread(100, 50) == data[100:150]
        file.set_queue_probe(None)
        assert await file.pread(200, 50) == data[200:250]
        assert file.async_reads == 0
    finally:
        await file.aclose()


@pytest.fixture
def tmpfs_file() -> Iterator[str]:
    path = Path(f"/dev/shm/qedfuse-test-{os.getpid()}")  # Debian mounts tmpfs there
    path.write_bytes(b"abc" * 1000)
    try:
        yield os.fspath(path)
    finally:
        path.unlink()


async def test_fileimage_on_tmpfs_stays_inline(ring: uring.Ring, tmpfs_file: str) -> None:
    """tmpfs can't serve RWF_NOWAIT, so io_uring would punt every read to a kernel worker."""
    file = FileImage.open(tmpfs_file, read_only=True)
    file.set_queue_probe(lambda: True)  # others are waiting
    try:
        assert await file.pread(3, 6) == b"abcabc"
        assert file.async_reads == 0
    finally:
        await file.aclose()


async def test_fileimage_fdatasync_uses_the_ring(ring: uring.Ring, tmp_path: Path) -> None:
    fd = os.open(tmp_path / "s.bin", os.O_RDWR | os.O_CREAT)
    file = FileImage(fd, read_only=False)
    try:
        before = ring.submitted
        await file.pwrite(0, b"durable")
        await file.fdatasync()
        assert ring.submitted == before + 1
        assert await file.pread(0, 7) == b"durable"
    finally:
        await file.aclose()
