"""The guest-to-host map as the engine holds it, and the lookup of a guest range.

:class:`ClusterMap` owns the metadata the engine has read: the :class:`~qedfuse.l1table.L1Table`,
the :class:`~qedfuse.l2cache.L2Cache`, and the trust in entries read from disk (the bitmap of
used host clusters of the file as it was opened, the clusters two entries map, each table's
verdict when it was first checked).  It loads each L2 table once (concurrent loads of one
table wait for the first), surveys every table before the first write, and maps a guest
range to :class:`Extent` runs.  It reads tables (through :mod:`qedfuse.tables`) but never
writes: changing the map, flushing it and the failsafe are :class:`~qedfuse.engine.QedImage`'s,
which it tells through ``on_bad`` when what it read must stop writes.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from qedfuse import format as fmt
from qedfuse.errors import CorruptionError
from qedfuse.l1table import L1Table
from qedfuse.l2cache import (
    MAX_CONTESTED,
    BadSet,
    ClusterBitmap,
    L2Cache,
    L2Table,
    bad_of,
    nonzero_indices,
    validate_l2_steps,
)
from qedfuse.tables import read_table, read_table_bytes

if TYPE_CHECKING:
    from array import array

    from qedfuse.imagefile import BlockFile

# The engine's records: its log lines keep the engine's name.
log = logging.getLogger("qedfuse.engine")

#: A reloaded table keeps its own list of bad entries only up to this many (then: all bad).
MAX_REMEMBERED_BAD = 64


class Kind(enum.Enum):
    """What a run of guest clusters maps to."""

    DATA = "data"  # allocated cluster(s) in this image
    ZERO = "zero"  # zero cluster(s): read zeros, hide the backing image
    UNALLOCATED = "unallocated"  # read through to the backing image, or zeros


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of guest bytes with one mapping; ``host_offset`` only for DATA."""

    kind: Kind
    pos: int
    length: int
    host_offset: int | None = None


