"""File types on every path that opens a file (issue 11 findings 2 and 4, issue 12 item 4).

Regular files and block devices (a loop device over a file, always detached) work on every
path, with the data byte-equal to what qemu-img reads; everything else (FIFO, directory,
character device, unix socket, symlinks to them, dangling symlink) is one ``qedfuse: ...``
line, a non-zero exit within a few seconds, nothing mounted and no file created or changed.
A FIFO used to hang mount/info/map/convert for ever; a block device used to read as size 0.
Every command runs bounded: a hang is a failure, and a FIFO reader left hanging (the code
before the fix) is released by opening the FIFO for writing.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fusehelpers import QEDFUSE, fusermount_u, loop_device, mount_entry, mounted

from qedfuse import cli, logsetup
from support import check_ok, describe, open_files, require_tool, run

pytestmark = pytest.mark.qemu

KiB = 1024
MiB = 1024 * KiB
CS = 64 * KiB
#: A refusal must come this fast (it is a stat and an open; the machine is shared).
REFUSE_WITHIN_S = 10.0

BAD_KINDS = [
    "fifo",
    "directory",
    "/dev/null",
    "/dev/zero",
    "socket",
    "link-to-fifo",
    "link-to-directory",
    "link-to-/dev/null",
    "link-to-socket",
    "dangling-link",
]


def make_kind(tmp: Path, kind: str) -> Path:
    """A path of file type ``kind`` (see :data:`BAD_KINDS`) under ``tmp``."""
    if kind.startswith("/dev/"):
        return Path(kind)
    if kind.startswith("link-to-"):
        link = tmp / f"link-{kind[8:].strip('/').replace('/', '-')}"
        link.symlink_to(make_kind(tmp, kind[8:]))
        return link
    path = tmp / kind
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
        (path / "inside").write_bytes(b"x")
    elif kind == "socket":
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(os.fspath(path))
    elif kind == "dangling-link":
        path.symlink_to(tmp / "does-not-exist")
    else:
        raise AssertionError(kind)
    return path


def release_fifos(tmp: Path) -> None:
    """Let a reader blocked in open() on a FIFO under ``tmp`` go (code without the fix)."""
    for entry in tmp.iterdir():
        with contextlib.suppress(OSError):
            if stat.S_ISFIFO(entry.stat().st_mode):
                os.close(os.open(entry, os.O_WRONLY | os.O_NONBLOCK))


def kill_strays(tmp: Path) -> None:
    """SIGKILL what is left of the commands a test ran (a daemon hung before the fix, in its
    own session): every process whose command line names the test's own directory."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if os.fsencode(tmp) in cmdline:
            with contextlib.suppress(OSError):
                os.kill(int(entry), signal.SIGKILL)


def snapshot(tmp: Path) -> dict[str, tuple[int, int, int]]:
    """(type, size, mtime) of everything under ``tmp`` (logs excluded)."""
    out: dict[str, tuple[int, int, int]] = {}
    for root, dirs, files in os.walk(tmp):
        for name in dirs + files:
            path = os.path.join(root, name)
            if name.endswith(".log"):
                continue
            st = os.lstat(path)
            out[os.path.relpath(path, tmp)] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns)
    return out


