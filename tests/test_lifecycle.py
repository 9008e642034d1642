"""Lifecycle against daemons that do not answer, and mount points named by any path.

Rules (issue 11 findings 6 and 10, issue 12 item 4):

- No syscall into a FUSE mount that may not answer unless it is bounded: ``umount``,
  ``umount --wait``, ``mount`` onto the same point and ``make run`` finish within their
  timeout plus a small slack when the daemon is stopped (SIGSTOP) before or during the
  command, or dead (SIGKILL, connection left), with and without ``--lazy``; when they cannot
  finish they say so in one line with what to do, and exit non-zero.
- A mount point is the same mount point whichever path names it: symlinks in any component,
  relative paths, ``.``/``..``, trailing slashes, names that mountinfo escapes (space, tab,
  backslash) - found without stat'ing the mount.
- ``umount --wait`` after a plain ``umount`` waits for the daemon still flushing.

Every stopped daemon is resumed (SIGCONT) and, if still there, killed in a finalizer.
"""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fusehelpers import QEDFUSE, Mounted, mount_entry, mounted, need_check, pid_alive, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qedfuse import mounttable, registry
from support import check_ok, require_tool, run

MiB = 1024 * 1024
#: What a command may take beyond its own bound: interpreter start-up and imports take
#: 0.5 s on an idle box and up to 2.5 s measured with 7 engineers on 2 cores.
SLACK_S = 4.0
PROBE_S = mounttable.PROBE_TIMEOUT_S
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def paused() -> Iterator[Callable[[int], contextlib.AbstractContextManager[None]]]:
    """``with paused(pid):`` SIGSTOPs pid and SIGCONTs it on the way out (also on failure,
    before the mount's own cleanup waits for the daemon); the finalizer resumes every pid
    again and kills it if it does not exit."""
    stopped: list[int] = []

    @contextlib.contextmanager
    def stop(pid: int) -> Iterator[None]:
        stopped.append(pid)
        os.kill(pid, signal.SIGSTOP)
        try:
            wait_until(lambda: registry.is_stopped(pid), 10, f"pid {pid} to stop")
            yield
        finally:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGCONT)

    yield stop
    for pid in stopped:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + 30
    for pid in stopped:
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


Pause = Callable[[int], contextlib.AbstractContextManager[None]]


def _image(tmp_path: Path, name: str = "disk.qed", size: str = "16M") -> Path:
    path = tmp_path / name
    check_ok(run([QEDFUSE, "create", path, size]))
    return path


