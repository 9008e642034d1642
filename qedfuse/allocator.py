"""The engine's host-cluster allocator: clusters are appended at the end of the file.

QED cannot reuse space, so allocation is a cursor: :attr:`Allocator.end`, the file's length
in whole clusters at open, moved on by each allocation.  An allocation nothing references
yet can be given back (:meth:`Allocator.release_tail`), cutting what its failed write left,
so a refused write (ENOSPC) leaves no leak.  :attr:`Allocator.written_end` follows what our
completed pwrites made exist: a file shorter than that was cut by someone else.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from qedfuse import format as fmt
    from qedfuse.imagefile import BlockFile

# The engine's records: its log lines keep the engine's name.
log = logging.getLogger("qedfuse.engine")


class Allocator:
    """Where the next cluster goes, and the end of what our writes made exist."""

    __slots__ = ("cluster_size", "end", "written_end")

    def __init__(self, geometry: fmt.Geometry, file_size: int) -> None:
        self.cluster_size = geometry.cluster_size
        self.end = geometry.round_down(file_size)
        self.written_end = self.end  # end of what our completed pwrites made exist

    def allocate(self, n_clusters: int) -> int:
        """Take ``n_clusters`` at the end; return the file offset of the first."""
        offset = self.end
        self.end += n_clusters * self.cluster_size
        return offset

    def wrote(self, end: int) -> None:
        """A pwrite ending at ``end`` completed."""
        self.written_end = max(self.written_end, end)

    async def release_tail(self, file: BlockFile, offset: int) -> None:
        """Undo the allocations from ``offset`` on (caller holds the allocation lock, and
        nothing references them); cut what a failed write left there, so no leak remains."""
        self.end = offset
        self.written_end = min(self.written_end, offset)
        with trio.CancelScope(shield=True):
            try:
                if await file.size() > offset:
                    await file.ftruncate(offset)
            except OSError as exc:  # harmless: the next allocation overwrites the tail
                log.debug("could not cut the tail of a failed allocation: %s", exc)


__all__ = ["Allocator"]
