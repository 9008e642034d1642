"""Image locks between qedfuse mounts and QEMU, both directions, through real processes.

qedfuse takes QEMU's OFD lock bytes (reliability.md §6.3): a read-write mount holds
100, 101, 103, 201, 203 and a read-only one 100, 201, 203, exactly as ``qemu-io`` does, so
each refuses the other where QEMU would refuse itself.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clifork import ForkedCli
from fusehelpers import QEDFUSE, mount_entry, mounted, mounts_snapshot, wait_until

from support import check_ok, describe, qemu_img_create, require_tool, run

pytestmark = [pytest.mark.fuse, pytest.mark.qemu]

RW_BYTES = {100, 101, 103, 201, 203}
RO_BYTES = {100, 201, 203}


def locked_bytes(path: Path) -> set[int]:
    """Bytes covered by the OFD locks /proc/locks lists for ``path``'s inode."""
    st = os.stat(path)
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    found: set[int] = set()
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
    return qemu_img_create(tmp_path / name, "16M")


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
    if cp.returncode == 0:  # wrongly mounted: do not leave it behind
        run([QEDFUSE, "umount", "--wait", "--timeout", "30", str(mnt)], timeout=60)
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


def test_overlay_base_is_locked_as_qemu_locks_a_qed_backing_file(tmp_path: Path) -> None:
    """QEMU holds a QED backing file with 100, 201, 203: readers and more overlays are fine."""
    qemu_img = require_tool("qemu-img")
    base = _create(tmp_path, "base.qed")
    with mounted(
        base, tmp_path / "mnt", "--overlay", str(tmp_path / "new.qed"), raw_name="new.raw"
    ):
        assert locked_bytes(base) == RO_BYTES
        assert locked_bytes(tmp_path / "new.qed") == RW_BYTES
        check_ok(run([qemu_img, "info", base]))
        # a second overlay on the same base is fine: the base is only read
        with mounted(
            base, tmp_path / "mnt2", "--overlay", str(tmp_path / "new2.qed"), raw_name="new2.raw"
        ):
            assert locked_bytes(base) == RO_BYTES
        cp = run([qemu_img, "resize", base, "+1M"])  # but nobody may change it
        assert 'Failed to get "write" lock' in cp.stderr, cp.stderr


# ------------------------------------------------- a conflict names its holder (issue 12)

_cli = ForkedCli()  # the real command line, forked: 48 commands per run without 0.5 s each


@pytest.fixture(scope="module", autouse=True)
def _close_cli() -> Iterator[None]:
    yield
    _cli.close()


@contextlib.contextmanager
def _holder(kind: str, image: Path, tmp_path: Path) -> Iterator[tuple[int, str]]:
    """Hold ``image`` as ``kind``; yield (pid, how the error must name it)."""
    if kind.startswith("mount"):
        opts = ("-o", "ro") if kind == "mount ro" else ()
        with mounted(image, tmp_path / "holder", *opts) as m:
            yield m.pid, f"pid {m.pid} (the qedfuse mount on {tmp_path / 'holder'})"
        return
    flags = ["-r"] if kind == "qemu-io -r" else []
    proc = subprocess.Popen(
        [require_tool("qemu-io"), *flags, "-f", "qed", str(image)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: 100 in locked_bytes(image), 20, "qemu-io to lock the image")
        yield proc.pid, f"pid {proc.pid} (qemu-io {' '.join([*flags, '-f', 'qed', image.name])})"
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=20)


#: command -> (argv after qedfuse, the same with the suggested fix applied, hint text)
_COMMANDS = {
    "info": (["info"], ["info", "-U"], "Use -U (force-share) to read it anyway."),
    "map": (["map"], ["map", "-U"], "Use -U (force-share) to read it anyway."),
    "check": (["check"], ["check", "-U"], "Use -U (force-share) to read it anyway."),
    "convert": (["convert", "-O", "raw"], ["convert", "-U", "-O", "raw"], "Use -U"),
    "mount": (["mount"], ["mount", "-o", "ro"], "Mount it with -o ro to share it read-only."),
    "resize": (["resize"], None, None),
}


def _argv(args: list[str], image: Path, tmp_path: Path, n: int) -> list[str]:
    if args[0] == "convert":
        return [*args, str(image), str(tmp_path / f"out{n}.raw")]
    if args[0] == "mount":
        (tmp_path / f"m{n}").mkdir(exist_ok=True)
        return [*args, str(image), str(tmp_path / f"m{n}")]
    if args[0] == "resize":
        return [*args, str(image), "+1M"]
    return [*args, str(image)]


def _try_command(command: str, image: Path, tmp_path: Path, kind: str, named: str) -> str | None:
    """Run ``command`` against the held image; None if it behaved, else what went wrong."""
    args, fixed, hint = _COMMANDS[command]
    cp = _cli(*_argv(args, image, tmp_path, 1))
    if cp.returncode == 0:  # a reader next to a reader: nothing to refuse
        if command == "mount":
            check_ok(_cli("umount", "--wait", tmp_path / "m1"))
        if kind in ("qemu-io -r", "mount ro") and command != "resize":
            return None
        return f"not refused: {describe(cp)}"
    lines = cp.stderr.splitlines()
    if len(lines) != 1 or not lines[0].startswith("qedfuse: ") or "lock" not in lines[0]:
        return f"not one lock error line: {describe(cp)}"
    line = lines[0]
    if f"It is held by {named}." not in line:
        return f"holder not named ({named}): {line}"
    if fixed is None:
        return None if "-U" not in line and "-o ro" not in line else f"bad hint: {line}"
    assert hint is not None
    cp2 = _cli(*_argv(fixed, image, tmp_path, 2))
    if cp2.returncode == 0:
        if command == "mount":
            check_ok(_cli("umount", "--wait", tmp_path / "m2"))
        return None if hint in line else f"the fix works but is not suggested: {line}"
    return None if hint not in line else f"suggested, but it fails: {line}\n{describe(cp2)}"


