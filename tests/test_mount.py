"""The mount: the FUSE handlers in-process, and the real CLI's lifecycle through real mounts.

In-process tests call :class:`qedfuse.fs.QedFS` handlers directly (ctx is unused) on an image
in memory: they pin the errno contract and the one error guard.  Every other test runs the
real ``qedfuse`` console script and a real FUSE mount (tests/fusehelpers.py): start-up errors,
daemonizing, signals, external unmount, ``qedfuse umount`` and ``--overlay``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pyfuse3
import pytest
import qededit
import trio
from fusehelpers import (
    QEDFUSE,
    daemon_pid,
    fusermount_u,
    mount_entry,
    mounted,
    mounts_snapshot,
    need_check,
    pid_alive,
    qedfuse,
    wait_until,
)
from pyfuse3 import FUSEError

from qedfuse.engine import QedImage
from qedfuse.errors import CorruptionError, ReadOnlyError
from qedfuse.fs import FILE_INODE, ROOT_INODE, QedFS, raw_file_name
from qedfuse.imagefile import MemoryImage
from qedfuse.opening import open_image
from qedfuse.tables import create_image
from support import check_ok, qemu_img_create, require_tool, run

MiB = 1024 * 1024
CTX = cast(pyfuse3.RequestContext, None)  # handlers never look at the request context


# ---------------------------------------------------------------------------- in-process


async def _image(size: int = 4 * MiB, *, read_only: bool = False) -> QedImage:
    memory = MemoryImage()
    await create_image(memory, size, cluster_size=4096, table_size=1)
    return await open_image(memory, read_only=read_only)


def _fs(image: QedImage, **kw: object) -> QedFS:
    return QedFS(image, file_name="disk.raw", image_path="/nonexistent/disk.qed", **kw)  # type: ignore[arg-type]


@dataclass
class _FieldFlags:
    """Stand-in for pyfuse3.SetattrFields (whose attributes are read-only)."""

    update_size: bool = False
    update_mode: bool = False
    update_uid: bool = False
    update_gid: bool = False
    update_atime: bool = False
    update_mtime: bool = False
    update_ctime: bool = False


def Fields(**updates: bool) -> pyfuse3.SetattrFields:
    """A SetattrFields with the given ``update_*`` flags set (the real one is read-only)."""
    return cast(pyfuse3.SetattrFields, _FieldFlags(**updates))


def errno_of(fn: Callable[..., object], *args: object) -> int:
    """The errno of the OSError ``fn(*args)`` raises (fails if it raises none)."""
    try:
        result = fn(*args)
    except OSError as exc:
        return exc.errno if exc.errno is not None else -1
    if hasattr(result, "close"):
        result.close()
    raise AssertionError(f"{fn.__name__}{args} did not fail")


def _errno(exc_info: pytest.ExceptionInfo[FUSEError]) -> int:
    return exc_info.value.errno


def test_raw_file_name() -> None:
    assert raw_file_name("/a/disk.qed") == "disk.raw"
    assert raw_file_name("disk") == "disk.raw"
    assert raw_file_name("/a/b.c.qed") == "b.c.raw"
    assert raw_file_name("/a/.hidden") == ".hidden.raw"


async def test_lookup_getattr_and_modes() -> None:
    image = await _image()
    fs = _fs(image)
    root = await fs.lookup(ROOT_INODE, b".", CTX)
    assert root.st_ino == ROOT_INODE
    assert stat.S_ISDIR(root.st_mode)
    assert (await fs.lookup(ROOT_INODE, b"..", CTX)).st_ino == ROOT_INODE
    attr = await fs.lookup(ROOT_INODE, b"disk.raw", CTX)
    assert attr.st_ino == FILE_INODE
    assert stat.S_ISREG(attr.st_mode)
    assert stat.S_IMODE(attr.st_mode) == 0o600
    assert stat.S_IMODE(root.st_mode) == 0o500  # the directory is fixed: no write bits
    assert attr.st_size == 4 * MiB
    assert attr.st_blksize == 4096  # the cluster size
    with pytest.raises(FUSEError) as info:
        await fs.lookup(ROOT_INODE, b"other", CTX)
    assert _errno(info) == errno.ENOENT
    with pytest.raises(FUSEError) as info:
        await fs.getattr(pyfuse3.InodeT(3), CTX)
    assert _errno(info) == errno.ENOENT
    shared = _fs(image, umask=0o022, uid=1234, gid=5678)
    attr = await shared.getattr(FILE_INODE, CTX)
    assert (stat.S_IMODE(attr.st_mode), attr.st_uid, attr.st_gid) == (0o644, 1234, 5678)
    ro = _fs(await _image(read_only=True), umask=0o022)
    assert stat.S_IMODE((await ro.getattr(FILE_INODE, CTX)).st_mode) == 0o444


async def test_read_and_write_at_the_end() -> None:
    image = await _image()
    fs = _fs(image)
    fi = await fs.open(FILE_INODE, os.O_RDWR, CTX)
    size = image.image_size
    assert await fs.write(fi.fh, size - 4096, b"x" * 8192) == 4096  # crosses the end: short
    assert await fs.read(fi.fh, size - 4096, 8192) == b"x" * 4096  # short read at the end
    assert await fs.read(fi.fh, size, 4096) == b""
    assert await fs.read(fi.fh, size + 10 * MiB, 4096) == b""
    for pos in (size, size + 1, size + 10 * MiB):
        with pytest.raises(FUSEError) as info:
            await fs.write(fi.fh, pos, b"y")
        assert _errno(info) == errno.ENOSPC
    assert await fs.write(fi.fh, 1, b"abc") == 3
    assert await fs.read(fi.fh, 0, 5) == b"\0abc\0"
    await fs.fsync(fi.fh, False)
    assert not image.header.need_check  # fsync = the ordered flush, NEED_CHECK cleared
    await fs.release(fi.fh)


async def test_setattr_size_mode_and_times() -> None:
    image = await _image()
    fs = _fs(image)
    attr = pyfuse3.EntryAttributes()
    attr.st_size = 8 * MiB
    grown = await fs.setattr(FILE_INODE, attr, Fields(update_size=True), None, CTX)
    assert grown.st_size == 8 * MiB == image.image_size
    for size, code in (
        (4 * MiB, errno.EOPNOTSUPP),
        (8 * MiB + 1, errno.EINVAL),
        (1 << 62, errno.EFBIG),
    ):
        attr.st_size = size
        with pytest.raises(FUSEError) as info:
            await fs.setattr(FILE_INODE, attr, Fields(update_size=True), None, CTX)
        assert _errno(info) == code, size
    assert image.image_size == 8 * MiB
    attr.st_size = 8 * MiB  # same size: a no-op
    await fs.setattr(FILE_INODE, attr, Fields(update_size=True), None, CTX)
    attr.st_mode = pyfuse3.ModeT(0o640)
    attr.st_mtime_ns = 1_000_000_000
    changed = await fs.setattr(
        FILE_INODE, attr, Fields(update_mode=True, update_mtime=True), None, CTX
    )
    assert stat.S_IMODE(changed.st_mode) == 0o640
    assert stat.S_ISREG(changed.st_mode)
    assert changed.st_mtime_ns == 1_000_000_000
    # open(O_TRUNC) is ignored, as on a block device: the disk keeps its size
    fi = await fs.open(FILE_INODE, os.O_WRONLY | os.O_TRUNC, CTX)
    await fs.release(fi.fh)
    assert image.image_size == 8 * MiB


async def test_read_only_refuses_writes() -> None:
    fs = _fs(await _image(read_only=True))
    with pytest.raises(FUSEError) as info:
        await fs.open(FILE_INODE, os.O_RDWR, CTX)
    assert _errno(info) == errno.EROFS
    fi = await fs.open(FILE_INODE, os.O_RDONLY, CTX)
    with pytest.raises(FUSEError) as info:
        await fs.write(fi.fh, 0, b"x")
    assert _errno(info) == errno.EROFS
    attr = pyfuse3.EntryAttributes()
    attr.st_mode = pyfuse3.ModeT(0o600)
    with pytest.raises(FUSEError) as info:
        await fs.setattr(FILE_INODE, attr, Fields(update_mode=True), None, CTX)
    assert _errno(info) == errno.EROFS
    attr.st_size = 8 * MiB
    with pytest.raises(FUSEError) as info:
        await fs.setattr(FILE_INODE, attr, Fields(update_size=True), None, CTX)
    assert _errno(info) == errno.EROFS


async def test_directory_is_fixed() -> None:
    fs = _fs(await _image())
    name = pyfuse3.FileNameT(b"new")
    mode = pyfuse3.ModeT(0o644)
    calls = [
        fs.create(ROOT_INODE, name, mode, pyfuse3.FlagT(os.O_RDWR), CTX),
        fs.mknod(ROOT_INODE, name, mode, 0, CTX),
        fs.mkdir(ROOT_INODE, name, mode, CTX),
        fs.symlink(ROOT_INODE, name, pyfuse3.FileNameT(b"disk.raw"), CTX),
        fs.link(FILE_INODE, ROOT_INODE, name, CTX),
        fs.unlink(ROOT_INODE, pyfuse3.FileNameT(b"disk.raw"), CTX),
        fs.rmdir(ROOT_INODE, name, CTX),
        fs.rename(
            ROOT_INODE, pyfuse3.FileNameT(b"disk.raw"), ROOT_INODE, name, pyfuse3.FlagT(0), CTX
        ),
    ]
    for call in calls:
        with pytest.raises(FUSEError) as info:
            await call
        assert _errno(info) == errno.EPERM


async def test_xattrs_answer_enosys_so_the_kernel_stops_asking() -> None:
    fs = _fs(await _image())
    for inode in (ROOT_INODE, FILE_INODE):
        with pytest.raises(FUSEError) as info:
            await fs.getxattr(inode, pyfuse3.XAttrNameT(b"security.capability"), CTX)
        assert _errno(info) == errno.ENOSYS
        with pytest.raises(FUSEError) as info:
            await fs.listxattr(inode, CTX)
        assert _errno(info) == errno.ENOSYS


@pytest.mark.expect_log(
    r"unexpected error in the read of guest bytes \d+\+\d+",
    r"entering failsafe mode: unexpected ZeroDivisionError in read of guest bytes \d+\+\d+",
)
async def test_guard_turns_a_bug_into_eio_and_failsafe(monkeypatch: pytest.MonkeyPatch) -> None:
    image = await _image()
    fs = _fs(image)
    fi = await fs.open(FILE_INODE, os.O_RDWR, CTX)
    assert await fs.write(fi.fh, 0, b"before") == 6

    async def boom(pos: int, size: int) -> bytes:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(image, "read", boom)
    with pytest.raises(FUSEError) as info:
        await fs.read(fi.fh, 0, 6)
    assert _errno(info) == errno.EIO
    assert image.failsafe  # a bug stops writes ...
    monkeypatch.undo()
    assert await fs.read(fi.fh, 0, 6) == b"before"  # ... but reads keep being served
    with pytest.raises(FUSEError) as info:
        await fs.write(fi.fh, 0, b"after")
    assert _errno(info) == errno.EIO
    attr = await fs.getattr(FILE_INODE, CTX)
    assert attr.st_size == image.image_size


@pytest.mark.parametrize(
    ("exc", "code", "failsafe"),
    [
        (OSError(errno.ENOSPC, "host disk full"), errno.ENOSPC, False),
        (OSError("no errno"), errno.EIO, False),
        (ReadOnlyError("ro"), errno.EROFS, False),
        (CorruptionError("bad L2 entry"), errno.EIO, True),
        (FUSEError(errno.EAGAIN), errno.EAGAIN, False),
        (AssertionError("bug"), errno.EIO, True),
        (KeyError("bug"), errno.EIO, True),
    ],
)
@pytest.mark.expect_log(
    r"write of guest bytes \d+\+\d+ refused \(EIO\), corrupt metadata: bad L\d+ entry",
    r"entering failsafe mode: corrupt metadata in write of guest bytes \d+\+\d+: bad L\d+ entry",
    r"unexpected error in the write of guest bytes \d+\+\d+",
    r"entering failsafe mode: unexpected AssertionError in write of guest bytes \d+\+\d+",
    r"entering failsafe mode: unexpected KeyError in write of guest bytes \d+\+\d+",
)
async def test_guard_mapping(
    monkeypatch: pytest.MonkeyPatch, exc: Exception, code: int, failsafe: bool
) -> None:
    image = await _image()
    fs = _fs(image)

    async def fail(*args: object, **kw: object) -> None:
        raise exc

    monkeypatch.setattr(image, "write", fail)
    with pytest.raises(FUSEError) as info:
        await fs.write(pyfuse3.FileHandleT(1), 0, b"x")
    assert _errno(info) == code
    assert image.failsafe is failsafe


async def test_guard_lets_cancellation_through() -> None:
    image = await _image()
    fs = _fs(image)

    async def slow(pos: int, size: int) -> bytes:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    image.read = slow  # type: ignore[method-assign]
    with trio.move_on_after(0.01) as scope:
        await fs.read(pyfuse3.FileHandleT(1), 0, 1)
    assert scope.cancelled_caught
    assert not image.failsafe


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(module-level imports, imports inside functions) of a source file."""
    import ast

    tree = ast.parse(path.read_text())
    top: set[str] = set()
    nested: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        (top if node in tree.body else nested).update(names)
    return top, nested


