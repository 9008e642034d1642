"""Consistency check and repair of a QED image (``qedfuse check``, repair on a dirty open).

The check works on the image file alone (a :class:`~qedfuse.imagefile.BlockFile`, read and
written through :mod:`qedfuse.tables`), never through the engine's cache; the report it
returns, and its text and JSON, are :mod:`qedfuse.checkreport`'s.  Over 600 lines: the walk,
its repairs and their bounds are one algorithm over one cluster bitmap.  It classifies
problems as QEMU 7.2's ``qemu-img check`` does:

* **corruption**: an L1 entry that is not a valid L2 table offset (unaligned, inside the
  header, table running past the end of the file) or whose table overlaps the header, the
  L1 table or an earlier L2 table (one corruption per overlapping cluster); an L2 entry other
  than 0 or 1 that is not a valid data cluster offset, points into metadata, or names a
  cluster another L2 entry already references (a duplicate);
* **leak**: a whole cluster between the header and the (cluster-rounded-down) end of the file
  that nothing references.  Counted only when every table could be read;
* **check error**: an I/O error while reading a table; the check goes on with the rest.

``allocated_clusters`` and ``fragmented_clusters`` follow QEMU's definitions: every L2 entry
other than 0/1 (valid or not), and per table every such entry that is not the previous
one plus one cluster.

Repair (``repair=True``, ``"all"`` or ``"leaks"``: the modes do the same thing, because, as in
QEMU, whose driver only sees a "repair" flag, any repair mode also fixes corruptions):

* invalid or overlapping L1 entries and invalid L2 entries are set to 0 (that guest range
  then reads as unallocated: backing data or zeros);
* each extra reference to a duplicated data cluster gets its own copy of the cluster, so
  every guest cluster keeps reading what it read before (``duplicates="copy"``, the
  default), or is set to 0 (``duplicates="unmap"``: the first reference met, in L1 then L2
  order, keeps the cluster; the others read as unallocated);
* leaked clusters at the end of the file are reclaimed by truncating the file just past the
  last used cluster (a partial trailing cluster goes too); interior leaks stay (QED cannot
  reuse space) and are still reported;
* if no corruption and no check error remains, NEED_CHECK is cleared.

A repair walks the image up to three times: a survey that never writes (when it finds only
trailing leaks it truncates the file itself), the repairing walk (only when it found a
corruption), and a final check of the repaired image (as ``qemu-img check -r`` does).  The
report's counts are those of the final check, with the ``*_fixed`` counts and the messages
of the walk that repaired.  Only 4 KiB pages of a table holding a changed entry are written
back, so zeroing entries allocates no space in a sparse table; walks skip all-zero pages.

Deliberate differences from QEMU (each is a QEMU bug or limitation; docs/qemu-differences.md
names them under "Check and repair"):

* cluster indices are exact: no spurious leaks on files larger than ``(cs-1)*cs`` bytes
  (docs/qemu-differences.md#bug-a);
* every table is marked before any data cluster, so an L2 entry pointing into an L2 table
  (or the L1 table) is the corruption and is zeroed; QEMU blames whichever it meets second,
  may then skip a valid L2 table, and cannot repair the entry;
* an L2 table overlapping other metadata is detached (its L1 entry zeroed); QEMU only counts
  it, and leaves it there for a later write to clobber;
* duplicates are repaired by copying, within a byte bound, or on request by unmapping
  (QEMU counts them and leaves them);
* trailing leaks are reclaimed (QEMU never reclaims leaks);
* header cluster 0 is never a leak, even with ``header_size == 0``.

Bounded repair (the copies are the only repair that takes space): a repair first walks the
image without writing (the survey pass) and counts the duplicate references.  Their copies
need ``n * cluster_size`` bytes, which must fit in ``max_copy_bytes`` (default
:data:`DEFAULT_MAX_COPY_BYTES`), in :data:`MAX_DUPLICATE_REPAIRS` references, and, for an
image in a regular file, in the space ``fstatvfs`` shows as available to us, less
:data:`FREE_SPACE_RESERVE`.  Otherwise :class:`RepairLimitError` is raised before anything
is written: the image is exactly as it was, and the message says what to do (unmap the
duplicates instead, raise the limit, or free space).  A copy that still fails (another
writer took the space) is cut off again before any entry points at it.  So a tiny hostile
image with one cluster referenced 5,000 times cannot make a repair fill the disk.

Crash safety: before the first repair write, NEED_CHECK is set durably if it was clear.
Repairs then run in phases, each ending with ``fdatasync``: zero invalid entries (L1, L2);
truncate trailing leaks; write the copies of duplicated clusters; point the duplicate
entries at their copies; clear NEED_CHECK last.  A crash at any point leaves NEED_CHECK set
and an image whose next check finds at most what this one found, plus leaks.  Entries past
the end of the file are zeroed *before* anything can grow the file, so a crash can never
turn such an entry into a valid-looking reference to a copy.

Bounded resources: one bit per file cluster (refused above 2**31 clusters), one table
(at most :data:`~qedfuse.format.MAX_TABLE_SIZE`, with its raw bytes) in memory at a time, at most
:data:`MAX_DUPLICATE_REPAIRS` duplicates remembered (24 bytes each), one
:data:`_COPY_CHUNK` of cluster data at a time, at most :data:`MAX_MESSAGES` messages.
"""

