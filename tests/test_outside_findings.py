"""Classes an outside adversarial pass found after the hardening round, each with variants.

* Every header qedfuse writes passes its own (QEMU's) open checks: a backing name of 4096
  bytes or more is refused at create, and an overlay whose relative base name would be too
  long stores the absolute path instead.
* Ctrl-C during a daemonizing ``mount`` ends with ``qedfuse: interrupted``, exit 130, and
  nothing mounted, at whatever moment of the start-up it lands.
* ``convert --force`` onto a file whose directory takes no new files (a mounted qedfuse
  ``disk.raw``) writes in place, as onto a block device, instead of failing on the
  temporary file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from fusehelpers import QEDFUSE, mount_entry, mounted, pid_alive, qedfuse, wait_until

from qedfuse import format as fmt
from qedfuse.opening import overlay_backing_name
from support import check_ok, require_tool, run

# --------------------------------------------------------------------------- backing names


@pytest.mark.sample(4)
@pytest.mark.parametrize("cluster_size", ["64K", "1M"])
@pytest.mark.parametrize("extra", [-1, 0, 1, 904])
def test_create_refuses_backing_names_no_open_can_read(
    tmp_path: Path, cluster_size: str, extra: int
) -> None:
    """A name of MAX_BACKING_NAME_SIZE + extra bytes (``././…/base.raw``): refused past the
    limit, with nothing left behind; at the limit the image opens in qemu-img and qedfuse."""
    qemu_img = require_tool("qemu-img")
    (tmp_path / "base.raw").write_bytes(b"B" * 4096)
    tail = "base.raw"
    length = fmt.MAX_BACKING_NAME_SIZE + extra
    pad = length - len(tail)
    name = "./" * (pad // 2) + ("/" if pad % 2 else "") + tail
    assert len(name) == length
    image = tmp_path / "o.qed"
    cp = run(
        [
            QEDFUSE,
            "create",
            "-o",
            f"cluster_size={cluster_size}",
            "-b",
            name,
            "-F",
            "raw",
            image,
            "1M",
        ],
        cwd=tmp_path,
    )
    if length > fmt.MAX_BACKING_NAME_SIZE:
        assert cp.returncode == 1, cp
        lines = cp.stderr.strip().splitlines()
        assert len(lines) == 1, cp.stderr
        assert lines[0].startswith("qedfuse: "), cp.stderr
        assert "too long" in lines[0]
        assert not image.exists()
        return
    check_ok(cp)
    check_ok(run([qemu_img, "info", image]))
    out = check_ok(run([QEDFUSE, "info", image])).stdout
    assert "base.raw" in out


@pytest.mark.parametrize("depth", [1, 50, 900, 2100])
def test_overlay_name_is_one_an_open_can_read(depth: int) -> None:
    """However deep the overlay lies below or beside its base, the stored name is either the
    relative one (when it fits) or the absolute one, never one too long to read back."""
    base = "/srv/" + "b" * 3000 + "/base.qed"
    new = "/" + "/".join(["d"] * depth) + "/new.qed"
    name = overlay_backing_name(new, base)
    rel = os.path.relpath(base, os.path.dirname(new))
    if len(rel) <= fmt.MAX_BACKING_NAME_SIZE:
        assert name == rel
    else:
        assert name == base
    # it names the base from the overlay's directory either way
    assert os.path.normpath(os.path.join(os.path.dirname(new), name)) == base


# --------------------------------------------------------------------------- Ctrl-C at mount


def _slow_start_image(path: Path) -> None:
    """An image whose read-write open repairs first (NEED_CHECK set, many L2 tables)."""
    check_ok(qedfuse("create", "-o", "cluster_size=4K,table_size=1", path, "1G"))
    # write one cluster into each of many L2 tables so the check has tables to walk
    import trio

    from qedfuse.imagefile import FileImage
    from qedfuse.opening import open_image

    async def fill() -> None:
        async with await open_image(FileImage.open(path, read_only=False)) as img:
            step = img.geometry.l2_coverage
            for pos in range(0, img.image_size, step * 4):
                await img.write(pos, b"x" * 4096)

    trio.run(fill)
    with open(path, "r+b") as f:
        raw = bytearray(f.read(fmt.HEADER_STRUCT_SIZE))
        header = fmt.Header.unpack(bytes(raw))
        f.seek(0)
        f.write(header.replace(features=header.features | fmt.Feature.NEED_CHECK).pack())


@pytest.mark.sample(2)
@pytest.mark.parametrize("delay_s", [0.35, 0.6, 0.9, 1.3, 2.0])
def test_ctrl_c_during_mount_start(tmp_path: Path, delay_s: float) -> None:
    image = tmp_path / "slow.qed"
    _slow_start_image(image)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen(
        [QEDFUSE, "mount", image, mnt],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    time.sleep(delay_s)
    signalled = proc.poll() is None
    if signalled:
        os.kill(proc.pid, signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    try:
        if (
            not signalled
            or proc.returncode == 0
            or (proc.returncode == -signal.SIGINT and mount_entry(mnt) is not None)
        ):
            # Finished before the signal (or it landed in the interpreter's own exit, after
            # the mount was up): a normal mount, which we take down again.
            assert proc.returncode in (0, -signal.SIGINT), err
            assert mount_entry(mnt) is not None
            check_ok(qedfuse("umount", "--wait", mnt))
            return
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 130, (proc.returncode, err)
        # (the repair-on-open warning of this dirty image may come first)
        assert lines[-1].startswith("qedfuse: interrupted"), err
        assert sum("interrupted" in line for line in lines) == 1, err
        assert all(line.startswith("qedfuse: ") for line in lines), err
        assert "Traceback" not in err
        wait_until(lambda: mount_entry(mnt) is None, 30, "nothing mounted")

        # no daemon of this image survives
        def none_left() -> bool:
            for pid in os.listdir("/proc"):
                if not pid.isdigit() or not pid_alive(int(pid)):
                    continue
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if os.fsencode(str(image)) in cmd:
                    return False
            return True

        wait_until(none_left, 30, "the daemon to exit")
    finally:
        if mount_entry(mnt) is not None:
            run(["fusermount3", "-uz", mnt])


# --------------------------------------------------------------------------- convert in place


@pytest.mark.parametrize(("src_size", "ok"), [(1 << 20, True), (700_000, True), (3 << 20, False)])
def test_convert_force_into_a_mounted_disk(tmp_path: Path, src_size: int, ok: bool) -> None:
    """The mounted disk.raw's directory takes no new files: write in place, leave the tail,
    refuse a source larger than the disk, and keep the image clean."""
    qemu_img = require_tool("qemu-img")
    image = tmp_path / "d.qed"
    check_ok(qedfuse("create", image, "2M"))
    src = tmp_path / "src.raw"
    data = bytearray(os.urandom(src_size))
    data[100_000:300_000] = bytes(200_000)  # a zero run, which must be zeroed, not skipped
    src.write_bytes(bytes(data))
    old = os.urandom(2 << 20)
    with mounted(image, tmp_path / "mnt") as m:
        with open(m.raw, "r+b") as f:
            f.write(old)
        cp = qedfuse("convert", "--force", "-f", "raw", "-O", "raw", src, m.raw)
        now = m.raw.read_bytes()
        if ok:
            check_ok(cp)
            assert now[:src_size] == bytes(data)
            assert now[src_size:] == old[src_size:]
        else:
            assert cp.returncode == 1
            lines = cp.stderr.strip().splitlines()
            assert len(lines) == 1, cp.stderr
            assert lines[0].startswith("qedfuse: "), cp.stderr
            assert now == old
        assert len(now) == 2 << 20
    check_ok(run([qemu_img, "check", image]))
