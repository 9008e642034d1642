"""The ``qedfuse`` command line: subcommands, the mount(8) form, and error reporting.

The grammar (every argument, the exit statuses) is :mod:`qedfuse.cliparser`'s; this module
runs a command and reports its failure.  ``qedfuse COMMAND …`` runs one of ``mount umount
create info check convert map resize commit``, or asks running mount daemons (``status list
flush``, see :mod:`qedfuse.control`).
``qedfuse IMAGE MOUNTPOINT [-o OPTS]`` (what ``mount.fuse3`` runs for an fstab line of type
``fuse.qedfuse``) is ``qedfuse mount IMAGE MOUNTPOINT [-o OPTS]``; that form is taken only
when the words can be it (:func:`~qedfuse.cliparser.mount_form`), so a mistyped command gets
``unknown command 'chek' (did you mean 'check'?)``.  qemu-img's habits work: ``-f qed``,
``-q``, ``--output=human|json``, ``info --backing-chain``.

A closed stdout (``qedfuse map x | head -1``) ends the command quietly (exit 141, as if
killed by SIGPIPE); Ctrl-C prints ``qedfuse: interrupted`` and exits 130, never a traceback.

Every failure prints exactly one line, ``qedfuse: <message>``, on stderr (a traceback too
with ``--debug``) and exits non-zero: 2 for a bad command line, 1 otherwise, except
``check``, which exits as ``qemu-img check`` does (0 clean, 1 check incomplete or a bad
command line, 2 corruptions, 3 only leaks); ``status`` exits 1 when a daemon it asked did
not answer.  pyfuse3 is imported only for ``mount`` and ``umount``.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import TextIO

import trio

from qedfuse import __version__, commands
from qedfuse.cliparser import (
    COMMANDS,
    EXIT_BROKEN_PIPE,
    EXIT_INTERRUPTED,
    GLOBAL_FLAGS,
    PROG,
    build_parser,
    mount_form,
    unknown_command_message,
)
from qedfuse.errors import QedError, UsageError, one_line, say
from qedfuse.errors import UserError as CliError
from qedfuse.logsetup import setup_logging

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
    options = commands.parse_create_options(ns.options)
    size = commands.parse_size(ns.size) if ns.size is not None else None
    result = trio.run(
        lambda: commands.create(
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
    if not ns.quiet:
        print(line)
    if result.table_size == 1:
        _warn_table_size_1()
    return 0


def _warn_table_size_1() -> None:
    logging.getLogger(__name__).warning(
        "QEMU cannot open images with table_size=1 (a QEMU bug); qedfuse can"
    )


def _run_info(ns: argparse.Namespace) -> int:
    result = trio.run(lambda: commands.info(ns.image, force_share=ns.force_share))
    if not ns.backing_chain:
        if _output(ns) == "json":
            _dump_json(result.to_json())
        else:
            sys.stdout.write(result.human_text())
        return 0
    if result.chain_error is not None:
        raise CliError(result.chain_error)
    layers: list[dict[str, object]] = [result.to_json()]
    texts = [result.human_text()]
    for path, layer_format in result.chain[1:]:
        if layer_format == "qed":
            layer = trio.run(functools.partial(commands.info, path, force_share=ns.force_share))
            layers.append(layer.to_json())
            texts.append(layer.human_text())
        else:
            raw, text = _raw_info(path)
            layers.append(raw)
            texts.append(text)
    if _output(ns) == "json":
        _dump_json(layers)
    else:
        sys.stdout.write("\n".join(texts))
    return 0


def _raw_info(path: str) -> tuple[dict[str, object], str]:
    """qemu-img info's record and text for a raw backing file."""
    st = os.stat(path)
    record: dict[str, object] = {
        "virtual-size": st.st_size,
        "filename": path,
        "format": "raw",
        "actual-size": st.st_blocks * 512,
        "dirty-flag": False,
    }
    text = (
        f"image: {path}\nfile format: raw\n"
        f"virtual size: {commands.human_size(st.st_size)} ({st.st_size} bytes)\n"
        f"disk size: {commands.human_size(st.st_blocks * 512)}\n"
    )
    return record, text


