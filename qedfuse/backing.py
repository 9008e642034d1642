"""The backing chain's safety policy, name resolution, and the raw backing image.

:mod:`qedfuse.opening` opens a chain by these rules.  Backing files named in an image are
followed by default (overlays are QED's main use), but:

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
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qedfuse.errors import BackingFileError

if TYPE_CHECKING:
    from qedfuse.imagefile import BlockFile

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


__all__ = [
    "MAX_CHAIN_DEPTH",
    "BackingPolicy",
    "RawImage",
    "resolve_backing_name",
]
