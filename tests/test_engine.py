"""Tests for the cluster-mapping engine (qedfuse.engine) on in-memory images.

Reads/writes of every shape, copy-on-write and zero fill, zero detection, the physical layout
QEMU produces, QEMU bugs B and E (docs/qemu-differences.md#bug-b, #bug-e), the ordered flush's
exact I/O sequence, hostile tables, failsafe after a failed flush, the L2 cache bound, feature
bits and repair on open.
"""

from __future__ import annotations

import errno
import random
import struct

import pytest
from enginehelpers import (
    FaultyFile,
    GiB,
    KiB,
    MiB,
    Model,
    PatternSource,
    RecordingFile,
    assert_raw_clean,
    header_of,
    need_check_on_disk,
    new_image,
    open_bytes,
    pattern,
    peek_u64,
    poke_u64,
    raw,
    read_all,
    reopen,
    sha,
    walk,
)

from qedfuse import format as fmt
from qedfuse.engine import Extent, Kind, OpenOptions, QedImage
from qedfuse.errors import (
    CorruptionError,
    FailsafeError,
    FormatError,
    OutOfRangeError,
    QedError,
    ReadOnlyError,
)
from qedfuse.imagefile import MemoryImage
from qedfuse.opening import open_image
from qedfuse.tables import create_image

FEATURES_OFFSET = 16
NEED_CHECK = int(fmt.Feature.NEED_CHECK)


async def assert_consistent(img: QedImage, model: Model) -> None:
    """The engine's view, the raw bytes (independent walk) and the checker all agree."""
    assert await read_all(img) == model.read(0, model.size)
    await assert_raw_clean(img, model)


# ---------------------------------------------------------------------------- basic I/O


async def test_fresh_image_reads_zeros() -> None:
    img = await new_image(3 * MiB + 1536, cs=4096, ts=1)
    assert img.image_size == 3 * MiB + 1536
    assert await read_all(img) == bytes(3 * MiB + 1536)
    assert await img.read(1234567, 99999) == bytes(99999)
    assert await img.extents() == [Extent(Kind.UNALLOCATED, 0, 3 * MiB + 1536)]
    assert await img.allocated_bytes() == 0
    assert len(raw(img)) == 2 * 4096  # nothing was allocated by reading
    await img.close()


@pytest.mark.parametrize(
    ("pos", "size"),
    [
        (0, 1),
        (0, 4096),
        (1, 4095),
        (4095, 2),
        (4096 - 512, 1024),
        (3 * 4096 + 17, 5 * 4096 + 33),  # crosses several clusters, unaligned both ends
        (2 * MiB - 1, 2),  # crosses an L2 table boundary (ts=1: 2 MiB per table)
        (2 * MiB - 4096, 8192),
        (2 * MiB - 3000, 3 * MiB),  # spans a whole L2 table
        (5 * MiB, 1536),  # the image's partial last cluster
        (6 * MiB - 1, 1537),  # up to the last byte
    ],
)
async def test_write_any_alignment(pos: int, size: int) -> None:
    image_size = 6 * MiB + 1536
    img = await new_image(image_size, cs=4096, ts=1)
    model = Model(image_size)
    # Something already allocated around the target, to catch an overwrite of neighbours.
    for p in (0, 2 * MiB + 4096, 6 * MiB):
        data = pattern(p, 700, seed=3)
        await img.write(p, data)
        model.write(p, data)
    data = pattern(pos, size, seed=1)
    await img.write(pos, data)
    model.write(pos, data)
    assert await img.read(pos, size) == data
    assert await img.read(max(0, pos - 5000), size + 10000) == model.read(
        max(0, pos - 5000), size + 10000
    )
    await img.flush()
    await assert_consistent(img, model)
    img = await reopen(img)
    await assert_consistent(img, model)
    await img.close()


async def test_random_writes_against_model() -> None:
    rng = random.Random(1234)
    image_size = 9 * MiB + 512
    img = await new_image(image_size, cs=4096, ts=2)  # 4 MiB per L2 table
    model = Model(image_size)
    for step in range(150):
        pos = rng.choice(
            [rng.randrange(image_size), rng.randrange(3) * 4 * MiB + rng.randrange(-9000, 9000)]
        )
        pos = min(max(pos, 0), image_size - 1)
        size = min(rng.choice([1, 511, 4096, 5000, 20000, 70000]), image_size - pos)
        data = bytes(size) if rng.random() < 0.2 else pattern(pos, size, seed=step)
        await img.write(pos, data)
        model.write(pos, data)
        if step % 25 == 0:
            q = rng.randrange(image_size)
            assert await img.read(q, 30000) == model.read(q, 30000)
    await img.flush()
    await assert_consistent(img, model)
    img = await reopen(img)
    await assert_consistent(img, model)
    await img.close()


async def test_write_bounds() -> None:
    size = 1 * MiB + 512
    img = await new_image(size, cs=4096)
    await img.write(size - 1, b"\x7f")
    assert await img.read(size - 1, 1) == b"\x7f"
    await img.write(size, b"")  # empty write at the end: nothing to do
    file_size = len(raw(img))
    for pos, data in [(size - 1, b"ab"), (size, b"a"), (size + 4096, b"a"), (-1, b"a")]:
        with pytest.raises(OutOfRangeError):
            await img.write(pos, data)
    with pytest.raises(OutOfRangeError):
        await img.write(size - 4096, bytes(8192))
    assert len(raw(img)) == file_size  # the failed writes allocated nothing
    assert await img.read(size - 4096, 4096) == bytes(4095) + b"\x7f"
    await img.close()


async def test_write_zeroes_past_end_changes_nothing() -> None:
    size = 9 * MiB  # more than one 4 MiB zero chunk
    img = await new_image(size, cs=4096)
    data = pattern(0, size, seed=5)
    await img.write(0, data)
    with pytest.raises(OutOfRangeError):
        await img.write_zeroes(0, size + 512)
    with pytest.raises(OutOfRangeError):
        await img.write_zeroes(-512, 1024)
    assert await read_all(img) == data, "a refused write_zeroes must not zero anything"
    await img.close()


