"""The offline commands: create, info, check, convert, map, resize, commit.

Each command is an ``async`` function (run with :func:`trio.run` by :mod:`qedfuse.cli`)
that returns a result object and prints nothing; ``cli`` formats the output.  The heavy
lifting is the engine's (:mod:`qedfuse.engine`, :mod:`qedfuse.backing`, :mod:`qedfuse.check`).

Errors a user can cause raise :class:`UserError` (or another
:class:`~qedfuse.errors.QedError`) with a one-line message worded like qemu-img's, e.g.
``Could not open 'x.qed': QED cluster size is invalid``.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import secrets
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Final, TypeVar

import trio

from qedfuse import format as fmt
from qedfuse.backing import RawImage, resolve_backing_name
from qedfuse.engine import GuestSource, Kind, OpenOptions, QedImage
from qedfuse.errors import BackingFileError, QedError, UsageError, UserError
from qedfuse.imagefile import BlockFile, OutputFile, open_file
from qedfuse.locking import LockMode
from qedfuse.opening import (
    adopt_fd,
    backing_chain,
    check_path,
    detect_format,
    file_identity,
    lock,
    lock_backing_chain,
    open_failed,
    open_image,
    open_locked,
    open_output,
    open_raw,
    open_top,
)
from qedfuse.tables import create_image, read_backing_name, read_header

if TYPE_CHECKING:
    from qedfuse.check import CheckReport, DuplicateMode

#: Bytes read or written at once by convert and commit (bounded memory).
CHUNK_SIZE: Final = 4 * 1024 * 1024
#: Granularity of zero detection for sparse raw output (qemu-img convert's default -S).
SPARSE_BLOCK_SIZE: Final = 4096
#: Guest bytes whose mapping is listed at once (bounds the extent lists of huge images).
WINDOW_SIZE: Final = 1 << 30
_ZEROS: Final = bytes(max(CHUNK_SIZE, fmt.MAX_CLUSTER_SIZE))
_MAX_SIZE: Final = (1 << 63) - 1

#: Progress callback: (bytes done, bytes total).
Progress = Callable[[int, int], None]


# ---------------------------------------------------------------------- sizes and options

_SIZE_RE: Final = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*([bkmgtpe]?)$", re.IGNORECASE)
_SUFFIX_SHIFT: Final = {"": 0, "b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}


def parse_size(text: str) -> int:
    """Bytes from ``1234``, ``64k``, ``1.5G`` … (binary suffixes K M G T P E, case-insensitive).

    A fractional byte count is rounded up.
    """
    match = _SIZE_RE.match(text.strip())
    if match is None:
        raise UsageError(
            f"invalid size {text!r}: give bytes, optionally with a K, M, G, T, P or E suffix "
            "(powers of 1024)"
        )
    number, suffix = match.groups()
    value = math.ceil(Fraction(number) * (1 << _SUFFIX_SHIFT[suffix.lower()]))
    if value > _MAX_SIZE:
        raise UsageError(f"size {text!r} is too large")
    return value


def round_up_sector(size: int) -> int:
    """Round up to a multiple of 512, as ``qemu-img create`` does (1000 → 1024)."""
    return -(-size // fmt.SECTOR_SIZE) * fmt.SECTOR_SIZE


@dataclass(frozen=True, slots=True)
class CreateOptions:
    """``-o cluster_size=…,table_size=…``."""

    cluster_size: int = fmt.DEFAULT_CLUSTER_SIZE
    table_size: int = fmt.DEFAULT_TABLE_SIZE


def parse_create_options(specs: list[str]) -> CreateOptions:
    """Parse the ``-o`` option strings of create and convert (later values win)."""
    values: dict[str, int] = {}
    for spec in specs:
        for item in spec.split(","):
            if not item:
                continue
            key, sep, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if key not in ("cluster_size", "table_size"):
                raise UsageError(f"invalid option {key!r} (QED options: cluster_size, table_size)")
            if not sep:
                raise UsageError(f"option {key!r} needs a value ({key}=N)")
            values[key] = parse_size(value) if key == "cluster_size" else _parse_int(key, value)
    return CreateOptions(**values)


def _parse_int(key: str, value: str) -> int:
    try:
        return int(value, 0)
    except ValueError:
        raise UsageError(f"option {key!r}: {value!r} is not a number") from None


# ---------------------------------------------------------------------- opening


def _absolute(path: str) -> str:
    """``os.path.abspath``: string work and one ``getcwd``, never a wait on a disk."""
    return os.path.abspath(path)


async def _chain_layers(top: QedImage, top_name: str) -> list[tuple[GuestSource, str]]:
    """Every layer of an open chain with the name qemu-img shows for it: a relative backing
    name is joined to the directory of the name of the image that stores it."""
    layers: list[tuple[GuestSource, str]] = [(top, top_name)]
    layer: GuestSource = top
    name = top_name
    while isinstance(layer, QedImage) and layer.backing is not None:
        text = os.fsdecode(await read_backing_name(layer.file, layer.header) or b"")
        name = text if os.path.isabs(text) else os.path.join(os.path.dirname(name), text)
        layer = layer.backing
        layers.append((layer, name))
    return layers


def _file_ids(top: GuestSource) -> set[tuple[int, int]]:
    """(st_dev, st_ino) of every host file in an open chain."""
    ids: set[tuple[int, int]] = set()
    layer: GuestSource | None = top
    while layer is not None:
        file = layer.file if isinstance(layer, (QedImage, RawImage)) else None
        identity = None if file is None else file_identity(file)
        if identity is not None:
            ids.add(identity)
        layer = layer.backing if isinstance(layer, QedImage) else None
    return ids


# ---------------------------------------------------------------------- create


@dataclass(frozen=True, slots=True)
class CreateResult:
    path: str
    image_size: int
    cluster_size: int
    table_size: int
    backing_name: str | None
    backing_format: str | None


def _create_target(path: str, *, force: bool, allow_device: bool = False) -> tuple[int, bool]:
    """Open ``path`` for (re)writing: (fd, created).  Refuses a non-empty file without force.

    An existing path must be a regular file (:func:`open_file` refuses FIFOs, directories,
    sockets and character devices without blocking); a block device only with
    ``allow_device`` (a raw destination) and ``force`` (it always holds something).
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        return fd, True
    except FileExistsError:
        pass
    except OSError as exc:
        raise UserError(f"{path}: {exc.strerror or exc}") from exc
    try:
        fd = open_file(path, read_only=False)
    except OSError as exc:
        raise UserError(f"{path}: {exc.strerror or exc}") from exc
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        if not allow_device:
            os.close(fd)
            raise UserError(
                f"{path}: is a block device; a QED image needs a regular file (it grows), "
                "use a file or a raw destination"
            )
        if not force:
            os.close(fd)
            raise UserError(f"{path}: is a block device (use --force to overwrite it)")
        return fd, False
    if st.st_size > 0 and not force:
        os.close(fd)
        raise UserError(f"{path}: file exists and is not empty (use --force to overwrite it)")
    return fd, False


