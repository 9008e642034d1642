"""Image locks between qedfuse mounts and QEMU, both directions, through real processes.

qedfuse takes QEMU's OFD lock bytes (reliability.md §6.3): a read-write mount holds
100, 101, 103, 201, 203 and a read-only one 100, 201, 203, exactly as ``qemu-io`` does, so
each refuses the other where QEMU would refuse itself.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fusehelpers import QEDFUSE, mount_entry, mounted, mounts_snapshot, wait_until

from support import check_ok, require_tool, run

pytestmark = [pytest.mark.fuse, pytest.mark.qemu]

RW_BYTES = {100, 101, 103, 201, 203}
RO_BYTES = {100, 201, 203}


def locked_bytes(path: Path) -> set[int]:
    """Bytes covered by the OFD locks /proc/locks lists for ``path``'s inode."""
    st = os.stat(path)
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    found = set()
    with open("/proc/locks", encoding="ascii") as f:
        for line in f:
            fields = line.split()
            if "->" in fields:  # a blocked waiter, not a held lock
                continue
            if len(fields) >= 8 and fields[1] == "OFDLCK" and fields[5] == ident:
                # adjacent bytes of one owner show as one range (100 101)
                found.update(range(int(fields[6]), int(fields[7]) + 1))
    return found


def _create(tmp_path: Path, name: str = "disk.qed") -> Path:
    image = tmp_path / name
    check_ok(run([require_tool("qemu-img"), "create", "-f", "qed", image, "16M"]))
    return image


@contextlib.contextmanager
def qemu_io_holding(image: Path, *args: str, expect: set[int]) -> Iterator[None]:
    """``qemu-io [args] -f qed IMAGE`` kept open (waiting on stdin) until the block ends."""
    qemu_io = require_tool("qemu-io")
    proc = subprocess.Popen(
        [qemu_io, *args, "-f", "qed", str(image)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:

        def holding() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"qemu-io exited early: {proc.stderr.read()!r}")  # type: ignore[union-attr]
            return locked_bytes(image) >= expect

        wait_until(holding, 20, "qemu-io to lock the image")
        yield
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _refused(image: Path, mnt: Path, *opts: str) -> str:
    """Mount must fail with one line and leave nothing mounted; return that line."""
    mnt.mkdir(exist_ok=True)
    before = mounts_snapshot(mnt.parent)
    cp = run([QEDFUSE, "mount", *opts, str(image), str(mnt)], timeout=30)
    assert cp.returncode == 1, cp.stderr
    lines = cp.stderr.splitlines()
    assert len(lines) == 1, cp.stderr
    assert mounts_snapshot(mnt.parent) == before
    assert mount_entry(mnt) is None
    return lines[0]


def test_rw_mount_locks_out_qemu(tmp_path: Path) -> None:
    qemu_img = require_tool("qemu-img")
    qemu_io = require_tool("qemu-io")
    image = _create(tmp_path)
    with mounted(image, tmp_path / "mnt"):
        assert locked_bytes(image) == RW_BYTES
        cp = run([qemu_img, "info", image])
        assert cp.returncode != 0
        assert 'Failed to get shared "write" lock' in cp.stderr
        cp = run([qemu_io, "-f", "qed", "-c", "read 0 512", image])
        assert cp.returncode != 0
        assert 'Failed to get "write" lock' in cp.stderr
        # force-share still reads it, as with a running VM
        check_ok(run([qemu_img, "info", "-U", image]))
    assert locked_bytes(image) == set()


def test_ro_mount_locks_like_qemu_io_r(tmp_path: Path) -> None:
    qemu_img = require_tool("qemu-img")
    qemu_io = require_tool("qemu-io")
    image = _create(tmp_path)
    with mounted(image, tmp_path / "mnt", "-o", "ro"):
        assert locked_bytes(image) == RO_BYTES
        check_ok(run([qemu_img, "info", image]))  # another reader is fine
        check_ok(run([qemu_io, "-r", "-f", "qed", "-c", "read 0 512", image]))
        cp = run([qemu_io, "-f", "qed", "-c", "write 0 512", image])
        assert cp.returncode != 0
        assert 'Failed to get "write" lock' in cp.stderr


def test_qemu_writer_blocks_every_mount(tmp_path: Path) -> None:
    image = _create(tmp_path)
    with qemu_io_holding(image, expect=RW_BYTES):
        line = _refused(image, tmp_path / "mnt")
        assert line.startswith('qedfuse: Failed to get "write" lock'), line
        assert "is another process using the image" in line
        line = _refused(image, tmp_path / "mnt", "-o", "ro")
        assert 'Failed to get shared "write" lock' in line, line
        line = _refused(image, tmp_path / "mnt", "-f")  # foreground: same check, same line
        assert 'Failed to get "write" lock' in line, line
    with mounted(image, tmp_path / "mnt"):  # once QEMU is gone, the mount works
        pass


def test_qemu_reader_allows_only_a_read_only_mount(tmp_path: Path) -> None:
    image = _create(tmp_path)
    with qemu_io_holding(image, "-r", expect=RO_BYTES):
        line = _refused(image, tmp_path / "mnt")
        assert 'Failed to get "write" lock' in line, line
        with mounted(image, tmp_path / "mnt", "-o", "ro") as m:
            assert m.raw.read_bytes()[:512] == bytes(512)


def test_two_mounts_of_one_image(tmp_path: Path) -> None:
    image = _create(tmp_path)
    with mounted(image, tmp_path / "one"):
        line = _refused(image, tmp_path / "two")
        assert 'Failed to get "write" lock' in line, line
        line = _refused(image, tmp_path / "two", "-o", "ro")
        assert 'Failed to get shared "write" lock' in line, line


def test_overlay_base_is_shared_read_only(tmp_path: Path) -> None:
    qemu_img = require_tool("qemu-img")
    base = _create(tmp_path, "base.qed")
    with mounted(
        base, tmp_path / "mnt", "--overlay", str(tmp_path / "new.qed"), raw_name="new.raw"
    ):
        assert locked_bytes(base) == {100}
        assert locked_bytes(tmp_path / "new.qed") == RW_BYTES
        check_ok(run([qemu_img, "info", base]))
        # a second overlay on the same base is fine: the base is only read
        with mounted(
            base, tmp_path / "mnt2", "--overlay", str(tmp_path / "new2.qed"), raw_name="new2.raw"
        ):
            assert locked_bytes(base) == {100}
