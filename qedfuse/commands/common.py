"""What the offline commands share: sizes and ``-o`` parsing, the progress callback, the
copy and window sizes, walking an open chain, and the target files convert and create write
(create it refusing a non-empty file, a temporary beside it, the durable rename, cleanup).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Final

import trio

from qedfuse import format as fmt
from qedfuse.backing import RawImage
from qedfuse.engine import GuestSource, QedImage
from qedfuse.errors import UsageError, UserError
from qedfuse.imagefile import open_file
from qedfuse.opening import file_identity
from qedfuse.tables import read_backing_name

#: Bytes read or written at once by convert and commit (bounded memory).
CHUNK_SIZE: Final = 4 * 1024 * 1024
#: Guest bytes whose mapping is listed at once (bounds the extent lists of huge images).
WINDOW_SIZE: Final = 1 << 30
_MAX_SIZE: Final = (1 << 63) - 1

#: Progress callback: (bytes done, bytes total).
Progress = Callable[[int, int], None]


# ---------------------------------------------------------------------- sizes and options

_SIZE_RE: Final = re.compile(
    r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([bkmgtpe]?)$", re.IGNORECASE | re.ASCII
)
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
        if not value.isascii():  # int() also takes other scripts' digits
            raise ValueError(value)
        return int(value, 0)
    except ValueError:
        raise UsageError(f"option {key!r}: {value!r} is not a number") from None


# ---------------------------------------------------------------------- paths and chains


def absolute(path: str) -> str:
    """``os.path.abspath``: string work and one ``getcwd``, never a wait on a disk."""
    return os.path.abspath(path)


async def chain_layers(top: QedImage, top_name: str) -> list[tuple[GuestSource, str]]:
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


def file_ids(top: GuestSource) -> set[tuple[int, int]]:
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


# ---------------------------------------------------------------------- target files


def create_target(path: str, *, force: bool, allow_device: bool = False) -> tuple[int, bool]:
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


def temp_name(dst: str) -> tuple[str, str]:
    """(temporary path, final path) for replacing ``dst``: the final path has its symlinks
    resolved (a symlink stays, the file it names is replaced), the temporary name is fresh
    and in the same directory (so the rename is atomic)."""
    final = os.path.realpath(dst)
    directory, name = os.path.split(final)
    return os.path.join(directory, f".{name}.{secrets.token_hex(4)}.qedfuse-tmp"), final


def create_temp(dst: str, temp_path: str, like: os.stat_result) -> tuple[int, bool]:
    """A file to write ``dst``'s replacement into, with the mode (and owner, where allowed) of
    the file it replaces: (fd, named).

    Where the filesystem allows, the file has no name until :func:`durable_replace` links it
    (``O_TMPFILE``), so a run killed even by SIGKILL leaves nothing behind; elsewhere it is
    created at ``temp_path`` (and removed by the caller on an error).
    """
    try:
        try:
            directory = os.path.dirname(temp_path)
            fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
            named = False
        except OSError as exc:
            if exc.errno not in _NO_TMPFILE:
                raise
            fd = os.open(temp_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            named = True
    except OSError as exc:
        raise UserError(f"{dst}: cannot create a temporary file beside it: {exc.strerror}") from exc
    try:
        os.fchmod(fd, stat.S_IMODE(like.st_mode))
        if (like.st_uid, like.st_gid) != (os.getuid(), os.getgid()):
            with contextlib.suppress(OSError):
                os.fchown(fd, like.st_uid, like.st_gid)
    except BaseException:
        os.close(fd)
        if named:
            unlink_quietly(temp_path)
        raise
    return fd, named


#: What open(O_TMPFILE) fails with where the filesystem (or kernel) has no unnamed files.
_NO_TMPFILE: Final = frozenset({errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOSYS})


async def durable_replace(temp: str, final: str, *, unnamed_fd: int | None = None) -> None:
    """Rename ``temp`` over ``final`` and make the rename durable (fsync the directory).

    With ``unnamed_fd`` (an ``O_TMPFILE`` file), the file is first linked at ``temp``: only
    between that link and the rename could a SIGKILL leave it behind.
    """
    if unnamed_fd is not None:
        # linkat(AT_SYMLINK_FOLLOW) through /proc/self/fd: needs no privilege, unlike
        # AT_EMPTY_PATH (a plain link() would link the /proc symlink itself: EXDEV)
        proc_fd = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.link(str(unnamed_fd), temp, src_dir_fd=proc_fd, follow_symlinks=True)
        finally:
            os.close(proc_fd)
    os.replace(temp, final)
    dir_fd = os.open(os.path.dirname(final), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        await trio.to_thread.run_sync(os.fsync, dir_fd)
    finally:
        os.close(dir_fd)


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