async def test_read_past_end_is_short() -> None:
    size = 64 * KiB + 1536
    img = await new_image(size, cs=4096)
    await img.write(size - 100, b"x" * 100)
    assert await img.read(size - 10, 100) == b"x" * 10
    assert await img.read(size, 10) == b""
    assert await img.read(size + 4096, 10) == b""
    assert await img.read(0, 10 * size) == bytes(size - 100) + b"x" * 100
    assert await img.read_padded(size - 2, 6) == b"xx" + bytes(4)
    with pytest.raises(OutOfRangeError):
        await img.read(-1, 10)
    await img.close()


async def test_closed_and_read_only_images() -> None:
    img = await new_image(1 * MiB, cs=4096)
    await img.write(0, b"data")
    await img.close()
    with pytest.raises(QedError):
        await img.read(0, 1)
    ro = await open_bytes(raw(img), read_only=True)
    with pytest.raises(ReadOnlyError):
        await ro.write(0, b"x")
    with pytest.raises(ReadOnlyError):
        await ro.resize(2 * MiB)
    await ro.flush()  # a no-op, not an error
    assert await ro.read(0, 4) == b"data"
    await ro.close()


# ---------------------------------------------------------------------------- fill and zeroes


async def test_partial_cluster_write_zero_fills_rest_iotest_027() -> None:
    cs = 4096
    img = await new_image(1 * MiB, cs=cs, ts=2)
    # A trailing partial cluster of garbage: ignored by the allocator and overwritten by the
    # next allocation, so the zero fill must really write zeros over it.
    end = len(raw(img))
    raw(img).extend(b"\xee" * 3000)
    await img.close()
    img = await open_bytes(raw(img))
    assert img.allocator_end == end
    await img.write(1024, b"\xab" * 512)
    data = raw(img)
    cluster = bytes(data[end : end + cs])
    assert cluster == bytes(1024) + b"\xab" * 512 + bytes(cs - 1536)
    assert await img.read(0, cs) == cluster
    # A second sub-cluster write in the same cluster is in place and keeps the first.
    await img.write(3000, b"\xcd" * 100)
    assert await img.read(0, cs) == bytes(1024) + b"\xab" * 512 + bytes(1464) + b"\xcd" * 100 + (
        bytes(cs - 3100)
    )
    assert img.stats.allocated_clusters == 1
    await img.close()


async def test_zero_cluster_entries_read_as_zeros_and_hide_backing() -> None:
    cs = 4096
    backing = PatternSource(1 * MiB, fill=0x55)
    img = await new_image(1 * MiB, cs=cs, backing=backing, backing_name=b"base.raw")
    await img.write(0, b"\x11" * cs)  # allocate L2 table
    await img.flush()
    l2_offset = peek_u64(raw(img), cs)  # L1[0]
    assert l2_offset > 0
    data = raw(img)
    poke_u64(data, l2_offset + 3 * 8, fmt.ZERO_CLUSTER)
    poke_u64(data, l2_offset + 4 * 8, fmt.ZERO_CLUSTER)
    data_offset = peek_u64(data, l2_offset)
    img = await reopen(img, backing=PatternSource(1 * MiB, fill=0x55))
    assert await img.read(3 * cs - 10, 2 * cs + 20) == b"\x55" * 10 + bytes(2 * cs) + b"\x55" * 10
    assert await img.extents(0, 6 * cs) == [
        Extent(Kind.DATA, 0, cs, data_offset),
        Extent(Kind.UNALLOCATED, cs, 2 * cs),
        Extent(Kind.ZERO, 3 * cs, 2 * cs),
        Extent(Kind.UNALLOCATED, 5 * cs, cs),
    ]
    await img.close()


async def test_zero_detection_allocates_nothing_without_backing() -> None:
    cs = 4096
    img = await new_image(4 * MiB, cs=cs, ts=2)
    size_before = len(raw(img))
    await img.write(8 * cs, bytes(cs))  # full cluster of zeros
    await img.write(20 * cs + 100, bytes(1000))  # partial cluster of zeros
    await img.write(30 * cs, bytes(5 * cs))  # several clusters of zeros
    assert img.stats.allocated_clusters == 0
    assert img.stats.new_l2_tables == 0
    assert img.stats.zero_writes_skipped == 1 + 1 + 5
    assert len(raw(img)) == size_before
    assert not img.has_dirty_metadata
    assert not need_check_on_disk(img), "nothing changed, so nothing to mark dirty"
    # Mixed: only the non-zero cluster is allocated.
    await img.write(40 * cs, bytes(cs) + b"\x01" + bytes(cs - 1) + bytes(cs))
    assert img.stats.allocated_clusters == 1
    assert (await img.extents(40 * cs, 3 * cs))[1].kind is Kind.DATA
    assert [e.kind for e in await img.extents(40 * cs, 3 * cs)] == [
        Kind.UNALLOCATED,
        Kind.DATA,
        Kind.UNALLOCATED,
    ]
    # Zeros over an allocated cluster are written in place (the entry stays DATA).
    await img.write(41 * cs, bytes(cs))
    assert await img.read(41 * cs, cs) == bytes(cs)
    assert img.stats.allocated_clusters == 1
    # Detection off (per call and per image): zeros are allocated like any data.
    await img.write(50 * cs, bytes(cs), detect_zeroes=False)
    assert img.stats.allocated_clusters == 2
    await img.close()
    img2 = await new_image(4 * MiB, cs=cs, options=OpenOptions(detect_zeroes=False))
    await img2.write(0, bytes(cs))
    assert img2.stats.allocated_clusters == 1
    await img2.close()


