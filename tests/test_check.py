"""Tests of qedfuse.check: classification, repair, crash safety, and parity with qemu-img check.

* Unit tests run on MemoryImage images built by the engine.
* Parity tests build images with the real qemu-img/qemu-io, corrupt them with ``qededit``,
  and compare our report with ``qemu-img check --output=json`` key for key.  After our
  repair, ``qemu-img check`` must be clean (or report only the interior leaks that
  legitimately remain) and the guest data, read back by ``qemu-img convert``, must be what
  it was except in the corrupted ranges.
* Every place QEMU is wrong has its own test asserting our answer and QEMU's.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import struct
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import qededit
import trio
from enginehelpers import Wrapper

from qedfuse import check as check_mod
from qedfuse import format as fmt
from qedfuse.check import CheckReport, check_image
from qedfuse.errors import CorruptionError, FormatError, QedError, ReadOnlyError
from qedfuse.imagefile import Buffer, FileImage, MemoryImage
from qedfuse.opening import open_image
from qedfuse.tables import create_image
from support import data_ranges, describe, require_tool, run

KiB = 1024
MiB = 1024 * KiB
BLOCK = 4096  # granularity of the guest-content comparisons

# ============================================================================ helpers


async def build_memory_image(
    size: int, writes: list[tuple[int, bytes]], *, cs: int = 4096, ts: int = 2
) -> MemoryImage:
    """An image created and written by the engine, closed cleanly."""
    memory = MemoryImage()
    await create_image(memory, size, cluster_size=cs, table_size=ts)
    image = await open_image(memory)
    for pos, data in writes:
        await image.write(pos, data, detect_zeroes=False)
    await image.close()
    return MemoryImage(memory.data)


def header_of(memory: MemoryImage) -> fmt.Header:
    return fmt.Header.unpack(bytes(memory.data[:64]))


def l1_of(memory: MemoryImage) -> list[int]:
    h = header_of(memory)
    n = h.table_size * h.cluster_size
    return list(fmt.decode_table(bytes(memory.data[h.l1_table_offset : h.l1_table_offset + n])))


def l2_of(memory: MemoryImage, l1_index: int) -> list[int]:
    h = header_of(memory)
    n = h.table_size * h.cluster_size
    offset = l1_of(memory)[l1_index]
    return list(fmt.decode_table(bytes(memory.data[offset : offset + n])))


def poke_l1(memory: MemoryImage, l1_index: int, value: int) -> None:
    struct.pack_into("<Q", memory.data, header_of(memory).l1_table_offset + 8 * l1_index, value)


def poke_l2(memory: MemoryImage, l1_index: int, l2_index: int, value: int) -> None:
    struct.pack_into("<Q", memory.data, l1_of(memory)[l1_index] + 8 * l2_index, value)


def set_need_check_mem(memory: MemoryImage, on: bool) -> None:
    h = header_of(memory)
    features = h.features | 2 if on else h.features & ~2
    memory.data[:64] = h.replace(features=features).pack()


async def guest_read(memory: MemoryImage, pos: int, size: int) -> bytes:
    """Guest bytes through the engine, read-only (never repairs or writes)."""
    image = await open_image(MemoryImage(memory.data, read_only=True), read_only=True)
    try:
        return await image.read(pos, size)
    finally:
        await image.close()


def pattern(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


class RecordingFile(Wrapper):
    """A BlockFile over a MemoryImage that records mutating operations (and can fail one)."""

    def __init__(
        self,
        inner: MemoryImage,
        *,
        fail_at: int | None = None,
        fail_pread: Callable[[int, int], bool] | None = None,
        fake_size: int | None = None,
    ) -> None:
        super().__init__(inner)
        self.inner: MemoryImage = inner
        self.ops: list[tuple[str, int, bytes]] = []  # (op, offset/size, data)
        self.fail_at = fail_at  # index of the mutating op (pwrite/ftruncate/fdatasync) to fail
        self.fail_pread = fail_pread
        self.fake_size = fake_size
        self.synced = bytes(inner.data)  # contents as of the last completed fdatasync

    def _maybe_fail(self) -> None:
        if self.fail_at is not None and len(self.ops) == self.fail_at:
            raise OSError(errno.EIO, "injected crash")

    async def pread(self, offset: int, size: int) -> bytes:
        if self.fail_pread is not None and self.fail_pread(offset, size):
            raise OSError(errno.EIO, f"injected read error at {offset:#x}")
        return await self.inner.pread(offset, size)

    async def pwrite(self, offset: int, data: Buffer) -> None:
        self._maybe_fail()
        self.ops.append(("pwrite", offset, bytes(data)))
        await self.inner.pwrite(offset, data)

    async def fdatasync(self) -> None:
        self._maybe_fail()
        self.ops.append(("fdatasync", 0, b""))
        await self.inner.fdatasync()
        self.synced = bytes(self.inner.data)

    async def ftruncate(self, size: int) -> None:
        self._maybe_fail()
        self.ops.append(("ftruncate", size, b""))
        await self.inner.ftruncate(size)

    async def size(self) -> int:
        return self.fake_size if self.fake_size is not None else await self.inner.size()


# ============================================================================ unit tests


async def test_clean_new_image() -> None:
    memory = MemoryImage()
    await create_image(memory, 1 * MiB * 1024)
    before = bytes(memory.data)
    report = await check_image(memory)
    assert report.exit_code() == 0
    assert report.total_clusters == 16384
    assert (report.allocated_clusters, report.leaks, report.corruptions) == (0, 0, 0)
    assert report.messages == []
    assert report.to_json() == {"total-clusters": 16384, "check-errors": 0, "format": "qed"}
    assert report.human_text("x.qed") == "No errors were found on the image.\n"
    assert report.summary_line() == "no errors found"
    # A clean image with repair requested is left byte for byte alone.
    assert (await check_image(memory, repair=True)).exit_code() == 0
    assert bytes(memory.data) == before


async def test_zero_size_image_json() -> None:
    memory = MemoryImage()
    await create_image(memory, 0)
    report = await check_image(memory)
    assert report.to_json() == {"check-errors": 0, "format": "qed"}
    assert report.to_json("e.qed") == {"check-errors": 0, "filename": "e.qed", "format": "qed"}


async def test_allocated_and_fragmented_counts() -> None:
    # Default geometry, the writes of qed-format.md §10.5: data 0x50000, 0xA0000, 0xB0000.
    memory = await build_memory_image(
        1024 * MiB,
        [(0, b"\xab" * 65536), (1 * MiB, b"\xcd" * 4096), (512 * MiB, b"\xef" * 512)],
        cs=65536,
        ts=4,
    )
    assert l2_of(memory, 0)[0] == 0x50000
    report = await check_image(memory)
    # Entry 16 (0xA0000) is not 0x50000 + cs: fragmented; 0xB0000 follows 0xA0000: not.
    assert (report.allocated_clusters, report.fragmented_clusters) == (3, 1)
    assert report.exit_code() == 0
    assert report.human_text("a.qed").splitlines() == [
        "No errors were found on the image.",
        "3/16384 = 0.02% allocated, 33.33% fragmented, 0.00% compressed clusters",
    ]


async def small_image() -> MemoryImage:
    """cs=4096 ts=2 (4 MiB per L2 table) with data in three L2 tables."""
    return await build_memory_image(
        32 * MiB,
        [
            (0, pattern(1, 8192)),
            (4 * MiB, pattern(2, 4096)),
            (8 * MiB, pattern(3, 4096)),
            (4 * MiB + 4096, pattern(4, 4096)),
        ],
    )


async def test_small_image_layout_is_what_the_tests_assume() -> None:
    memory = await small_image()
    assert l1_of(memory)[:4] == [0x5000, 0x8000, 0xB000, 0]
    assert l2_of(memory, 0)[:3] == [0x3000, 0x4000, 0]
    assert l2_of(memory, 1)[:3] == [0x7000, 0xD000, 0]
    assert l2_of(memory, 2)[:2] == [0xA000, 0]
    assert len(memory.data) == 0xE000


async def test_check_only_never_writes() -> None:
    memory = await small_image()
    set_need_check_mem(memory, True)
    poke_l2(memory, 0, 1, 0x7770000)
    poke_l1(memory, 5, 1)
    before = bytes(memory.data)
    for mode in (False, None):
        report = await check_image(memory, repair=mode)
        assert report.corruptions == 2
        assert report.need_check is True
        assert bytes(memory.data) == before
    ro = MemoryImage(before, read_only=True)
    assert (await check_image(ro)).corruptions == 2


@pytest.mark.parametrize(
    ("value", "why", "n_corruptions"),
    [
        (1, "not cluster aligned", 1),
        (0x5001, "not cluster aligned", 1),
        (0x7770000, "past end of file", 1),
        (0xD000, "runs past end of file", 1),  # last cluster: a 2-cluster table does not fit
        (0x1000, "overlaps the L1 table (2 clusters)", 2),
        (0x2000, "overlaps the L1 table (1 cluster)", 1),
        (0x8000, "overlaps the L2 table at 0x8000 of L1 entry 1 (2 clusters)", 2),
        (0x9000, "overlaps the L2 table at 0x8000 of L1 entry 1 (1 cluster)", 1),
    ],
)
async def test_invalid_l1_entry(value: int, why: str, n_corruptions: int) -> None:
    memory = await small_image()
    poke_l1(memory, 7, value)
    report = await check_image(memory)
    assert report.corruptions == n_corruptions
    assert report.exit_code() == 2
    assert any(m.startswith("L1 entry 7: ") and why in m for m in report.messages), report.messages
    repaired = await check_image(memory, repair="all")
    assert repaired.corruptions_fixed == n_corruptions
    assert repaired.corruptions == 0
    assert l1_of(memory)[7] == 0
    assert (await check_image(memory)).exit_code() == 0


async def test_later_l1_entry_sharing_a_table_is_detached() -> None:
    memory = await small_image()
    poke_l1(memory, 4, 0x5000)  # same table as L1 entry 0
    report = await check_image(memory)
    assert report.corruptions == 2  # one per overlapping cluster (ts = 2)
    await check_image(memory, repair=True)
    assert l1_of(memory)[:5] == [0x5000, 0x8000, 0xB000, 0, 0]  # the later one is zeroed
    assert await guest_read(memory, 0, 8192) == pattern(1, 8192)


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (0x7770000, "offset 0x7770000 past end of file"),
        (0xE000, "offset 0xe000 past end of file"),  # exactly EOF
        (0x3200, "offset 0x3200 is not cluster aligned"),
        (0x800, "offset 0x800 is not cluster aligned"),
        (0x1000, "offset 0x1000 points into the L1 table"),
        (0x2000, "offset 0x2000 points into the L1 table"),
        (0x5000, "offset 0x5000 points into the L2 table at 0x5000 of L1 entry 0"),
        (0x9000, "offset 0x9000 points into the L2 table at 0x8000 of L1 entry 1"),
        (0xC000, "offset 0xc000 points into the L2 table at 0xb000 of L1 entry 2"),
    ],
)
async def test_invalid_l2_entry_zeroed(value: int, why: str) -> None:
    memory = await small_image()
    poke_l2(memory, 0, 7, value)
    report = await check_image(memory)
    assert report.corruptions == 1
    assert report.allocated_clusters == 6  # invalid entries count as allocated (QEMU)
    assert report.messages == [f"L2 table 0x5000 entry 7 (guest offset 0x7000): {why}"]
    repaired = await check_image(memory, repair=True)
    assert (repaired.corruptions_fixed, repaired.corruptions) == (1, 0)
    assert repaired.messages[0].endswith("; repaired: entry zeroed")
    assert l2_of(memory, 0)[7] == 0
    final = await check_image(memory)
    assert final.exit_code() == 0
    assert await guest_read(memory, 0, 8192) == pattern(1, 8192)
    assert await guest_read(memory, 0x7000, 4096) == bytes(4096)


async def test_entry_into_header_with_bigger_header() -> None:
    """With header_size=2 (L1 moved to 0x2000) an entry at 0x1000 is inside the header."""
    memory = MemoryImage()
    await create_image(memory, 8 * MiB, cluster_size=4096, table_size=1)
    # Rebuild by hand: hs=2, L1 at 0x2000 (1 cluster), L2 at 0x3000, data at 0x4000.
    header = header_of(memory).replace(header_size=2, l1_table_offset=0x2000)
    data = bytearray(0x5000)
    data[:64] = header.pack()
    struct.pack_into("<QQ", data, 0x2000, 0x3000, 0x1000)  # L1[1]: inside the header
    struct.pack_into("<QQ", data, 0x3000, 0x4000, 0x1000)  # L2[1]: inside the header
    memory = MemoryImage(data)
    report = await check_image(memory)
    assert report.corruptions == 2
    assert report.messages == [
        "L1 entry 1: offset 0x1000 is inside the header",
        "L2 table 0x3000 entry 1 (guest offset 0x1000): offset 0x1000 is inside the header",
    ]
    assert (await check_image(memory, repair=True)).exit_code() == 0


async def test_second_entry_of_contiguous_run_is_checked() -> None:
    """QEMU's read path validates only a run's first entry; the checker checks all.

    docs/qemu-differences.md#bug-g
    """
    memory = await small_image()
    # L2 table 1: [0x7000, 0xD000, ...]; 0xD000 is the last cluster, so 0xE000 continues the
    # run physically and is exactly EOF.
    poke_l2(memory, 1, 2, 0xE000)
    report = await check_image(memory)
    assert report.corruptions == 1
    assert "entry 2 " in report.messages[0]
    assert "past end of file" in report.messages[0]
    # ...and one pointing back into its own table, contiguous with the previous entry.
    poke_l2(memory, 1, 2, 0)
    poke_l2(memory, 2, 1, 0xB000)  # table 2 is at 0xB000, entry 0 is 0xA000
    report = await check_image(memory)
    assert report.corruptions == 1
    assert "points into the L2 table at 0xb000" in report.messages[0]


async def test_duplicates_repaired_by_copying() -> None:
    memory = await small_image()
    poke_l2(memory, 0, 5, 0x3000)  # guest 0x5000 -> guest 0's cluster
    poke_l2(memory, 2, 9, 0x3000)  # guest 8M+0x9000 -> the same
    poke_l2(memory, 1, 1, 0x4000)  # guest 4M+4k -> guest 4k's cluster (0xD000 leaks)
    report = await check_image(memory)
    assert (report.corruptions, report.leaks) == (3, 1)
    assert all("is also referenced by another L2 entry" in m for m in report.messages[:3])
    expected = {
        0: pattern(1, 8192)[:4096],
        0x5000: pattern(1, 8192)[:4096],
        8 * MiB + 0x9000: pattern(1, 8192)[:4096],
        4096: pattern(1, 8192)[4096:],
        4 * MiB + 4096: pattern(1, 8192)[4096:],
        4 * MiB: pattern(2, 4096),
        8 * MiB: pattern(3, 4096),
    }
    repaired = await check_image(memory, repair=True)
    assert repaired.corruptions_fixed == 3
    # The leaked 0xD000 was the last cluster: reclaimed, and the copies start there.
    assert repaired.leaks_fixed == 1
    assert (repaired.corruptions, repaired.leaks, repaired.exit_code()) == (0, 0, 0)
    assert repaired.need_check is False
    assert sum("repaired: copied to" in m for m in repaired.messages) == 3
    for pos, data in expected.items():
        assert await guest_read(memory, pos, 4096) == data, hex(pos)
    targets = [l2_of(memory, 0)[5], l2_of(memory, 2)[9], l2_of(memory, 1)[1]]
    assert sorted(targets) == [0xD000, 0xE000, 0xF000]
    assert len(memory.data) == 0x10000


async def test_duplicate_repair_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the reference cap the whole repair is refused before any write; unmapping works."""
    monkeypatch.setattr(check_mod, "MAX_DUPLICATE_REPAIRS", 1)
    memory = await small_image()
    set_need_check_mem(memory, True)
    poke_l2(memory, 0, 5, 0x3000)
    poke_l2(memory, 0, 6, 0x3000)
    before = bytes(memory.data)
    with pytest.raises(check_mod.RepairLimitError, match="--duplicates=unmap"):
        await check_image(memory, repair=True)
    assert bytes(memory.data) == before
    report = await check_image(memory, repair=True, duplicates="unmap")
    assert (report.corruptions_fixed, report.corruptions) == (2, 0)
    assert not header_of(memory).need_check
    assert l2_of(memory, 0)[5:7] == [0, 0]


