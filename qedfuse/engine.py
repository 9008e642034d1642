"""The async cluster-mapping engine: :class:`QedImage`.

Reads and writes guest byte ranges of a QED image through an in-memory L1 table and a
bounded cache of L2 tables.  All file access goes through a :class:`~qedfuse.imagefile.BlockFile`.
What is not the I/O paths lives apart: the held map (L1, cached L2 tables, trust in what was
read, lookup of a guest range) is :mod:`qedfuse.clustermap`'s, with the L1 table in
:mod:`qedfuse.l1table` and the L2 tables, their cache and validation in :mod:`qedfuse.l2cache`;
the header and table I/O is :mod:`qedfuse.tables`', the per-cluster write plan
:mod:`qedfuse.writeplan`'s, the allocator :mod:`qedfuse.allocator`'s, the check that nobody
else changed the file :mod:`qedfuse.foreign`'s, the figures :mod:`qedfuse.enginestats`'.
Over 600 lines because the read, write, flush, resize, close and failsafe paths share one
allocation lock and one state (NEED_CHECK on disk, dirty metadata, synced data), and
splitting them would spread that invariant over several files.

Durability protocol (the project's design, stricter than QEMU's write-through order)
------------------------------------------------------------------------------------
* Metadata is cached.  An allocating write appends data clusters at the allocator's end of
  file, writes the data (with the copy-on-write fill), then changes the cached L2 entry (and,
  for a new L2 table, the cached L1 entry).  A new L2 table takes its space at once (its
  zeros are written when it is created), so a flush only overwrites: a full disk refuses the
  guest write that needs space (ENOSPC, its allocation rolled back), never a later flush.
* Before the first allocation or metadata change after a clean state, NEED_CHECK is set in
  the header and made durable (64-byte struct write + ``fdatasync``).  Bytes after the
  struct are never rewritten, so unknown extra header data survives.
* :meth:`QedImage.flush` is the ordered flush:
    1. ``fdatasync`` (all data, including clusters appended by allocating writes);
    2. write every dirty L2 table (whole if new, else its dirty 4 KiB pages), ``fdatasync``;
    3. write the dirty 4 KiB pages of L1, ``fdatasync``;
    4. clear NEED_CHECK in the header, ``fdatasync``.
* Metadata therefore never reaches the disk before the data it points to, and a clear
  NEED_CHECK on disk means every metadata change has been flushed.

Crash states
~~~~~~~~~~~~
===========================  ======================================================
crash …                      leaves on disk; what the next read-write open does
===========================  ======================================================
before NEED_CHECK is durable  clean image; nothing appended yet
before step 2 completes       NEED_CHECK set; L2 writes may be partial → check zeroes
                              invalid entries; new data is unreferenced (leaks)
before step 3 completes       NEED_CHECK set; new L2 tables unreferenced (leaks)
before step 4 completes       NEED_CHECK set, metadata complete → check finds leaks only
after step 4                  clean image
===========================  ======================================================

Concurrency
~~~~~~~~~~~
One ``trio.Lock`` (the allocation lock) serialises every metadata change: allocating
writes (re-looking-up their range once they hold it, so two writers of the same unallocated
cluster never both allocate), the flush (which therefore never writes an L2/L1 state whose
data its step 1 did not cover), resize, and the NEED_CHECK transition.  Reads and in-place
writes to allocated clusters take no lock.  L2 loads are de-duplicated per table offset, and a
table is updated only with no checkpoint between fetching it from the cache and changing it,
so an evicted clean copy can never swallow an update.  A dirty table is never evicted; when
dirty tables exceed the cache budget, the next allocating write runs a flush.

Safety
~~~~~~
Every L1 entry is validated at open and every L2 table when it is first loaded: an entry that
is misaligned, inside the header, at or past the end of the file *as it was at open*, pointing
into the header, L1 or any L2 table, or at a host cluster another entry already maps (a bitmap
over the open-time file's clusters) is *bad*; guest I/O touching it fails with
:class:`CorruptionError` (EIO) and is never written through.  What lies past the open-time end
is ours, so growth never makes a hostile entry valid.  A failed flush puts the engine in
failsafe: the cached metadata is dropped and L1 re-read from disk (entries we did not write
are bad), NEED_CHECK stays set, and further writes fail with EIO; a flush refused for lack of
space on a metadata overwrite keeps everything and is retried.  Every flush first checks
that the file is still what we wrote (size, header, the L1 pages in use, its name): if not,
it fails with EIO and nothing more is written to the file.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import time
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import trio
import trio.testing

from qedfuse import format as fmt
from qedfuse.allocator import Allocator
from qedfuse.clustermap import ClusterMap, Extent, Kind
from qedfuse.enginestats import EngineStatistics, EngineStats
from qedfuse.errors import (
    FailsafeError,
    OutOfRangeError,
    QedError,
    ReadOnlyError,
)
from qedfuse.foreign import foreign_change
from qedfuse.l2cache import L2Table
from qedfuse.tables import (
    page_runs,
    read_header,
    read_table,
    read_table_bytes,
    write_header,
)
from qedfuse.writeplan import WriteKind, plan_write

if TYPE_CHECKING:
    from qedfuse.imagefile import BlockFile, Buffer
    from qedfuse.l2cache import L2Cache

log = logging.getLogger(__name__)

DEFAULT_CACHE_SIZE = 8 * 1024 * 1024
#: Largest chunk write_zeroes hands to the write path at once.
ZERO_CHUNK_SIZE = 4 * 1024 * 1024
_ZERO_CHUNK = bytes(ZERO_CHUNK_SIZE)
#: errnos of a refused write that changed nothing and may succeed once space is freed.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class GuestSource(Protocol):
    """Anything that can serve guest reads: a backing image (raw or QED)."""

    @property
    def image_size(self) -> int: ...

    async def read_padded(self, pos: int, size: int) -> bytes:
        """Read ``size`` bytes at ``pos``; bytes past the end of the image read as zeros."""
        ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class OpenOptions:
    """Engine tunables."""

    cache_size: int = DEFAULT_CACHE_SIZE
    detect_zeroes: bool = True
    #: Run check-and-repair on a read-write open of an image with NEED_CHECK set
    #: (:func:`qedfuse.opening.open_image`; the engine itself never repairs).
    repair_on_open: bool = True


class QedImage:
    """An open QED image; use as an async context manager.

    Opened by :func:`qedfuse.opening.open_image` (repairs a dirty image first) or built by
    :func:`load_image` (as it is).
    """

    def __init__(
        self,
        file: BlockFile,
        header: fmt.Header,
        geometry: fmt.Geometry,
        l1: array[int],
        file_size: int,
        *,
        read_only: bool,
        backing: GuestSource | None,
        options: OpenOptions,
    ) -> None:
        self.file = file
        self.header = header
        self.geometry = geometry
        self.read_only = read_only
        self.backing = backing
        self.options = options
        self.stats = EngineStats()
        self.failsafe_reason: str | None = None
        self._alloc_lock = trio.Lock()
        self._data_gen = 0  # bumped once each data pwrite has completed (or failed)
        self._synced_gen = 0  # value of _data_gen covered by the last completed data sync
        self._need_check_on_disk = header.need_check
        # Opened with NEED_CHECK still set (repair disabled, or corruption the repair left):
        # the image was never found consistent, so no flush may clear the bit
        # (docs/qemu-differences.md#bug-j).
        self._unchecked = header.need_check
        self._metadata_dirty = trio.Event()
        self._last_write_time = 0.0
        self._zero_cluster = bytes(geometry.cluster_size)
        self._closed = False
        # Set once the file is found changed by someone else: nothing is written to it again.
        self._foreign = False
        self._packed_header = (header, header.pack())
        self._sync_failed = False  # an fdatasync failed during the current flush
        self._refused_write = False  # a metadata pwrite was refused for lack of space
        # What lies past the open-time end is ours: it never makes a hostile entry valid.
        self._alloc = Allocator(geometry, file_size)
        self._map = ClusterMap(
            file,
            geometry,
            l1,
            header.l1_table_offset,
            self._alloc.end,
            cache_size=options.cache_size,
            read_only=read_only,
            on_bad=self.enter_failsafe,
        )
        self._cache = self._map.cache
        self._l1 = self._map.l1
        if self._l1.bad and not read_only:
            # The file must not grow over what a bad entry points at, or a later open would
            # read guest data as a table: refuse writes until a repair (decision: failsafe).
            self.enter_failsafe(f"{len(self._l1.bad)} invalid L1 entries")

    # ------------------------------------------------------------------ properties

    @property
    def image_size(self) -> int:
        return self.header.image_size

    @property
    def cluster_size(self) -> int:
        return self.geometry.cluster_size

    @property
    def failsafe(self) -> bool:
        return self.failsafe_reason is not None

    @property
    def allocator_end(self) -> int:
        """File offset where the next cluster will be allocated."""
        return self._alloc.end

    @property
    def has_dirty_metadata(self) -> bool:
        return self._l1.dirty_pages != set() or self._cache.n_dirty > 0

    @property
    def cache(self) -> L2Cache:
        return self._cache

    async def extents(self, pos: int = 0, size: int | None = None) -> list[Extent]:
        """The mapping of ``[pos, pos+size)`` as merged runs (for map, convert, commit)."""
        end = self.image_size if size is None else min(self.image_size, pos + size)
        return await self._map.extents(pos, end)

    # ------------------------------------------------------------------ reads

    def _check_readable(self) -> None:
        if self._closed:
            raise QedError("image is closed")

    async def read(self, pos: int, size: int) -> bytes:
        """Read guest bytes; the result is short only at the end of the image."""
        self._check_readable()
        if pos < 0 or size < 0:
            raise OutOfRangeError(f"invalid read range {pos}+{size}")
        size = max(0, min(size, self.image_size - pos))
        if size == 0:
            return b""
        parts: list[bytes] = []
        while size:
            ext = await self._map.lookup(pos, size)
            if ext.kind is Kind.DATA:
                assert ext.host_offset is not None
                parts.append(await self.file.pread(ext.host_offset, ext.length))
            elif ext.kind is Kind.UNALLOCATED and self.backing is not None:
                parts.append(await self.backing.read_padded(pos, ext.length))
            else:
                parts.append(bytes(ext.length))
            pos += ext.length
            size -= ext.length
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def read_padded(self, pos: int, size: int) -> bytes:
        """Read as a backing image: zeros past the end of the image."""
        data = await self.read(pos, size) if pos < self.image_size else b""
        return data + bytes(size - len(data)) if len(data) < size else data

    # ------------------------------------------------------------------ writes

    def _check_writable(self) -> None:
        self._check_readable()
        if self.read_only:
            raise ReadOnlyError("image is open read-only")
        if self.failsafe_reason is not None:
            raise FailsafeError(f"image is in failsafe mode: {self.failsafe_reason}")

    async def write(self, pos: int, data: Buffer, *, detect_zeroes: bool | None = None) -> None:
        """Write guest bytes.  The whole range must lie inside the image."""
        self._check_writable()
        size = len(data)
        if pos < 0 or pos + size > self.image_size:
            raise OutOfRangeError(
                f"write of {size} bytes at {pos} is past the end of the image ({self.image_size})"
            )
        await self._write_unchecked(pos, data, detect_zeroes)

    async def _write_unchecked(self, pos: int, data: Buffer, detect_zeroes: bool | None) -> None:
        detect = self.options.detect_zeroes if detect_zeroes is None else detect_zeroes
        view = memoryview(data).cast("B")
        if not self._map.surveyed:
            await self._map.survey()
            if self.failsafe_reason is not None:
                # The survey found corruption: the next read-write open must repair it.
                async with self._alloc_lock:
                    with contextlib.suppress(OSError):
                        await self._mark_need_check()
                raise FailsafeError(f"image is in failsafe mode: {self.failsafe_reason}")
        if await self.file.size() < self._alloc.written_end:
            # Cut by someone else: a write could re-extend it and hide the loss (finding 7).
            self._foreign = True
            self.enter_failsafe("the image file was changed by someone else: it shrank")
            raise FailsafeError(f"image is in failsafe mode: {self.failsafe_reason}")
        self._last_write_time = trio.current_time()
        while view:
            ext = await self._map.lookup(pos, len(view))
            if ext.kind is Kind.DATA:
                assert ext.host_offset is not None
                await self._write_data(ext.host_offset, view[: ext.length])
                done = ext.length
            else:
                done = await self._allocating_write(pos, view, detect)
            pos += done
            view = view[done:]
        if self._cache.over_budget:
            await self.flush()

    async def write_zeroes(self, pos: int, size: int) -> None:
        """Zero a guest range, using zero clusters / no allocation where possible."""
        self._check_writable()
        end = pos + size
        # Refuse up front, as write() does: a range running past the end zeroes nothing.
        if pos < 0 or size < 0 or end > self.image_size:
            raise OutOfRangeError(
                f"write of {size} bytes at {pos} is past the end of the image ({self.image_size})"
            )
        while pos < end:
            n = min(end - pos, ZERO_CHUNK_SIZE)
            await self.write(pos, memoryview(_ZERO_CHUNK)[:n], detect_zeroes=True)
            pos += n

    async def _allocating_write(self, pos: int, view: memoryview, detect: bool) -> int:
        """Write the run at ``pos`` that needs allocation; return bytes consumed."""
        async with self._alloc_lock:
            self._check_writable()
            ext = await self._map.lookup(pos, len(view))
            if ext.kind is Kind.DATA:  # allocated while we waited for the lock
                assert ext.host_offset is not None
                await self._write_data(ext.host_offset, view[: ext.length])
                return ext.length
            chunk = view[: ext.length]
            # Old contents read as zeros unless they come from a backing image.
            reads_zero = ext.kind is Kind.ZERO or self.backing is None
            plan = plan_write(
                pos,
                chunk,
                self.geometry.cluster_size,
                detect_zeroes=detect,
                reads_zero=reads_zero,
                zeros=self._zero_cluster,
            )
            for kind, run_start, n_clusters in plan:
                if kind is WriteKind.ALLOCATE:
                    await self._allocate_and_write(pos, chunk, run_start, n_clusters, ext.kind)
                elif kind is WriteKind.ZERO_CLUSTER:
                    await self._set_entries(run_start, n_clusters, None)
                    self.stats.zero_clusters_written += n_clusters
                else:
                    self.stats.zero_writes_skipped += n_clusters
            return ext.length

    async def _allocate_and_write(
        self, pos: int, chunk: memoryview, run_start: int, n_clusters: int, old_kind: Kind
    ) -> None:
        """Allocate ``n_clusters`` for guest clusters from ``run_start``, fill and write them."""
        geo = self.geometry
        cs = geo.cluster_size
        run_end = run_start + n_clusters * cs
        lo = max(pos, run_start)
        hi = min(pos + len(chunk), run_end)
        buf: bytearray | memoryview
        if lo == run_start and hi == run_end:
            buf = chunk[lo - pos : hi - pos]  # whole clusters: no bounce buffer, no copy
        else:
            buf = bytearray(n_clusters * cs)
            if lo > run_start:
                buf[: lo - run_start] = await self._fill(run_start, lo - run_start, old_kind)
            buf[lo - run_start : hi - run_start] = chunk[lo - pos : hi - pos]
            if hi < run_end:
                buf[hi - run_start :] = await self._fill(hi, run_end - hi, old_kind)
        # Before the file grows: a clear NEED_CHECK on disk then also means "no leaks".
        await self._mark_need_check()
        host = self._alloc.allocate(n_clusters)
        try:
            await self._write_data(host, buf)
            self._alloc.wrote(host + n_clusters * cs)
            await self._set_entries(run_start, n_clusters, host)
        except BaseException:
            # Nothing points at these clusters yet (_set_entries changes state only once it
            # cannot fail): give them back, so a refused write (ENOSPC) leaves no trace.
            await self._alloc.release_tail(self.file, host)
            raise
        self.stats.allocated_clusters += n_clusters

    async def _fill(self, pos: int, size: int, old_kind: Kind) -> bytes:
        """Copy-on-write fill: backing data under unallocated clusters, else zeros.

        Zeros under a zero cluster, unlike QEMU: docs/qemu-differences.md#bug-e."""
        if old_kind is Kind.UNALLOCATED and self.backing is not None:
            return await self.backing.read_padded(pos, size)
        return bytes(size)

    async def _write_data(self, offset: int, data: Buffer) -> None:
        """Guest data into the image; the next flush's first step makes it durable.

        The write is counted once it has completed (or failed, maybe half done): a flush
        whose sync starts while this pwrite is still running must not count it as synced.
        """
        try:
            await self.file.pwrite(offset, data)
        finally:
            self._data_gen += 1

    async def _write_header(self, header: fmt.Header) -> None:
        """Write the 64-byte struct (never the bytes after it) and sync it.  The engine adopts
        the header once the write is issued: from then on the file may hold it, even if the
        sync fails, and a later header write must not undo it."""
        try:
            await write_header(self.file, header, sync=False)
        except OSError as exc:
            if exc.errno in NO_SPACE_ERRNOS:
                self._refused_write = True  # as _meta_pwrite does
            raise
        self.header = header
        await self._datasync()

    async def _set_entries(self, run_start: int, n_clusters: int, host: int | None) -> None:
        """Point guest clusters at ``host, host+cs, …`` (or zero clusters when ``host`` is None).

        Caller holds the allocation lock; the clusters lie in one L2 table.
        """
        await self._mark_need_check()
        geo = self.geometry
        l1_index = geo.l1_index(run_start)
        table = await self._map.l2_for(run_start)
        if table is None:
            # The table's space is taken now, by writing its (empty) bytes: the flush then
            # only overwrites, so it never needs new space, and a full disk refuses this
            # write (ENOSPC) instead of a later flush losing the cached state.
            offset = self._alloc.allocate(geo.table_size)
            try:
                await self.file.pwrite(offset, bytes(geo.table_bytes))
            except BaseException:
                await self._alloc.release_tail(self.file, offset)
                raise
            self._alloc.wrote(offset + geo.table_bytes)
            with trio.testing.assert_no_checkpoints():
                # Its zeros are on the file: the flush writes only the pages that change.
                table = L2Table(offset, array("Q", bytes(geo.table_bytes)), set(), is_new=False)
                self._map.add_table(l1_index, table)
                self.stats.new_l2_tables += 1
        # No checkpoint from here on: the table object is the cached one until we return.
        with trio.testing.assert_no_checkpoints():
            first = geo.l2_index(run_start)
            for k in range(n_clusters):
                value = fmt.ZERO_CLUSTER if host is None else host + k * geo.cluster_size
                table.set_entry(first + k, value)
            self._metadata_dirty.set()

    async def _mark_need_check(self) -> None:
        """Make NEED_CHECK durable before the first metadata change after a clean state."""
        if self._need_check_on_disk:
            return
        self._sync_failed = False
        try:
            await self._write_header(
                self.header.replace(features=self.header.features | fmt.Feature.NEED_CHECK)
            )
        except OSError as exc:
            if self._sync_failed:
                # Data written in place since the last flush may be gone with the failed
                # sync, and a retry could return 0 without it (see :meth:`_datasync`).
                await self._enter_failsafe(f"sync failed: {exc}")
            raise
        self._need_check_on_disk = True
        self.stats.need_check_sets += 1

    # ------------------------------------------------------------------ flush

    async def flush(self) -> None:
        """The ordered flush: data → L2 → L1 → header (NEED_CHECK cleared), each synced."""
        self._check_readable()
        if self.read_only:
            return
        async with self._alloc_lock:
            if self.failsafe_reason is not None:
                raise FailsafeError(f"image is in failsafe mode: {self.failsafe_reason}")
            # Once started, a flush runs to completion even if its caller is cancelled.
            with trio.CancelScope(shield=True):
                # Under the lock these are exactly what _flush_locked writes.
                n_tables, n_pages = self._cache.n_dirty, len(self._l1.dirty_pages)
                started = time.monotonic()
                self._sync_failed = self._refused_write = False
                try:
                    await self._verify_file("before the flush")
                    await self._flush_locked()
                except OSError as exc:
                    self.stats.flush_failures += 1
                    if self._refused_write and not self._sync_failed:
                        # A refused metadata pwrite: the flush only overwrites space taken
                        # earlier, so this is a filesystem that wants space even for that.
                        # Whatever reached the file is valid (its data was synced first) and
                        # the cache still holds it all: keep it, and let a later flush retry.
                        log.warning("flush refused for lack of space: %s (will retry)", exc)
                        raise
                    await self._enter_failsafe(f"flush failed: {exc}")
                    raise
                except FailsafeError:
                    raise
                except Exception as exc:
                    self.stats.flush_failures += 1
                    await self._enter_failsafe(f"flush failed: {exc}")
                    raise
                await self._verify_file("after the flush", full=False)
                self._count_flush(time.monotonic() - started, n_tables, n_pages)

    def _count_flush(self, seconds: float, n_tables: int, n_pages: int) -> None:
        stats = self.stats
        stats.last_flush_seconds = seconds
        stats.max_flush_seconds = max(stats.max_flush_seconds, seconds)
        stats.l2_tables_flushed += n_tables
        stats.l1_pages_flushed += n_pages

    def _header_bytes(self) -> bytes:
        """The packed header we last wrote (packing costs ~20 µs: cached per header)."""
        if self._packed_header[0] is not self.header:
            self._packed_header = (self.header, self.header.pack())
        return self._packed_header[1]

    async def _verify_file(self, when: str, *, full: bool = True) -> None:
        """Fail (EIO, failsafe) if the file is no longer what this engine wrote
        (:func:`~qedfuse.foreign.foreign_change`; ``full`` adds the L1 pages and the name)."""
        if self._foreign:
            raise FailsafeError(f"image is in failsafe mode: {self.failsafe_reason}")
        problem = await foreign_change(
            self.file,
            written_end=self._alloc.written_end,
            header=self._header_bytes(),
            l1=self._l1,
            l1_offset=self.header.l1_table_offset,
            full=full,
        )
        if problem is None:
            return
        self._foreign = True
        reason = f"the image file was changed by someone else ({when}): {problem}"
        await self._enter_failsafe(reason)
        raise FailsafeError(f"image is in failsafe mode: {reason}")

    async def _flush_locked(self) -> None:
        dirty_tables = self._cache.dirty_tables()
        dirty_l1 = sorted(self._l1.dirty_pages)
        if self._data_gen != self._synced_gen or dirty_tables or dirty_l1:
            gen = self._data_gen
            await self._datasync()
            self._synced_gen = gen
        if dirty_tables:
            for table in dirty_tables:
                await self._write_table(
                    table.offset, table.entries, None if table.is_new else table.dirty_pages
                )
            await self._datasync()
            for table in dirty_tables:
                table.is_new = False
                table.dirty_pages.clear()
        if dirty_l1:
            await self._write_l1(set(dirty_l1))
            await self._datasync()
            self._l1.dirty_pages.clear()
        if self._need_check_on_disk and not self._unchecked:
            await self._write_header(
                self.header.replace(features=self.header.features & ~fmt.Feature.NEED_CHECK)
            )
            self._need_check_on_disk = False
        if self._metadata_dirty.is_set():
            # Only a set event is replaced: a waiter on an unset one must keep it.
            self._metadata_dirty = trio.Event()
        self.stats.flushes += 1

    async def _datasync(self) -> None:
        """``fdatasync``, remembering a failure: after one, Linux may have dropped the data
        and its error state (a retry can return 0), so the caller must go failsafe."""
        try:
            await self.file.fdatasync()
        except BaseException:
            self._sync_failed = True
            raise

    async def _meta_pwrite(self, offset: int, data: Buffer) -> None:
        """pwrite of metadata, remembering a refusal for lack of space (see :meth:`flush`)."""
        try:
            await self.file.pwrite(offset, data)
        except OSError as exc:
            if exc.errno in NO_SPACE_ERRNOS:
                self._refused_write = True
            raise

    async def _write_table(self, offset: int, entries: array[int], pages: set[int] | None) -> None:
        """Write a whole L2 table, or only its dirty pages (merged into runs)."""
        if pages is None:
            await self._meta_pwrite(offset, fmt.encode_table(entries))
            return
        for start, stop in page_runs(pages, len(entries)):
            await self._meta_pwrite(offset + start * 8, fmt.encode_table(entries, start, stop))

    async def _write_l1(self, pages: set[int]) -> None:
        """Write L1's dirty ``pages``; a run whose write failed is unknown until written again."""
        l1 = self._l1
        for run in l1.page_writes(pages):
            l1.writing(run)
            await self._meta_pwrite(self.header.l1_table_offset + run.start * 8, run.data)
            l1.written(run)

    async def _enter_failsafe(self, reason: str) -> None:
        """Stop writing; drop cached metadata and show what is on disk."""
        if self.failsafe_reason is None:
            log.error("entering failsafe mode: %s (NEED_CHECK stays set on disk)", reason)
            self.failsafe_reason = reason
        self._cache.clear()
        try:
            raw = await read_table_bytes(self.file, self.header.l1_table_offset, self.geometry)
            self._l1.reinstall(raw)
        except OSError as exc:
            log.error("could not re-read L1 after failure: %s; every range now fails", exc)
            self._l1.all_bad()

    def enter_failsafe(self, reason: str) -> None:
        """Refuse further writes (used by the FUSE layer on unexpected errors)."""
        if self.failsafe_reason is None:
            log.error("entering failsafe mode: %s", reason)
            self.failsafe_reason = reason

    # ------------------------------------------------------------------ background flush

    async def run_idle_flusher(
        self, delay: float = 5.0, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Flush (and so clear NEED_CHECK) once allocating writes have been quiet for ``delay``."""
        task_status.started()
        while True:
            await self._metadata_dirty.wait()
            # A debounce: every write pushes the deadline back.
            while (remaining := self._last_write_time + delay - trio.current_time()) > 0:  # noqa: ASYNC110
                await trio.sleep(remaining)
            if self.failsafe or self._closed:
                return
            try:
                await self.flush()
            except (QedError, OSError) as exc:
                if self.failsafe_reason is not None:
                    log.error("background flush failed: %s", exc)
                    return
                # Refused for lack of space, nothing lost: try again later.
                await trio.sleep(delay)

    # ------------------------------------------------------------------ resize

    async def resize(self, new_size: int) -> None:
        """Grow the guest size.  The new area reads as zeros, even over a larger backing image."""
        self._check_writable()
        old_size = self.image_size
        if new_size < old_size:
            raise OutOfRangeError("Shrinking images is not supported")
        if new_size % fmt.SECTOR_SIZE or new_size > self.geometry.max_image_size:
            raise OutOfRangeError(
                f"Invalid image size specified: must be a multiple of 512 and at most "
                f"{self.geometry.max_image_size}"
            )
        if new_size == old_size:
            return
        geo = self.geometry
        cs = geo.cluster_size
        # The tail of the last cluster past the old size may hold backing or stale bytes.
        tail_end = min(new_size, -(-old_size // cs) * cs)
        if tail_end > old_size:
            await self._write_unchecked(old_size, bytes(tail_end - old_size), True)
        if self.backing is not None and self.backing.image_size > tail_end:
            # Hide backing data in the new area behind zero clusters.
            hide_end = min(new_size, -(-self.backing.image_size // cs) * cs)
            pos = tail_end
            async with self._alloc_lock:
                while pos < hide_end:
                    ext = await self._map.lookup(pos, hide_end - pos)
                    n = geo.clusters_for(ext.length)
                    if ext.kind is Kind.UNALLOCATED:
                        await self._set_entries(pos, n, None)
                    pos += n * cs
        # The new size becomes visible only once the metadata hiding the backing is durable.
        await self.flush()
        async with self._alloc_lock:
            await self._write_header(self.header.replace(image_size=new_size))

    # ------------------------------------------------------------------ close

    async def close(self) -> None:
        """Flush (leaving NEED_CHECK clear) and close the file and backing chain."""
        if self._closed:
            return
        try:
            if not self.read_only and self.failsafe_reason is None:
                try:
                    await self.flush()
                except Exception as exc:
                    # The cached metadata goes with this object: what was not flushed is lost.
                    # (A Ctrl-C or cancellation is the caller's decision, not a failure to log:
                    # NEED_CHECK on disk still says the image needs its check.)
                    self.enter_failsafe(f"close failed: {exc!r}")
                    raise
            elif not self.read_only and not self._foreign:
                await self._leave_need_check_set()
        finally:
            self._closed = True
            self._map.close()
            try:
                await self.file.aclose()
            finally:
                if self.backing is not None:
                    await self.backing.aclose()

    async def _leave_need_check_set(self) -> None:
        """Failsafe close: make sure NEED_CHECK is on disk so the next read-write open repairs."""
        with trio.CancelScope(shield=True):
            await self._write_header(
                self.header.replace(features=self.header.features | fmt.Feature.NEED_CHECK)
            )

    async def aclose(self) -> None:
        await self.close()

    async def __aenter__(self) -> QedImage:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ info

    async def allocated_bytes(self) -> int:
        """Bytes of guest data allocated in this image (data clusters only)."""
        return await self._map.allocated_clusters() * self.geometry.cluster_size

    def statistics(self) -> EngineStatistics:
        """The engine's figures now: no I/O, a few attribute reads and one pass over L1."""
        geo = self.geometry
        stats = self.stats
        n_l2 = self._l1.n_tables()
        meta = geo.header_end_offset + geo.table_bytes * (1 + n_l2)
        return EngineStatistics(
            image_size_bytes=self.image_size,
            cluster_size_bytes=geo.cluster_size,
            read_only=self.read_only,
            allocator_end_bytes=self._alloc.end,
            data_clusters=max(0, self._alloc.end - meta) // geo.cluster_size,
            l2_tables=n_l2,
            clusters_allocated=stats.allocated_clusters,
            new_l2_tables=stats.new_l2_tables,
            zero_clusters_written=stats.zero_clusters_written,
            zero_writes_skipped=stats.zero_writes_skipped,
            flushes=stats.flushes,
            flush_failures=stats.flush_failures,
            last_flush_seconds=stats.last_flush_seconds,
            max_flush_seconds=stats.max_flush_seconds,
            l2_tables_flushed=stats.l2_tables_flushed,
            l1_pages_flushed=stats.l1_pages_flushed,
            dirty_l2_tables=self._cache.n_dirty,
            dirty_l1_pages=len(self._l1.dirty_pages),
            need_check_on_disk=self._need_check_on_disk,
            need_check_sets=stats.need_check_sets,
            failsafe_reason=self.failsafe_reason,
        )


async def load_image(
    file: BlockFile,
    *,
    read_only: bool | None = None,
    backing: GuestSource | None = None,
    options: OpenOptions | None = None,
) -> QedImage:
    """Build the engine on the QED image in ``file`` as it is: no check, no repair.

    A read-write open clears unknown autoclear feature bits (as QEMU does); a read-only open
    never writes.  Opening a path, its chain, and repair-on-open when NEED_CHECK is set are
    :mod:`qedfuse.opening`'s (:func:`qedfuse.opening.open_image`).
    """
    options = options or OpenOptions()
    if read_only is None:
        read_only = file.read_only
    header, geometry, file_size = await read_header(file)
    if not read_only and header.autoclear_features:
        header = header.replace(autoclear_features=0)
        await write_header(file, header)
    l1 = await read_table(file, header.l1_table_offset, geometry)
    return QedImage(
        file,
        header,
        geometry,
        l1,
        file_size,
        read_only=read_only,
        backing=backing,
        options=options,
    )


__all__ = [
    "Extent",
    "GuestSource",
    "Kind",
    "OpenOptions",
    "QedImage",
    "load_image",
]
