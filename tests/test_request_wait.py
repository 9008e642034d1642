"""The daemon's request loop: qedfuse's stand-in for pyfuse3's wait for ``/dev/fuse``.

``fuseloop._RequestWait`` must never return True unless a read of the descriptor would not block
(the real one is a blocking ``/dev/fuse``: a wrong True would freeze the daemon), must let
every worker stop on terminate and at the end of the session, and must actually take queued
requests without an epoll wait.  A non-blocking pipe stands in for ``/dev/fuse`` in process
(a wrong True shows up as EAGAIN instead of a hang); then the real daemon is checked.
"""

from __future__ import annotations

import errno
import inspect
import logging
import os
import random
import re
import select
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import pytest
import trio
import trio.lowlevel
from fusehelpers import mounted, need_check

from qedfuse import fuseloop
from support import check_ok, require_tool, run


def _gate_on_pipe() -> tuple[fuseloop._RequestWait, int, int]:
    r, w = os.pipe()
    os.set_blocking(r, False)
    poller = select.poll()
    poller.register(r, select.POLLIN)
    return fuseloop._RequestWait(r, lambda: bool(poller.poll(0))), r, w


async def _workers(
    gate: fuseloop._RequestWait, fd: int, n: int, stats: dict[str, int], rnd: random.Random
) -> None:
    """pyfuse3's worker loop in miniature: wait, read one 'request', handle it."""

    async def worker() -> None:
        while await gate():
            try:
                byte = os.read(fd, 1)
            except BlockingIOError:
                stats["would_block"] += 1
                continue
            if not byte:
                break  # end of the session (ENODEV on /dev/fuse)
            stats["served"] += 1
            if rnd.random() < 0.3:
                await trio.lowlevel.checkpoint()  # a handler that waits for I/O

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(worker)


def _run_gate(end: str, seed: int) -> dict[str, int]:
    gate, r, w = _gate_on_pipe()
    stats = {"served": 0, "would_block": 0}
    rnd = random.Random(seed)
    sent = 0

    async def main() -> None:
        nonlocal sent
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_workers, gate, r, 12, stats, rnd)
                for _ in range(200):
                    burst = rnd.choice([1, 1, 2, 16, 40])
                    os.write(w, b"r" * burst)
                    sent += burst
                    await trio.sleep(rnd.choice([0, 0, 0.0005]))
                while stats["served"] < sent:  # noqa: ASYNC110 - the workers own the count
                    await trio.sleep(0.001)
                if end == "terminate":  # what fuse_terminate() + pyfuse3.terminate() do
                    gate.terminating = True
                    trio.lowlevel.notify_closing(r)
                else:  # the kernel ends the session: the descriptor reads as EOF/ENODEV
                    os.close(w)

    try:
        trio.run(main)
    finally:
        os.close(r)
        if end != "eof":
            os.close(w)
    assert stats["served"] == sent
    stats["fast"], stats["waits"] = gate.fast, gate.waits
    return stats


