"""The engine's in-memory tables: cached L2 tables, their LRU cache, and trust in what is read.

No I/O here: :class:`~qedfuse.clustermap.ClusterMap` reads the tables (through
:mod:`qedfuse.tables`) and keeps them in these structures, :class:`~qedfuse.engine.QedImage`
writes them back.

* :class:`L2Table` is one cached table with its bad entries and dirty 4 KiB pages;
  :class:`L2Cache` a bounded LRU of them in which dirty tables are pinned;
* :class:`ClusterBitmap` marks every host cluster of the file as it was opened that is
  metadata or referenced data;
* :func:`validate_l1` and :func:`validate_l2_steps` decide which entries read from disk are
  trusted, marking the clusters of the valid ones in the bitmap (see the engine's "Safety").
"""

from __future__ import annotations

import mmap
from collections import OrderedDict
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from qedfuse.errors import LimitError
from qedfuse.records import StatsRecord
from qedfuse.tables import MAX_FILE_CLUSTERS, PAGE_ENTRIES

if TYPE_CHECKING:
    from array import array

    from qedfuse import format as fmt

#: Host clusters mapped twice that the engine remembers; past this it refuses every write.
MAX_CONTESTED: Final = 65536


class ClusterBitmap:
    """One bit per host cluster of the file as it was opened: metadata, or referenced data.

    The bits live in an anonymous mapping, so pages never touched cost no memory: a 1 TiB
    sparse file with 4 KiB clusters reserves 32 MiB of address space, and uses only the pages
    of the clusters its tables actually reference.
    """

    def __init__(self, n_clusters: int, cluster_bits: int) -> None:
        self.n_clusters = n_clusters
        self.cluster_bits = cluster_bits
        if n_clusters > MAX_FILE_CLUSTERS:
            raise LimitError(
                f"image file too large: {n_clusters} clusters (at most {MAX_FILE_CLUSTERS})"
            )
        try:
            self._bits = mmap.mmap(-1, max(1, -(-n_clusters // 8)))
        except (OSError, MemoryError, OverflowError) as exc:
            raise LimitError(f"no memory to track {n_clusters} clusters: {exc}") from None

    def test_and_set(self, offset: int) -> bool:
        """Mark the cluster at file ``offset`` used; return whether it already was."""
        k = offset >> self.cluster_bits
        byte = self._bits[k >> 3]
        bit = 1 << (k & 7)
        if byte & bit:
            return True
        self._bits[k >> 3] = byte | bit
        return False

    def test(self, offset: int) -> bool:
        """Whether the cluster at file ``offset`` is marked."""
        k = offset >> self.cluster_bits
        return bool(self._bits[k >> 3] >> (k & 7) & 1)

    def _span(self, first: int, last: int) -> tuple[int, int, int] | None:
        """(first byte, last byte, mask over those bytes) of clusters ``first..last``."""
        first, last = max(0, first), min(self.n_clusters - 1, last)
        if first > last:
            return None
        b0, b1 = first >> 3, last >> 3
        return b0, b1, ((1 << (last - first + 1)) - 1) << (first - b0 * 8)

    def any_in(self, first: int, last: int) -> bool:
        """Whether any of clusters ``first..last`` (indices, inclusive) is marked."""
        span = self._span(first, last)
        if span is None:
            return False
        b0, b1, mask = span
        return bool(int.from_bytes(self._bits[b0 : b1 + 1], "little") & mask)

    def set_range(self, first: int, count: int) -> None:
        """Mark clusters ``first .. first + count - 1`` (indices) in a few byte operations."""
        span = self._span(first, first + count - 1)
        if span is None:
            return
        b0, b1, mask = span
        word = int.from_bytes(self._bits[b0 : b1 + 1], "little")
        if word & mask != mask:
            self._bits[b0 : b1 + 1] = (word | mask).to_bytes(b1 - b0 + 1, "little")

    def close(self) -> None:
        self._bits.close()


#: Up to this many bad indices are kept as a plain set (fast membership on the I/O path);
#: past it, as an :class:`IndexSet` bitmap, whose size does not grow with their number.
SMALL_BAD: Final = 1024


class IndexSet:
    """A set of table indices as a bitmap of ``size`` bits: a hostile table may make every
    one of its millions of entries bad, and a Python set of them would take ~60 bytes each."""

    __slots__ = ("_bits", "_count", "size")

    def __init__(self, size: int, *, full: bool = False) -> None:
        self.size = size
        n_bytes = -(-size // 8)
        self._bits = bytearray(b"\xff" * n_bytes) if full else bytearray(n_bytes)
        if full and size % 8:
            self._bits[-1] = (1 << (size % 8)) - 1
        self._count = size if full else 0

    def __contains__(self, index: object) -> bool:
        if not isinstance(index, int) or not 0 <= index < self.size:
            return False
        return bool(self._bits[index >> 3] >> (index & 7) & 1)

    def add(self, index: int) -> None:
        byte = self._bits[index >> 3]
        bit = 1 << (index & 7)
        if not byte & bit:
            self._bits[index >> 3] = byte | bit
            self._count += 1

    def discard(self, index: int) -> None:
        byte = self._bits[index >> 3]
        bit = 1 << (index & 7)
        if byte & bit:
            self._bits[index >> 3] = byte & ~bit
            self._count -= 1

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def __iter__(self) -> Iterator[int]:
        for k, byte in enumerate(self._bits):
            if byte:
                for bit in range(8):
                    if byte >> bit & 1:
                        yield k * 8 + bit


#: The bad entries of a table: a small set, or a bitmap when there are many.
BadSet = set[int] | IndexSet


def compact(bad: IndexSet) -> BadSet:
    """``bad`` as a plain set when it is small (faster to test), else as it is."""
    return set(bad) if len(bad) <= SMALL_BAD else bad


def bad_of(entries: array[int], indices: Iterable[int] | None) -> BadSet:
    """The indices among ``indices`` (None: all) whose entries map a data cluster (> 1)."""
    found = IndexSet(len(entries))
    for i in nonzero_indices(entries) if indices is None else indices:
        if entries[i] > 1:
            found.add(i)
    return compact(found)


_CHUNK_ENTRIES: Final = 128 * PAGE_ENTRIES  # 512 KiB of table


def nonzero_pages(entries: array[int]) -> Iterator[tuple[int, int]]:
    """(start, stop) of each 4 KiB page of ``entries`` that holds a non-zero entry (the
    all-zero pages of a sparse table are skipped in C, not entry by entry)."""
    view = memoryview(entries).cast("B")
    n = len(entries)
    for chunk in range(0, n, _CHUNK_ENTRIES):  # a copy of at most 1 MiB at a time
        chunk_stop = min(n, chunk + _CHUNK_ENTRIES)
        raw = view[chunk * 8 : chunk_stop * 8].tobytes()
        if raw.count(0) == len(raw):
            continue
        for start in range(chunk, chunk_stop, PAGE_ENTRIES):
            stop = min(chunk_stop, start + PAGE_ENTRIES)
            if raw.count(0, (start - chunk) * 8, (stop - chunk) * 8) != (stop - start) * 8:
                yield start, stop


def nonzero_indices(entries: array[int]) -> Iterator[int]:
    """Indices of the entries on :func:`nonzero_pages` (zeros among them included)."""
    for start, stop in nonzero_pages(entries):
        yield from range(start, stop)


def validate_l1(
    l1: array[int], geometry: fmt.Geometry, l1_offset: int, open_end: int, used: ClusterBitmap
) -> BadSet:
    """Indices of the bad entries of the L1 table read at open; marks the metadata clusters.

    Bad: not a table inside the file as it was opened (``open_end``), overlapping the L1
    table, or overlapping another entry's table.  The clusters of the L1 table and of every
    other named table are marked in ``used``.  Memory does not grow with the entries (a
    hostile L1 may name millions of tables): overlaps are found through two bitmaps of table
    starts, each as sparse as ``used``, never through a list of the entries.
    """
    geo = geometry
    table_bytes = geo.table_bytes
    span = geo.table_size  # clusters per table
    cbits = geo.cluster_bits
    l1_end = l1_offset + table_bytes
    bad = IndexSet(len(l1))
    starts = ClusterBitmap(used.n_clusters, cbits)  # clusters where a named table starts
    twice = ClusterBitmap(used.n_clusters, cbits)  # ... and where two or more do
    try:
        for index in nonzero_indices(l1):
            offset = l1[index]
            if offset == 0:
                continue
            if not geo.is_table_offset(offset, open_end) or (
                offset < l1_end and offset + table_bytes > l1_offset
            ):
                bad.add(index)
            elif starts.test_and_set(offset):
                twice.test_and_set(offset)
        used.set_range(l1_offset >> cbits, span)
        # Two L1 entries whose tables overlap are both unusable: writing through one would
        # change the other's mappings.  Tables have one size, so another table overlaps this
        # one exactly when one starts less than a table's length before or after it.
        # Overlapping tables are still L2 metadata, so a data entry pointing into one must
        # be refused too: every named table's clusters are marked.
        for index in nonzero_indices(l1):
            offset = l1[index]
            if offset == 0 or index in bad:
                continue
            first = offset >> cbits
            if (
                twice.test(offset)
                or starts.any_in(first - span + 1, first - 1)
                or starts.any_in(first + 1, first + span - 1)
            ):
                bad.add(index)
            used.set_range(first, span)
    finally:
        starts.close()
        twice.close()
    return compact(bad)


#: Entries a table's validation checks between two chances for other requests to run.
STEP_ENTRIES: Final = 16 * PAGE_ENTRIES


def validate_l2_steps(
    entries: array[int],
    geometry: fmt.Geometry,
    open_end: int,
    used: ClusterBitmap,
    contested: set[int],
) -> Generator[None, None, BadSet]:
    """Indices of invalid data entries in an L2 table read from disk for the first time.

    Bad: misaligned, in the header, at or past the open-time end of the file (``open_end``),
    in metadata, or a host cluster some other entry already maps (the first mapping seen
    keeps it).  Valid entries are marked in ``used``; a cluster mapped twice is added to
    ``contested`` (up to :data:`MAX_CONTESTED`).  All-zero pages cost a byte count in C.
    A generator: it yields after every :data:`STEP_ENTRIES` non-zero entries, so an async
    caller lets other requests run within a hostile 2M-entry table, and returns the bad
    entries."""
    mask = geometry.cluster_size - 1
    low = geometry.header_end_offset
    high = open_end
    bad = IndexSet(len(entries))
    since_yield = 0
    for start, stop in nonzero_pages(entries):
        for i in range(start, stop):
            e = entries[i]
            if e > 1 and (e & mask or e < low or e >= high or used.test_and_set(e)):
                bad.add(i)
                if not e & mask and low <= e < high and len(contested) < MAX_CONTESTED:
                    contested.add(e)  # the other mapping of it is bad as well
        since_yield += stop - start
        if since_yield >= STEP_ENTRIES:
            since_yield = 0
            yield
    return compact(bad)


class L2Table:
    """One cached L2 table with dirty tracking."""

    __slots__ = ("bad", "dirty_pages", "entries", "is_new", "offset")

    def __init__(self, offset: int, entries: array[int], bad: BadSet, *, is_new: bool) -> None:
        self.offset = offset
        self.entries = entries
        self.bad = bad
        self.is_new = is_new
        self.dirty_pages: set[int] = set()

    @property
    def dirty(self) -> bool:
        return self.is_new or bool(self.dirty_pages)

    def set_entry(self, index: int, value: int) -> None:
        self.entries[index] = value
        self.bad.discard(index)
        self.dirty_pages.add(index // PAGE_ENTRIES)


class L2Cache:
    """A bounded LRU cache of L2 tables keyed by file offset.  Dirty tables are pinned."""

    def __init__(self, capacity_bytes: int, table_bytes: int) -> None:
        self.table_bytes = table_bytes
        # Always room for a couple of tables, whatever the budget.
        self.capacity = max(2, capacity_bytes // table_bytes)
        self._tables: OrderedDict[int, L2Table] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, offset: int) -> L2Table | None:
        table = self._tables.get(offset)
        if table is not None:
            self._tables.move_to_end(offset)
            self.hits += 1
        return table

    def insert(self, table: L2Table) -> L2Table:
        """Insert ``table`` unless one with its offset is cached; return the cached one."""
        existing = self._tables.get(table.offset)
        if existing is not None:
            return existing
        self._tables[table.offset] = table
        self.misses += 1
        if len(self._tables) > self.capacity:
            for offset in [o for o, t in self._tables.items() if not t.dirty]:
                if len(self._tables) <= self.capacity:
                    break
                if offset != table.offset:
                    del self._tables[offset]
        return table

    def dirty_tables(self) -> list[L2Table]:
        return sorted((t for t in self._tables.values() if t.dirty), key=lambda t: t.offset)

    @property
    def n_dirty(self) -> int:
        return sum(1 for t in self._tables.values() if t.dirty)

    @property
    def over_budget(self) -> bool:
        # n_dirty <= len: the cheap test first (this runs after every write)
        return len(self._tables) > self.capacity and self.n_dirty > self.capacity

    def clear(self) -> None:
        self._tables.clear()

    def __len__(self) -> int:
        return len(self._tables)

    def statistics(self) -> CacheStatistics:
        """The cache's figures now (for ``qedfuse status``)."""
        lookups = self.hits + self.misses
        return CacheStatistics(
            capacity_tables=self.capacity,
            table_bytes=self.table_bytes,
            cached_tables=len(self._tables),
            dirty_tables=self.n_dirty,
            hits=self.hits,
            misses=self.misses,
            hit_rate=self.hits / lookups if lookups else None,
        )


@dataclass(frozen=True, slots=True)
class CacheStatistics(StatsRecord):
    """The L2 cache's figures: size, dirty tables, hits (found cached) and misses (read)."""

    capacity_tables: int
    table_bytes: int
    cached_tables: int
    dirty_tables: int
    hits: int
    misses: int
    hit_rate: float | None  # None before the first lookup


__all__ = [
    "MAX_CONTESTED",
    "MAX_FILE_CLUSTERS",
    "SMALL_BAD",
    "BadSet",
    "CacheStatistics",
    "ClusterBitmap",
    "IndexSet",
    "L2Cache",
    "L2Table",
    "bad_of",
    "compact",
    "nonzero_indices",
    "nonzero_pages",
    "validate_l1",
    "validate_l2_steps",
]
