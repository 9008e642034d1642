"""Opening images by path: the backing chain, its safety policy, and locks.

Backing files named in an image are followed by default (overlays are QED's main use), but:

* never through a protocol or ``json:`` prefix (``nbd:…``, ``file:…``, ``json:{…}``);
* never in a loop, and never deeper than :data:`MAX_CHAIN_DEPTH` levels;
* always opened read-only and locked as QEMU 7.2 locks a backing file: a QED backing image
  holds consistent read and shares neither write nor resize (bytes 100, 201, 203, because its
  tables are metadata), a raw one only holds consistent read (byte 100); a force-share open
  (``-U``) holds only byte 100 on every level;
* every file is opened by :func:`~qedfuse.imagefile.open_file`: a regular file or a block
  device, never a FIFO, directory, socket or character device (refused before any read);
  a QED image on a block device opens read-only only (it cannot grow);
* relative names resolve against the directory of the image that names them;
* the backing format is raw when the image says so (NO_PROBE), else QED when the file starts
  with the QED magic, else raw (any other image format is refused rather than misread);
* :attr:`BackingPolicy.allow` = False (the ``untrusted`` mount option) refuses any backing
  file, and :attr:`BackingPolicy.override` replaces the stored name (``-o backing=PATH``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace

from qedfuse import format as fmt
from qedfuse.engine import GuestSource, OpenOptions, QedImage, open_image
from qedfuse.errors import BackingFileError, LockError, QedError
from qedfuse.imagefile import BlockFile, FileImage, open_file
from qedfuse.locking import LockMode, lock_image
from qedfuse.tables import read_backing_name

MAX_CHAIN_DEPTH = 16
_PROTOCOL_RE = re.compile(rb"^[A-Za-z][A-Za-z0-9+.\-]*:")


@dataclass(frozen=True, slots=True)
class BackingPolicy:
    """What backing files an open may follow."""

    allow: bool = True
    override: str | None = None
    #: Format of the override (or of every backing file): "raw", "qed" or None to detect.
    override_format: str | None = None
    max_depth: int = MAX_CHAIN_DEPTH


class RawImage:
    """A raw backing image: a plain file read as guest bytes."""

    def __init__(self, file: BlockFile, image_size: int) -> None:
        self.file = file
        self._image_size = image_size

    @property
    def image_size(self) -> int:
        return self._image_size

    async def read_padded(self, pos: int, size: int) -> bytes:
        if pos >= self._image_size:
            return bytes(size)
        data = await self.file.pread(pos, min(size, self._image_size - pos))
        return data + bytes(size - len(data)) if len(data) < size else data

    async def aclose(self) -> None:
        await self.file.aclose()


def resolve_backing_name(name: bytes, image_path: str) -> str:
    """Turn a stored backing name into a path, refusing protocol and json: names."""
    if b"\0" in name:
        raise BackingFileError("backing file name contains a NUL byte")
    if _PROTOCOL_RE.match(name) and not name.startswith(b"/"):
        shown = name[:40].decode("utf-8", "replace")
        raise BackingFileError(f"backing file name {shown!r} uses a protocol prefix; refused")
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        raise BackingFileError("backing file name is not valid UTF-8") from None
    if os.path.isabs(text):
        return os.path.normpath(text)
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(image_path)), text))


def _absolute(path: str) -> str:
    return os.path.abspath(path)


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


async def _detect_format(file: BlockFile) -> str:
    detected = fmt.probe_format(await file.pread(0, 8))
    if detected not in ("qed", "raw"):
        raise BackingFileError(
            f"backing file is a {detected} image; only raw and QED are supported"
        )
    return detected


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
        from qedfuse.tables import read_header

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
        fd = _open_fd(path, read_only=True, what="Could not open backing file: ")
        probe = FileImage(fd, read_only=True)
        try:
            detected = await _detect_format(probe)
        finally:
            await probe.aclose()
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
            from qedfuse.tables import read_header

            header, _, _ = await read_header(file)
            name = await read_backing_name(file, header)
            if not name:
                break
            nxt = resolve_backing_name(name, current)
            if header.backing_is_raw:
                fmt_name = "raw"
            else:
                nfd = _open_fd(nxt, read_only=True, what="Could not open backing file: ")
                nfile = FileImage(nfd, read_only=True)
                try:
                    fmt_name = await _detect_format(nfile)
                finally:
                    await nfile.aclose()
            current = nxt
        finally:
            await file.aclose()
    return chain


async def lock_backing_chain(path: str, *, force_share: bool) -> list[FileImage]:
    """Lock every backing file below ``path`` as opening the chain would, without opening it.

    For commands that work on one file but whose QEMU counterpart opens the whole chain
    (``check``): they must be refused by a writer of a QED backing file as QEMU is.  The walk
    stops quietly where the chain cannot be followed (missing or refused name, not a regular
    file or block device, a loop, too deep, a bad header): the command does not need it.
    Only a lock conflict is an error.  Returns the locked files; the caller closes them.
    """
    from qedfuse.tables import read_header

    files: list[FileImage] = []
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
            level_format = "raw" if raw else await _detect_format(file)
            shared = force_share or level_format == "raw"
            lock_image(fd, LockMode.SHARED if shared else LockMode.READ_ONLY, level)
            if level_format == "raw":
                break
            header, _, _ = await read_header(file)
            name, raw = await read_backing_name(file, header), header.backing_is_raw
            current = level
    except LockError:
        for file in files:
            await file.aclose()
        raise
    except (QedError, OSError):
        pass  # the rest of the chain cannot be followed: nothing more to lock
    except BaseException:
        for file in files:
            await file.aclose()
        raise
    return files


__all__ = [
    "MAX_CHAIN_DEPTH",
    "BackingPolicy",
    "RawImage",
    "backing_chain",
    "lock_backing_chain",
    "open_path",
    "resolve_backing_name",
]
