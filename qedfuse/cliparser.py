"""The ``qedfuse`` command line's grammar: every subcommand's arguments, the mount(8) form,
and the exit statuses (one table, read by :mod:`qedfuse.cli` to run a command and by
:mod:`qedfuse.docgen` for the man page and shell completion).
"""

from __future__ import annotations

import argparse
import difflib
import os
import signal
import textwrap
from collections.abc import Sequence
from typing import NoReturn

from qedfuse.errors import UsageError
from qedfuse.errors import UserError as CliError
from qedfuse.options import timeout_arg

PROG = "qedfuse"
OFFLINE_COMMANDS = ("create", "info", "check", "convert", "map", "resize", "commit")
#: Commands that ask running mount daemons (through their control sockets).
DAEMON_COMMANDS = ("status", "list", "flush")
COMMANDS = ("mount", "umount", *OFFLINE_COMMANDS, *DAEMON_COMMANDS)
#: Options of the top-level parser that may precede the command.
GLOBAL_FLAGS = ("--debug", "-V", "--version", "-h", "--help")
#: Exit status for a closed stdout (128 + SIGPIPE, what a shell shows for a killed writer).
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE
EXIT_INTERRUPTED = 128 + signal.SIGINT

#: The exit statuses, for --help and the man page.
EXIT_STATUS_TEXT = """\
0 success, 1 failure, 2 bad command line, 130 interrupted (Ctrl-C),
141 stdout closed early (as if killed by SIGPIPE);
check: 0 clean, 1 check could not complete (also a bad command line), 2 corruptions
remain, 3 only leaks remain"""

_EPILOG = f"""\
mount(8) form:
  qedfuse IMAGE MOUNTPOINT [-o OPTS]   is the same as   qedfuse mount IMAGE MOUNTPOINT [-o OPTS]
  (what mount.fuse3 runs for an fstab entry of type fuse.qedfuse)

exit status:
{textwrap.indent(EXIT_STATUS_TEXT, "  ")}
"""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors raised as :class:`UsageError` (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix(PROG).strip()
        where = f"{command}: " if command else ""
        hint = f"{PROG} {command} --help" if command else f"{PROG} --help"
        raise UsageError(f"{where}{message} (see '{hint}')")


def _add_output(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--json",
        dest="output",
        action="store_const",
        const="json",
        default="human",
        help="print JSON (qemu-img's --output=json layout)",
    )
    group.add_argument("--output", choices=("human", "json"), help="output format")


def _add_format(p: argparse.ArgumentParser, *, short: bool = True) -> None:
    """qemu-img's ``-f FMT`` for an image that can only be QED (``mount``: ``--format`` only)."""
    flags = ("-f", "--format") if short else ("--format",)
    p.add_argument(*flags, dest="format", choices=("qed",), help="image format (only qed)")


def _add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-q", "--quiet", action="store_true", help="print nothing but errors (as qemu-img -q)"
    )


def _add_force_share(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-U",
        "--force-share",
        action="store_true",
        help="open even if another process (QEMU, a qedfuse mount) has the image open read-write",
    )


