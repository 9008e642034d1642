"""Corruption operators on QED image files, for tests (plain synchronous file I/O).

In the spirit of QEMU's ``tests/qemu-iotests/qed.py`` (show, duplicate, invalidate,
need-check, zero-cluster, copy-metadata), reimplemented with explicit, deterministic
arguments.  Every operator takes the image path; where a slot is not given it picks the
first suitable one (or a random one when an ``rng`` is passed) and returns what it changed,
so a test can assert on it.  Nothing here validates the image: the point is to break it.

Import as ``import qededit`` (tests/ is on pytest's pythonpath).
"""

from __future__ import annotations

import os
import random
import struct
from typing import Final

from qedfuse import format as fmt

Path = str | os.PathLike[str]

#: Byte offset and struct code of every header field.
HEADER_FIELDS: Final[dict[str, tuple[int, str]]] = {
    "magic": (0, "<I"),
    "cluster_size": (4, "<I"),
    "table_size": (8, "<I"),
    "header_size": (12, "<I"),
    "features": (16, "<Q"),
    "compat_features": (24, "<Q"),
    "autoclear_features": (32, "<Q"),
    "l1_table_offset": (40, "<Q"),
    "image_size": (48, "<Q"),
    "backing_filename_offset": (56, "<I"),
    "backing_filename_size": (60, "<I"),
}
_ENTRY: Final = struct.Struct("<Q")


# ---------------------------------------------------------------------- raw access


