"""Concurrency: many trio tasks allocating the same clusters, readers and flushes in between.

The image's BlockFile yields (checkpoints and short sleeps on a MockClock) around every I/O,
driven by a hypothesis-controlled Random, so hypothesis draws the interleaving and shrinks a
failing one.  Trio's own run-queue order is also seeded from it.  Expected (reliability.md
§5.3): image equals the model, one allocation per distinct cluster touched (stats and file
size), no leaks or corruptions, and a reader polling during allocation only ever sees zeros
or the written bytes.
"""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing
from enginehelpers import (
    MiB,
    Model,
    Wrapper,
    YieldingFile,
    assert_raw_clean,
    new_image,
    pattern,
    raw,
    read_all,
    reopen,
    walk,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qedfuse import format as fmt
from qedfuse.engine import OpenOptions, QedImage
from qedfuse.imagefile import Buffer, MemoryImage
from qedfuse.opening import open_image

CS = 4096
TS = 2
L2_COVERAGE = fmt.Geometry(CS, TS).l2_coverage  # 4 MiB
IMAGE_SIZE = 16 * MiB
BASE_FILE_SIZE = (1 + TS) * CS


def seed_trio_scheduler(rng: random.Random) -> None:
    """Trio randomly reverses run batches; seed that too so a schedule replays exactly."""
    scheduler_rng = getattr(trio._core._run, "_r", None)
    if isinstance(scheduler_rng, random.Random):
        scheduler_rng.seed(rng.getrandbits(64))


async def assert_clean_and_equal(
    img: QedImage, model: Model, ranges: list[tuple[int, int]] | None = None
) -> None:
    """Raw bytes walk clean and match the model; the engine reads ``ranges`` (default: all)
    as the model does."""
    await assert_raw_clean(img, model)
    if ranges is None:
        assert await read_all(img) == model.read(0, model.size)
    for pos, size in ranges or []:
        assert await img.read(pos, size) == model.read(pos, size)


def split(rng: random.Random, start: int, end: int, n_parts: int) -> list[tuple[int, int]]:
    """``n_parts`` disjoint, non-empty, adjacent sub-ranges covering [start, end)."""
    cuts = sorted(rng.sample(range(start + 1, end), n_parts - 1))
    bounds = [start, *cuts, end]
    return [(bounds[k], bounds[k + 1] - bounds[k]) for k in range(n_parts)]


async def allocation_race(
    rng: random.Random, n_tasks: int, n_clusters: int, straddle: bool, flush_concurrently: bool
) -> None:
    if straddle:
        first = L2_COVERAGE // CS - rng.randrange(1, n_clusters + 1)  # across two L2 tables
    else:
        first = rng.randrange(IMAGE_SIZE // CS - n_clusters)
    start, end = first * CS, (first + n_clusters) * CS
    pieces = split(rng, start, end, n_tasks)
    payloads = []
    for k, (pos, size) in enumerate(pieces):
        zero = rng.random() < 0.15
        payloads.append(bytes(size) if zero else pattern(pos, size, seed=k + 1))
    model = Model(IMAGE_SIZE)
    for (pos, _size), payload in zip(pieces, payloads, strict=True):
        model.write(pos, payload)
    final = model.read(start, end - start)
    expected_clusters = {c for c in range(first, first + n_clusters) if any(model.read(c * CS, CS))}
    expected_tables = {c * CS // L2_COVERAGE for c in expected_clusters}

    img = await new_image(IMAGE_SIZE, CS, TS, wrap=lambda m: YieldingFile(m, rng, max_sleep=0.001))
    writers_done = trio.Event()
    n_reads = 0

    async def writer(pos: int, payload: bytes) -> None:
        for _ in range(rng.randrange(3)):
            await trio.lowlevel.checkpoint()
        await img.write(pos, payload)

    # A piece's part inside one cluster lands with one pwrite (fill included), so at any
    # instant it reads either all zeros or exactly its final bytes, never anything else.
    segments: list[tuple[int, int]] = []
    for pos, size in pieces:
        while size:
            n = min(size, CS - pos % CS)
            segments.append((pos - start, n))
            pos, size = pos + n, size - n

    async def reader() -> None:
        nonlocal n_reads
        while not writers_done.is_set():
            got = await img.read(start, end - start)
            n_reads += 1
            for off, n in segments:
                seg = got[off : off + n]
                assert seg in (final[off : off + n], bytes(n)), f"foreign bytes at +{off}, {n}"
            await trio.sleep(rng.random() * 0.001)

    async def flusher() -> None:
        while not writers_done.is_set():
            await img.flush()
            await trio.sleep(rng.random() * 0.002)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        if flush_concurrently:
            nursery.start_soon(flusher)
        async with trio.open_nursery() as writers:
            order = list(range(n_tasks))
            rng.shuffle(order)
            for k in order:
                writers.start_soon(writer, pieces[k][0], payloads[k])
        writers_done.set()
    assert n_reads >= 1

    assert await img.read(start, end - start) == final
    assert img.stats.allocated_clusters == len(expected_clusters), "double allocation"
    assert img.stats.new_l2_tables == len(expected_tables)
    await img.flush()
    assert (
        len(raw(img)) == BASE_FILE_SIZE + (len(expected_clusters) + TS * len(expected_tables)) * CS
    )
    await assert_clean_and_equal(img, model)
    w = walk(raw(img))
    assert set(w.mapping) == expected_clusters
    window = [(max(0, start - CS), end - start + 2 * CS)]
    img = await reopen(img)
    await assert_clean_and_equal(img, model, window)
    await img.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    n_tasks=st.sampled_from([8, 16, 32, 64]),
    n_clusters=st.integers(1, 3),
    straddle=st.booleans(),
    flush_concurrently=st.booleans(),
)
def test_concurrent_writers_allocate_each_cluster_once(
    seed: int, n_tasks: int, n_clusters: int, straddle: bool, flush_concurrently: bool
) -> None:
    """Hypothesis draws the schedule: the seed drives every yield/sleep and trio's run order."""
    rng = random.Random(seed)
    seed_trio_scheduler(rng)
    trio.run(
        allocation_race,
        rng,
        n_tasks,
        n_clusters,
        straddle,
        flush_concurrently,
        clock=trio.testing.MockClock(autojump_threshold=0),
    )


async def spread_race(rng: random.Random) -> None:
    """Writers, readers and flushes over many L2 tables with a tiny L2 cache."""
    model = Model(IMAGE_SIZE)
    img = await new_image(
        IMAGE_SIZE,
        CS,
        TS,
        options=OpenOptions(cache_size=1),
        wrap=lambda m: YieldingFile(m, rng, max_sleep=0.001),
    )
    # Pre-allocate a few clusters, so some writes go in place while others allocate.
    for k in range(4):
        pos = k * L2_COVERAGE + rng.randrange(0, L2_COVERAGE - CS)
        data = pattern(pos, CS, seed=99)
        await img.write(pos, data)
        model.write(pos, data)
    await img.flush()
    before = Model(IMAGE_SIZE)
    before.pages = {k: bytearray(v) for k, v in model.pages.items()}
    jobs: list[tuple[int, bytes]] = []
    while len(jobs) < 24:
        pos = rng.randrange(0, IMAGE_SIZE - 3 * CS)
        size = rng.choice([1, 100, CS, CS + 1, 2 * CS + 7])
        if any(pos < p + len(d) and p < pos + size for p, d in jobs):
            continue  # concurrent writers get disjoint ranges
        data = pattern(pos, size, seed=len(jobs))
        jobs.append((pos, data))
        model.write(pos, data)
    done = trio.Event()

    async def writer(pos: int, data: bytes) -> None:
        await img.write(pos, data)

    async def reader() -> None:
        while not done.is_set():
            pos = rng.randrange(IMAGE_SIZE - 8192)
            got = await img.read(pos, 8192)
            # Each byte is the old content, the new one, or zeros (a fill not yet overwritten).
            new, old = model.read(pos, 8192), before.read(pos, 8192)
            assert all(g in (0, n, o) for g, n, o in zip(got, new, old, strict=True))
            await trio.sleep(rng.random() * 0.001)

    async def flusher() -> None:
        while not done.is_set():
            await trio.sleep(rng.random() * 0.003)
            await img.flush()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        nursery.start_soon(reader)
        nursery.start_soon(flusher)
        async with trio.open_nursery() as writers:
            for pos, data in jobs:
                writers.start_soon(writer, pos, data)
        done.set()
    # Concurrent writers may each dirty a table before one of them runs the budget flush, so
    # during a burst the cache holds up to capacity + writers in flight; the flush makes them
    # all clean (evictable on the next miss).
    assert len(img.cache) <= img.cache.capacity + len(jobs)
    await img.flush()
    assert img.cache.n_dirty == 0
    # each job's range plus 100 bytes on each side (clipped at 0: a job may start below 100)
    ranges = [(max(0, pos - 100), pos + len(d) + 100 - max(0, pos - 100)) for pos, d in jobs]
    await assert_clean_and_equal(img, model, ranges)
    img = await reopen(img)
    await assert_clean_and_equal(img, model, ranges)
    await img.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1))
