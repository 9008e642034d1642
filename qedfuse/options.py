"""Parsing of ``-o`` mount options (pure: no I/O, no pyfuse3).

``pyfuse3.init()`` refuses most options users type (``uid=``, ``relatime``, ``x-systemd.*`` …
all make ``fuse_session_new()`` fail), so qedfuse reads every option itself and sorts it:

* **consumed** by qedfuse: ``ro``, ``rw``, ``uid=``, ``gid=``, ``umask=``, ``fsname=``,
  ``cache=auto|none|kernel`` (aliases ``auto_cache``, ``direct_io``, ``kernel_cache``),
  ``log=FILE``, ``debug``, ``backing=PATH``, ``untrusted``, ``detect_zeroes=on|off``,
  ``flush_delay=SECONDS``, ``pidfile=FILE``, ``writeback_cache``, ``subtype=`` (always
  ``qedfuse``);
* **passed** to libfuse: :data:`PASS_THROUGH` (``ro`` is passed as well, so the kernel
  marks the mount read-only);
* **refused** with its reason: ``max_read=N`` (libfuse 3 needs pyfuse3 to set it too);
* **dropped** silently: userspace-only options mount(8), mount.fuse3 and fstab add
  (:data:`DROPPED`, ``comment=…``, ``x-*``, ``X-*``, ``setuid=…``);
* anything else is a usage error (:class:`OptionError`, exit status 2).

``fsname=<absolute image path>``, ``subtype=qedfuse`` and ``default_permissions`` are always
given to libfuse, so ``/proc/mounts`` reads ``IMAGE MOUNTPOINT fuse.qedfuse …`` and the kernel
checks permissions against the modes qedfuse reports.
"""

from __future__ import annotations

import argparse
import enum
import grp
import pwd
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from qedfuse.errors import UsageError

#: Options libfuse 3.14 accepts and that qedfuse hands on unchanged.
PASS_THROUGH = frozenset(
    {
        "allow_other",
        "allow_root",
        "default_permissions",
        "noatime",
        "atime",
        "sync",
        "async",
        "dirsync",
        "noexec",
        "exec",
        "nodev",
        "nosuid",
        "dev",
        "suid",
        "auto_unmount",
    }
)
#: Options that only mean something to mount(8), mount.fuse3 or fstab; ignored.
DROPPED = frozenset(
    {
        "defaults",
        "auto",
        "noauto",
        "user",
        "users",
        "nouser",
        "owner",
        "group",
        "_netdev",
        "nofail",
        "relatime",
        "norelatime",
        "strictatime",
        "lazytime",
        "nodiratime",
        "nonempty",
        "big_writes",
        "drop_privileges",
    }
)
DROPPED_PREFIXES = ("comment=", "x-", "X-", "setuid=")
SUBTYPE = "qedfuse"
DEFAULT_UMASK = 0o077
DEFAULT_FLUSH_DELAY = 5.0


class OptionError(UsageError, ValueError):
    """A bad ``-o`` option; ``str()`` is the one-line message (without ``qedfuse: ``).

    A :class:`~qedfuse.errors.UsageError` (exit status 2) that ``cli`` prints; still a
    ValueError, as before it was one."""


class CacheMode(enum.Enum):
    """How the kernel page cache is used for the raw file (``cache=``)."""

    AUTO = "auto"  # buffered, page cache dropped on every open (keep_cache=False)
    NONE = "none"  # direct_io: every read/write reaches qedfuse; no shared mmap
    KERNEL = "kernel"  # buffered, page cache kept across opens (keep_cache=True)


@dataclass(frozen=True, slots=True)
class MountOptions:
    """Everything ``-o`` can set; defaults are what a bare ``qedfuse mount`` does."""

    read_only: bool = False
    uid: int | None = None  # None: the mounting user
    gid: int | None = None
    umask: int = DEFAULT_UMASK
    fsname: str | None = None  # None: the image's absolute path
    cache: CacheMode = CacheMode.AUTO
    log_file: str | None = None
    debug: bool = False
    backing: str | None = None
    untrusted: bool = False
    detect_zeroes: bool = True
    flush_delay: float = DEFAULT_FLUSH_DELAY
    pidfile: str | None = None
    #: Ask the kernel for FUSE's writeback cache (pyfuse3 ``enable_writeback_cache``).
    writeback_cache: bool = False
    #: Options for libfuse, in the order given (without fsname/subtype/default_permissions).
    fuse: tuple[str, ...] = field(default_factory=tuple)

    def fuse_options(self, image_path: str, *, debug_fuse: bool = False) -> set[str]:
        """The option set for ``pyfuse3.init``: pass-through ones plus the ones always added."""
        opts = set(self.fuse)
        opts.add("default_permissions")
        opts.add(f"subtype={SUBTYPE}")
        opts.add(f"fsname={escape_value(self.fsname or image_path)}")
        if self.read_only:
            opts.add("ro")
        if debug_fuse:
            opts.add("debug")
        return opts


