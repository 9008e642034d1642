"""Data through real mounts: byte-exact round trips, O_DIRECT, mmap, ext4 on a loop device, fio.

QEMU is the oracle: after unmounting, ``qemu-img convert -O raw`` must give exactly the bytes
written through the mount, and ``qemu-img check`` must find no errors and no leaks.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import random
from pathlib import Path

import pytest
from fusehelpers import loop_device, mounted, need_check

from support import check_ok, require_tool, run
from support import qemu_img_create as _create

KiB = 1024
MiB = 1024 * KiB

pytestmark = pytest.mark.fuse


def _qemu_view(image: Path, out: Path) -> bytes:
    """The guest bytes as QEMU sees them, after a clean ``qemu-img check``."""
    qemu_img = require_tool("qemu-img")
    check_ok(run([qemu_img, "check", image]))
    assert not need_check(image)
    check_ok(run([qemu_img, "convert", "-O", "raw", image, out]))
    return out.read_bytes()


def _pwrite_errno(fd: int, data: bytes, pos: int) -> int:
    try:
        os.pwrite(fd, data, pos)
    except OSError as exc:
        return exc.errno or -1
    return 0


@pytest.mark.parametrize("cache", ["auto", "none", "kernel"])
def test_round_trip_matches_qemu(tmp_path: Path, cache: str) -> None:
    dd = require_tool("dd")
    # 4 KiB clusters, two-cluster tables: every L2 table covers 4 MiB (QEMU cannot open
    # table_size=1 images at all: docs/qemu-differences.md#bug-c)
    size = 16 * MiB
    image = _create(tmp_path / "disk.qed", "16M", "cluster_size=4096", "table_size=2")
    model = bytearray(size)
    rng = random.Random(cache)

    def chunk(n: int) -> bytes:
        return rng.randbytes(n)

    with mounted(image, tmp_path / "mnt", "-o", f"cache={cache}") as m:
        assert os.path.getsize(m.raw) == size
        fd = os.open(m.raw, os.O_RDWR)
        try:
            for pos, n in [
                (0, 64 * KiB),  # aligned
                (12345, 10000),  # unaligned, inside and across clusters
                (4 * MiB - 300 * KiB, MiB),  # across an L2 table boundary
                (6 * MiB + 1, 3 * MiB + 7),  # into the third table, odd ends
                (size - 1, 1),  # the last byte
            ]:
                data = chunk(n)
                assert os.pwrite(fd, data, pos) == n
                model[pos : pos + n] = data
            # a write crossing the end writes what fits and returns the short count
            data = chunk(8192)
            assert os.pwrite(fd, data, size - 4096) == 4096
            model[size - 4096 :] = data[:4096]
            # at or past the end: ENOSPC, like a block device
            assert _pwrite_errno(fd, b"x", size) == errno.ENOSPC
            assert _pwrite_errno(fd, b"x" * 4096, size + MiB) == errno.ENOSPC
            # reads past the end are short
            assert os.pread(fd, 8192, size - 100) == bytes(model[size - 100 :])
            assert os.pread(fd, 4096, size) == b""
            os.fsync(fd)
        finally:
            os.close(fd)
        # dd with O_DIRECT both ways, 4 KiB and 1 MiB requests
        src = tmp_path / "src"
        src_bytes = chunk(3 * MiB)
        src.write_bytes(src_bytes)
        dd_out = [f"if={src}", f"of={m.raw}", "oflag=direct", "status=none"]
        check_ok(run([dd, *dd_out, "bs=4k", "seek=2560", "count=256", "conv=notrunc"]))
        model[10 * MiB : 11 * MiB] = src_bytes[:MiB]
        check_ok(run([dd, *dd_out, "bs=1M", "seek=12", "count=3", "conv=notrunc,fsync"]))
        model[12 * MiB : 15 * MiB] = src_bytes
        # dd to the end of the disk: the last, short write is refused with ENOSPC
        cp = run([dd, f"if={src}", f"of={m.raw}", "bs=1M", "seek=15", "conv=notrunc"])
        assert cp.returncode == 1
        assert "No space left on device" in cp.stderr
        model[15 * MiB :] = src_bytes[:MiB]
        back = tmp_path / "back"
        check_ok(run([dd, f"if={m.raw}", f"of={back}", "bs=1M", "iflag=direct", "status=none"]))
        assert back.read_bytes() == model
        check_ok(run([dd, f"if={m.raw}", f"of={back}", "bs=4k", "status=none"]))
        assert back.read_bytes() == model
    assert _qemu_view(image, tmp_path / "qemu.raw") == model


def test_shared_mmap(tmp_path: Path) -> None:
    image = _create(tmp_path / "disk.qed", "16M")
    with mounted(image, tmp_path / "mnt") as m:
        with open(m.raw, "r+b") as f:
            with mmap.mmap(f.fileno(), 8 * MiB, mmap.MAP_SHARED) as mm:
                mm[5 * MiB + 3 : 5 * MiB + 8] = b"mmap!"
                mm.flush()
            os.fsync(f.fileno())
        with open(m.raw, "rb") as f:
            f.seek(5 * MiB)
            assert f.read(8) == b"\0\0\0mmap!"
    data = _qemu_view(image, tmp_path / "qemu.raw")
    assert data[5 * MiB : 5 * MiB + 8] == b"\0\0\0mmap!"


def test_direct_io_mode_refuses_shared_mmap(tmp_path: Path) -> None:
    """cache=none is FUSE direct_io: the kernel refuses shared mmap (documented limitation)."""
    image = _create(tmp_path / "disk.qed", "16M")
    with mounted(image, tmp_path / "mnt", "-o", "cache=none") as m, open(m.raw, "r+b") as f:
        with pytest.raises(OSError, match="No such device") as info:
            mmap.mmap(f.fileno(), 4096, mmap.MAP_SHARED)
        assert info.value.errno == errno.ENODEV
        with mmap.mmap(f.fileno(), 4096, mmap.MAP_PRIVATE) as mm:
            assert mm[:4] == bytes(4)


def _tree_digest(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and "lost+found" not in path.parts:
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def test_ext4_on_a_loop_device(tmp_path: Path) -> None:
    mkfs = require_tool("mkfs.ext4")
    e2fsck = require_tool("e2fsck")
    mount_tool = require_tool("mount")
    umount_tool = require_tool("umount")
    image = _create(tmp_path / "disk.qed", "64M")
    mnt = tmp_path / "mnt"
    fs_mnt = tmp_path / "ext4"
    fs_mnt.mkdir()
    rng = random.Random(4)
    files = {f"dir{i % 3}/file{i}.bin": rng.randbytes(rng.randrange(1, 3 * MiB)) for i in range(12)}

    with mounted(image, mnt) as m, loop_device(m.raw) as dev:
        check_ok(run([mkfs, "-q", "-F", "-E", "nodiscard", dev]))
        check_ok(run([mount_tool, dev, fs_mnt]))
        try:
            for name, data in files.items():
                path = fs_mnt / name
                path.parent.mkdir(exist_ok=True)
                path.write_bytes(data)
            check_ok(run(["sync"]))
            written = _tree_digest(fs_mnt)
        finally:
            check_ok(run([umount_tool, fs_mnt]))
    assert written == {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}
    check_ok(run([require_tool("qemu-img"), "check", image]))
    assert not need_check(image)

    with mounted(image, mnt) as m, loop_device(m.raw) as dev:
        check_ok(run([e2fsck, "-fn", dev]))
        check_ok(run([mount_tool, "-o", "ro", dev, fs_mnt]))
        try:
            assert _tree_digest(fs_mnt) == written
        finally:
            check_ok(run([umount_tool, fs_mnt]))
    check_ok(run([require_tool("qemu-img"), "check", image]))


def test_fio_verify(tmp_path: Path) -> None:
    fio = require_tool("fio")
    image = _create(tmp_path / "disk.qed", "64M")
    common = [
        "--name=qedfuse",
        "--ioengine=psync",
        "--rw=randwrite",
        "--bsrange=4k-1m",
        "--size=48m",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--randseed=1234",
        "--output-format=terse",
        "--verify_state_save=0",  # no state file in the working directory
    ]
    with mounted(image, tmp_path / "mnt") as m:
        cp = check_ok(
            run([fio, *common, f"--filename={m.raw}", "--fsync=8", "--end_fsync=1"], timeout=170)
        )
        assert "verify" not in cp.stderr.lower(), cp.stderr
    check_ok(run([require_tool("qemu-img"), "check", image]))
    assert not need_check(image)
    # after a remount, the same job's data verifies again (nothing was lost at unmount)
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    with mounted(image, tmp_path / "mnt") as m:
        check_ok(run([fio, *common, f"--filename={m.raw}", "--verify_only"], timeout=170))
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before  # verifying wrote nothing


def test_fio_concurrent_aio_jobs_verify(tmp_path: Path) -> None:
    """Four O_DIRECT libaio jobs at queue depth 8: reads, writes and fsyncs overlap in the
    daemon (the kernel serialises only the writes to one inode)."""
    fio = require_tool("fio")
    image = _create(tmp_path / "disk.qed", "256M")
    with mounted(image, tmp_path / "mnt") as m:
        check_ok(
            run(
                [
                    fio,
                    "--name=qedfuse-aio",
                    "--ioengine=libaio",
                    "--iodepth=8",
                    "--direct=1",
                    "--rw=randrw",
                    "--bsrange=4k-256k",
                    "--numjobs=4",
                    "--offset_increment=60m",
                    "--size=60m",
                    "--verify=crc32c",
                    "--verify_fatal=1",
                    "--fsync=16",
                    "--verify_state_save=0",
                    "--output-format=terse",
                    f"--filename={m.raw}",
                ],
                timeout=170,
            )
        )
    check_ok(run([require_tool("qemu-img"), "check", image]))
    assert not need_check(image)