async def test_write_zeroes_without_backing() -> None:
    cs = 4096
    img = await new_image(2 * MiB, cs=cs)
    model = Model(2 * MiB)
    data = pattern(0, 10 * cs, seed=2)
    await img.write(0, data)
    model.write(0, data)
    allocated = img.stats.allocated_clusters
    await img.write_zeroes(cs + 100, 3 * cs)  # allocated clusters: zeros in place
    model.write(cs + 100, bytes(3 * cs))
    await img.write_zeroes(20 * cs, 50 * cs + 7)  # unallocated: nothing to do
    model.write(20 * cs, bytes(50 * cs + 7))
    assert img.stats.allocated_clusters == allocated
    assert img.stats.zero_clusters_written == 0
    await img.flush()
    await assert_consistent(img, model)
    await img.close()


async def test_write_zeroes_with_backing_uses_zero_clusters() -> None:
    cs = 4096
    backing = PatternSource(2 * MiB, fill=None)
    img = await new_image(2 * MiB, cs=cs, backing=backing, backing_name=b"base.raw")
    model = Model(2 * MiB, base=backing.content, base_limit=2 * MiB)
    await img.write_zeroes(4 * cs, 3 * cs)  # whole clusters: zero entries, no data
    model.write(4 * cs, bytes(3 * cs))
    assert img.stats.zero_clusters_written == 3
    assert img.stats.allocated_clusters == 0
    assert [e.kind for e in await img.extents(3 * cs, 5 * cs)] == [
        Kind.UNALLOCATED,
        Kind.ZERO,
        Kind.UNALLOCATED,
    ]
    # Unaligned: the partial clusters are allocated and filled from the backing image.
    await img.write_zeroes(10 * cs + 100, 2 * cs)
    model.write(10 * cs + 100, bytes(2 * cs))
    assert img.stats.allocated_clusters == 2
    assert img.stats.zero_clusters_written == 4
    assert await img.read(10 * cs, 3 * cs) == model.read(10 * cs, 3 * cs)
    # Zeroing a zero cluster again changes nothing.
    file_size = len(raw(img))
    await img.write_zeroes(4 * cs, cs)
    assert img.stats.zero_clusters_written == 4
    assert len(raw(img)) == file_size
    await img.flush()
    await assert_consistent(img, model)
    img = await reopen(img, backing=backing)
    await assert_consistent(img, model)
    await img.close()


async def test_partial_write_into_zero_cluster_fills_zeros_qemu_bug_e() -> None:
    cs = 4096
    backing = PatternSource(1 * MiB, fill=0x55)
    img = await new_image(1 * MiB, cs=cs, backing=backing, backing_name=b"base.raw")
    await img.write_zeroes(0, 2 * cs)  # zero clusters over the 0x55 backing data
    assert await img.read(0, 2 * cs) == bytes(2 * cs)
    await img.write(cs + 1024, b"\xaa" * 512)  # partial write into a ZERO cluster
    expected = bytes(1024) + b"\xaa" * 512 + bytes(cs - 1536)
    assert await img.read(cs, cs) == expected
    # The unallocated neighbour still COWs from the backing image (the contrast).
    await img.write(3 * cs + 1024, b"\xbb" * 512)
    assert await img.read(3 * cs, cs) == b"\x55" * 1024 + b"\xbb" * 512 + b"\x55" * (cs - 1536)
    await img.flush()
    img = await reopen(img, backing=PatternSource(1 * MiB, fill=0x55))
    assert await img.read(0, cs) == bytes(cs)
    assert await img.read(cs, cs) == expected
    await img.close()


async def test_unaligned_image_size_allocates_last_cluster_whole() -> None:
    cs = 4096
    size = 3 * cs + 1536
    img = await new_image(size, cs=cs)
    start = len(raw(img))
    await img.write(size - 512, b"\x99" * 512)
    # data cluster + new L2 table (ts=2): the whole last cluster was allocated, and the
    # table's space is taken when it is created (issue 11, finding 8), not at flush time
    assert len(raw(img)) == start + 3 * cs
    assert img.allocator_end == start + cs + 2 * cs
    cluster = bytes(raw(img)[start : start + cs])
    assert cluster == bytes(1024) + b"\x99" * 512 + bytes(cs - 1536)
    await img.flush()
    assert len(raw(img)) == start + 3 * cs
    await img.close()
    # Same with a backing file longer than the image: the fill past the end is backing data
    # (invisible), the visible part correct.
    backing = PatternSource(1 * MiB, fill=0x44)
    img = await new_image(size, cs=cs, backing=backing, backing_name=b"b")
    await img.write(size - 512, b"\x99" * 512)
    assert await img.read(3 * cs, 2 * cs) == b"\x44" * 1024 + b"\x99" * 512
    await img.close()


# ---------------------------------------------------------------------------- layout


async def test_physical_layout_matches_qemu_default_geometry() -> None:
    # qed-format.md §2.5 and §10.5: default 1G image, write -P 0xab 0 64k,
    # write -P 0xcd 1M 4k, write -P 0xef 512M 512.
    img = await new_image(1 * GiB, cs=65536, ts=4)
    assert len(raw(img)) == 327680
    await img.write(0, b"\xab" * 65536)
    assert img.allocator_end == 0xA0000  # data at 0x50000, L2 at 0x60000..0x9FFFF
    await img.write(1 * MiB, b"\xcd" * 4096)
    await img.write(512 * MiB, b"\xef" * 512)
    await img.close()
    data = raw(img)
    assert len(data) == 0xC0000 == 786432
    assert peek_u64(data, 0x10000) == 0x60000  # L1[0]
    assert peek_u64(data, 0x60000) == 0x50000  # L2[0]
    assert peek_u64(data, 0x60080) == 0xA0000  # L2[16]
    assert peek_u64(data, 0x70000) == 0xB0000  # L2[8192]
    assert bytes(data[0x50000:0x60000]) == b"\xab" * 65536
    assert bytes(data[0xA0000:0xB0000]) == b"\xcd" * 4096 + bytes(61440)
    assert bytes(data[0xB0000:0xC0000]) == b"\xef" * 512 + bytes(65024)
    assert header_of(data)[4] == 0  # clean after close


