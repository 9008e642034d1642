"""The ``qedfuse`` command line: subcommands, the mount(8) form, and error reporting.

``qedfuse COMMAND …`` runs one of ``mount umount create info check convert map resize
commit``.  ``qedfuse IMAGE MOUNTPOINT [-o OPTS]`` (what ``mount.fuse3`` runs for an fstab
line of type ``fuse.qedfuse``) is ``qedfuse mount IMAGE MOUNTPOINT [-o OPTS]``.

Every failure prints exactly one line, ``qedfuse: <message>``, on stderr (a traceback too
with ``--debug``) and exits non-zero: 2 for a bad command line, 1 otherwise, except
``check``, which exits as ``qemu-img check`` does (0 clean, 1 check incomplete or a bad
command line, 2 corruptions, 3 only leaks).  ``qedfuse.mount`` (and so pyfuse3) is imported only for
``mount`` and ``umount``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import NoReturn, TextIO

import trio

from qedfuse import __version__, tools
from qedfuse.errors import QedError
from qedfuse.logsetup import setup_logging
from qedfuse.tools import CliError, UsageError

PROG = "qedfuse"
OFFLINE_COMMANDS = ("create", "info", "check", "convert", "map", "resize", "commit")
COMMANDS = ("mount", "umount", *OFFLINE_COMMANDS)
#: Options of the top-level parser that may precede the command.
_GLOBAL_FLAGS = ("--debug", "-V", "--version", "-h", "--help")

_EPILOG = """\
mount(8) form:
  qedfuse IMAGE MOUNTPOINT [-o OPTS]   is the same as   qedfuse mount IMAGE MOUNTPOINT [-o OPTS]
  (what mount.fuse3 runs for an fstab entry of type fuse.qedfuse)

exit status: 0 success, 1 failure, 2 bad command line;
  check: 0 clean, 1 check could not complete (also a bad command line), 2 corruptions
  remain, 3 only leaks remain
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

    p = add("create", "create a new, empty QED image")
    p.add_argument("-f", dest="format", choices=("qed",), help="image format (only qed)")
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
    _add_output(p)
    _add_force_share(p)
    p.add_argument("image", metavar="IMAGE")

    p = add("check", "check an image's consistency (qemu-img check exit codes)")
    p.add_argument(
        "-r",
        dest="repair",
        choices=("leaks", "all"),
        help="repair: both modes fix corruptions and reclaim trailing leaks (as QEMU does)",
    )
    _add_output(p)
    _add_force_share(p)
    p.add_argument("image", metavar="IMAGE")

    p = add("convert", "convert between raw and QED (a QED chain is flattened)")
    p.add_argument("-p", dest="progress", action="store_true", help="show progress on stderr")
    p.add_argument("-f", dest="src_format", choices=("raw", "qed"), help="source format (probed)")
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
    _add_output(p)
    _add_force_share(p)
    p.add_argument("image", metavar="IMAGE")

    p = add("resize", "grow the virtual disk (QED cannot shrink)")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("size", metavar="[+]SIZE", help="new size, or +SIZE to grow by")

    p = add("commit", "write an overlay's data into its backing file (the overlay is kept)")
    p.add_argument("-p", dest="progress", action="store_true", help="show progress on stderr")
    p.add_argument("image", metavar="IMAGE")
    return parser


def mount_form(argv: Sequence[str]) -> list[str]:
    """Insert ``mount`` when the first word after the global flags is not a command."""
    args = list(argv)
    i = 0
    while i < len(args) and args[i] in _GLOBAL_FLAGS:
        i += 1
    if i < len(args) and args[i] not in COMMANDS and not args[i].startswith("-"):
        args.insert(i, "mount")
    return args


# ---------------------------------------------------------------------- output helpers


