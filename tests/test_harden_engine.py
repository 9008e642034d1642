"""Engine hardening (issue 11, findings 1, 7, 8 and the review item), at the engine level.

* Finding 1: an entry the engine did not write is trusted only if it pointed inside the file
  as it was at open; a host cluster is never served for two guest clusters (within one table,
  across tables, a table used as data, one table for two L1 entries), whatever the load
  order (after growth, evicted and reloaded, re-read by the failsafe).
* Finding 7: a flush (and a write) notices that the file is no longer what the engine wrote
  (shrunk, header or L1 bytes changed, deleted) and fails with EIO; nothing more is written.
* Finding 8: a full disk refuses the guest write that needs space (ENOSPC), loses nothing
  from view, a flush never needs new space, and once space is freed everything lands.
* Review item: a data write is counted for the next sync only once it has completed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from enginehelpers import (
    Model,
    Wrapper,
    need_check_on_disk,
    pattern,
    peek_u64,
    poke_u64,
    raw,
    reopen,
)

from qedfuse import format as fmt
from qedfuse.check import check_image
from qedfuse.engine import Kind, OpenOptions, QedImage
from qedfuse.errors import CorruptionError, FailsafeError, LimitError, QedError
from qedfuse.imagefile import Buffer, FileImage, MemoryImage
from qedfuse.opening import open_image
from qedfuse.tables import create_image

KiB = 1024
MiB = 1024 * KiB

GEOMETRIES = [(4096, 1), (4096, 16), (65536, 4), (1 << 20, 1)]


# ---------------------------------------------------------------------------- building images


@dataclass
class Built:
    """A hand-made image: its bytes, geometry and where its tables and data clusters are."""

    data: bytearray
    geo: fmt.Geometry
    header: fmt.Header
    tables: list[int]
    clusters: list[int]

    @property
    def coverage(self) -> int:
        return self.geo.l2_coverage

    def set_l1(self, index: int, value: int) -> None:
        poke_u64(self.data, self.header.l1_table_offset + 8 * index, value)

    def set_l2(self, table: int, index: int, value: int) -> None:
        poke_u64(self.data, self.tables[table] + 8 * index, value)


async def build(cs: int, ts: int, n_tables: int = 2, n_clusters: int = 2) -> Built:
    """A clean image (NEED_CHECK clear) with ``n_tables`` empty L2 tables in L1[0..] and
    ``n_clusters`` unreferenced data clusters holding a pattern, laid out after L1."""
    memory = MemoryImage()
    geo = fmt.Geometry(cs, ts, 1)
    size = min(geo.max_image_size, 4 * geo.l2_coverage)
    header = await create_image(memory, size, cluster_size=cs, table_size=ts)
    data = memory.data
    b = Built(data, fmt.Geometry(cs, ts, header.header_size), header, [], [])
    for i in range(n_tables):
        b.tables.append(len(data))
        data.extend(bytes(ts * cs))
        b.set_l1(i, b.tables[-1])
    for i in range(n_clusters):
        b.clusters.append(len(data))
        data.extend(pattern(len(data), cs, seed=100 + i))
    return b


async def open_built(b: Built, **options: object) -> QedImage:
    return await open_image(MemoryImage(b.data), options=OpenOptions(**options))  # type: ignore[arg-type]


async def served_hosts(img: QedImage, positions: list[int]) -> dict[int, int]:
    """guest pos -> host offset for every position the engine serves as DATA (no error)."""
    out: dict[int, int] = {}
    for pos in positions:
        try:
            ext = await img._map.lookup(pos, img.cluster_size)
        except CorruptionError:
            continue
        if ext.kind is Kind.DATA:
            assert ext.host_offset is not None
            out[pos] = ext.host_offset
    return out


def assert_injective(hosts: dict[int, int], metadata: set[int]) -> None:
    seen: dict[int, int] = {}
    for pos, host in hosts.items():
        assert host not in metadata, f"guest {pos:#x} served from metadata cluster {host:#x}"
        assert host not in seen, f"guest {pos:#x} and {seen[host]:#x} share host {host:#x}"
        seen[host] = pos


def metadata_clusters(b: Built) -> set[int]:
    cs = b.geo.cluster_size
    out = set(range(0, b.header.l1_table_offset + b.geo.table_bytes, cs))
    for t in b.tables:
        out.update(range(t, t + b.geo.table_bytes, cs))
    return out


# ---------------------------------------------------------------------------- finding 1


@pytest.mark.parametrize(("cs", "ts"), GEOMETRIES)
@pytest.mark.parametrize("k_past_end", [0, 1, 2, 5, 40])
@pytest.mark.parametrize("order", ["direct", "evict-own", "failsafe-reread"])
@pytest.mark.expect_log(
    r"L\d+ table at 0x[0-9a-f]+ has \d+ invalid entries",
    r"entering failsafe mode: L\d+ table at 0x[0-9a-f]+ has \d+ invalid entries",
    r"entering failsafe mode: test: as after a failed flush",
)
async def test_entry_past_open_time_end_is_never_trusted(
    cs: int, ts: int, k_past_end: int, order: str
) -> None:
    """Growth must not make a hostile entry valid: k clusters past the open-time end is the
    first data cluster we would allocate (k=0), the table we would create (k=1..ts), or
    beyond.  The survey before the first write finds it, so nothing grows at all: the
    write is refused (failsafe, NEED_CHECK set), and the entry stays unreadable."""
    b = await build(cs, ts, n_tables=2, n_clusters=0)
    end = len(b.data)
    hostile = end + k_past_end * cs
    b.set_l2(1, 0, hostile)
    img = await open_built(b, cache_size=1 if order == "evict-own" else 8 * MiB)
    cov = b.coverage
    with pytest.raises(FailsafeError):
        await img.write(0, pattern(0, cs, seed=1))
    with pytest.raises(FailsafeError):
        await img.write(2 * cov, pattern(0, cs, seed=2))
    assert img.allocator_end == end  # nothing was allocated
    assert need_check_on_disk(img)  # the next read-write open repairs it
    if order == "evict-own":
        for _ in range(3):  # tables evicted and reloaded keep their verdict
            await img.read(2 * cov, cs)
            assert await img.read(0, cs) == bytes(cs)
    elif order == "failsafe-reread":
        await img._enter_failsafe("test: as after a failed flush")
    with pytest.raises(CorruptionError):
        await img.read(cov, cs)
    assert await img.read(0, cs) == bytes(cs)
    hosts = await served_hosts(img, [0, cov, 2 * cov, 2 * cov + 3 * cs])
    assert_injective(hosts, metadata_clusters(b))
    await img.close()


@pytest.mark.parametrize(("cs", "ts"), GEOMETRIES)
@pytest.mark.parametrize("k_past_end", [0, 1, 3])
@pytest.mark.expect_log(
    r"\d+ invalid L\d+ entries; the guest ranges they map will fail with EIO",
    r"entering failsafe mode: \d+ invalid L\d+ entries",
    r"entering failsafe mode: test",
)
async def test_l1_entry_past_open_time_end_stays_corrupt_after_growth(
    cs: int, ts: int, k_past_end: int
) -> None:
    """An L1 entry at/after the open-time end is bad even once the file grew over it,
    also after the failsafe re-read L1 (which sees the grown file)."""
    b = await build(cs, ts, n_tables=1, n_clusters=0)
    end = len(b.data)
    b.set_l1(2, end + k_past_end * cs)
    img = await open_built(b, repair_on_open=False)
    # invalid L1 entries put a read-write open in failsafe at once: nothing can grow ...
    assert img.failsafe
    with pytest.raises(CorruptionError):
        await img.read(2 * b.coverage, cs)
    # ... and a file grown by someone else does not make the entry valid on re-read
    memory = MemoryImage(b.data, read_only=True)
    img2 = await open_image(memory, read_only=True)
    memory.data.extend(bytes(8 * ts * cs))
    await img2._enter_failsafe("test")
    with pytest.raises(CorruptionError):
        await img2.read(2 * b.coverage, cs)
    await img.close()
    await img2.close()


DUPLICATES = ["within", "across", "table-as-data", "table-tail-as-data", "l1-as-data"]


@pytest.mark.parametrize(("cs", "ts"), GEOMETRIES[:3])
@pytest.mark.parametrize("kind", DUPLICATES)
@pytest.mark.parametrize("first", [0, 1])
@pytest.mark.parametrize("tiny_cache", [False, True])
@pytest.mark.parametrize("read_only", [False, True])
@pytest.mark.expect_log(
    r"L\d+ table at 0x[0-9a-f]+ has \d+ invalid entries",
    r"entering failsafe mode: L\d+ table at 0x[0-9a-f]+ has \d+ invalid entries",
)
async def test_no_host_cluster_served_twice(
    cs: int, ts: int, kind: str, first: int, tiny_cache: bool, read_only: bool
) -> None:
    b = await build(cs, ts, n_tables=3, n_clusters=2)
    d = b.clusters[0]
    if kind == "within":
        b.set_l2(1, 0, d)
        b.set_l2(1, 3, d)
    elif kind == "across":
        b.set_l2(0, 2, d)
        b.set_l2(1, 0, d)
    elif kind == "table-as-data":
        b.set_l2(0, 2, d)
        b.set_l2(1, 0, b.tables[2])
    elif kind == "table-tail-as-data":
        b.set_l2(1, 0, b.tables[2] + (ts - 1) * cs)
    else:
        b.set_l2(1, 0, b.header.l1_table_offset)
    b.set_l2(2, 1, b.clusters[1])
    opts = OpenOptions(cache_size=1 if tiny_cache else 8 * MiB, repair_on_open=False)
    img = await open_image(MemoryImage(b.data, read_only=read_only), options=opts)
    cov = b.coverage
    positions = [t * cov + i * cs for t in range(3) for i in range(4)]
    order = positions if first == 0 else positions[::-1]
    for _ in range(2):  # a second pass reloads evicted tables (tiny cache)
        hosts = await served_hosts(img, order)
        assert_injective(hosts, metadata_clusters(b))
        for pos, host in hosts.items():
            # Once the second mapping of a cluster is seen, the first fails too.
            with contextlib.suppress(CorruptionError):
                assert await img.read(pos, cs) == bytes(b.data[host : host + cs])
    await img.close()


# Pairs of (table, index) mapping one host cluster: in one table, or across tables with the
# first mapping in an earlier or a later table than the second.
SHARED_PAIRS = {
    "within": ((1, 0), (1, 3)),
    "across": ((0, 2), (2, 0)),
    "across-far": ((0, 5), (2, 7)),
}


@pytest.mark.parametrize(("cs", "ts"), GEOMETRIES)
@pytest.mark.parametrize("pair", sorted(SHARED_PAIRS))
@pytest.mark.parametrize("target", [0, 1])
@pytest.mark.parametrize("preload", ["none", "target", "other", "all"])
@pytest.mark.parametrize("tiny_cache", [False, True])
@pytest.mark.expect_log(
    r"L\d+ table at 0x[0-9a-f]+ has \d+ invalid entries",
    r"entering failsafe mode: L\d+ table at 0x[0-9a-f]+ has \d+ invalid entries",
)
async def test_no_write_lands_in_a_cluster_another_entry_maps(
    cs: int, ts: int, pair: str, target: int, preload: str, tiny_cache: bool
) -> None:
    """Whichever of two mappings of one host cluster is written, whichever tables were
    loaded before (a table loaded only after the write was the outside finding), the shared
    cluster never changes and neither guest cluster ever shows the new bytes."""
    b = await build(cs, ts, n_tables=3, n_clusters=1)
    shared = b.clusters[0]
    for table, index in SHARED_PAIRS[pair]:
        b.set_l2(table, index, shared)
    original = bytes(b.data[shared : shared + cs])
    positions = [t * b.coverage + i * cs for t, i in SHARED_PAIRS[pair]]
    written, other = positions[target], positions[1 - target]
    memory = MemoryImage(b.data)
    opts = OpenOptions(cache_size=1 if tiny_cache else 8 * MiB, repair_on_open=False)
    img = await open_image(memory, options=opts)
    reads = {"none": [], "target": [written], "other": [other], "all": positions}[preload]
    for pos in reads:
        try:
            assert await img.read(pos, cs) == original
        except CorruptionError:
            pass
    new = b"\xee" * cs
    try:
        await img.write(written, new)
        await img.flush()
    except (CorruptionError, FailsafeError):
        pass
    assert bytes(memory.data[shared : shared + cs]) == original
    for pos in positions:
        try:
            assert await img.read(pos, cs) != new
        except CorruptionError:
            pass
    await img.close()


@pytest.mark.expect_log(
    r"L\d+ table at 0x[0-9a-f]+ has \d+ invalid entries",
    r"entering failsafe mode: L\d+ table at 0x[0-9a-f]+ has \d+ invalid entries",
)
async def test_repro_issue_11_finding_1() -> None:
    """The reported case: 4 GiB, 64 KiB clusters, ts 4, L2 entry == the file's end."""
    b = await build(65536, 4, n_tables=2, n_clusters=0)
    assert b.tables == [0x50000, 0x90000]
    assert len(b.data) == 0xD0000
    b.set_l2(1, 0, 0xD0000)
    img = await open_built(b)
    with pytest.raises(FailsafeError):  # the survey before the first write finds it
        await img.write(0, b"A" * 65536)
    with pytest.raises(CorruptionError):
        await img.read(2 << 30, 65536)
    assert await img.read(0, 65536) == bytes(65536)
    await img.close()


