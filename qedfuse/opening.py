"""The composition root: a path becomes an open file, a locked chain and a ready engine.

Everything that opens an image for a user goes through here, and nothing above this module
names the concrete file class (:class:`~qedfuse.imagefile.FileImage`):

* **Files** (:func:`open_locked`, :func:`open_output`, :func:`adopt_fd`): a regular file or
  a block device only, through the I/O seam; never a FIFO, directory, socket or character
  device.
* **An engine on a file** (:func:`open_image`): when a read-write open finds NEED_CHECK set,
  check-and-repair runs first (as in QEMU), and corruptions a repair could not remove put
  the engine in failsafe (unlike QEMU: docs/qemu-differences.md#bug-j).
* **A chain** (:func:`open_path`): the image, its backing files by the policy of
  :mod:`qedfuse.backing` (never a protocol name, a loop, or too deep; always read-only),
  QEMU's lock bytes on every level; :func:`backing_chain` and :func:`lock_backing_chain`
  walk a chain without opening engines (``info``, ``check``).
* **The offline commands' openers** (:func:`open_top`, :func:`open_raw`,
  :func:`detect_format`, :func:`check_path`): the same, with qemu-img's wording
  (``Could not open 'x.qed': …``) and its ``-U`` hint on a lock conflict.
* **The mount's opener** (:func:`open_for_mount`, :func:`create_overlay`,
  :func:`with_read_only_hint`): options to policy, ``--overlay`` creation.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from dataclasses import replace
from typing import TYPE_CHECKING, Final

from qedfuse import format as fmt
from qedfuse.backing import MAX_CHAIN_DEPTH, BackingPolicy, RawImage, resolve_backing_name
from qedfuse.check import check_image
from qedfuse.engine import GuestSource, OpenOptions, QedImage, load_image
from qedfuse.errors import (
    BackingFileError,
    CorruptionError,
    LockError,
    QedError,
    UserError,
    one_line,
)
from qedfuse.imagefile import BlockFile, FileImage, OutputFile, open_file
from qedfuse.locking import LockMode, lock_image, with_hint
from qedfuse.tables import create_image, read_backing_name, read_header

if TYPE_CHECKING:
    from qedfuse.options import MountOptions

log = logging.getLogger(__name__)

#: What a read-only command (info, map, check, convert's source) suggests on a lock conflict.
FORCE_SHARE_HINT: Final = "Use -U (force-share) to read it anyway."
#: What a read-write mount refused by a lock or by permissions suggests (when it would work).
READ_ONLY_HINT: Final = "Mount it with -o ro to share it read-only."


# ---------------------------------------------------------------------- files
def _absolute(path: str) -> str:
    """``os.path.abspath``: string work and one ``getcwd``, never a wait on a disk."""
    return os.path.abspath(path)


def open_output(path: str) -> OutputFile:
    """Open an existing file (or block device) to write guest bytes to, read-write."""
    return FileImage.open(path, read_only=False)


def adopt_fd(fd: int, *, path: str | None = None, unnamed: bool = False) -> OutputFile:
    """Wrap, read-write, an fd the caller created itself (the result owns it); ``unnamed``:
    an ``O_TMPFILE`` file, which has no name until the caller links it."""
    return FileImage(fd, read_only=False, path=path, unnamed=unnamed)


def file_identity(file: BlockFile) -> tuple[int, int] | None:
    """(st_dev, st_ino) of an open host file; None for one in memory."""
    st = file.stat()
    return None if st is None else st.identity


# ---------------------------------------------------------------------- an engine on a file


async def open_image(
    file: BlockFile,
    *,
    read_only: bool | None = None,
    backing: GuestSource | None = None,
    options: OpenOptions | None = None,
) -> QedImage:
    """Open a QED image on ``file``, repairing it first when a read-write open finds it dirty.

    A read-only open never writes.  The caller opens the backing image (see
    :func:`open_path`).  With ``options.repair_on_open`` off, a dirty image opens as it is.
    """
    options = options or OpenOptions()
    if read_only is None:
        read_only = file.read_only
    unrepaired = 0
    if not read_only and options.repair_on_open:
        header, _, _ = await read_header(file)
        if header.need_check:
            report = await check_image(file, repair=True)
            if report.check_errors:
                # QEMU's answer too: never serve writes on an image whose check did not finish.
                raise CorruptionError(
                    f"Image corrupted: the check could not complete ({report.summary_line()})"
                )
            log.warning("image had NEED_CHECK set; repaired on open: %s", report.summary_line())
            unrepaired = report.corruptions
    image = await load_image(file, read_only=read_only, backing=backing, options=options)
    if unrepaired:
        # Unlike QEMU (docs/qemu-differences.md#bug-j): keep NEED_CHECK set (no flush will clear
        # it) and refuse writes.
        image.enter_failsafe(f"{unrepaired} corruptions remain after the open-time repair")
    return image


# ---------------------------------------------------------------------- chains


def _open_fd(path: str, *, read_only: bool, what: str, growable: bool = False) -> int:
    try:
        return open_file(path, read_only=read_only, growable=growable)
    except OSError as exc:
        error = BackingFileError if what else QedError
        raise error(f"{what}Could not open '{path}': {exc.strerror}") from exc


def _claim(fd: int, path: str, seen: set[tuple[int, int]], lock_mode: LockMode | None) -> None:
    """Refuse a file already in the chain (a loop), then take its QEMU lock bytes."""
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) in seen:
        raise BackingFileError(f"backing chain loops back to '{path}'")
    seen.add((st.st_dev, st.st_ino))
    if lock_mode is not None:
        lock_image(fd, lock_mode, path)


async def _backing_format(file: BlockFile) -> str:
    detected = fmt.probe_format(await file.pread(0, 8))
    if detected not in ("qed", "raw"):
        raise BackingFileError(
            f"backing file is a {detected} image; only raw and QED are supported"
        )
    return detected


async def _probe_backing(path: str) -> str:
    """The format of the backing file at ``path`` (opened, probed and closed)."""
    probe = FileImage(
        _open_fd(path, read_only=True, what="Could not open backing file: "), read_only=True
    )
    try:
        return await _backing_format(probe)
    finally:
        await probe.aclose()


async def open_path(
    path: str,
    *,
    read_only: bool,
    options: OpenOptions | None = None,
    policy: BackingPolicy | None = None,
    lock: bool = True,
    lock_mode: LockMode | None = None,
    threaded_io: bool = False,
) -> QedImage:
    """Open the QED image at ``path`` and its backing chain."""
    return await _open_qed(
        _absolute(path),
        read_only=read_only,
        options=options or OpenOptions(),
        policy=policy or BackingPolicy(),
        lock=lock,
        lock_mode=lock_mode or (LockMode.READ_ONLY if read_only else LockMode.READ_WRITE),
        threaded_io=threaded_io,
        seen=set(),
        depth=0,
    )


async def _open_qed(
    path: str,
    *,
    read_only: bool,
    options: OpenOptions,
    policy: BackingPolicy,
    lock: bool,
    lock_mode: LockMode,
    threaded_io: bool,
    seen: set[tuple[int, int]],
    depth: int,
) -> QedImage:
    what = "" if depth == 0 else "Could not open backing file: "
    fd = _open_fd(path, read_only=read_only, what=what, growable=not read_only)
    file = FileImage(fd, read_only=read_only, threaded_io=threaded_io, path=path)
    backing: GuestSource | None = None
    try:
        _claim(fd, path, seen, lock_mode if lock else None)
        header, _, _ = await read_header(file)
        name = await read_backing_name(file, header)
        target: tuple[str, str | None] | None = None
        if policy.override is not None and depth == 0:
            target = _absolute(policy.override), policy.override_format
        elif name:
            if not policy.allow:
                raise BackingFileError(
                    f"image names a backing file ({name[:60].decode('utf-8', 'replace')!r}) "
                    "and backing files are refused (untrusted)"
                )
            raw = "raw" if header.backing_is_raw else policy.override_format
            target = resolve_backing_name(name, path), raw
        if target is not None:
            backing = await _open_backing(
                *target,
                options=options,
                policy=policy,
                lock=lock,
                force_share=lock_mode is LockMode.SHARED,
                threaded_io=threaded_io,
                seen=seen,
                depth=depth + 1,
            )
        return await open_image(file, read_only=read_only, backing=backing, options=options)
    except BaseException:
        if backing is not None:
            await backing.aclose()
        await file.aclose()
        raise


async def _open_backing(
    path: str,
    format_name: str | None,
    *,
    options: OpenOptions,
    policy: BackingPolicy,
    lock: bool,
    force_share: bool,
    threaded_io: bool,
    seen: set[tuple[int, int]],
    depth: int,
) -> GuestSource:
    if depth > policy.max_depth:
        raise BackingFileError(f"backing chain is deeper than {policy.max_depth} levels")
    if format_name not in (None, "raw", "qed"):
        raise BackingFileError(f"unsupported backing format {format_name!r}")
    if format_name != "raw":
        detected = await _probe_backing(path)
        if format_name == "qed" and detected != "qed":
            raise BackingFileError(f"backing file '{path}' is not a QED image")
        format_name = detected
    if format_name == "qed":
        return await _open_qed(
            path,
            read_only=True,
            options=replace(options, repair_on_open=False),
            policy=policy,
            lock=lock,
            lock_mode=LockMode.SHARED if force_share else LockMode.READ_ONLY,
            threaded_io=threaded_io,
            seen=seen,
            depth=depth,
        )
    fd = _open_fd(path, read_only=True, what="Could not open backing file: ")
    file = FileImage(fd, read_only=True, threaded_io=threaded_io)
    try:
        _claim(fd, path, seen, LockMode.SHARED if lock else None)
        return RawImage(file, await file.size())
    except BaseException:
        await file.aclose()
        raise


async def backing_chain(path: str) -> list[tuple[str, str]]:
    """[(path, format), …] of ``path``'s chain without opening the engine (for ``info``)."""
    chain: list[tuple[str, str]] = []
    current: str | None = _absolute(path)
    fmt_name = "qed"
    seen: set[tuple[int, int]] = set()
    while current is not None:
        if len(chain) > MAX_CHAIN_DEPTH:
            raise BackingFileError(f"backing chain is deeper than {MAX_CHAIN_DEPTH} levels")
        what = "" if not chain else "Could not open backing file: "
        fd = _open_fd(current, read_only=True, what=what)
        file = FileImage(fd, read_only=True)
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) in seen:
                raise BackingFileError(f"backing chain loops back to '{current}'")
            seen.add((st.st_dev, st.st_ino))
            chain.append((current, fmt_name))
            if fmt_name != "qed":
                break
            header, _, _ = await read_header(file)
            name = await read_backing_name(file, header)
            if not name:
                break
            nxt = resolve_backing_name(name, current)
            if header.backing_is_raw:
                fmt_name = "raw"
            else:
                fmt_name = await _probe_backing(nxt)
            current = nxt
        finally:
            await file.aclose()
    return chain