def bounded(args: list[str], timeout: float = 20) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``args``; a hang fails the test (after killing the process group)."""
    start = time.monotonic()
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"hung for {timeout:g} s: {' '.join(args)}\n{out}\n{err}")
    return subprocess.CompletedProcess(args, proc.returncode, out, err), time.monotonic() - start


def assert_refused(cp: subprocess.CompletedProcess[str], elapsed: float) -> str:
    """One ``qedfuse: `` line on stderr, a non-zero exit, quickly; returns the line."""
    lines = [line for line in cp.stderr.splitlines() if line.strip()]
    assert cp.returncode != 0, describe(cp)
    assert len(lines) == 1, describe(cp)
    assert lines[0].startswith("qedfuse: "), describe(cp)
    assert "Traceback" not in cp.stderr + cp.stdout
    assert elapsed < REFUSE_WITHIN_S, f"took {elapsed:.1f} s\n{describe(cp)}"
    return lines[0]


def qemu_img_create_overlay(overlay: Path, backing: str, backing_fmt: str, size: int) -> None:
    """An overlay naming ``backing`` without opening it (``-u``): any file type can be named."""
    qemu_img = require_tool("qemu-img")
    cmd = [qemu_img, "create", "-q", "-f", "qed", "-u", "-b", backing, "-F", backing_fmt]
    check_ok(run([*cmd, os.fspath(overlay), str(size)]))


# ---------------------------------------------------------------------- refused file types

PathCase = Callable[[Path, Path], list[str]]


def _good_qed(tmp: Path) -> Path:
    image = tmp / "good.qed"
    check_ok(in_process(["create", os.fspath(image), "1M"])[0])
    return image


def _good_raw(tmp: Path) -> Path:
    raw = tmp / "good.raw"
    raw.write_bytes(random.Random(1).randbytes(256 * KiB))
    return raw


def _overlay_of(bad: Path, tmp: Path, fmt_name: str) -> str:
    overlay = tmp / f"over-{fmt_name}.qed"
    qemu_img_create_overlay(overlay, os.path.abspath(bad), fmt_name, MiB)
    return os.fspath(overlay)


def _mnt(tmp: Path) -> str:
    mnt = tmp / "mnt"
    mnt.mkdir(exist_ok=True)
    return os.fspath(mnt)


PATH_CASES: dict[str, PathCase] = {
    "mount-image": lambda bad, tmp: [QEDFUSE, "mount", "-f", os.fspath(bad), _mnt(tmp)],
    "mount-image-daemon": lambda bad, tmp: [QEDFUSE, "mount", os.fspath(bad), _mnt(tmp)],
    "info": lambda bad, tmp: [QEDFUSE, "info", os.fspath(bad)],
    "map": lambda bad, tmp: [QEDFUSE, "map", os.fspath(bad)],
    "check": lambda bad, tmp: [QEDFUSE, "check", os.fspath(bad)],
    "check-repair": lambda bad, tmp: [QEDFUSE, "check", "-r", "all", os.fspath(bad)],
    "resize": lambda bad, tmp: [QEDFUSE, "resize", os.fspath(bad), "+1M"],
    "convert-source-probed": lambda bad, tmp: [
        QEDFUSE, "convert", "-O", "raw", os.fspath(bad), os.fspath(tmp / "out.raw"),
    ],
    "convert-source-raw": lambda bad, tmp: [
        QEDFUSE, "convert", "-f", "raw", "-O", "qed", os.fspath(bad), os.fspath(tmp / "out.qed"),
    ],
    "convert-target-raw": lambda bad, tmp: [
        QEDFUSE, "convert", "--force", "-O", "raw", os.fspath(_good_qed(tmp)), os.fspath(bad),
    ],
    "convert-target-qed": lambda bad, tmp: [
        QEDFUSE, "convert", "--force", "-f", "raw", "-O", "qed", os.fspath(_good_raw(tmp)),
        os.fspath(bad),
    ],
    "create-b-raw": lambda bad, tmp: [
        QEDFUSE, "create", "-b", os.path.abspath(bad), "-F", "raw", os.fspath(tmp / "o.qed"),
        "1M",
    ],
    "create-b-qed": lambda bad, tmp: [
        QEDFUSE, "create", "-b", os.path.abspath(bad), "-F", "qed", os.fspath(tmp / "o.qed"),
    ],
    "backing-raw-mount": lambda bad, tmp: [
        QEDFUSE, "mount", "-f", _overlay_of(bad, tmp, "raw"), _mnt(tmp),
    ],
    "backing-raw-map": lambda bad, tmp: [QEDFUSE, "map", _overlay_of(bad, tmp, "raw")],
    "backing-raw-convert": lambda bad, tmp: [
        QEDFUSE, "convert", "-O", "raw", _overlay_of(bad, tmp, "raw"), os.fspath(tmp / "o.raw"),
    ],
    "backing-qed-mount": lambda bad, tmp: [
        QEDFUSE, "mount", "-f", _overlay_of(bad, tmp, "qed"), _mnt(tmp),
    ],
    "backing-qed-convert": lambda bad, tmp: [
        QEDFUSE, "convert", "-O", "qed", _overlay_of(bad, tmp, "qed"), os.fspath(tmp / "o2.qed"),
    ],
    "backing-override": lambda bad, tmp: [
        QEDFUSE, "mount", "-f", "-o", f"backing={os.path.abspath(bad)}",
        os.fspath(_good_qed(tmp)), _mnt(tmp),
    ],
    "overlay-base": lambda bad, tmp: [
        QEDFUSE, "mount", "-f", "--overlay", os.fspath(tmp / "new.qed"), os.fspath(bad),
        _mnt(tmp),
    ],
    "commit-target-raw": lambda bad, tmp: [QEDFUSE, "commit", _overlay_of(bad, tmp, "raw")],
    "commit-target-qed": lambda bad, tmp: [QEDFUSE, "commit", _overlay_of(bad, tmp, "qed")],
}  # fmt: skip


MOUNT_CASES = sorted(
    case for case in PATH_CASES if "mount" in case or "overlay" in case or "override" in case
)
#: One of each file type (plus a link and a dangling link) for the slower real-mount cases;
#: the offline commands, which share the same opener, get every kind.
MOUNT_KINDS = ["fifo", "directory", "/dev/zero", "socket", "link-to-fifo", "dangling-link"]


class _Alarm(Exception):
    pass


def in_process(
    args: list[str], timeout: int = 10
) -> tuple[subprocess.CompletedProcess[str], float]:
    """``cli.main(args)`` here (no interpreter start-up), bounded by SIGALRM: an ``open`` that
    blocks on a FIFO is interrupted and the test fails as a hang."""

    def alarm(signum: int, frame: object) -> None:
        raise _Alarm

    start = time.monotonic()
    old_handler = signal.signal(signal.SIGALRM, alarm)
    with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out_f, err_f
        signal.alarm(timeout)
        try:
            code = cli.main(args)
        except _Alarm:
            code = None
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old_handler)
            sys.stdout, sys.stderr = saved
            logsetup.reset_logging()
        out_f.seek(0)
        err_f.seek(0)
        cp = subprocess.CompletedProcess(
            args, -1 if code is None else code, out_f.read(), err_f.read()
        )
    if code is None:
        pytest.fail(f"hung for {timeout} s: qedfuse {' '.join(args)}\n{cp.stderr}")
    return cp, time.monotonic() - start


@pytest.mark.parametrize("kind", BAD_KINDS)
@pytest.mark.parametrize("case", sorted(set(PATH_CASES) - set(MOUNT_CASES)))
def test_other_file_types_are_refused_offline(tmp_path: Path, kind: str, case: str) -> None:
    """Every offline path x every non-file type: one line, non-zero, quick, nothing made."""
    _refused(tmp_path, kind, case, lambda args: in_process(args[1:]))


@pytest.mark.sample(10)
@pytest.mark.parametrize("kind", MOUNT_KINDS)
@pytest.mark.parametrize("case", MOUNT_CASES)
def test_other_file_types_are_refused_by_mount(tmp_path: Path, kind: str, case: str) -> None:
    """The real mount command (foreground and daemon): the same refusal, nothing mounted."""
    _refused(tmp_path, kind, case, bounded)


def _refused(
    tmp_path: Path,
    kind: str,
    case: str,
    runner: Callable[[list[str]], tuple[subprocess.CompletedProcess[str], float]],
) -> None:
    bad = make_kind(tmp_path, kind)
    args = PATH_CASES[case](bad, tmp_path)
    before = snapshot(tmp_path)
    mnt = tmp_path / "mnt"
    try:
        cp, elapsed = runner(args)
    finally:
        kill_strays(tmp_path)
        release_fifos(tmp_path)
        if mnt.exists() and mount_entry(mnt) is not None:
            fusermount_u(mnt, lazy=True)
    assert mount_entry(mnt) is None, "something got mounted"
    line = assert_refused(cp, elapsed)
    assert snapshot(tmp_path) == before, f"files created or changed by {case}: {line}"
    if case.startswith(("info", "map", "check", "resize", "mount-image", "convert-source")):
        assert f"'{bad}'" in line or f"'{os.path.abspath(bad)}'" in line, line


def test_info_shows_a_fifo_backing_file_as_broken(tmp_path: Path) -> None:
    """``info`` does not open the backing chain to serve, but it must not hang on it either."""
    fifo = make_kind(tmp_path, "fifo")
    overlay = _overlay_of(fifo, tmp_path, "raw")
    try:
        cp, elapsed = in_process(["info", overlay])
    finally:
        release_fifos(tmp_path)
    check_ok(cp)
    assert elapsed < REFUSE_WITHIN_S
    assert "backing chain: broken" in cp.stdout, cp.stdout
    assert "FIFO" in cp.stdout, cp.stdout


def test_empty_regular_file(tmp_path: Path) -> None:
    """An empty file is a regular file: a 0-byte raw source/backing works, QED paths refuse."""
    empty = tmp_path / "empty"
    empty.touch()
    for args in (["info", empty], ["map", empty], ["check", empty]):
        assert_refused(*in_process([*map(str, args)]))
    cp, _ = in_process(
        [
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            os.fspath(empty),
            os.fspath(tmp_path / "e.raw"),
        ]
    )
    check_ok(cp)
    assert (tmp_path / "e.raw").stat().st_size == 0
    overlay = tmp_path / "o.qed"
    check_ok(in_process(["create", "-b", "empty", "-F", "raw", os.fspath(overlay), "1M"])[0])
    with mounted(overlay, tmp_path / "mnt") as m:
        assert m.raw.read_bytes() == bytes(MiB)
    line = assert_refused(
        *bounded(
            [
                QEDFUSE,
                "mount",
                "-f",
                "--overlay",
                os.fspath(tmp_path / "n.qed"),
                os.fspath(empty),
                _mnt(tmp_path),
            ]
        )
    )
    assert "empty" in line
    assert not (tmp_path / "n.qed").exists()


# ---------------------------------------------------------------------- block devices


@pytest.fixture
def loops() -> Iterator[Callable[[Path], str]]:
    """Attach loop devices to files; every one is detached at the end (``losetup -d``)."""
    with contextlib.ExitStack() as stack:
        yield lambda path: stack.enter_context(loop_device(path))


def _pattern(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _qemu_raw(image: Path | str, out: Path) -> bytes:
    """The guest view as qemu-img reads it (the oracle)."""
    check_ok(run([require_tool("qemu-img"), "convert", "-O", "raw", os.fspath(image), out]))
    return out.read_bytes()


def _host_offset(image: Path, pos: int) -> int:
    cp = check_ok(in_process(["map", "--json", os.fspath(image)])[0])
    for entry in json.loads(cp.stdout):
        if entry["start"] <= pos < entry["start"] + entry["length"] and entry["depth"] == 0:
            return int(entry["offset"]) + pos - int(entry["start"])
    raise AssertionError(f"guest {pos} not allocated in {image}: {cp.stdout}")


@pytest.mark.sample(4)
@pytest.mark.parametrize("via", ["device", "symlink-to-device", "regular"])
@pytest.mark.parametrize("write_pos", [0, 3 * CS + 12345, MiB - 5, 5 * CS - 3])
def test_raw_backing_block_device_through_mount(
    tmp_path: Path, loops: Callable[[Path], str], via: str, write_pos: int
) -> None:
    """A 5-byte write into an overlay of a raw block device copies the device's bytes (not
    zeros) into the rest of the cluster; qemu-img reads the same guest bytes afterwards."""
    base_file = tmp_path / "base.img"
    base = _pattern(MiB, write_pos)
    base_file.write_bytes(base)
    backing = os.fspath(base_file)
    if via != "regular":
        backing = loops(base_file)
        if via == "symlink-to-device":
            (tmp_path / "dev-link").symlink_to(backing)
            backing = os.fspath(tmp_path / "dev-link")
    overlay = tmp_path / "o.qed"
    check_ok(in_process(["create", "-b", backing, "-F", "raw", os.fspath(overlay)])[0])
    info = json.loads(check_ok(in_process(["info", "--json", os.fspath(overlay)])[0]).stdout)
    assert info["virtual-size"] == MiB
    patch = b"HELLO"
    with mounted(overlay, tmp_path / "mnt") as m:
        assert m.raw.read_bytes() == base
        fd = os.open(m.raw, os.O_WRONLY)
        try:
            os.pwrite(fd, patch, write_pos)
            os.fsync(fd)
        finally:
            os.close(fd)
    expected = bytearray(base)
    expected[write_pos : write_pos + 5] = patch
    assert _qemu_raw(overlay, tmp_path / "q.raw") == expected
    # The overlay's own cluster holds the base's bytes around the 5 written ones.
    cluster = write_pos // CS * CS
    host = _host_offset(overlay, cluster)
    with open(overlay, "rb") as f:
        f.seek(host)
        assert f.read(CS) == expected[cluster : cluster + CS]


def _qed_with_data(tmp: Path, name: str, size: int, seed: int) -> Path:
    """A QED image with data clusters, zero clusters and holes (written by qemu-io)."""
    image = tmp / name
    check_ok(
        run([require_tool("qemu-img"), "create", "-q", "-f", "qed", os.fspath(image), str(size)])
    )
    rng = random.Random(seed)
    cmds: list[str] = []
    for _ in range(6):
        length = rng.choice([512, CS, 3 * CS])
        pos = rng.randrange(0, (size - length) // CS) * CS
        cmds += ["-c", f"write -P {rng.randrange(1, 255)} {pos} {length}"]
    cmds += ["-c", f"write -z {rng.randrange(0, size // CS) * CS} {CS}"]
    check_ok(run([require_tool("qemu-io"), "-f", "qed", *cmds, os.fspath(image)]))
    return image


def test_qed_image_on_block_device_is_read_only(
    tmp_path: Path, loops: Callable[[Path], str]
) -> None:
    """info/map/check/convert/mount -o ro of a QED image on a device match the same image in
    a file; a read-write open (mount, check -r, resize, commit into it) is one clear line."""
    image = _qed_with_data(tmp_path, "img.qed", 4 * MiB, 7)
    expected = _qemu_raw(image, tmp_path / "q.raw")
    dev = loops(image)
    original = image.read_bytes()

    def show(path: str) -> dict[str, object]:
        out = json.loads(check_ok(in_process(["info", "--json", path])[0]).stdout)
        for key in ("filename", "actual-size", "backing-chain"):
            out.pop(key)
        return dict(out)

    assert show(dev) == show(os.fspath(image))
    maps = [
        json.loads(check_ok(in_process(["map", "--json", p])[0]).stdout)
        for p in (dev, os.fspath(image))
    ]
    assert maps[0] == maps[1]
    check_ok(in_process(["check", dev])[0])
    check_ok(in_process(["convert", "-O", "raw", dev, os.fspath(tmp_path / "c.raw")])[0])
    assert (tmp_path / "c.raw").read_bytes() == expected
    with mounted(dev, tmp_path / "mnt", "-o", "ro") as m:
        assert m.raw.read_bytes() == expected
    for args in (
        ["mount", "-f", dev, _mnt(tmp_path)],
        ["check", "-r", "all", dev],
        ["resize", dev, "+1M"],
    ):
        runner = bounded if args[0] == "mount" else in_process
        line = assert_refused(*runner([QEDFUSE, *args] if args[0] == "mount" else args))
        assert "block device" in line, line
        assert "read-only" in line, line
    assert mount_entry(tmp_path / "mnt") is None
    overlay = tmp_path / "o.qed"
    check_ok(in_process(["create", "-b", dev, "-F", "qed", os.fspath(overlay)])[0])
    check_ok(run([require_tool("qemu-io"), "-f", "qed", "-c", "write -P 9 0 4k", overlay]))
    assert "block device" in assert_refused(*in_process(["commit", os.fspath(overlay)]))
    assert image.read_bytes() == original


def test_qed_backing_on_block_device(tmp_path: Path, loops: Callable[[Path], str]) -> None:
    """A QED base on a loop device under an overlay: mount, convert and qemu-img agree."""
    image = _qed_with_data(tmp_path, "img.qed", 2 * MiB, 11)
    dev = loops(image)
    overlay = tmp_path / "o.qed"
    check_ok(in_process(["create", "-b", dev, "-F", "qed", os.fspath(overlay)])[0])
    check_ok(run([require_tool("qemu-io"), "-f", "qed", "-c", "write -P 7 4096 100", overlay]))
    expected = _qemu_raw(overlay, tmp_path / "q.raw")
    with mounted(overlay, tmp_path / "mnt", "-o", "ro") as m:
        assert m.raw.read_bytes() == expected
    out = tmp_path / "c.raw"
    check_ok(in_process(["convert", "-O", "raw", os.fspath(overlay), os.fspath(out)])[0])
    assert out.read_bytes() == expected


@pytest.mark.parametrize("probe", [True, False])
@pytest.mark.parametrize("size", [MiB, MiB + 4096, 3 * MiB])
def test_convert_block_device_source(
    tmp_path: Path, loops: Callable[[Path], str], probe: bool, size: int
) -> None:
    """``convert [-f raw] /dev/loopN out`` copies the whole device (it used to give 0 bytes)."""
    data = bytearray(_pattern(size, size))
    data[CS : 3 * CS] = bytes(2 * CS)  # a zero range too
    (tmp_path / "base.img").write_bytes(data)
    dev = loops(tmp_path / "base.img")
    fmt_args = [] if probe else ["-f", "raw"]
    for out_fmt in ("raw", "qed"):
        out = tmp_path / f"c.{out_fmt}"
        check_ok(in_process(["convert", *fmt_args, "-O", out_fmt, dev, os.fspath(out)])[0])
        assert _qemu_raw(out, tmp_path / "q.raw") == data


@pytest.mark.parametrize("raw_size", [MiB, 2 * MiB + 1000, 2 * MiB - 512])
def test_convert_onto_block_device(
    tmp_path: Path, loops: Callable[[Path], str], raw_size: int
) -> None:
    """Raw onto a device is written in place, zeros included (a device is not sparse); the
    device's tail past the image is left alone; a smaller device, a QED destination and a
    missing --force are refused without touching it."""
    source = tmp_path / "src.raw"
    data = bytearray(_pattern(raw_size, raw_size))
    data[0:CS] = bytes(CS)
    data[len(data) // 2 : len(data) // 2 + 3 * CS] = bytes(3 * CS)
    source.write_bytes(data)
    qed = tmp_path / "src.qed"
    check_ok(
        in_process(["convert", "-f", "raw", "-O", "qed", os.fspath(source), os.fspath(qed)])[0]
    )
    junk = _pattern(4 * MiB, 99)
    dev_file = tmp_path / "dev.img"
    dev_file.write_bytes(junk)
    dev = loops(dev_file)
    for args in (
        ["convert", "-O", "raw", os.fspath(qed), dev],
        ["convert", "--force", "-O", "qed", os.fspath(qed), dev],
    ):
        assert "block device" in assert_refused(*in_process(args))
    with open(dev, "rb") as f:
        assert f.read() == junk
    for src_args in (["-f", "raw", os.fspath(source)], [os.fspath(qed)]):
        check_ok(in_process(["convert", "--force", "-O", "raw", *src_args, dev])[0])
        size = -(-raw_size // 512) * 512 if src_args[0] != "-f" else raw_size
        with open(dev, "rb") as f:
            got = f.read()
        assert got[:raw_size] == data
        assert got[raw_size:size] == bytes(size - raw_size)
        assert got[size:] == junk[size:]
        with open(dev, "r+b") as f:
            f.write(junk)  # dirty again for the next source
    small = tmp_path / "small.img"
    small.write_bytes(junk[: raw_size // 2 // 512 * 512])
    small_dev = loops(small)
    line = assert_refused(
        *in_process(["convert", "--force", "-O", "raw", os.fspath(qed), small_dev])
    )
    assert "cannot grow" in line
    assert small.read_bytes() == junk[: raw_size // 2 // 512 * 512]


def test_overlay_and_override_on_block_device(tmp_path: Path, loops: Callable[[Path], str]) -> None:
    """``--overlay`` on a device (it used to say "empty") and ``-o backing=/dev/loopN``."""
    base = _pattern(2 * MiB, 5)
    (tmp_path / "base.img").write_bytes(base)
    dev = loops(tmp_path / "base.img")
    new = tmp_path / "new.qed"
    with mounted(dev, tmp_path / "mnt", "--overlay", os.fspath(new), raw_name="new.raw") as m:
        assert m.raw.read_bytes() == base
        with open(m.raw, "r+b") as f:
            f.seek(CS + 7)
            f.write(b"12345")
    expected = bytearray(base)
    expected[CS + 7 : CS + 12] = b"12345"
    assert _qemu_raw(new, tmp_path / "q.raw") == expected
    other = tmp_path / "other.qed"
    check_ok(in_process(["create", os.fspath(other), "2M"])[0])
    with mounted(other, tmp_path / "mnt2", "-o", f"backing={dev},ro") as m:
        assert m.raw.read_bytes() == base


def test_commit_into_block_device(tmp_path: Path, loops: Callable[[Path], str]) -> None:
    """commit writes an overlay's data and zero clusters into a raw device (it used to say
    only "Invalid argument"); a device smaller than the overlay is refused, unchanged."""
    base = _pattern(2 * MiB, 3)
    (tmp_path / "base.img").write_bytes(base)
    dev = loops(tmp_path / "base.img")
    overlay = tmp_path / "o.qed"
    check_ok(in_process(["create", "-b", dev, "-F", "raw", os.fspath(overlay)])[0])
    qemu_io = require_tool("qemu-io")
    cmds = ["-c", "write -P 1 100 5", "-c", f"write -z {4 * CS} {CS}", "-c", f"write -P 2 {MiB} 3"]
    check_ok(run([qemu_io, "-f", "qed", *cmds, overlay]))
    expected = _qemu_raw(overlay, tmp_path / "q.raw")
    check_ok(in_process(["commit", os.fspath(overlay)])[0])
    assert (tmp_path / "base.img").read_bytes() == expected
    big = tmp_path / "big.qed"
    check_ok(in_process(["create", "-b", dev, "-F", "raw", os.fspath(big), "4M"])[0])
    check_ok(run([qemu_io, "-f", "qed", "-c", "write -P 3 0 4k", big]))
    line = assert_refused(*in_process(["commit", os.fspath(big)]))
    assert "cannot grow" in line
    assert (tmp_path / "base.img").read_bytes() == expected


# ---------------------------------------------------------------------- interruptions


def _interrupt_when(
    args: list[str], ready: Callable[[int], bool], sig: int = signal.SIGINT
) -> subprocess.CompletedProcess[str]:
    """Run ``args``, send ``sig`` once ``ready(pid)``, return the result (bounded)."""
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline = time.monotonic() + 60
    try:
        while not ready(proc.pid):
            if proc.poll() is not None:
                pytest.fail(f"finished before it could be interrupted: {proc.communicate()}")
            if time.monotonic() > deadline:
                pytest.fail("never got ready to be interrupted")
            time.sleep(0.002)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _big_qed(tmp: Path, name: str, size: int) -> Path:
    """A QED image full of non-zero data (slow enough to interrupt)."""
    raw = tmp / f"{name}.src"
    with open(raw, "wb") as f:
        for i in range(size // MiB):
            f.write(bytes([i % 250 + 1]) * MiB)
    image = tmp / name
    check_ok(in_process(["convert", "-f", "raw", "-O", "qed", os.fspath(raw), os.fspath(image)])[0])
    raw.unlink()
    return image


def _writing_replacement(pid: int, directory: Path) -> bool:
    """Whether ``pid`` has a replacement file open in ``directory`` with data in it: a
    temporary name there, or an unnamed (``O_TMPFILE``) file."""
    return any(
        os.path.dirname(target) == os.fspath(directory)
        and (target.endswith(".qedfuse-tmp") or target.endswith(" (deleted)"))
        and size > 0
        for target, size in open_files(pid)
    )


@pytest.mark.parametrize(
    ("target", "sig", "out_format"),
    [
        ("file", signal.SIGINT, "raw"),
        ("symlink", signal.SIGINT, "raw"),
        ("file", signal.SIGKILL, "raw"),
        ("file", signal.SIGKILL, "qed"),
    ],
    ids=["file-ctrl-c", "symlink-ctrl-c", "file-kill-9", "qed-kill-9"],
)
def test_convert_force_replaces_by_rename(
    tmp_path: Path, target: str, sig: int, out_format: str
) -> None:
    """--force writes beside the target and renames: the mode is kept, a symlink stays a
    symlink, no temporary file is left; an interrupted run, even by SIGKILL, leaves the old
    file untouched and no temporary file behind."""
    old = tmp_path / "old.raw"
    old.write_bytes(b"old contents" * 1000)
    os.chmod(old, 0o640)
    dst = old
    if target == "symlink":
        dst = tmp_path / "link.raw"
        dst.symlink_to("old.raw")
    src = _big_qed(tmp_path, "src.qed", 128 * MiB)
    before = set(os.listdir(tmp_path))

    def leftovers() -> set[str]:
        return set(os.listdir(tmp_path)) - before

    cp = _interrupt_when(
        [QEDFUSE, "convert", "--force", "-O", out_format, os.fspath(src), os.fspath(dst)],
        lambda pid: _writing_replacement(pid, tmp_path),
        sig,
    )
    assert cp.returncode == -sig if sig == signal.SIGKILL else cp.returncode != 0, describe(cp)
    assert "Traceback" not in cp.stderr
    assert old.read_bytes() == b"old contents" * 1000
    assert not leftovers()
    small = tmp_path / "small.qed"
    check_ok(in_process(["create", os.fspath(small), "1M"])[0])
    check_ok(run([require_tool("qemu-io"), "-f", "qed", "-c", "write -P 5 0 4k", small]))
    check_ok(in_process(["convert", "--force", "-O", "raw", os.fspath(small), os.fspath(dst)])[0])
    assert old.read_bytes() == b"\x05" * 4096 + bytes(MiB - 4096)
    copy = tmp_path / "copy.qed"
    check_ok(in_process(["convert", "--force", "-O", "qed", os.fspath(small), os.fspath(dst)])[0])
    check_ok(in_process(["convert", "-O", "qed", os.fspath(dst), os.fspath(copy)])[0])
    check_ok(run([require_tool("qemu-img"), "check", dst]))
    check_ok(run([require_tool("qemu-img"), "compare", "-f", "qed", "-F", "qed", small, dst]))
    copy.unlink()
    assert stat.S_IMODE(old.stat().st_mode) == 0o640
    assert dst.is_symlink() == (target == "symlink")
    assert leftovers() == {"small.qed"}


def test_commit_interrupted_says_what_next(tmp_path: Path) -> None:
    """Ctrl-C during commit: the base holds part of the data, and running again finishes."""
    base = tmp_path / "base.raw"
    with open(base, "wb") as f:
        f.truncate(128 * MiB)
    overlay = tmp_path / "o.qed"
    check_ok(in_process(["create", "-b", "base.raw", "-F", "raw", os.fspath(overlay)])[0])
    writes = [f"write -P {i + 1} {i * 16 * MiB} {16 * MiB}" for i in range(8)]
    check_ok(
        run(
            [require_tool("qemu-io"), "-f", "qed", *[a for w in writes for a in ("-c", w)], overlay]
        )
    )

    def base_written() -> bool:
        return base.stat().st_blocks > 0

    cp = _interrupt_when([QEDFUSE, "commit", os.fspath(overlay)], lambda _pid: base_written())
    assert cp.returncode == 130, describe(cp)
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1, describe(cp)
    assert "part of the overlay's data" in lines[0], lines[0]
    assert "again" in lines[0], lines[0]
    check_ok(in_process(["commit", os.fspath(overlay)], timeout=120)[0])
    check_ok(run([require_tool("qemu-img"), "compare", "-f", "qed", "-F", "raw", overlay, base]))


def test_block_device_in_use_is_not_written(tmp_path: Path, loops: Callable[[Path], str]) -> None:
    """A device claimed exclusively (as a mounted filesystem claims it) is refused for writing
    by convert and commit, and left unchanged."""
    junk = _pattern(MiB, 4)
    (tmp_path / "dev.img").write_bytes(junk)
    dev = loops(tmp_path / "dev.img")
    overlay = tmp_path / "o.qed"
    check_ok(in_process(["create", "-b", dev, "-F", "raw", os.fspath(overlay)])[0])
    check_ok(run([require_tool("qemu-io"), "-f", "qed", "-c", "write -P 3 0 4k", overlay]))
    claim = os.open(dev, os.O_RDONLY | os.O_EXCL)
    try:
        for args in (
            ["convert", "--force", "-O", "raw", os.fspath(_good_qed(tmp_path)), dev],
            ["commit", os.fspath(overlay)],
        ):
            assert "in use" in assert_refused(*in_process(args))
    finally:
        os.close(claim)
    assert (tmp_path / "dev.img").read_bytes() == junk


def test_commit_failing_midway_says_what_next(tmp_path: Path) -> None:
    """A commit that fails after it started writing (ENOSPC on a small tmpfs holding the
    base) names the error, says the base holds part of the data and how to finish."""
    fs = tmp_path / "fs"
    fs.mkdir()
    check_ok(run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", fs]))
    try:
        base = fs / "base.raw"
        with open(base, "wb") as f:
            f.truncate(16 * MiB)
        overlay = tmp_path / "o.qed"
        check_ok(in_process(["create", "-b", os.fspath(base), "-F", "raw", os.fspath(overlay)])[0])
        writes = [a for i in range(4) for a in ("-c", f"write -P {i + 1} {i * 4 * MiB} {4 * MiB}")]
        check_ok(run([require_tool("qemu-io"), "-f", "qed", *writes, overlay]))
        line = assert_refused(*in_process(["commit", os.fspath(overlay)]))
        assert "No space left on device" in line, line
        assert "part of the overlay's data" in line, line
        assert f"run 'qedfuse commit {overlay}' again" in line, line
    finally:
        run(["umount", "-l", fs])


@pytest.mark.parametrize(
    "kind",
    ["fifo", "fifo-with-reader", "directory", "socket", "link-to-fifo", "link-to-socket"],
)
def test_mount_log_must_be_a_file(tmp_path: Path, kind: str) -> None:
    """``-o log=`` pointing at a FIFO hung the daemon in open() and ``mount`` with it (an
    outside review); every non-file is a one-line refusal before the fork, nothing mounted."""
    image = _good_qed(tmp_path)
    mnt = _mnt(tmp_path)
    reader = -1
    if kind == "fifo-with-reader":
        log_path = make_kind(tmp_path, "fifo")
        reader = os.open(log_path, os.O_RDONLY | os.O_NONBLOCK)
    else:
        log_path = make_kind(tmp_path, kind)
    try:
        cp, elapsed = bounded([QEDFUSE, "mount", os.fspath(image), mnt, "-o", f"log={log_path}"])
        line = assert_refused(cp, elapsed)
        assert "log file" in line, line
        assert mount_entry(mnt) is None
    finally:
        if reader >= 0:
            os.close(reader)
        release_fifos(tmp_path)
        kill_strays(tmp_path)


def test_mount_log_may_be_dev_null(tmp_path: Path) -> None:
    """A character device (``/dev/null``, a terminal) is a fine log."""
    image = _good_qed(tmp_path)
    with mounted(image, tmp_path / "mnt", "-o", "log=/dev/null") as m:
        assert m.raw.stat().st_size == MiB
        assert m.raw.read_bytes() == bytes(MiB)


@pytest.mark.parametrize(
    ("option", "target"),
    [
        ("--pidfile", "image"),
        ("pidfile=", "image"),
        ("log=", "image"),
        ("--pidfile", "backing"),
        ("log=", "backing"),
        ("--pidfile", "inside-mount"),
        ("log=", "inside-mount"),
        ("--pidfile", "not-a-pidfile"),
        ("--pidfile", "overlay"),
        ("log=", "overlay"),
        ("--pidfile", "link-into-mount"),
        ("log=", "link-into-mount"),
        ("pidfile=", "link-into-mount"),
        ("--pidfile", "small-file"),
        ("--pidfile", "empty-file"),
        ("log=", "link-to-overlay"),
    ],
)
def test_the_daemons_own_files_never_touch_what_it_serves(
    tmp_path: Path, option: str, target: str
) -> None:
    """A pidfile naming the image replaced it with a pid, then deleted it at unmount; a
    pidfile or log inside the mount point deadlocked the daemon on its own mount (an outside
    review).  Each is a one-line refusal before anything starts; nothing changes."""
    base = tmp_path / "base.raw"
    base.write_bytes(b"b" * MiB)
    image = tmp_path / "top.qed"
    check_ok(in_process(["create", "-b", "base.raw", "-F", "raw", os.fspath(image)])[0])
    other = tmp_path / "data.bin"
    other.write_bytes(b"d" * 4096)
    mnt = _mnt(tmp_path)
    overlay = tmp_path / "new-overlay.qed"
    (tmp_path / "mnt-link").symlink_to("mnt")  # a way into the mount point
    (tmp_path / "overlay-link").symlink_to("new-overlay.qed")  # dangling until created
    small = tmp_path / "small.conf"
    small.write_bytes(b"my-hostname\n")  # small, but no pid
    empty = tmp_path / "empty"
    empty.touch()
    path = {
        "image": image,
        "backing": base,
        "inside-mount": Path(mnt) / "f",
        "not-a-pidfile": other,
        "overlay": overlay,
        "link-into-mount": tmp_path / "mnt-link" / "f",
        "small-file": small,
        "empty-file": empty,
        "link-to-overlay": tmp_path / "overlay-link",
    }[target]
    args = [QEDFUSE, "mount", os.fspath(image), mnt]
    if target in ("overlay", "link-to-overlay"):
        args += ["--overlay", os.fspath(overlay)]
    args += [option, os.fspath(path)] if option.startswith("--") else ["-o", f"{option}{path}"]
    before = snapshot(tmp_path)
    try:
        cp, elapsed = bounded(args)
        line = assert_refused(cp, elapsed)
        assert str(path) in line, line
        assert mount_entry(mnt) is None
        assert snapshot(tmp_path) == before  # nothing created, replaced or deleted
    finally:
        kill_strays(tmp_path)
