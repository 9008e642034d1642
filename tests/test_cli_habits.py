"""Habits users bring from block devices and qemu-img, through the real CLI and mount.

* ``dd of=MNT/disk.raw`` without ``conv=notrunc`` and ``echo x > disk.raw`` behave as on a
  block device: ``O_TRUNC`` at open is ignored (the data lands at offset 0, the size stays);
  an explicit truncate to a smaller size is still refused.  Checked against a byte model of
  the disk, with qemu-img convert as the oracle and qemu-img check clean.
* The command line: a mistyped command gets a suggestion, the bare ``IMAGE MOUNTPOINT`` form
  is taken only when it can be that form, ``-f qed``/``--format``, ``-q``, ``--output``,
  ``info --backing-chain``, a closed pipe and Ctrl-C end quietly with at most one line.
"""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest
from fusehelpers import mounted, need_check

from support import check_ok, require_tool, run

MiB = 1 << 20
DISK_SIZE = 8 * MiB


def _qemu_create(qemu_img: str, path: Path, size: int = DISK_SIZE) -> Path:
    check_ok(run([qemu_img, "create", "-q", "-f", "qed", path, str(size)]))
    return path


def _contents(qemu_img: str, image: Path, tmp_path: Path) -> bytes:
    out = tmp_path / "oracle.raw"
    check_ok(run([qemu_img, "convert", "-f", "qed", "-O", "raw", image, out]))
    return out.read_bytes()


def _check_clean(qemu_img: str, image: Path) -> None:
    check_ok(run([qemu_img, "check", image]))
    assert not need_check(image)


def _bytes(dd_size: str) -> int:
    unit = {"k": 1024, "M": MiB}.get(dd_size[-1])
    return int(dd_size[:-1]) * unit if unit else int(dd_size)


# (bs, count, seek) without conv=notrunc; seek=0 is what people type.
DD_CASES = [
    ("512", 1, 0),
    ("4k", 3, 0),
    ("64k", 17, 0),
    ("1M", 3, 0),
    ("100k", 5, 0),  # not a multiple of the page or cluster size
    ("1M", 8, 0),  # the whole disk
    ("4k", 9, 0),  # dd without count: src runs out
]


@pytest.mark.fuse
@pytest.mark.parametrize("cache", ["auto", "none", "kernel"])
def test_dd_without_notrunc_lands_its_data(tmp_path: Path, qemu_img: str, cache: str) -> None:
    dd = require_tool("dd")
    image = _qemu_create(qemu_img, tmp_path / "disk.qed")
    model = bytearray(DISK_SIZE)
    rng = random.Random(f"dd-{cache}")
    with mounted(image, tmp_path / "mnt", "-o", f"cache={cache}") as m:
        for bs, count, seek in DD_CASES:
            bs_bytes = _bytes(bs)
            length = bs_bytes * count
            data = rng.randbytes(length)
            src = tmp_path / "src"
            src.write_bytes(data)
            args = [dd, f"if={src}", f"of={m.raw}", f"bs={bs}", "status=none"]
            if (bs, count) != ("4k", 9):
                args.append(f"count={count}")
            check_ok(run(args))
            model[seek * bs_bytes : seek * bs_bytes + length] = data
            assert os.path.getsize(m.raw) == DISK_SIZE, (bs, count)
            assert m.raw.read_bytes() == model, (bs, count)
        # with conv=notrunc and a seek, as before
        data = rng.randbytes(3 * 4096)
        (tmp_path / "src").write_bytes(data)
        check_ok(
            run([dd, f"if={tmp_path / 'src'}", f"of={m.raw}", "bs=4k", "seek=7", "conv=notrunc"])
        )
        model[7 * 4096 : 10 * 4096] = data
        # echo x > disk.raw: writes at 0, the size and the rest stay
        check_ok(run(["sh", "-c", f"echo x > '{m.raw}'"]))
        model[0:2] = b"x\n"
        assert os.path.getsize(m.raw) == DISK_SIZE
        with open(m.raw, "w") as f:  # Python's open(..., "w") is O_TRUNC too
            f.write("py")
        model[0:2] = b"py"
        assert m.raw.read_bytes() == model
        # an explicit truncate to a smaller size is still refused, with nothing lost
        for size in (0, 4096, DISK_SIZE - 512):
            with pytest.raises(OSError, match="not supported") as info:
                os.truncate(m.raw, size)
            assert info.value.errno == errno.EOPNOTSUPP
        cp = run(["truncate", "-s", "1M", m.raw])
        assert cp.returncode != 0
        assert os.path.getsize(m.raw) == DISK_SIZE
    _check_clean(qemu_img, image)
    assert _contents(qemu_img, image, tmp_path) == model


@pytest.mark.fuse
@pytest.mark.parametrize(("bs", "seek", "count"), [("4k", 1, 1), ("64k", 5, 3), ("1M", 2, 6)])
def test_dd_seek_without_notrunc_lands_its_data(
    tmp_path: Path, qemu_img: str, bs: str, seek: int, count: int
) -> None:
    """dd seek=N without notrunc first shrinks to the seek offset: refused, dd writes anyway.

    coreutils dd reports the failed ftruncate on stderr and goes on writing; nothing before
    or after the written range is lost.
    """
    dd = require_tool("dd")
    image = _qemu_create(qemu_img, tmp_path / "disk.qed")
    rng = random.Random(f"{bs}-{seek}")
    model = bytearray(rng.randbytes(DISK_SIZE))
    (tmp_path / "full").write_bytes(model)
    data = rng.randbytes(_bytes(bs) * count)
    (tmp_path / "src").write_bytes(data)
    with mounted(image, tmp_path / "mnt") as m:
        check_ok(run([dd, f"if={tmp_path / 'full'}", f"of={m.raw}", "bs=1M", "status=none"]))
        cp = run([dd, f"if={tmp_path / 'src'}", f"of={m.raw}", f"bs={bs}", f"seek={seek}"])
        assert "failed to truncate" in cp.stderr or cp.returncode == 0, cp.stderr
        offset = _bytes(bs) * seek
        model[offset : offset + len(data)] = data
        assert os.path.getsize(m.raw) == DISK_SIZE
        assert m.raw.read_bytes() == model
    _check_clean(qemu_img, image)
    assert _contents(qemu_img, image, tmp_path) == model


@pytest.mark.fuse
def test_writeback_cache_still_refuses_o_trunc(tmp_path: Path, qemu_img: str) -> None:
    """The kernel's writeback cache would take the size as 0 after O_TRUNC: refused there."""
    image = _qemu_create(qemu_img, tmp_path / "disk.qed")
    with mounted(image, tmp_path / "mnt", "-o", "writeback_cache") as m:
        with pytest.raises(OSError, match="not supported"):
            open(m.raw, "w").close()
        assert os.path.getsize(m.raw) == DISK_SIZE
        with open(m.raw, "r+b") as f:
            f.write(b"still writable")
        assert os.path.getsize(m.raw) == DISK_SIZE
    _check_clean(qemu_img, image)
    assert _contents(qemu_img, image, tmp_path)[:14] == b"still writable"
