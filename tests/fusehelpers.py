"""Real FUSE mounts for tests: the qedfuse CLI in a subprocess, always cleaned up.

``mounted(image, mnt, *opts)`` runs ``qedfuse mount -f [opts] IMAGE MNT`` (the real console
script), waits (with a deadline) until the mount serves, yields a :class:`Mounted`, and in
``finally`` unmounts if still mounted, waits for the daemon and checks its exit status.  With
``daemon=True`` it runs the daemonizing form instead (no ``-f``): the command must exit 0
only once the mount serves, and cleanup waits for the daemon's pid (read from the
``user.qedfuse.pid`` xattr) to disappear.

``loop_device(path)`` attaches a loop device and always detaches it (only ours).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import logcheck
from qededit import need_check as need_check  # the on-disk NEED_CHECK bit

from qedfuse.procfs import process_state
from qedfuse.registry import find_daemon
from support import describe, require_fuse, require_tool, run

QEDFUSE = str(Path(sys.executable).with_name("qedfuse"))
MOUNT_DEADLINE_S = 20.0
EXIT_DEADLINE_S = 60.0


def qedfuse(*args: str | os.PathLike[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the qedfuse CLI to completion."""
    return run([QEDFUSE, *args], timeout=timeout)


def mount_entry(mnt: str | os.PathLike[str]) -> tuple[str, str] | None:
    """(source, fstype) of the mount at ``mnt`` per /proc/self/mounts, or None."""
    target = os.path.abspath(mnt)
    found = None
    with open("/proc/self/mounts", encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[1].replace("\\040", " ") == target:
                found = (parts[0], parts[2])
    return found


def mounts_snapshot(under: str | os.PathLike[str]) -> list[str]:
    """The /proc/self/mounts lines whose source or target lies under ``under``.

    Other tests (and other people's benchmarks) mount and unmount concurrently, so only the
    entries a test could have caused are compared.
    """
    root = os.path.abspath(under).replace(" ", "\\040").rstrip("/") + "/"
    with open("/proc/self/mounts", encoding="utf-8") as f:
        lines = f.read().splitlines()
    return sorted(line for line in lines if any(part.startswith(root) for part in line.split()[:2]))


def daemon_pid(mnt: str | os.PathLike[str]) -> int:
    """The serving daemon's pid, from the registry ``qedfuse umount`` uses."""
    found = find_daemon(os.fspath(mnt))
    assert found is not None, f"no live qedfuse daemon registered for {mnt}"
    return found[0]


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    return process_state(pid) not in ("Z", "X", None)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate()`` with backoff until true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def fusermount_u(mnt: str | os.PathLike[str], *, lazy: bool = False) -> None:
    """Unmount, retrying briefly while the kernel still sees a busy mount."""
    args = ["fusermount3", "-uz" if lazy else "-u", os.fspath(mnt)]
    deadline = time.monotonic() + 10
    while mount_entry(mnt) is not None:
        cp = run(args, timeout=30)
        if cp.returncode == 0 or mount_entry(mnt) is None:
            return
        if time.monotonic() > deadline:
            run(["fusermount3", "-uz", os.fspath(mnt)], timeout=30)
            return
        time.sleep(0.1)


@dataclass
class Mounted:
    """A running mount: paths, the process, and the daemon's pid."""

    image: Path
    mnt: Path
    raw: Path
    proc: subprocess.Popen[bytes] | None
    pid: int
    log_path: Path
    expect_rc: int | None = 0
    returncode: int | None = None
    checked: bool = field(default=False)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait_exit(self, timeout: float = EXIT_DEADLINE_S) -> int | None:
        """Wait for the daemon to exit; its exit status in foreground mode, else None."""
        if self.proc is not None:
            try:
                self.returncode = self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    f"qedfuse daemon {self.pid} still running after {timeout:g} s\n{self.log()}"
                ) from None
            return self.returncode
        wait_until(lambda: not pid_alive(self.pid), timeout, f"daemon pid {self.pid} to exit")
        return None


