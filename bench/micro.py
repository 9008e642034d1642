"""Micro-benchmark: page-cached ``os.pread``/``os.pwrite`` inline vs ``trio.to_thread``.

Backs qedfuse's default in ``qedfuse/imagefile.py`` (inline pread/pwrite; fdatasync and
ftruncate in worker threads) with numbers from the machine the bench runs on.

* per-call latency (median, p99) of 4 KiB and 64 KiB pread/pwrite on a page-cached 16 MiB
  file: bare inline call, inline after ``trio.lowlevel.checkpoint_if_cancelled()`` (what
  FileImage does since 3a70572), after a full ``trio.lowlevel.checkpoint()`` (before), and
  ``trio.to_thread.run_sync`` with a ``CapacityLimiter(16)``;
* throughput of 16 concurrent trio tasks doing the same reads inline vs in threads (a FUSE
  daemon's handlers overlap like this);
* ``os.fdatasync`` after a 64 KiB ``pwrite`` (median and worst), which is why syncs go to a
  thread.

Run alone with ``.venv/bin/python -m bench.micro [--dir DIR]``.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

FILE_SIZE = 16 * 1024 * 1024
N_CALLS = 5000
N_TASKS = 16
N_SYNCS = 50
N_COLD = 4000


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _summary(ns: list[int]) -> dict[str, float]:
    us = [x / 1000 for x in ns]
    return {"median_us": statistics.median(us), "p99_us": _pct(us, 0.99)}


def _offsets(size: int, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(FILE_SIZE // size) * size for _ in range(n)]


async def _latency(fd: int, op: str, size: int, mode: str) -> dict[str, float]:
    offsets = _offsets(size, N_CALLS, seed=size)
    buf = os.urandom(size)
    limiter = trio.CapacityLimiter(16)
    call: Callable[[int], Any]
    if op == "pread":

        def call(off: int) -> Any:
            return os.pread(fd, size, off)
    else:

        def call(off: int) -> Any:
            return os.pwrite(fd, buf, off)

    times: list[int] = []
    clock = time.perf_counter_ns
    for off in offsets:
        t0 = clock()
        if mode == "inline":
            call(off)
        elif mode == "inline+checkpoint":
            await trio.lowlevel.checkpoint()
            call(off)
        elif mode == "inline+checkpoint_if_cancelled":
            await trio.lowlevel.checkpoint_if_cancelled()
            call(off)
        else:
            await trio.to_thread.run_sync(call, off, limiter=limiter)
        times.append(clock() - t0)
    return _summary(times)


async def _concurrent(fd: int, size: int, threaded: bool) -> float:
    """Total MB/s of N_TASKS tasks each doing N_CALLS/N_TASKS preads."""
    offsets = _offsets(size, N_CALLS, seed=size + 1)
    per_task = len(offsets) // N_TASKS
    limiter = trio.CapacityLimiter(16)

    async def worker(chunk: list[int]) -> None:
        for off in chunk:
            if threaded:
                await trio.to_thread.run_sync(os.pread, fd, size, off, limiter=limiter)
            else:
                await trio.lowlevel.checkpoint()
                os.pread(fd, size, off)

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(N_TASKS):
            nursery.start_soon(worker, offsets[i * per_task : (i + 1) * per_task])
    elapsed = time.perf_counter() - t0
    return per_task * N_TASKS * size / elapsed / 1e6


async def _cold(fd: int, mode: str) -> float:
    """4 KiB preads/s of 16 tasks on a cold (just evicted) file: inline, thread or hybrid.

    ``hybrid`` tries ``preadv(RWF_NOWAIT)`` inline and moves only page-cache misses to a
    thread.  Not meaningful on tmpfs (no RWF_NOWAIT, nothing is ever cold).
    """
    offsets = _offsets(4096, N_COLD, seed=7)
    per_task = len(offsets) // N_TASKS
    limiter = trio.CapacityLimiter(16)
    os.fdatasync(fd)  # DONTNEED keeps dirty pages, and the pwrite timings dirtied them
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead: every miss is a miss
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    async def worker(chunk: list[int]) -> None:
        buf = bytearray(4096)
        for off in chunk:
            if mode == "inline":
                await trio.lowlevel.checkpoint()
                os.pread(fd, 4096, off)
            elif mode == "thread":
                await trio.to_thread.run_sync(os.pread, fd, 4096, off, limiter=limiter)
            else:
                try:
                    os.preadv(fd, [buf], off, os.RWF_NOWAIT)
                    await trio.lowlevel.checkpoint()
                except BlockingIOError:
                    await trio.to_thread.run_sync(os.pread, fd, 4096, off, limiter=limiter)

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(N_TASKS):
            nursery.start_soon(worker, offsets[i * per_task : (i + 1) * per_task])
    return per_task * N_TASKS / (time.perf_counter() - t0)


def _fdatasync_cost(fd: int) -> dict[str, float]:
    data = os.urandom(64 * 1024)
    times: list[int] = []
    for i in range(N_SYNCS):
        os.pwrite(fd, data, (i * 64 * 1024) % FILE_SIZE)
        t0 = time.perf_counter_ns()
        os.fdatasync(fd)
        times.append(time.perf_counter_ns() - t0)
    us = [x / 1000 for x in times]
    return {"median_us": statistics.median(us), "max_us": max(us)}


async def _run_all(fd: int) -> dict[str, Any]:
    latency: dict[str, dict[str, float]] = {}
    for op in ("pread", "pwrite"):
        for size in (4096, 65536):
            # warm the page cache and the thread cache before timing
            await _latency(fd, op, size, "thread")
            for mode in ("inline", "inline+checkpoint_if_cancelled", "inline+checkpoint", "thread"):
                latency[f"{op} {size // 1024} KiB {mode}"] = await _latency(fd, op, size, mode)
    concurrent = {}
    for size in (4096, 65536):
        for threaded in (False, True):
            key = f"{N_TASKS} tasks pread {size // 1024} KiB {'thread' if threaded else 'inline'}"
            concurrent[key] = await _concurrent(fd, size, threaded)
    cold: dict[str, float] = {}
    try:
        os.preadv(fd, [bytearray(1)], 0, os.RWF_NOWAIT)
        for mode in ("inline", "thread", "hybrid"):
            cold[f"{N_TASKS} tasks cold pread 4 KiB {mode}"] = await _cold(fd, mode)
    except OSError:
        pass  # tmpfs and friends: no RWF_NOWAIT, and never cold
    return {"latency": latency, "concurrent_mb_s": concurrent, "cold_iops": cold}


def run_micro(directory: Path) -> dict[str, Any]:
    """Run the micro-benchmark with a scratch file in ``directory``; returns the figures."""
    fd, name = tempfile.mkstemp(prefix="micro-", dir=directory)
    try:
        os.pwrite(fd, os.urandom(FILE_SIZE), 0)
        os.fsync(fd)
        result: dict[str, Any] = trio.run(_run_all, fd)
        result["fdatasync_64k"] = _fdatasync_cost(fd)
        result["directory"] = str(directory)
        result["trio"] = trio.__version__
        return result
    finally:
        os.close(fd)
        os.unlink(name)


def format_micro(result: dict[str, Any]) -> list[str]:
    """Markdown lines for the report."""
    lines = [
        "| call (page-cached, 16 MiB file) | median µs | p99 µs |",
        "|---|---:|---:|",
    ]
    for key, v in result["latency"].items():
        lines.append(f"| `{key}` | {v['median_us']:.1f} | {v['p99_us']:.1f} |")
    f = result["fdatasync_64k"]
    lines.append(
        f"| `fdatasync` after a 64 KiB pwrite ({N_SYNCS}x, median / worst) "
        f"| {f['median_us']:.0f} | {f['max_us']:.0f} (max) |"
    )
    lines += ["", "| concurrency | MB/s |", "|---|---:|"]
    for key, mbs in result["concurrent_mb_s"].items():
        lines.append(f"| {key} | {mbs:.0f} |")
    if result.get("cold_iops"):
        lines += [
            "",
            f"| cold file ({FILE_SIZE >> 20} MiB evicted with fadvise DONTNEED) | reads/s |",
            "|---|---:|",
        ]
        for key, iops in result["cold_iops"].items():
            lines.append(f"| {key} | {iops:,.0f} |")
        lines.append("")
        lines.append("hybrid = `preadv(RWF_NOWAIT)` inline, a thread only on a page-cache miss.")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    ns = p.parse_args()
    print("\n".join(format_micro(run_micro(ns.dir))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