async def lock_backing_chain(path: str, *, force_share: bool) -> list[BlockFile]:
    """Lock every backing file below ``path`` as opening the chain would, without opening it.

    For commands that work on one file but whose QEMU counterpart opens the whole chain
    (``check``): they must be refused by a writer of a QED backing file as QEMU is.  The walk
    stops quietly where the chain cannot be followed (missing or refused name, not a regular
    file or block device, a loop, too deep, a bad header): the command does not need it.
    Only a lock conflict is an error.  Returns the locked files; the caller closes them.
    """
    files: list[BlockFile] = []
    seen: set[tuple[int, int]] = set()
    current = _absolute(path)
    try:
        top = FileImage(_open_fd(current, read_only=True, what=""), read_only=True)
        try:
            st = os.fstat(top.fd)
            seen.add((st.st_dev, st.st_ino))
            header, _, _ = await read_header(top)
            name, raw = await read_backing_name(top, header), header.backing_is_raw
        finally:
            await top.aclose()
        while name and len(files) < MAX_CHAIN_DEPTH:
            level = resolve_backing_name(name, current)
            fd = open_file(level, read_only=True)  # a regular file or block device; never blocks
            file = FileImage(fd, read_only=True)
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) in seen:
                await file.aclose()
                break
            seen.add((st.st_dev, st.st_ino))
            files.append(file)
            level_format = "raw" if raw else await _backing_format(file)
            shared = force_share or level_format == "raw"
            lock_image(fd, LockMode.SHARED if shared else LockMode.READ_ONLY, level)
            if level_format == "raw":
                break
            header, _, _ = await read_header(file)
            name, raw = await read_backing_name(file, header), header.backing_is_raw
            current = level
    except LockError:
        for locked in files:
            await locked.aclose()
        raise
    except (QedError, OSError):
        pass  # the rest of the chain cannot be followed: nothing more to lock
    except BaseException:
        for locked in files:
            await locked.aclose()
        raise
    return files