def test_concurrent_spread_writes_with_tiny_cache_and_flushes(seed: int) -> None:
    rng = random.Random(seed)
    seed_trio_scheduler(rng)
    trio.run(spread_race, rng, clock=trio.testing.MockClock(autojump_threshold=0))


# ---------------------------------------------------------------------------- forced interleavings


class GateFile(Wrapper):
    """Blocks the first pwrite at or past ``gate_offset`` until :attr:`release` is set."""

    def __init__(self, inner: MemoryImage, gate_offset: int) -> None:
        super().__init__(inner)
        self.gate_offset = gate_offset
        self.entered = trio.Event()
        self.release = trio.Event()
        self.armed = True

    async def pwrite(self, offset: int, data: Buffer) -> None:
        if self.armed and offset >= self.gate_offset:
            self.armed = False
            self.entered.set()
            await self.release.wait()
        await self.inner.pwrite(offset, data)


async def test_second_writer_waits_and_writes_in_place() -> None:
    """Writer B of the same unallocated cluster waits for A's allocation, then re-looks up."""
    gate: list[GateFile] = []

    def wrap(m: MemoryImage) -> GateFile:
        gate.append(GateFile(m, BASE_FILE_SIZE))  # the first data cluster
        return gate[0]

    img = await new_image(IMAGE_SIZE, CS, TS, wrap=wrap)
    g = gate[0]
    pos = 7 * CS
    seen: list[bytes] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(img.write, pos, b"\xaa" * 1000)
        await g.entered.wait()  # A holds the allocation lock, its data write in flight
        nursery.start_soon(img.write, pos + 2000, b"\xbb" * 1000)
        await trio.testing.wait_all_tasks_blocked()
        # B is parked on the lock; a reader sees the cluster as still unallocated.
        seen.append(await img.read(pos, CS))
        assert img.stats.allocated_clusters == 0
        g.release.set()
    assert seen == [bytes(CS)]
    assert img.stats.allocated_clusters == 1
    want = b"\xaa" * 1000 + bytes(1000) + b"\xbb" * 1000 + bytes(CS - 3000)
    assert await img.read(pos, CS) == want
    await img.flush()
    w = walk(raw(img))
    assert (w.corruptions, w.leaks, w.n_data) == ([], [], 1)
    await img.close()