def build_parser(*, with_mount: bool = False) -> argparse.ArgumentParser:
    """The whole command line.

    ``mount``/``umount`` get their arguments from :mod:`qedfuse.mount` (which imports
    pyfuse3) only ``with_mount``; otherwise they are listed but take no arguments.
    """
    parser = _Parser(
        prog=PROG,
        description="Expose a QED disk image as a raw file through FUSE, and work on QED images.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-V", "--version", action="store_true", help="print versions (qedfuse, pyfuse3, libfuse)"
    )
    parser.add_argument(
        "--debug",
        dest="global_debug",
        action="store_true",
        help="debug logging, and tracebacks with errors",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="debug logging and tracebacks")

    def add(name: str, help_text: str, *, offline: bool = True) -> argparse.ArgumentParser:
        parents = [common] if offline else []
        return sub.add_parser(name, help=help_text, description=help_text, parents=parents)

    # mount/umount: configured by qedfuse.mount, imported only if one of them runs (below).
    mount_parser = add("mount", "serve IMAGE as MOUNTPOINT/<name>.raw", offline=False)
    umount_parser = add("umount", "unmount a qedfuse mount", offline=False)
    if with_mount:
        try:
            from qedfuse import mount
        except ImportError as exc:
            raise CliError(f"mount support is not available: {exc}") from exc
        mount.configure_mount_parser(mount_parser)
        mount.configure_umount_parser(umount_parser)
        _add_format(mount_parser, short=False)  # -f is --foreground there

    p = add("create", "create a new, empty QED image")
    _add_format(p)
    _add_quiet(p)
    p.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPTS",
        help="cluster_size=N (4K…64M, power of 2; default 64K), table_size=N (1…16; default 4)",
    )
    p.add_argument("-b", dest="backing", metavar="BACKING", help="backing file (stored as given)")
    p.add_argument(
        "-F",
        dest="backing_format",
        choices=("raw", "qed"),
        help="backing file format (required with -b)",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing non-empty file")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument(
        "size",
        metavar="SIZE",
        nargs="?",
        help="bytes, or with a K/M/G/T/P/E suffix (powers of 1024); rounded up to 512; "
        "default with -b: the backing image's size",
    )

    p = add("info", "show the header, geometry, allocation and backing chain of an image")
    _add_format(p)
    _add_output(p)
    p.add_argument(
        "--backing-chain",
        action="store_true",
        help="also show every image of the backing chain (JSON: a list, top first)",
    )
    _add_force_share(p)
    p.add_argument("image", metavar="IMAGE")

    p = add("check", "check an image's consistency (qemu-img check exit codes)")
    p.add_argument(
        "-r",
        dest="repair",
        choices=("leaks", "all"),
        help="repair: both modes fix corruptions and reclaim trailing leaks (as QEMU does)",
    )
    _add_format(p)
    p.add_argument(
        "--duplicates",
        choices=("copy", "unmap"),
        default="copy",
        help="with -r: give each extra reference to a shared cluster its own copy (default), "
        "or unmap it (it then reads as unallocated: backing data or zeros)",
    )
    p.add_argument(
        "--max-copy",
        metavar="SIZE",
        help="with -r: most bytes the copies may add (default 1G; the filesystem's free "
        "space is a limit too)",
    )
    _add_output(p)
    _add_quiet(p)
    _add_force_share(p)
    p.add_argument("image", metavar="IMAGE")

    p = add("convert", "convert between raw and QED (a QED chain is flattened)")
    p.add_argument("-p", dest="progress", action="store_true", help="show progress on stderr")
    _add_quiet(p)
    p.add_argument(
        "-f", "--format", dest="src_format", choices=("raw", "qed"), help="source format (probed)"
    )
    p.add_argument(
        "-O", dest="dst_format", choices=("raw", "qed"), required=True, help="output format"
    )
    p.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPTS",
        help="QED output: cluster_size=N, table_size=N",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing non-empty DST")
    _add_force_share(p)
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")

    p = add("map", "show how the virtual disk maps onto the image and its backing chain")
    _add_format(p)
    _add_output(p)
    _add_force_share(p)
    p.add_argument("image", metavar="IMAGE")

    p = add("resize", "grow the virtual disk (QED cannot shrink)")
    _add_format(p)
    _add_quiet(p)
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("size", metavar="[+]SIZE", help="new size, or +SIZE to grow by")

    p = add("commit", "write an overlay's data into its backing file (the overlay is kept)")
    _add_format(p)
    p.add_argument("-p", dest="progress", action="store_true", help="show progress on stderr")
    _add_quiet(p)
    p.add_argument("image", metavar="IMAGE")

    from qedfuse.control import FLUSH_TIMEOUT_S, STATUS_TIMEOUT_S

    def add_timeout(p: argparse.ArgumentParser, default: float) -> None:
        p.add_argument(
            "--timeout",
            type=timeout_arg,
            default=default,
            metavar="S",
            help=f"give up on a daemon that has not answered after S seconds (default {default:g})",
        )

    p = add("status", "live figures of running mounts, from their daemons")
    _add_output(p)
    add_timeout(p, STATUS_TIMEOUT_S)
    p.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?", help="one mount (default: all)")

    p = add("list", "list the qedfuse mounts and whether their daemons answer")
    _add_output(p)
    add_timeout(p, STATUS_TIMEOUT_S)

    p = add("flush", "run a mount's ordered flush now (NEED_CHECK is then clear on disk)")
    _add_output(p)
    add_timeout(p, FLUSH_TIMEOUT_S)
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    return parser


def mount_form(argv: Sequence[str]) -> list[str]:
    """Insert ``mount`` when the words are the mount(8) form ``IMAGE MOUNTPOINT [-o OPTS]``.

    The first word after the global flags is taken as an image only when it is not a command,
    a second word (the mount point) follows it, and it names an existing file or looks like a
    path (has a ``/`` or a ``.``).  Anything else that is not a command is a usage error,
    with the nearest command suggested: ``unknown command 'chek' (did you mean 'check'?)``.
    """
    args = list(argv)
    i = 0
    while i < len(args) and args[i] in GLOBAL_FLAGS:
        i += 1
    if i >= len(args) or args[i] in COMMANDS or args[i].startswith("-"):
        return args
    word = args[i]
    second = args[i + 1] if i + 1 < len(args) else None
    looks_like_path = os.path.isfile(word) or "/" in word or "." in word
    if second is not None and not second.startswith("-") and looks_like_path:
        args.insert(i, "mount")
        return args
    raise UsageError(unknown_command_message(word))


def unknown_command_message(word: str) -> str:
    """``unknown command 'chek' (did you mean 'check'?)``, or the list of commands."""
    close = difflib.get_close_matches(word, COMMANDS, n=1, cutoff=0.6)
    if close:
        return f"unknown command '{word}' (did you mean '{close[0]}'?)"
    return (
        f"unknown command '{word}': expected one of {', '.join(COMMANDS)}, or IMAGE MOUNTPOINT "
        f"(see '{PROG} --help')"
    )
