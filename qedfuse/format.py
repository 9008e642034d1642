"""QED on-disk format: pure codecs and address math (no I/O, no trio).

The format (QEMU's ``docs/interop/qed_spec.txt``), in brief:

* A 64-byte little-endian header at file offset 0 (``<IIIIQQQQQII``): magic ``QED\\0``,
  cluster size, table size (in clusters), header size (in clusters), three feature words,
  the L1 table's file offset, the guest-visible image size and the backing file name's
  location.  Bytes after the struct, up to ``header_size`` clusters, are free for extra
  header data (QEMU stores the backing file name there); we never rewrite them except
  when changing the backing file name.
* Two levels of tables of ``N = table_size * cluster_size / 8`` little-endian uint64
  entries.  L1 entries are 0 (no L2 table) or the file offset of an L2 table.  L2 entries
  are 0 (unallocated: read the backing image, or zeros), 1 (zero cluster: reads as zeros,
  hides the backing image) or the file offset of a data cluster.
* Every offset is cluster aligned, at or past the header clusters and inside the file.
  New clusters are only ever appended at the (cluster-rounded-down) end of the file.

Naming: ``*_pos`` is a guest byte position, ``*_offset`` a host file byte offset,
``*_index`` a table slot, ``*_size`` a byte count, ``n_*`` a count.

Validation follows QEMU 7.2's open checks, order and messages, except where QEMU is wrong:
sizes are exact integers (no 64-bit wrap), ``table_size == 1`` is accepted, and tables may
not overlap the header (docs/qemu-differences.md#bug-d, #bug-c, #table-overlaps-header).
qedfuse also refuses tables larger than :data:`MAX_TABLE_SIZE` (every image QEMU can open
with a non-zero size has tables of at most 16 MiB; docs/qemu-differences.md#table-size-limit).
"""

from __future__ import annotations

import dataclasses
import enum
import struct
import sys
from array import array
from dataclasses import dataclass
from typing import Final

QED_MAGIC: Final = 0x00444551
HEADER_STRUCT: Final = struct.Struct("<IIIIQQQQQII")
HEADER_STRUCT_SIZE: Final = HEADER_STRUCT.size  # 64

MIN_CLUSTER_SIZE: Final = 4096
MAX_CLUSTER_SIZE: Final = 64 * 1024 * 1024
MIN_TABLE_SIZE: Final = 1
MAX_TABLE_SIZE_CLUSTERS: Final = 16
DEFAULT_CLUSTER_SIZE: Final = 65536
DEFAULT_TABLE_SIZE: Final = 4
#: qedfuse's cap on one table's bytes (L1 and each L2), bounding memory for hostile images.
MAX_TABLE_SIZE: Final = 16 * 1024 * 1024
#: QEMU reads the backing file name into a PATH_MAX buffer including the NUL.
MAX_BACKING_NAME_SIZE: Final = 4095
SECTOR_SIZE: Final = 512

_U32: Final = (1 << 32) - 1
_U64: Final = (1 << 64) - 1

UNALLOCATED: Final = 0
ZERO_CLUSTER: Final = 1


class Feature(enum.IntFlag):
    """Incompatible feature bits (``features``)."""

    BACKING_FILE = 0x01
    NEED_CHECK = 0x02
    BACKING_FORMAT_NO_PROBE = 0x04


KNOWN_FEATURES: Final = 0x07
KNOWN_COMPAT_FEATURES: Final = 0x00
KNOWN_AUTOCLEAR_FEATURES: Final = 0x00