def _start(
    image: Path, mnt: Path, opts: Sequence[str], daemon: bool, log_path: Path, raw_name: str
) -> Mounted:
    log_file = open(log_path, "wb")  # noqa: SIM115 - handed to the child, closed below
    try:
        if daemon:
            cp = subprocess.run(
                [QEDFUSE, "mount", *opts, os.fspath(image), os.fspath(mnt)],
                stdout=log_file,
                stderr=log_file,
                timeout=MOUNT_DEADLINE_S,
                check=False,
            )
            if cp.returncode != 0:
                raise AssertionError(
                    f"qedfuse mount exited {cp.returncode}\n{log_path.read_text(errors='replace')}"
                )
            # The command returned 0: the mount must serve *now*, without any waiting.
            assert mount_entry(mnt) is not None, "qedfuse mount returned 0 but nothing is mounted"
            assert (mnt / raw_name).exists(), f"{raw_name} missing right after mount returned"
            return Mounted(image, mnt, mnt / raw_name, None, daemon_pid(mnt), log_path)
        proc = subprocess.Popen(
            [QEDFUSE, "mount", "-f", *opts, os.fspath(image), os.fspath(mnt)],
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,
        )
    finally:
        log_file.close()

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(
                f"qedfuse mount -f exited {proc.returncode} before serving\n"
                f"{log_path.read_text(errors='replace')}"
            )
        return mount_entry(mnt) is not None and (mnt / raw_name).exists()

    try:
        wait_until(ready, MOUNT_DEADLINE_S, f"the mount at {mnt}")
    except BaseException:
        with contextlib.suppress(OSError):
            proc.kill()
        proc.wait(timeout=30)
        fusermount_u(mnt, lazy=True)
        raise
    return Mounted(image, mnt, mnt / raw_name, proc, proc.pid, log_path)


@contextlib.contextmanager
def mounted(
    image: str | os.PathLike[str],
    mnt: str | os.PathLike[str],
    *opts: str,
    daemon: bool = False,
    expect_rc: int | None = 0,
    raw_name: str | None = None,
    expect_log: Sequence[str] = (),
) -> Iterator[Mounted]:
    """Mount ``image`` at ``mnt`` with the real CLI; always unmount and reap the daemon.

    ``expect_rc`` is the daemon's expected exit status (foreground mode), None to not check.
    Once the daemon exited, a Traceback or WARNING-or-worse line in its log fails the test
    unless ``expect_log`` or the test's declared patterns match it (see logcheck.py).
    """
    require_fuse()
    image, mnt = Path(image), Path(mnt)
    mnt.mkdir(parents=True, exist_ok=True)
    if raw_name is None:
        raw_name = Path(image).stem + ".raw"
    log_path = mnt.parent / f"qedfuse-{mnt.name}.log"
    m = _start(image, mnt, opts, daemon, log_path, raw_name)
    m.expect_rc = expect_rc
    try:
        yield m
    finally:
        try:
            if mount_entry(mnt) is not None:
                fusermount_u(mnt)
            rc = m.wait_exit()
        except BaseException:
            if (m.proc is not None and m.proc.poll() is None) or (
                m.proc is None and pid_alive(m.pid)
            ):
                with contextlib.suppress(OSError):
                    os.kill(m.pid, signal.SIGKILL)
            if m.proc is not None:
                m.proc.wait(timeout=30)
            fusermount_u(mnt, lazy=True)
            raise
        if m.proc is not None and expect_rc is not None and rc != expect_rc:
            raise AssertionError(f"qedfuse daemon exited {rc}, expected {expect_rc}\n{m.log()}")
        problems = logcheck.daemon_log_problems(m.log(), expect_log)
        if problems:
            raise AssertionError(logcheck.failure_message(f"lines in {m.log_path}", problems))


@contextlib.contextmanager
def loop_device(path: str | os.PathLike[str]) -> Iterator[str]:
    """Attach a loop device to ``path``; always detach it (only the one we created)."""
    losetup = require_tool("losetup")
    cp = run([losetup, "-f", "--show", os.fspath(path)], timeout=60)
    if cp.returncode != 0:
        raise AssertionError(describe(cp))
    dev = cp.stdout.strip()
    try:
        yield dev
    finally:
        deadline = time.monotonic() + 20
        while True:
            cp = run([losetup, "-d", dev], timeout=60)
            if cp.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"could not detach {dev}\n{describe(cp)}")
            time.sleep(0.2)
        # `losetup -d` is asynchronous (autoclear): wait until the kernel let go of the file.
        name = os.path.basename(dev)
        wait_until(
            lambda: not os.path.exists(f"/sys/block/{name}/loop/backing_file"),
            20,
            f"{dev} to be released",
        )
