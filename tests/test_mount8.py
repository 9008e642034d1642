"""mount(8), mount.fuse3 and fstab: qedfuse run the way administrators run it.

``mount -t fuse.qedfuse IMAGE DIR -o OPTS`` makes util-linux run /sbin/mount.fuse3, which runs
``qedfuse IMAGE DIR -o OPTS,dev,suid`` through /bin/sh with PATH reset to the system
directories: qedfuse is found only as /usr/local/bin/qedfuse (what ``make install`` creates).
The ``installed_qedfuse`` fixture creates that symlink to this checkout's .venv when it is
missing and removes it afterwards.

Every mount here is started with an empty environment (no PATH, no HOME), like a systemd
.mount unit, and ended with ``umount``; the tests then wait for the daemon to exit (umount does
not wait) and check the image was left flushed and clean.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qedfuse.format import Header
from qedfuse.registry import find_daemon
from support import check_ok, describe, require_fuse, require_tool, run

INSTALLED_QEDFUSE = Path("/usr/local/bin/qedfuse")
VENV_QEDFUSE = Path(sys.executable).with_name("qedfuse")
MOUNT_TIMEOUT_S = 30
EXIT_TIMEOUT_S = 30

pytestmark = [pytest.mark.fuse, pytest.mark.qemu, pytest.mark.timeout(120)]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def installed_qedfuse() -> Iterator[Path]:
    """Make /usr/local/bin/qedfuse this checkout's entry point for the duration of the tests."""
    require_fuse()
    require_tool("mount.fuse3")
    if not VENV_QEDFUSE.exists():
        pytest.fail(f"{VENV_QEDFUSE} missing: run `make venv`")
    target = VENV_QEDFUSE.resolve()
    if INSTALLED_QEDFUSE.exists() and INSTALLED_QEDFUSE.resolve() == target:
        yield INSTALLED_QEDFUSE  # `make install` was run for this checkout
        return
    if INSTALLED_QEDFUSE.exists() or INSTALLED_QEDFUSE.is_symlink():
        pytest.fail(
            f"{INSTALLED_QEDFUSE} exists but is not {target}; not replacing another "
            "installation (run `make install` from this checkout, or remove it)",
            pytrace=False,
        )
    if os.geteuid() != 0:
        pytest.fail(f"creating {INSTALLED_QEDFUSE} needs root", pytrace=False)
    INSTALLED_QEDFUSE.symlink_to(target)
    try:
        yield INSTALLED_QEDFUSE
    finally:
        if INSTALLED_QEDFUSE.is_symlink() and INSTALLED_QEDFUSE.resolve() == target:
            INSTALLED_QEDFUSE.unlink()


@dataclass
class Image:
    path: Path
    mnt: Path
    raw: Path


@pytest.fixture
def image(tmp_path: Path, installed_qedfuse: Path) -> Iterator[Image]:
    """A 64 MiB QED image with 0x5a at [1 MiB, 1 MiB + 64 KiB) and an empty mount point."""
    qemu_img, qemu_io = require_tool("qemu-img"), require_tool("qemu-io")
    path = tmp_path / "disk.qed"
    check_ok(run([qemu_img, "create", "-q", "-f", "qed", path, "64M"]))
    check_ok(run([qemu_io, "-f", "qed", "-c", "write -P 0x5a 1M 64k", path]))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    img = Image(path, mnt, mnt / "disk.raw")
    try:
        yield img
    finally:
        if mount_entry(mnt) is not None:
            pid = daemon_pid(mnt)
            run(["umount", "-l", mnt])
            if pid is not None:
                wait_gone(pid, timeout_s=10, kill=True)


# --------------------------------------------------------------------------- helpers


def _unescape(field: str) -> str:
    """Undo /proc/mounts octal escapes (\\040 space, \\011 tab, \\012 newline, \\134 \\)."""
    return field.encode().decode("unicode_escape")


def mount_entry(mnt: Path) -> tuple[str, str, list[str]] | None:
    """(source, fstype, options) of the mount on ``mnt`` from /proc/mounts, or None."""
    found = None
    for line in Path("/proc/mounts").read_text().splitlines():
        source, target, fstype, options, *_ = line.split()
        if _unescape(target) == str(mnt):
            found = (_unescape(source), fstype, options.split(","))  # last one is on top
    return found