def pread(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def pwrite(path: Path, offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` in place (the file grows if needed)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def file_size(path: Path) -> int:
    return os.stat(path).st_size


# ---------------------------------------------------------------------- header


def read_header(path: Path) -> fmt.Header:
    return fmt.Header.unpack(pread(path, 0, fmt.HEADER_STRUCT_SIZE))


def write_header(path: Path, header: fmt.Header) -> None:
    """Rewrite the 64-byte struct only (bytes after it are kept)."""
    pwrite(path, 0, header.pack())


def write_header_field(path: Path, name: str, value: int) -> None:
    """Poke one header field (e.g. ``write_header_field(p, "cluster_size", 8192)``)."""
    offset, code = HEADER_FIELDS[name]
    pwrite(path, offset, struct.pack(code, value))


def geometry(path: Path) -> fmt.Geometry:
    header = read_header(path)
    return fmt.Geometry(header.cluster_size, header.table_size, header.header_size)


def need_check(path: Path) -> bool:
    return read_header(path).need_check


def set_need_check(path: Path, on: bool) -> None:
    header = read_header(path)
    if on:
        features = header.features | fmt.Feature.NEED_CHECK
    else:
        features = header.features & ~fmt.Feature.NEED_CHECK
    write_header_field(path, "features", features)


# ---------------------------------------------------------------------- tables


def read_table(path: Path, offset: int) -> list[int]:
    geo = geometry(path)
    raw = pread(path, offset, geo.table_bytes).ljust(geo.table_bytes, b"\0")
    return list(fmt.decode_table(raw))


def l1_entries(path: Path) -> list[int]:
    return read_table(path, read_header(path).l1_table_offset)


def set_l1(path: Path, index: int, value: int) -> None:
    geo = geometry(path)
    if not 0 <= index < geo.table_entries:
        raise IndexError(f"L1 index {index} out of range")
    pwrite(path, read_header(path).l1_table_offset + 8 * index, _ENTRY.pack(value))


def l2_offset(path: Path, l1_index: int) -> int:
    offset = l1_entries(path)[l1_index]
    if offset == 0:
        raise LookupError(f"L1 entry {l1_index} has no L2 table")
    return offset


def l2_entries(path: Path, l1_index: int) -> list[int]:
    return read_table(path, l2_offset(path, l1_index))


def set_l2(path: Path, l1_index: int, l2_index: int, value: int) -> None:
    geo = geometry(path)
    if not 0 <= l2_index < geo.table_entries:
        raise IndexError(f"L2 index {l2_index} out of range")
    pwrite(path, l2_offset(path, l1_index) + 8 * l2_index, _ENTRY.pack(value))


def slot_of(path: Path, pos: int) -> tuple[int, int]:
    """(l1_index, l2_index) mapping guest byte ``pos``."""
    geo = geometry(path)
    return geo.l1_index(pos), geo.l2_index(pos)


def entry_at(path: Path, pos: int) -> int:
    """The L2 entry mapping guest byte ``pos`` (0 when no L2 table)."""
    l1_index, l2_index = slot_of(path, pos)
    table = l1_entries(path)[l1_index]
    return 0 if table == 0 else read_table(path, table)[l2_index]


def data_slots(path: Path) -> list[tuple[int, int, int]]:
    """Every (l1_index, l2_index, value) whose L2 value is a data offset (not 0/1)."""
    out: list[tuple[int, int, int]] = []
    for l1_index, table in enumerate(l1_entries(path)):
        if table == 0:
            continue
        for l2_index, value in enumerate(read_table(path, table)):
            if value > fmt.ZERO_CLUSTER:
                out.append((l1_index, l2_index, value))
    return out


def _used_l1(path: Path) -> list[int]:
    return [i for i, e in enumerate(l1_entries(path)) if e != 0]


def _pick(choices: list[int], rng: random.Random | None, what: str) -> int:
    if not choices:
        raise LookupError(f"no {what} to pick")
    return rng.choice(choices) if rng is not None else choices[0]


def past_eof_offset(path: Path, clusters_past: int = 16) -> int:
    """A cluster-aligned offset ``clusters_past`` clusters past the (rounded-up) end of file."""
    cs = read_header(path).cluster_size
    return (-(-file_size(path) // cs) + clusters_past) * cs


# ---------------------------------------------------------------------- operators


def duplicate_l1(
    path: Path,
    src_index: int | None = None,
    dst_index: int | None = None,
    *,
    rng: random.Random | None = None,
) -> tuple[int, int]:
    """Make L1 entry ``dst_index`` name the same L2 table as ``src_index``; return both."""
    used = _used_l1(path)
    src = src_index if src_index is not None else _pick(used, rng, "used L1 entry")
    if dst_index is None:
        entries = l1_entries(path)
        others = [i for i, e in enumerate(entries) if e != entries[src]]
        dst = _pick(others, rng, "other L1 entry")
    else:
        dst = dst_index
    set_l1(path, dst, l1_entries(path)[src])
    return src, dst


def duplicate_l2(
    path: Path,
    l1_index: int | None = None,
    src_index: int | None = None,
    dst_index: int | None = None,
    *,
    rng: random.Random | None = None,
) -> tuple[int, int, int]:
    """Copy the data offset in L2 slot ``src_index`` to slot ``dst_index`` (same table).

    Returns ``(l1_index, src_index, dst_index)``; both slots then reference one cluster.
    """
    l1 = l1_index if l1_index is not None else _pick(_used_l1(path), rng, "used L1 entry")
    entries = l2_entries(path, l1)
    if src_index is None:
        data = [i for i, e in enumerate(entries) if e > fmt.ZERO_CLUSTER]
        src = _pick(data, rng, "data entry")
    else:
        src = src_index
    if dst_index is None:
        others = [i for i, e in enumerate(entries) if e != entries[src]]
        dst = _pick(others, rng, "other L2 entry")
    else:
        dst = dst_index
    set_l2(path, l1, dst, entries[src])
    return l1, src, dst


def invalidate_l1(
    path: Path,
    index: int | None = None,
    value: int | None = None,
    *,
    rng: random.Random | None = None,
) -> tuple[int, int]:
    """Point a used L1 entry past the end of the file (or at ``value``); return both."""
    l1 = index if index is not None else _pick(_used_l1(path), rng, "used L1 entry")
    bad = (
        value
        if value is not None
        else past_eof_offset(path, rng.randint(1, 1 << 20) if rng else 16)
    )
    set_l1(path, l1, bad)
    return l1, bad


def invalidate_l2(
    path: Path,
    l1_index: int | None = None,
    l2_index: int | None = None,
    value: int | None = None,
    *,
    rng: random.Random | None = None,
) -> tuple[int, int, int]:
    """Point an L2 data entry past the end of the file (or at ``value``)."""
    l1 = l1_index if l1_index is not None else _pick(_used_l1(path), rng, "used L1 entry")
    if l2_index is None:
        entries = l2_entries(path, l1)
        data = [i for i, e in enumerate(entries) if e > fmt.ZERO_CLUSTER]
        l2 = _pick(data, rng, "data entry")
    else:
        l2 = l2_index
    bad = (
        value
        if value is not None
        else past_eof_offset(path, rng.randint(1, 1 << 20) if rng else 16)
    )
    set_l2(path, l1, l2, bad)
    return l1, l2, bad


def zero_cluster(path: Path, pos: int, n_clusters: int = 1) -> None:
    """Turn the L2 entries for ``n_clusters`` guest clusters from ``pos`` into zero clusters."""
    cs = read_header(path).cluster_size
    for k in range(n_clusters):
        l1_index, l2_index = slot_of(path, pos + k * cs)
        set_l2(path, l1_index, l2_index, fmt.ZERO_CLUSTER)


def append_clusters(path: Path, n_clusters: int, fill: int = 0x5A) -> int:
    """Append ``n_clusters`` unreferenced clusters (leaks) at the cluster-rounded end.

    Returns the offset of the first one.
    """
    cs = read_header(path).cluster_size
    offset = file_size(path) // cs * cs
    pwrite(path, offset, bytes([fill]) * (n_clusters * cs))
    return offset


def copy_metadata(path: Path, out_path: Path) -> None:
    """Copy header clusters, L1 and L2 tables into a sparse file of the same size."""
    header = read_header(path)
    geo = geometry(path)
    with open(out_path, "wb") as out:
        out.truncate(file_size(path))
        out.seek(0)
        out.write(pread(path, 0, geo.header_end_offset))
        for offset in [header.l1_table_offset, *(e for e in l1_entries(path) if e)]:
            out.seek(offset)
            out.write(pread(path, offset, geo.table_bytes))
