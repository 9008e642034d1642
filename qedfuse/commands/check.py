"""``qedfuse check``: the command around :func:`qedfuse.check.check_image` (opening and
locking the image and its chain, turning failures into user errors)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qedfuse.errors import QedError, UserError
from qedfuse.imagefile import BlockFile
from qedfuse.locking import LockMode
from qedfuse.opening import lock_backing_chain, open_failed, open_locked
from qedfuse.tables import read_header

if TYPE_CHECKING:
    from qedfuse.check import CheckReport, DuplicateMode


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