async def test_trailing_leaks_truncated_interior_leaks_stay() -> None:
    memory = await small_image()
    poke_l2(memory, 0, 1, 0)  # 0x4000 becomes an interior leak
    memory.data.extend(b"\x5a" * (3 * 4096 + 100))  # 3 trailing leaked clusters + a partial one
    report = await check_image(memory)
    assert (report.leaks, report.corruptions, report.exit_code()) == (4, 0, 3)
    assert report.to_json() == {
        "total-clusters": 8192,
        "check-errors": 0,
        "leaks": 4,
        "allocated-clusters": 4,
        "format": "qed",
        "fragmented-clusters": 1,
    }
    assert any("100 bytes past the last whole cluster" in m for m in report.messages)
    repaired = await check_image(memory, repair="leaks")
    assert (repaired.leaks_fixed, repaired.leaks, repaired.exit_code()) == (3, 1, 3)
    assert len(memory.data) == 0xE000
    assert repaired.summary_line() == "3 leaked clusters reclaimed, 1 leaked cluster remaining"
    assert "leaks-fixed" in repaired.to_json()
    text = repaired.human_text("s.qed")
    assert "The following inconsistencies were found and repaired:\n\n    3 leaked clusters\n" in (
        text
    )
    assert "Double checking the fixed image now...\n\n1 leaked clusters were found" in text