@pytest.mark.parametrize("end", ["terminate", "eof"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_never_true_without_a_request_and_every_worker_stops(end: str, seed: int) -> None:
    stats = _run_gate(end, seed)
    assert stats["would_block"] == 0, stats
    # queued requests were taken without an epoll wait (the point of the stand-in)
    assert stats["fast"] > stats["served"] // 4, stats
    assert stats["waits"] < stats["served"], stats


def test_pyfuse3_still_calls_the_hook_we_replace() -> None:
    """fuseloop.fuse_main swaps pyfuse3._wait_fuse_readable (pyfuse3 3.4/3.5's worker loop calls
    it by module lookup).  If a pyfuse3 release renames it, the daemon silently falls back to
    the slow loop: this test says so first."""
    assert inspect.iscoroutinefunction(getattr(pyfuse3, "_wait_fuse_readable", None))
    assert pyfuse3.__version__.startswith("3."), pyfuse3.__version__


def _loop_stats(log: str) -> tuple[int, int, int, int]:
    m = re.search(
        r"request loop: (\d+) requests found queued, (\d+) epoll waits; "
        r"io_uring: (\d+) operations, (\d+) waited for",
        log,
    )
    assert m, f"no request-loop statistics in the daemon's log:\n{log}"
    fast, waits, ops, parked = map(int, m.groups())
    return fast, waits, ops, parked


def test_daemon_takes_queued_requests_and_overlaps_disk_reads(tmp_path: Path) -> None:
    """QD16 O_DIRECT reads of data not in the page cache, through a real mount on a disk
    filesystem: the daemon must take queued requests without epoll waits, send page-cache
    misses to io_uring while others wait, and return the right bytes (fio crc32c)."""
    fio = require_tool("fio")
    qemu_img = require_tool("qemu-img")
    image = tmp_path / "disk.qed"
    check_ok(run([qemu_img, "create", "-f", "qed", "-o", "cluster_size=65536", image, "256M"]))
    job = [
        fio,
        "--name=qd16",
        "--ioengine=libaio",
        "--direct=1",
        "--iodepth=16",
        "--bs=4k",
        "--size=64m",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--randseed=99",
        "--verify_state_save=0",
        "--output-format=terse",
    ]
    with mounted(image, tmp_path / "mnt", "-o", f"log={tmp_path / 'q.log'}") as m:
        check_ok(run([*job, "--rw=randwrite", "--do_verify=0", f"--filename={m.raw}"]))
        os.sync()
        fd = os.open(image, os.O_RDONLY)
        try:  # drop the image's clean pages: the reads below must go to the disk
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        check_ok(run([*job, "--rw=randread", "--verify_only", f"--filename={m.raw}"]))
    fast, waits, ops, parked = _loop_stats((tmp_path / "q.log").read_text())
    assert fast > 1000, (fast, waits)  # 16384 writes + 16384 reads, mostly already queued
    assert parked > 100, (ops, parked)  # misses overlapped in io_uring
    check_ok(run([qemu_img, "check", image]))
    assert not need_check(image)


@pytest.mark.parametrize("nesting", [0, 1, 2])
def test_a_read_that_meets_the_teardown_ends_the_session(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, nesting: int
) -> None:
    """ECONNABORTED from a /dev/fuse read (the kernel dequeued a request, then the connection
    went away: seen in CI after a lazy unmount) ends the session like ENODEV, not as an
    internal error; anything else pyfuse3 raises still propagates."""

    def wrapped(exc: Exception) -> Exception:
        for _ in range(nesting):
            exc = ExceptionGroup("nursery", [exc])
        return exc

    async def aborted_main(*_: object) -> None:
        raise wrapped(
            OSError(errno.ECONNABORTED, "fuse_session_receive_buf failed with connection abort")
        )

    monkeypatch.setattr(pyfuse3, "main", aborted_main)
    caplog.set_level("INFO", logger="qedfuse")
    trio.run(fuseloop.fuse_main)
    assert "the FUSE session ended during a read" in caplog.text

    async def failing_main(*_: object) -> None:
        raise wrapped(OSError(errno.EIO, "fuse_session_receive_buf failed with EIO"))

    monkeypatch.setattr(pyfuse3, "main", failing_main)
    with pytest.raises((OSError, ExceptionGroup)) as info:
        trio.run(fuseloop.fuse_main)
    inner: BaseException = info.value
    while isinstance(inner, BaseExceptionGroup):
        inner = inner.exceptions[0]
    assert isinstance(inner, OSError), info.value
    assert inner.errno == errno.EIO, info.value


@pytest.mark.parametrize(
    ("reason", "dropped"),
    [
        ("No such file or directory", True),  # interrupted: the kernel forgot the request
        ("No such device", True),  # the connection is gone
        ("Invalid argument", False),  # a reply the kernel refused: our bug, stays an ERROR
    ],
)
def test_a_reply_the_kernel_no_longer_takes_is_no_error(
    caplog: pytest.LogCaptureFixture, expect_log: Callable[[str], None], reason: str, dropped: bool
) -> None:
    """pyfuse3's 'fuse_reply_* failed' ERROR after a normal unmount of a stopped daemon (seen
    in test_lifecycle) is an INFO line that says nothing was lost; other reply errors stay."""
    if not dropped:
        expect_log("fuse_reply_")
    caplog.set_level("INFO", logger="pyfuse3")
    logging.getLogger("pyfuse3").error("fuse_release(): fuse_reply_* failed with %s", reason)
    (record,) = [r for r in caplog.records if r.name == "pyfuse3"]
    assert record.levelname == ("INFO" if dropped else "ERROR"), record
    assert reason in record.getMessage()