def admin_env() -> dict[str, str]:
    """The environment of a systemd .mount unit: nothing (mount(8) sets PATH itself)."""
    return {}


def mount8(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return run(["mount", *args], env=admin_env(), timeout=MOUNT_TIMEOUT_S)


def umount8(mnt: Path) -> subprocess.CompletedProcess[str]:
    return run(["umount", mnt], env=admin_env(), timeout=MOUNT_TIMEOUT_S)


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _proc_scan(mnt: Path) -> list[int]:
    """PIDs of live qedfuse processes whose command line names ``mnt``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        argv = _cmdline(int(entry.name))
        is_qedfuse = any(a.endswith("qedfuse") for a in argv[:2])
        if is_qedfuse and str(mnt) in argv and _alive(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def daemon_pid(mnt: Path) -> int | None:
    """The serving daemon's PID: the registry ``qedfuse umount`` uses, else a /proc scan."""
    found = find_daemon(str(mnt))
    if found is not None:
        return found[0]
    pids = _proc_scan(mnt)
    return pids[0] if len(pids) == 1 else None


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie counts as gone (PID 1 may be slow to reap)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def wait_gone(pid: int, timeout_s: float = EXIT_TIMEOUT_S, *, kill: bool = False) -> float:
    """Poll until ``pid`` has exited; return the seconds waited (fail, or kill, on timeout)."""
    start = time.monotonic()
    while _alive(pid):
        if time.monotonic() - start > timeout_s:
            if kill:
                os.kill(pid, 9)
                return time.monotonic() - start
            pytest.fail(f"qedfuse daemon {pid} still running {timeout_s} s after umount")
        time.sleep(0.02)
    return time.monotonic() - start


def assert_clean(path: Path) -> None:
    header = Header.unpack(path.read_bytes()[:64])
    assert not header.need_check, "QED need-check flag still set after the daemon exited"
    check_ok(run([require_tool("qemu-img"), "check", "-f", "qed", path]))


def assert_pattern(path: Path, pattern: int, offset: str, length: str) -> None:
    cp = check_ok(
        run(
            [
                require_tool("qemu-io"),
                "-f",
                "qed",
                "-r",
                "-c",
                f"read -P {pattern:#x} {offset} {length}",
                path,
            ]
        )
    )
    assert "Pattern verification failed" not in cp.stdout, cp.stdout


def mounted(img: Image, cp: subprocess.CompletedProcess[str]) -> tuple[list[str], int]:
    """Check a mount command succeeded and the mount serves; return (options, daemon pid)."""
    assert cp.returncode == 0, describe(cp)
    entry = mount_entry(img.mnt)
    assert entry is not None, f"mount exited 0 but nothing is mounted on {img.mnt}"
    source, fstype, options = entry
    assert (source, fstype) == (str(img.path), "fuse.qedfuse"), entry
    # mount returned: the daemon serves now (it daemonized after the mount was ready)
    with img.raw.open("rb") as f:
        f.seek(1 << 20)
        assert f.read(65536) == b"\x5a" * 65536
    pid = daemon_pid(img.mnt)
    assert pid is not None, f"cannot find the qedfuse daemon for {img.mnt}"
    assert str(img.mnt) in _cmdline(pid), _cmdline(pid)
    return options, pid


def unmount_and_wait(img: Image, pid: int) -> float:
    """``umount``, then wait for the daemon; return seconds from umount to daemon exit."""
    start = time.monotonic()
    check_ok(umount8(img.mnt))
    assert mount_entry(img.mnt) is None
    wait_gone(pid)
    return time.monotonic() - start


# --------------------------------------------------------------------------- tests


def test_mount8_read_write(image: Image) -> None:
    start = time.monotonic()
    cp = mount8("-t", "fuse.qedfuse", image.path, image.mnt, "-o", "allow_other,noatime")
    mount_s = time.monotonic() - start
    options, pid = mounted(image, cp)
    assert "rw" in options
    assert "noatime" in options
    with image.raw.open("r+b") as f:
        f.seek(4 << 20)
        f.write(b"\xa5" * 65536)
    # no fsync: closing flushes (flush on close for writers); umount must not undo that
    exit_s = unmount_and_wait(image, pid)
    assert_clean(image.path)
    assert_pattern(image.path, 0xA5, "4M", "64k")
    assert_pattern(image.path, 0x5A, "1M", "64k")
    print(f"mount(8) rw: mount {mount_s:.2f} s, umount to daemon exit {exit_s:.2f} s")


def test_mount8_read_only(image: Image) -> None:
    before = hashlib.sha256(image.path.read_bytes()).hexdigest()
    mtime_before = image.path.stat().st_mtime_ns
    cp = mount8("-t", "fuse.qedfuse", "-o", "ro,allow_other", image.path, image.mnt)
    options, pid = mounted(image, cp)
    assert options[0] == "ro", options
    with pytest.raises(OSError, match="Read-only") as excinfo:
        os.open(image.raw, os.O_WRONLY)
    assert excinfo.value.errno == errno.EROFS
    with pytest.raises(OSError, match="Read-only") as excinfo:
        os.truncate(image.raw, 0)
    assert excinfo.value.errno == errno.EROFS
    unmount_and_wait(image, pid)
    # a read-only mount never writes the image: not even the need-check flag
    assert hashlib.sha256(image.path.read_bytes()).hexdigest() == before
    assert image.path.stat().st_mtime_ns == mtime_before
    assert_clean(image.path)


def test_fstab_line_with_systemd_and_boot_options(image: Image, tmp_path: Path) -> None:
    """``mount --fstab FILE DIR`` with the options real fstab lines carry (no /etc/fstab)."""
    fstab = tmp_path / "fstab"
    options = [
        "defaults",
        "rw",
        "allow_other",
        "noatime",
        "nofail",
        "_netdev",
        "noauto",
        "x-systemd.automount",
        "x-systemd.idle-timeout=10min",
        f"x-systemd.requires-mounts-for={image.path}",
        "x-systemd.mount-timeout=30",
        "comment=managed-by-test",
    ]
    fstab.write_text(f"# test\n{image.path} {image.mnt} fuse.qedfuse {','.join(options)} 0 0\n")
    check_ok(run(["findmnt", "--verify", "--tab-file", fstab]))
    options_seen, pid = mounted(image, mount8("--fstab", fstab, image.mnt))
    assert "rw" in options_seen
    with image.raw.open("r+b") as f:
        f.seek(2 << 20)
        f.write(b"\x77" * 4096)
        f.flush()
        os.fsync(f.fileno())
    unmount_and_wait(image, pid)
    assert_clean(image.path)
    assert_pattern(image.path, 0x77, "2M", "4k")


def test_mount_fuse3_passes_systemd_options_through(image: Image) -> None:
    """Called directly (as some tools do), mount.fuse3 keeps x-systemd.* and adds dev,suid."""
    mount_fuse3 = require_tool("mount.fuse3")
    cp = run(
        [
            mount_fuse3,
            image.path,
            image.mnt,
            "-t",
            "fuse.qedfuse",
            "-o",
            "ro,noatime,allow_other,_netdev,nofail,x-systemd.automount,"
            "x-systemd.idle-timeout=1min,X-mount.mkdir,comment=x,defaults",
        ],
        env=admin_env(),
        timeout=MOUNT_TIMEOUT_S,
    )
    options, pid = mounted(image, cp)
    assert "ro" in options
    # dev,suid appended by mount.fuse3 reach the kernel (as root): the option was passed on
    assert "nodev" not in options
    unmount_and_wait(image, pid)
    assert_clean(image.path)


@pytest.mark.parametrize("problem", ["missing", "not-qed"])
def test_mount8_reports_bad_images(image: Image, problem: str) -> None:
    """Errors reach mount(8)'s caller: non-zero exit, a message, and nothing left mounted."""
    if problem == "missing":
        bad = image.path.with_name("absent.qed")
    else:
        bad = image.path.with_name("text.qed")
        bad.write_bytes(b"this is not a QED image\n" * 100)
    cp = mount8("-t", "fuse.qedfuse", bad, image.mnt)
    assert cp.returncode != 0, describe(cp)
    assert "qedfuse" in cp.stderr, describe(cp)
    assert "Traceback" not in cp.stderr, describe(cp)
    assert mount_entry(image.mnt) is None
    assert _proc_scan(image.mnt) == [], "a qedfuse process outlived its failed mount"


def test_mount8_refuses_unknown_option(image: Image) -> None:
    cp = mount8("-t", "fuse.qedfuse", "-o", "no_such_option", image.path, image.mnt)
    assert cp.returncode != 0, describe(cp)
    assert "no_such_option" in cp.stderr, describe(cp)
    assert mount_entry(image.mnt) is None
    assert_clean(image.path)


def test_mount8_awkward_paths(tmp_path: Path, installed_qedfuse: Path) -> None:
    """Spaces, commas and quotes survive mount.fuse3's /bin/sh and the fsname= option;
    a relative image path is resolved against mount(8)'s working directory."""
    qemu_img, qemu_io = require_tool("qemu-img"), require_tool("qemu-io")
    folder = tmp_path / "vm images, 'old'"
    folder.mkdir()
    path = folder / "my disk,1.qed"
    check_ok(run([qemu_img, "create", "-q", "-f", "qed", path, "16M"]))
    check_ok(run([qemu_io, "-f", "qed", "-c", "write -P 0x5a 1M 64k", path]))
    mnt = tmp_path / "mnt point"
    mnt.mkdir()
    img = Image(path, mnt, mnt / "my disk,1.raw")
    cp = run(
        ["mount", "-t", "fuse.qedfuse", path.relative_to(tmp_path), mnt.relative_to(tmp_path)],
        env=admin_env(),
        cwd=tmp_path,
        timeout=MOUNT_TIMEOUT_S,
    )
    try:
        _, pid = mounted(img, cp)
        found = find_daemon(str(mnt))
        assert found is not None
        assert found[1] == str(path)
        unmount_and_wait(img, pid)
    finally:
        if mount_entry(mnt) is not None:
            run(["umount", "-l", mnt])
    assert_clean(path)


def test_mount8_remount_is_refused_and_harmless(image: Image) -> None:
    """``mount -o remount,ro`` is not supported: a clear error, the mount keeps serving."""
    _, pid = mounted(image, mount8("-t", "fuse.qedfuse", image.path, image.mnt))
    cp = mount8("-o", "remount,ro", image.mnt)
    assert cp.returncode != 0, describe(cp)
    assert "remount" in cp.stderr, describe(cp)
    entry = mount_entry(image.mnt)
    assert entry is not None
    assert "rw" in entry[2]
    assert daemon_pid(image.mnt) == pid
    with image.raw.open("r+b") as f:
        f.write(b"\x11" * 512)
    unmount_and_wait(image, pid)
    assert_clean(image.path)
    assert_pattern(image.path, 0x11, "0", "512")


def test_mount8_drop_privileges_never_leaves_a_dead_mount(image: Image) -> None:
    """``-o drop_privileges``: mount.fuse3 mounts by itself and passes ``/dev/fd/N`` as the
    mount point (libfuse >= 3.3 accepts that). qedfuse must serve it, or fail without leaving
    the kernel mount mount.fuse3 made behind ("Transport endpoint is not connected")."""
    cp = mount8("-t", "fuse.qedfuse", "-o", "drop_privileges", image.path, image.mnt)
    entry = mount_entry(image.mnt)
    if cp.returncode != 0:
        assert entry is None, f"failed mount left a dead mount: {entry}\n{describe(cp)}"
        return
    assert entry is not None, describe(cp)
    assert entry[1] == "fuse.qedfuse", entry
    with image.raw.open("rb") as f:
        f.seek(1 << 20)
        assert f.read(65536) == b"\x5a" * 65536
    pid = daemon_pid(image.mnt)
    assert pid is not None
    unmount_and_wait(image, pid)
    assert_clean(image.path)