async def test_partial_trailing_cluster_alone_is_removed() -> None:
    memory = await small_image()
    memory.data.extend(b"x" * 1000)
    report = await check_image(memory)
    assert report.exit_code() == 0
    repaired = await check_image(memory, repair=True)
    assert repaired.exit_code() == 0
    assert len(memory.data) == 0xE000
    assert any("partial trailing cluster removed" in m for m in repaired.messages)


async def test_header_size_zero_cluster_zero_not_a_leak() -> None:
    memory = await small_image()
    memory.data[:64] = header_of(memory).replace(header_size=0).pack()
    assert (await check_image(memory)).exit_code() == 0


async def test_repair_order_need_check_first_and_last() -> None:
    memory = await small_image()
    poke_l2(memory, 0, 1, 0x7770000)
    poke_l2(memory, 0, 5, 0x3000)
    memory.data.extend(bytes(4096))
    rec = RecordingFile(memory)
    report = await check_image(rec, repair=True)
    assert report.corruptions_fixed == 2
    assert report.leaks_fixed == 1
    ops = rec.ops
    # First: NEED_CHECK set in the 64-byte struct, made durable.
    assert ops[0][0] == "pwrite"
    assert ops[0][1] == 0
    assert len(ops[0][2]) == 64
    assert fmt.Header.unpack(ops[0][2]).need_check
    assert ops[1][0] == "fdatasync"
    # Last: a sync, then NEED_CHECK cleared in the struct only, then a sync.
    assert ops[-3][0] == "fdatasync"
    assert ops[-2][0] == "pwrite"
    assert ops[-2][1] == 0
    assert len(ops[-2][2]) == 64
    assert not fmt.Header.unpack(ops[-2][2]).need_check
    assert ops[-1][0] == "fdatasync"
    kinds = [op for op, _, _ in ops]
    # Zeroing (table write) -> sync -> truncate -> sync -> copy -> sync -> table -> sync.
    truncate_at = kinds.index("ftruncate")
    assert kinds[truncate_at - 1] == "fdatasync"
    assert kinds[truncate_at + 1] == "fdatasync"
    copy_at = next(i for i, (op, off, _) in enumerate(ops) if op == "pwrite" and off == 0xE000)
    assert copy_at > truncate_at
    assert kinds[copy_at + 1] == "fdatasync"
    assert ops[copy_at + 2][:2] == ("pwrite", 0x5000)  # the L2 table pointing at the copy
    # Table writes are whole 4 KiB pages holding a changed entry (never a sparse page).
    for op, offset, data in ops:
        if op == "pwrite" and offset in (0x1000, 0x5000, 0x8000, 0xB000):
            assert len(data) == 4096