def test_only_fs_imports_pyfuse3() -> None:
    """fs.py and fuseloop.py (the FUSE layer) are the pyfuse3 modules; serve.py loads them
    lazily, nobody at import time."""
    package = Path(__file__).resolve().parent.parent / "qedfuse"
    fuse_layer = ("fs.py", "fuseloop.py")
    for path in sorted(package.glob("*.py")):
        top, nested = _imports(path)
        if path.name not in fuse_layer:
            assert "pyfuse3" not in top, f"{path.name} imports pyfuse3"
            assert "qedfuse.fs" not in top, f"{path.name} imports qedfuse.fs at import time"
            assert "qedfuse.fuseloop" not in top, f"{path.name} imports qedfuse.fuseloop"
        never: tuple[str, ...] = ("mount.py", "mounttable.py", "registry.py", "umount.py")
        never += ("daemonize.py", "serve.py", "options.py", "engine.py", "format.py", "backing.py")
        if path.name in never:
            assert "pyfuse3" not in nested, f"{path.name} imports pyfuse3"
    _, nested = _imports(package / "serve.py")
    assert "qedfuse.fs" in nested
    assert "qedfuse.fuseloop" in nested


# ---------------------------------------------------------------------------- real mounts


@pytest.fixture
def qemu_img_tool() -> str:
    return require_tool("qemu-img")