@dataclass(frozen=True, slots=True)
class Header:
    """The 64-byte QED header struct, field for field."""

    magic: int
    cluster_size: int
    table_size: int
    header_size: int
    features: int
    compat_features: int
    autoclear_features: int
    l1_table_offset: int
    image_size: int
    backing_filename_offset: int
    backing_filename_size: int

    @classmethod
    def unpack(cls, raw: bytes) -> Header:
        """Decode the first 64 bytes of ``raw``; a short buffer is zero-padded (as QEMU reads)."""
        raw = bytes(raw[:HEADER_STRUCT_SIZE]).ljust(HEADER_STRUCT_SIZE, b"\0")
        return cls(*HEADER_STRUCT.unpack(raw))

    def pack(self) -> bytes:
        """Encode the 64-byte struct (and only the struct)."""
        return HEADER_STRUCT.pack(*dataclasses.astuple(self))

    def replace(self, **changes: int) -> Header:
        """Return a copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    @property
    def need_check(self) -> bool:
        return bool(self.features & Feature.NEED_CHECK)

    @property
    def has_backing_file(self) -> bool:
        return bool(self.features & Feature.BACKING_FILE) and self.backing_filename_size > 0

    @property
    def backing_is_raw(self) -> bool:
        return bool(self.features & Feature.BACKING_FORMAT_NO_PROBE)


def is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


@dataclass(frozen=True, slots=True)
class Geometry:
    """Cluster and table geometry with the address math derived from it."""

    cluster_size: int
    table_size: int
    header_size: int = 1

    @property
    def cluster_bits(self) -> int:
        return self.cluster_size.bit_length() - 1

    @property
    def table_entries(self) -> int:
        """Entries per table, ``N``."""
        return self.table_size * self.cluster_size // 8

    @property
    def table_bits(self) -> int:
        return self.table_entries.bit_length() - 1

    @property
    def table_bytes(self) -> int:
        return self.table_size * self.cluster_size

    @property
    def l2_coverage(self) -> int:
        """Guest bytes mapped by one L2 table."""
        return self.table_entries * self.cluster_size

    @property
    def max_image_size(self) -> int:
        """Guest bytes mapped by the whole L1 table, computed exactly (QEMU wraps)."""
        return self.table_entries * self.table_entries * self.cluster_size

    @property
    def qemu_max_image_size(self) -> int:
        """QEMU 7.2's limit: the same product in its integer widths (a 32-bit table byte
        count, then 64-bit products that wrap).  All factors are powers of two, so it is
        :attr:`max_image_size` when that is below 2**64, else 0: QEMU then refuses to
        create, open or grow the image to any size above 0."""
        entries = ((self.table_size * self.cluster_size) & _U32) // 8
        l2_size = (entries * self.cluster_size) & _U64
        return (l2_size * entries) & _U64

    @property
    def header_end_offset(self) -> int:
        """First file offset past the header clusters (the struct always uses cluster 0)."""
        return max(self.header_size, 1) * self.cluster_size

    def l1_index(self, pos: int) -> int:
        return pos >> (self.cluster_bits + self.table_bits)

    def l2_index(self, pos: int) -> int:
        return (pos >> self.cluster_bits) & (self.table_entries - 1)

    def offset_in_cluster(self, pos: int) -> int:
        return pos & (self.cluster_size - 1)

    def cluster_start(self, pos: int) -> int:
        return pos & ~(self.cluster_size - 1)

    def clusters_for(self, size: int) -> int:
        """Clusters needed to hold ``size`` bytes, exactly.

        QEMU's count is wrong from cs - 1 clusters on: docs/qemu-differences.md#bug-a, #bug-b.
        """
        return -(-size // self.cluster_size)

    def round_down(self, size: int) -> int:
        return size - size % self.cluster_size

    def is_cluster_offset(self, offset: int, file_size: int) -> bool:
        """QEMU's cluster-offset test: aligned, past the header, inside the file."""
        return (
            offset % self.cluster_size == 0
            and offset >= self.header_end_offset
            and offset < file_size
        )

    def is_table_offset(self, offset: int, file_size: int) -> bool:
        """QEMU's table-offset test with exact math: the whole table lies inside the file."""
        end_offset = offset + (self.table_size - 1) * self.cluster_size
        return self.is_cluster_offset(offset, file_size) and self.is_cluster_offset(
            end_offset, file_size
        )


def validate_header(header: Header, file_size: int) -> Geometry:
    """Check a header as QEMU's open does, in QEMU's order; return its geometry.

    ``file_size`` is the image file's length in bytes.  Raises :class:`FormatError` (or a
    subclass) whose message is QEMU's, extended where qedfuse is stricter.
    """
    from qedfuse.errors import FormatError, LimitError, UnsupportedFeatureError

    if header.magic != QED_MAGIC:
        raise FormatError("Image not in QED format")
    unknown = header.features & ~KNOWN_FEATURES
    if unknown:
        raise UnsupportedFeatureError(f"Unsupported QED features: {unknown:x}")
    cs = header.cluster_size
    if not (is_power_of_two(cs) and MIN_CLUSTER_SIZE <= cs <= MAX_CLUSTER_SIZE):
        raise FormatError("QED cluster size is invalid")
    ts = header.table_size
    if not (is_power_of_two(ts) and MIN_TABLE_SIZE <= ts <= MAX_TABLE_SIZE_CLUSTERS):
        raise FormatError("QED table size is invalid")
    geometry = Geometry(cs, ts, header.header_size)
    if header.image_size % SECTOR_SIZE or header.image_size > geometry.max_image_size:
        raise FormatError("QED image size is invalid")
    allocator_end = geometry.round_down(file_size)
    if not geometry.is_table_offset(header.l1_table_offset, allocator_end):
        raise FormatError("QED table offset is invalid")
    if header.header_size > 0xFFFFFFFF // cs:
        raise FormatError("QED header size is too large")
    if geometry.table_bytes > MAX_TABLE_SIZE:
        raise LimitError(
            f"QED table size is too large for qedfuse: {geometry.table_bytes} bytes "
            f"(limit {MAX_TABLE_SIZE})"
        )
    if header.features & Feature.BACKING_FILE:
        name_end = header.backing_filename_offset + header.backing_filename_size
        if name_end > cs * header.header_size:
            raise FormatError("QED backing filename offset is invalid")
        if header.backing_filename_size > MAX_BACKING_NAME_SIZE:
            raise FormatError("Failed to read backing filename")
    return geometry