async def test_crash_anywhere_in_repair_is_recoverable() -> None:
    """Fail every mutating step in turn.  Both the written and the last-synced states must
    be untouched, have NEED_CHECK set, or be consistent, and must repair to the same guest
    data."""
    base = await small_image()
    poke_l2(base, 0, 1, 0x7770000)  # invalid -> zeroed
    poke_l2(base, 2, 3, 0x7000)  # duplicate of guest 4M's cluster -> copied
    poke_l1(base, 9, 1)  # invalid L1 -> zeroed
    base.data.extend(b"\x77" * 8192)  # trailing leaks -> truncated
    original = bytes(base.data)
    assert not header_of(base).need_check  # repair must set it itself
    full = RecordingFile(MemoryImage(original))
    await check_image(full, repair=True)
    n_ops = len(full.ops)
    assert n_ops > 10
    expected = {
        0: pattern(1, 8192)[:4096],
        0x1000: bytes(4096),
        4 * MiB: pattern(2, 4096),
        4 * MiB + 4096: pattern(4, 4096),
        8 * MiB: pattern(3, 4096),
        8 * MiB + 0x3000: pattern(2, 4096),
    }
    for fail_at in range(n_ops):
        rec = RecordingFile(MemoryImage(original), fail_at=fail_at)
        with pytest.raises(OSError, match="injected crash"):
            await check_image(rec, repair=True)
        for state in (bytes(rec.inner.data), rec.synced):
            memory = MemoryImage(state)
            if state != original and not header_of(memory).need_check:
                # Only the final header write clears the bit: by then all is consistent.
                assert (await check_image(MemoryImage(state))).corruptions == 0, fail_at
            report = await check_image(memory, repair=True)
            # 0x4000 (guest 4k's cluster, whose entry was invalidated) is an interior leak.
            assert (report.corruptions, report.check_errors, report.leaks) == (0, 0, 1), (
                fail_at,
                report.messages,
            )
            assert not header_of(memory).need_check
            for pos, data in expected.items():
                assert await guest_read(memory, pos, 4096) == data, (fail_at, hex(pos))


async def test_read_error_in_l2_is_a_check_error() -> None:
    memory = await small_image()
    set_need_check_mem(memory, True)
    memory.data.extend(bytes(4096))  # a trailing leak that must NOT be truncated
    faulty = RecordingFile(memory, fail_pread=lambda off, size: off == 0x8000)
    report = await check_image(faulty)
    assert report.check_errors == 1
    assert report.leaks == 0  # not counted when a table could not be read
    assert report.exit_code() == 1
    assert "cannot read the L2 table at 0x8000" in report.messages[0]
    assert report.to_json()["check-errors"] == 1
    assert "1 internal errors have occurred during the check." in report.human_text("f")
    repaired = await check_image(faulty, repair=True)
    assert repaired.check_errors == 1
    assert repaired.need_check is True
    assert faulty.ops == []  # nothing to repair that is known safe: no write, no truncate
    assert len(memory.data) == 0xF000


async def test_read_error_in_l1_is_a_check_error() -> None:
    memory = await small_image()
    faulty = RecordingFile(memory, fail_pread=lambda off, size: off == 0x1000)
    report = await check_image(faulty, repair=True)
    assert report.check_errors == 1
    assert report.exit_code() == 1
    assert faulty.ops == []


