"""``qedfuse create`` (an empty image, optionally on a backing image) and ``qedfuse resize``
(grow the guest size)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from qedfuse import format as fmt
from qedfuse.backing import resolve_backing_name
from qedfuse.commands.common import create_target, parse_size, round_up_sector, unlink_quietly
from qedfuse.errors import BackingFileError, QedError, UsageError, UserError
from qedfuse.locking import LockMode
from qedfuse.opening import adopt_fd, detect_format, lock, open_raw, open_top
from qedfuse.tables import create_image

# ---------------------------------------------------------------------- create


@dataclass(frozen=True, slots=True)
class CreateResult:
    path: str
    image_size: int
    cluster_size: int
    table_size: int
    backing_name: str | None
    backing_format: str | None


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
    fd, created = create_target(path, force=force)
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
            unlink_quietly(path)
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
