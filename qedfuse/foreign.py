"""Is the image file still what this engine wrote?  (issue 11, finding 7)

Someone else may cut the file, overwrite its header or L1 table, or delete or replace it
while it is open; writing on after that would hide the loss or mix our metadata with theirs.
:func:`foreign_change` compares the file with what the engine last wrote and says what
changed; the engine's reaction (failsafe, nothing more written) is its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qedfuse import format as fmt
from qedfuse.tables import PAGE_SIZE

if TYPE_CHECKING:
    from qedfuse.imagefile import BlockFile
    from qedfuse.l1table import L1Table


async def foreign_change(
    file: BlockFile,
    *,
    written_end: int,
    header: bytes,
    l1: L1Table,
    l1_offset: int,
    full: bool = True,
) -> str | None:
    """What someone else changed in ``file``, or None.

    Cheap checks: the size (fstat) against ``written_end`` and the header struct (one pread)
    against ``header``; ``full`` adds the L1 pages that map something (compared with what we
    wrote, :meth:`~qedfuse.l1table.L1Table.pages_to_verify`) and whether the file is still
    reachable by its name.
    """
    size = await file.size()
    if size < written_end:
        return f"the file shrank to {size} bytes (it held {written_end})"
    if await file.pread(0, fmt.HEADER_STRUCT_SIZE) != header:
        return "its header was overwritten"
    if not full:
        return None
    for page in l1.pages_to_verify():
        k = page * PAGE_SIZE
        expect = l1.disk[k : k + PAGE_SIZE]
        if await file.pread(l1_offset + k, len(expect)) != expect:
            return "its L1 table was overwritten"
    still_named = getattr(file, "still_named", None)
    if still_named is not None and not await still_named():
        return "it was deleted, renamed away or replaced"
    return None


__all__ = ["foreign_change"]
