"""Machine facts, tool versions, per-process accounting from /proc, tmpfs and cache dropping."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = REPO_ROOT / ".venv" / "bin"

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def run_text(cmd: list[str], *, timeout: float = 60) -> str:
    """Run ``cmd`` and return its stdout (stripped); '' if it cannot run."""
    try:
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return cp.stdout.strip()


def first_line(text: str) -> str:
    return text.splitlines()[0] if text else "?"


# --------------------------------------------------------------------------- facts


def machine_info() -> dict[str, str]:
    """nproc, RAM, kernel, CPU model and the date, for the report header."""
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()),
        "ram": f"{mem_kib / 1024 / 1024:.1f} GiB",
        "kernel": platform.release(),
        "cpu": cpu,
        "os": _os_release(),
    }


def _os_release() -> str:
    with contextlib.suppress(OSError), open("/etc/os-release") as f:
        for line in f:
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    return "?"


def versions() -> dict[str, str]:
    """Versions of everything that shapes the numbers."""
    out: dict[str, str] = {}
    out["qemu-storage-daemon"] = first_line(run_text(["qemu-storage-daemon", "--version"]))
    out["qemu-img"] = first_line(run_text(["qemu-img", "--version"]))
    out["fio"] = run_text(["fio", "--version"]) or "?"
    out["python"] = sys.version.split()[0]
    try:
        import pyfuse3

        out["pyfuse3"] = str(pyfuse3.__version__)
    except ImportError:
        out["pyfuse3"] = "not installed"
    try:
        import trio

        out["trio"] = trio.__version__
    except ImportError:
        out["trio"] = "not installed"
    out["libfuse3"] = run_text(["pkg-config", "--modversion", "fuse3"]) or "?"
    out["qedfuse git rev"] = qedfuse_rev()
    return out


def qedfuse_source_hash() -> str:
    """Short hash of qedfuse/*.py as they are now: a mount imports the working tree, so this
    tells whether the code changed between mounts during one run."""
    h = hashlib.sha1()
    for path in sorted((REPO_ROOT / "qedfuse").glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:10]


def qedfuse_rev() -> str:
    """Short HEAD commit, with ``+dirty`` when qedfuse/ has uncommitted changes."""
    git = ["git", "-C", str(REPO_ROOT)]
    rev = run_text([*git, "rev-parse", "--short=10", "HEAD"]) or "?"
    if run_text([*git, "status", "--porcelain", "--", "qedfuse"]):
        rev += "+dirty"
    return rev


# --------------------------------------------------------------------------- /proc accounting


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def status_kib(pid: int, key: str) -> int:
    """A ``kB`` value (e.g. VmHWM, VmRSS) from /proc/PID/status, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (``echo 5 > clear_refs``, Linux ≥ 4.0)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def host_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return (total - idle) / _CLK_TCK, total / _CLK_TCK


def children_cpu_seconds() -> float:
    """CPU time of this process's waited-for children (fio and its job processes)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


# --------------------------------------------------------------------------- caches


def drop_caches() -> str | None:
    """sync, then drop page cache, dentries and inodes; the reason on failure, else None."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
    except OSError as exc:
        return f"cannot drop caches: {exc.strerror or exc}"
    return None


# --------------------------------------------------------------------------- mounts


def _unescape_mount(path: str) -> str:
    return path.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")


def mount_points() -> dict[str, str]:
    """Mount point → filesystem type, from /proc/self/mountinfo."""
    out: dict[str, str] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            out[_unescape_mount(left.split()[4])] = right.split()[0]
    return out


def is_mounted(path: str | os.PathLike[str]) -> bool:
    return os.path.abspath(path) in mount_points()


def wait_until(predicate: object, timeout: float, interval: float = 0.02) -> bool:
    """Poll ``predicate()`` until true or the deadline passes."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def unmount(path: str | os.PathLike[str], *, fuse: bool) -> None:
    """Unmount ``path``; falls back to a lazy unmount if it stays busy."""
    path = os.path.abspath(path)
    if not is_mounted(path):
        return
    cmd = ["fusermount3", "-u"] if fuse and shutil.which("fusermount3") else ["umount"]
    for _ in range(50):
        subprocess.run([*cmd, path], capture_output=True, check=False)
        if not is_mounted(path):
            return
        time.sleep(0.1)
    lazy = [*cmd[:-1], "-uz"] if cmd[0] == "fusermount3" else ["umount", "-l"]
    subprocess.run([*lazy, path], capture_output=True, check=False)


@contextlib.contextmanager
def tmpfs(size_bytes: int, parent: str | None = None) -> Iterator[Path]:
    """Mount a private tmpfs of ``size_bytes`` in a fresh temp dir; always unmounted after."""
    path = Path(tempfile.mkdtemp(prefix="qedfuse-bench-tmpfs-", dir=parent))
    try:
        cp = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0700", "tmpfs", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if cp.returncode != 0:
            raise RuntimeError(f"cannot mount a tmpfs at {path}: {cp.stderr.strip()}")
        try:
            yield path
        finally:
            unmount(path, fuse=False)
    finally:
        with contextlib.suppress(OSError):
            path.rmdir()


def free_bytes(path: str | os.PathLike[str]) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fs_type(path: str | os.PathLike[str]) -> str:
    """Filesystem type of the mount that holds ``path``."""
    real = os.path.realpath(path)
    mounts = mount_points()
    best = max((m for m in mounts if real == m or real.startswith(m.rstrip("/") + "/")), key=len)
    return mounts[best]