def _create(qemu_img: str, path: Path, size: str = "64M", *opts: str) -> Path:
    return qemu_img_create(path, size, *opts, qemu_img=qemu_img)


def _check_clean(qemu_img: str, image: Path) -> None:
    check_ok(run([qemu_img, "check", image]))
    assert not need_check(image)


def _sha(path: Path, *, skip_header: bool = False) -> str:
    """Hash of the file; ``skip_header`` leaves out the 64-byte header struct."""
    data = path.read_bytes()
    return hashlib.sha256(data[64:] if skip_header else data).hexdigest()


def _one_line_error(cp: subprocess.CompletedProcess[str]) -> str:
    lines = cp.stderr.splitlines()
    assert len(lines) == 1, cp.stderr
    assert lines[0].startswith("qedfuse: "), cp.stderr
    return lines[0]


@pytest.mark.fuse
def test_daemon_mode_serves_before_returning(tmp_path: Path, qemu_img_tool: str) -> None:
    image = _create(qemu_img_tool, tmp_path / "disk.qed")
    mnt = tmp_path / "mnt"
    pidfile = tmp_path / "q.pid"
    # mounted(daemon=True) asserts the mount serves the moment the command exits 0
    with mounted(image, mnt, "--pidfile", str(pidfile), daemon=True) as m:
        assert mount_entry(mnt) == (str(image), "fuse.qedfuse")
        assert os.listdir(mnt) == ["disk.raw"]
        st = os.stat(m.raw)
        assert st.st_size == 64 * MiB
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert int(pidfile.read_text()) == m.pid != os.getpid()
        with open(m.raw, "r+b") as f:
            f.write(b"hello")
        cp = qedfuse("umount", "--wait", mnt)
        check_ok(cp)
        # --wait returned only once the daemon was gone
        assert not pid_alive(m.pid)
        assert mount_entry(mnt) is None
        assert not pidfile.exists()
    _check_clean(qemu_img_tool, image)
    out = tmp_path / "out.raw"
    check_ok(run([qemu_img_tool, "convert", "-O", "raw", image, out]))
    assert out.read_bytes()[:5] == b"hello"