async def test_physical_layout_worked_example_cs4096_ts2() -> None:
    # §10.5: cs=4096/ts=2, write 0x1234000 4k → L1[4] @0x1020 = 0x4000, L2[564] @0x51A0 = 0x3000.
    img = await new_image(100 * MiB, cs=4096, ts=2)
    assert len(raw(img)) == 0x3000
    await img.write(0x1234000, b"\x42" * 4096)
    await img.close()
    data = raw(img)
    assert peek_u64(data, 0x1020) == 0x4000
    assert peek_u64(data, 0x51A0) == 0x3000
    assert len(data) == 0x6000


async def test_no_extra_l2_entries_qemu_bug_b() -> None:
    cs, ts = 4096, 8  # N = 4096 entries: one L2 table maps 16 MiB
    img = await new_image(64 * MiB, cs=cs, ts=ts)
    base_size = len(raw(img))
    await img.write(4095 * cs, b"\x77" * cs)
    assert img.stats.allocated_clusters == 1
    big = pattern(0, 4095 * cs, seed=9)
    await img.write(0, big)  # 4095 clusters in one request
    assert img.stats.allocated_clusters == 1 + 4095, "no extra clusters reserved"
    assert img.stats.new_l2_tables == 1
    assert await img.read(4095 * cs, cs) == b"\x77" * cs, "neighbouring entry clobbered"
    assert await img.read(4096 * cs, cs) == bytes(cs)
    await img.flush()
    assert len(raw(img)) == base_size + (1 + 4095) * cs + ts * cs
    img = await reopen(img)
    assert await img.read(4095 * cs, cs) == b"\x77" * cs
    assert await img.read(0, 4095 * cs) == big
    w = walk(raw(img))
    assert (w.corruptions, w.leaks, w.n_data) == ([], [], 4096)
    # A run ending exactly at the table's end (QEMU's heap overflow) and one crossing it.
    await img.write(16 * MiB, pattern(16 * MiB, 16 * MiB, seed=4))
    await img.write(32 * MiB - cs, pattern(0, 2 * cs, seed=8))
    await img.close()
    w = walk(raw(img))
    assert (w.corruptions, w.leaks, w.n_data) == ([], [], 4096 + 4096 + 1)


async def test_write_zeroes_16m_with_backing_qemu_bug_b_variant() -> None:
    # `write -z 0 16M` with cs=4096, ts=8 overflowed QEMU's L2 buffer.
    cs, ts = 4096, 8
    backing = PatternSource(64 * MiB, fill=0x33)
    img = await new_image(64 * MiB, cs=cs, ts=ts, backing=backing, backing_name=b"b")
    await img.write_zeroes(0, 16 * MiB)
    assert img.stats.zero_clusters_written == 4096
    assert img.stats.allocated_clusters == 0
    assert await img.read(16 * MiB - 10, 20) == bytes(10) + b"\x33" * 10
    await img.close()
    w = walk(raw(img))
    assert len(w.mapping) == 4096
    assert set(w.mapping.values()) == {1}
    assert (w.corruptions, w.leaks) == ([], [])


# ---------------------------------------------------------------------------- ordered flush


async def test_ordered_flush_exact_sequence() -> None:
    cs, ts = 4096, 2
    img = await new_image(16 * MiB, cs=cs, ts=ts, wrap=RecordingFile)
    rec = img.file
    assert isinstance(rec, RecordingFile)
    rec.take()
    await img.write(0, b"\x5a" * cs)
    data_offset, l2_offset, l1_offset = 3 * cs, 4 * cs, cs
    # the new L2 table's space is taken (its zeros written) when it is created
    assert rec.log == [("W", 0, 64), ("F",), ("W", data_offset, cs), ("W", l2_offset, ts * cs)]
    header_set = rec.writes[0][1]
    assert fmt.Header.unpack(header_set).need_check
    await img.flush()
    assert rec.log == [
        ("W", 0, 64),  # NEED_CHECK set …
        ("F",),  # … and durable before any metadata change
        ("W", data_offset, cs),  # the data
        ("W", l2_offset, ts * cs),  # the new L2 table's space (zeros)
        ("F",),  # data and the table's zeros durable
        ("W", l2_offset, 4096),  # the new L2 table's dirty page
        ("F",),
        ("W", l1_offset, 4096),  # the dirty 4 KiB page of L1
        ("F",),
        ("W", 0, 64),  # NEED_CHECK cleared
        ("F",),
    ]
    assert not fmt.Header.unpack(rec.writes[-1][1]).need_check
    assert peek_u64(raw(img), l1_offset) == l2_offset
    assert peek_u64(raw(img), l2_offset) == data_offset
    # Nothing dirty: no I/O at all.
    rec.take()
    await img.flush()
    assert rec.log == []
    # In-place overwrite: the data write, then one data sync.
    await img.write(100, b"\x01" * 10)
    await img.flush()
    assert rec.take() == [("W", data_offset + 100, 10), ("F",)]
    # A second allocation into the existing L2 table: only the dirty L2 page is written.
    await img.write(700 * cs, b"\x02" * cs)  # entry 700: second 4 KiB page of the table
    await img.flush()
    assert rec.take() == [
        ("W", 0, 64),
        ("F",),
        ("W", 6 * cs, cs),
        ("F",),
        ("W", l2_offset + 4096, 4096),
        ("F",),
        ("W", 0, 64),
        ("F",),
    ]
    await img.close()
    assert rec.take() == []  # close of a clean image writes nothing


async def test_bytes_after_header_struct_never_change() -> None:
    cs = 4096
    img = await new_image(8 * MiB, cs=cs, ts=2)
    marker = b"extra header data \x00\xff qedfuse"
    raw(img)[100 : 100 + len(marker)] = marker
    cluster0 = bytes(raw(img)[64:cs])
    for k in range(5):
        await img.write(k * MiB + 7, pattern(k, 5000, seed=k))
        await img.flush()
    await img.resize(9 * MiB)
    await img.write_zeroes(0, 8192)
    await img.close()
    assert bytes(raw(img)[64:cs]) == cluster0
    assert bytes(raw(img)[100 : 100 + len(marker)]) == marker