async def test_flush_waits_for_an_allocation_in_flight() -> None:
    """A flush issued while an allocating write is mid-way covers it completely or not at all."""
    gate: list[GateFile] = []

    def wrap(m: MemoryImage) -> GateFile:
        gate.append(GateFile(m, BASE_FILE_SIZE))
        return gate[0]

    img = await new_image(IMAGE_SIZE, CS, TS, wrap=wrap)
    g = gate[0]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(img.write, 0, b"\x5a" * CS)
        await g.entered.wait()
        nursery.start_soon(img.flush)
        await trio.testing.wait_all_tasks_blocked()
        assert img.stats.flushes == 0, "flush ran while an allocation held metadata"
        g.release.set()
    assert img.stats.flushes == 1
    w = walk(raw(img))
    assert not w.need_check
    assert (w.corruptions, w.leaks) == ([], [])
    assert w.mapping == {0: BASE_FILE_SIZE}
    await img.close()


async def test_concurrent_readers_load_an_l2_table_once() -> None:
    img = await new_image(IMAGE_SIZE, CS, TS)
    await img.write(0, b"\x01" * CS)
    data = raw(img)
    await img.close()
    rng = random.Random(3)
    memory = MemoryImage()
    memory.data = data
    img = await open_image(YieldingFile(memory, rng))
    async with trio.open_nursery() as nursery:
        for _ in range(16):
            nursery.start_soon(img.read, 0, 100)
    assert img.cache.misses == 1
    await img.close()


@pytest.mark.parametrize("n_tasks", [8, 64])
async def test_sequencer_forced_alternation(n_tasks: int) -> None:
    """Tasks take turns strictly (Sequencer) writing interleaved 512-byte pieces of 2 clusters."""
    img = await new_image(IMAGE_SIZE, CS, TS)
    seq = trio.testing.Sequencer()
    model = Model(IMAGE_SIZE)
    pieces = split(random.Random(n_tasks), 5 * CS, 7 * CS, n_tasks)

    async def writer(k: int) -> None:
        pos, size = pieces[k]
        async with seq(k):
            pass  # start in order k, but finish in any order
        await img.write(pos, pattern(pos, size, seed=k))

    async with trio.open_nursery() as nursery:
        for k in reversed(range(n_tasks)):
            nursery.start_soon(writer, k)
    for k, (pos, size) in enumerate(pieces):
        model.write(pos, pattern(pos, size, seed=k))
    assert img.stats.allocated_clusters == 2
    await img.flush()
    await assert_clean_and_equal(img, model)
    await img.close()