# ---------------------------------------------------------------------- the offline commands


def check_path(path: str, *, writable: bool, growable: bool = False) -> None:
    """Fail like qemu-img (``Could not open 'x': No such file or directory``) before opening;
    also refuses anything but a regular file or block device (:func:`open_file`)."""
    try:
        os.close(open_file(path, read_only=not writable, growable=growable))
    except OSError as exc:
        raise UserError(f"Could not open '{path}': {exc.strerror or exc}") from exc


def lock(fd: int, mode: LockMode, path: str) -> None:
    """QEMU's lock bytes on ``fd`` (the path only names the image in a conflict message)."""
    lock_image(fd, mode, _absolute(path))


def open_failed(path: str, exc: Exception, *, hint_force_share: bool = False) -> UserError:
    """``Could not open 'path': …``; a lock conflict of a command that has ``-U`` says so."""
    if hint_force_share and isinstance(exc, LockError):
        exc = with_hint(exc, LockMode.SHARED, FORCE_SHARE_HINT)
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return UserError(f"Could not open '{path}': {text}")


async def open_top(
    path: str,
    *,
    read_only: bool,
    lock_mode: LockMode | None = None,
    with_backing: bool = True,
) -> QedImage:
    """Open a QED image for a command; errors read ``Could not open 'path': …``.

    Without ``with_backing`` only the image itself is opened (like qemu-img's
    ``BDRV_O_NO_BACKING``), so ``info`` works on an overlay whose backing file is missing.
    """
    mode = lock_mode or (LockMode.READ_ONLY if read_only else LockMode.READ_WRITE)
    if not with_backing:
        file = await open_locked(path, writable=not read_only, lock_mode=mode)
        try:
            return await open_image(file, read_only=read_only)
        except BaseException as exc:
            await file.aclose()
            if isinstance(exc, (QedError, OSError)):
                raise open_failed(path, exc) from exc
            raise
    check_path(path, writable=not read_only, growable=not read_only)
    try:
        return await open_path(path, read_only=read_only, lock_mode=mode)
    except (QedError, OSError) as exc:
        hint = read_only and mode is LockMode.READ_ONLY
        raise open_failed(path, exc, hint_force_share=hint) from exc


