"""``qedfuse convert`` and ``qedfuse commit``: copying guest data, in bounded chunks and
skipping what reads as zero, into a new image or file (convert) or into the backing image
(commit)."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, TypeVar

import trio

from qedfuse import format as fmt
from qedfuse.backing import RawImage, resolve_backing_name
from qedfuse.commands.common import (
    CHUNK_SIZE,
    WINDOW_SIZE,
    Progress,
    absolute,
    create_target,
    create_temp,
    durable_replace,
    file_ids,
    round_up_sector,
    temp_name,
    unlink_quietly,
)
from qedfuse.engine import GuestSource, Kind, OpenOptions, QedImage
from qedfuse.errors import BackingFileError, QedError, UsageError, UserError
from qedfuse.imagefile import OutputFile
from qedfuse.locking import LockMode
from qedfuse.opening import (
    adopt_fd,
    check_path,
    detect_format,
    lock,
    open_failed,
    open_image,
    open_output,
    open_raw,
    open_top,
)
from qedfuse.tables import create_image, read_backing_name

#: Granularity of zero detection for sparse raw output (qemu-img convert's default -S).
SPARSE_BLOCK_SIZE: Final = 4096
_ZEROS: Final = bytes(max(CHUNK_SIZE, fmt.MAX_CLUSTER_SIZE))


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
        fd, created = create_target(dst, force=force, allow_device=dst_format == "raw")
        # One try for everything after the target exists, so that wherever an error or a
        # Ctrl-C lands, a temporary file is removed and a file we created is deleted.
        temp_path: str | None = None
        temp_fd = -1
        temp_named = False
        link_fd = -1  # an unnamed temporary file, held open for linking (the engine closes its own)
        renamed = device = in_place = False
        out: OutputFile | None = None
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) in file_ids(source):
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
                temp_path, final = temp_name(dst)
                try:
                    temp_fd, temp_named = create_temp(dst, temp_path, st)
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
            if temp_path is not None and not temp_named:
                link_fd = os.dup(temp_fd)
            out = adopt_fd(fd if temp_path is None else temp_fd, unnamed=link_fd >= 0)
            if in_place:
                written = await _convert_to_device(source, out, progress)
            elif dst_format == "raw":
                written = await _convert_to_raw(source, out, progress)
            else:
                written = await _convert_to_qed(
                    source, out, size, cluster_size, table_size, progress
                )
            if temp_path is not None:
                await durable_replace(
                    temp_path, final, unnamed_fd=link_fd if link_fd >= 0 else None
                )
                renamed = True
        except BaseException as exc:
            if temp_path is not None and not renamed:
                unlink_quietly(temp_path)
            elif created:
                unlink_quietly(dst)
            if isinstance(exc, OSError):
                partly = " (the target now holds part of the image)" if in_place else ""
                raise UserError(
                    f"{dst}: error while writing: {exc.strerror or exc}{partly}"
                ) from exc
            raise
        finally:
            if link_fd >= 0:
                os.close(link_fd)
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
            backing_path = resolve_backing_name(stored, absolute(path))
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