class _ProgressBar:
    """``    (42.00/100%)`` on stderr, redrawn in place at every whole percent."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.shown = -1

    def __call__(self, done: int, total: int) -> None:
        percent = 100 * done // total if total else 100
        if percent != self.shown:
            self.shown = percent
            self.stream.write(f"    ({percent:.2f}/100%)\r")
            self.stream.flush()

    def finish(self) -> None:
        if self.shown != 100:
            self.stream.write(f"    ({100:.2f}/100%)\r")
        self.stream.write("\n")
        self.stream.flush()


def _dump_json(value: object) -> None:
    print(json.dumps(value, indent=4))


# ---------------------------------------------------------------------- commands


def _run_create(ns: argparse.Namespace) -> int:
    options = tools.parse_create_options(ns.options)
    size = tools.parse_size(ns.size) if ns.size is not None else None
    result = trio.run(
        lambda: tools.create(
            ns.image,
            size,
            cluster_size=options.cluster_size,
            table_size=options.table_size,
            backing=ns.backing,
            backing_format=ns.backing_format,
            force=ns.force,
        )
    )
    line = f"Formatting '{result.path}', fmt=qed size={result.image_size}"
    if result.backing_name is not None:
        line += f" backing_file={result.backing_name} backing_fmt={result.backing_format}"
    line += f" cluster_size={result.cluster_size} table_size={result.table_size}"
    print(line)
    if result.table_size == 1:
        logging.getLogger(__name__).warning(
            "QEMU cannot open images with table_size=1 (a QEMU bug); qedfuse can"
        )
    return 0


def _run_info(ns: argparse.Namespace) -> int:
    result = trio.run(lambda: tools.info(ns.image, force_share=ns.force_share))
    if _output(ns) == "json":
        _dump_json(result.to_json())
    else:
        sys.stdout.write(result.human_text())
    return 0


def _run_check(ns: argparse.Namespace) -> int:
    report = trio.run(lambda: tools.check(ns.image, repair=ns.repair, force_share=ns.force_share))
    if _output(ns) == "json":
        _dump_json(report.to_json(ns.image))
    else:
        sys.stdout.write(report.human_text(ns.image))
    return report.exit_code()


def _run_convert(ns: argparse.Namespace) -> int:
    options = tools.parse_create_options(ns.options)
    if ns.options and ns.dst_format != "qed":
        raise UsageError("convert: -o applies only to -O qed")
    bar = _ProgressBar(sys.stderr) if ns.progress else None
    trio.run(
        lambda: tools.convert(
            ns.src,
            ns.dst,
            dst_format=ns.dst_format,
            src_format=ns.src_format,
            cluster_size=options.cluster_size,
            table_size=options.table_size,
            force=ns.force,
            force_share=ns.force_share,
            progress=bar,
        )
    )
    if bar is not None:
        bar.finish()
    return 0


def _run_map(ns: argparse.Namespace) -> int:
    entries = trio.run(lambda: tools.map_image(ns.image, force_share=ns.force_share))
    if _output(ns) == "json":
        sys.stdout.write(tools.map_json(entries))
    else:
        sys.stdout.write(tools.map_human(entries))
    return 0


def _run_resize(ns: argparse.Namespace) -> int:
    trio.run(lambda: tools.resize(ns.image, ns.size))
    print("Image resized.")
    return 0


def _run_commit(ns: argparse.Namespace) -> int:
    bar = _ProgressBar(sys.stderr) if ns.progress else None
    result = trio.run(lambda: tools.commit(ns.image, progress=bar))
    if bar is not None:
        bar.finish()
    print(
        f"Image committed: {result.bytes_committed} bytes written into "
        f"'{result.backing_path}' ({result.backing_format})."
    )
    return 0


def _output(ns: argparse.Namespace) -> str:
    return str(ns.output or "human")


_HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "create": _run_create,
    "info": _run_info,
    "check": _run_check,
    "convert": _run_convert,
    "map": _run_map,
    "resize": _run_resize,
    "commit": _run_commit,
}


# ---------------------------------------------------------------------- version


def version_lines() -> list[str]:
    """qedfuse's version, then pyfuse3's and libfuse's when they load without error."""
    lines = [f"qedfuse {__version__}"]
    try:
        from qedfuse.fs import pyfuse3_version  # only the FUSE layer imports pyfuse3

        lines.append(f"pyfuse3 {pyfuse3_version()}")
    except Exception:  # not installed or broken: --version still works
        pass
    libfuse = _libfuse_version()
    if libfuse is not None:
        lines.append(f"libfuse {libfuse}")
    return lines


def _libfuse_version() -> str | None:
    try:
        import ctypes

        lib = ctypes.CDLL("libfuse3.so.3")
        pkgversion = lib.fuse_pkgversion
        pkgversion.restype = ctypes.c_char_p
        value = pkgversion()
        return value.decode() if isinstance(value, bytes) else None
    except (OSError, AttributeError):
        return None


# ---------------------------------------------------------------------- main


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "unknown error"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        if exc.filename is not None:
            return f"{exc.filename}: {exc.strerror}"
        return exc.strerror
    return str(exc)


def _unwrap(exc: BaseException) -> BaseException:
    """The single exception inside (nested) one-member exception groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _fail(message: str, *, debug: bool, exc: BaseException | None = None) -> None:
    if debug and exc is not None:
        traceback.print_exception(exc, file=sys.stderr)
    sys.stderr.write(f"{PROG}: {_one_line(message)}\n")
    sys.stderr.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script exits with it)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        return _main(args)
    except BaseException as raw:
        exc = _unwrap(raw)
        if isinstance(exc, SystemExit):  # --help (argparse) or a mount_main exit
            code = exc.code
            return code if isinstance(code, int) else (0 if code is None else 1)
        if isinstance(exc, CliError):
            _fail(str(exc), debug=debug, exc=exc)
            if isinstance(exc, UsageError) and _first_command(mount_form(args)) == "check":
                # 2 means "corruptions remain" to check's callers: a bad command line is
                # "the check could not complete" (qemu-img check exits 1 here too).
                return 1
            return exc.exit_code
        if isinstance(exc, (QedError, OSError)):
            _fail(_describe(exc), debug=debug, exc=exc)
            return 1
        if isinstance(exc, KeyboardInterrupt):
            _fail("interrupted", debug=debug, exc=exc)
            return 130
        if isinstance(exc, Exception):
            hint = "" if debug else " (run with --debug for a traceback)"
            _fail(f"internal error: {type(exc).__name__}: {exc}{hint}", debug=debug, exc=exc)
            return 1
        raise
    finally:
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            # The reader went away (`qedfuse map x | head`): not worth an error line.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)


def _main(args: list[str]) -> int:
    args = mount_form(args)
    parser = build_parser(with_mount=_first_command(args) in ("mount", "umount"))
    ns = parser.parse_args(args)
    debug = bool(ns.global_debug or getattr(ns, "debug", False))
    ns.debug = debug
    if ns.version:
        print("\n".join(version_lines()))
        return 0
    if ns.command is None:
        raise UsageError(f"a command is required: {', '.join(COMMANDS)} (see '{PROG} --help')")
    if ns.command in ("mount", "umount"):
        from qedfuse import mount

        run = mount.mount_main if ns.command == "mount" else mount.umount_main
        return int(run(ns))
    setup_logging(debug, level=logging.DEBUG if debug else logging.WARNING)
    return _HANDLERS[ns.command](ns)


def _first_command(args: list[str]) -> str | None:
    for arg in args:
        if arg in COMMANDS:
            return arg
        if arg not in _GLOBAL_FLAGS:
            return None
    return None


__all__ = ["build_parser", "main", "mount_form", "version_lines"]