def _timed(
    *args: str | os.PathLike[str], bound: float
) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run the CLI; fail if it takes longer than ``bound`` + slack (a hang is a failure)."""
    t0 = time.monotonic()
    try:
        cp = run([QEDFUSE, *args], timeout=bound + SLACK_S + 30)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"qedfuse {args} hung (more than {bound + SLACK_S + 30:g} s)"
        ) from None
    elapsed = time.monotonic() - t0
    assert elapsed <= bound + SLACK_S, f"took {elapsed:.2f} s, bound {bound:g} s\n{cp.stderr}"
    return cp, elapsed


def _one_line(cp: subprocess.CompletedProcess[str]) -> str:
    lines = cp.stderr.splitlines()
    assert len(lines) == 1, cp.stderr
    assert lines[0].startswith("qedfuse: "), cp.stderr
    assert "Traceback" not in cp.stderr
    return lines[0]


def _no_trouble(m: Mounted) -> None:
    log = m.log()
    assert "Traceback" not in log, log
    assert "WARNING" not in log, log
    assert "ERROR" not in log, log
    assert "CRITICAL" not in log, log


@contextlib.contextmanager
def _cleanup(physical: str) -> Iterator[None]:
    """Whatever happens inside, leave nothing mounted at ``physical`` and no daemon behind
    (only the daemon that mountinfo and the registry tie to this very mount point)."""
    entry = mounttable.mount_entry(physical)
    daemon = registry.daemon_for(entry) if entry is not None else None
    try:
        yield
    finally:
        if mounttable.mount_entry(physical) is not None:
            run(["fusermount3", "-uz", physical], timeout=30)
        if daemon is not None and daemon.alive():
            with contextlib.suppress(OSError):
                os.kill(daemon.pid, signal.SIGCONT)
            with contextlib.suppress(AssertionError):
                wait_until(lambda: not daemon.alive(), 30, f"pid {daemon.pid} to exit")
            if daemon.alive():
                os.kill(daemon.pid, signal.SIGKILL)


def _sleeping(pid: int) -> bool:
    """True while ``pid`` sits in a sleep (the --wait poll loop), not in start-up work."""
    try:
        with open(f"/proc/{pid}/wchan", encoding="ascii") as f:
            return "nanosleep" in f.read()
    except OSError:
        return False


def _registry_files(pid: int) -> list[str]:
    return [
        p
        for d in registry._registry_dirs()
        for p in glob.glob(os.path.join(d, f"mount-*-{pid}.json"))
    ]


# ---------------------------------------------------------------------------- path identity


def _tree(base: Path, leaf: str) -> dict[str, Path]:
    """real/<leaf> plus symlinks to it: a directory link, a link to the leaf, chains."""
    real = base / "real dir"
    (real / leaf).mkdir(parents=True)
    (real / "sub").mkdir()
    (base / "lnk").symlink_to("real dir")  # relative
    (base / "abs").symlink_to(real)  # absolute
    (base / "chain").symlink_to("lnk")  # link to a link
    (base / "leaflink").symlink_to(real / leaf)  # a link naming the leaf itself
    (real / "sub" / "up").symlink_to("..")  # `..` inside a link
    return {"real": real}


def _variants(base: Path, leaf: str) -> list[str]:
    """Different spellings of base/real dir/<leaf>."""
    r = f"{base}/real dir"
    return [
        f"{r}/{leaf}",
        f"{r}/{leaf}/",
        f"{r}//{leaf}/.",
        f"{r}/sub/../{leaf}",
        f"{r}/sub/up/{leaf}",
        f"{base}/lnk/{leaf}",
        f"{base}/lnk/{leaf}/",
        f"{base}/abs/./{leaf}",
        f"{base}/chain/{leaf}",
        f"{base}/chain/sub/up/sub/../{leaf}//",
        f"{base}/leaflink",
        f"{base}/leaflink/",
        f"{base}/lnk/../abs/{leaf}",
    ]


LEAVES = ["m", "m b", "tab\there", "back\\slash", "nl\nname", "ü-é"]


@pytest.mark.parametrize("leaf", LEAVES)
def test_resolve_path_gives_one_identity(
    tmp_path: Path, leaf: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _tree(tmp_path, leaf)
    want = os.path.realpath(tmp_path / "real dir" / leaf)
    for variant in _variants(tmp_path, leaf):
        got = mounttable.resolve_path(variant)
        assert got.path == want, variant
        assert got.kind == "dir", variant
        assert got.mount is None, variant
    monkeypatch.chdir(tmp_path / "lnk")
    assert mounttable.resolve_path(leaf).path == want
    assert mounttable.resolve_path(f"./sub/up/{leaf}/").path == want
    assert mounttable.resolve_path("../leaflink").path == want
    missing = mounttable.resolve_path(f"{tmp_path}/lnk/nothing/../x")
    assert missing.kind == "missing"
    assert missing.path == os.path.join(os.path.realpath(tmp_path), "real dir", "x")


_TOKENS = ["d1", "d2", "f", "up", "rel", "abs", "chain", "dot", "gone", "nope", ".", "..", ""]


@pytest.fixture(scope="module")
def link_farm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directories, a file, and symlinks of every shape (relative, absolute, chained,
    dangling, to '..', to '.') for random paths to wander through."""
    base = tmp_path_factory.mktemp("farm")
    for d in ("d1", "d1/d2", "d2", "d2/d1"):
        (base / d).mkdir()
    (base / "f").write_text("x")
    for where in (base, base / "d1", base / "d2", base / "d1" / "d2"):
        (where / "up").symlink_to("..")
        (where / "rel").symlink_to("d2" if where == base else "../d1")
        (where / "abs").symlink_to(base / "d2" / "d1")
        (where / "chain").symlink_to("rel")
        (where / "dot").symlink_to(".")
        (where / "gone").symlink_to("nowhere/at/all")
    return base


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.sampled_from(_TOKENS), min_size=1, max_size=8), st.booleans())
def test_resolve_path_agrees_with_the_kernel(
    link_farm: Path, tokens: list[str], slash: bool
) -> None:
    """Outside any mount, resolve_path finds what the kernel finds: random walks through a
    link farm (realpath is the oracle for paths the kernel resolves)."""
    path = str(link_farm) + "/" + "/".join(tokens) + ("/" if slash else "")
    got = mounttable.resolve_path(path)
    if got.kind == "missing":  # the kernel fails such a path: only the verdict must agree
        assert not os.path.exists(path), path
    else:
        assert got.path == os.path.realpath(path), path
        kind = "mount" if got.mount is not None else "dir" if os.path.isdir(path) else "file"
        assert got.kind == kind, (path, got)
        assert (got.mount is not None) == os.path.ismount(path), (path, got)


