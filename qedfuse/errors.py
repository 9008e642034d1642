"""The qedfuse error hierarchy.

Every error a user can cause (bad image, bad argument, bad option) is a :class:`QedError`
subclass whose ``str()`` is one complete line, fit to print after ``qedfuse: ``.  Only
``fs.py`` turns these into errnos for the kernel.
"""

from __future__ import annotations

import errno
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qedfuse.locking import LockMode


#: Exit statuses every command shares (``cli`` adds the broken-pipe one).
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # Ctrl-C, as the shell reports SIGINT


class QedError(Exception):
    """Base class of every expected qedfuse failure; ``errno`` is what FUSE answers."""

    errno: int = errno.EIO


class UserError(QedError):
    """A failure the user caused or can fix; ``exit_code`` is the command's exit status.

    The one type every command raises for "print one line and exit non-zero"; ``cli.main``
    catches it and prints ``qedfuse: <message>``.
    """

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class UsageError(UserError):
    """A bad command line (exit status 2, like argparse's errors)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_USAGE)


def one_line(exc: BaseException | str) -> str:
    """``exc`` as one line of text: ``filename: strerror`` for an OSError, else ``str()``
    (the type's name when that is empty); newlines become spaces."""
    if isinstance(exc, str):
        text = exc
    elif isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}" if exc.filename is not None else exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.splitlines())


def say(message: BaseException | str) -> None:
    """Print ``qedfuse: <message>`` as one line on stderr: how a command reports a failure or
    a notice (``cli`` for what reaches ``main``, the mount commands for what they tell on the
    way)."""
    print(f"qedfuse: {one_line(message)}", file=sys.stderr, flush=True)


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
    """Another process holds a conflicting QEMU-style image lock.

    ``mode`` is what was asked for on ``path``, ``free_modes`` the modes that would not have
    conflicted (so a caller can suggest ``-U`` or ``-o ro`` only when it would help).
    """

    errno = errno.EAGAIN

    def __init__(
        self,
        message: str,
        *,
        path: str = "",
        mode: LockMode | None = None,
        free_modes: frozenset[LockMode] = frozenset(),
    ) -> None:
        super().__init__(message)
        self.path = path
        self.mode = mode
        self.free_modes = free_modes