async def test_feature_bits_autoclear_and_compat() -> None:
    img = await new_image(4 * MiB, cs=4096)
    await img.write(0, b"x" * 100)
    await img.close()
    data = bytearray(raw(img))
    struct.pack_into("<QQ", data, 24, 0x8, 0xFF)  # compat = 0x8, autoclear = 0xff
    data[200:204] = b"MARK"
    # Read-only open: autoclear bits are kept, nothing is written.
    ro = await open_bytes(data, read_only=True)
    assert ro.header.autoclear_features == 0xFF
    assert await ro.read(0, 100) == b"x" * 100
    assert bytes(raw(ro)) == bytes(data)
    await ro.close()
    # Read-write open: autoclear cleared on disk at once, compat kept, extra data kept.
    rw = await open_bytes(data)
    assert header_of(raw(rw))[6] == 0
    assert header_of(raw(rw))[5] == 0x8
    assert rw.header.autoclear_features == 0
    await rw.write(MiB, b"y" * 5000)
    await rw.flush()
    await rw.close()
    out = raw(rw)
    assert header_of(out)[5] == 0x8
    assert header_of(out)[6] == 0
    assert bytes(out[200:204]) == b"MARK"


# ---------------------------------------------------------------------------- hostile tables


async def _two_table_image() -> tuple[bytearray, dict[str, int]]:
    """cs=4096, ts=2, 16 MiB (4 MiB per L2): guest clusters 0, 1 and 4 MiB written, flushed."""
    cs = 4096
    img = await new_image(16 * MiB, cs=cs, ts=2)
    await img.write(0, b"\x10" * cs)
    await img.write(cs, b"\x11" * cs)
    await img.write(4 * MiB, b"\x40" * cs)
    await img.close()
    data = raw(img)
    w = walk(data)
    assert (w.corruptions, w.leaks) == ([], [])
    l2a, l2b = w.l2_tables
    layout = {
        "l1": cs,
        "l2a": l2a,
        "l2b": l2b,
        "c0": w.mapping[0],
        "c1": w.mapping[1],
        "end": len(data),
    }
    assert layout == {
        "l1": 0x1000,
        "l2a": 0x4000,
        "l2b": 0x8000,
        "c0": 0x3000,
        "c1": 0x6000,
        "end": 0xA000,
    }
    return data, layout


#: A write through a bad entry fails with EIO: either only that range is refused
#: (CorruptionError) or the whole image went to failsafe when the bad table was seen.
REFUSED = (CorruptionError, FailsafeError)


def _without_need_check(data: bytes | bytearray) -> bytes:
    """The bytes with the NEED_CHECK bit masked: a failsafe close may set it, nothing else."""
    out = bytearray(data)
    out[FEATURES_OFFSET] &= ~NEED_CHECK & 0xFF
    return bytes(out)


def _metadata_hash(data: bytes | bytearray, layout: dict[str, int]) -> str:
    cs = 4096
    data = _without_need_check(data)
    parts = [data[0:cs], data[layout["l1"] : layout["l1"] + 2 * cs]]
    parts += [data[layout[k] : layout[k] + 2 * cs] for k in ("l2a", "l2b")]
    return sha(b"".join(bytes(p) for p in parts))


async def _flush_or_failsafe(img: QedImage) -> None:
    if img.failsafe:
        with pytest.raises(FailsafeError):
            await img.flush()
    else:
        await img.flush()


async def _assert_range_refused(img: QedImage, pos: int, layout: dict[str, int]) -> None:
    """Reads and writes touching ``pos``'s cluster fail; no metadata or file size changes."""
    data = raw(img)
    before = _metadata_hash(data, layout)
    size_before = len(data)
    full_before = sha(data)
    with pytest.raises(CorruptionError):
        await img.read(pos, 4096)
    with pytest.raises(CorruptionError):
        await img.read(pos + 4000, 200)
    with pytest.raises(REFUSED):
        await img.write(pos, b"\xff" * 4096)
    with pytest.raises(REFUSED):
        await img.write(pos + 100, b"\xff" * 10)
    with pytest.raises(REFUSED):
        await img.write(pos, bytes(4096))
    with pytest.raises(REFUSED):
        await img.write_zeroes(pos, 4096)
    assert sha(data) == full_before, "a refused write changed the file"
    assert _metadata_hash(data, layout) == before
    assert len(data) == size_before
    # Flush (and close) must not write anything into the metadata either.
    await _flush_or_failsafe(img)
    assert _metadata_hash(data, layout) == before


@pytest.mark.parametrize(
    "target",
    ["l1", "l1+1", "own_l2", "own_l2+1", "other_l2", "eof", "far", "unaligned", "partial"],
)
@pytest.mark.expect_log(
    r"L\d+ table at 0x[0-9a-f]+ has \d+ invalid entries",
    r"entering failsafe mode: L\d+ table at 0x[0-9a-f]+ has \d+ invalid entries",
)
async def test_hostile_l2_entry(target: str) -> None:
    data, layout = await _two_table_image()
    values = {
        "l1": layout["l1"],
        "l1+1": layout["l1"] + 4096,
        "own_l2": layout["l2a"],
        "own_l2+1": layout["l2a"] + 4096,
        "other_l2": layout["l2b"],
        "eof": layout["end"],
        "far": 0x7770000,
        "unaligned": layout["c1"] + 0x200,
        "partial": layout["end"],
    }
    if target == "partial":
        data.extend(b"\xee" * 2000)  # a trailing partial cluster does not count
    poke_u64(data, layout["l2a"] + 2 * 8, values[target])  # guest cluster 2
    img = await open_bytes(data)
    await _assert_range_refused(img, 2 * 4096, layout)
    assert await img.read(0, 4096) == b"\x10" * 4096  # the rest of the table reads fine
    if img.failsafe:
        # Failsafe design: nothing more is written until a repair.
        with pytest.raises(FailsafeError):
            await img.write(3 * 4096, b"\x33" * 4096)
    else:
        # A write spanning from a good cluster into the bad one does the good part only.
        with pytest.raises(CorruptionError):
            await img.write(4096 + 4000, b"\xcc" * 200)
        assert await img.read(4096 + 4000, 96) == b"\xcc" * 96
        # The rest of the table keeps working.
        await img.write(3 * 4096, b"\x33" * 4096)
        assert await img.read(3 * 4096, 4096) == b"\x33" * 4096
    await img.close()
    # The bad entry is kept as it is (repair is check's job), L1 untouched.
    assert peek_u64(raw(img), layout["l2a"] + 2 * 8) == values[target]
    assert bytes(raw(img)[layout["l1"] : layout["l1"] + 16]) == struct.pack(
        "<QQ", layout["l2a"], layout["l2b"]
    )