async def open_locked(path: str, *, writable: bool, lock_mode: LockMode) -> BlockFile:
    """Open and lock one file for a command that works on the file itself (``check``,
    ``commit``'s raw base); errors read ``Could not open 'path': …``."""
    check_path(path, writable=writable, growable=writable)
    try:
        file = FileImage.open(path, read_only=not writable, growable=writable)
    except OSError as exc:
        raise open_failed(path, exc) from exc
    try:
        lock(file.fd, lock_mode, path)
    except BaseException as exc:
        await file.aclose()
        if isinstance(exc, (QedError, OSError)):
            hint = lock_mode is LockMode.READ_ONLY
            raise open_failed(path, exc, hint_force_share=hint) from exc
        raise
    return file


async def open_raw(path: str, *, lock_mode: LockMode) -> RawImage:
    """A raw image (read-only) for a command: convert's source, create's raw backing."""
    file = await open_locked(path, writable=False, lock_mode=lock_mode)
    try:
        return RawImage(file, await file.size())
    except BaseException as exc:
        await file.aclose()
        if isinstance(exc, (QedError, OSError)):
            raise open_failed(path, exc) from exc
        raise


async def detect_format(path: str) -> str:
    """``qed`` or ``raw`` from the first bytes of ``path``; other image formats are refused."""
    check_path(path, writable=False)
    try:
        probe = FileImage.open(path, read_only=True)
    except OSError as exc:
        raise open_failed(path, exc) from exc
    try:
        magic = await probe.pread(0, 8)
    finally:
        await probe.aclose()
    detected = fmt.probe_format(magic)
    if detected not in ("qed", "raw"):
        raise UserError(
            f"'{path}' is a {detected} image; only raw and qed are supported (convert it with "
            f"qemu-img first, or pass -f raw to read it as raw bytes)"
        )
    return detected