@pytest.mark.fuse
def test_mount8_form_and_read_only(tmp_path: Path, qemu_img_tool: str) -> None:
    image = _create(qemu_img_tool, tmp_path / "disk.qed")
    before = _sha(image)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    # what mount.fuse3 / mount(8) run: options after the positionals, -n/-t tolerated
    cp = run(
        [
            QEDFUSE,
            str(image),
            str(mnt),
            "-o",
            "ro,noatime,x-systemd.automount,nofail,dev,suid",
            "-n",
            "-t",
            "fuse.qedfuse",
        ]
    )
    check_ok(cp)
    try:
        with open("/proc/self/mounts", encoding="utf-8") as f:
            line = next(x for x in f if f" {mnt} " in x)
        source, target, fstype, flags = line.split()[:4]
        assert (source, target, fstype) == (str(image), str(mnt), "fuse.qedfuse")
        assert "ro" in flags.split(",")
        raw = mnt / "disk.raw"
        assert stat.S_IMODE(os.stat(raw).st_mode) == 0o400
        assert errno_of(open, raw, "r+b") == errno.EROFS
        assert raw.read_bytes()[:4096] == bytes(4096)
        pid = daemon_pid(mnt)
        check_ok(qedfuse("umount", "--wait", mnt))
        assert not pid_alive(pid)
    finally:
        fusermount_u(mnt)
    assert _sha(image) == before  # a read-only mount never writes