@pytest.mark.expect_log(
    r"\d+ invalid L\d+ entries; the guest ranges they map will fail with EIO",
    r"entering failsafe mode: \d+ invalid L\d+ entries",
    r"L\d+ table at 0x[0-9a-f]+ has \d+ invalid entries",
)
async def test_hostile_l2_entry_pointing_into_header() -> None:
    cs = 4096
    header = fmt.new_header(8 * MiB, cluster_size=cs, table_size=2).replace(
        header_size=2, l1_table_offset=2 * cs
    )
    data = bytearray(header.pack()) + bytearray(4 * cs - 64)
    img = await open_bytes(data)
    await img.write(0, b"\x10" * cs)
    await img.close()
    data = raw(img)
    l2 = peek_u64(data, 2 * cs)
    assert l2 >= 4 * cs
    poke_u64(data, l2 + 8, cs)  # guest cluster 1 -> the second header cluster
    poke_u64(data, 2 * cs + 8, cs)  # L1[1] -> the second header cluster
    img = await open_bytes(data)
    digest = sha(_without_need_check(raw(img)))
    for pos in (cs, 4 * MiB):
        with pytest.raises(CorruptionError):
            await img.read(pos, cs)
        with pytest.raises(REFUSED):
            await img.write(pos, b"\xff" * cs)
    await _flush_or_failsafe(img)
    await img.close()
    assert sha(_without_need_check(raw(img))) == digest


@pytest.mark.parametrize(
    "target", ["one", "unaligned", "eof", "far", "runs_past_eof", "l1", "l1+1", "data"]
)
@pytest.mark.expect_log(
    r"\d+ invalid L\d+ entries; the guest ranges they map will fail with EIO",
    r"entering failsafe mode: \d+ invalid L\d+ entries",
)
async def test_hostile_l1_entry(target: str) -> None:
    data, layout = await _two_table_image()
    values = {
        "one": 1,
        "unaligned": layout["l2b"] + 0x200,
        "eof": layout["end"],
        "far": 2**63,
        "runs_past_eof": layout["end"] - 4096,  # ts=2: second cluster at EOF
        "l1": layout["l1"],
        "l1+1": layout["l1"] + 4096,
        "data": layout["c0"],  # a data cluster (+ next) used as an L2 table
    }
    poke_u64(data, layout["l1"] + 2 * 8, values[target])  # L1[2]: guest 8..12 MiB
    img = await open_bytes(data)
    if target == "data":
        # Cross-linked: the L2 "table" at c0 spans c0 and l2a, so L2 A's own mapping and
        # guest cluster 0 are unusable; writing there would rewrite another table.
        with pytest.raises(CorruptionError):
            await img.read(0, 4096)
        with pytest.raises(REFUSED):
            await img.write(0, b"\xff" * 4096)
    else:
        await _assert_range_refused(img, 8 * MiB, layout)
        await _assert_range_refused(img, 12 * MiB - 4096, layout)
        assert await img.read(0, 4096) == b"\x10" * 4096
        assert await img.read(4 * MiB, 4096) == b"\x40" * 4096
    await img.close()


@pytest.mark.expect_log(
    r"\d+ invalid L\d+ entries; the guest ranges they map will fail with EIO",
    r"entering failsafe mode: \d+ invalid L\d+ entries",
)
async def test_two_l1_entries_sharing_an_l2_table() -> None:
    data, layout = await _two_table_image()
    poke_u64(data, layout["l1"] + 2 * 8, layout["l2b"])  # L1[2] = L1[1]
    img = await open_bytes(data)
    for pos in (4 * MiB, 8 * MiB):
        await _assert_range_refused(img, pos, layout)
    assert await img.read(0, 4096) == b"\x10" * 4096
    await img.close()


@pytest.mark.expect_log(
    r"\d+ invalid L\d+ entries; the guest ranges they map will fail with EIO",
    r"entering failsafe mode: \d+ invalid L\d+ entries",
    r"L\d+ table at 0x[0-9a-f]+ has \d+ invalid entries",
)
async def test_l2_entry_pointing_at_a_table_shared_by_two_l1_entries() -> None:
    # The shared table's L1 entries are refused, but its clusters are still L2 metadata: a
    # data entry elsewhere that points at them must not be written through.
    data, layout = await _two_table_image()
    poke_u64(data, layout["l1"] + 2 * 8, layout["l2b"])  # L1[2] = L1[1]
    poke_u64(data, layout["l2a"] + 2 * 8, layout["l2b"])  # guest cluster 2 -> that table
    img = await open_bytes(data)
    await _assert_range_refused(img, 2 * 4096, layout)
    await img.close()


# ---------------------------------------------------------------------------- failsafe


async def _failsafe_image() -> tuple[QedImage, FaultyFile, Model]:
    cs = 4096
    img = await new_image(16 * MiB, cs=cs, ts=2, wrap=FaultyFile)
    model = Model(16 * MiB)
    for pos in (0, 5 * MiB):
        await img.write(pos, pattern(pos, 3 * cs, seed=1))
        model.write(pos, pattern(pos, 3 * cs, seed=1))
    await img.flush()
    faulty = img.file
    assert isinstance(faulty, FaultyFile)
    return img, faulty, model