def _run_check(ns: argparse.Namespace) -> int:
    max_copy = commands.parse_size(ns.max_copy) if ns.max_copy is not None else None
    if ns.repair is None and (max_copy is not None or ns.duplicates != "copy"):
        raise UsageError("check: --duplicates and --max-copy apply only with -r")
    report = trio.run(
        lambda: commands.check(
            ns.image,
            repair=ns.repair,
            force_share=ns.force_share,
            duplicates=ns.duplicates,
            max_copy_bytes=max_copy,
        )
    )
    if ns.quiet:
        pass
    elif _output(ns) == "json":
        _dump_json(report.to_json(ns.image))
    else:
        sys.stdout.write(report.human_text(ns.image))
    return report.exit_code()


def _run_convert(ns: argparse.Namespace) -> int:
    options = commands.parse_create_options(ns.options)
    if ns.options and ns.dst_format != "qed":
        raise UsageError("convert: -o applies only to -O qed")
    bar = _ProgressBar(sys.stderr) if ns.progress and not ns.quiet else None
    trio.run(
        lambda: commands.convert(
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
    if ns.dst_format == "qed" and options.table_size == 1:
        _warn_table_size_1()
    return 0


def _run_map(ns: argparse.Namespace) -> int:
    entries = trio.run(lambda: commands.map_image(ns.image, force_share=ns.force_share))
    if _output(ns) == "json":
        sys.stdout.write(commands.map_json(entries))
    else:
        sys.stdout.write(commands.map_human(entries))
    return 0


def _run_resize(ns: argparse.Namespace) -> int:
    trio.run(lambda: commands.resize(ns.image, ns.size))
    if not ns.quiet:
        print("Image resized.")
    return 0


def _run_commit(ns: argparse.Namespace) -> int:
    bar = _ProgressBar(sys.stderr) if ns.progress and not ns.quiet else None
    result = trio.run(lambda: commands.commit(ns.image, progress=bar))
    if bar is not None:
        bar.finish()
    if not ns.quiet:
        print(
            f"Image committed: {result.bytes_committed} bytes written into "
            f"'{result.backing_path}' ({result.backing_format})."
        )
    return 0


def _ask_daemons(ns: argparse.Namespace, command: str) -> list[dict[str, object]]:
    """``command`` answered by the daemon of ``ns.mountpoint``, or of every qedfuse mount."""
    from qedfuse import control
    from qedfuse.registry import qedfuse_mounts

    mountpoint = getattr(ns, "mountpoint", None)
    refs = qedfuse_mounts(mountpoint)
    if mountpoint is not None and not refs:
        raise CliError(f"{os.path.abspath(mountpoint)} is not a qedfuse mount")
    return [control.query(ref, command, ns.timeout) for ref in refs]


def _run_status(ns: argparse.Namespace) -> int:
    from qedfuse import control

    answers = _ask_daemons(ns, "status")
    if _output(ns) == "json":
        _dump_json(answers)
    else:
        sys.stdout.write("\n".join(control.status_text(a) for a in answers))
    return 0 if all(a.get("ok") for a in answers) else 1


def _run_list(ns: argparse.Namespace) -> int:
    from qedfuse import control

    answers = _ask_daemons(ns, "status")
    if _output(ns) == "json":
        keys = ("mountpoint", "image", "pid", "state", "uptime_seconds", "error")
        _dump_json([{k: a[k] for k in keys if k in a} for a in answers])
    else:
        for answer in answers:
            print(control.list_line(answer))
    return 0


def _run_flush(ns: argparse.Namespace) -> int:
    from qedfuse import control

    (answer,) = _ask_daemons(ns, "flush")
    if _output(ns) == "json":
        _dump_json(answer)
    elif answer.get("ok"):
        print(control.flush_text(answer))
    else:
        raise CliError(control.flush_text(answer))
    return 0 if answer.get("ok") else 1


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
    "status": _run_status,
    "list": _run_list,
    "flush": _run_flush,
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


def _contains(exc: BaseException, kind: type[BaseException]) -> bool:
    """True if ``exc`` is a ``kind`` or an exception group holding one at any depth."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(kind) is not None
    return isinstance(exc, kind)


def _unwrap(exc: BaseException) -> BaseException:
    """The single exception inside (nested) one-member exception groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _fail(message: str, *, debug: bool, exc: BaseException | None = None) -> None:
    if debug and exc is not None:
        traceback.print_exception(exc, file=sys.stderr)
    say(" ".join(message.split()) or "unknown error")  # runs of blanks too become one space


def _interrupted(*, debug: bool, exc: BaseException | None) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the line
    _fail("interrupted", debug=debug, exc=exc)
    return EXIT_INTERRUPTED


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script exits with it)."""
    args = list(sys.argv[1:] if argv is None else argv)
    code = _guarded_main(args)
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # the reader went away (`qedfuse map x | head`): no error line
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    return code


def _guarded_main(args: list[str]) -> int:
    """:func:`_main` with every exception turned into one line and an exit status."""
    debug = "--debug" in args
    try:
        return _main(args)
    except BaseException as raw:
        if _contains(raw, BrokenPipeError):  # the reader went away (`… | head -1`)
            _quiet_stdout()
            return EXIT_BROKEN_PIPE
        if _contains(raw, KeyboardInterrupt):
            return _interrupted(debug=debug, exc=raw)
        exc = _unwrap(raw)
        if isinstance(exc, SystemExit):  # --help (argparse) or a mount_main exit
            code = exc.code
            return code if isinstance(code, int) else (0 if code is None else 1)
        if isinstance(exc, CliError):
            _fail(str(exc), debug=debug, exc=exc)
            if isinstance(exc, UsageError) and _first_command(args) == "check":
                # 2 means "corruptions remain" to check's callers: a bad command line is
                # "the check could not complete" (qemu-img check exits 1 here too).
                return 1
            return exc.exit_code
        if isinstance(exc, (QedError, OSError)):
            _fail(one_line(exc), debug=debug, exc=exc)
            return 1
        if isinstance(exc, Exception):
            hint = "" if debug else " (run with --debug for a traceback)"
            _fail(f"internal error: {type(exc).__name__}: {exc}{hint}", debug=debug, exc=exc)
            return 1
        raise


def _main(args: list[str]) -> int:
    args = mount_form(args)
    parser = build_parser(with_mount=_first_command(args) in ("mount", "umount"))
    ns, extra = parser.parse_known_args(args)
    if extra:  # argparse reports these from the top level; point at the command's --help
        where = f"{ns.command}: " if ns.command else ""
        hint = f"{PROG} {ns.command} --help" if ns.command else f"{PROG} --help"
        raise UsageError(f"{where}unrecognized arguments: {' '.join(extra)} (see '{hint}')")
    debug = bool(ns.global_debug or getattr(ns, "debug", False))
    ns.debug = debug
    if ns.version:
        print("\n".join(version_lines()))
        return 0
    if ns.command is None:
        raise UsageError(f"a command is required: {', '.join(COMMANDS)} (see '{PROG} --help')")
    if ns.command in ("mount", "umount"):
        from qedfuse import mount, umount

        run = mount.mount_main if ns.command == "mount" else umount.umount_main
        return int(run(ns))
    setup_logging(debug, level=logging.DEBUG if debug else logging.WARNING)
    return _HANDLERS[ns.command](ns)


def _first_command(args: list[str]) -> str | None:
    for arg in args:
        if arg in COMMANDS:
            return arg
        if arg not in GLOBAL_FLAGS:
            return None
    return None


__all__ = [
    "build_parser",
    "main",
    "mount_form",
    "unknown_command_message",
    "version_lines",
]
