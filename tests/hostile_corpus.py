"""A deterministic corpus of hostile QED images and the engine-level exerciser behind D1/D2.

* :func:`corpus` builds the images of reliability.md row D1 in memory (every iotest 116 case,
  every header field at the image-fuzzer boundary vectors, overflowing header_size, unknown
  feature bits, bad L1 offsets, table_size=1, 1 GiB tables, image_size beyond the coverage,
  backing-name tricks, invalid/duplicate/self-referencing L1 and L2 entries), most of them
  also with NEED_CHECK set.  Huge files are sparse (:class:`SparseImage`).
* :func:`build_all` writes them to a directory (sparse files) for CLI-level tests.
* :func:`exercise` opens one image read-only and read-write through the engine, does random
  reads and writes, flush, check and close, each step under a timeout, and reports anything
  that is not a clean refusal or a clean serve: an exception other than a QedError, a
  multi-line error message, a hang, guest data found inside metadata, a write through a bad
  entry that did not fail, a changed header.
* :func:`mutants` is the mutation fuzzer of row D2: valid images with 1-3 header fields or
  table entries replaced by boundary vectors or qed.py-style operators.

Run as a script (``python tests/hostile_corpus.py corpus|fuzz …``) it does the work in a
process limited to 1 GiB of address space and prints a JSON summary with its peak RSS; the
tests run it that way for the memory claims.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import resource
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

if __name__ == "__main__":  # run as a script: make `qedfuse` and the test helpers importable
    _HERE = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [os.path.dirname(_HERE), _HERE]

import trio
from qededit import HEADER_FIELDS

from qedfuse import engine, opening, tables
from qedfuse import format as fmt
from qedfuse.check import check_image
from qedfuse.errors import QedError
from qedfuse.imagefile import Buffer, FileStat, IoStatistics

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB
U32 = 0xFFFFFFFF
U64 = 0xFFFFFFFFFFFFFFFF
#: QEMU image-fuzzer boundary vectors (tests/image-fuzzer/qcow2/fuzz.py).
UINT32_V = [0, 0x100, 0x1000, 0x10000, 0x100000, U32 // 4, U32 // 2 - 1, U32 // 2]
UINT32_V += [U32 // 2 + 1, U32 - 1, U32]
UINT64_V = [*UINT32_V, U64 // 4, U64 // 2 - 1, U64 // 2, U64 // 2 + 1, U64 - 1, U64]
#: Marks every guest write, so guest data found inside metadata is recognisable.
GUEST_TAG = b"\xde\xad<guest-data-tag>\xbe\xef"
STEP_TIMEOUT = 10.0
CASE_TIMEOUT = 60.0


# --------------------------------------------------------------------------- sparse file


class SparseImage:
    """An in-memory BlockFile whose length may far exceed what it stores (holes read 0)."""

    BLOCK = 64 * KiB

    def __init__(self, data: Buffer = b"", size: int | None = None, *, read_only: bool = False):
        self.blocks: dict[int, bytearray] = {}
        self.length = 0
        self._read_only = read_only
        self._write_sync(0, bytes(data))
        self.length = max(self.length, size or 0)

    @property
    def read_only(self) -> bool:
        return self._read_only

    def copy(self, *, read_only: bool = False) -> SparseImage:
        other = SparseImage(read_only=read_only)
        other.blocks = {k: bytearray(v) for k, v in self.blocks.items()}
        other.length = self.length
        return other

    def _read_sync(self, offset: int, size: int) -> bytes:
        out = bytearray(size)
        end = min(offset + size, self.length)
        pos = offset
        while pos < end:
            index, start = divmod(pos, self.BLOCK)
            n = min(self.BLOCK - start, end - pos)
            block = self.blocks.get(index)
            if block is not None:
                out[pos - offset : pos - offset + n] = block[start : start + n]
            pos += n
        return bytes(out)

    def _write_sync(self, offset: int, data: bytes) -> None:
        pos = offset
        view = memoryview(data)
        while view:
            index, start = divmod(pos, self.BLOCK)
            n = min(self.BLOCK - start, len(view))
            block = self.blocks.get(index)
            if block is None:
                block = self.blocks[index] = bytearray(self.BLOCK)
            block[start : start + n] = view[:n]
            view = view[n:]
            pos += n
        self.length = max(self.length, offset + len(data))

    async def pread(self, offset: int, size: int) -> bytes:
        await trio.lowlevel.checkpoint()
        return self._read_sync(offset, size)

    async def pwrite(self, offset: int, data: Buffer) -> None:
        if self._read_only:
            raise OSError(errno.EBADF, "image file is open read-only")
        await trio.lowlevel.checkpoint()
        self._write_sync(offset, bytes(data))

    async def fdatasync(self) -> None:
        await trio.lowlevel.checkpoint()

    async def ftruncate(self, size: int) -> None:
        if self._read_only:
            raise OSError(errno.EBADF, "image file is open read-only")
        await trio.lowlevel.checkpoint()
        for index in [k for k in self.blocks if k * self.BLOCK >= size]:
            del self.blocks[index]
        if size % self.BLOCK and size // self.BLOCK in self.blocks:
            block = self.blocks[size // self.BLOCK]
            block[size % self.BLOCK :] = bytes(self.BLOCK - size % self.BLOCK)
        self.length = size

    async def size(self) -> int:
        return self.length

    def stat(self) -> FileStat | None:
        return None  # no host file

    def data_ranges(self, pos: int, end: int) -> list[tuple[int, int, bool]]:
        return [(pos, end - pos, True)] if end > pos else []  # unsure: all of it is data

    def host_free_bytes(self) -> int | None:
        return None

    def statistics(self) -> IoStatistics | None:
        return None

    def set_queue_probe(self, probe: Callable[[], bool] | None) -> None:
        pass  # reads never overlap

    async def aclose(self) -> None:
        pass

    def stored_bytes(self) -> int:
        return len(self.blocks) * self.BLOCK


# --------------------------------------------------------------------------- images


@dataclass(frozen=True)
class HostileImage:
    """One corpus entry.  ``data`` is the file's head; the file is ``file_size`` long."""

    name: str
    data: bytes
    file_size: int
    #: "refuse": every open must fail with a FormatError; "serve": both opens must succeed;
    #: "either": a clean refusal or a clean serve.
    expect: str = "either"
    #: Guest byte ranges mapped through bad entries: with NEED_CHECK clear a write there
    #: must fail with CorruptionError (it would write through into metadata or past EOF).
    bad_ranges: tuple[tuple[int, int], ...] = ()
    notes: str = ""

    def file(self, *, read_only: bool = False) -> SparseImage:
        return SparseImage(self.data, self.file_size, read_only=read_only)


