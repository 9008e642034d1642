"""qedfuse: expose a QED (QEMU Enhanced Disk) image as a raw file through FUSE."""

from __future__ import annotations

from typing import NoReturn

#: The version, in this one place (pyproject.toml reads it from here).
__version__ = "0.1.0"


def console_main() -> NoReturn:
    """The ``qedfuse`` console script.

    It lives here, not in :mod:`qedfuse.cli`, so that a Ctrl-C while the command line's
    modules (trio, …) are still being imported also ends with one line and status 130.
    """
    import signal
    import sys

    try:
        from qedfuse.cli import main

        code = main()
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the line
        sys.stderr.write("qedfuse: interrupted\n")
        code = 128 + signal.SIGINT
    raise SystemExit(code)
