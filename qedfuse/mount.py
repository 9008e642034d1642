"""Mount lifecycle: parse, validate, daemonize, serve, close (stub; being written)."""

from __future__ import annotations

import argparse
import sys


def configure_mount_parser(p: argparse.ArgumentParser) -> None:
    """Add the `qedfuse mount` arguments to *p*."""
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTS")
    p.add_argument("--pidfile", default=None)
    p.add_argument("--systemd", action="store_true")
    p.add_argument("--overlay", default=None, metavar="NEW.qed")
    p.add_argument("-d", "--debug", action="store_true")
    p.add_argument("--debug-fuse", action="store_true")
    p.add_argument("image")
    p.add_argument("mountpoint")


def configure_umount_parser(p: argparse.ArgumentParser) -> None:
    """Add the `qedfuse umount` arguments to *p*."""
    p.add_argument("--wait", action="store_true")
    p.add_argument("--lazy", action="store_true")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("mountpoint")


def mount_main(ns: argparse.Namespace) -> int:
    """Run `qedfuse mount`; returns the exit status."""
    print("qedfuse: mount is not implemented yet", file=sys.stderr)
    return 1


def umount_main(ns: argparse.Namespace) -> int:
    """Run `qedfuse umount`; returns the exit status."""
    print("qedfuse: umount is not implemented yet", file=sys.stderr)
    return 1