from __future__ import annotations

import errno
import mmap
import os
import shlex
import stat
from array import array
from collections.abc import Iterator
from typing import TYPE_CHECKING, Final, Literal

import trio

from qedfuse import format as fmt
from qedfuse.checkreport import CheckReport, plural
from qedfuse.errors import QedError, ReadOnlyError
from qedfuse.tables import (
    MAX_FILE_CLUSTERS,
    PAGE_ENTRIES,
    page_runs,
    read_header,
    read_table,
    read_table_bytes,
    write_header,
)

if TYPE_CHECKING:
    from qedfuse.imagefile import BlockFile

#: Largest number of file clusters the checker accepts: the engine's limit
#: (:data:`qedfuse.tables.MAX_FILE_CLUSTERS`), so whatever it opens, a check can repair.
MAX_CLUSTERS: Final = MAX_FILE_CLUSTERS
#: Cap on recorded findings; further ones are counted but not described.
MAX_MESSAGES: Final = 1000
#: Cap on duplicate references copied in one run (each costs one new cluster and 24
#: bytes of memory until it is repaired); past it the repair is refused.
MAX_DUPLICATE_REPAIRS: Final = 1 << 20
#: Default cap on the bytes that copies of duplicated clusters may add to the file.
DEFAULT_MAX_COPY_BYTES: Final = 1 << 30
#: Bytes of the image filesystem's available space that copies must leave free.
FREE_SPACE_RESERVE: Final = 16 << 20

#: How a repair resolves a cluster referenced by several L2 entries.
DuplicateMode = Literal["copy", "unmap"]
DUPLICATE_MODES: Final = ("copy", "unmap")

_REPAIR_MODES: Final = {"leaks", "all"}
_CHUNK: Final = 1 << 16  # bitmap bytes handled at once when counting
_COPY_CHUNK: Final = 1 << 20  # bytes of a cluster copied at once


class RepairLimitError(QedError):
    """A repair would need more space than it may take; nothing was written."""

    errno = errno.ENOSPC


def _human(size: int) -> str:
    """``1.5 GiB``-style size for messages (exact bytes for small ones)."""
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            if unit == "bytes":
                return f"{size} bytes"
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


_ZERO_PAGE: Final = bytes(8 * PAGE_ENTRIES)


def _nonzero_page_indices(raw: bytes, n_entries: int) -> Iterator[int]:
    """Indices of the entries of ``raw`` outside its all-zero 4 KiB pages (comparing bytes
    skips a sparse table ~15x faster than looking at each entry)."""
    page = len(_ZERO_PAGE)
    for start in range(0, len(raw), page):
        if raw[start : start + page] != _ZERO_PAGE:
            first = start // 8
            yield from range(first, min(n_entries, first + PAGE_ENTRIES))


