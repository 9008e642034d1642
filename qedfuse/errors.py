"""The qedfuse error hierarchy.

Every error a user can cause (bad image, bad argument, bad option) is a :class:`QedError`
subclass whose ``str()`` is one complete line, fit to print after ``qedfuse: ``.  Only
``fs.py`` turns these into errnos for the kernel.
"""

from __future__ import annotations

import errno


class QedError(Exception):
    """Base class of every expected qedfuse failure; ``errno`` is what FUSE answers."""

    errno: int = errno.EIO


class FormatError(QedError):
    """The header is not a usable QED header (the message says which rule failed)."""

    errno = errno.EINVAL


class UnsupportedFeatureError(FormatError):
    """The image uses an incompatible feature bit qedfuse does not know."""

    errno = errno.ENOTSUP


class LimitError(FormatError):
    """The image is valid QED but exceeds one of qedfuse's resource limits."""


class CorruptionError(QedError):
    """A table entry is invalid: misaligned, outside the file, or pointing into metadata."""

    errno = errno.EIO


class ReadOnlyError(QedError):
    """A write was attempted on an image opened read-only."""

    errno = errno.EROFS


class FailsafeError(QedError):
    """The engine stopped accepting writes after an error it could not roll back."""

    errno = errno.EIO


class OutOfRangeError(QedError):
    """A write or resize past what the image (or its geometry) can hold."""

    errno = errno.ENOSPC


class BackingFileError(QedError):
    """A backing file is refused by policy or cannot be opened."""

    errno = errno.EINVAL


class LockError(QedError):
    """Another process holds a conflicting QEMU-style image lock."""

    errno = errno.EAGAIN