def _temp_name(dst: str) -> tuple[str, str]:
    """(temporary path, final path) for replacing ``dst``: the final path has its symlinks
    resolved (a symlink stays, the file it names is replaced), the temporary name is fresh
    and in the same directory (so the rename is atomic)."""
    final = os.path.realpath(dst)
    directory, name = os.path.split(final)
    return os.path.join(directory, f".{name}.{secrets.token_hex(4)}.qedfuse-tmp"), final


def _create_temp(dst: str, temp_path: str, like: os.stat_result) -> int:
    """Create ``temp_path`` with the mode (and owner, where allowed) of the file it replaces."""
    try:
        fd = os.open(temp_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise UserError(f"{dst}: cannot create a temporary file beside it: {exc.strerror}") from exc
    try:
        os.fchmod(fd, stat.S_IMODE(like.st_mode))
        if (like.st_uid, like.st_gid) != (os.getuid(), os.getgid()):
            with contextlib.suppress(OSError):
                os.fchown(fd, like.st_uid, like.st_gid)
    except BaseException:
        os.close(fd)
        raise
    return fd


async def _replace(temp: str, final: str) -> None:
    """Rename ``temp`` over ``final`` and make the rename durable (fsync the directory)."""
    os.replace(temp, final)
    dir_fd = os.open(os.path.dirname(final), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        await trio.to_thread.run_sync(os.fsync, dir_fd)
    finally:
        os.close(dir_fd)


async def create(
    path: str,
    size: int | None,
    *,
    cluster_size: int = fmt.DEFAULT_CLUSTER_SIZE,
    table_size: int = fmt.DEFAULT_TABLE_SIZE,
    backing: str | None = None,
    backing_format: str | None = None,
    force: bool = False,
) -> CreateResult:
    """Create an empty QED image (``size`` is rounded up to 512 bytes, as qemu-img does).

    ``backing`` is stored as given; a relative name is relative to the new image's directory.
    Without ``size`` the backing image's size is used.
    """
    backing_raw = False
    if backing is not None:
        if backing_format is None:
            raise UsageError("Backing file specified without backing format (use -F raw or -F qed)")
        if backing_format not in ("raw", "qed"):
            raise UsageError(f"unsupported backing format {backing_format!r} (raw or qed)")
        backing_raw = backing_format == "raw"
        backing_size = await _backing_size(path, backing, backing_format)
        if size is None:
            size = backing_size
    elif backing_format is not None:
        raise UsageError("-F needs a backing file (-b)")
    if size is None:
        raise UsageError(f"{path}: Image creation needs a size parameter")
    size = round_up_sector(size)
    name = os.fsencode(backing) if backing is not None else b""
    try:
        fmt.check_create_params(size, cluster_size, table_size)
        if fmt.HEADER_STRUCT_SIZE + len(name) > cluster_size:
            raise QedError(
                f"backing file name of {len(name)} bytes does not fit in the header cluster"
            )
    except QedError as exc:
        raise UserError(f"{path}: {exc}") from exc
    fd, created = _create_target(path, force=force)
    file = adopt_fd(fd, path=path)
    try:
        # qemu-img create's lock: write and resize, refusing only other resizers, so it
        # overwrites what QEMU would overwrite (a raw file another writer shares) and no more
        lock(fd, LockMode.CREATE, path)
        await create_image(
            file,
            size,
            cluster_size=cluster_size,
            table_size=table_size,
            backing_name=name,
            backing_raw=backing_raw,
        )
    except BaseException as exc:
        await file.aclose()
        if created:
            _unlink_quietly(path)
        if isinstance(exc, (QedError, OSError)):
            text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise UserError(f"{path}: {text}") from exc
        raise
    await file.aclose()
    return CreateResult(path, size, cluster_size, table_size, backing, backing_format)


async def _backing_size(image_path: str, backing: str, backing_format: str) -> int:
    """Open the named backing image (as the new image will) and return its guest size."""
    try:
        resolved = resolve_backing_name(os.fsencode(backing), image_path)
    except BackingFileError as exc:
        raise UserError(f"{image_path}: {exc}") from exc
    try:
        if backing_format == "raw":
            raw = await open_raw(resolved, lock_mode=LockMode.SHARED)
            try:
                return round_up_sector(raw.image_size)
            finally:
                await raw.aclose()
        if await detect_format(resolved) != "qed":
            raise UserError(f"backing file '{backing}' is not a QED image (use -F raw?)")
        image = await open_top(resolved, read_only=True, lock_mode=LockMode.SHARED)
        async with image:
            return image.image_size
    except UserError as exc:
        raise UserError(f"{image_path}: Could not open backing image: {exc}") from exc


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# ---------------------------------------------------------------------- info

_FEATURE_NAMES: Final = {
    fmt.Feature.BACKING_FILE: "backing-file",
    fmt.Feature.NEED_CHECK: "need-check",
    fmt.Feature.BACKING_FORMAT_NO_PROBE: "backing-format-no-probe",
}


def feature_names(features: int) -> list[str]:
    """Names of the incompatible feature bits; unknown bits as hex."""
    names = [name for bit, name in _FEATURE_NAMES.items() if features & bit]
    unknown = features & ~fmt.KNOWN_FEATURES
    if unknown:
        names.append(f"unknown {unknown:#x}")
    return names


@dataclass
class ImageInfo:
    """What ``qedfuse info`` shows."""

    filename: str
    header: fmt.Header
    file_length: int
    actual_size: int  # st_blocks * 512
    allocated_size: int
    backing_filename: str | None = None
    full_backing_filename: str | None = None
    backing_format: str | None = None  # recorded in the image (raw) or None (probed)
    chain: list[tuple[str, str]] = field(default_factory=list)
    chain_error: str | None = None

    @property
    def dirty(self) -> bool:
        return self.header.need_check

    def to_json(self) -> dict[str, object]:
        """qemu-img info's keys where they apply, plus ``format-specific`` and the chain."""
        h = self.header
        out: dict[str, object] = {
            "virtual-size": h.image_size,
            "filename": self.filename,
            "cluster-size": h.cluster_size,
            "format": "qed",
            "actual-size": self.actual_size,
            "dirty-flag": self.dirty,
        }
        if self.backing_filename is not None:
            out["backing-filename"] = self.backing_filename
            out["full-backing-filename"] = self.full_backing_filename
            if self.backing_format is not None:
                out["backing-filename-format"] = self.backing_format
        out["format-specific"] = {
            "type": "qed",
            "data": {
                "table-size": h.table_size,
                "header-size": h.header_size,
                "features": feature_names(h.features),
                "compat-features": h.compat_features,
                "autoclear-features": h.autoclear_features,
                "l1-table-offset": h.l1_table_offset,
                "allocated-size": self.allocated_size,
                "file-length": self.file_length,
            },
        }
        if self.chain:
            out["backing-chain"] = [{"filename": p, "format": f} for p, f in self.chain]
        if self.chain_error is not None:
            out["backing-chain-error"] = self.chain_error
        return out

    def human_text(self) -> str:
        h = self.header
        cs = h.cluster_size
        lines = [
            f"image: {self.filename}",
            "file format: qed",
            f"virtual size: {human_size(h.image_size)} ({h.image_size} bytes)",
            f"disk size: {human_size(self.actual_size)}",
            f"cluster_size: {cs}",
        ]
        if self.backing_filename is not None:
            line = f"backing file: {self.backing_filename}"
            if self.full_backing_filename != self.backing_filename:
                line += f" (actual path: {self.full_backing_filename})"
            lines.append(line)
            if self.backing_format is not None:
                lines.append(f"backing file format: {self.backing_format}")
            elif len(self.chain) > 1:
                lines.append(f"backing file format: {self.chain[1][1]} (probed)")
        if self.dirty:
            lines.append("cleanly shut down: no")
        lines += [
            "Format specific information:",
            f"    table size: {_plural(h.table_size, 'cluster')} ({h.table_size * cs} bytes each)",
            f"    header size: {_plural(h.header_size, 'cluster')}",
            f"    features: {', '.join(feature_names(h.features)) or 'none'}",
            f"    dirty flag (need check): {'yes' if self.dirty else 'no'}",
            f"    compat features: {h.compat_features:#x}",
            f"    autoclear features: {h.autoclear_features:#x}",
            f"    L1 table offset: {h.l1_table_offset:#x}",
            f"    allocated: {human_size(self.allocated_size)} "
            f"({_plural(self.allocated_size // cs, 'cluster')})",
            f"    file length: {self.file_length} bytes",
        ]
        if len(self.chain) > 1:
            chain = " -> ".join(f"{p} ({f})" for p, f in self.chain)
            lines.append(f"    backing chain: {chain}")
        if self.chain_error is not None:
            lines.append(f"    backing chain: broken: {self.chain_error}")
        return "\n".join(lines) + "\n"


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def human_size(size: int) -> str:
    """``644 KiB``, ``1.5 KiB``, ``8 MiB``: three significant digits, next unit from 1000 up."""
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    scaled = size * 1024 // 1000
    exp = min((scaled.bit_length() - 1) // 10, len(units) - 1) if scaled > 0 else 0
    return f"{size / (1 << (10 * exp)):.3g} {units[exp]}"


async def info(path: str, *, force_share: bool = False) -> ImageInfo:
    """Read the header, allocation and backing chain of ``path`` without writing anything."""
    mode = LockMode.SHARED if force_share else LockMode.READ_ONLY
    image = await open_top(path, read_only=True, lock_mode=mode, with_backing=False)
    async with image:
        header = image.header
        st = image.file.stat()
        file_length = await image.file.size()
        allocated = await image.allocated_bytes()
        stored = await read_backing_name(image.file, header)
    result = ImageInfo(
        filename=path,
        header=header,
        file_length=file_length,
        actual_size=st.allocated_bytes if st is not None else file_length,
        allocated_size=allocated,
    )
    if stored:
        text = os.fsdecode(stored)
        result.backing_filename = text
        result.full_backing_filename = (
            text if os.path.isabs(text) else os.path.join(os.path.dirname(path), text)
        )
        if header.backing_is_raw:
            result.backing_format = "raw"
        try:
            result.chain = await backing_chain(path)
        except (QedError, OSError) as exc:
            result.chain_error = str(exc)
    else:
        result.chain = [(_absolute(path), "qed")]
    return result


# ---------------------------------------------------------------------- check


async def check(
    path: str,
    *,
    repair: str | None = None,
    force_share: bool = False,
    duplicates: DuplicateMode = "copy",
    max_copy_bytes: int | None = None,
) -> CheckReport:
    """Run :func:`qedfuse.check.check_image` on ``path`` (opened directly, never auto-repaired).

    ``repair`` is None (check only: read-only open and lock), ``"leaks"`` or ``"all"``;
    ``duplicates`` and ``max_copy_bytes`` bound how a repair resolves shared clusters.
    """
    from qedfuse.check import DEFAULT_MAX_COPY_BYTES, RepairLimitError, check_image

    writable = repair is not None
    if writable:
        mode = LockMode.READ_WRITE
    else:
        mode = LockMode.SHARED if force_share else LockMode.READ_ONLY
    file = await open_locked(path, writable=writable, lock_mode=mode)
    backing_files: list[BlockFile] = []
    try:
        try:
            await read_header(file)
            # qemu-img check opens the backing chain too, so its writers refuse a check
            backing_files = await lock_backing_chain(path, force_share=force_share)
        except (QedError, OSError) as exc:
            hint = mode is LockMode.READ_ONLY
            raise open_failed(path, exc, hint_force_share=hint) from exc
        try:
            return await check_image(
                file,
                repair=repair or False,
                duplicates=duplicates,
                max_copy_bytes=DEFAULT_MAX_COPY_BYTES if max_copy_bytes is None else max_copy_bytes,
                image_name=path,
            )
        except RepairLimitError as exc:
            raise UserError(str(exc)) from exc
        except (QedError, OSError) as exc:
            text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise UserError(f"Check failed: {text}") from exc
    finally:
        for backing_file in backing_files:
            await backing_file.aclose()
        await file.aclose()


# ---------------------------------------------------------------------- data runs


async def _maybe_data(source: GuestSource, pos: int, end: int) -> list[tuple[int, int]]:
    """Guest ranges in [pos, end) that may hold non-zero bytes (everything else reads zero)."""
    out: list[tuple[int, int]] = []
    if isinstance(source, RawImage):
        end = min(end, source.image_size)
        out += [(p, n) for p, n, is_data in source.file.data_ranges(pos, end) if is_data]
        return out
    if not isinstance(source, QedImage):
        return [(pos, end - pos)] if pos < end else []
    for ext in await source.extents(pos, end - pos):
        if ext.kind is Kind.DATA:
            out.append((ext.pos, ext.length))
        elif ext.kind is Kind.UNALLOCATED and source.backing is not None:
            backing_end = min(ext.pos + ext.length, source.backing.image_size)
            if ext.pos < backing_end:
                out += await _maybe_data(source.backing, ext.pos, backing_end)
    return out


def _nonzero_blocks(data: bytes, block_size: int) -> list[tuple[int, int]]:
    """[(offset, length)] of the runs of ``data`` made of blocks that are not all zero."""
    runs: list[tuple[int, int]] = []
    view = memoryview(data)
    zero = memoryview(_ZEROS)
    start = -1
    for offset in range(0, len(data), block_size):
        block = view[offset : offset + block_size]
        if block == zero[: len(block)]:
            if start >= 0:
                runs.append((start, offset - start))
                start = -1
        elif start < 0:
            start = offset
    if start >= 0:
        runs.append((start, len(data) - start))
    return runs


# ---------------------------------------------------------------------- convert


@dataclass(frozen=True, slots=True)
class ConvertResult:
    image_size: int
    bytes_written: int  # guest bytes written to the destination (non-zero blocks)


async def convert(
    src: str,
    dst: str,
    *,
    dst_format: str,
    src_format: str | None = None,
    cluster_size: int = fmt.DEFAULT_CLUSTER_SIZE,
    table_size: int = fmt.DEFAULT_TABLE_SIZE,
    force: bool = False,
    force_share: bool = False,
    progress: Progress | None = None,
) -> ConvertResult:
    """Copy the guest view of ``src`` (a whole QED chain, flattened) into a new ``dst``.

    Zero ranges are never written: a raw destination stays sparse, a QED destination gets no
    clusters for them.  Reads and writes go in :data:`CHUNK_SIZE` pieces.
    """
    if dst_format not in ("raw", "qed"):
        raise UsageError(f"unsupported output format {dst_format!r} (raw or qed)")
    if src_format is None:
        src_format = await detect_format(src)
    elif src_format not in ("raw", "qed"):
        raise UsageError(f"unsupported input format {src_format!r} (raw or qed)")
    mode = LockMode.SHARED if force_share else LockMode.READ_ONLY
    source: GuestSource
    if src_format == "qed":
        source = await open_top(src, read_only=True, lock_mode=mode)
    else:
        source = await open_raw(src, lock_mode=mode)
    try:
        size = source.image_size
        if dst_format == "qed":
            size = round_up_sector(size)
            try:
                fmt.check_create_params(size, cluster_size, table_size)
            except QedError as exc:
                raise UserError(f"{dst}: {exc}") from exc
        fd, created = _create_target(dst, force=force, allow_device=dst_format == "raw")
        # One try for everything after the target exists, so that wherever an error or a
        # Ctrl-C lands, a temporary file is removed and a file we created is deleted.
        temp_path: str | None = None
        temp_fd = -1
        renamed = device = in_place = False
        out: OutputFile | None = None
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) in _file_ids(source):
                raise UserError(f"{dst}: is the source image or one of its backing files")
            lock(fd, LockMode.READ_WRITE, dst)
            device = stat.S_ISBLK(st.st_mode)
            if device and (capacity := os.lseek(fd, 0, os.SEEK_END)) < size:
                raise UserError(
                    f"{dst}: the block device holds {capacity} bytes but the image needs "
                    f"{size}; a block device cannot grow"
                )
            final = dst
            in_place = device
            if not created and not device:
                # Write beside it and rename at the end: an interrupted run keeps the old file.
                temp_path, final = _temp_name(dst)
                try:
                    temp_fd = _create_temp(dst, temp_path, st)
                except UserError as exc:
                    cause = exc.__cause__
                    if not (
                        dst_format == "raw"
                        and isinstance(cause, OSError)
                        and cause.errno in (errno.EPERM, errno.EACCES)
                    ):
                        raise
                    # A directory that takes no new files (a mounted qedfuse disk.raw, a
                    # fixed set of files): write the raw disk in place, as onto a device.
                    temp_path = None
                    in_place = True
                    if st.st_size < size:
                        raise UserError(
                            f"{dst}: holds {st.st_size} bytes but the image needs {size}, and "
                            "it cannot be replaced (its directory takes no new files)"
                        ) from exc
            out = adopt_fd(fd if temp_path is None else temp_fd)
            if in_place:
                written = await _convert_to_device(source, out, progress)
            elif dst_format == "raw":
                written = await _convert_to_raw(source, out, progress)
            else:
                written = await _convert_to_qed(
                    source, out, size, cluster_size, table_size, progress
                )
            if temp_path is not None:
                await _replace(temp_path, final)
                renamed = True
        except BaseException as exc:
            if temp_path is not None and not renamed:
                _unlink_quietly(temp_path)
            elif created:
                _unlink_quietly(dst)
            if isinstance(exc, OSError):
                partly = " (the target now holds part of the image)" if in_place else ""
                raise UserError(
                    f"{dst}: error while writing: {exc.strerror or exc}{partly}"
                ) from exc
            raise
        finally:
            if out is not None:
                await out.aclose()
            elif temp_fd >= 0:
                os.close(temp_fd)
            if out is None or temp_path is not None:
                os.close(fd)  # a replaced file is held (and locked) until the rename
        return ConvertResult(size, written)
    finally:
        await source.aclose()


async def _copy_nonzero(
    source: GuestSource,
    size: int,
    write: Callable[[int, bytes], Awaitable[None]],
    block_size: int,
    progress: Progress | None,
) -> int:
    """Read every range of ``source`` that may hold data; ``await write(pos, data)`` the
    non-zero blocks.  Returns bytes written."""
    written = 0
    window = 0
    if progress is not None:
        progress(0, size)
    while window < size:
        window_end = min(size, window + WINDOW_SIZE)
        for run_pos, run_length in await _maybe_data(source, window, window_end):
            pos = run_pos
            run_end = run_pos + run_length
            while pos < run_end:
                # Chunks aligned to CHUNK_SIZE, so a QED destination gets whole clusters.
                chunk_end = min(run_end, (pos // CHUNK_SIZE + 1) * CHUNK_SIZE)
                await trio.lowlevel.checkpoint()  # inline I/O does not yield by itself
                data = await source.read_padded(pos, chunk_end - pos)
                for offset, length in _nonzero_blocks(data, block_size):
                    await write(pos + offset, data[offset : offset + length])
                    written += length
                pos = chunk_end
                if progress is not None:
                    progress(pos, size)
        window = window_end
        if progress is not None:
            progress(window, size)
    return written


async def _convert_to_raw(source: GuestSource, out: OutputFile, progress: Progress | None) -> int:
    size = source.image_size
    await out.ftruncate(0)
    await out.ftruncate(size)
    written = await _copy_nonzero(source, size, out.pwrite, SPARSE_BLOCK_SIZE, progress)
    await out.fdatasync()
    return written


async def _convert_to_device(
    source: GuestSource, out: OutputFile, progress: Progress | None
) -> int:
    """Raw onto a block device, in place: not sparse, so the zero ranges are zeroed too."""
    size = source.image_size
    zeroed_to = 0

    async def write(pos: int, data: bytes) -> None:
        nonlocal zeroed_to
        assert pos >= zeroed_to, "convert writes in guest order"
        if pos > zeroed_to:
            await out.write_zeroes(zeroed_to, pos - zeroed_to)
        await out.pwrite(pos, data)
        zeroed_to = pos + len(data)

    written = await _copy_nonzero(source, size, write, SPARSE_BLOCK_SIZE, progress)
    if zeroed_to < size:
        await out.write_zeroes(zeroed_to, size - zeroed_to)
    await out.fdatasync()
    return written


async def _convert_to_qed(
    source: GuestSource,
    out: OutputFile,
    size: int,
    cluster_size: int,
    table_size: int,
    progress: Progress | None,
) -> int:
    await create_image(out, size, cluster_size=cluster_size, table_size=table_size)
    image = await open_image(out, read_only=False, options=OpenOptions(repair_on_open=False))
    async with image:
        # The engine skips all-zero clusters itself; whole clusters are the unit here.
        written = await _copy_nonzero(source, size, image.write, cluster_size, progress)
    return written


# ---------------------------------------------------------------------- map


@dataclass(slots=True)
class MapEntry:
    """One run of ``qedfuse map`` (qemu-img map's fields)."""

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None
    filename: str

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "start": self.start,
            "length": self.length,
            "depth": self.depth,
            "present": self.present,
            "zero": self.zero,
            "data": self.data,
        }
        if self.offset is not None:
            out["offset"] = self.offset
        return out


def _continues(last_offset: int | None, last_length: int, offset: int | None) -> bool:
    """Both without a host offset, or the second host range right after the first."""
    if last_offset is None or offset is None:
        return last_offset is None and offset is None
    return last_offset + last_length == offset


class _MapBuilder:
    def __init__(self, layers: list[tuple[GuestSource, str]]) -> None:
        self.layers = layers
        self.entries: list[MapEntry] = []

    def emit(
        self,
        start: int,
        length: int,
        depth: int,
        *,
        present: bool,
        zero: bool,
        data: bool,
        offset: int | None = None,
    ) -> None:
        if length <= 0:
            return
        filename = self.layers[depth][1]
        last = self.entries[-1] if self.entries else None
        if (
            last is not None
            and last.start + last.length == start
            and (last.depth, last.present, last.zero, last.data, last.filename)
            == (depth, present, zero, data, filename)
            and (last.offset is None) == (offset is None)
            and (
                offset is None or (last.offset is not None and last.offset + last.length == offset)
            )
        ):
            last.length += length
            return
        self.entries.append(MapEntry(start, length, depth, present, zero, data, offset, filename))

    async def walk(self, depth: int, pos: int, end: int) -> None:
        source = self.layers[depth][0]
        if isinstance(source, RawImage):
            raw_end = min(end, source.image_size)
            for p, n, is_data in source.file.data_ranges(pos, raw_end):
                self.emit(p, n, depth, present=True, zero=not is_data, data=is_data, offset=p)
            self.emit(raw_end, end - raw_end, depth, present=False, zero=True, data=False)
            return
        assert isinstance(source, QedImage)
        for ext in await source.extents(pos, end - pos):
            ext_end = ext.pos + ext.length
            if ext.kind is Kind.DATA:
                self.emit(
                    ext.pos, ext.length, depth, present=True, zero=False, data=True,
                    offset=ext.host_offset,
                )  # fmt: skip
            elif ext.kind is Kind.ZERO:
                self.emit(ext.pos, ext.length, depth, present=True, zero=True, data=False)
            elif depth + 1 < len(self.layers):
                backing_end = min(ext_end, self.layers[depth + 1][0].image_size)
                if ext.pos < backing_end:
                    await self.walk(depth + 1, ext.pos, backing_end)
                start = max(ext.pos, backing_end)
                self.emit(start, ext_end - start, depth, present=False, zero=True, data=False)
            else:
                self.emit(ext.pos, ext.length, depth, present=False, zero=True, data=False)


async def map_image(path: str, *, force_share: bool = False) -> list[MapEntry]:
    """The guest mapping of ``path`` through its whole backing chain, like ``qemu-img map``."""
    mode = LockMode.SHARED if force_share else LockMode.READ_ONLY
    image = await open_top(path, read_only=True, lock_mode=mode)
    async with image:
        builder = _MapBuilder(await _chain_layers(image, path))
        pos = 0
        while pos < image.image_size:
            end = min(image.image_size, pos + WINDOW_SIZE)
            await builder.walk(0, pos, end)
            pos = end
        return builder.entries


def map_json(entries: list[MapEntry]) -> str:
    """``qemu-img map --output=json``'s layout: one object per line in a JSON list."""
    import json

    def line(entry: MapEntry) -> str:
        body = ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in entry.to_json().items())
        return "{ " + body + "}"

    return "[" + ",\n".join(line(e) for e in entries) + "]\n"


def map_human(entries: list[MapEntry]) -> str:
    """qemu-img map's table: only ranges with data, with their host offset and file."""

    def hexnum(value: int) -> str:
        return f"{value:#x}" if value else "0"

    lines = [f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File"]
    for e in entries:
        if e.data and not e.zero:
            lines.append(
                f"{hexnum(e.start):<16}{hexnum(e.length):<16}{hexnum(e.offset or 0):<16}"
                f"{e.filename}"
            )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- resize


def parse_resize(text: str, old_size: int) -> int:
    """``SIZE``, ``+SIZE`` (grow by) or ``-SIZE`` (refused: QED cannot shrink)."""
    text = text.strip()
    if text.startswith("+"):
        return old_size + parse_size(text[1:])
    if text.startswith("-"):
        parse_size(text[1:])
        raise UserError("Shrinking images is not supported")
    return parse_size(text)


async def resize(path: str, size_text: str) -> tuple[int, int]:
    """Grow the guest size of ``path``; returns (old size, new size)."""
    image = await open_top(path, read_only=False)
    async with image:
        old_size = image.image_size
        new_size = parse_resize(size_text, old_size)
        limit = image.geometry.qemu_max_image_size
        if new_size > max(old_size, limit) and new_size <= image.geometry.max_image_size:
            # The engine could hold it; QEMU could not open it any more (its limit wraps).
            raise UserError(
                f"Invalid image size specified: {fmt.qemu_size_limit_message(image.geometry)}"
            )
        await image.resize(new_size)
        return old_size, new_size


# ---------------------------------------------------------------------- commit


@dataclass(frozen=True, slots=True)
class CommitResult:
    backing_path: str
    backing_format: str
    bytes_committed: int  # guest bytes of DATA and ZERO clusters copied into the backing


async def commit(path: str, *, progress: Progress | None = None) -> CommitResult:
    """Write the overlay's own data and zero clusters into its backing image.

    The overlay is left as it is (``qemu-img commit -d``); a backing image smaller than the
    overlay is grown first.  Locks are qemu-img commit's: the overlay read-write, a QED
    backing image read-write, a raw one write-shared.
    """
    # qemu-img commit opens the overlay read-write (it would empty it without -d), so a
    # reader of the overlay refuses the commit as it refuses QEMU's
    top = await open_top(path, read_only=True, lock_mode=LockMode.READ_WRITE, with_backing=False)
    async with top:
        stored = await read_backing_name(top.file, top.header)
        if not stored:
            raise UserError(f"Image '{path}' does not have a backing file")
        try:
            backing_path = resolve_backing_name(stored, _absolute(path))
        except BackingFileError as exc:
            raise UserError(f"Could not open backing file of '{path}': {exc}") from exc
        backing_format = "raw" if top.header.backing_is_raw else await detect_format(backing_path)
        changed = _Changed()
        try:
            if backing_format == "qed":
                base = await open_top(backing_path, read_only=False)
                async with base:
                    if base.image_size < top.image_size:
                        changed.started = True
                        await base.resize(round_up_sector(top.image_size))
                    committed = await _commit_runs(
                        top, changed.track(base.write), changed.track(base.write_zeroes), progress
                    )
                    await base.flush()
            else:
                committed = await _commit_to_raw(top, backing_path, progress, changed)
        except (Exception, KeyboardInterrupt) as exc:
            if not changed.started:
                raise
            raise _unfinished_commit(path, backing_path, exc) from exc
    return CommitResult(backing_path, backing_format, committed)


_T = TypeVar("_T")


class _Changed:
    """Whether a commit has started to change its base (from then on, stopping leaves it
    holding part of the overlay's data)."""

    started = False

    def track(
        self, fn: Callable[[int, _T], Awaitable[None]]
    ) -> Callable[[int, _T], Awaitable[None]]:
        async def tracked(pos: int, arg: _T) -> None:
            self.started = True
            await fn(pos, arg)

        return tracked


def _unfinished_commit(path: str, backing_path: str, exc: BaseException) -> UserError:
    if isinstance(exc, KeyboardInterrupt):
        reason, code = "interrupted", 130
    else:
        text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        reason, code = text, exc.exit_code if isinstance(exc, UserError) else 1
    return UserError(
        f"commit into '{backing_path}' did not finish ({reason}): the base may now hold part "
        f"of the overlay's data; run 'qedfuse commit {path}' again to finish it",
        code,
    )


async def _commit_to_raw(
    top: QedImage, backing_path: str, progress: Progress | None, changed: _Changed
) -> int:
    check_path(backing_path, writable=True)
    try:
        out = open_output(backing_path)
    except OSError as exc:
        raise open_failed(backing_path, exc) from exc
    try:
        # a raw base is locked as QEMU's commit job locks it: it writes and may grow the
        # file but, raw having no metadata, shares both with others
        lock(out.fileno(), LockMode.WRITE_SHARED, backing_path)
        base_size = await out.size()
        if base_size < top.image_size:
            if out.is_block_device:
                raise UserError(
                    f"backing device '{backing_path}' holds {base_size} bytes, less than the "
                    f"overlay's {top.image_size}; a block device cannot grow"
                )
            changed.started = True
            await out.ftruncate(top.image_size)
        committed = await _commit_runs(
            top, changed.track(out.pwrite), changed.track(out.write_zeroes), progress
        )
        await out.fdatasync()
        return committed
    finally:
        await out.aclose()


async def _commit_runs(
    top: QedImage,
    write: Callable[[int, bytes], Awaitable[None]],
    write_zeroes: Callable[[int, int], Awaitable[None]],
    progress: Progress | None,
) -> int:
    committed = 0
    size = top.image_size
    window = 0
    while window < size:
        window_end = min(size, window + WINDOW_SIZE)
        for ext in await top.extents(window, window_end - window):
            if ext.kind is Kind.DATA:
                pos = ext.pos
                end = ext.pos + ext.length
                while pos < end:
                    n = min(end - pos, CHUNK_SIZE - pos % CHUNK_SIZE)
                    await write(pos, await top.read(pos, n))
                    pos += n
                committed += ext.length
            elif ext.kind is Kind.ZERO:
                await write_zeroes(ext.pos, ext.length)
                committed += ext.length
            if progress is not None:
                progress(ext.pos + ext.length, size)
        window = window_end
    return committed


__all__ = [
    "CHUNK_SIZE",
    "CommitResult",
    "ConvertResult",
    "CreateOptions",
    "CreateResult",
    "ImageInfo",
    "MapEntry",
    "check",
    "commit",
    "convert",
    "create",
    "feature_names",
    "human_size",
    "info",
    "map_human",
    "map_image",
    "map_json",
    "parse_create_options",
    "parse_resize",
    "parse_size",
    "resize",
    "round_up_sector",
]
