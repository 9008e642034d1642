"""The three things measured: (a) a qedfuse mount, (b) qemu-storage-daemon's FUSE export of
the same kind of QED image, (c) a plain preallocated raw file (the limit).

Each target is used as ``with target.session(workdir, image_size) as s:`` which creates a fresh
image, starts the daemon (if any), yields the raw file to run fio against and the daemon's
PID, and on exit stops the daemon (waiting until it has flushed and exited), runs
``qemu-img check`` on the image, and deletes it — also when the body raised.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.system import VENV_BIN, is_mounted, pid_alive, unmount, wait_until

CLUSTER_SIZE = 64 * 1024
#: How to run qedfuse; ``--qedfuse-cmd`` replaces it (e.g. to try a patched copy of the
#: package: ``env PYTHONPATH=/tmp/proto .venv/bin/python -m qedfuse``).
QEDFUSE_CMD: list[str] = [str(VENV_BIN / "qedfuse")]
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 120.0


class BenchError(RuntimeError):
    """A target could not be set up or torn down; the message says why."""


@dataclass
class CheckResult:
    rc: int
    output: str


@dataclass
class Session:
    """One target, one fresh image, one daemon lifetime."""

    target: str
    file: Path
    image: Path | None = None
    pid: int | None = None
    check: CheckResult | None = None
    daemon_rc: int | None = None
    daemon_log: str = ""
    notes: list[str] = field(default_factory=list)


def qemu_img_create(image: Path, size_bytes: int, cluster_size: int = CLUSTER_SIZE) -> None:
    cmd = ["qemu-img", "create", "-q", "-f", "qed", "-o", f"cluster_size={cluster_size}"]
    cp = subprocess.run(
        [*cmd, str(image), str(size_bytes)], capture_output=True, text=True, check=False
    )
    if cp.returncode != 0:
        raise BenchError(f"qemu-img create {image} failed: {cp.stderr.strip()}")


def qemu_img_check(image: Path) -> CheckResult:
    cp = subprocess.run(
        ["qemu-img", "check", str(image)], capture_output=True, text=True, check=False
    )
    return CheckResult(cp.returncode, (cp.stdout + cp.stderr).strip())


def _tail(path: Path, n_chars: int = 2000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-n_chars:].strip()


def _stop_process(proc: subprocess.Popen[bytes], mountpoint: Path, log: list[str]) -> int | None:
    """Wait for ``proc`` to exit; escalate to fusermount, SIGTERM and SIGKILL if it won't."""
    try:
        return proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        log.append(f"daemon {proc.pid} did not exit within {STOP_TIMEOUT_S:.0f} s; unmounting")
    unmount(mountpoint, fuse=True)
    with contextlib.suppress(subprocess.TimeoutExpired):
        return proc.wait(timeout=10)
    log.append(f"daemon {proc.pid} still running; SIGTERM")
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        return proc.wait(timeout=10)
    log.append(f"daemon {proc.pid} still running; SIGKILL")
    proc.kill()
    return proc.wait()


# --------------------------------------------------------------------------- (a) qedfuse


def qedfuse_command(image: Path, mountpoint: Path, opts: str) -> list[str]:
    cmd = [*QEDFUSE_CMD, "mount", "-f"]
    if opts:
        cmd += ["-o", opts]
    return [*cmd, str(image), str(mountpoint)]


@contextlib.contextmanager
def qedfuse_mount(image: Path, workdir: Path, opts: str = "") -> Iterator[Session]:
    """Mount ``image`` with ``qedfuse mount -f`` and yield the session (file = <stem>.raw)."""
    mountpoint = workdir / f"mnt-{image.stem}"
    mountpoint.mkdir(exist_ok=True)
    log_path = workdir / f"{image.stem}.daemon.log"
    raw = mountpoint / f"{image.stem}.raw"
    session = Session("qedfuse", raw, image=image)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            qedfuse_command(image, mountpoint, opts),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        up = wait_until(
            lambda: proc.poll() is not None or (is_mounted(mountpoint) and raw.exists()),
            START_TIMEOUT_S,
        )
        if proc.poll() is not None or not up:
            raise BenchError(
                f"qedfuse mount did not come up (rc={proc.poll()}):\n{_tail(log_path)}"
            )
        session.pid = proc.pid
        yield session
    finally:
        if is_mounted(mountpoint):
            cp = subprocess.run(
                [*QEDFUSE_CMD, "umount", "--wait", str(mountpoint)],
                capture_output=True,
                text=True,
                timeout=STOP_TIMEOUT_S + 30,
                check=False,
            )
            if cp.returncode != 0:
                session.notes.append(f"qedfuse umount --wait: rc {cp.returncode}: {cp.stderr}")
        session.daemon_rc = _stop_process(proc, mountpoint, session.notes)
        session.daemon_log = _tail(log_path)
        unmount(mountpoint, fuse=True)
        with contextlib.suppress(OSError):
            mountpoint.rmdir()