def new_header(
    image_size: int,
    *,
    cluster_size: int = DEFAULT_CLUSTER_SIZE,
    table_size: int = DEFAULT_TABLE_SIZE,
    backing_name: bytes = b"",
    backing_raw: bool = False,
) -> Header:
    """Header of a freshly created image (QEMU's layout: header cluster, then L1)."""
    features = 0
    name_offset = 0
    if backing_name:
        features |= Feature.BACKING_FILE
        name_offset = HEADER_STRUCT_SIZE
        if backing_raw:
            features |= Feature.BACKING_FORMAT_NO_PROBE
    return Header(
        magic=QED_MAGIC,
        cluster_size=cluster_size,
        table_size=table_size,
        header_size=1,
        features=features,
        compat_features=0,
        autoclear_features=0,
        l1_table_offset=cluster_size,
        image_size=image_size,
        backing_filename_offset=name_offset,
        backing_filename_size=len(backing_name),
    )


def check_create_params(image_size: int, cluster_size: int, table_size: int) -> Geometry:
    """Validate ``qedfuse create`` parameters with QEMU's create-time messages."""
    from qedfuse.errors import FormatError

    if not (is_power_of_two(cluster_size) and MIN_CLUSTER_SIZE <= cluster_size <= MAX_CLUSTER_SIZE):
        raise FormatError(
            f"QED cluster size must be within range [{MIN_CLUSTER_SIZE}, {MAX_CLUSTER_SIZE}] "
            "and power of 2"
        )
    if not (
        is_power_of_two(table_size) and MIN_TABLE_SIZE <= table_size <= MAX_TABLE_SIZE_CLUSTERS
    ):
        raise FormatError(
            f"QED table size must be within range [{MIN_TABLE_SIZE}, {MAX_TABLE_SIZE_CLUSTERS}] "
            "and power of 2"
        )
    geometry = Geometry(cluster_size, table_size)
    if geometry.table_bytes > MAX_TABLE_SIZE:
        raise FormatError(
            f"QED table of {geometry.table_bytes} bytes exceeds qedfuse's limit of {MAX_TABLE_SIZE}"
        )
    if image_size < 0 or image_size % SECTOR_SIZE or image_size > geometry.max_image_size:
        raise FormatError(
            f"QED image size must be a multiple of 512 and at most {geometry.max_image_size} bytes"
        )
    if image_size > geometry.qemu_max_image_size:
        raise FormatError(qemu_size_limit_message(geometry))
    return geometry


def qemu_size_limit_message(geometry: Geometry) -> str:
    """Why QEMU cannot hold a larger image with ``geometry`` (its size limit wraps)."""
    return (
        f"QED image size must be at most {geometry.qemu_max_image_size} bytes with "
        f"cluster_size={geometry.cluster_size} and table_size={geometry.table_size}: QEMU "
        f"computes this geometry's limit ({geometry.max_image_size} bytes) in 64 bits, where "
        "it wraps, and cannot create or open a larger image (use a smaller cluster_size or "
        "table_size)"
    )


#: Magics of other image formats, which must never be read as raw guest bytes.
OTHER_FORMAT_MAGICS: Final = {
    b"QFI\xfb": "qcow2",
    b"conectix": "vpc",
    b"vhdxfile": "vhdx",
    b"KDMV": "vmdk",
}


def probe_format(first_bytes: bytes) -> str:
    """``"qed"``, ``"raw"``, or the name of another image format, from a file's first 8 bytes."""
    if len(first_bytes) >= 4 and int.from_bytes(first_bytes[:4], "little") == QED_MAGIC:
        return "qed"
    for prefix, name in OTHER_FORMAT_MAGICS.items():
        if first_bytes.startswith(prefix):
            return name
    return "raw"


_BIG_ENDIAN_HOST: Final = sys.byteorder == "big"


def decode_table(raw: bytes | bytearray | memoryview) -> array[int]:
    """Decode little-endian uint64 table entries."""
    table = array("Q")
    table.frombytes(raw)
    if _BIG_ENDIAN_HOST:
        table.byteswap()
    return table


def encode_table(table: array[int], start: int = 0, stop: int | None = None) -> bytes:
    """Encode entries ``table[start:stop]`` as little-endian bytes."""
    part = table[start:stop] if (start or stop is not None) else table
    if _BIG_ENDIAN_HOST:
        part = array("Q", part)
        part.byteswap()
    return part.tobytes()