async def test_too_many_clusters_refused_without_allocating() -> None:
    memory = await small_image()
    huge = RecordingFile(memory, fake_size=(2**31 + 1) * 4096)
    tracemalloc.start()
    try:
        report = await check_image(huge, repair=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * MiB
    assert report.check_errors == 1
    assert report.exit_code() == 1
    assert "more than the checker's limit" in report.messages[0]
    assert huge.ops == []


async def test_bad_header_raises_format_error() -> None:
    memory = await small_image()
    memory.data[0:4] = b"QEDX"
    with pytest.raises(FormatError, match="Image not in QED format"):
        await check_image(memory)
    memory = await small_image()
    memory.data[4:8] = struct.pack("<I", 1000)
    with pytest.raises(FormatError, match="cluster size is invalid"):
        await check_image(memory, repair=True)


async def test_repair_refused_on_read_only_file_and_unknown_mode() -> None:
    memory = await small_image()
    with pytest.raises(ReadOnlyError):
        await check_image(MemoryImage(memory.data, read_only=True), repair=True)
    with pytest.raises(QedError, match="unknown repair mode"):
        await check_image(memory, repair="everything")


async def test_hostile_l1_all_entries_one_table() -> None:
    """1024 L1 entries naming one table: counted per overlapping cluster, linear time."""
    memory = await small_image()
    for index in range(3, 1024):
        poke_l1(memory, index, 0x5000)
    with trio.fail_after(10):
        report = await check_image(memory)
    assert report.corruptions == 1021 * 2
    assert len(report.messages) == check_mod.MAX_MESSAGES + 1
    assert report.messages[-1] == "... and 21 more findings not listed"
    repaired = await check_image(memory, repair=True)
    assert repaired.corruptions_fixed == 1021 * 2
    assert repaired.exit_code() == 0


async def test_hostile_l2_full_of_one_offset() -> None:
    memory = await small_image()
    offset = l1_of(memory)[2]
    memory.data[offset : offset + 8192] = struct.pack("<Q", 0xA000) * 1024
    report = await check_image(memory)
    assert report.corruptions == 1023
    assert report.fragmented_clusters == 1 + 1023  # table 1's second entry; table 2's repeats
    repaired = await check_image(memory, repair=True)
    assert repaired.corruptions_fixed == 1023
    assert repaired.exit_code() == 0
    assert len(memory.data) == 0xE000 + 1023 * 4096
    assert await guest_read(memory, 8 * MiB + 1000 * 4096, 4096) == pattern(3, 4096)


@pytest.mark.parametrize("seed", range(6))
async def test_random_damage_repairs_completely_and_idempotently(seed: int) -> None:
    """Random entry values anywhere in L1/L2: check and repair never raise anything else
    than QedError/OSError, repair leaves no corruption, and a second repair writes nothing."""
    rng = random.Random(seed)
    base = await small_image()
    for _ in range(30):
        memory = MemoryImage(base.data)
        size = len(memory.data)
        if rng.random() < 0.3:
            memory.data.extend(rng.randbytes(rng.randrange(1, 3 * 4096)))
        tables = [0x1000, 0x5000, 0x8000, 0xB000]
        interesting = [
            0,
            1,
            2**64 - 1,
            2**63,
            size,
            size - 4096,
            0x1000,
            0x3000,
            0x5000,
            0x9000,
            rng.randrange(0, 2**40),
            rng.randrange(0, size // 4096) * 4096,
            rng.randrange(0, size),
        ]
        for _ in range(rng.randint(1, 12)):
            table = rng.choice(tables)
            index = rng.randrange(1024) if rng.random() < 0.5 else rng.randrange(8)
            struct.pack_into("<Q", memory.data, table + 8 * index, rng.choice(interesting))
        first = await check_image(memory)
        assert first.exit_code() in (0, 2, 3)
        repaired = await check_image(memory, repair=True)
        assert (repaired.corruptions, repaired.check_errors) == (0, 0), repaired.messages
        assert not header_of(memory).need_check
        again = RecordingFile(memory)
        second = await check_image(again, repair=True)
        assert again.ops == []
        assert (second.corruptions_fixed, second.leaks_fixed) == (0, 0)
        assert (second.leaks, second.exit_code()) == (repaired.leaks, repaired.exit_code())
        # The engine can map every guest byte now (a bad entry would raise CorruptionError).
        image = await open_image(MemoryImage(memory.data, read_only=True), read_only=True)
        try:
            assert sum(e.length for e in await image.extents()) == 32 * MiB
        finally:
            await image.close()


def test_report_formatting() -> None:
    report = CheckReport(
        image_size=16384 * 65536,
        cluster_size=65536,
        total_clusters=16384,
        allocated_clusters=3,
        fragmented_clusters=2,
        leaks=1,
        leaks_fixed=0,
        corruptions=1,
        corruptions_fixed=0,
        check_errors=0,
        need_check=True,
        messages=["L2 table 0x60000 entry 16: offset 0x7770000 past end of file"],
    )
    assert report.exit_code() == 2
    assert report.summary_line() == "1 corruption and 1 leaked cluster found"
    assert report.human_text("b.qed") == (
        "b.qed: L2 table 0x60000 entry 16: offset 0x7770000 past end of file\n"
        "\n"
        "1 errors were found on the image.\n"
        "Data may be corrupted, or further writes to the image may corrupt it.\n"
        "\n"
        "1 leaked clusters were found on the image.\n"
        "This means waste of disk space, but no harm to data.\n"
        "3/16384 = 0.02% allocated, 66.67% fragmented, 0.00% compressed clusters\n"
    )
    assert list(report.to_json("b.qed")) == [
        "total-clusters",
        "corruptions",
        "check-errors",
        "leaks",
        "allocated-clusters",
        "filename",
        "format",
        "fragmented-clusters",
    ]
    fixed = CheckReport(16384 * 65536, 65536, 16384, 2, 1, 0, 1, 0, 2, 0, False, [])
    assert fixed.exit_code() == 0
    assert fixed.summary_line() == "2 corruptions fixed, 1 leaked cluster reclaimed, 0 remaining"
    only_leaks = CheckReport(0, 65536, 0, 0, 0, 4, 0, 0, 0, 0, False, [])
    assert only_leaks.exit_code() == 3
    errors = CheckReport(0, 65536, 0, 0, 0, 4, 0, 3, 0, 1, True, [])
    assert errors.exit_code() == 1


# ============================================================================ qemu parity

DEFAULT_WRITES = ["write -P 0xab 0 64k", "write -P 0xcd 1M 4k", "write -P 0xef 512M 512"]
SMALL_WRITES = [
    "write -P 0x11 0 8k",
    "write -P 0x22 4M 4k",
    "write -P 0x33 8M 4k",
    "write -P 0x44 4100k 4k",
]


def run_ok(cmd: list[str | Path]) -> str:
    cp = run(cmd)
    assert cp.returncode == 0, describe(cp)
    return cp.stdout


def make_qemu_image(path: Path, size: str, writes: list[str], *options: str) -> None:
    img = require_tool("qemu-img")
    qio = require_tool("qemu-io")
    opts = ["-o", ",".join(options)] if options else []
    run_ok([img, "create", "-q", "-f", "qed", *opts, path, size])
    cmd: list[str | Path] = [qio, "-f", "qed"]
    for w in writes:
        cmd += ["-c", w]
    run_ok([*cmd, path])


def qemu_check(path: Path, *options: str) -> tuple[int, dict[str, object]]:
    cp = run([require_tool("qemu-img"), "check", "-f", "qed", "--output=json", *options, path])
    assert cp.returncode in (0, 2, 3), describe(cp)
    data = json.loads(cp.stdout)
    assert data.pop("filename") == str(path)
    return cp.returncode, data


async def our_check(path: Path, repair: bool | str = False) -> CheckReport:
    file = FileImage.open(path, read_only=not repair)
    try:
        return await check_image(file, repair=repair)
    finally:
        await file.aclose()


def guest_blocks(image: Path, tmp: Path) -> dict[int, bytes]:
    """Non-zero 4 KiB guest blocks of ``image`` as qemu-img reads it (via a sparse raw)."""
    raw = tmp / (image.name + ".raw")
    run_ok([require_tool("qemu-img"), "convert", "-f", "qed", "-O", "raw", image, raw])
    blocks: dict[int, bytes] = {}
    try:
        with open(raw, "rb") as f:
            for data_start, hole in data_ranges(raw):
                for off in range(data_start - data_start % BLOCK, hole, BLOCK):
                    block = os.pread(f.fileno(), BLOCK, off)
                    if block.strip(b"\0"):
                        blocks[off] = block
    finally:
        raw.unlink()
    return blocks


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def base_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """qemu-made images (built once): "default" 1G cs=64k, "small" 32M cs=4k ts=2."""
    root = tmp_path_factory.mktemp("check-bases")
    default = root / "default.qed"
    make_qemu_image(default, "1G", DEFAULT_WRITES)
    small = root / "small.qed"
    make_qemu_image(small, "32M", SMALL_WRITES, "cluster_size=4096", "table_size=2")
    assert qededit.data_slots(default) == [(0, 0, 0x50000), (0, 16, 0xA0000), (0, 8192, 0xB0000)]
    assert qededit.data_slots(small) == [
        (0, 0, 0x3000),
        (0, 1, 0x4000),
        (1, 0, 0x7000),
        (1, 1, 0xD000),
        (2, 0, 0xA000),
    ]
    assert qededit.l1_entries(small)[:4] == [0x5000, 0x8000, 0xB000, 0]
    return {"default": default, "small": small}


@pytest.fixture(scope="session")
def base_blocks(
    base_images: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[int, bytes]]:
    tmp = tmp_path_factory.mktemp("check-raw")
    return {name: guest_blocks(path, tmp) for name, path in base_images.items()}


@dataclass
class Effects:
    """What a corruption does to guest data once repaired."""

    lost: list[tuple[int, int]] = field(default_factory=list)  # (pos, size): reads zeros
    copies: list[tuple[int, int]] = field(default_factory=list)  # (dst, src) cluster pos


def expected_blocks(base: dict[int, bytes], effects: Effects, cs: int) -> dict[int, bytes]:
    out = dict(base)
    for pos, size in effects.lost:
        for off in range(pos, pos + size, BLOCK):
            out.pop(off, None)
    for dst, src in effects.copies:
        for k in range(0, cs, BLOCK):
            out.pop(dst + k, None)
            if src + k in base:
                out[dst + k] = base[src + k]
    return out


def _l2_past_eof(p: Path) -> Effects:
    qededit.set_l2(p, 0, 16, 0x7770000)
    return Effects(lost=[(1 * MiB, 64 * KiB)])


def _l2_unaligned_over_data(p: Path) -> Effects:
    qededit.set_l2(p, 0, 16, 0xA0200)
    return Effects(lost=[(1 * MiB, 64 * KiB)])


def _l2_unaligned_in_empty_slot(p: Path) -> Effects:
    qededit.set_l2(p, 0, 1, 0xA0200)
    return Effects()


def _l1_is_one(p: Path) -> Effects:
    qededit.set_l1(p, 1, 1)
    return Effects()


def _need_check_and_invalid(p: Path) -> Effects:
    qededit.set_need_check(p, True)
    qededit.invalidate_l2(p, 0, 16)
    return Effects(lost=[(1 * MiB, 64 * KiB)])


def _appended_leaks(p: Path) -> Effects:
    qededit.append_clusters(p, 3)
    return Effects()


def _partial_tail(p: Path) -> Effects:
    qededit.pwrite(p, qededit.file_size(p), b"t" * 1000)
    return Effects()


def _interior_leak(p: Path) -> Effects:
    qededit.set_l2(p, 0, 16, 0)
    return Effects(lost=[(1 * MiB, 64 * KiB)])


def _zero_cluster(p: Path) -> Effects:
    qededit.zero_cluster(p, 0)
    return Effects(lost=[(0, 64 * KiB)])


def _l1_past_eof(p: Path) -> Effects:
    qededit.invalidate_l1(p, 1)
    return Effects(lost=[(4 * MiB, 4 * MiB)])


def _run_second_entry_at_eof(p: Path) -> Effects:
    qededit.set_l2(p, 1, 2, 0xE000)  # after 0x7000, 0xD000: contiguous, == EOF
    return Effects()


def _small_duplicate(p: Path) -> Effects:
    qededit.duplicate_l2(p, 2, 0, 5)  # guest 8M+20k -> guest 8M's cluster
    return Effects(copies=[(8 * MiB + 5 * 4096, 8 * MiB)])


# (name, base image, corruption, qemu-img check's rc on the file we repaired)
SCENARIOS: list[tuple[str, str, Callable[[Path], Effects], int]] = [
    ("l2_past_eof", "default", _l2_past_eof, 3),
    ("l2_unaligned_over_data", "default", _l2_unaligned_over_data, 3),
    ("l2_unaligned_in_empty_slot", "default", _l2_unaligned_in_empty_slot, 0),
    ("l1_is_one", "default", _l1_is_one, 0),
    ("need_check_and_invalid", "default", _need_check_and_invalid, 3),
    ("appended_leaks", "default", _appended_leaks, 0),
    ("partial_tail", "default", _partial_tail, 0),
    ("interior_leak", "default", _interior_leak, 3),
    ("zero_cluster", "default", _zero_cluster, 3),
    ("l1_past_eof", "small", _l1_past_eof, 3),
    ("run_second_entry_at_eof", "small", _run_second_entry_at_eof, 0),
    ("small_duplicate", "small", _small_duplicate, 0),
]


@pytest.mark.qemu
@pytest.mark.parametrize(
    ("base", "corrupt", "after_rc"),
    [pytest.param(b, c, rc, id=name) for name, b, c, rc in SCENARIOS],
)
async def test_parity_with_qemu_img_check(
    tmp_path: Path,
    base_images: dict[str, Path],
    base_blocks: dict[str, dict[int, bytes]],
    base: str,
    corrupt: Callable[[Path], Effects],
    after_rc: int,
) -> None:
    path = tmp_path / "img.qed"
    shutil.copyfile(base_images[base], path)
    original_size = qededit.file_size(base_images[base])
    effects = corrupt(path)
    had_need_check = qededit.need_check(path)

    # Check only: same classification and counts as qemu-img, key for key.
    before = sha256(path)
    rc, qemu = qemu_check(path)
    ours = await our_check(path)
    assert ours.to_json() == qemu, ours.messages
    assert ours.exit_code() == rc
    assert ours.need_check == had_need_check
    assert sha256(path) == before  # neither tool wrote anything

    # Our repair, then qemu-img's verdict on the result.
    repaired = await our_check(path, repair="all")
    after_qemu_rc, after_qemu = qemu_check(path)
    assert after_qemu_rc == after_rc, (after_qemu, repaired.messages)
    assert repaired.exit_code() == after_rc
    assert repaired.leaks == after_qemu.get("leaks", 0)
    assert (await our_check(path)).to_json() == after_qemu
    assert not qededit.need_check(path)
    assert qededit.file_size(path) <= original_size + 64 * KiB  # at most one copy appended
    # Guest data: unchanged except the corrupted ranges.
    cs = qededit.read_header(path).cluster_size
    want = expected_blocks(base_blocks[base], effects, cs)
    assert guest_blocks(path, tmp_path) == want


@pytest.mark.qemu
@pytest.mark.parametrize("name", ["appended_leaks", "partial_tail"])
async def test_trailing_garbage_reclaimed_to_original_size(
    tmp_path: Path, base_images: dict[str, Path], name: str
) -> None:
    path = tmp_path / "img.qed"
    shutil.copyfile(base_images["default"], path)
    (_appended_leaks if name == "appended_leaks" else _partial_tail)(path)
    repaired = await our_check(path, repair="leaks")
    assert repaired.exit_code() == 0
    assert qededit.file_size(path) == qededit.file_size(base_images["default"])
    assert qemu_check(path)[0] == 0


@pytest.mark.qemu
@pytest.mark.parametrize("seed", range(8))
async def test_random_corruptions_match_qemu(
    tmp_path: Path,
    base_images: dict[str, Path],
    base_blocks: dict[str, dict[int, bytes]],
    seed: int,
) -> None:
    """Random qed.py-style operators; check-only parity, then a repair qemu-img accepts."""
    rng = random.Random(seed)
    path = tmp_path / "img.qed"
    shutil.copyfile(base_images["small"], path)
    # Model of what each guest block reads once repaired: invalid entries read zeros, a
    # duplicate reads what its source read when it was duplicated.
    model = dict(base_blocks["small"])

    def lose(pos: int, size: int) -> None:
        for off in range(pos, pos + size, BLOCK):
            model.pop(off, None)

    def slot_pos(l1: int, l2: int) -> int:
        return (l1 * 1024 + l2) * 4096

    for _ in range(rng.randint(1, 4)):
        op = rng.choice(["inv_l1", "inv_l2", "dup_l2", "zero", "append", "unaligned"])
        try:
            if op == "inv_l1":
                index, _ = qededit.invalidate_l1(path, rng=rng)
                lose(index * 4 * MiB, 4 * MiB)
            elif op == "inv_l2":
                l1, l2, _ = qededit.invalidate_l2(path, rng=rng)
                lose(slot_pos(l1, l2), 4096)
            elif op == "dup_l2":
                l1, src, dst = qededit.duplicate_l2(path, rng=rng, dst_index=rng.randrange(1024))
                if src != dst:
                    lose(slot_pos(l1, dst), 4096)
                    if slot_pos(l1, src) in model:
                        model[slot_pos(l1, dst)] = model[slot_pos(l1, src)]
            elif op == "zero":
                l1, l2, _ = rng.choice(qededit.data_slots(path))
                qededit.zero_cluster(path, slot_pos(l1, l2))
                lose(slot_pos(l1, l2), 4096)
            elif op == "append":
                qededit.append_clusters(path, rng.randint(1, 3))
            else:
                l1, l2, value = rng.choice(qededit.data_slots(path))
                qededit.set_l2(path, l1, l2, value + rng.randrange(1, 4096))
                lose(slot_pos(l1, l2), 4096)
        except LookupError:
            continue  # e.g. the table was already detached by an earlier operator
    rc, qemu = qemu_check(path)
    ours = await our_check(path)
    assert ours.to_json() == qemu, (seed, ours.messages)
    assert ours.exit_code() == rc
    repaired = await our_check(path, repair=True)
    after_rc, after = qemu_check(path)
    assert after_rc in (0, 3), (seed, after, repaired.messages)
    assert repaired.leaks == after.get("leaks", 0)
    assert (await our_check(path)).to_json() == after
    assert guest_blocks(path, tmp_path) == model, seed


# ---------------------------------------------------------------------------- QEMU is wrong


@pytest.mark.qemu
async def test_no_spurious_leak_qemu_bug_a(tmp_path: Path) -> None:
    """qemu-img counts clusters with a /(cs-1): a >16 MiB cs=4096 file 'leaks'.

    docs/qemu-differences.md#bug-a
    """
    path = tmp_path / "big.qed"
    make_qemu_image(path, "64M", ["write -P 0x5c 0 20M"], "cluster_size=4096")
    assert qededit.file_size(path) > 4095 * 4096
    rc, qemu = qemu_check(path)
    assert (rc, qemu.get("leaks")) == (3, 1)  # QEMU: wrong
    ours = await our_check(path)
    assert ours.exit_code() == 0
    assert ours.leaks == 0
    before = sha256(path)
    repaired = await our_check(path, repair=True)
    assert repaired.exit_code() == 0
    assert sha256(path) == before  # nothing to repair, nothing written
    # qemu-img's own repair cannot remove its phantom leak.
    assert qemu_check(path, "-r", "all")[0] == 3


@pytest.mark.qemu
async def test_duplicates_repaired_qemu_cannot(tmp_path: Path) -> None:
    path = tmp_path / "dup.qed"
    make_qemu_image(path, "1G", DEFAULT_WRITES)
    qededit.duplicate_l2(path, 0, 0, 1)  # guest 64k -> guest 0's cluster
    theirs = tmp_path / "theirs.qed"
    shutil.copyfile(path, theirs)
    assert qemu_check(theirs, "-r", "all")[0] == 2  # QEMU: counted, not repairable
    assert qemu_check(theirs)[1]["corruptions"] == 1
    repaired = await our_check(path, repair="all")
    assert (repaired.corruptions_fixed, repaired.exit_code()) == (1, 0)
    assert qemu_check(path)[0] == 0
    blocks = guest_blocks(path, tmp_path)
    assert blocks[64 * KiB] == blocks[0] == b"\xab" * BLOCK
    assert qededit.entry_at(path, 64 * KiB) not in (0, 1, qededit.entry_at(path, 0))


@pytest.mark.qemu
async def test_l2_entry_into_l1_repaired_qemu_cannot(tmp_path: Path) -> None:
    path = tmp_path / "l1ref.qed"
    make_qemu_image(path, "1G", DEFAULT_WRITES)
    qededit.set_l2(path, 0, 0, 0x10000)  # guest 0 -> the L1 table
    theirs = tmp_path / "theirs.qed"
    shutil.copyfile(path, theirs)
    rc, qemu = qemu_check(theirs, "-r", "all")
    assert (rc, qemu["corruptions"]) == (2, 1)  # QEMU: sees a "duplicate", cannot fix
    ours = await our_check(path)
    assert ours.to_json() == qemu_check(path)[1]  # same counts in check-only mode
    assert "points into the L1 table" in ours.messages[0]
    repaired = await our_check(path, repair=True)
    assert repaired.corruptions_fixed == 1
    assert repaired.corruptions == 0
    rc, after = qemu_check(path)
    assert (rc, after.get("leaks")) == (3, 1)  # the old data cluster: an interior leak
    assert qededit.entry_at(path, 0) == 0


@pytest.mark.qemu
async def test_shared_l2_table_detached_qemu_cannot(tmp_path: Path) -> None:
    path = tmp_path / "l1dup.qed"
    make_qemu_image(path, "32M", SMALL_WRITES, "cluster_size=4096", "table_size=2")
    qededit.duplicate_l1(path, 0, 3)  # L1[3] names L1[0]'s table
    rc, qemu = qemu_check(path)
    assert (rc, qemu["corruptions"]) == (2, 2)
    assert (await our_check(path)).to_json() == qemu
    theirs = tmp_path / "theirs.qed"
    shutil.copyfile(path, theirs)
    assert qemu_check(theirs, "-r", "all")[0] == 2  # QEMU leaves it
    repaired = await our_check(path, repair=True)
    assert repaired.corruptions_fixed == 2
    assert qemu_check(path)[0] == 0
    assert qededit.l1_entries(path)[:4] == [0x5000, 0x8000, 0xB000, 0]


@pytest.mark.qemu
async def test_entry_into_later_l2_table_blames_the_entry(tmp_path: Path) -> None:
    """QEMU marks data as it goes, so a data entry aimed at a *later* L2 table makes it skip
    that whole (valid) table and report its data as leaked.  We mark tables first."""
    path = tmp_path / "later.qed"
    make_qemu_image(path, "32M", SMALL_WRITES, "cluster_size=4096", "table_size=2")
    qededit.set_l2(path, 0, 5, 0x8000)  # guest 20k -> L1[1]'s L2 table
    rc, qemu = qemu_check(path)
    assert (rc, qemu["corruptions"], qemu["leaks"], qemu["allocated-clusters"]) == (2, 1, 2, 4)
    ours = await our_check(path)
    assert (ours.corruptions, ours.leaks, ours.allocated_clusters) == (1, 0, 6)
    repaired = await our_check(path, repair=True)
    assert repaired.exit_code() == 0
    assert qemu_check(path)[0] == 0
    assert guest_blocks(path, tmp_path)[4 * MiB] == b"\x22" * BLOCK  # table 1 intact


@pytest.mark.qemu
async def test_header_size_zero_no_leak(tmp_path: Path) -> None:
    """QEMU counts leaks from header_size, so with hs=0 cluster 0 (the header) 'leaks'."""
    path = tmp_path / "hs0.qed"
    make_qemu_image(path, "32M", SMALL_WRITES, "cluster_size=4096", "table_size=2")
    qededit.write_header_field(path, "header_size", 0)
    rc, qemu = qemu_check(path)
    assert (rc, qemu.get("leaks")) == (3, 1)  # QEMU: wrong
    assert (await our_check(path)).exit_code() == 0  # us: right


# ============================================================================ engine integration


def _corrupt_for_open(path: Path) -> None:
    qededit.set_need_check(path, True)
    qededit.invalidate_l2(path, 1, 1)  # guest 4M+4k (0x44) -> past EOF
    qededit.duplicate_l2(path, 2, 0, 7)  # guest 8M+28k -> guest 8M's cluster (0x33)


@pytest.mark.qemu
@pytest.mark.expect_log(r"^image had NEED_CHECK set; repaired on open: 2 corruptions fixed")
async def test_engine_read_write_open_repairs(tmp_path: Path, base_images: dict[str, Path]) -> None:
    path = tmp_path / "open.qed"
    shutil.copyfile(base_images["small"], path)
    _corrupt_for_open(path)
    image = await open_image(FileImage.open(path, read_only=False))
    try:
        assert not qededit.need_check(path)  # cleared on disk by the repair
        assert await image.read(0, 8192) == b"\x11" * 8192
        assert await image.read(4 * MiB, 4096) == b"\x22" * 4096
        assert await image.read(4 * MiB + 4096, 4096) == bytes(4096)  # zeroed entry
        assert await image.read(8 * MiB + 7 * 4096, 4096) == b"\x33" * 4096  # the copy
        await image.write(8 * MiB + 7 * 4096, b"\x99" * 4096)  # must not touch 8M
        assert await image.read(8 * MiB, 4096) == b"\x33" * 4096
    finally:
        await image.close()
    rc, after = qemu_check(path)
    assert rc == 0, after
    assert not qededit.need_check(path)


@pytest.mark.qemu
@pytest.mark.expect_log(r"^L2 table at 0x8000 has 1 invalid entries$")
async def test_engine_read_only_open_writes_nothing(
    tmp_path: Path, base_images: dict[str, Path]
) -> None:
    path = tmp_path / "ro.qed"
    shutil.copyfile(base_images["small"], path)
    _corrupt_for_open(path)
    before = sha256(path)
    for read_only_fd in (True, False):
        image = await open_image(FileImage.open(path, read_only=read_only_fd), read_only=True)
        try:
            assert await image.read(0, 8192) == b"\x11" * 8192
            with pytest.raises(CorruptionError):
                await image.read(4 * MiB + 4096, 4096)
        finally:
            await image.close()
        assert sha256(path) == before
    assert qededit.need_check(path)
    assert (await our_check(path)).corruptions == 2


@pytest.mark.expect_log(r"^image had NEED_CHECK set; repaired on open: 5 leaked clusters reclaimed")
async def test_engine_crash_leftovers_reclaimed_on_open() -> None:
    """Unflushed allocations after a crash are trailing leaks: the next open reclaims them."""
    memory = MemoryImage()
    await create_image(memory, 64 * MiB, cluster_size=4096, table_size=2)
    image = await open_image(memory)
    await image.write(0, b"\x01" * 8192)
    await image.flush()
    flushed_size = len(memory.data)
    await image.write(16 * MiB, b"\x02" * 12288)  # appended data, metadata only in memory
    crashed = MemoryImage(bytes(memory.data))  # "power loss": what reached the file
    assert header_of(crashed).need_check
    # 3 data clusters and the new L2 table's 2 (its space is taken when it is created)
    assert len(crashed.data) == flushed_size + 12288 + 8192
    report = await check_image(MemoryImage(crashed.data))
    assert (report.leaks, report.corruptions) == (5, 0)
    reopened = await open_image(crashed)
    try:
        assert len(crashed.data) == flushed_size
        assert not header_of(crashed).need_check
        assert await reopened.read(0, 8192) == b"\x01" * 8192
        assert await reopened.read(16 * MiB, 4096) == bytes(4096)
    finally:
        await reopened.close()


@pytest.mark.qemu
@pytest.mark.expect_log(r"^image had NEED_CHECK set; repaired on open: ")
async def test_qemu_open_time_repair_agrees(tmp_path: Path, base_images: dict[str, Path]) -> None:
    """NEED_CHECK + an invalid entry: qemu-io's automatic repair and ours end up the same."""
    ours_path = tmp_path / "ours.qed"
    theirs_path = tmp_path / "theirs.qed"
    shutil.copyfile(base_images["small"], ours_path)
    qededit.set_need_check(ours_path, True)
    qededit.invalidate_l2(ours_path, 1, 1)
    shutil.copyfile(ours_path, theirs_path)
    run_ok([require_tool("qemu-io"), "-f", "qed", "-c", "read 0 512", theirs_path])
    image = await open_image(FileImage.open(ours_path, read_only=False))
    await image.close()
    assert qededit.l2_entries(ours_path, 1)[1] == qededit.l2_entries(theirs_path, 1)[1] == 0
    assert not qededit.need_check(theirs_path)
    assert not qededit.need_check(ours_path)
    assert guest_blocks(ours_path, tmp_path) == guest_blocks(theirs_path, tmp_path)


@pytest.mark.parametrize("problem", ["read_error", "unrepaired_duplicate"])
async def test_engine_keeps_need_check_when_the_open_check_is_not_clean(
    problem: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the open-time check cannot finish (I/O error) or leaves a corruption, a
    read-write open must fail (QEMU: "Image corrupted") or NEED_CHECK must stay set."""
    memory = await small_image()
    set_need_check_mem(memory, True)
    failed: list[int] = []

    def transient_error(offset: int, size: int) -> bool:
        if problem == "read_error" and offset == 0x8000 and not failed:
            failed.append(offset)
            return True
        return False

    if problem == "unrepaired_duplicate":
        monkeypatch.setattr(check_mod, "MAX_DUPLICATE_REPAIRS", 0)
        poke_l2(memory, 2, 5, 0xA000)  # guest 8M+20k shares guest 8M's cluster
    file = RecordingFile(memory, fail_pread=transient_error)
    try:
        image = await open_image(file)
    except QedError:
        return  # refusing the open is a correct answer
    await image.close()
    assert header_of(memory).need_check, "NEED_CHECK cleared although the check was not clean"