# ---------------------------------------------------------------------- the mount


async def open_for_mount(image_path: str, opts: MountOptions) -> QedImage:
    """Open a mount's image and chain as its ``-o`` options say."""
    return await open_path(
        image_path,
        read_only=opts.read_only,
        options=OpenOptions(detect_zeroes=opts.detect_zeroes),
        policy=BackingPolicy(allow=not opts.untrusted, override=opts.backing),
        lock=True,
    )


def with_read_only_hint(exc: Exception, *, read_only: bool) -> Exception:
    """Suggest ``-o ro`` where it helps a read-write mount: a reader's lock on the image, or
    no write access (never for a backing file, whose access is read-only anyway)."""
    if read_only:
        return exc
    if isinstance(exc, LockError):
        return with_hint(exc, LockMode.READ_ONLY, READ_ONLY_HINT)
    cause = exc if isinstance(exc, OSError) else exc.__cause__
    refused = isinstance(cause, OSError) and cause.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
    if refused and not isinstance(exc, BackingFileError):
        return QedError(f"{one_line(exc)}. Mount it with -o ro to open it read-only.")
    return exc


def overlay_backing_name(new_path: str, base_path: str) -> str:
    """The backing name stored in an overlay: ``base_path`` relative to the overlay's directory."""
    name = os.path.relpath(base_path, os.path.dirname(new_path))
    if ":" in name.split("/", 1)[0]:
        name = "./" + name  # a relative name must never look like a protocol prefix
    if len(os.fsencode(name)) > fmt.MAX_BACKING_NAME_SIZE:
        # Too long to store (QEMU reads at most 4095 bytes): the absolute path may be shorter;
        # if it is not either, creating the overlay refuses it with a one-line error.
        absolute = _absolute(base_path)
        if len(os.fsencode(absolute)) < len(os.fsencode(name)):
            return absolute
    return name


async def create_overlay(new_path: str, base_path: str) -> None:
    """Create ``new_path`` (must not exist) as an empty QED overlay of ``base_path``.

    Raises :class:`~qedfuse.errors.UserError` with a one-line reason.
    """
    try:
        base = FileImage.open(base_path, read_only=True)
    except OSError as exc:
        raise UserError(f"Could not open '{base_path}': {exc.strerror}") from None
    try:
        detected = fmt.probe_format(await base.pread(0, 8))
        if detected == "qed":
            header, _, _ = await read_header(base)
            size, raw = header.image_size, False
        elif detected == "raw":
            size = -(-(await base.size()) // fmt.SECTOR_SIZE) * fmt.SECTOR_SIZE
            raw = True
        else:
            raise UserError(
                f"{base_path} is a {detected} image; an overlay base must be raw or QED"
            )
    finally:
        await base.aclose()
    if size == 0:
        raise UserError(f"{base_path} is empty; nothing to overlay")
    name = overlay_backing_name(new_path, base_path)
    try:
        fd = os.open(new_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        raise UserError(f"overlay {new_path} already exists; refusing to overwrite it") from None
    except OSError as exc:
        raise UserError(f"cannot create overlay {new_path}: {exc.strerror}") from None
    file = FileImage(fd, read_only=False)
    try:
        await create_image(file, size, backing_name=os.fsencode(name), backing_raw=raw)
    except BaseException:
        await file.aclose()
        with contextlib.suppress(OSError):
            os.unlink(new_path)
        raise
    await file.aclose()
    log.info("created overlay %s on %s (%s, %d bytes)", new_path, base_path, name, size)


__all__ = [
    "FORCE_SHARE_HINT",
    "READ_ONLY_HINT",
    "adopt_fd",
    "backing_chain",
    "check_path",
    "create_overlay",
    "detect_format",
    "file_identity",
    "lock",
    "lock_backing_chain",
    "open_failed",
    "open_for_mount",
    "open_image",
    "open_locked",
    "open_output",
    "open_path",
    "open_raw",
    "open_top",
    "overlay_backing_name",
    "with_read_only_hint",
]
