"""What the kernel sends the daemon per write: no GETXATTR round trip before every WRITE."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest
from fusehelpers import mounted

from support import check_ok, require_tool, run


@pytest.mark.fuse
def test_writes_are_not_each_preceded_by_a_getxattr(tmp_path: Path) -> None:
    image = tmp_path / "disk.qed"
    check_ok(run([require_tool("qemu-img"), "create", "-q", "-f", "qed", str(image), "16M"]))
    mnt = tmp_path / "mnt"
    with mounted(image, mnt, "--debug-fuse") as m:
        aligned = mmap.mmap(-1, 4096)  # page-aligned buffer for O_DIRECT
        aligned.write(b"\x5a" * 4096)
        fd = os.open(m.raw, os.O_WRONLY | os.O_DIRECT)
        try:
            for k in range(50):
                os.pwrite(fd, aligned, k * 4096)
        finally:
            os.close(fd)
        trace = m.log_path.read_text(errors="replace")
    n_writes = trace.count("opcode: WRITE")
    n_getxattr = trace.count("opcode: GETXATTR")
    assert n_writes >= 50, trace[-2000:]
    # ENOSYS on the first GETXATTR makes the kernel stop asking for the whole connection.
    assert n_getxattr <= 1, f"{n_getxattr} GETXATTR requests for {n_writes} WRITEs"