async def _dirty_workload(img: QedImage) -> None:
    await img.write(100, b"\xaa" * 100)  # in place
    await img.write(64 * 1024, b"\xbb" * 5000)  # existing L2, new data
    await img.write(9 * MiB, b"\xcc" * 5000)  # new L2 table


async def _assert_failsafe(img: QedImage, faulty: FaultyFile) -> None:
    assert img.failsafe
    with pytest.raises(FailsafeError):
        await img.write(0, b"x")
    with pytest.raises(FailsafeError):
        await img.write(13 * MiB, b"x")
    with pytest.raises(FailsafeError):
        await img.flush()
    with pytest.raises(FailsafeError):
        await img.resize(32 * MiB)
    # Reads show exactly what a fresh read-only open of the same bytes shows.
    fresh = await open_bytes(raw(img), read_only=True)
    assert await read_all(img) == await read_all(fresh)
    await fresh.close()
    snapshot = _without_need_check(raw(img))
    await img.close()
    # A failsafe close writes nothing, except perhaps setting NEED_CHECK.
    assert _without_need_check(raw(img)) == snapshot, "close in failsafe wrote data or metadata"


@pytest.mark.parametrize("n_sync", [2, 3, 4, 5])
@pytest.mark.expect_log(
    r"entering failsafe mode: flush failed: \[Errno \d+\] injected fdatasync failure"
)
async def test_failed_fdatasync_in_flush_enters_failsafe(n_sync: int) -> None:
    img, faulty, _model = await _failsafe_image()
    faulty.arm()
    await _dirty_workload(img)
    assert faulty.n_syncs == 1  # NEED_CHECK made durable
    faulty.arm(sync=n_sync - 1)
    with pytest.raises(OSError, match="injected") as info:
        await img.flush()
    assert info.value.errno == errno.EIO
    if n_sync < 5:
        assert need_check_on_disk(img)
    else:
        # The header write went out before its sync failed; everything before it was synced,
        # so a clear bit is still truthful.
        w = walk(raw(img))
        assert (w.corruptions, w.leaks) == ([], [])
    await _assert_failsafe(img, faulty)


@pytest.mark.expect_log(
    r"entering failsafe mode: flush failed: \[Errno \d+\] injected pwrite failure"
)
async def test_failed_pwrite_in_flush_enters_failsafe() -> None:
    n_failed = 0
    for n_write in range(1, 20):
        img, faulty, _model = await _failsafe_image()
        await _dirty_workload(img)
        faulty.arm(write=n_write)
        try:
            await img.flush()
        except OSError as exc:
            error: OSError | None = exc
        else:
            error = None
        if error is not None:
            assert error.errno == errno.EIO
            n_failed += 1
            assert need_check_on_disk(img)
            await _assert_failsafe(img, faulty)
            continue
        assert not faulty.failed
        assert not img.failsafe
        await img.close()
        break
    assert n_failed >= 4  # two L2 tables, L1, header


# ---------------------------------------------------------------------------- cache


async def test_l2_cache_stays_bounded_and_flushes_dirty_tables() -> None:
    cs, ts = 4096, 1  # 4 KiB tables, 2 MiB per table
    n_tables = 32
    image_size = n_tables * 2 * MiB
    img = await new_image(image_size, cs=cs, ts=ts, options=OpenOptions(cache_size=3 * 4096))
    cache = img.cache
    assert cache.capacity == 3
    model = Model(image_size)
    rng = random.Random(5)
    order = list(range(n_tables)) * 2
    rng.shuffle(order)
    max_len = 0
    for step, t in enumerate(order):
        pos = t * 2 * MiB + rng.randrange(2 * MiB - 8192)
        data = pattern(pos, 5000, seed=step)
        await img.write(pos, data)
        model.write(pos, data)
        max_len = max(max_len, len(cache))
        assert cache.n_dirty <= cache.capacity
        assert len(cache) <= cache.capacity + 1
        if step % 7 == 0:
            q = rng.randrange(image_size - 10000)
            assert await img.read(q, 10000) == model.read(q, 10000)
            assert len(cache) <= cache.capacity + 1
    assert img.stats.flushes >= n_tables // cache.capacity - 1
    assert max_len <= cache.capacity + 1
    assert await read_all(img) == model.read(0, image_size)
    assert len(cache) <= cache.capacity + 1
    await img.flush()
    await assert_consistent(img, model)
    img = await reopen(img, options=OpenOptions(cache_size=1))
    assert img.cache.capacity == 2
    await assert_consistent(img, model)
    await img.close()


# ---------------------------------------------------------------------------- resize


async def test_resize_grow_reads_zeros_and_refuses_bad_sizes() -> None:
    cs = 4096
    img = await new_image(1 * MiB + 1536, cs=cs, ts=1)  # 1 GiB max
    await img.write(1 * MiB, b"\x66" * 1536)
    with pytest.raises(OutOfRangeError, match="Shrinking"):
        await img.resize(1 * MiB)
    with pytest.raises(OutOfRangeError):
        await img.resize(3 * MiB + 1)
    with pytest.raises(OutOfRangeError):
        await img.resize(1 * GiB + 512)
    await img.resize(1 * GiB)
    assert img.image_size == 1 * GiB
    assert header_of(raw(img))[8] == 1 * GiB
    assert await img.read(1 * MiB, 2 * cs) == b"\x66" * 1536 + bytes(2 * cs - 1536)
    await img.write(1 * GiB - 1, b"\x01")
    img = await reopen(img)
    assert img.image_size == 1 * GiB
    assert await img.read(1 * GiB - 2, 2) == b"\x00\x01"
    await img.close()