def escape_value(value: str) -> str:
    """Escape ``\\`` and ``,`` the way libfuse's option parser unescapes them."""
    return value.replace("\\", "\\\\").replace(",", "\\,")


def split_options(text: str) -> list[str]:
    """Split one ``-o`` argument at commas; ``\\,`` keeps a comma inside a value."""
    out: list[str] = []
    current: list[str] = []
    chars = iter(text)
    for ch in chars:
        if ch == "\\":
            current.append(next(chars, "\\"))
        elif ch == ",":
            out.append("".join(current))
            current = []
        else:
            current.append(ch)
    out.append("".join(current))
    return [o for o in out if o]


def parse_options(args: Iterable[str]) -> MountOptions:
    """Parse the ``-o`` arguments (each a comma-separated list) into :class:`MountOptions`.

    Later options win over earlier ones (``ro,rw`` mounts read-write), as with mount(8).
    """
    values: dict[str, Any] = {}
    fuse: list[str] = []
    for arg in args:
        for opt in split_options(arg):
            key, eq, value = opt.partition("=")
            if opt in DROPPED or opt.startswith(DROPPED_PREFIXES):
                continue
            if key == "max_read":
                raise OptionError(_MAX_READ_REFUSED)
            if opt in PASS_THROUGH:
                if opt not in fuse:
                    fuse.append(opt)
            elif not eq and opt in _FLAGS:
                name, flag_value = _FLAGS[opt]
                values[name] = flag_value
            elif key in _VALUED:
                if not value:
                    raise OptionError(f"mount option '{key}' needs a value ('{key}=…')")
                if key != "subtype":  # the type is always fuse.qedfuse
                    values[_VALUED[key][0]] = _VALUED[key][1](key, value)
            else:
                raise OptionError(f"unknown mount option '{opt}'")
    return MountOptions(fuse=tuple(fuse), **values)


#: Numbers on the command line and in -o are ASCII: ``str.isdigit``, ``int`` and ``float``
#: also take other scripts' digits ('١٢٣' is 123 to them) and ``nan``/``inf``.
_UNSIGNED_RE: Final = re.compile(r"[0-9]+", re.ASCII)
_DECIMAL_RE: Final = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)", re.ASCII)
#: The longest timeout a command waits for (a day).
MAX_TIMEOUT_S: Final = 86400.0


def timeout_arg(text: str) -> float:
    """argparse type of ``--timeout``: decimal seconds, more than 0 and at most a day."""
    seconds = float(text) if _DECIMAL_RE.fullmatch(text) else -1.0
    if not 0 < seconds <= MAX_TIMEOUT_S:
        raise argparse.ArgumentTypeError(
            f"expected seconds, more than 0 and at most {MAX_TIMEOUT_S:g}: {text!r}"
        )
    return seconds


#: The largest uid/gid: uid_t is 32 bits and (uid_t)-1 means "no id".
MAX_ID: Final = (1 << 32) - 2


def _id(key: str, value: str) -> int:
    if _UNSIGNED_RE.fullmatch(value):
        if int(value) > MAX_ID:
            raise OptionError(f"mount option '{key}={value}': expected an id from 0 to {MAX_ID}")
        return int(value)
    try:
        if key == "uid":
            return pwd.getpwnam(value).pw_uid
        return grp.getgrnam(value).gr_gid
    except KeyError:
        what = "user" if key == "uid" else "group"
        raise OptionError(f"mount option '{key}={value}': no such {what}") from None


def _seconds(key: str, value: str) -> float:
    seconds = float(value) if _DECIMAL_RE.fullmatch(value) else -1.0
    if not 0 <= seconds <= 86400:  # also refuses nan
        raise OptionError(f"mount option '{key}={value}': expected seconds from 0 to 86400")
    return seconds


def _cache(key: str, value: str) -> CacheMode:
    try:
        return CacheMode(value)
    except ValueError:
        raise OptionError(f"mount option '{key}={value}': expected auto, none or kernel") from None


def _on_off(key: str, value: str) -> bool:
    if value not in ("on", "off"):
        raise OptionError(f"mount option '{key}={value}': expected on or off")
    return value == "on"


def _umask(key: str, value: str) -> int:
    umask = int(value, 8) if re.fullmatch(r"[0-7]+", value, re.ASCII) else -1
    if not 0 <= umask <= 0o777:
        raise OptionError(f"mount option '{key}={value}': expected an octal mask up to 777")
    return umask