def _vm_rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.expect_log(r"L\d+ table at 0x[0-9a-f]+ has \d+ invalid entries")
async def test_duplicate_detection_memory_is_bounded(tmp_path: Path) -> None:
    """1 TiB sparse image file, 4 KiB clusters, 16-cluster tables (8192 entries each): the
    bitmap is 32 MiB of address space, but only the pages of referenced clusters cost RSS."""
    cs, ts = 4096, 16
    path = tmp_path / "sparse.qed"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    file = FileImage(fd, read_only=False)
    header = await create_image(file, 64 << 30, cluster_size=cs, table_size=ts)
    file_size = 1 << 40
    tb = ts * cs
    n_tables = 8
    entries = tb // 8
    stride = (file_size // cs) // (entries * n_tables)  # spread over the whole file
    for t in range(n_tables):
        offset = file_size - (t + 1) * tb
        table = bytearray(tb)
        for i in range(entries):
            poke_u64(table, 8 * i, (1 << 30) + (t * entries + i) * stride * cs)
        os.pwrite(fd, table, offset)
        os.pwrite(fd, offset.to_bytes(8, "little"), header.l1_table_offset + 8 * t)
    os.ftruncate(fd, file_size)
    await file.aclose()
    before = _vm_rss_kib()
    img = await open_image(FileImage.open(path, read_only=True), read_only=True)
    opened = _vm_rss_kib()
    for t in range(n_tables):
        await img.read(t * (entries * cs), cs)
    loaded = _vm_rss_kib()
    await img.close()
    print(
        f"\nRSS: open +{opened - before} KiB; after {n_tables * entries} spread entries "
        f"+{loaded - before} KiB (bitmap address space {file_size // cs // 8 // KiB} KiB)"
    )
    assert opened - before < 4 * 1024
    # every entry sits on its own bitmap page (the worst case), plus the cached tables
    assert loaded - before < 4 * 1024 + n_tables * entries * 4 + n_tables * tb * 3 // KiB


# ---------------------------------------------------------------------------- review item


class GatedFile(Wrapper):
    """Holds a pwrite at ``gate_offset`` until released; counts fdatasyncs."""

    def __init__(self, inner: MemoryImage) -> None:
        super().__init__(inner)
        self.gate_offset: int | None = None
        self.entered = trio.Event()
        self.release = trio.Event()
        self.syncs = 0

    async def pwrite(self, offset: int, data: Buffer) -> None:
        if offset == self.gate_offset:
            self.entered.set()
            await self.release.wait()
        await self.inner.pwrite(offset, data)

    async def fdatasync(self) -> None:
        self.syncs += 1
        await self.inner.fdatasync()


@pytest.mark.parametrize("in_cluster", [0, 100, 4000])
async def test_flush_during_a_suspended_data_write_does_not_mark_it_synced(
    in_cluster: int,
) -> None:
    memory = MemoryImage()
    await create_image(memory, 16 * MiB, cluster_size=4096, table_size=1)
    gated = GatedFile(memory)
    img = await open_image(gated)
    await img.write(0, b"\x01" * 4096)
    await img.flush()
    host = peek_u64(memory.data, peek_u64(memory.data, img.header.l1_table_offset))
    gated.gate_offset = host + in_cluster
    async with trio.open_nursery() as nursery:
        nursery.start_soon(img.write, in_cluster, b"\x02" * 96)
        await gated.entered.wait()
        await img.flush()  # runs while the pwrite is suspended
        gated.release.set()
    before = gated.syncs
    await img.flush()  # the write completed after the last sync: it must be synced now
    assert gated.syncs == before + 1
    await img.close()


# ---------------------------------------------------------------------------- finding 8


class FullDisk(Wrapper):
    """A file on a disk with ``limit`` bytes: writes past it are cut short with ENOSPC."""

    def __init__(self, inner: MemoryImage, limit: int) -> None:
        super().__init__(inner)
        self.limit = limit
        self.refused = 0
        self.mem = inner

    async def pwrite(self, offset: int, data: Buffer) -> None:
        end = offset + len(data)
        if end > max(self.limit, len(self.mem.data)):
            keep = max(0, self.limit - offset)
            if keep:
                await self.inner.pwrite(offset, memoryview(data)[:keep])
            self.refused += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        await self.inner.pwrite(offset, data)

    async def ftruncate(self, size: int) -> None:
        if size > max(self.limit, len(self.mem.data)):
            raise OSError(errno.ENOSPC, "No space left on device")
        await self.inner.ftruncate(size)


@pytest.mark.parametrize(("cs", "ts"), [(4096, 1), (4096, 4), (65536, 1), (65536, 4)])
@pytest.mark.parametrize("room_clusters", [0, 1, 2, 5, 17])
@pytest.mark.parametrize("write_size", [512, 4096, 3 * 65536 + 100])
async def test_full_disk_refuses_writes_and_loses_nothing(
    cs: int, ts: int, room_clusters: int, write_size: int
) -> None:
    memory = MemoryImage()
    geo = fmt.Geometry(cs, ts, 1)
    size = min(geo.max_image_size, 6 * geo.l2_coverage)
    await create_image(memory, size, cluster_size=cs, table_size=ts)
    disk = FullDisk(memory, len(memory.data) + room_clusters * cs + cs // 2)
    img = await open_image(disk)
    model = Model(size)
    rng = random.Random(cs * 31 + ts * 7 + room_clusters + write_size)
    positions = [rng.randrange(0, size - write_size) for _ in range(40)]
    refused = 0
    for n, pos in enumerate(positions):
        data = pattern(pos, write_size, seed=n)
        try:
            await img.write(pos, data)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC  # noqa: PT017 - a loop, not one expected raise
            refused += 1
            model.unknown(pos, write_size)
        else:
            model.write(pos, data)
        assert not img.failsafe
        if n % 7 == 3:
            await img.flush()  # a flush never needs new space
    assert refused, "the disk never filled"
    assert disk.refused
    assert len(memory.data) <= disk.limit
    await model.verify(img)
    await img.flush()
    await model.verify(img)
    # space freed: the writes that failed now succeed and everything lands
    disk.limit = 1 << 40
    for n, pos in enumerate(positions[:10]):
        data = pattern(pos, write_size, seed=1000 + n)
        await img.write(pos, data)
        model.write(pos, data)
    await img.close()
    report = await check_image(MemoryImage(memory.data))
    assert (report.corruptions, report.leaks, report.need_check) == (0, 0, False), (
        report.summary_line()
    )
    img = await reopen(img, close=False)
    await model.verify(img)
    await img.close()


# ---------------------------------------------------------------------------- finding 7


async def _flushed_image(cs: int = 4096, ts: int = 2) -> QedImage:
    memory = MemoryImage()
    await create_image(memory, 64 * MiB, cluster_size=cs, table_size=ts)
    img = await open_image(memory)
    for k in range(6):
        await img.write(k * 5 * cs, pattern(k, cs))
    await img.flush()
    await img.write(cs * 40, pattern(9, 100))  # dirty again: an allocation in flight
    return img


def _truncations(img: QedImage) -> list[int]:
    end = img.allocator_end
    cs = img.cluster_size
    return [0, 64, cs, img.header.l1_table_offset + 8, end - 3 * cs, end - cs, end - 1]


MUTATIONS = (
    [f"truncate:{i}" for i in range(7)]
    + [f"header:{off}" for off in (0, 4, 8, 12, 16, 24, 32, 40, 48, 56, 63)]
    + ["l1:zero", "l1:flip", "l1:unused-entry", "unlinked"]
)


async def _mutate(img: QedImage, mutation: str) -> None:
    memory = raw(img)
    what, _, arg = mutation.partition(":")
    l1 = img.header.l1_table_offset
    if what == "truncate":
        del memory[_truncations(img)[int(arg)] :]
    elif what == "header":
        memory[int(arg)] ^= 0x10
    elif what == "l1":
        if arg == "zero":
            memory[l1 : l1 + img.geometry.table_bytes] = bytes(img.geometry.table_bytes)
        elif arg == "flip":
            memory[l1 + 1] ^= 0x01
        else:
            poke_u64(memory, l1 + 8 * 7, 0x123456000)
    else:

        async def gone() -> bool:
            return False

        img.file.still_named = gone  # type: ignore[attr-defined]


@pytest.mark.parametrize("mutation", MUTATIONS)
@pytest.mark.parametrize("then", ["flush", "write-flush", "write-last-cluster-flush"])
@pytest.mark.expect_log(
    r"failsafe mode: the image file was changed by someone else( \(before the flush\))?: "
)
async def test_image_changed_under_the_engine_fails_the_flush(mutation: str, then: str) -> None:
    img = await _flushed_image()
    await _mutate(img, mutation)
    with pytest.raises(QedError) as info:  # noqa: PT012 - the write or the flush fails
        if then != "flush":
            # in place: the last cluster re-extends a truncated file to its old length
            pos = 25 * 4096 if then == "write-last-cluster-flush" else 0
            await img.write(pos, b"\x77" * 4096)
        await img.flush()
    assert info.value.errno == errno.EIO
    assert img.failsafe
    snapshot = bytes(raw(img))
    with pytest.raises(FailsafeError):
        await img.flush()
    await img.close()
    assert bytes(raw(img)) == snapshot, "wrote into a file that is no longer ours"


async def test_untouched_image_flushes_fine() -> None:
    """The checks themselves never fire on our own writes (many flushes, all paths)."""
    img = await _flushed_image(cs=4096, ts=1)
    rng = random.Random(5)
    for n in range(200):
        pos = rng.randrange(0, 64 * MiB - 9000)
        await img.write(pos, pattern(pos, rng.choice([1, 512, 9000]), seed=n))
        if n % 3 == 0:
            await img.flush()
    await img.resize(128 * MiB)
    await img.write(100 * MiB, b"x" * 5000)
    await img.close()
    assert not img.failsafe


class _HugeSparse(Wrapper):
    """A file that claims to be ``length`` bytes long (reads past the data are zeros)."""

    def __init__(self, inner: MemoryImage, length: int) -> None:
        super().__init__(inner)
        self.length = length

    async def size(self) -> int:
        return self.length


@pytest.mark.parametrize(("cs", "length", "ok"), [(4096, 3 << 40, True), (4096, 5 << 40, False)])
async def test_files_too_large_to_track_are_refused_in_one_line(
    cs: int, length: int, ok: bool
) -> None:
    memory = MemoryImage()
    await create_image(memory, 1 << 30, cluster_size=cs, table_size=16)
    file = _HugeSparse(memory, length)
    if ok:
        img = await open_image(file, read_only=True)
        assert await img.read(0, 512) == bytes(512)
        await img.close()
        return
    with pytest.raises(LimitError, match=r"^image file too large: [^\n]*$"):
        await open_image(file, read_only=True)


@pytest.mark.parametrize("cs", [4096, 8192])  # files of 4 and 8 TiB: ext4 holds 16 TiB
async def test_engine_and_checker_share_one_file_size_limit(tmp_path: Path, cs: int) -> None:
    """The engine accepted files the checker refused (2^32 vs 2^31 clusters), so a crash
    made an image nothing could repair (an outside review).  One limit now: a file one
    cluster over it is refused by both, with one line each; one at it opens."""
    from qedfuse.check import check_image
    from qedfuse.errors import LimitError
    from qedfuse.tables import MAX_FILE_CLUSTERS

    for n_clusters, opens in ((MAX_FILE_CLUSTERS + 1, False), (MAX_FILE_CLUSTERS, True)):
        path = tmp_path / f"big-{n_clusters}.qed"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        file = FileImage(fd, read_only=False)
        size = min(1 << 40, fmt.Geometry(cs, 4).max_image_size)
        await create_image(file, size, cluster_size=cs, table_size=4)
        await file.aclose()
        os.truncate(path, n_clusters * cs)  # a sparse trailing leak
        if opens:
            img = await open_image(FileImage.open(path, read_only=True), read_only=True)
            await img.close()
            continue
        with pytest.raises(LimitError, match="too large") as info:
            await open_image(FileImage.open(path, read_only=True), read_only=True)
        assert "\n" not in str(info.value)
        report = await check_image(FileImage.open(path, read_only=True))
        assert report.check_errors == 1
        assert "more than the checker's limit" in report.messages[0]
        path.unlink()
