"""Helpers shared by the qedfuse tests: external tools, FUSE availability, subprocesses.

Tests that need an external tool (qemu-img, fio, mkfs.ext4, ...) or a real FUSE mount call
`require_tool()` / `require_fuse()` from the test or a fixture.  On a developer machine a
missing tool skips the test with a stated reason; when `QEDFUSE_REQUIRE_TOOLS=1` or
`CI=true` it fails the test instead, so CI can never pass by skipping the real thing.

Import as `from support import require_tool` (tests/ is on pytest's pythonpath).
"""

from __future__ import annotations

import errno
import os
import random
import shlex
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn, TypeVar

import pytest

T = TypeVar("T")

# mkfs.ext4, e2fsck etc. live in sbin, which a non-root user's PATH often lacks.
_EXTRA_PATH = ("/usr/local/sbin", "/usr/sbin", "/sbin")

PathT = TypeVar("PathT", bound=str | os.PathLike[str])

# Keep assertion messages readable when a tool prints a lot.
_MAX_OUTPUT = 8000


def tools_required() -> bool:
    """True when a missing tool must fail the test instead of skipping it."""
    return os.environ.get("QEDFUSE_REQUIRE_TOOLS") == "1" or os.environ.get("CI") == "true"


def _unavailable(reason: str) -> NoReturn:
    if tools_required():
        pytest.fail(
            f"{reason} (a failure, not a skip, because QEDFUSE_REQUIRE_TOOLS=1 or CI=true; "
            "run `make deps`)",
            pytrace=False,
        )
    pytest.skip(reason)


def require_tool(name: str) -> str:
    """Return the absolute path of executable `name`, or skip/fail the test if missing."""
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), *_EXTRA_PATH])
    path = shutil.which(name, path=search)
    if path is None:
        _unavailable(f"{name} not installed")
    return os.path.abspath(path)


def require_fuse() -> None:
    """Skip/fail the test unless /dev/fuse is openable read-write and fusermount3 exists."""
    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        _unavailable(f"/dev/fuse not usable: {exc.strerror or exc}")
    else:
        os.close(fd)
    require_tool("fusermount3")


def run(
    cmd: Sequence[str | os.PathLike[str]], *, timeout: float = 120, **kw: Any
) -> subprocess.CompletedProcess[str]:
    """Run `cmd` and return the result; never raises on a non-zero exit status.

    Defaults: text=True, capture_output=True, check=False, timeout=120 s.  Any of these can
    be overridden through keyword arguments, which are passed on to `subprocess.run`.
    """
    opts: dict[str, Any] = {"text": True, "check": False}
    if "stdout" not in kw and "stderr" not in kw:
        opts["capture_output"] = True
    opts.update(kw)
    return subprocess.run([os.fspath(c) for c in cmd], timeout=timeout, **opts)


def _clip(text: str | bytes | None) -> str:
    if text is None:
        return "<not captured>"
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    if len(text) > _MAX_OUTPUT:
        text = text[: _MAX_OUTPUT // 2] + "\n[... output clipped ...]\n" + text[-_MAX_OUTPUT // 2 :]
    return text.rstrip("\n") or "<empty>"


def describe(cp: subprocess.CompletedProcess[Any]) -> str:
    """Multi-line description of a finished command: argv, exit status, stdout, stderr."""
    args = cp.args if isinstance(cp.args, str) else shlex.join(os.fspath(a) for a in cp.args)
    return (
        f"command: {args}\n"
        f"exit status: {cp.returncode}\n"
        f"--- stdout ---\n{_clip(cp.stdout)}\n"
        f"--- stderr ---\n{_clip(cp.stderr)}"
    )


def check_ok(
    cp: subprocess.CompletedProcess[str], returncode: int = 0
) -> subprocess.CompletedProcess[str]:
    """Assert that `cp` exited with `returncode` (default 0); the message has its output."""
    if cp.returncode != returncode:
        raise AssertionError(f"expected exit status {returncode}\n{describe(cp)}")
    return cp


def sampled(cases: Sequence[T], k: int, label: str) -> list[T]:
    """``k`` of ``cases`` (in their order), drawn with the run's seed (tests/conftest.py);
    every case with ``--run-soak`` or ``QEDFUSE_SAMPLE_SEED=all``."""
    seed = os.environ.get("QEDFUSE_SAMPLE_SEED", "all")
    if seed == "all" or k >= len(cases):
        return list(cases)
    keep = sorted(random.Random(f"{seed}:{label}").sample(range(len(cases)), k))
    return [cases[i] for i in keep]


def open_files(pid: int) -> list[tuple[str, int]]:
    """(target, size in bytes) of every file descriptor ``pid`` holds now; [] once it is gone.
    An unnamed or deleted file's target ends in `` (deleted)``."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    out = []
    for fd in fds:
        try:
            out.append(
                (os.readlink(f"/proc/{pid}/fd/{fd}"), os.stat(f"/proc/{pid}/fd/{fd}").st_size)
            )
        except OSError:
            continue  # closed meanwhile
    return out


def qemu_img_create(path: PathT, size: str | int, *opts: str, qemu_img: str | None = None) -> PathT:
    """``qemu-img create -q -f qed [-o OPT,...] PATH SIZE`` (must succeed); returns ``path``."""
    args: list[str | os.PathLike[str]] = [qemu_img or require_tool("qemu-img"), "create", "-q"]
    args += ["-f", "qed", *(["-o", ",".join(opts)] if opts else []), path, str(size)]
    check_ok(run(args))
    return path


def data_ranges(path: str | os.PathLike[str]) -> Iterator[tuple[int, int]]:
    """(start, end) of the allocated ranges of a sparse file (SEEK_DATA/SEEK_HOLE)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    return
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            yield start, end
            pos = end
    finally:
        os.close(fd)
