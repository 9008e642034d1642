"""Writes that reach the end of the disk, through a real mount, in every cache mode.

As on a block device: a write that starts before the end and crosses it writes what fits and
returns that count, and a write at or past the end fails with ENOSPC.  The kernel's O_DIRECT
path cannot pass a short count on (it makes EIO of it), so there a crossing write fails with
ENOSPC and changes nothing.  Never EIO: nothing is wrong with the medium.
"""

from __future__ import annotations

import errno
import mmap
import os
import random
from pathlib import Path

import pytest
from fusehelpers import QEDFUSE, mounted

from support import check_ok, run

SIZE = 1 << 20


def _aligned(data: bytes) -> mmap.mmap:
    buf = mmap.mmap(-1, len(data))
    buf.write(data)
    return buf


@pytest.mark.fuse
# Not -o writeback_cache: there the page cache takes writes past the end and the error comes
# at fsync (documented in the README's option table; tests/test_writeback.py).
@pytest.mark.parametrize("option", ["cache=auto", "cache=kernel", "cache=none"])
def test_writes_at_the_end_of_the_disk(tmp_path: Path, option: str) -> None:
    image = tmp_path / "disk.qed"
    check_ok(run([QEDFUSE, "create", image, str(SIZE)]))
    rng = random.Random()
    with mounted(image, tmp_path / "mnt", "-o", option) as m:
        model = bytearray(SIZE)
        for direct in (False, True, False, True):
            # a crossing write: starts 4 KiB-aligned before the end, ends past it
            before = rng.randrange(1, 16) * 4096
            size = before + rng.randrange(1, 16) * 4096
            pos = SIZE - before
            data = rng.randbytes(size)
            flags = os.O_RDWR | (os.O_DIRECT if direct else 0)
            fd = os.open(m.raw, flags)
            try:
                if direct and option != "cache=none":
                    with pytest.raises(OSError, match="No space left") as info:
                        os.pwrite(fd, _aligned(data), pos)
                    assert info.value.errno == errno.ENOSPC, (direct, pos, size)
                else:
                    written = os.pwrite(fd, _aligned(data) if direct else data, pos)
                    assert written == before, (direct, pos, size)
                    model[pos:] = data[:before]
                for at in (SIZE, SIZE + rng.randrange(1, 64) * 4096):
                    with pytest.raises(OSError, match="No space left") as info:
                        os.pwrite(fd, _aligned(bytes(4096)), at)
                    assert info.value.errno == errno.ENOSPC, (direct, at)
                os.fsync(fd)
            finally:
                os.close(fd)
        with open(m.raw, "rb") as f:
            assert f.read() == bytes(model), "the disk's contents differ from what was written"
