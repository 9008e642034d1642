"""Shared helpers for the engine tests: images on MemoryImage, BlockFile shims, a model, a walker.

* :func:`new_image` / :func:`reopen` — an opened :class:`QedImage` on a :class:`MemoryImage`.
* :class:`RecordingFile`, :class:`FaultyFile`, :class:`YieldingFile` — BlockFile wrappers for
  ordering assertions, fault injection and forced interleavings.
* :class:`Model` — a sparse guest-content model (reads fall back to a base pattern).
* :func:`walk` — an independent consistency walk of raw image bytes (struct only, no qedfuse
  code), returning the guest→host mapping, corruptions and leaks.
* :class:`PatternSource` — a tiny fake backing image (:class:`GuestSource`).
"""

from __future__ import annotations

import errno
import hashlib
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from qedfuse.check import check_image
from qedfuse.engine import OpenOptions, QedImage
from qedfuse.imagefile import BlockFile, Buffer, FileStat, IoStatistics, MemoryImage
from qedfuse.opening import open_image
from qedfuse.tables import create_image

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

HEADER = struct.Struct("<IIIIQQQQQII")
NEED_CHECK = 0x02


# ---------------------------------------------------------------------------- images


async def new_image(
    size: int,
    cs: int = 4096,
    ts: int = 2,
    *,
    backing: object | None = None,
    backing_name: bytes = b"",
    options: OpenOptions | None = None,
    wrap: Callable[[MemoryImage], BlockFile] | None = None,
) -> QedImage:
    """Create a fresh image on a new MemoryImage and open it read-write.

    ``wrap`` turns the MemoryImage into the BlockFile the engine sees (a recording or faulty
    shim); the MemoryImage is reachable through :func:`mem`.
    """
    memory = MemoryImage()
    await create_image(
        memory,
        size,
        cluster_size=cs,
        table_size=ts,
        backing_name=backing_name,
        backing_raw=bool(backing_name),
    )
    file: BlockFile = wrap(memory) if wrap is not None else memory
    return await open_image(file, backing=backing, options=options)  # type: ignore[arg-type]


def mem(img_or_file: QedImage | BlockFile) -> MemoryImage:
    """The MemoryImage under an image or a chain of wrappers."""
    file: object = img_or_file.file if isinstance(img_or_file, QedImage) else img_or_file
    while not isinstance(file, MemoryImage):
        file = file.inner  # type: ignore[attr-defined]
    return file


def raw(img_or_file: QedImage | BlockFile) -> bytearray:
    """The raw bytes of the image file (live, not a copy)."""
    return mem(img_or_file).data


async def reopen(
    img: QedImage,
    *,
    read_only: bool | None = None,
    backing: object | None = None,
    options: OpenOptions | None = None,
    close: bool = True,
) -> QedImage:
    """Close ``img`` (flushing) and open the same bytes again on a fresh MemoryImage."""
    data = raw(img)
    if close:
        await img.close()
    memory = MemoryImage(read_only=bool(read_only))
    memory.data = data
    return await open_image(memory, read_only=read_only, backing=backing, options=options)  # type: ignore[arg-type]