@pytest.mark.fuse
@pytest.mark.parametrize("daemon", [True, False], ids=["daemon", "foreground"])
@pytest.mark.parametrize(
    "case",
    [
        "missing-image",
        "not-qed",
        "corrupt-header",
        "missing-mountpoint",
        "mountpoint-is-file",
        "already-mounted",
        "unknown-option",
        "bad-pidfile",
    ],
)
@pytest.mark.sample(6)
def test_bad_input_one_line_nothing_mounted(
    tmp_path: Path, qemu_img_tool: str, case: str, daemon: bool
) -> None:
    image = _create(qemu_img_tool, tmp_path / "disk.qed", "16M")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    opts: list[str] = []
    expected_rc = 1
    expect: str
    if case == "missing-image":
        image = tmp_path / "nope.qed"
        expect = f"qedfuse: Could not open '{image}': No such file or directory"
    elif case == "not-qed":
        image = tmp_path / "plain.raw"
        image.write_bytes(os.urandom(65536))
        expect = "Image not in QED format"
    elif case == "corrupt-header":
        qededit.write_header_field(image, "cluster_size", 3 * 65536)
        expect = "cluster size"
    elif case == "missing-mountpoint":
        mnt = tmp_path / "nomnt"
        expect = f"qedfuse: mount point {mnt} does not exist"
    elif case == "mountpoint-is-file":
        mnt = tmp_path / "file"
        mnt.write_text("x")
        expect = f"qedfuse: mount point {mnt} is not a directory"
    elif case == "bad-pidfile":
        # fails after the kernel mount exists: it must be taken down again
        pidfile = tmp_path / "no-such-dir" / "q.pid"
        opts = ["--pidfile", str(pidfile)]
        expect = f"qedfuse: cannot write pidfile {pidfile}: No such file or directory"
    elif case == "unknown-option":
        opts = ["-o", "ro,xyz"]
        expect = "qedfuse: unknown mount option 'xyz'"
        expected_rc = 2
    else:
        expect = f"qedfuse: {mnt} is already mounted (fuse.qedfuse {image})"
    before = mounts_snapshot(tmp_path)
    argv = [QEDFUSE, "mount", *opts, str(image), str(mnt)]
    if not daemon:
        argv.insert(2, "-f")
    if case == "already-mounted":
        other = _create(qemu_img_tool, tmp_path / "other.qed", "16M")
        with mounted(other, mnt):
            expect = f"qedfuse: {mnt} is already mounted (fuse.qedfuse {other})"
            before = mounts_snapshot(tmp_path)
            cp = run(argv, timeout=30)
            after = mounts_snapshot(tmp_path)
    else:
        cp = run(argv, timeout=30)
        after = mounts_snapshot(tmp_path)
    assert cp.returncode == expected_rc, cp.stderr
    line = _one_line_error(cp)
    assert expect in line, line
    assert after == before


@pytest.mark.fuse
def test_overlay_existing_file_refused(tmp_path: Path, qemu_img_tool: str) -> None:
    base = _create(qemu_img_tool, tmp_path / "base.qed", "16M")
    new = tmp_path / "new.qed"
    new.write_bytes(b"precious")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cp = qedfuse("mount", "--overlay", new, base, mnt)
    assert cp.returncode == 1
    assert f"overlay {new} already exists" in _one_line_error(cp)
    assert new.read_bytes() == b"precious"
    assert mount_entry(mnt) is None


@pytest.mark.fuse
@pytest.mark.parametrize("base_format", ["raw", "qed"])
def test_overlay_writes_never_reach_the_base(
    tmp_path: Path, qemu_img_tool: str, base_format: str
) -> None:
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    content = os.urandom(4 * MiB)
    raw_base = base_dir / "base.img"
    raw_base.write_bytes(content + bytes(12 * MiB))
    if base_format == "raw":
        base = raw_base
    else:
        base = base_dir / "base.qed"
        check_ok(run([qemu_img_tool, "convert", "-O", "qed", raw_base, base]))
    base_sha = _sha(base)
    new = tmp_path / "over" / "new.qed"
    new.parent.mkdir()
    mnt = tmp_path / "mnt"
    with mounted(base, mnt, "--overlay", str(new), raw_name="new.raw") as m:
        assert os.path.getsize(m.raw) == 16 * MiB
        with open(m.raw, "r+b") as f:
            assert f.read(4 * MiB) == content
            f.seek(MiB + 100)
            f.write(b"overlay data")
            f.flush()
            os.fsync(f.fileno())
        # the base is opened read-only and shared: QEMU can still read it
        check_ok(run([qemu_img_tool, "info", base]))
    assert _sha(base) == base_sha
    _check_clean(qemu_img_tool, new)
    info = check_ok(run([qemu_img_tool, "info", "--output=json", new])).stdout
    assert '"backing-filename": "../base/' in info
    if base_format == "raw":
        assert '"backing-filename-format": "raw"' in info
    expected = bytearray(content + bytes(12 * MiB))
    expected[MiB + 100 : MiB + 112] = b"overlay data"
    out = tmp_path / "out.raw"
    check_ok(run([qemu_img_tool, "convert", "-O", "raw", new, out]))
    assert out.read_bytes() == expected