class ClusterMap:
    """L1, the cached L2 tables and the trust in them, for one open image."""

    def __init__(
        self,
        file: BlockFile,
        geometry: fmt.Geometry,
        l1: array[int],
        l1_offset: int,
        open_end: int,
        *,
        cache_size: int,
        read_only: bool,
        on_bad: Callable[[str], None],
    ) -> None:
        self.file = file
        self.geometry = geometry
        self.read_only = read_only
        self._on_bad = on_bad  # stop writes (the engine's failsafe), read-write opens only
        self.cache = L2Cache(cache_size, geometry.table_bytes)
        self._loading: dict[int, trio.Event] = {}
        # L2 table offset -> its bad entries when first checked (None: too many, all bad).
        # Tables we create, and tables checked once, are never checked again: their entries
        # are already marked in the bitmap, so a second check would call them duplicates.
        self._checked_l2: dict[int, frozenset[int] | None] = {}
        # Host clusters two entries map: neither guest cluster may use them (the first
        # mapping seen is not more trustworthy than the second).
        self._contested: set[int] = set()
        self.surveyed = False  # every L2 table the L1 names checked (see survey)
        self._survey_running: trio.Event | None = None
        self.open_end = open_end
        self._used = ClusterBitmap(open_end >> geometry.cluster_bits, geometry.cluster_bits)
        self.l1 = L1Table(l1, geometry, l1_offset, open_end, self._used)

    def close(self) -> None:
        self._used.close()

    # ------------------------------------------------------------------ trust

    async def _validate_l2(self, entries: array[int]) -> BadSet:
        """Indices of invalid data entries in an L2 table read from disk for the first time
        (:func:`~qedfuse.l2cache.validate_l2_steps`), letting other requests run within a large
        table; too many contested clusters stop writes."""
        contested = self._contested
        had_room = len(contested) < MAX_CONTESTED
        steps = validate_l2_steps(entries, self.geometry, self.open_end, self._used, contested)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                bad: BadSet = done.value
                break
            await trio.lowlevel.checkpoint()
        if had_room and len(contested) == MAX_CONTESTED and not self.read_only:
            # Too many to remember: refuse every write instead (memory bound).
            self._on_bad(f"over {MAX_CONTESTED} clusters are mapped twice")
        return bad

    def add_table(self, l1_index: int, table: L2Table) -> None:
        """Adopt a table the engine created (its zeros are on the file) for ``l1_index``."""
        self._checked_l2[table.offset] = frozenset()
        self.cache.insert(table)
        self.l1.point(l1_index, table.offset)

    # ------------------------------------------------------------------ L2 access

    async def load_l2(self, offset: int) -> L2Table:
        """Return the cached L2 table at ``offset``, reading it once if needed."""
        while True:
            table = self.cache.get(offset)
            if table is not None:
                return table
            event = self._loading.get(offset)
            if event is None:
                break
            await event.wait()
        event = trio.Event()
        self._loading[offset] = event
        try:
            entries = await read_table(self.file, offset, self.geometry)
            # An evicted table is clean and every change to it since its check was ours: a
            # table checked once keeps the verdict it had (its entries are in the bitmap).
            bad: BadSet
            if offset in self._checked_l2:
                bad = bad_of(entries, self._checked_l2[offset])
            else:
                bad = await self._validate_l2(entries)
                self._remember(offset, bad)
            if bad:
                self._report_bad(offset, bad)
            return self.cache.insert(L2Table(offset, entries, bad, is_new=False))
        finally:
            del self._loading[offset]
            event.set()

    def _remember(self, offset: int, bad: BadSet) -> None:
        """Record a checked table's verdict: its few bad entries, or None for many."""
        self._checked_l2[offset] = frozenset(bad) if len(bad) <= MAX_REMEMBERED_BAD else None

    def _report_bad(self, offset: int, bad: BadSet) -> None:
        log.warning("L2 table at %#x has %d invalid entries", offset, len(bad))
        if not self.read_only:
            self._on_bad(f"L2 table at {offset:#x} has {len(bad)} invalid entries")

    async def l2_for(self, pos: int) -> L2Table | None:
        """The L2 table mapping ``pos``, or None when its L1 entry is empty."""
        l1_index = self.geometry.l1_index(pos)
        l1 = self.l1
        if l1_index in l1.bad:
            raise CorruptionError(
                f"invalid L1 entry {l1_index} ({l1.entries[l1_index]:#x}) maps guest offset {pos}"
            )
        offset = l1.entries[l1_index]
        if offset == 0:
            return None
        return await self.load_l2(offset)

    async def survey(self) -> None:
        """Before the first write: check every L2 table the L1 names, once.

        A host cluster mapped by two guest clusters is found when the second mapping is
        checked; were that table loaded only after a write through the first, the write would
        already have changed the other guest cluster's data.  Reads need no survey.
        """
        while not self.surveyed:
            running = self._survey_running
            if running is not None:
                await running.wait()
                continue
            running = self._survey_running = trio.Event()
            try:
                entries = self.l1.entries[:]  # a copy: L1 may change while the survey waits
                for index in nonzero_indices(entries):
                    offset = entries[index]
                    if offset and index not in self.l1.bad and offset not in self._checked_l2:
                        await self._survey_table(offset)
                        # a long survey (a hostile L1 names many tables) never stops the
                        # other requests: reads go on meanwhile
                        await trio.lowlevel.checkpoint()
                self.surveyed = True
            finally:
                self._survey_running = None
                running.set()

    async def _survey_table(self, offset: int) -> None:
        """Check one table for the survey without caching it: its verdict is recorded (and
        its clusters marked) as a load would; a guest access later loads it and acts on it."""
        event = self._loading.get(offset)
        if event is not None:  # a load is checking it right now
            await event.wait()
            return
        event = self._loading[offset] = trio.Event()
        try:
            raw = await read_table_bytes(self.file, offset, self.geometry)
            if offset not in self._checked_l2:
                entries = fmt.decode_table(raw)
                del raw
                bad = await self._validate_l2(entries)
                self._remember(offset, bad)
                if bad:
                    # What the survey finds stops writes as a load would (the guest range
                    # may never be touched, but the image is corrupt: NEED_CHECK stays set).
                    self._report_bad(offset, bad)
        finally:
            del self._loading[offset]
            event.set()

    # ------------------------------------------------------------------ lookup

    async def lookup(self, pos: int, size: int) -> Extent:
        """Map the longest run starting at ``pos`` (at most ``size`` bytes) with one kind."""
        geo = self.geometry
        in_cluster = geo.offset_in_cluster(pos)
        table_end = (pos // geo.l2_coverage + 1) * geo.l2_coverage
        size = min(size, table_end - pos)
        table = await self.l2_for(pos)
        if table is None:
            return Extent(Kind.UNALLOCATED, pos, size)
        entries = table.entries
        first = geo.l2_index(pos)
        last = geo.l2_index(pos + size - 1)
        if first in table.bad:
            raise CorruptionError(
                f"invalid L2 entry {first} ({entries[first]:#x}) in table at "
                f"{table.offset:#x} maps guest offset {pos}"
            )
        value = entries[first]
        cs = geo.cluster_size
        index = first + 1
        if value > fmt.ZERO_CLUSTER:
            contested = self._contested
            if contested and value in contested:
                raise CorruptionError(
                    f"L2 entry {first} in table at {table.offset:#x} maps host cluster "
                    f"{value:#x}, which another entry maps too (guest offset {pos})"
                )
            expect = value + cs
            while (
                index <= last
                and entries[index] == expect
                and index not in table.bad
                and not (contested and expect in contested)
            ):
                index += 1
                expect += cs
        else:
            while index <= last and entries[index] == value:
                index += 1
        length = min(size, (index - first) * cs - in_cluster)
        if value == fmt.UNALLOCATED:
            return Extent(Kind.UNALLOCATED, pos, length)
        if value == fmt.ZERO_CLUSTER:
            return Extent(Kind.ZERO, pos, length)
        return Extent(Kind.DATA, pos, length, value + in_cluster)

    async def extents(self, pos: int, end: int) -> list[Extent]:
        """The mapping of ``[pos, end)`` as merged runs."""
        out: list[Extent] = []
        while pos < end:
            ext = await self.lookup(pos, end - pos)
            prev = out[-1] if out else None
            if (
                prev is not None
                and prev.kind is ext.kind
                and (
                    ext.kind is not Kind.DATA
                    or (
                        prev.host_offset is not None
                        and prev.host_offset + prev.length == ext.host_offset
                    )
                )
            ):
                out[-1] = Extent(prev.kind, prev.pos, prev.length + ext.length, prev.host_offset)
            else:
                out.append(ext)
            pos += ext.length
        return out

    async def allocated_clusters(self) -> int:
        """Data clusters the valid L1 entries' tables map (loading each table)."""
        total = 0
        l1 = self.l1
        for index, offset in enumerate(l1.entries):
            if offset == 0 or index in l1.bad:
                continue
            table = await self.load_l2(offset)
            total += sum(1 for e in table.entries if e > 1)
        return total


__all__ = ["MAX_REMEMBERED_BAD", "ClusterMap", "Extent", "Kind"]