@pytest.mark.parametrize("kind", ["qemu-io", "qemu-io -r", "mount rw", "mount ro"])
def test_conflict_names_the_holder_and_a_fix_that_works(tmp_path: Path, kind: str) -> None:
    """Every refusal names the holder; a hint is given exactly when following it works.

    One holder per case serves every command (info, map, check, convert, mount, resize).
    """
    image = _create(tmp_path)
    with _holder(kind, image, tmp_path) as (_pid, named):
        wrong = {c: _try_command(c, image, tmp_path, kind, named) for c in _COMMANDS}
    wrong = {c: w for c, w in wrong.items() if w is not None}
    assert not wrong, "\n".join(f"{c}: {w}" for c, w in wrong.items())


def test_conflict_on_a_backing_file_names_its_holder(tmp_path: Path) -> None:
    """A writer of the base refuses a mount of its overlay, naming the writer."""
    base = _create(tmp_path, "base.qed")
    top = tmp_path / "top.qed"
    check_ok(run([require_tool("qemu-img"), "create", "-f", "qed", "-b", base, "-F", "qed", top]))
    with _holder("qemu-io", base, tmp_path) as (_pid, named):
        line = _refused(top, tmp_path / "mnt")
        assert f"[{base}]" in line, line
        assert f"It is held by {named}." in line, line
        # -o ro would not help (the base is written), so it is not suggested
        assert "-o ro" not in line, line
        _refused(top, tmp_path / "mnt", "-o", "ro")


def test_every_holder_is_named(tmp_path: Path) -> None:
    image = _create(tmp_path)
    with contextlib.ExitStack() as stack:
        named = [stack.enter_context(_holder("qemu-io -r", image, tmp_path))[1] for _ in range(2)]
        line = _refused(image, tmp_path / "mnt")
    assert all(n in line for n in named), line


def test_holder_scan_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scan of /proc stops at its fd budget: the error then just names nobody."""
    from qedfuse import locking
    from qedfuse.errors import LockError

    image = _create(tmp_path)
    with qemu_io_holding(image, expect=RW_BYTES):
        fd = os.open(image, os.O_RDONLY)
        try:
            start = time.monotonic()
            with pytest.raises(LockError, match=r"held by pid \d+ \(qemu-io"):
                locking.lock_image(fd, locking.LockMode.READ_ONLY, str(image))
            assert time.monotonic() - start < locking.MAX_SCAN_SECONDS + 0.5
            monkeypatch.setattr(locking, "MAX_SCANNED_FDS", 0)
            with pytest.raises(LockError) as caught:
                locking.lock_image(fd, locking.LockMode.READ_ONLY, str(image))
            assert "held by" not in str(caught.value)
            assert locked_bytes(image) == RW_BYTES  # a refused lock leaves nothing behind
        finally:
            os.close(fd)


# ------------------------------------------- a read-write open refused by permissions


@contextlib.contextmanager
def _unwritable(how: str, tmp_path: Path) -> Iterator[tuple[Path, list[str]]]:
    """An image a read-write open is refused (EACCES, EPERM or EROFS); yield it and a prefix."""
    if os.geteuid() != 0 and how != "eacces":
        pytest.skip(f"{how} needs root (chattr +i / a read-only bind mount)")
    directory = Path(tempfile.mkdtemp(prefix="qedfuse-perm-"))
    try:
        directory.chmod(0o755)
        image = _create(directory)
        image.chmod(0o644)
        if how == "eacces":
            prefix = []
            if os.geteuid() == 0:
                prefix = [require_tool("setpriv"), "--reuid=65534", "--regid=65534",
                          "--clear-groups"]  # fmt: skip
            else:
                image.chmod(0o444)
            yield image, prefix
        elif how == "eperm":
            check_ok(run([require_tool("chattr"), "+i", image]))
            try:
                yield image, []
            finally:
                run([require_tool("chattr"), "-i", image])
        else:
            ro = directory / "ro"
            ro.mkdir()
            check_ok(run(["mount", "--bind", "-o", "ro", directory, ro]))
            try:
                yield ro / image.name, []
            finally:
                check_ok(run(["umount", ro]))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("how", ["eacces", "eperm", "erofs"])
def test_permission_refusal_suggests_read_only(tmp_path: Path, how: str) -> None:
    reason = {"eacces": "Permission denied", "eperm": "Operation not permitted",
              "erofs": "Read-only file system"}[how]  # fmt: skip
    with _unwritable(how, tmp_path) as (image, prefix):
        mnt = Path(tempfile.mkdtemp(prefix="qedfuse-perm-mnt-"))
        try:
            mnt.chmod(0o777)
            cp = run([*prefix, QEDFUSE, "mount", image, mnt], timeout=30)
            assert cp.returncode == 1, describe(cp)
            lines = cp.stderr.splitlines()
            assert len(lines) == 1, describe(cp)
            assert reason in lines[0], lines[0]
            assert "Mount it with -o ro" in lines[0], lines[0]
            cp = run([*prefix, QEDFUSE, "resize", image, "+1M"], timeout=30)
            assert cp.returncode != 0, describe(cp)
            assert "-o ro" not in cp.stderr, describe(cp)
            if not prefix:  # following the hint works (an unprivileged FUSE mount may not)
                with mounted(image, mnt, "-o", "ro") as m:
                    assert m.raw.read_bytes()[:512] == bytes(512)
        finally:
            mnt.rmdir()