def _grow_writer(raw: Path) -> subprocess.Popen[bytes]:
    """A writer that keeps allocating clusters until it is stopped (or the mount goes)."""
    dd = require_tool("dd")
    return subprocess.Popen(
        [dd, "if=/dev/urandom", f"of={raw}", "bs=64k", "count=1000", "conv=notrunc"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.mark.fuse
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=str)
def test_signal_during_writes_unmounts_cleanly(
    tmp_path: Path, qemu_img_tool: str, signum: int
) -> None:
    image = _create(qemu_img_tool, tmp_path / "disk.qed", "128M")
    start_size = image.stat().st_size
    mnt = tmp_path / "mnt"
    # a long flush delay: metadata stays dirty until the shutdown flushes it
    with mounted(image, mnt, "-o", "flush_delay=3600") as m:
        writer = _grow_writer(m.raw)
        try:
            wait_until(lambda: image.stat().st_size > start_size + 4 * MiB, 30, "writes to land")
            assert need_check(image)  # dirty: the shutdown has real work to do
            m.signal(signum)
            assert m.wait_exit() == 0, m.log()
        finally:
            writer.kill()
            writer.wait()
        assert mount_entry(mnt) is None
    _check_clean(qemu_img_tool, image)


@pytest.mark.fuse
def test_daemon_sigterm(tmp_path: Path, qemu_img_tool: str) -> None:
    image = _create(qemu_img_tool, tmp_path / "disk.qed", "32M")
    mnt = tmp_path / "mnt"
    with mounted(image, mnt, "-o", "flush_delay=3600", daemon=True) as m:
        fd = os.open(m.raw, os.O_RDWR)
        try:
            os.pwrite(fd, os.urandom(MiB), 5 * MiB)
            assert need_check(image)  # dirty metadata, and the writer still has it open
            m.signal(signal.SIGTERM)
            m.wait_exit()
            assert mount_entry(mnt) is None
        finally:
            with contextlib.suppress(OSError):  # the connection is gone: ENOTCONN
                os.close(fd)
    _check_clean(qemu_img_tool, image)


@pytest.mark.fuse
def test_external_unmount_ends_the_daemon_cleanly(tmp_path: Path, qemu_img_tool: str) -> None:
    image = _create(qemu_img_tool, tmp_path / "disk.qed", "32M")
    mnt = tmp_path / "mnt"
    with mounted(image, mnt, "-o", "flush_delay=3600") as m:
        with open(m.raw, "r+b") as f:
            f.seek(3 * MiB)
            f.write(os.urandom(2 * MiB))
        # the close ran the ordered flush (FUSE FLUSH), despite the hour-long idle delay
        assert not need_check(image)
        with open(m.raw, "r+b") as f:
            f.seek(7 * MiB)
            f.write(os.urandom(MiB))
            f.flush()
            assert need_check(image)
            os.fsync(f.fileno())
            assert not need_check(image)  # fsync = ordered flush, too
        check_ok(run(["fusermount3", "-u", mnt]))
        assert m.wait_exit() == 0, m.log()
    _check_clean(qemu_img_tool, image)


@pytest.mark.fuse
def test_umount_busy_names_holders_then_lazy(tmp_path: Path, qemu_img_tool: str) -> None:
    image = _create(qemu_img_tool, tmp_path / "disk.qed", "16M")
    mnt = tmp_path / "mnt"
    with mounted(image, mnt) as m:
        fd = os.open(m.raw, os.O_RDWR)
        try:
            cp = qedfuse("umount", mnt)
            assert cp.returncode == 1
            line = _one_line_error(cp)
            assert f"{mnt} is busy" in line
            assert f"pid {os.getpid()} (" in line, line
            assert mount_entry(mnt) is not None
            # --lazy detaches now; the daemon serves the open fd until it is closed
            check_ok(qedfuse("umount", "--lazy", mnt))
            assert mount_entry(mnt) is None
            assert os.pwrite(fd, b"still served", 0) == 12
            assert pid_alive(m.pid)
        finally:
            os.close(fd)
        assert m.wait_exit() == 0, m.log()
    _check_clean(qemu_img_tool, image)
    out = tmp_path / "out.raw"
    check_ok(run([qemu_img_tool, "convert", "-O", "raw", image, out]))
    assert out.read_bytes()[:12] == b"still served"


@pytest.mark.fuse
def test_umount_wait_timeout_and_not_mounted(tmp_path: Path, qemu_img_tool: str) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cp = qedfuse("umount", mnt)
    assert cp.returncode == 1
    assert _one_line_error(cp) == f"qedfuse: {mnt} is not mounted"
    image = _create(qemu_img_tool, tmp_path / "disk.qed", "16M")
    with mounted(image, mnt) as m:
        fd = os.open(m.raw, os.O_RDONLY)
        try:
            t0 = time.monotonic()
            cp = qedfuse("umount", "--lazy", "--wait", "--timeout", "0.5", mnt)
            assert cp.returncode == 1
            assert "still running after 0.5 s" in _one_line_error(cp)
            assert time.monotonic() - t0 < 10
        finally:
            os.close(fd)
        m.wait_exit()


@pytest.mark.fuse
def test_stale_mount_is_refused_then_cleaned(tmp_path: Path, qemu_img_tool: str) -> None:
    image = _create(qemu_img_tool, tmp_path / "disk.qed", "16M")
    mnt = tmp_path / "mnt"
    with mounted(image, mnt, expect_rc=None) as m:
        m.signal(signal.SIGKILL)
        assert m.wait_exit() == -signal.SIGKILL
        assert errno_of(os.open, m.raw, os.O_RDONLY) == errno.ENOTCONN
        cp = qedfuse("mount", image, mnt)
        assert cp.returncode == 1
        assert "is a stale mount" in _one_line_error(cp)
        cp = qedfuse("umount", mnt)
        check_ok(cp)
        assert "stale mount" in cp.stderr
        assert mount_entry(mnt) is None
    # the killed daemon had no dirty metadata: the image is still clean
    _check_clean(qemu_img_tool, image)


@pytest.mark.fuse
def test_grow_through_truncate(tmp_path: Path, qemu_img_tool: str) -> None:
    image = _create(qemu_img_tool, tmp_path / "disk.qed", "16M")
    mnt = tmp_path / "mnt"
    with mounted(image, mnt, "-o", f"log={tmp_path / 'q.log'},debug") as m:
        os.truncate(m.raw, 48 * MiB)
        assert os.path.getsize(m.raw) == 48 * MiB
        with open(m.raw, "r+b") as f:
            f.seek(40 * MiB)
            f.write(b"grown")
        assert errno_of(os.truncate, m.raw, MiB) == errno.EOPNOTSUPP
        with open(m.raw, "w"):  # O_TRUNC is ignored, as on a block device
            pass
        assert os.path.getsize(m.raw) == 48 * MiB
    _check_clean(qemu_img_tool, image)
    info_out = check_ok(run([qemu_img_tool, "info", image])).stdout
    assert "virtual size: 48 MiB" in info_out
    assert "disk grown from" in (tmp_path / "q.log").read_text()


@pytest.mark.fuse
def test_hostile_l2_entry_gives_eio_and_daemon_keeps_serving(
    tmp_path: Path, qemu_img_tool: str
) -> None:
    image = _hostile(qemu_img_tool, tmp_path)
    before = _sha(image, skip_header=True)
    mnt = tmp_path / "mnt"
    with mounted(image, mnt, "-o", f"log={tmp_path / 'q.log'}", expect_rc=1) as m:
        with open(m.raw, "rb", buffering=0) as f:
            fd = f.fileno()
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead into cluster 0
            assert errno_of(os.pread, fd, 4096, 0) == errno.EIO
            # the daemon keeps serving the other ranges
            assert os.pread(fd, 4096, 4096) == b"\x11" * 4096
            assert os.pread(fd, 4096, 8 * MiB) == bytes(4096)
        # and refuses writes once it has seen corruption (failsafe) ...
        fd = os.open(m.raw, os.O_RDWR)
        try:
            assert errno_of(os.pwrite, fd, b"\x22" * 4096, 8 * MiB) == errno.EIO
        finally:
            # ... and says so when a writer closes (the flush on close fails)
            assert errno_of(os.close, fd) == errno.EIO
        assert os.listdir(mnt) == ["disk.raw"]
        with open(m.raw, "rb") as f:
            f.seek(12 * MiB)
            assert f.read(4096) == bytes(4096)
    # Nothing was written into the hostile image but NEED_CHECK in the header struct,
    # so that the next read-write open repairs it.
    assert _sha(image, skip_header=True) == before
    assert qededit.need_check(image)
    log_text = (tmp_path / "q.log").read_text()
    assert "invalid entries" in log_text
    assert "next read-write open repairs it" in log_text


def _hostile(qemu_img: str, tmp_path: Path) -> Path:
    """4 KiB clusters, data at guest 0..8 KiB, and guest cluster 0 mapped onto the L1 table."""
    qemu_io = require_tool("qemu-io")
    image = _create(qemu_img, tmp_path / "disk.qed", "16M", "cluster_size=4096")
    check_ok(run([qemu_io, "-f", "qed", "-c", "write -P 0x11 0 8k", image]))
    qededit.set_l2(image, 0, 0, qededit.read_header(image).l1_table_offset)
    return image


@pytest.mark.fuse
@pytest.mark.expect_log(
    r"changed by someone else",
    r"entering failsafe mode",
    r"the image was in failsafe mode \(.*\); it was not flushed; NEED_CHECK is set",
)
def test_unflushable_image_exits_1_and_keeps_need_check(tmp_path: Path, qemu_img_tool: str) -> None:
    """Dirty metadata, then failsafe (the image file renamed away under the mount): the
    daemon cannot flush, exits 1, and leaves NEED_CHECK set for the next open."""
    image = _create(qemu_img_tool, tmp_path / "disk.qed", "16M", "cluster_size=4096")
    check_ok(run([require_tool("qemu-io"), "-f", "qed", "-c", "write -P 0x11 0 8k", image]))
    header = qededit.read_header(image)
    l1_before = qededit.l1_entries(image)
    mnt = tmp_path / "mnt"
    moved = tmp_path / "moved.qed"
    with mounted(image, mnt, "-o", "flush_delay=3600", expect_rc=1) as m:
        fd = os.open(m.raw, os.O_RDWR)
        try:
            # an allocating write in the next L2 table: metadata dirty, NEED_CHECK on disk
            assert os.pwrite(fd, b"\x33" * 4096, 12 * MiB) == 4096
            assert need_check(image)
            os.rename(image, moved)  # someone else's change: the flush refuses to go on
        finally:
            assert errno_of(os.fsync, fd) == errno.EIO
            with contextlib.suppress(OSError):  # its flush fails again, or was already reported
                os.close(fd)
    # the daemon could not flush: it exited 1 and left NEED_CHECK set for the next open
    assert need_check(moved)
    assert qededit.l1_entries(moved) == l1_before  # the dirty L1 never reached the disk
    assert qededit.read_header(moved).image_size == header.image_size


@pytest.mark.fuse
def test_options_through_a_real_mount(tmp_path: Path, qemu_img_tool: str) -> None:
    image = _create(qemu_img_tool, tmp_path / "disk.qed", "32M")
    mnt = tmp_path / "mnt"
    opts = "uid=1234,gid=5678,umask=022,fsname=my-disk,flush_delay=0.2,allow_other,noatime"
    with mounted(image, mnt, "-o", opts) as m:
        with open("/proc/self/mounts", encoding="utf-8") as f:
            line = next(x for x in f if f" {mnt} " in x)
        assert line.startswith(f"my-disk {mnt} fuse.qedfuse ")
        assert "allow_other" in line
        assert "noatime" in line
        st = os.stat(m.raw)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o644)
        vfs = os.statvfs(mnt)
        assert vfs.f_blocks * vfs.f_frsize == 32 * MiB
        fd = os.open(m.raw, os.O_RDWR)
        try:
            os.pwrite(fd, b"idle", 9 * MiB)
            assert need_check(image)
            # no fsync, no close: the idle flusher clears NEED_CHECK once writes go quiet
            wait_until(lambda: not need_check(image), 10, "the idle flush")
        finally:
            os.close(fd)
    _check_clean(qemu_img_tool, image)