# --------------------------------------------------------------------------- (b) qsd


def qsd_command(image: Path, export_file: Path) -> list[str]:
    for p in (image, export_file):
        if "," in str(p):
            raise BenchError(f"QEMU option syntax: path must not contain ',': {p}")
    return [
        "qemu-storage-daemon",
        "--blockdev",
        f"driver=file,node-name=f,filename={image}",
        "--blockdev",
        "driver=qed,node-name=q,file=f",
        "--export",
        f"type=fuse,id=e,node-name=q,mountpoint={export_file},writable=on",
    ]


@contextlib.contextmanager
def qsd_export(image: Path, workdir: Path) -> Iterator[Session]:
    """Export ``image`` over a regular file with qemu-storage-daemon; SIGTERM stops it."""
    export_file = workdir / f"{image.stem}.export.raw"
    export_file.touch()
    log_path = workdir / f"{image.stem}.daemon.log"
    session = Session("qsd", export_file, image=image)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            qsd_command(image, export_file),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        if (
            not wait_until(
                lambda: proc.poll() is not None or is_mounted(export_file), START_TIMEOUT_S
            )
            or proc.poll() is not None
        ):
            raise BenchError(
                f"qemu-storage-daemon did not export (rc={proc.poll()}):\n{_tail(log_path)}"
            )
        session.pid = proc.pid
        yield session
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        session.daemon_rc = _stop_process(proc, export_file, session.notes)
        session.daemon_log = _tail(log_path)
        unmount(export_file, fuse=True)
        with contextlib.suppress(OSError):
            export_file.unlink()


# --------------------------------------------------------------------------- targets


class Target:
    """Base: ``key`` (qedfuse|qsd|raw), ``label`` for the report, ``describe()``."""

    key = ""
    label = ""
    has_daemon = True

    def describe(self, workdir: str = "DIR") -> str:
        raise NotImplementedError

    def session(self, workdir: Path, image_size: int) -> contextlib.AbstractContextManager[Session]:
        raise NotImplementedError


class QedfuseTarget(Target):
    key = "qedfuse"
    label = "qedfuse"

    def __init__(self, opts: str = "") -> None:
        self.opts = opts

    def describe(self, workdir: str = "DIR") -> str:
        img = Path(workdir) / "bench-qedfuse.qed"
        return shlex.join(qedfuse_command(img, Path(workdir) / "mnt-bench-qedfuse", self.opts))

    @contextlib.contextmanager
    def session(self, workdir: Path, image_size: int) -> Iterator[Session]:
        image = workdir / "bench-qedfuse.qed"
        qemu_img_create(image, image_size)
        try:
            with qedfuse_mount(image, workdir, self.opts) as s:
                yield s
            s.check = qemu_img_check(image)
        finally:
            with contextlib.suppress(OSError):
                image.unlink()


class QsdTarget(Target):
    key = "qsd"
    label = "qemu-storage-daemon"

    def describe(self, workdir: str = "DIR") -> str:
        img = Path(workdir) / "bench-qsd.qed"
        return shlex.join(qsd_command(img, Path(workdir) / "bench-qsd.export.raw"))

    @contextlib.contextmanager
    def session(self, workdir: Path, image_size: int) -> Iterator[Session]:
        image = workdir / "bench-qsd.qed"
        qemu_img_create(image, image_size)
        try:
            with qsd_export(image, workdir) as s:
                yield s
            s.check = qemu_img_check(image)
        finally:
            with contextlib.suppress(OSError):
                image.unlink()


class RawTarget(Target):
    key = "raw"
    label = "raw file (limit)"
    has_daemon = False

    def describe(self, workdir: str = "DIR") -> str:
        return f"posix_fallocate({Path(workdir) / 'bench-raw.img'}, 0, SIZE)"

    @contextlib.contextmanager
    def session(self, workdir: Path, image_size: int) -> Iterator[Session]:
        path = workdir / "bench-raw.img"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, image_size)
            finally:
                os.close(fd)
            yield Session("raw", path)
        finally:
            with contextlib.suppress(OSError):
                path.unlink()


def make_targets(keys: list[str], qedfuse_opts: str) -> list[Target]:
    table: dict[str, Target] = {
        "qedfuse": QedfuseTarget(qedfuse_opts),
        "qsd": QsdTarget(),
        "raw": RawTarget(),
    }
    return [table[k] for k in keys]


def daemon_alive(session: Session) -> bool:
    return session.pid is not None and pid_alive(session.pid)