#: libfuse 3 takes max_read only when the filesystem's init() sets the same limit, which
#: pyfuse3 cannot do: the kernel's INIT then fails and the mount is gone (reported by an
#: outside review as "mount succeeds, nothing mounted"), so the option is refused up front.
_MAX_READ_REFUSED: Final = (
    "mount option 'max_read' is not supported (pyfuse3 cannot set the matching limit, and "
    "the kernel would then refuse the mount); without it the kernel's own limit applies"
)


def _text(key: str, value: str) -> str:
    return value


#: Flags without a value: option → (MountOptions field, value).
_FLAGS: dict[str, tuple[str, object]] = {
    "ro": ("read_only", True),
    "rw": ("read_only", False),
    "debug": ("debug", True),
    "untrusted": ("untrusted", True),
    "auto_cache": ("cache", CacheMode.AUTO),
    "direct_io": ("cache", CacheMode.NONE),
    "kernel_cache": ("cache", CacheMode.KERNEL),
    "writeback_cache": ("writeback_cache", True),
}
#: Options with a value: key → (MountOptions field, parser).
_VALUED: dict[str, tuple[str, Callable[[str, str], object]]] = {
    "uid": ("uid", _id),
    "gid": ("gid", _id),
    "umask": ("umask", _umask),
    "fsname": ("fsname", _text),
    "cache": ("cache", _cache),
    "log": ("log_file", _text),
    "backing": ("backing", _text),
    "detect_zeroes": ("detect_zeroes", _on_off),
    "flush_delay": ("flush_delay", _seconds),
    "pidfile": ("pidfile", _text),
    "subtype": ("", _text),
}

#: The ``-o`` options for the man page and ``--help``: (how to write it, what it does).
#: Every option :func:`parse_options` takes is in here (tests/test_packaging.py checks).
OPTION_HELP: tuple[tuple[str, str], ...] = (
    ("ro", "read-only: file mode 0400, writes fail with EROFS, the image is never written"),
    ("rw", "read-write (the default)"),
    ("uid=USER", "owner of the file (name or number; default: the mounting user)"),
    ("gid=GROUP", "group of the file (name or number; default: the mounting user's)"),
    ("umask=MASK", "octal mask of the file's permissions (default 077, so mode 0600)"),
    ("fsname=NAME", "first column of /proc/mounts (default: the image's absolute path)"),
    ("cache=auto", "the default: page cache, dropped on every open; shared mmap works"),
    ("cache=none", "every read and write reaches qedfuse; shared mmap fails (alias direct_io)"),
    ("cache=kernel", "page cache kept across opens (alias kernel_cache)"),
    ("auto_cache", "the same as cache=auto"),
    ("direct_io", "the same as cache=none"),
    ("kernel_cache", "the same as cache=kernel"),
    ("log=FILE", "the daemon's log file"),
    ("debug", "debug logging"),
    ("backing=PATH", "use PATH as the backing file instead of the one the image names"),
    ("untrusted", "refuse to open any backing file"),
    ("detect_zeroes=on|off", "store all-zero writes as zero clusters (default on)"),
    (
        "flush_delay=SECONDS",
        f"flush metadata and clear NEED_CHECK once writes pause this long "
        f"(default {DEFAULT_FLUSH_DELAY:g})",
    ),
    ("pidfile=FILE", "write the daemon's pid to FILE (as --pidfile)"),
    (
        "writeback_cache",
        "the kernel's FUSE writeback cache: faster small writes; a write past the end fails "
        "only at the next fsync or close; O_TRUNC is refused; off by default",
    ),
    ("subtype=NAME", "accepted and ignored: the type is always fuse.qedfuse"),
    *((name, "passed to FUSE") for name in sorted(PASS_THROUGH)),
    *((name, "ignored (meant for mount(8), mount.fuse3 or fstab)") for name in sorted(DROPPED)),
    *(
        (f"{prefix}…", "ignored (meant for mount(8), mount.fuse3 or systemd)")
        for prefix in DROPPED_PREFIXES
    ),
)


def option_keys() -> frozenset[str]:
    """Every option word :func:`parse_options` accepts (valued ones without ``=``)."""
    return frozenset(_FLAGS) | frozenset(_VALUED) | PASS_THROUGH | DROPPED


__all__ = [
    "DROPPED",
    "OPTION_HELP",
    "PASS_THROUGH",
    "CacheMode",
    "MountOptions",
    "OptionError",
    "escape_value",
    "option_keys",
    "parse_options",
    "split_options",
]
