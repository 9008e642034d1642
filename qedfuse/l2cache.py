"""The engine's in-memory tables: cached L2 tables, their LRU cache, and trust in what is read.

No I/O here: :class:`~qedfuse.clustermap.ClusterMap` reads the tables (through
:mod:`qedfuse.tables`) and keeps them in these structures, :class:`~qedfuse.engine.QedImage`
writes them back.

* :class:`L2Table` is one cached table with its bad entries and dirty 4 KiB pages;
  :class:`L2Cache` a bounded LRU of them in which dirty tables are pinned;
* :class:`ClusterBitmap` marks every host cluster of the file as it was opened that is
  metadata or referenced data;
* :func:`validate_l1` and :func:`validate_l2` decide which entries read from disk are
  trusted, marking the clusters of the valid ones in the bitmap (see the engine's "Safety").
"""

from __future__ import annotations

import mmap
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from qedfuse.errors import LimitError
from qedfuse.records import StatsRecord
from qedfuse.tables import PAGE_ENTRIES

if TYPE_CHECKING:
    from array import array

    from qedfuse import format as fmt

#: Largest image file (in clusters) the engine tracks: its bitmap is then 512 MiB of address
#: space (16 TiB files with 4 KiB clusters, 256 TiB with 64 KiB).
MAX_FILE_CLUSTERS: Final = 1 << 32
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

    def close(self) -> None:
        self._bits.close()


def validate_l1(
    l1: array[int], geometry: fmt.Geometry, l1_offset: int, open_end: int, used: ClusterBitmap
) -> set[int]:
    """Indices of the bad entries of the L1 table read at open; marks the metadata clusters.

    Bad: not a table inside the file as it was opened (``open_end``), overlapping the L1
    table, or overlapping another entry's table.  The clusters of the L1 table and of every
    other named table are marked in ``used``.
    """
    geo = geometry
    l1_end = l1_offset + geo.table_bytes
    bad: set[int] = set()
    candidates: list[tuple[int, int]] = []
    for index, offset in enumerate(l1):
        if offset == 0:
            continue
        if not geo.is_table_offset(offset, open_end) or (
            offset < l1_end and offset + geo.table_bytes > l1_offset
        ):
            bad.add(index)
        else:
            candidates.append((offset, index))
    candidates.sort()
    # Two L1 entries whose tables overlap are both unusable: writing through one would
    # change the other's mappings.
    for k in range(1, len(candidates)):
        if candidates[k][0] < candidates[k - 1][0] + geo.table_bytes:
            bad.add(candidates[k][1])
            bad.add(candidates[k - 1][1])
    for offset in range(l1_offset, l1_end, geo.cluster_size):
        used.test_and_set(offset)
    # Overlapping tables are refused above but are still L2 metadata: a data entry
    # pointing into one must be refused too, not written through.
    for offset, _index in candidates:
        for k in range(geo.table_size):
            used.test_and_set(offset + k * geo.cluster_size)
    return bad


def validate_l2(
    entries: array[int],
    geometry: fmt.Geometry,
    open_end: int,
    used: ClusterBitmap,
    contested: set[int],
    keep: int | None = None,
) -> set[int]:
    """Indices of invalid data entries in an L2 table read from disk for the first time.

    Bad: misaligned, in the header, at or past the open-time end of the file (``open_end``),
    in metadata, or a host cluster some other entry already maps (the first mapping seen
    keeps it).  Valid entries are marked in ``used``; a cluster mapped twice is added to
    ``contested`` (up to :data:`MAX_CONTESTED`).  At most ``keep`` indices are returned.
    """
    mask = geometry.cluster_size - 1
    low = geometry.header_end_offset
    high = open_end
    bad: set[int] = set()
    for i, e in enumerate(entries):
        if e > 1 and (e & mask or e < low or e >= high or used.test_and_set(e)):
            if keep is None or len(bad) < keep:  # a hostile table may be all bad
                bad.add(i)
            if not e & mask and low <= e < high and len(contested) < MAX_CONTESTED:
                contested.add(e)  # the other mapping of it is bad as well
    return bad


class L2Table:
    """One cached L2 table with dirty tracking."""

    __slots__ = ("bad", "dirty_pages", "entries", "is_new", "offset")

    def __init__(self, offset: int, entries: array[int], bad: set[int], *, is_new: bool) -> None:
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
    "CacheStatistics",
    "ClusterBitmap",
    "L2Cache",
    "L2Table",
    "validate_l1",
    "validate_l2",
]
