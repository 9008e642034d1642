"""The table layout on the file: header, L1 and L2 tables read and written through a BlockFile.

The layer under both :mod:`qedfuse.engine` and :mod:`qedfuse.check` (QEMU keeps
``qed-table.c`` under ``qed.c`` and ``qed-check.c`` the same way): neither imports the other
for these.  Everything here goes through the :class:`~qedfuse.imagefile.BlockFile` protocol;
the codecs and validation rules are :mod:`qedfuse.format`'s.

* :func:`read_header` and :func:`read_backing_name` read what the header says;
* :func:`write_header` is the one place a header is packed and written;
* :func:`read_table` / :func:`read_table_bytes` read an L1 or L2 table, :func:`page_runs`
  groups a table's dirty 4 KiB pages into runs for writing back;
* :func:`create_image` lays out a new, empty image.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Final

from qedfuse import format as fmt
from qedfuse.errors import FormatError

if TYPE_CHECKING:
    from array import array

    from qedfuse.imagefile import BlockFile

#: Table entries per 4 KiB page: the unit of dirty tracking and of partial table writes.
PAGE_ENTRIES: Final = 512
#: Largest image file, in clusters, that the engine opens and the checker checks: both keep
#: one bit per cluster of the file (at most 128 MiB, resident only where tables reference
#: clusters), so a hostile image stays within the 256 MiB memory bound, and the same limit in
#: both means every image the engine opens is one a check can repair (4 TiB files with 4 KiB
#: clusters, 64 TiB with 64 KiB).
MAX_FILE_CLUSTERS: Final = 1 << 30
#: Bytes of one table page.
PAGE_SIZE: Final = PAGE_ENTRIES * 8


async def read_header(file: BlockFile) -> tuple[fmt.Header, fmt.Geometry, int]:
    """Read and validate the header; return it with its geometry and the file size."""
    file_size = await file.size()
    header = fmt.Header.unpack(await file.pread(0, fmt.HEADER_STRUCT_SIZE))
    geometry = fmt.validate_header(header, file_size)
    return header, geometry, file_size


async def read_backing_name(file: BlockFile, header: fmt.Header) -> bytes | None:
    """The backing file name stored in the image, or None."""
    if not header.has_backing_file:
        return None
    return await file.pread(header.backing_filename_offset, header.backing_filename_size)


async def write_header(
    file: BlockFile, header: fmt.Header, *, sync: bool = True, backing_name: bytes = b""
) -> None:
    """Write the 64-byte header struct at offset 0 (never the bytes after it), then
    ``fdatasync`` unless ``sync`` is False (the caller syncs and tracks the failure itself).

    ``backing_name`` (creation only) is written in the same pwrite, right after the struct.
    """
    await file.pwrite(0, header.pack() + backing_name)
    if sync:
        await file.fdatasync()


async def read_table_bytes(file: BlockFile, offset: int, geometry: fmt.Geometry) -> bytes:
    """The raw bytes of the L1 or L2 table at file ``offset``."""
    return await file.pread(offset, geometry.table_bytes)


async def read_table(file: BlockFile, offset: int, geometry: fmt.Geometry) -> array[int]:
    """The decoded entries of the L1 or L2 table at file ``offset``."""
    return fmt.decode_table(await file.pread(offset, geometry.table_bytes))


def page_runs(pages: Iterable[int], n_entries: int) -> Iterator[tuple[int, int]]:
    """Entry ranges ``[start, stop)`` covering ``pages`` (page numbers of a table of
    ``n_entries``), consecutive pages merged into one run, in file order."""
    ordered = sorted(pages)
    k = 0
    while k < len(ordered):
        j = k
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        yield ordered[k] * PAGE_ENTRIES, min(n_entries, (ordered[j] + 1) * PAGE_ENTRIES)
        k = j + 1


async def create_image(
    file: BlockFile,
    image_size: int,
    *,
    cluster_size: int = fmt.DEFAULT_CLUSTER_SIZE,
    table_size: int = fmt.DEFAULT_TABLE_SIZE,
    backing_name: bytes = b"",
    backing_raw: bool = False,
) -> fmt.Header:
    """Write a new, empty image on ``file`` (truncated first), laid out as QEMU does."""
    geometry = fmt.check_create_params(image_size, cluster_size, table_size)
    if len(backing_name) > fmt.MAX_BACKING_NAME_SIZE:
        raise FormatError(
            f"backing file name of {len(backing_name)} bytes is too long (QEMU and qedfuse "
            f"read at most {fmt.MAX_BACKING_NAME_SIZE})"
        )
    if fmt.HEADER_STRUCT_SIZE + len(backing_name) > cluster_size:
        raise FormatError(
            f"backing file name of {len(backing_name)} bytes does not fit in the header cluster"
        )
    header = fmt.new_header(
        image_size,
        cluster_size=cluster_size,
        table_size=table_size,
        backing_name=backing_name,
        backing_raw=backing_raw,
    )
    # Never write a header our own open (QEMU's checks) would refuse.
    try:
        fmt.validate_header(header, header.l1_table_offset + geometry.table_bytes)
    except FormatError as exc:
        raise FormatError(f"the new image would not open: {exc}") from exc
    await file.ftruncate(0)
    await write_header(file, header, sync=False, backing_name=backing_name)
    await file.pwrite(header.l1_table_offset, bytes(geometry.table_bytes))
    await file.fdatasync()
    return header


__all__ = [
    "PAGE_ENTRIES",
    "PAGE_SIZE",
    "create_image",
    "page_runs",
    "read_backing_name",
    "read_header",
    "read_table",
    "read_table_bytes",
    "write_header",
]