@pytest.mark.fuse
def test_backing_policy_options(tmp_path: Path, qemu_img_tool: str) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"B" * MiB)
    other = tmp_path / "other.raw"
    other.write_bytes(b"O" * MiB)
    image = tmp_path / "over.qed"
    check_ok(run([qemu_img_tool, "create", "-f", "qed", "-b", base, "-F", "raw", image]))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cp = qedfuse("mount", "-o", "untrusted", image, mnt)
    assert cp.returncode == 1
    assert "backing files are refused (untrusted)" in _one_line_error(cp)
    assert mount_entry(mnt) is None
    with mounted(image, mnt, "-o", "ro") as m:
        assert m.raw.read_bytes()[:4] == b"BBBB"
    with mounted(image, mnt, "-o", f"ro,backing={other}") as m:
        assert m.raw.read_bytes()[:4] == b"OOOO"


@pytest.mark.fuse
def test_systemd_mode_notifies_ready_and_stopping(tmp_path: Path, qemu_img_tool: str) -> None:
    image = _create(qemu_img_tool, tmp_path / "disk.qed", "16M")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sock_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(20)
        proc = subprocess.Popen(
            [QEDFUSE, "mount", "--systemd", str(image), str(mnt)],
            env={**os.environ, "NOTIFY_SOCKET": str(sock_path)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            ready = sock.recv(4096).decode()
            assert ready.startswith("READY=1"), ready
            # READY=1 means served: no waiting needed
            assert os.listdir(mnt) == ["disk.raw"]
            proc.send_signal(signal.SIGTERM)
            assert sock.recv(4096).decode().startswith("STOPPING=1")
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            fusermount_u(mnt)
    assert proc.stderr is not None
    err = proc.stderr.read().decode()
    proc.stderr.close()
    # journald priority prefixes on every line under --systemd
    assert all(line.startswith("<") for line in err.splitlines()), err
    _check_clean(qemu_img_tool, image)