def _zeroed_bitmap(n_bytes: int) -> bytearray | mmap.mmap:
    """A zeroed byte buffer.  Large ones are private anonymous mappings (a shared one would
    allocate pages on read): pages the walk never marks stay non-resident, so a huge sparse
    file costs memory only where clusters are referenced."""
    if n_bytes <= 1 << 20:
        return bytearray(n_bytes)
    return mmap.mmap(-1, n_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def _repair_flag(repair: bool | str | None) -> bool:
    if repair is None or repair is False:
        return False
    if repair is True or repair in _REPAIR_MODES:
        return True
    raise QedError(f"unknown repair mode {repair!r} (expected 'leaks' or 'all')")


class _Pass:
    """One walk over the image's metadata, optionally repairing what it finds."""

    def __init__(
        self,
        file: BlockFile,
        header: fmt.Header,
        geometry: fmt.Geometry,
        file_size: int,
        *,
        duplicates: DuplicateMode = "copy",
        max_copies: int = 0,
        repair_wording: bool = False,
    ) -> None:
        self.file = file
        self.duplicate_mode = duplicates
        self.max_copies = max_copies  # duplicate references this repair may copy
        self.header = header
        self.geo = geometry
        self.file_size = file_size
        self.cs = geometry.cluster_size
        self.n_clusters = file_size // self.cs
        self.alloc_end = self.n_clusters * self.cs
        self.need_check_on_disk = header.need_check
        self.allocated = 0
        self.fragmented = 0
        self.leaks = 0
        self.leaks_fixed = 0
        self.corruptions = 0
        self.corruptions_fixed = 0
        self.check_errors = 0
        self.n_writes = 0
        self.messages: list[str] = []
        self._n_unlisted = 0
        self._bits: bytearray | mmap.mmap = bytearray()
        # First cluster index of every accepted L2 table -> its L1 index.
        self._tables: dict[int, int] = {}
        # (table offset, entry index, cluster offset) of every duplicate reference to repair.
        self._duplicates = array("Q")
        self._n_duplicates = 0
        self.n_duplicate_refs = 0  # every extra reference to an already referenced cluster
        self.truncatable = False  # a repair would truncate the file (trailing leaks)
        self._used_end = 0
        self._n_trailing = 0
        #: Word leak findings as a repair does (the survey of a repair that may only
        #: truncate reports its own findings).
        self.repair_wording = repair_wording

    # ------------------------------------------------------------------ bookkeeping

    def note(self, message: str) -> None:
        if len(self.messages) < MAX_MESSAGES:
            self.messages.append(message)
        else:
            self._n_unlisted += 1

    def finish_messages(self) -> None:
        if self._n_unlisted:
            self.messages.append(f"... and {self._n_unlisted} more findings not listed")
            self._n_unlisted = 0

    def _test(self, cluster: int) -> bool:
        return bool(self._bits[cluster >> 3] & (1 << (cluster & 7)))

    def _set(self, cluster: int) -> None:
        self._bits[cluster >> 3] |= 1 << (cluster & 7)

    def _owner(self, cluster: int) -> str | None:
        """Which metadata structure holds ``cluster``, if any."""
        if cluster < max(self.header.header_size, 1):
            return "the header"
        l1_first = self.header.l1_table_offset // self.cs
        if l1_first <= cluster < l1_first + self.geo.table_size:
            return "the L1 table"
        for k in range(self.geo.table_size):
            l1_index = self._tables.get(cluster - k)
            if l1_index is not None:
                return f"the L2 table at {(cluster - k) * self.cs:#x} of L1 entry {l1_index}"
        return None

    def _why_not_cluster(self, offset: int) -> str:
        if offset % self.cs:
            return f"offset {offset:#x} is not cluster aligned"
        if offset < self.geo.header_end_offset:
            return f"offset {offset:#x} is inside the header"
        return f"offset {offset:#x} past end of file"

    def _why_not_table(self, offset: int) -> str:
        if not self.geo.is_cluster_offset(offset, self.alloc_end):
            return self._why_not_cluster(offset)
        return f"L2 table at {offset:#x} runs past end of file"

    def _guest_pos(self, l1_index: int, l2_index: int) -> int:
        return (l1_index * self.geo.table_entries + l2_index) * self.cs

    async def ensure_need_check(self) -> None:
        """Make NEED_CHECK durable before the first repair write."""
        if self.need_check_on_disk:
            return
        features = self.header.features | fmt.Feature.NEED_CHECK
        self.header = self.header.replace(features=features)
        await write_header(self.file, self.header)
        self.need_check_on_disk = True

    async def _repair_write(self, offset: int, data: bytes) -> None:
        await self.ensure_need_check()
        await self.file.pwrite(offset, data)
        self.n_writes += 1

    async def _write_pages(self, table_offset: int, entries: array[int], pages: set[int]) -> None:
        """Write back only the 4 KiB pages of a table that hold changed entries.

        A changed entry was non-zero, so its page is already stored: the repair of a
        sparse table allocates no new space (rewriting whole 16 MiB tables would)."""
        for start, stop in page_runs(pages, len(entries)):
            await self._repair_write(
                table_offset + 8 * start, fmt.encode_table(entries, start, stop)
            )

    # ------------------------------------------------------------------ the walk

    async def run(self, *, repair: bool) -> None:
        geo = self.geo
        cs = self.cs
        if self.n_clusters > MAX_CLUSTERS:
            self.check_errors += 1
            self.note(
                f"file has {self.n_clusters} clusters, more than the checker's limit of "
                f"{MAX_CLUSTERS}; not checked"
            )
            return
        self._bits = _zeroed_bitmap((self.n_clusters + 7) // 8)
        for cluster in range(min(max(self.header.header_size, 1), self.n_clusters)):
            self._set(cluster)
        if self.file_size > self.alloc_end:
            self.note(
                f"{self.file_size - self.alloc_end} bytes past the last whole cluster "
                f"(at {self.alloc_end:#x}) are ignored"
            )
        l1_offset = self.header.l1_table_offset
        try:
            raw_l1 = await read_table_bytes(self.file, l1_offset, geo)
        except OSError as exc:
            self.check_errors += 1
            self.note(f"cannot read the L1 table at {l1_offset:#x}: {exc}")
            return
        for k in range(geo.table_size):  # inside the file: validate_header checked it
            self._set(l1_offset // cs + k)

        # Phase A: every L2 table, before any data cluster.
        tables: list[tuple[int, int]] = []  # (l1_index, table offset) in L1 order
        l1_changed: set[int] = set()
        l1 = fmt.decode_table(raw_l1)
        for l1_index in _nonzero_page_indices(raw_l1, len(l1)):
            offset = l1[l1_index]
            if offset == fmt.UNALLOCATED:
                continue
            n_bad = 1
            if not geo.is_table_offset(offset, self.alloc_end):
                problem = self._why_not_table(offset)
            else:
                first = offset // cs
                overlaps = [first + k for k in range(geo.table_size) if self._test(first + k)]
                if not overlaps:
                    for k in range(geo.table_size):
                        self._set(first + k)
                    self._tables[first] = l1_index
                    tables.append((l1_index, offset))
                    continue
                n_bad = len(overlaps)
                problem = (
                    f"L2 table at {offset:#x} overlaps {self._owner(overlaps[0])} "
                    f"({plural(n_bad, 'cluster')})"
                )
            if repair:
                l1[l1_index] = fmt.UNALLOCATED
                l1_changed.add(l1_index // PAGE_ENTRIES)
                self.corruptions_fixed += n_bad
                self.note(f"L1 entry {l1_index}: {problem}; repaired: entry zeroed")
            else:
                self.corruptions += n_bad
                self.note(f"L1 entry {l1_index}: {problem}")
        if l1_changed:
            await self._write_pages(l1_offset, l1, l1_changed)

        # Phase B: the data clusters of every accepted L2 table.
        for l1_index, table_offset in tables:
            await self._check_l2(l1_index, table_offset, repair=repair)
        if self.n_writes:
            await self.file.fdatasync()

        if self.check_errors == 0:
            await self._count_leaks(repair=repair)
        if repair and self._n_duplicates:
            await self._repair_duplicates()
        self.finish_messages()

    async def _check_l2(self, l1_index: int, table_offset: int, *, repair: bool) -> None:
        geo = self.geo
        cs = self.cs
        await trio.lowlevel.checkpoint()  # inline preads do not yield: let signals in
        try:
            raw = await read_table_bytes(self.file, table_offset, geo)
        except OSError as exc:
            self.check_errors += 1
            self.note(f"cannot read the L2 table at {table_offset:#x} (L1 entry {l1_index}): {exc}")
            return
        entries = fmt.decode_table(raw)
        changed: set[int] = set()  # pages of the table holding a changed entry
        previous: int | None = None
        header_end = geo.header_end_offset
        alloc_end = self.alloc_end
        bits = self._bits
        for l2_index in _nonzero_page_indices(raw, len(entries)):
            offset = entries[l2_index]
            if offset <= fmt.ZERO_CLUSTER:
                continue
            self.allocated += 1
            if previous is not None and offset != previous + cs:
                self.fragmented += 1
            previous = offset
            if offset % cs == 0 and header_end <= offset < alloc_end:
                cluster = offset // cs
                mask = 1 << (cluster & 7)
                if not bits[cluster >> 3] & mask:
                    bits[cluster >> 3] |= mask
                    continue
                owner = self._owner(cluster)
                if owner is None:
                    self.n_duplicate_refs += 1
                    if not (repair and self.duplicate_mode == "unmap"):
                        self._duplicate(table_offset, l1_index, l2_index, offset, repair=repair)
                        continue
                    problem = f"cluster {offset:#x} is also referenced by another L2 entry"
                else:
                    problem = f"offset {offset:#x} points into {owner}"
            else:
                problem = self._why_not_cluster(offset)
            where = (
                f"L2 table {table_offset:#x} entry {l2_index} "
                f"(guest offset {self._guest_pos(l1_index, l2_index):#x})"
            )
            if repair:
                entries[l2_index] = fmt.UNALLOCATED
                changed.add(l2_index // PAGE_ENTRIES)
                self.corruptions_fixed += 1
                self.note(f"{where}: {problem}; repaired: entry zeroed")
            else:
                self.corruptions += 1
                self.note(f"{where}: {problem}")
        if changed:
            await self._write_pages(table_offset, entries, changed)

    def _duplicate(
        self, table_offset: int, l1_index: int, l2_index: int, offset: int, *, repair: bool
    ) -> None:
        where = (
            f"L2 table {table_offset:#x} entry {l2_index} "
            f"(guest offset {self._guest_pos(l1_index, l2_index):#x})"
        )
        problem = f"cluster {offset:#x} is also referenced by another L2 entry"
        if repair and self._n_duplicates < min(self.max_copies, MAX_DUPLICATE_REPAIRS):
            self._duplicates.extend((table_offset, l2_index, offset))
            self._n_duplicates += 1
            return  # counted and described when repaired
        self.corruptions += 1
        if repair:
            problem += " (not repaired: more duplicates than the survey counted)"
        self.note(f"{where}: {problem}")

    async def _count_leaks(self, *, repair: bool) -> None:
        """Count unreferenced clusters; in repair mode truncate the trailing ones."""
        n = self.n_clusters
        bits = self._bits
        used = 0
        for start in range(0, len(bits), _CHUNK):
            used += int.from_bytes(bits[start : start + _CHUNK], "little").bit_count()
        self.leaks = n - used
        last_used = self._last_used()
        used_end = (last_used + 1) * self.cs
        n_trailing = n - (last_used + 1)
        self.truncatable = self.file_size > used_end
        self._used_end = used_end
        self._n_trailing = n_trailing
        wording = repair or self.repair_wording
        self._describe_leaks(last_used + 1, repair=wording)
        if n_trailing:
            suffix = f"; repaired: file truncated to {used_end:#x}" if wording else ""
            self.note(
                f"clusters {used_end:#x}..{self.alloc_end - 1:#x} "
                f"({plural(n_trailing, 'cluster')}) at the end of the file are not "
                f"referenced: leaked{suffix}"
            )
        if repair:
            await self.truncate_trailing()

    async def truncate_trailing(self) -> None:
        """Reclaim the trailing leaks :meth:`_count_leaks` found (and a partial cluster)."""
        used_end, n_trailing = self._used_end, self._n_trailing
        if self.file_size <= used_end:
            return
        await self.ensure_need_check()
        await self.file.ftruncate(used_end)
        await self.file.fdatasync()
        if not n_trailing:
            self.note(f"file truncated to {used_end:#x} (partial trailing cluster removed)")
        self.leaks -= n_trailing
        self.leaks_fixed += n_trailing
        self.file_size = self.alloc_end = used_end
        self.n_clusters = used_end // self.cs
        self.truncatable = False

    def _last_used(self) -> int:
        """Index of the last marked cluster (cluster 0 is always marked)."""
        bits = self._bits
        end = len(bits)
        while end > 0:
            start = max(0, end - _CHUNK)
            chunk = bits[start:end]
            stripped = chunk.rstrip(b"\0")
            if stripped:
                byte_index = start + len(stripped) - 1
                return byte_index * 8 + bits[byte_index].bit_length() - 1
            end = start
        return 0

    def _describe_leaks(self, stop: int, *, repair: bool) -> None:
        """One message per run of unreferenced clusters below ``stop`` (interior leaks)."""
        bits = self._bits
        cs = self.cs
        cluster = 0
        full = b"\xff" * _CHUNK
        while cluster < stop and len(self.messages) < MAX_MESSAGES:
            byte_index = cluster >> 3
            if cluster & 7 == 0 and bits[byte_index : byte_index + _CHUNK] == full:
                cluster += _CHUNK * 8
                continue
            if cluster & 7 == 0 and bits[byte_index] == 0xFF:
                cluster += 8
                continue
            if self._test(cluster):
                cluster += 1
                continue
            run_start = cluster
            while cluster < stop and not self._test(cluster):
                if cluster & 7 == 0 and bits[cluster >> 3] == 0:
                    cluster += 8
                else:
                    cluster += 1
            cluster = min(cluster, stop)
            n_run = cluster - run_start
            self.note(
                f"clusters {run_start * cs:#x}..{cluster * cs - 1:#x} "
                f"({plural(n_run, 'cluster')}) are not referenced: leaked"
                + ("; cannot be reclaimed (not at the end of the file)" if repair else "")
            )

    async def _copy_cluster(self, offset: int, new_offset: int) -> None:
        """Copy one cluster to ``new_offset``, :data:`_COPY_CHUNK` bytes at a time."""
        for start in range(0, self.cs, _COPY_CHUNK):
            size = min(_COPY_CHUNK, self.cs - start)
            await trio.lowlevel.checkpoint()
            try:
                data = await self.file.pread(offset + start, size)
            except OSError as exc:
                raise _SourceReadError from exc
            await self._repair_write(new_offset + start, data)

    async def _repair_duplicates(self) -> None:
        """Give each extra reference its own copy of the shared cluster."""
        cs = self.cs
        dups = self._duplicates
        copies: dict[int, list[tuple[int, int, int]]] = {}  # table -> [(index, old, new)]
        copies_start = self.alloc_end
        try:
            for k in range(0, len(dups), 3):
                table_offset, l2_index, offset = dups[k], dups[k + 1], dups[k + 2]
                new_offset = self.alloc_end
                try:
                    await self._copy_cluster(offset, new_offset)
                except _SourceReadError as exc:
                    self.check_errors += 1
                    self.corruptions += 1
                    self.note(f"cannot read cluster {offset:#x} to copy it: {exc.__cause__}")
                    continue
                self.alloc_end += cs
                copies.setdefault(table_offset, []).append((l2_index, offset, new_offset))
        except BaseException:
            # No entry points at a copy yet: cut them off again (they would only be leaks)
            # so a write that failed for lack of space gives that space back.
            with trio.CancelScope(shield=True):
                try:
                    await self.file.ftruncate(copies_start)
                except OSError:
                    pass
            raise
        if not copies:
            return
        await self.file.fdatasync()
        for table_offset, changes in copies.items():
            try:
                entries = await read_table(self.file, table_offset, self.geo)
            except OSError as exc:
                self.check_errors += 1
                self.corruptions += len(changes)
                self.note(f"cannot re-read the L2 table at {table_offset:#x}: {exc}")
                continue
            l1_index = self._tables[table_offset // cs]
            pages: set[int] = set()
            for l2_index, offset, new_offset in changes:
                entries[l2_index] = new_offset
                pages.add(l2_index // PAGE_ENTRIES)
                self.corruptions_fixed += 1
                self.note(
                    f"L2 table {table_offset:#x} entry {l2_index} "
                    f"(guest offset {self._guest_pos(l1_index, l2_index):#x}): cluster "
                    f"{offset:#x} is also referenced by another L2 entry; repaired: "
                    f"copied to {new_offset:#x}"
                )
            await self._write_pages(table_offset, entries, pages)
        await self.file.fdatasync()


class _SourceReadError(Exception):
    """Reading the cluster to copy failed (the cause is the OSError)."""


def _report(first: _Pass, final: _Pass, header: fmt.Header) -> CheckReport:
    cs = header.cluster_size
    return CheckReport(
        image_size=header.image_size,
        cluster_size=cs,
        total_clusters=-(-header.image_size // cs),
        allocated_clusters=final.allocated,
        fragmented_clusters=final.fragmented,
        leaks=final.leaks,
        leaks_fixed=first.leaks_fixed,
        corruptions=final.corruptions,
        corruptions_fixed=first.corruptions_fixed,
        check_errors=final.check_errors,
        need_check=final.need_check_on_disk,
        messages=first.messages,
    )


async def check_image(
    file: BlockFile,
    *,
    repair: bool | str | None = False,
    duplicates: DuplicateMode = "copy",
    max_copy_bytes: int = DEFAULT_MAX_COPY_BYTES,
    image_name: str | None = None,
) -> CheckReport:
    """Check (and with ``repair`` set, repair) the QED image on ``file``.

    ``repair``: False/None checks only and never writes; ``True``, ``"all"`` and ``"leaks"``
    fix corruptions and reclaim trailing leaks (see the module docstring).  ``duplicates``
    says how a repair resolves a cluster referenced more than once (``"copy"`` or
    ``"unmap"``); copies may add at most ``max_copy_bytes`` and what the filesystem has
    free.  ``image_name`` only makes the advice in a refusal name the file.  Raises
    :class:`RepairLimitError` (nothing written) when the copies do not fit,
    :class:`~qedfuse.errors.FormatError` for a header that does not validate, ``OSError``
    if the header cannot be read or a repair write fails; I/O errors reading tables are
    counted in ``check_errors`` instead.
    """
    fixing = _repair_flag(repair)
    if duplicates not in DUPLICATE_MODES:
        raise QedError(f"unknown duplicates mode {duplicates!r} (expected 'copy' or 'unmap')")
    if fixing and file.read_only:
        raise ReadOnlyError("cannot repair an image opened read-only")
    header, geometry, file_size = await read_header(file)
    # Survey: a walk that never writes, so every limit is decided before the first write.
    first = _Pass(file, header, geometry, file_size, repair_wording=fixing)
    await first.run(repair=False)
    final = first
    if fixing and first.truncatable and not first.corruptions:
        # Only trailing leaks (the usual state after a crash): the survey knows the cut.
        await first.truncate_trailing()
    elif fixing and first.corruptions:
        n_copies = first.n_duplicate_refs if duplicates == "copy" else 0
        if n_copies:
            await _check_copy_budget(
                file, n_copies, geometry.cluster_size, max_copy_bytes, image_name
            )
        first = _Pass(file, header, geometry, file_size, duplicates=duplicates, max_copies=n_copies)
        await first.run(repair=True)
        final = first
    if fixing and (first.n_writes or first.leaks_fixed or first.file_size != file_size):
        # Double-check the repaired image, as qemu-img check -r does.
        header, geometry, file_size = await read_header(file)
        final = _Pass(file, header, geometry, file_size)
        await final.run(repair=False)
        remaining = [
            plural(n, noun)
            for n, noun in (
                (final.corruptions, "corruption"),
                (final.leaks, "leaked cluster"),
                (final.check_errors, "check error"),
            )
            if n
        ]
        if remaining:
            first.messages.append(f"after repair, still found: {' and '.join(remaining)}")
    if fixing and final.need_check_on_disk and final.corruptions == 0 and final.check_errors == 0:
        await file.fdatasync()
        clean = final.header.replace(features=final.header.features & ~fmt.Feature.NEED_CHECK)
        await write_header(file, clean)
        final.need_check_on_disk = False
        final.header = clean
    return _report(first, final, final.header)


async def available_bytes(file: BlockFile) -> int | None:
    """Bytes the image file may still grow by: ``fstatvfs``'s available space for a regular
    file, 0 for anything else (a block device cannot grow), None when unknown (no fd)."""
    fileno = getattr(file, "fileno", None)
    if fileno is None:
        return None
    fd = fileno()

    def probe() -> int:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return 0
        st = os.fstatvfs(fd)
        return st.f_bavail * st.f_frsize

    return await trio.to_thread.run_sync(probe)  # statvfs may block (network filesystems)


def _file_name(file: BlockFile) -> str | None:
    """The path the image file was opened by, for advice in messages (Linux /proc)."""
    fileno = getattr(file, "fileno", None)
    if fileno is None:
        return None
    try:
        name = os.readlink(f"/proc/self/fd/{fileno()}")
    except OSError:
        return None
    return name if name.startswith("/") and not name.endswith(" (deleted)") else None


async def _check_copy_budget(
    file: BlockFile, n_copies: int, cluster_size: int, max_copy_bytes: int, name: str | None
) -> None:
    """Raise :class:`RepairLimitError` unless ``n_copies`` cluster copies may be written."""
    need = n_copies * cluster_size
    reasons: list[str] = []
    if n_copies > MAX_DUPLICATE_REPAIRS:
        reasons.append(f"more than the {MAX_DUPLICATE_REPAIRS} references one repair copies")
    if need > max_copy_bytes:
        reasons.append(f"more than the copy limit of {_human(max_copy_bytes)}")
    avail = await available_bytes(file)
    if avail is not None and need + FREE_SPACE_RESERVE > avail:
        reasons.append(
            f"more than the {_human(avail)} available on its filesystem"
            + (f" less a {_human(FREE_SPACE_RESERVE)} reserve" if avail else "")
        )
    if not reasons:
        return
    image = shlex.quote(name or _file_name(file) or "IMAGE")
    raise RepairLimitError(
        f"repair refused, nothing was changed: copying "
        f"{plural(n_copies, 'duplicated cluster reference')} needs {_human(need)} "
        f"({need} bytes), {' and '.join(reasons)}; run `qedfuse check -r all "
        f"--duplicates=unmap {image}` to unmap those references instead (they then read as "
        f"unallocated), or free space or raise the limit with `qedfuse check -r all "
        f"--max-copy=SIZE {image}`"
    )


__all__ = [
    "DEFAULT_MAX_COPY_BYTES",
    "DUPLICATE_MODES",
    "FREE_SPACE_RESERVE",
    "MAX_CLUSTERS",
    "MAX_DUPLICATE_REPAIRS",
    "CheckReport",
    "DuplicateMode",
    "RepairLimitError",
    "available_bytes",
    "check_image",
]
