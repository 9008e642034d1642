"""The engine's in-memory L1 table: its entries, which of them are trusted, and its pages.

No I/O here: the engine reads L1 (through :mod:`qedfuse.tables`) and writes the pages this
table plans.  :class:`L1Table` keeps

* the entries and, fixed once at open, the *bad* ones (:func:`~qedfuse.l2cache.validate_l1`
  against the used-cluster bitmap, which it marks with the metadata clusters);
* the 4 KiB pages: dirty (changed since the last flush), used (mapping something on disk),
  unknown (a write of them failed midway), and a copy of what L1 on disk holds, so a flush
  can tell whether someone else overwrote the pages in use (see the engine's "Safety");
* the plan of a flush's page writes (:meth:`L1Table.page_writes`) and their bookkeeping.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

from qedfuse import format as fmt
from qedfuse.l2cache import BadSet, IndexSet, compact, validate_l1
from qedfuse.tables import PAGE_ENTRIES, page_runs

if TYPE_CHECKING:
    from array import array

    from qedfuse.l2cache import ClusterBitmap

# The engine's records: its log lines keep the engine's name.
log = logging.getLogger("qedfuse.engine")

#: L1 pages compared with what we wrote, per flush (a hostile L1 may use all of them).
MAX_VERIFY_PAGES = 16


class PageWrite(NamedTuple):
    """One run of consecutive dirty pages: entries ``[start, stop)``, encoded as ``data``."""

    start: int
    stop: int
    data: bytes
    pages: range


class L1Table:
    """The L1 table the engine holds, with its bad entries and page bookkeeping."""

    def __init__(
        self,
        entries: array[int],
        geometry: fmt.Geometry,
        l1_offset: int,
        open_end: int,
        used: ClusterBitmap,
    ) -> None:
        """Adopt the L1 table read at open: validate entries, mark the metadata clusters.

        Trust is fixed here, once: an entry read from disk is valid only if it points inside
        the file as it was now (``open_end``).  The file grows while the image is open, but
        what grows it is ours, so an entry reaching past the open-time end was never written
        by anyone who knew what lives there (issue 11, finding 1).
        """
        self.entries = entries
        self.disk = bytearray(fmt.encode_table(entries))  # what L1 on disk holds
        self._verify_cursor = 0
        self.used_pages = {i // PAGE_ENTRIES for i, offset in enumerate(entries) if offset}
        self.dirty_pages: set[int] = set()
        self.unknown_pages: set[int] = set()  # L1 pages whose pwrite failed midway
        self.bad: BadSet = validate_l1(entries, geometry, l1_offset, open_end, used)
        if self.bad:
            log.warning(
                "%d invalid L1 entries; the guest ranges they map will fail with EIO",
                len(self.bad),
            )

    def reinstall(self, raw: bytes) -> None:
        """Failsafe: show the L1 on disk, trusting only what open trusted and what we wrote.

        An on-disk entry equal to the one we hold keeps its validity; an entry we never wrote
        (changed by someone else, or a page torn by the failed write) is bad.  The open-time
        end and the bitmap stay as they are, so nothing hostile becomes valid by the file
        having grown meanwhile.
        """
        disk = fmt.decode_table(raw)
        bad = IndexSet(len(disk))
        for index, offset in enumerate(disk):
            if offset and (offset != self.entries[index] or index in self.bad):
                bad.add(index)
        self.bad = compact(bad)
        self.entries = disk
        self.disk = bytearray(raw)
        self.used_pages = {i // PAGE_ENTRIES for i, offset in enumerate(disk) if offset}
        self.dirty_pages = set()
        self.unknown_pages = set()

    def all_bad(self) -> None:
        """L1 could not be re-read: every entry is bad, every range fails."""
        self.bad = IndexSet(len(self.entries), full=True)

    def point(self, index: int, offset: int) -> None:
        """Point entry ``index`` at the (new) L2 table at ``offset``; its page becomes dirty."""
        self.entries[index] = offset
        self.dirty_pages.add(index // PAGE_ENTRIES)

    def n_tables(self) -> int:
        """Entries that name a table (valid or not)."""
        return sum(1 for offset in self.entries if offset)

    def pages_to_verify(self) -> list[int]:
        """The pages one check compares with the file (with :attr:`disk`): those that map
        something (a zeroed or changed page there loses data), at most
        :data:`MAX_VERIFY_PAGES` per check, in turns."""
        used = sorted(self.used_pages - self.unknown_pages)
        if len(used) <= MAX_VERIFY_PAGES:
            return used
        start = self._verify_cursor % len(used)
        self._verify_cursor = start + MAX_VERIFY_PAGES
        return sorted((used + used)[start : start + MAX_VERIFY_PAGES])

    def page_writes(self, pages: set[int]) -> Iterator[PageWrite]:
        """The writes of ``pages`` (merged into runs), each encoded when it is reached.

        The caller writes each at ``l1_offset + start * 8``, between :meth:`writing` and
        :meth:`written`.
        """
        entries = self.entries
        for start, stop in page_runs(pages, len(entries)):
            data = fmt.encode_table(entries, start, stop)
            yield PageWrite(
                start, stop, data, range(start // PAGE_ENTRIES, -(-stop // PAGE_ENTRIES))
            )

    def writing(self, write: PageWrite) -> None:
        """A run's pwrite starts: until it completes, what the file holds there is unknown."""
        self.unknown_pages.update(write.pages)

    def written(self, write: PageWrite) -> None:
        """A run's pwrite completed: the file holds it."""
        self.disk[write.start * 8 : write.stop * 8] = write.data
        self.used_pages.update(write.pages)
        self.unknown_pages.difference_update(write.pages)


__all__ = ["MAX_VERIFY_PAGES", "L1Table", "PageWrite"]