@dataclass
class Layout:
    """Where :func:`base_image` put things."""

    cs: int
    ts: int
    l1_offset: int
    l2_offset: int
    data_offsets: list[int]
    header: fmt.Header


def pattern_bytes(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def base_image(
    cs: int = 4096,
    ts: int = 2,
    image_size: int = 8 * MiB,
    n_data: int = 3,
    header_size: int = 1,
    second_table: bool = True,
) -> tuple[bytearray, Layout]:
    """A valid image: header, L1, one L2 table mapping ``n_data`` data clusters (guest
    clusters 0..n-1), and (``second_table``) a second L2 table for the next L2 range with
    one data cluster."""
    geo = fmt.Geometry(cs, ts, header_size)
    l1_offset = header_size * cs
    l2_offset = l1_offset + geo.table_bytes
    data_start = l2_offset + geo.table_bytes
    data_offsets = [data_start + k * cs for k in range(n_data)]
    end = data_start + n_data * cs
    header = fmt.new_header(image_size, cluster_size=cs, table_size=ts).replace(
        header_size=header_size, l1_table_offset=l1_offset
    )
    buf = bytearray(end)
    buf[:64] = header.pack()
    l1 = [0] * geo.table_entries
    l1[0] = l2_offset
    l2 = [0] * geo.table_entries
    for k, offset in enumerate(data_offsets):
        l2[k] = offset
        buf[offset : offset + cs] = pattern_bytes(offset, cs)
    if second_table and image_size > geo.l2_coverage:
        t2 = end
        d2 = t2 + geo.table_bytes
        buf.extend(bytes(geo.table_bytes + cs))
        l1[1] = t2
        entries = [0] * geo.table_entries
        entries[0] = d2
        buf[t2 : t2 + geo.table_bytes] = struct.pack(f"<{geo.table_entries}Q", *entries)
        buf[d2 : d2 + cs] = pattern_bytes(d2, cs)
        data_offsets.append(d2)
    buf[l1_offset : l1_offset + geo.table_bytes] = struct.pack(f"<{geo.table_entries}Q", *l1)
    buf[l2_offset : l2_offset + geo.table_bytes] = struct.pack(f"<{geo.table_entries}Q", *l2)
    return buf, Layout(cs, ts, l1_offset, l2_offset, data_offsets, header)


def poke(buf: bytearray, name: str, value: int) -> None:
    offset, code = HEADER_FIELDS[name]
    buf[offset : offset + struct.calcsize(code)] = struct.pack(code, value)


def set_entry(buf: bytearray, table_offset: int, index: int, value: int) -> None:
    buf[table_offset + 8 * index : table_offset + 8 * index + 8] = struct.pack("<Q", value)


def with_need_check(buf: bytes) -> bytes:
    out = bytearray(buf)
    features = struct.unpack_from("<Q", out, 16)[0] | fmt.Feature.NEED_CHECK
    struct.pack_into("<Q", out, 16, features)
    return bytes(out)


def corpus() -> list[HostileImage]:
    """The deterministic D1 corpus (≥ 60 images)."""
    out: list[HostileImage] = []
    base, lay = base_image()
    cs = lay.cs
    n = len(base)

    def header_case(
        name: str, expect: str = "either", size: int | None = None, **fields: int
    ) -> None:
        buf = bytearray(base)
        for key, value in fields.items():
            poke(buf, key, value)
        out.append(HostileImage(name, bytes(buf), size or n, expect))

    # iotest 116
    out.append(HostileImage("116-truncated-header", bytes(base[:512]), 512, "refuse"))
    header_case("116-bad-magic", "refuse", magic=0x58444551)
    header_case("116-cluster-size-ffffffff", "refuse", cluster_size=U32)
    header_case("116-table-size-ffffffff", "refuse", table_size=U32)
    header_case("116-header-size-ffffffff", "refuse", header_size=U32)
    header_case("116-l1-offset-ffff", "refuse", l1_table_offset=U64)
    header_case("116-image-size-ffff", "refuse", image_size=U64)

    # every header field at the boundary vectors
    for field_name, (_, code) in HEADER_FIELDS.items():
        vector = UINT32_V if code == "<I" else UINT64_V
        for value in vector:
            header_case(f"field-{field_name}={value:#x}", "either", None, **{field_name: value})

    # header_size overflow: hs*cs > 2^32-1 with an L1 table that is really past it
    hs = U32 // cs + 1
    big = bytearray(base[:cs])
    poke(big, "header_size", hs)
    poke(big, "l1_table_offset", hs * cs)
    out.append(HostileImage("header-size-overflow", bytes(big), hs * cs + 4 * cs, "refuse"))
    # unknown feature bits (incompatible: refused), compat and autoclear (served)
    header_case("features-unknown-0x8", "refuse", features=0x8)
    header_case("features-unknown-bit63", "refuse", features=1 << 63)
    header_case("compat-unknown-bits", "serve", compat_features=U64)
    header_case("autoclear-unknown-bits", "serve", autoclear_features=U64)
    # L1 offset: 0, unaligned, past EOF, overlapping the header, overlapping its L2 table
    header_case("l1-offset-0", "refuse", l1_table_offset=0)
    header_case("l1-offset-unaligned", "refuse", l1_table_offset=cs + 8)
    header_case("l1-offset-past-eof", "refuse", l1_table_offset=n)
    header_case("l1-runs-past-eof", "refuse", l1_table_offset=n - cs)
    header_case("l1-inside-header", "refuse", header_size=2)
    header_case("l1-at-l2-table", "either", l1_table_offset=lay.l2_offset)
    # image_size
    header_case("image-size-not-sector-multiple", "refuse", image_size=1000)
    header_case("image-size-beyond-coverage", "refuse", image_size=4 * GiB + 512)
    header_case("image-size-max-coverage", "serve", image_size=4 * GiB)
    header_case("image-size-0", "serve", image_size=0)
    # geometry: table_size=1 (QEMU cannot open it; qedfuse can), cluster 8 KiB re-read
    ts1, _ = base_image(ts=1, image_size=8 * MiB)
    out.append(HostileImage("table-size-1", bytes(ts1), len(ts1), "serve"))
    header_case("cluster-size-8k-same-layout", "either", cluster_size=8192)
    # huge tables: 64 MiB x 16 (1 GiB), 2 MiB x 16 (32 MiB), 1 MiB x 16 (16 MiB: the cap)
    for big_cs, big_ts, expect in ((64 * MiB, 16, "refuse"), (2 * MiB, 16, "refuse")):
        head = bytearray(64)
        head[:] = fmt.new_header(big_cs, cluster_size=big_cs, table_size=big_ts).pack()
        size = big_cs * (1 + big_ts)
        out.append(HostileImage(f"tables-{big_cs // MiB}MiBx{big_ts}", bytes(head), size, expect))
    head = bytearray(fmt.new_header(64 * GiB, cluster_size=MiB, table_size=16).pack())
    out.append(HostileImage("tables-1MiBx16-at-cap", bytes(head), 17 * MiB, "serve"))
    # a 4 TiB sparse file (2^30 clusters of 4 KiB) with NEED_CHECK: the check must stay bounded
    out.append(
        HostileImage("sparse-4TiB-file-need-check", with_need_check(bytes(base)), 4 * TiB, "either")
    )
    # backing file fields
    header_case("backing-bit-without-name", "serve", features=fmt.Feature.BACKING_FILE)
    header_case(
        "backing-name-outside-header",
        "refuse",
        features=fmt.Feature.BACKING_FILE,
        backing_filename_offset=cs - 10,
        backing_filename_size=100,
    )
    header_case(
        "backing-name-size-4096",
        "refuse",
        features=fmt.Feature.BACKING_FILE,
        backing_filename_offset=64,
        backing_filename_size=4096,
    )
    header_case(
        "backing-name-offset-overflow",
        "refuse",
        features=fmt.Feature.BACKING_FILE,
        backing_filename_offset=U32,
        backing_filename_size=U32,
    )
    for label, backing_name in (
        ("json", b'json:{"driver":"raw","file":{"driver":"file","filename":"/etc/passwd"}}'),
        ("absolute", b"/etc/shadow"),
        ("dotdot", b"../../../../etc/passwd"),
        ("nbd", b"nbd://127.0.0.1:10809/x"),
        ("nul", b"a\0b"),
        ("not-utf8", b"\xff\xfe\xfd"),
    ):
        buf = bytearray(base)
        buf[64 : 64 + len(backing_name)] = backing_name
        poke(buf, "features", fmt.Feature.BACKING_FILE)
        poke(buf, "backing_filename_offset", 64)
        poke(buf, "backing_filename_size", len(backing_name))
        out.append(HostileImage(f"backing-name-{label}", bytes(buf), n, "serve"))

    # tables: (name, edit, bad guest ranges)
    l1, l2 = lay.l1_offset, lay.l2_offset
    t2 = struct.unpack_from("<Q", base, l1 + 8)[0]  # the second L2 table
    cov = fmt.Geometry(cs, lay.ts).l2_coverage
    table_cases: list[tuple[str, list[tuple[int, int, int]], tuple[tuple[int, int], ...]]] = [
        ("l1-entry-past-eof", [(l1, 0, n + 16 * cs)], ((0, cov),)),
        ("l1-entry-unaligned", [(l1, 0, l2 + 8)], ((0, cov),)),
        ("l1-entry-in-header", [(l1, 0, 0x200)], ((0, cov),)),
        ("l1-entry-is-l1", [(l1, 0, l1)], ((0, cov),)),
        ("l1-entry-runs-past-eof", [(l1, 0, n - cs)], ((0, cov),)),
        ("l1-entry-huge", [(l1, 0, 1 << 63)], ((0, cov),)),
        ("l1-entry-1", [(l1, 2, 1)], ((2 * cov, 3 * cov),)),
        ("l1-duplicate", [(l1, 2, l2)], ((0, cov), (2 * cov, 3 * cov))),
        ("l1-entry-is-data-cluster", [(l1, 2, lay.data_offsets[0])], ((2 * cov, 3 * cov),)),
        ("l2-entry-past-eof", [(l2, 3, n + 16 * cs)], ((3 * cs, 4 * cs),)),
        ("l2-entry-at-eof", [(l2, 3, n)], ((3 * cs, 4 * cs),)),
        ("l2-entry-unaligned", [(l2, 3, lay.data_offsets[0] + 512)], ((3 * cs, 4 * cs),)),
        ("l2-entry-huge", [(l2, 3, U64 - cs + 1)], ((3 * cs, 4 * cs),)),
        ("l2-entry-to-header", [(l2, 3, 0)], ()),  # 0 is "unallocated": harmless
        ("l2-entry-to-l1", [(l2, 3, l1)], ((3 * cs, 4 * cs),)),
        ("l2-entry-to-l1-2nd-cluster", [(l2, 3, l1 + cs)], ((3 * cs, 4 * cs),)),
        ("l2-entry-to-own-table", [(l2, 3, l2)], ((3 * cs, 4 * cs),)),
        ("l2-entry-to-other-table", [(l2, 3, t2)], ((3 * cs, 4 * cs),)),
        ("l2-duplicate-data", [(l2, 3, lay.data_offsets[1])], ()),
        ("l2-many-bad", [(l2, k, l1 + (k % 2) * cs) for k in range(3, 40)], ((3 * cs, 40 * cs),)),
    ]
    # duplicate fans: one data cluster behind many entries (the repair copies are bounded)
    fan_one = [(l2, k, lay.data_offsets[0]) for k in range(1, 1024)]
    fan_across = [(table, k, lay.data_offsets[1]) for table in (l2, t2) for k in range(2, 300)]
    fan_many = [(l2, k, lay.data_offsets[k % 3]) for k in range(3, 600)]
    fan_into_tables = [(l2, k, (l2, t2, l1)[k % 3]) for k in range(3, 200)]
    table_cases += [
        ("l2-dup-fan-one-table", fan_one, ()),
        ("l2-dup-fan-across-tables", fan_across, ()),
        ("l2-dup-fan-many-clusters", fan_many, ()),
        ("l2-dup-fan-into-tables", fan_into_tables, ((3 * cs, 200 * cs),)),
    ]
    hs2, lay2 = base_image(header_size=2)
    header_ref = (
        "l2-entry-to-header-cluster-1",
        [(lay2.l2_offset, 3, cs)],
        ((3 * cs, 4 * cs),),
    )
    for name, edits, bad in [*table_cases, header_ref]:
        buf = bytearray(hs2 if name == header_ref[0] else base)
        for table, index, value in edits:
            set_entry(buf, table, index, value)
        out.append(HostileImage(name, bytes(buf), len(buf), "serve", bad))
        out.append(
            HostileImage(f"{name}+need-check", with_need_check(bytes(buf)), len(buf), "serve")
        )
    out.extend(_big_cluster_fans())
    out.extend(_growth_and_fan_cases())
    for item in list(out):
        prefixes = ("116-", "l1-offset", "field-features", "image-size")
        if item.name.startswith(prefixes) and "+need-check" not in item.name:
            out.append(
                HostileImage(
                    f"{item.name}+need-check",
                    with_need_check(item.data),
                    item.file_size,
                    item.expect,
                )
            )
    return out


def _big_cluster_fans() -> list[HostileImage]:
    """A few KB of metadata whose fan of references would cost GiB of copies: 1 MiB
    clusters, one data cluster behind 5,000 entries (5 GiB), NEED_CHECK set; and 2 MiB
    clusters behind 2,000 entries of two tables (4 GiB).  A repair must refuse them."""
    out: list[HostileImage] = []
    for cs, ts, n_refs, n_tables in ((MiB, 1, 5000, 1), (2 * MiB, 1, 1000, 2)):
        geo = fmt.Geometry(cs, ts)
        l1 = cs
        tables = [l1 + geo.table_bytes * (1 + k) for k in range(n_tables)]
        data = tables[-1] + geo.table_bytes
        header = fmt.new_header(n_tables * geo.l2_coverage, cluster_size=cs, table_size=ts)
        head = bytearray(tables[-1] + 8 * n_refs)
        head[:64] = header.pack()
        for k, table in enumerate(tables):
            set_entry(head, l1, k, table)
            for index in range(n_refs):
                set_entry(head, table, index, data)
        name = f"big-dup-fan-{cs // MiB}MiBx{n_refs}x{n_tables}"
        out.append(HostileImage(name, bytes(head), data + cs, "serve"))
        out.append(HostileImage(f"{name}+need-check", with_need_check(bytes(head)), data + cs))
    return out


def _growth_and_fan_cases() -> list[HostileImage]:
    """Issue 11, finding 1: entries at or just past the open-time end (valid-looking once the
    session has grown the file over them), and duplicate fans (two guest clusters, one host
    cluster, within and across tables)."""
    out: list[HostileImage] = []
    base, lay = base_image(image_size=16 * MiB)
    cs = lay.cs
    n = len(base)
    cov = fmt.Geometry(cs, lay.ts).l2_coverage
    t2 = struct.unpack_from("<Q", base, lay.l1_offset + 8)[0]
    for k in (0, 1, 2, 3, 5):
        buf = bytearray(base)
        set_entry(buf, t2, 1, n + k * cs)
        set_entry(buf, t2, 4, n + (k + 8) * cs)
        bad = ((cov + cs, cov + 2 * cs), (cov + 4 * cs, cov + 5 * cs))
        out.append(HostileImage(f"l2-entry-at-open-end+{k}", bytes(buf), n, "serve", bad))
        buf = bytearray(base)
        set_entry(buf, lay.l1_offset, 2, n + k * cs)
        out.append(
            HostileImage(f"l1-entry-at-open-end+{k}", bytes(buf), n, "serve", ((2 * cov, 3 * cov),))
        )
    buf = bytearray(base)
    for index in range(3, 9):  # index 0 maps it first: the fan's other members are bad
        set_entry(buf, lay.l2_offset, index, lay.data_offsets[0])
    out.append(HostileImage("dup-fan-within", bytes(buf), n, "serve", ((3 * cs, 9 * cs),)))
    buf = bytearray(base)
    for index in range(2, 6):  # which table maps it first depends on the load order
        set_entry(buf, t2, index, lay.data_offsets[1])
    out.append(HostileImage("dup-fan-across", bytes(buf), n, "serve"))
    buf = bytearray(base)
    set_entry(buf, t2, 3, lay.l2_offset + cs)  # an L2 table's second cluster as data
    out.append(
        HostileImage("table-tail-as-data", bytes(buf), n, "serve", ((cov + 3 * cs, cov + 4 * cs),))
    )
    return out


def served_aliases(img: engine.QedImage) -> list[str]:
    """Host clusters the engine would serve for two guest clusters (its cached tables)."""
    seen: dict[int, tuple[int, int]] = {}
    out: list[str] = []
    for table in img.cache._tables.values():
        for index, entry in enumerate(table.entries):
            if entry > 1 and index not in table.bad:
                if entry in seen:
                    where = f"L2@{table.offset:#x}[{index}]"
                    out.append(f"host {entry:#x} served for {where} and {seen[entry]}")
                seen[entry] = (table.offset, index)
    return out


def build_all(tmp_dir: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """Write every corpus image to ``tmp_dir`` (sparse files); return ``[(name, path)]``."""
    paths: list[tuple[str, str]] = []
    for k, item in enumerate(corpus()):
        safe = "".join(c if c.isalnum() or c in "-+=." else "_" for c in item.name)
        path = os.path.join(os.fspath(tmp_dir), f"{k:03d}-{safe}.qed")
        with open(path, "wb") as f:
            f.write(item.data)
            f.truncate(item.file_size)
        paths.append((item.name, path))
    return paths


# --------------------------------------------------------------------------- exerciser


@dataclass
class Outcome:
    """What :func:`exercise` saw for one image."""

    ro: str = ""  # "served" | "refused" | "failed"
    rw: str = ""
    problems: list[str] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)


def _one_line(exc: BaseException) -> bool:
    text = str(exc)
    return bool(text) and "\n" not in text


def metadata_ranges(
    data_file: SparseImage, skip_l1: set[int] | frozenset[int] = frozenset()
) -> list[tuple[int, int]]:
    """Header clusters, L1, and every table the L1 names (within the file), from the bytes.

    L1 entries in ``skip_l1`` (known bad before the session) are left out: a bad entry past
    the end of the file may come to point at clusters appended later, which are data.
    """
    head = data_file._read_sync(0, 64)
    header = fmt.Header.unpack(head)
    cs, ts = header.cluster_size, header.table_size
    if not (fmt.is_power_of_two(cs) and 4096 <= cs <= 64 * MiB and 1 <= ts <= 16):
        return [(0, 64)]
    table_bytes = cs * ts
    size = data_file.length
    ranges = [(0, min(size, max(header.header_size, 1) * cs, 16 * MiB))]
    l1 = header.l1_table_offset
    if l1 + table_bytes <= size and table_bytes <= 16 * MiB:
        ranges.append((l1, l1 + table_bytes))
        raw = data_file._read_sync(l1, table_bytes)
        for index, (offset,) in enumerate(struct.iter_unpack("<Q", raw)):
            if index in skip_l1:
                continue
            if offset and offset % cs == 0 and offset + table_bytes <= size:
                ranges.append((offset, offset + table_bytes))
    return ranges


def guest_data_in_metadata(
    data_file: SparseImage, skip_l1: set[int] | frozenset[int] = frozenset()
) -> list[tuple[int, int]]:
    """Metadata ranges that contain :data:`GUEST_TAG`."""
    return [
        (a, b)
        for a, b in metadata_ranges(data_file, skip_l1)
        if GUEST_TAG in data_file._read_sync(a, b - a)
    ]


def tagged(seed: int, size: int) -> bytes:
    """Guest write data: random bytes with :data:`GUEST_TAG` every 512 bytes."""
    data = bytearray(random.Random(seed).randbytes(size))
    for k in range(0, max(0, size - len(GUEST_TAG) + 1), 512):
        data[k : k + len(GUEST_TAG)] = GUEST_TAG
    return bytes(data)


async def _step(
    outcome: Outcome, what: str, coro: Any, allowed: tuple[type[BaseException], ...]
) -> Any:
    """Await ``coro`` under the step timeout; classify whatever it raises."""
    try:
        with trio.fail_after(STEP_TIMEOUT):
            return await coro
    except trio.TooSlowError:
        outcome.problems.append(f"{what}: hung for {STEP_TIMEOUT} s")
    except allowed as exc:
        outcome.errors[type(exc).__name__] += 1
        if not _one_line(exc):
            outcome.problems.append(f"{what}: {type(exc).__name__} message is not one line")
    except Exception as exc:
        outcome.problems.append(f"{what}: unexpected {type(exc).__name__}: {exc!r}")
    return None


def _random_ops(
    rng: random.Random, image_size: int, bad_ranges: Sequence[tuple[int, int]], n: int
) -> Iterator[tuple[str, int, int]]:
    for _ in range(n):
        kind = rng.choice(("read", "read", "write", "write", "zeroes"))
        if bad_ranges and rng.random() < 0.5:
            lo, hi = rng.choice(bad_ranges)
            pos = rng.randrange(lo, hi)
        elif image_size:
            pos = rng.randrange(0, image_size) if rng.random() < 0.7 else rng.randrange(0, 65536)
        else:
            pos = 0
        size = rng.choice((1, 512, 4096, 5000, 70000))
        yield kind, pos, size


async def exercise(
    source: Callable[[bool], SparseImage],
    *,
    seed: int,
    bad_ranges: Sequence[tuple[int, int]] = (),
    expect: str = "either",
    n_ops: int = 10,
) -> Outcome:
    """Open read-only then read-write and drive the image; record every problem."""
    outcome = Outcome()
    p = outcome.problems
    rng = random.Random(seed)
    allowed = (QedError,)

    # read-only: never writes (the file refuses writes), serves or refuses cleanly
    ro_file = source(True)
    img = await _step(outcome, "RO open", opening.open_image(ro_file, read_only=True), allowed)
    if img is None:
        outcome.ro = "refused"
    else:
        outcome.ro = "served"
        await _step(outcome, "RO extents", img.extents(), allowed)
        for kind, pos, size in _random_ops(rng, img.image_size, bad_ranges, n_ops // 2):
            if kind == "read":
                await _step(outcome, f"RO read {pos}+{size}", img.read(pos, size), allowed)
            else:
                await _step(outcome, f"RO write {pos}", img.write(pos, b"x"), allowed)
        await _step(outcome, "RO close", img.close(), allowed)
    await _step(outcome, "check", check_image(source(True)), allowed)

    # read-write: may repair (NEED_CHECK); writes through bad entries must fail
    rw_file = source(False)
    before_header = rw_file._read_sync(0, 64)
    img = await _step(outcome, "RW open", opening.open_image(rw_file), allowed)
    if img is None:
        outcome.rw = "refused"
    else:
        outcome.rw = "served"
        repaired = fmt.Header.unpack(before_header).need_check
        bad_l1 = set(img._l1.bad)
        header_rest = rw_file._read_sync(64, max(0, img.geometry.header_end_offset - 64))
        for index, (kind, pos, size) in enumerate(
            _random_ops(rng, img.image_size, bad_ranges, n_ops)
        ):
            size = max(0, min(size, img.image_size - pos))
            in_bad = any(lo < pos + size and pos < hi for lo, hi in bad_ranges)
            if kind == "read":
                await _step(outcome, f"read {pos}+{size}", img.read(pos, size), allowed)
                continue
            errors_before = outcome.errors["CorruptionError"]
            if kind == "write":
                coro = img.write(pos, tagged(seed * 100 + index, size))
            else:
                coro = img.write_zeroes(pos, size)
            await _step(outcome, f"{kind} {pos}+{size}", coro, allowed)
            if (
                in_bad
                and size
                and not repaired
                and kind == "write"
                and outcome.errors["CorruptionError"] == errors_before
                and not img.failsafe
            ):
                p.append(f"write {pos}+{size} through a bad entry did not fail")
        p.extend(served_aliases(img))
        await _step(outcome, "flush", img.flush(), allowed)
        await _step(outcome, "allocated_bytes", img.allocated_bytes(), allowed)
        await _step(outcome, "close", img.close(), allowed)
        after = fmt.Header.unpack(rw_file._read_sync(0, 64))
        before = fmt.Header.unpack(before_header)
        same: tuple[str, ...] = (
            "magic",
            "cluster_size",
            "table_size",
            "header_size",
            "l1_table_offset",
        )
        same += ("image_size", "backing_filename_offset", "backing_filename_size")
        changed = [f for f in same if getattr(after, f) != getattr(before, f)]
        if changed or (after.features | 2) != (before.features | 2):
            p.append(f"header changed by guest I/O: {changed or 'features'}")
        if rw_file._read_sync(64, len(header_rest)) != header_rest:
            p.append("bytes after the header struct changed")
        leaked = guest_data_in_metadata(rw_file, bad_l1)
        if leaked:
            p.append(f"guest data written into metadata at {leaked}")
        await _step(outcome, "check after", check_image(rw_file.copy(read_only=True)), allowed)
    if expect == "refuse" and (outcome.ro == "served" or outcome.rw == "served"):
        p.append(f"expected a refusal, got RO {outcome.ro} / RW {outcome.rw}")
    if expect == "serve" and (outcome.ro != "served" or outcome.rw != "served"):
        p.append(f"expected it to be served, got RO {outcome.ro} / RW {outcome.rw}")
    return outcome


async def run_corpus(items: Sequence[HostileImage] | None = None) -> dict[str, Any]:
    """Exercise every corpus image; a summary dict (JSON-able)."""
    items = corpus() if items is None else items
    problems: list[str] = []
    tally: Counter[str] = Counter()
    for k, item in enumerate(items):

        def source(ro: bool, item: HostileImage = item) -> SparseImage:
            return item.file(read_only=ro)

        try:
            with trio.fail_after(CASE_TIMEOUT):
                outcome = await exercise(
                    source,
                    seed=k,
                    bad_ranges=item.bad_ranges,
                    expect=item.expect,
                )
        except trio.TooSlowError:
            problems.append(f"{item.name}: hung")
            continue
        tally[f"RO {outcome.ro}"] += 1
        tally[f"RW {outcome.rw}"] += 1
        for name, count in outcome.errors.items():
            tally[f"error {name}"] += count
        problems += [f"{item.name}: {problem}" for problem in outcome.problems]
    return {"images": len(items), "tally": dict(tally), "problems": problems}


# --------------------------------------------------------------------------- mutation fuzzer


async def valid_images() -> list[tuple[str, bytes]]:
    """Valid images made by the engine itself (several geometries, data written, clean)."""
    out: list[tuple[str, bytes]] = []
    from qedfuse.imagefile import MemoryImage

    for cs, ts, size in ((4096, 2, 8 * MiB), (4096, 1, 4 * MiB), (8192, 4, 64 * MiB)):
        for variant in range(2):
            mem = MemoryImage()
            await tables.create_image(mem, size, cluster_size=cs, table_size=ts)
            img = await opening.open_image(mem)
            rng = random.Random(cs + ts + variant)
            for k in range(6 + 6 * variant):
                pos = rng.randrange(0, size - 3 * cs)
                await img.write(pos, pattern_bytes(k, rng.choice((512, cs, 3 * cs))))
            await img.close()
            out.append((f"engine-cs{cs}-ts{ts}-{variant}", bytes(mem.data)))
    base, _ = base_image()
    out.append(("hand-built", bytes(base)))
    return out


def _entry_vector(rng: random.Random, data: bytes, header: fmt.Header) -> int:
    cs = header.cluster_size
    n = len(data)
    return rng.choice(
        [
            rng.choice(UINT64_V),
            0,
            1,
            header.l1_table_offset,
            header.l1_table_offset + cs,
            n,
            n - cs,
            n + cs,
            n + rng.randrange(1, 8) * cs,  # reached by the session's own growth
            header.l1_table_offset + header.table_size * cs,  # often the first table/data
            cs,
            rng.randrange(0, max(1, n)) // cs * cs,
            rng.randrange(0, max(1, n)),
            rng.getrandbits(64),
        ]
    )


def mutate(data: bytes, rng: random.Random) -> tuple[bytes, list[str]]:
    """Apply 1-3 mutations: header fields, table entries, qed.py-style operators."""
    buf = bytearray(data)
    header = fmt.Header.unpack(data)
    cs, ts = header.cluster_size, header.table_size
    table_bytes = cs * ts
    l1 = header.l1_table_offset
    entries = table_bytes // 8
    applied: list[str] = []

    def get(offset: int) -> int:
        return struct.unpack_from("<Q", buf, offset)[0] if offset + 8 <= len(buf) else 0

    def put(offset: int, value: int) -> None:
        if offset + 8 <= len(buf):
            set_entry(buf, offset, 0, value)

    def tables() -> list[int]:
        raw = bytes(buf[l1 : l1 + table_bytes])
        return [o for (o,) in struct.iter_unpack("<Q", raw) if o and o + table_bytes <= len(buf)]

    for _ in range(rng.randint(1, 3)):
        op = rng.choice(
            [
                *("field", "field", "l1", "l2", "l2", "dup-l1", "dup-l2", "invalidate"),
                *("need-check", "zero-cluster", "truncate", "flip", "l2-self", "dup-fan"),
            ]
        )
        if op == "field":
            name = rng.choice(list(HEADER_FIELDS))
            code = HEADER_FIELDS[name][1]
            value = rng.choice(UINT32_V if code == "<I" else UINT64_V)
            if rng.random() < 0.3:  # nearby valid-looking values
                value = rng.choice([cs, cs * 2, ts * 2, 4096, 65536, 1, 2, 16, len(buf)])
                value &= U32 if code == "<I" else U64
            poke(buf, name, value)
            applied.append(f"{name}={value:#x}")
        elif op == "l1":
            index = rng.randrange(0, min(entries, 8))
            value = _entry_vector(rng, bytes(buf), header)
            put(l1 + 8 * index, value)
            applied.append(f"L1[{index}]={value:#x}")
        elif op in ("l2", "zero-cluster", "l2-self") and tables():
            table = rng.choice(tables())
            index = rng.randrange(0, min(entries, 64))
            if op == "zero-cluster":
                value = 1
            elif op == "l2-self":
                value = rng.choice([table, l1, 0 if cs > 4096 else cs, *tables()])
            else:
                value = _entry_vector(rng, bytes(buf), header)
            put(table + 8 * index, value)
            applied.append(f"{op} L2@{table:#x}[{index}]={value:#x}")
        elif op == "dup-l1":
            src, dst = rng.randrange(0, min(entries, 4)), rng.randrange(0, min(entries, 8))
            put(l1 + 8 * dst, get(l1 + 8 * src))
            applied.append(f"dup L1[{dst}]=L1[{src}]")
        elif op == "dup-l2" and tables():
            table = rng.choice(tables())
            src, dst = rng.randrange(0, min(entries, 64)), rng.randrange(0, min(entries, 64))
            put(table + 8 * dst, get(table + 8 * src))
            applied.append(f"dup L2@{table:#x}[{dst}]=[{src}]")
        elif op == "dup-fan" and tables():
            # One data cluster referenced from a run of entries (in one or every table),
            # NEED_CHECK set so the read-write open repairs it: the repair must stay bounded.
            source = next((v for t in tables() for v in [get(t)] if v > 1), 0)
            count = rng.choice([2, 64, entries])
            targets = tables() if rng.random() < 0.5 else [rng.choice(tables())]
            for table in targets:
                for index in range(min(count, entries)):
                    put(table + 8 * index, source)
            features = struct.unpack_from("<Q", buf, 16)[0] | fmt.Feature.NEED_CHECK
            struct.pack_into("<Q", buf, 16, features)
            applied.append(f"dup-fan {source:#x} x{count} in {len(targets)} tables")
        elif op == "invalidate":
            target = rng.choice([l1, *tables()])
            index = rng.randrange(0, min(entries, 16))
            put(target + 8 * index, (len(buf) // cs + 16) * cs)
            applied.append(f"invalidate @{target:#x}[{index}]")
        elif op == "need-check":
            features = struct.unpack_from("<Q", buf, 16)[0] ^ fmt.Feature.NEED_CHECK
            struct.pack_into("<Q", buf, 16, features)
            applied.append("toggle NEED_CHECK")
        elif op == "truncate":
            new_len = rng.choice([512, cs, len(buf) - cs, len(buf) - 100, len(buf) // 2])
            del buf[max(0, new_len) :]
            applied.append(f"truncate {new_len}")
        elif op == "flip" and buf:
            pos = rng.randrange(0, min(len(buf), l1 + table_bytes + 4 * table_bytes))
            buf[pos] ^= 1 << rng.randrange(8)
            applied.append(f"flip @{pos}")
    return bytes(buf), applied


async def run_fuzz(
    count: int, seed: int, extra: Sequence[tuple[str, bytes]] = ()
) -> dict[str, Any]:
    """Mutate valid images ``count`` times and exercise each mutant."""
    bases = [*await valid_images(), *extra]
    rng = random.Random(seed)
    problems: list[str] = []
    tally: Counter[str] = Counter()
    started = time.monotonic()
    for k in range(count):
        base_name, data = bases[k % len(bases)]
        mutant, applied = mutate(data, rng)

        def mutant_source(ro: bool, m: bytes = mutant) -> SparseImage:
            return SparseImage(m, read_only=ro)

        try:
            with trio.fail_after(CASE_TIMEOUT):
                outcome = await exercise(mutant_source, seed=seed * 1_000_003 + k)
        except trio.TooSlowError:
            problems.append(f"#{k} {base_name} {applied}: hung")
            continue
        tally[f"RO {outcome.ro}"] += 1
        tally[f"RW {outcome.rw}"] += 1
        for name, n in outcome.errors.items():
            tally[f"error {name}"] += n
        problems += [f"#{k} {base_name} {applied}: {problem}" for problem in outcome.problems]
    return {
        "images": count,
        "bases": len(bases),
        "tally": dict(tally),
        "problems": problems,
        "elapsed": round(time.monotonic() - started, 1),
    }


# --------------------------------------------------------------------------- script


def run_in_subprocess(*args: str, timeout: float = 120) -> dict[str, Any]:
    """Run this file as a script in a fresh interpreter (under RLIMIT_AS); its JSON summary."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"hostile_corpus.py {args}: exit {proc.returncode}\n{proc.stderr[-4000:]}"
        )
    summary: dict[str, Any] = json.loads(proc.stdout)
    return summary


def peak_rss_kib() -> int:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it does not inherit the parent's
    peak across fork and exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _limit_memory(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("corpus", "fuzz", "sparse"))
    parser.add_argument("--tib", type=int, default=8, help="sparse: file size in TiB")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--extra", nargs="*", default=[], help="more valid base images (paths)")
    parser.add_argument("--rlimit-as", type=int, default=1 * GiB)
    args = parser.parse_args(argv)
    extra = []
    for path in args.extra:
        with open(path, "rb") as f:
            extra.append((os.path.basename(path), f.read()))
    _limit_memory(args.rlimit_as)
    import logging

    logging.getLogger("qedfuse").setLevel(logging.CRITICAL)
    started = time.monotonic()
    if args.mode == "corpus":
        summary = trio.run(run_corpus)
    elif args.mode == "sparse":  # one clean image in a huge sparse file, NEED_CHECK set
        base, _ = base_image()
        item = HostileImage(f"sparse-{args.tib}TiB", with_need_check(bytes(base)), args.tib * TiB)
        summary = trio.run(run_corpus, [item])
    else:
        summary = trio.run(run_fuzz, args.count, args.seed, extra)
    summary["elapsed"] = round(time.monotonic() - started, 1)
    summary["maxrss_kib"] = peak_rss_kib()
    json.dump(summary, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "GUEST_TAG",
    "UINT32_V",
    "UINT64_V",
    "HostileImage",
    "Outcome",
    "SparseImage",
    "base_image",
    "build_all",
    "corpus",
    "exercise",
    "mutate",
    "run_corpus",
    "run_fuzz",
    "run_in_subprocess",
]