async def test_resize_over_larger_backing_hides_it() -> None:
    cs = 4096
    backing = PatternSource(1 * MiB, fill=0x55)
    img = await new_image(64 * KiB + 512, cs=cs, backing=backing, backing_name=b"b")
    assert await img.read(64 * KiB, 512) == b"\x55" * 512
    await img.resize(2 * MiB)
    assert await img.read(64 * KiB, 1024) == b"\x55" * 512 + bytes(512)
    assert await img.read(64 * KiB + 4096, 1 * MiB) == bytes(1 * MiB)
    img = await reopen(img, backing=PatternSource(1 * MiB, fill=0x55))
    assert await img.read(64 * KiB, 1024) == b"\x55" * 512 + bytes(512)
    assert await img.read(0, 2 * MiB) == b"\x55" * (64 * KiB + 512) + bytes(
        2 * MiB - 64 * KiB - 512
    )
    await img.close()


# ---------------------------------------------------------------------------- NEED_CHECK


async def _dirty_image_with_bad_entry() -> bytearray:
    data, layout = await _two_table_image()
    poke_u64(data, layout["l2a"] + 2 * 8, 0x7770000)  # guest cluster 2: past EOF
    data[FEATURES_OFFSET] |= NEED_CHECK
    return data


@pytest.mark.expect_log(r"L\d+ table at 0x[0-9a-f]+ has \d+ invalid entries")
async def test_read_only_open_of_need_check_image_never_writes() -> None:
    data = await _dirty_image_with_bad_entry()
    memory = MemoryImage(data, read_only=True)
    rec = RecordingFile(memory)
    img = await open_image(rec, read_only=True)
    assert img.header.need_check
    assert await img.read(0, 4096) == b"\x10" * 4096
    with pytest.raises(CorruptionError):
        await img.read(2 * 4096, 4096)
    await img.close()
    assert rec.log == []
    assert memory.data == data


@pytest.mark.expect_log(r"image had NEED_CHECK set; repaired on open: ")
async def test_read_write_open_of_need_check_image_repairs() -> None:
    data = await _dirty_image_with_bad_entry()
    img = await open_bytes(data)
    assert not need_check_on_disk(img), "repair on open clears NEED_CHECK"
    assert not img.header.need_check
    assert peek_u64(raw(img), 0x4000 + 2 * 8) == 0, "the invalid entry was zeroed"
    assert await img.read(0, 3 * 4096) == b"\x10" * 4096 + b"\x11" * 4096 + bytes(4096)
    await img.write(2 * 4096, b"\x22" * 4096)
    await img.close()
    w = walk(raw(img))
    assert (w.corruptions, w.leaks) == ([], [])


@pytest.mark.expect_log(
    r"L\d+ table at 0x[0-9a-f]+ has \d+ invalid entries",
    r"entering failsafe mode: L\d+ table at 0x[0-9a-f]+ has \d+ invalid entries",
    r"image had NEED_CHECK set; repaired on open: ",
)
async def test_unrepaired_need_check_is_never_cleared_qemu_bug_j() -> None:
    # Opened read-write with NEED_CHECK set and no repair: the image was never checked, so
    # no flush may mark it clean (docs/qemu-differences.md#bug-j: QEMU's close clears it).
    data, _ = await _two_table_image()
    data[FEATURES_OFFSET] |= NEED_CHECK
    img = await open_bytes(bytes(data), options=OpenOptions(repair_on_open=False))
    assert need_check_on_disk(img)
    await img.write(5 * 4096, b"\x55" * 4096)
    await img.write(9 * MiB, b"\x55" * 4096)  # a new L2 table
    await img.flush()
    assert need_check_on_disk(img)
    img = await reopen(img, options=OpenOptions(repair_on_open=False))
    assert need_check_on_disk(img)
    assert await img.read(9 * MiB, 4096) == b"\x55" * 4096
    await img.close()


@pytest.mark.expect_log(
    "has 1 invalid entries", "entering failsafe mode", "NEED_CHECK set; repaired on open"
)
async def test_corruption_the_survey_finds_stops_writes() -> None:
    # A bad entry in a table no guest request touches: the survey before the first write
    # finds it, and the image goes failsafe (writes refused, NEED_CHECK stays set) instead
    # of being written and marked clean with the corruption in it.
    data, layout = await _two_table_image()
    poke_u64(data, layout["l2b"] + 5 * 8, 0x7770000)  # guest 4 MiB + 5 clusters: past EOF
    img = await open_bytes(data)
    assert not need_check_on_disk(img)
    with pytest.raises(FailsafeError):
        await img.write(5 * 4096, b"\x55" * 4096)  # L2 table A is fine, B is not
    assert img.failsafe_reason is not None
    assert "invalid entries" in img.failsafe_reason
    assert need_check_on_disk(img)
    assert await img.read(5 * 4096, 4096) != b"\x55" * 4096  # nothing was written
    with pytest.raises(CorruptionError):
        await img.read(4 * MiB + 5 * 4096, 4096)
    # A repairing open then fixes the entry and clears the bit.
    img = await reopen(img)
    assert not need_check_on_disk(img)
    assert await img.read(4 * MiB + 5 * 4096, 4096) == bytes(4096)
    await img.write(5 * 4096, b"\x55" * 4096)
    await img.flush()
    assert await img.read(5 * 4096, 4096) == b"\x55" * 4096
    await img.close()


async def test_create_image_truncates_and_checks_params() -> None:
    memory = MemoryImage(b"\xff" * 100000)
    header = await create_image(memory, 10 * MiB, cluster_size=4096, table_size=4)
    assert len(memory.data) == 5 * 4096
    assert bytes(memory.data[64:]) == bytes(5 * 4096 - 64)
    assert header == fmt.new_header(10 * MiB, cluster_size=4096, table_size=4)
    with pytest.raises(FormatError, match="multiple of 512"):
        await create_image(memory, 1000, cluster_size=4096)
    with pytest.raises(FormatError, match="does not fit"):
        await create_image(MemoryImage(), MiB, cluster_size=4096, backing_name=b"n" * 4040)