async def open_bytes(
    data: Buffer, *, read_only: bool = False, backing: object | None = None, **kw: object
) -> QedImage:
    """Open a copy of ``data`` as an image."""
    return await open_image(
        MemoryImage(data, read_only=read_only),
        read_only=read_only,
        backing=backing,  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


_CYCLE = bytes(range(1, 252))  # period 251: no cluster size is a multiple of it


def pattern(pos: int, size: int, seed: int = 0) -> bytes:
    """Deterministic, position-dependent, never-zero bytes; a different phase per seed."""
    start = (pos + seed * 97) % 251
    reps = (size + start) // 251 + 1
    return (_CYCLE * reps)[start : start + size]


def sha(data: Buffer) -> str:
    return hashlib.sha256(data).hexdigest()


def header_of(data: Buffer) -> tuple[int, ...]:
    return HEADER.unpack(bytes(data[:64]))


def need_check_on_disk(img_or_data: QedImage | BlockFile | Buffer) -> bool:
    """The NEED_CHECK bit in the raw header of an image, its file, or raw bytes."""
    data = img_or_data if isinstance(img_or_data, bytes | bytearray | memoryview) else None
    return bool(header_of(raw(img_or_data) if data is None else data)[4] & NEED_CHECK)  # type: ignore[arg-type]


def poke_u64(data: bytearray, offset: int, value: int) -> None:
    data[offset : offset + 8] = struct.pack("<Q", value)


def peek_u64(data: Buffer, offset: int) -> int:
    return int(struct.unpack("<Q", bytes(data[offset : offset + 8]))[0])


# ---------------------------------------------------------------------------- fake backing


class PatternSource:
    """A fake backing image: ``fill`` bytes (or a position pattern) up to ``image_size``."""

    def __init__(self, image_size: int, fill: int | None = 0x55, seed: int = 7) -> None:
        self._size = image_size
        self.fill = fill
        self.seed = seed
        self.reads: list[tuple[int, int]] = []
        self.closed = False

    @property
    def image_size(self) -> int:
        return self._size

    def content(self, pos: int, size: int) -> bytes:
        """The bytes this source serves (zeros past its end)."""
        inside = max(0, min(size, self._size - pos))
        if self.fill is not None:
            body = bytes([self.fill]) * inside
        else:
            body = pattern(pos, inside, self.seed)
        return body + bytes(size - inside)

    async def read_padded(self, pos: int, size: int) -> bytes:
        await trio.lowlevel.checkpoint()
        self.reads.append((pos, size))
        return self.content(pos, size)

    async def aclose(self) -> None:
        self.closed = True


# ---------------------------------------------------------------------------- shims


class Wrapper:
    """A BlockFile that forwards to ``inner``; subclasses hook the calls."""

    def __init__(self, inner: BlockFile) -> None:
        self.inner = inner

    @property
    def read_only(self) -> bool:
        return self.inner.read_only

    async def pread(self, offset: int, size: int) -> bytes:
        return await self.inner.pread(offset, size)

    async def pwrite(self, offset: int, data: Buffer) -> None:
        await self.inner.pwrite(offset, data)

    async def fdatasync(self) -> None:
        await self.inner.fdatasync()

    async def ftruncate(self, size: int) -> None:
        await self.inner.ftruncate(size)

    async def size(self) -> int:
        return await self.inner.size()

    def stat(self) -> FileStat | None:
        return self.inner.stat()

    def data_ranges(self, pos: int, end: int) -> list[tuple[int, int, bool]]:
        return self.inner.data_ranges(pos, end)

    def host_free_bytes(self) -> int | None:
        return self.inner.host_free_bytes()

    def statistics(self) -> IoStatistics | None:
        return self.inner.statistics()

    def set_queue_probe(self, probe: Callable[[], bool] | None) -> None:
        self.inner.set_queue_probe(probe)

    async def aclose(self) -> None:
        await self.inner.aclose()


class RecordingFile(Wrapper):
    """Logs ``("W", offset, len)`` per pwrite and ``("F",)`` per fdatasync (reads not logged)."""

    def __init__(self, inner: BlockFile) -> None:
        super().__init__(inner)
        self.log: list[tuple[str] | tuple[str, int, int]] = []
        self.writes: list[tuple[int, bytes]] = []

    async def pwrite(self, offset: int, data: Buffer) -> None:
        self.log.append(("W", offset, len(data)))
        self.writes.append((offset, bytes(data)))
        await self.inner.pwrite(offset, data)

    async def fdatasync(self) -> None:
        self.log.append(("F",))
        await self.inner.fdatasync()

    def take(self) -> list[tuple[str] | tuple[str, int, int]]:
        """Return and clear the log."""
        log, self.log = self.log, []
        self.writes = []
        return log


class FaultyFile(Wrapper):
    """Raises ``OSError(EIO)`` on the ``fail_sync``-th fdatasync / ``fail_write``-th pwrite
    (1-based, counted from when the counter is armed with :meth:`arm`)."""

    def __init__(self, inner: BlockFile) -> None:
        super().__init__(inner)
        self.fail_sync: int | None = None
        self.fail_write: int | None = None
        self.n_syncs = 0
        self.n_writes = 0
        self.failed = False

    def arm(self, *, sync: int | None = None, write: int | None = None) -> None:
        self.fail_sync, self.fail_write = sync, write
        self.n_syncs = self.n_writes = 0

    async def fdatasync(self) -> None:
        self.n_syncs += 1
        if self.n_syncs == self.fail_sync:
            self.failed = True
            raise OSError(errno.EIO, "injected fdatasync failure")
        await self.inner.fdatasync()

    async def pwrite(self, offset: int, data: Buffer) -> None:
        self.n_writes += 1
        if self.n_writes == self.fail_write:
            self.failed = True
            raise OSError(errno.EIO, "injected pwrite failure")
        await self.inner.pwrite(offset, data)


class YieldingFile(Wrapper):
    """Yields to other tasks around every I/O, a seeded number of times / for a seeded time."""

    def __init__(self, inner: BlockFile, rng: random.Random, *, max_sleep: float = 0.0) -> None:
        super().__init__(inner)
        self.rng = rng
        self.max_sleep = max_sleep

    async def _yield(self) -> None:
        if self.max_sleep and self.rng.random() < 0.5:
            await trio.sleep(self.rng.random() * self.max_sleep)
        for _ in range(self.rng.randrange(4)):
            await trio.lowlevel.checkpoint()

    async def pread(self, offset: int, size: int) -> bytes:
        await self._yield()
        data = await self.inner.pread(offset, size)
        await self._yield()
        return data

    async def pwrite(self, offset: int, data: Buffer) -> None:
        await self._yield()
        await self.inner.pwrite(offset, data)
        await self._yield()

    async def fdatasync(self) -> None:
        await self._yield()
        await self.inner.fdatasync()
        await self._yield()


# ---------------------------------------------------------------------------- model

PAGE = 4096


class Model:
    """Sparse guest content: written 4 KiB pages in a dict; others read ``base`` or zeros.

    ``base(pos, size)`` (a backing image's content) applies below ``base_limit`` only.
    """

    def __init__(
        self,
        size: int,
        base: Callable[[int, int], bytes] | None = None,
        base_limit: int = 0,
    ) -> None:
        self.size = size
        self.base = base
        self.base_limit = min(base_limit, size) if base is not None else 0
        self.pages: dict[int, bytearray] = {}
        self.unknown_sectors: set[int] = set()  # a failed write: old or new bytes

    def unknown(self, pos: int, size: int) -> None:
        """A write of ``[pos, pos+size)`` failed: each sector may hold old or new bytes."""
        self.unknown_sectors.update(range(pos // 512, (pos + size + 511) // 512))

    async def verify(self, img: QedImage) -> None:
        """Every sector of every touched page reads as modelled (unknown sectors skipped)."""
        for index in sorted(self.pages):
            pos = index * PAGE
            n = min(PAGE, self.size - pos)
            got = await img.read(pos, n)
            want = self.read(pos, n)
            for k in range(0, n, 512):
                if (pos + k) // 512 not in self.unknown_sectors:
                    assert got[k : k + 512] == want[k : k + 512], f"guest sector {(pos + k) // 512}"

    def _base(self, pos: int, size: int) -> bytes:
        inside = max(0, min(size, self.base_limit - pos))
        head = self.base(pos, inside) if (self.base is not None and inside) else b""
        return head + bytes(size - inside)

    def _page(self, index: int) -> bytearray:
        page = self.pages.get(index)
        if page is None:
            page = self.pages[index] = bytearray(self._base(index * PAGE, PAGE))
        return page

    def write(self, pos: int, data: Buffer) -> None:
        assert pos >= 0
        assert pos + len(data) <= self.size
        if self.unknown_sectors:
            first, last = pos // 512, (pos + len(data)) // 512  # whole sectors written
            if pos % 512:
                first += 1
            self.unknown_sectors.difference_update(range(first, last))
        view = memoryview(bytes(data))
        while view:
            index, off = divmod(pos, PAGE)
            n = min(len(view), PAGE - off)
            self._page(index)[off : off + n] = view[:n]
            pos += n
            view = view[n:]

    def read(self, pos: int, size: int) -> bytes:
        size = max(0, min(size, self.size - pos))
        out = bytearray()
        while size:
            index, off = divmod(pos, PAGE)
            n = min(size, PAGE - off)
            page = self.pages.get(index)
            out += page[off : off + n] if page is not None else self._base(pos, n)
            pos += n
            size -= n
        return bytes(out)

    def resize(self, new_size: int) -> None:
        """Grow: the new area reads zeros (the base never shows through past the old size)."""
        assert new_size >= self.size
        self.base_limit = min(self.base_limit, self.size)
        self.size = new_size


# ---------------------------------------------------------------------------- raw walk


@dataclass
class Walk:
    """Result of :func:`walk` on raw image bytes."""

    cluster_size: int = 0
    table_size: int = 0
    image_size: int = 0
    need_check: bool = False
    file_end: int = 0  # file size rounded down to clusters
    #: guest cluster index -> host offset (data) or 1 (zero cluster)
    mapping: dict[int, int] = field(default_factory=dict)
    l2_tables: list[int] = field(default_factory=list)
    corruptions: list[str] = field(default_factory=list)
    leaks: list[int] = field(default_factory=list)

    @property
    def n_data(self) -> int:
        return sum(1 for v in self.mapping.values() if v > 1)


def walk(data: Buffer) -> Walk:
    """Independent consistency walk (struct only): every L1/L2 entry valid, no cluster referenced
    twice, nothing overlapping the header/L1/L2; unreferenced clusters are leaks."""
    data = bytes(data)
    (_magic, cs, ts, hs, features, _c, _a, l1_offset, image_size, _bo, _bs) = header_of(data)
    w = Walk(cs, ts, image_size, bool(features & NEED_CHECK))
    n_entries = ts * cs // 8
    w.file_end = len(data) - len(data) % cs
    header_end = max(hs, 1) * cs
    owner: dict[int, str] = {}

    def claim(offset: int, what: str) -> bool:
        if offset in owner:
            w.corruptions.append(f"{what} at {offset:#x} already used by {owner[offset]}")
            return False
        owner[offset] = what
        return True

    def valid_cluster(offset: int) -> bool:
        return offset % cs == 0 and header_end <= offset < w.file_end

    def nonzero_entries(table_offset: int) -> list[tuple[int, int]]:
        """(index, value) of the non-zero entries, skipping all-zero 4 KiB pages quickly."""
        out: list[tuple[int, int]] = []
        for page in range(0, ts * cs, 4096):
            raw_page = data[table_offset + page : table_offset + page + 4096]
            if raw_page.count(0) == len(raw_page):
                continue
            for k, value in enumerate(struct.unpack(f"<{len(raw_page) // 8}Q", raw_page)):
                if value:
                    out.append((page // 8 + k, value))
        return out

    for k in range(ts):
        claim(l1_offset + k * cs, "L1")
    for l1_index, l2_offset in nonzero_entries(l1_offset):
        if not (valid_cluster(l2_offset) and valid_cluster(l2_offset + (ts - 1) * cs)):
            w.corruptions.append(f"L1[{l1_index}] = {l2_offset:#x} invalid")
            continue
        if not all(claim(l2_offset + k * cs, f"L2 of L1[{l1_index}]") for k in range(ts)):
            continue
        w.l2_tables.append(l2_offset)
        for l2_index, entry in nonzero_entries(l2_offset):
            guest_cluster = l1_index * n_entries + l2_index
            if entry == 1:
                w.mapping[guest_cluster] = 1
                continue
            if not valid_cluster(entry):
                w.corruptions.append(f"L2[{l2_index}] of L1[{l1_index}] = {entry:#x} invalid")
                continue
            if claim(entry, f"data of guest cluster {guest_cluster}"):
                w.mapping[guest_cluster] = entry
    w.leaks = [off for off in range(header_end, w.file_end, cs) if off not in owner]
    return w


def guest_cluster_bytes(data: Buffer, w: Walk, guest_cluster: int) -> bytes | None:
    """Raw content of one mapped guest cluster per the walk (None when unallocated)."""
    entry = w.mapping.get(guest_cluster)
    if entry is None:
        return None
    if entry == 1:
        return bytes(w.cluster_size)
    return bytes(data[entry : entry + w.cluster_size])


def assert_matches_model(data: Buffer, w: Walk, model: Model) -> None:
    """The guest view decoded from raw bytes by the walk equals the model.

    Checks every mapped cluster and every page the model knows; untouched unmapped areas read
    the model's base in both views by construction.
    """
    cs = w.cluster_size
    clusters = set(w.mapping) | {(index * PAGE) // cs for index in model.pages}
    for c in sorted(clusters):
        pos = c * cs
        if pos >= model.size:
            continue
        n = min(cs, model.size - pos)
        got = guest_cluster_bytes(data, w, c)
        view = got[:n] if got is not None else model._base(pos, n)
        want = model.read(pos, n)
        if view != want:
            bad = next(i for i in range(n) if view[i] != want[i])
            raise AssertionError(
                f"guest cluster {c} (pos {pos:#x}) differs at +{bad:#x}: raw view "
                f"{view[bad : bad + 8].hex()} model {want[bad : bad + 8].hex()} "
                f"(entry {w.mapping.get(c)})"
            )


async def read_all(img: QedImage, chunk: int = 4 * MiB) -> bytes:
    out = bytearray()
    pos = 0
    while pos < img.image_size:
        out += await img.read(pos, min(chunk, img.image_size - pos))
        pos += chunk
    return bytes(out)


async def assert_raw_clean(img: QedImage, model: Model) -> None:
    """The raw bytes walk clean (independent walker), decode to ``model``, and the checker
    finds no corruption, leak or error."""
    data = raw(img)
    w = walk(data)
    assert w.corruptions == []
    assert w.leaks == []
    assert_matches_model(data, w, model)
    report = await check_image(MemoryImage(data, read_only=True))
    assert (report.corruptions, report.leaks, report.check_errors) == (0, 0, 0)