def test_resolve_path_symlink_loop(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    with pytest.raises(mounttable.MountError, match="too many levels of symbolic links"):
        mounttable.resolve_path(str(tmp_path / "a" / "m"))


def test_mountinfo_tree_stacked_and_shadowed() -> None:
    """The visible mount at a path follows the mount tree: stacked mounts, shadowed ones."""
    E = mounttable.MountEntry
    entries = [
        E("/", "ext4", "/dev/root", "8:1", 20, 1),
        E("/a", "tmpfs", "t1", "0:30", 21, 20),
        E("/a/m", "fuse.qedfuse", "old.qed", "0:40", 22, 21),  # shadowed by the next /a
        E("/a", "tmpfs", "t2", "0:31", 23, 21),
        E("/a/m", "fuse.qedfuse", "x.qed", "0:41", 24, 23),
        E("/a/m", "fuse.qedfuse", "y.qed", "0:42", 25, 24),  # stacked on x.qed
    ]
    root = mounttable._root_mount(entries)
    assert root is not None
    assert root.mount_id == 20
    a = mounttable._covering(entries, root, "/a")
    assert a is not None
    assert a.source == "t2"
    m = mounttable._covering(entries, a, "/a/m")
    assert m is not None
    assert m.source == "y.qed"


# ---------------------------------------------------------------------------- real mounts


@pytest.mark.sample(2)
@pytest.mark.fuse
@pytest.mark.parametrize("leaf", ["m", "m b", "back\\slash", "tab\there"])
def test_umount_wait_through_any_path(tmp_path: Path, leaf: str) -> None:
    """Mount through one spelling, umount --wait through another: it unmounts and waits."""
    image = _image(tmp_path)
    _tree(tmp_path, leaf)
    variants = _variants(tmp_path, leaf)
    physical = os.path.realpath(tmp_path / "real dir" / leaf)
    for i, (via_mount, via_umount) in enumerate(zip(variants[::3], variants[::-3], strict=False)):
        check_ok(run([QEDFUSE, "mount", image, via_mount]))
        with _cleanup(physical):
            entry = mounttable.mount_entry(physical)
            assert entry is not None, (i, via_mount)
            assert entry.fstype == "fuse.qedfuse", (i, via_mount)
            found = registry.find_daemon(via_umount)
            assert found is not None, via_umount
            pid = found[0]
            with open(os.path.join(physical, "disk.raw"), "r+b") as f:
                f.write(b"x" * 4096)
            cp = check_ok(run([QEDFUSE, "umount", "--wait", via_umount], timeout=60))
            assert cp.stderr == ""
            assert not pid_alive(pid), (via_mount, via_umount)
            assert mounttable.mount_entry(physical) is None
            assert not need_check(image)


@pytest.mark.sample(2)
@pytest.mark.fuse
@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("timeout", [1, 3])
def test_umount_wait_on_a_daemon_stopped_before(
    tmp_path: Path, paused: Pause, lazy: bool, timeout: int
) -> None:
    image = _image(tmp_path)
    _tree(tmp_path, "m")
    with mounted(image, tmp_path / "real dir" / "m", "-o", "flush_delay=3600") as m:
        with open(m.raw, "r+b") as f:
            f.write(b"y" * 8192)
        with paused(m.pid):
            args = ["umount", "--wait", "--timeout", str(timeout), *(["--lazy"] if lazy else [])]
            cp, _ = _timed(*args, f"{tmp_path}/lnk/m", bound=timeout)
            assert cp.returncode == 1
            line = _one_line(cp)
            assert f"kill -CONT {m.pid}" in line, line
            assert "stopped" in line, line
            # the unmount itself went through: nothing asked the stopped daemon
            assert mount_entry(m.mnt) is None
            assert pid_alive(m.pid)
        assert m.wait_exit() == 0, m.log()
    _no_trouble(m)
    assert not need_check(image)
    assert _registry_files(m.pid) == []


@pytest.mark.fuse
@pytest.mark.parametrize("lazy", [False, True])
def test_plain_umount_of_a_stopped_daemon_says_what_to_do(
    tmp_path: Path, paused: Pause, lazy: bool
) -> None:
    image = _image(tmp_path)
    with mounted(image, tmp_path / "mnt") as m:
        with paused(m.pid):
            cp, _ = _timed("umount", *(["--lazy"] if lazy else []), m.mnt, bound=0)
            assert cp.returncode == 0
            assert f"kill -CONT {m.pid}" in _one_line(cp)
            assert mount_entry(m.mnt) is None
        assert m.wait_exit() == 0, m.log()
    _no_trouble(m)


@pytest.mark.fuse
@pytest.mark.parametrize("resume", [False, True])
def test_daemon_stopped_during_wait(tmp_path: Path, paused: Pause, resume: bool) -> None:
    """--lazy --wait while a holder keeps the daemon serving; the daemon stops mid-wait."""
    image = _image(tmp_path)
    timeout = 4.0
    with mounted(image, tmp_path / "mnt") as m:
        with open(m.raw, "rb") as raw:
            holder = subprocess.Popen(["sleep", "600"], stdin=raw)
        try:
            t0 = time.monotonic()
            waiter = subprocess.Popen(
                [QEDFUSE, "umount", "--lazy", "--wait", "--timeout", str(timeout), m.mnt],
                stderr=subprocess.PIPE,
                text=True,
            )
            wait_until(lambda: mount_entry(m.mnt) is None, 10, "the lazy detach")
            with paused(m.pid):
                holder.kill()  # its close (FLUSH) waits for the daemon; it dies later
                if resume:
                    time.sleep(0.5)
                    os.kill(m.pid, signal.SIGCONT)
                _, err = waiter.communicate(timeout=timeout + SLACK_S + 30)
                elapsed = time.monotonic() - t0
                assert elapsed <= timeout + SLACK_S, elapsed
                if resume:
                    assert waiter.returncode == 0, err
                    assert err == ""
                    assert not pid_alive(m.pid)
                else:
                    assert waiter.returncode == 1
                    lines = err.splitlines()
                    assert len(lines) == 1, err
                    assert f"kill -CONT {m.pid}" in lines[0], err
        finally:
            holder.kill()
            holder.wait(timeout=60)
        assert m.wait_exit() == 0, m.log()
    _no_trouble(m)
    assert not need_check(image)


@pytest.mark.sample(2)
@pytest.mark.fuse
@pytest.mark.parametrize("via", ["mnt", "lnk/mnt", "mnt/", "sub/../mnt"])
def test_mount_onto_a_stopped_mount(
    tmp_path: Path, paused: Pause, via: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = _image(tmp_path)
    other = _image(tmp_path, "other.qed")
    (tmp_path / "sub").mkdir()
    (tmp_path / "lnk").symlink_to(".")
    monkeypatch.chdir(tmp_path)
    with mounted(image, tmp_path / "mnt") as m, paused(m.pid):
        cp, _ = _timed("mount", other, via, bound=0)
        assert cp.returncode == 1
        line = _one_line(cp)
        assert "already mounted" in line, line
        assert f"kill -CONT {m.pid}" in line, line
        # beneath the stopped mount: the probe is bounded
        cp, _ = _timed("mount", other, "mnt/inside", bound=PROBE_S)
        assert cp.returncode == 1
        assert "does not answer" in _one_line(cp)
    _no_trouble(m)
    assert mount_entry(tmp_path / "mnt") is None


@pytest.mark.sample(2)
@pytest.mark.fuse
@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("timeout", [1, 5])
def test_dead_daemon(tmp_path: Path, lazy: bool, timeout: int) -> None:
    image = _image(tmp_path)
    _tree(tmp_path, "m")
    with mounted(image, tmp_path / "real dir" / "m", expect_rc=None) as m:
        m.signal(signal.SIGKILL)
        m.wait_exit()
        cp, _ = _timed("mount", image, f"{tmp_path}/lnk/m", bound=0)
        assert cp.returncode == 1
        assert "is a stale mount" in _one_line(cp)
        args = ["umount", "--wait", "--timeout", str(timeout), *(["--lazy"] if lazy else [])]
        cp, _ = _timed(*args, f"{tmp_path}/abs/m/", bound=min(timeout, PROBE_S))
        check_ok(cp)
        assert "stale mount" in _one_line(cp)
        assert mount_entry(m.mnt) is None


@pytest.mark.fuse
@pytest.mark.parametrize("lazy", [False, True])
def test_unregistered_mount_that_does_not_answer(tmp_path: Path, paused: Pause, lazy: bool) -> None:
    """No registry record (unknown daemon) and no answer: bounded probe, then say what to do."""
    image = _image(tmp_path)
    with mounted(image, tmp_path / "mnt") as m, paused(m.pid):
        for path in _registry_files(m.pid):
            os.unlink(path)
        timeout = 2
        args = ["umount", "--wait", "--timeout", str(timeout), *(["--lazy"] if lazy else [])]
        cp, _ = _timed(*args, m.mnt, bound=timeout)
        assert cp.returncode == 1
        line = _one_line(cp)
        if lazy:
            assert "cannot tell which process" in line
            assert mount_entry(m.mnt) is None
        else:
            assert "does not answer" in line, line
            assert "--lazy" in line, line
            assert mount_entry(m.mnt) is not None
    assert not need_check(image)


@pytest.mark.fuse
def test_busy_and_stopped_names_holders(tmp_path: Path, paused: Pause) -> None:
    image = _image(tmp_path)
    with mounted(image, tmp_path / "mnt") as m:
        with open(m.raw, "rb") as raw:
            holder = subprocess.Popen(["sleep", "600"], stdin=raw)
        in_cwd = subprocess.Popen(["sleep", "600"], cwd=m.mnt)
        try:
            with paused(m.pid):
                cp, _ = _timed("umount", m.mnt, bound=0)
                assert cp.returncode == 1
                line = _one_line(cp)
                assert f"pid {holder.pid} (sleep)" in line, line
                assert f"pid {in_cwd.pid} (sleep)" in line, line
                assert f"kill -CONT {m.pid}" in line
                assert mount_entry(m.mnt) is not None
        finally:
            for p in (holder, in_cwd):
                p.kill()
                p.wait(timeout=60)
    _no_trouble(m)


@pytest.mark.sample(2)
@pytest.mark.fuse
@pytest.mark.parametrize("how", ["qedfuse", "qedfuse --lazy", "fusermount3"])
def test_umount_wait_after_a_plain_umount_waits_for_the_daemon(
    tmp_path: Path, paused: Pause, how: str
) -> None:
    """The mount is gone, the daemon still runs (held in SIGSTOP right after the umount, as a
    slow final flush would): --wait through any path waits for it, exits 0 only once it is
    gone, and a plain umount names it."""
    image = _image(tmp_path, size="256M")
    _tree(tmp_path, "m")
    with mounted(image, tmp_path / "real dir" / "m") as m:
        with open(m.raw, "r+b", buffering=0) as f:
            for i in range(64):  # L2 tables all over the disk
                f.seek(i * 4 * MiB)
                f.write(b"z" * 512)
        with paused(m.pid):
            if how == "fusermount3":
                check_ok(run(["fusermount3", "-u", m.mnt]))
            else:
                cp = check_ok(run([QEDFUSE, "umount", *how.split()[1:], f"{tmp_path}/lnk/m"]))
                assert f"kill -CONT {m.pid}" in _one_line(cp)
            assert mount_entry(m.mnt) is None
            assert pid_alive(m.pid)
            # a plain umount again: not mounted, and it says who is still at work
            cp = run([QEDFUSE, "umount", f"{tmp_path}/abs/m"])
            assert cp.returncode == 1
            line = _one_line(cp)
            assert "is not mounted" in line, line
            assert f"pid {m.pid}" in line, line
            assert "--wait" in line, line
            # --wait with a short timeout names the stopped daemon
            cp, _ = _timed("umount", "--wait", "--timeout", "1", f"{tmp_path}/leaflink", bound=1)
            assert cp.returncode == 1
            assert f"kill -CONT {m.pid}" in _one_line(cp)
            # --wait while it resumes: 0 once the daemon is gone, not before
            t0 = time.monotonic()
            waiter = subprocess.Popen(
                [QEDFUSE, "umount", "--wait", "--timeout", "30", f"{tmp_path}/lnk/m/"],
                stderr=subprocess.PIPE,
                text=True,
            )
            # it found the daemon and polls for it (its start-up takes seconds under load)
            wait_until(lambda: _sleeping(waiter.pid), 30, "umount --wait to start waiting")
            time.sleep(1.5)
            assert waiter.poll() is None
        _, err = waiter.communicate(timeout=60)
        assert waiter.returncode == 0, err
        assert err == ""
        assert time.monotonic() - t0 >= 1.5
        assert not pid_alive(m.pid)
        assert not need_check(image)
        assert m.wait_exit() == 0, m.log()
    _no_trouble(m)
    assert _registry_files(m.pid) == []


@pytest.mark.fuse
def test_make_run_never_stats_a_stopped_mount(tmp_path: Path, paused: Pause) -> None:
    make = require_tool("make")
    image = _image(tmp_path)
    _tree(tmp_path, "m")
    mnt = f"{tmp_path}/lnk/m"
    physical = os.path.realpath(mnt)
    env = {**os.environ, "MAKEFLAGS": ""}
    cmd: list[str | os.PathLike[str]] = [make, "-s", "-C", REPO, "run"]
    cmd += [f"IMAGE={image}", f"MNT={mnt}"]
    cp = check_ok(run(cmd, timeout=120, env=env))
    assert f"raw disk:   {physical}/disk.raw" in cp.stdout, cp.stdout
    found = registry.find_daemon(mnt)
    assert found is not None
    pid = found[0]
    try:
        cp = check_ok(run(cmd, timeout=120, env=env))
        assert "not remounting" in cp.stdout
        with paused(pid):
            t0 = time.monotonic()
            cp = run(cmd, timeout=120, env=env)
            assert time.monotonic() - t0 < 20
            assert cp.returncode != 0
            assert f"kill -CONT {pid}" in cp.stderr
    finally:
        with _cleanup(physical):
            run([QEDFUSE, "umount", "--wait", mnt], timeout=60)
    assert not pid_alive(pid)
