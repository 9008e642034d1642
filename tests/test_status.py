"""``qedfuse status``, ``list`` and ``flush`` against real mounts, through the control socket.

The figures must move when I/O happens through the mount (dd, fsync, re-reads), a stopped
(SIGSTOP) daemon must not hang ``status``, a killed one shows as dead, ``flush`` clears
NEED_CHECK on disk, a failsafe shows its reason and the log line that names the image and
the guest range.  qemu-img makes the images; qededit breaks them.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import random
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import qededit
from fusehelpers import QEDFUSE, daemon_pid, mounted, need_check, pid_alive, qedfuse, wait_until

from qedfuse import control
from qedfuse.procfs import process_state
from qedfuse.registry import qedfuse_mounts
from support import check_ok, describe, require_fuse, require_tool, run, tools_required
from support import qemu_img_create as _create

KiB = 1024
MiB = 1024 * KiB

pytestmark = pytest.mark.fuse


def status(mnt: Path, *args: str, timeout: float = 30) -> dict[str, Any]:
    """``qedfuse status --json MNT``: the one mount's answer (must exit 0)."""
    cp = check_ok(qedfuse("status", "--json", *args, mnt, timeout=timeout))
    answers = json.loads(cp.stdout)
    assert isinstance(answers, list), cp.stdout
    assert len(answers) == 1, cp.stdout
    answer: dict[str, Any] = answers[0]
    assert answer["state"] == "running", answer
    return answer


def dd(*args: str) -> None:
    check_ok(run(["dd", "status=none", *args], timeout=60))


_WRITER = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
for line in sys.stdin:
    offset, size = map(int, line.split())
    os.pwrite(fd, os.urandom(size), offset)
    print("ok", flush=True)
"""


class Writer:
    """A process that keeps the raw file open and writes on request.

    The test process itself must not hold the descriptor: every process it spawns
    (``qedfuse status``) would close an inherited copy at exec, and each close sends FLUSH.
    """

    def __init__(self, raw: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, os.fspath(raw)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def pwrite(self, offset: int, size: int) -> None:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(f"{offset} {size}\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline() == "ok\n"

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        assert self.proc.wait(timeout=30) == 0


@contextlib.contextmanager
def writer(raw: Path) -> Iterator[Writer]:
    w = Writer(raw)
    try:
        yield w
    finally:
        w.close()


def delta(after: dict[str, Any], before: dict[str, Any], part: str, key: str) -> int:
    value: int = after[part][key] - before[part][key]
    return value


# ---------------------------------------------------------------------- figures move


@pytest.mark.parametrize(
    ("bs", "count", "seek_bytes", "opts"),
    [
        (4 * KiB, 3, 0, ()),
        (64 * KiB, 16, 1 * MiB, ()),
        (128 * KiB, 5, 3 * MiB + 4 * KiB, ("-o", "cache=none")),
        (512, 9, 7 * MiB + 512, ("-o", "cache=kernel")),
    ],
)
@pytest.mark.sample(2)
def test_figures_move_with_io(
    tmp_path: Path, bs: int, count: int, seek_bytes: int, opts: tuple[str, ...]
) -> None:
    image = _create(tmp_path / "disk.qed", "16M", "cluster_size=65536")
    data = tmp_path / "data"
    data.write_bytes(os.urandom(bs * count))
    n = bs * count
    with mounted(image, tmp_path / "mnt", *opts) as m:
        before = status(m.mnt)
        assert before["image"] == str(image)
        assert before["pid"] == m.pid
        assert before["mountpoint"] == str(m.mnt)
        dd(
            f"if={data}",
            f"of={m.raw}",
            f"bs={bs}",
            f"seek={seek_bytes}",
            "oflag=direct,seek_bytes",
            "conv=notrunc",
        )
        mid = status(m.mnt)
        # dd's writes arrive as they were made: exactly n guest bytes, at least count requests.
        assert delta(mid, before, "requests", "bytes_written") == n
        assert delta(mid, before, "requests", "writes") >= count
        assert delta(mid, before, "io", "bytes_written") >= n
        clusters = (seek_bytes + n - 1) // (64 * KiB) - seek_bytes // (64 * KiB) + 1
        assert delta(mid, before, "engine", "clusters_allocated") == clusters
        assert mid["engine"]["data_clusters"] == clusters
        assert mid["io"]["file_bytes"] >= mid["engine"]["allocator_end_bytes"]
        # close() sent FLUSH: the ordered flush ran, and its latency is recorded.
        assert delta(mid, before, "engine", "flushes") >= 1
        assert mid["engine"]["last_flush_seconds"] is not None
        assert mid["engine"]["max_flush_seconds"] >= mid["engine"]["last_flush_seconds"] > 0
        assert not mid["engine"]["need_check_on_disk"]
        assert mid["uptime_seconds"] >= before["uptime_seconds"]

        dd(f"if={data}", f"of={m.raw}", f"bs={bs}", f"seek={seek_bytes}", "oflag=seek_bytes",
           "conv=notrunc,fsync")  # fmt: skip
        synced = status(m.mnt)
        assert delta(synced, mid, "requests", "flushes") >= 2  # fsync, then close's flush
        assert delta(synced, mid, "engine", "flushes") >= 2
        assert delta(synced, mid, "engine", "clusters_allocated") == 0  # rewrites in place

        out = tmp_path / "out"
        for k in range(2):
            dd(f"if={m.raw}", f"of={out}", f"bs={bs}", f"count={count}", f"skip={seek_bytes}",
               "iflag=direct,skip_bytes")  # fmt: skip
            assert out.read_bytes() == data.read_bytes()
            reread = status(m.mnt)
            got = delta(reread, synced, "requests", "bytes_read")
            assert got == n * (k + 1), (got, n, k)
            assert delta(reread, synced, "requests", "reads") >= count * (k + 1)
        # The second pass found its L2 table cached.
        assert delta(reread, synced, "cache", "hits") >= 2 * count
        assert reread["cache"]["hit_rate"] is not None
        assert reread["cache"]["hit_rate"] > 0.5
        assert reread["cache"]["cached_tables"] == 1 == reread["engine"]["l2_tables"]
        assert reread["requests"]["errors"] == 0
        assert reread["requests"]["last_error"] is None


def test_human_status_and_list_show_the_figures(tmp_path: Path) -> None:
    image = _create(tmp_path / "vm.qed", "8M")
    with mounted(image, tmp_path / "mnt", "-o", "flush_delay=3600") as m:
        with writer(m.raw) as w:
            w.pwrite(5 * MiB, 4096)  # allocates; no close, so no flush
            cp = check_ok(qedfuse("status", m.mnt))
        text = cp.stdout
        assert text.startswith(f"{m.mnt}: running\n"), text
        assert f"image:       {image} (read-write)" in text
        assert f"pid:         {m.pid}, up " in text
        assert "flush_delay=3600" in text
        assert "1 writes 4.0 KiB" in text, text
        assert "dirty:       1 L2 tables, 1 L1 pages; NEED_CHECK on disk: yes" in text, text
        assert "failsafe:    no" in text
        assert "allocation:  1 data clusters of 64.0 KiB, 1 L2 tables; disk 8.0 MiB" in text
        line = check_ok(qedfuse("list")).stdout.splitlines()
        ours = [entry for entry in line if entry.startswith(f"{m.mnt}  ")]
        assert len(ours) == 1, line
        assert f"running  pid {m.pid}  up " in ours[0], line
        assert ours[0].endswith(f"  {image}")


def test_list_shows_two_mounts(tmp_path: Path) -> None:
    a = _create(tmp_path / "a.qed", "4M")
    b = _create(tmp_path / "b.qed", "8M")
    with mounted(a, tmp_path / "ma") as ma, mounted(b, tmp_path / "mb", "-o", "ro") as mb:
        cp = check_ok(qedfuse("list", "--json"))
        listed = {entry["mountpoint"]: entry for entry in json.loads(cp.stdout)}
        for m, image in ((ma, a), (mb, b)):
            entry = listed[str(m.mnt)]
            assert (entry["image"], entry["pid"], entry["state"]) == (str(image), m.pid, "running")
            assert entry["uptime_seconds"] >= 0
        human = check_ok(qedfuse("list")).stdout
        assert f"{ma.mnt}  running  pid {ma.pid}" in human
        assert f"{mb.mnt}  running  pid {mb.pid}" in human
        # `status` without a mount point reports every mount; the ro one says so.
        # (Exit status 1 if any other mount on this machine is not answering.)
        every = json.loads(qedfuse("status", "--output=json").stdout)
        by_mnt = {entry["mountpoint"]: entry for entry in every}
        assert by_mnt[str(mb.mnt)]["engine"]["read_only"] is True
        assert by_mnt[str(ma.mnt)]["engine"]["read_only"] is False
        assert "ro" in by_mnt[str(mb.mnt)]["options"]


# ---------------------------------------------------------------------- stopped / dead


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """SIGSTOP ``pid``; always SIGCONT it again."""
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: process_state(pid) in ("T", "t"), 10, f"pid {pid} to stop")
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


@pytest.mark.parametrize(
    ("command", "timeout_s"), [("status", 0.5), ("list", 2.0), ("flush", 5.0), ("status", 60.0)]
)
def test_stopped_daemon_does_not_hang_status(
    tmp_path: Path, command: str, timeout_s: float
) -> None:
    """A stopped daemon (SIGSTOP) cannot answer: it is reported as stopped, with how to
    resume it, without waiting out the timeout (flush used to wait its whole 120 s)."""
    image = _create(tmp_path / "disk.qed", "4M")
    with mounted(image, tmp_path / "mnt") as m:
        with stopped(m.pid):
            args = [command, "--json", "--timeout", str(timeout_s)]
            if command != "list":
                args.append(os.fspath(m.mnt))
            cp = qedfuse(*args, timeout=timeout_s + 30)
            assert cp.returncode == (0 if command == "list" else 1), describe(cp)
            answer = json.loads(cp.stdout)
            entries = [answer] if command == "flush" else answer
            entry = next(e for e in entries if e["mountpoint"] == str(m.mnt))
            assert entry["state"] == "stopped", entry
            assert entry["pid"] == m.pid
            assert f"kill -CONT {m.pid}" in entry["error"]
            human = qedfuse("status", "--timeout", str(timeout_s), m.mnt, timeout=timeout_s + 30)
            assert human.returncode == 1
            assert human.stdout.startswith(f"{m.mnt}: stopped\n"), describe(human)
        status(m.mnt)  # SIGCONT: it answers again


def test_killed_daemon_shows_as_dead(tmp_path: Path) -> None:
    image = _create(tmp_path / "disk.qed", "4M")
    with mounted(image, tmp_path / "mnt", expect_rc=None) as m:
        status(m.mnt)
        m.signal(signal.SIGKILL)
        wait_until(lambda: not pid_alive(m.pid), 20, "the daemon to die")
        started = time.monotonic()
        cp = qedfuse("status", "--json", m.mnt)
        assert time.monotonic() - started < 15
        assert cp.returncode == 1, describe(cp)
        (entry,) = json.loads(cp.stdout)
        assert entry["state"] == "dead", entry
        assert entry["image"] == str(image)
        assert "qedfuse umount" in entry["error"]
        listed = json.loads(check_ok(qedfuse("list", "--json")).stdout)
        assert [e["state"] for e in listed if e["mountpoint"] == str(m.mnt)] == ["dead"]
        human = qedfuse("status", m.mnt)
        assert human.stdout.startswith(f"{m.mnt}: dead\n"), describe(human)


def test_not_a_qedfuse_mount(tmp_path: Path) -> None:
    cp = qedfuse("status", tmp_path)
    assert cp.returncode == 1
    assert cp.stderr == f"qedfuse: {tmp_path} is not a qedfuse mount\n"
    cp = qedfuse("flush", tmp_path)
    assert cp.returncode == 1
    assert cp.stderr == f"qedfuse: {tmp_path} is not a qedfuse mount\n"


# ---------------------------------------------------------------------- the socket


def _socket_of(mnt: Path) -> str:
    (ref,) = qedfuse_mounts(os.fspath(mnt))
    assert ref.registry_path is not None
    return control.socket_path(ref.registry_path)


def test_socket_is_private_and_removed_at_unmount(tmp_path: Path) -> None:
    image = _create(tmp_path / "disk.qed", "4M")
    with mounted(image, tmp_path / "mnt", daemon=True) as m:
        path = _socket_of(m.mnt)
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == os.geteuid()
        parent = os.stat(os.path.dirname(path))
        assert stat.S_IMODE(parent.st_mode) == 0o700
        assert parent.st_uid == os.geteuid()
        check_ok(qedfuse("umount", "--wait", m.mnt))
    assert not os.path.exists(path)


BAD_REQUESTS = [b"", b"stat", b"bogus\n", b"x" * 10000, b"status\x00\xff\n", b"\n", b"flush"]


def _send_raw(path: str, payload: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(15)
        sock.connect(path)
        try:
            if payload:
                sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            return b"".join(iter(lambda: sock.recv(65536), b""))
        except (ConnectionResetError, BrokenPipeError):  # refused before reading it all
            return b""


def test_bad_requests_do_not_disturb_the_daemon(tmp_path: Path) -> None:
    image = _create(tmp_path / "disk.qed", "4M")
    with mounted(image, tmp_path / "mnt") as m:
        path = _socket_of(m.mnt)
        for payload in BAD_REQUESTS:
            answer = _send_raw(path, payload)
            if payload == b"bogus\n":
                assert "unknown request" in json.loads(answer)["error"]
            assert not answer or json.loads(answer)["ok"] is False, (payload, answer)
        # Many clients at once, some never sending anything: all are answered or dropped.
        idle = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(100)]
        try:
            for sock in idle:
                sock.connect(path)
            answered = control.request(path, "status", 10)
        finally:
            for sock in idle:
                sock.close()
        assert answered["ok"] is True
        assert answered["pid"] == m.pid
    log = m.log()
    assert "Traceback" not in log, log
    assert "warning" not in log.lower(), log


# ---------------------------------------------------------------------- flush on demand


@pytest.mark.parametrize("n_tables", [1, 3])
def test_flush_clears_need_check_on_disk(tmp_path: Path, n_tables: int) -> None:
    # 4 KiB clusters, two-cluster tables: each L2 table maps 4 MiB of the disk.
    image = _create(tmp_path / "disk.qed", "16M", "cluster_size=4096", "table_size=2")
    with mounted(image, tmp_path / "mnt", "-o", "flush_delay=3600") as m, writer(m.raw) as w:
        for k in range(n_tables):
            w.pwrite(k * 4 * MiB + 12288, 4096)
        assert need_check(image)  # set before the first allocation, on disk
        before = status(m.mnt)
        assert before["engine"]["need_check_on_disk"] is True
        assert before["engine"]["dirty_l2_tables"] == n_tables
        assert before["engine"]["dirty_l1_pages"] == 1
        cp = check_ok(qedfuse("flush", "--json", m.mnt))
        report = json.loads(cp.stdout)
        assert report["ok"] is True
        assert report["mountpoint"] == str(m.mnt)
        assert (report["need_check_before"], report["need_check_after"]) == (True, False)
        assert report["l2_tables_written"] == n_tables
        assert report["l1_pages_written"] == 1
        assert report["duration_seconds"] > 0
        assert not need_check(image)  # on disk, read beside the mount
        after = status(m.mnt)
        assert after["engine"]["dirty_l2_tables"] == after["engine"]["dirty_l1_pages"] == 0
        assert after["engine"]["flushes"] == before["engine"]["flushes"] + 1
        # Once more, human: nothing dirty now; then dirty again, and cleared again.
        line = check_ok(qedfuse("flush", m.mnt)).stdout
        assert line.endswith("0 L2 tables and 0 L1 pages written; NEED_CHECK was clear\n")
        w.pwrite(13 * MiB, 4096)
        assert need_check(image)
        line = check_ok(qedfuse("flush", m.mnt)).stdout
        assert line.startswith(f"{m.mnt}: flushed in ")
        assert line.endswith("1 L2 tables and 1 L1 pages written; NEED_CHECK cleared\n")
        assert not need_check(image)
    check_ok(run([require_tool("qemu-img"), "check", image]))


def test_flush_of_a_read_only_mount(tmp_path: Path) -> None:
    image = _create(tmp_path / "disk.qed", "4M")
    with mounted(image, tmp_path / "mnt", "-o", "ro") as m:
        line = check_ok(qedfuse("flush", m.mnt)).stdout
        assert line == f"{m.mnt}: read-only mount, nothing to flush\n"


# ---------------------------------------------------------------------- failsafe and logs


def _corrupt_image(tmp_path: Path, bad_cluster: int, how: str) -> tuple[Path, int]:
    """An image with data in clusters 0..7 whose L2 entry for ``bad_cluster`` is broken."""
    image = _create(tmp_path / "broken.qed", "4M", "cluster_size=65536")
    check_ok(run([require_tool("qemu-io"), "-f", "qed", "-c", "write -P 0x5a 0 512k", image]))
    header = qededit.read_header(image)
    cs = header.cluster_size
    value = {
        "into-l1": header.l1_table_offset,  # a data cluster inside the L1 table
        "unaligned": qededit.entry_at(image, 0) + 512,
        "past-eof": qededit.past_eof_offset(image),
    }[how]
    qededit.set_l2(image, 0, bad_cluster, value)
    return image, cs


@pytest.mark.parametrize(
    ("how", "bad_cluster"), [("into-l1", 1), ("unaligned", 6), ("past-eof", 3)]
)
@pytest.mark.sample(2)
@pytest.mark.expect_log(
    r"L\d+ table at 0x[0-9a-f]+ has \d+ invalid entries",
    r"entering failsafe mode: L\d+ table at 0x[0-9a-f]+ has \d+ invalid entries",
    r"read of guest bytes \d+\+\d+ refused \(EIO\), corrupt metadata: invalid L\d+ entry \d+ ",
    r"the image was in failsafe mode \(.*\); it was not flushed; NEED_CHECK is set",
)
def test_failsafe_shows_its_reason_and_the_range(
    tmp_path: Path, how: str, bad_cluster: int
) -> None:
    image, cs = _corrupt_image(tmp_path, bad_cluster, how)
    with mounted(image, tmp_path / "mnt", expect_rc=1) as m:
        assert status(m.mnt)["engine"]["failsafe_reason"] is None
        fd = os.open(m.raw, os.O_RDONLY | os.O_DIRECT)
        aligned = mmap.mmap(-1, cs)  # page-aligned, as O_DIRECT wants
        try:
            with pytest.raises(OSError, match="Input/output error"):
                os.preadv(fd, [aligned], bad_cluster * cs)
        finally:
            aligned.close()
            os.close(fd)
        answer = status(m.mnt)
        reason = answer["engine"]["failsafe_reason"]
        assert reason is not None, answer
        assert "invalid entries" in reason, answer
        assert answer["requests"]["corruptions"] == 1
        guest = f"read of guest bytes {bad_cluster * cs}+{cs}"
        assert answer["requests"]["last_error"].startswith(guest), answer["requests"]
        problems = [p for p in answer["problems"] if p["level"] in ("ERROR", "WARNING")]
        messages = [p["message"] for p in problems]
        assert any(guest in text and str(image) in text for text in messages), messages
        assert any("entering failsafe mode" in t and str(image) in t for t in messages), messages
        human = check_ok(qedfuse("status", m.mnt)).stdout
        assert f"failsafe:    {reason}" in human
        assert "recent warnings and errors:" in human
        assert guest in human
        # Writes are refused now; flush says why.
        cp = qedfuse("flush", m.mnt)
        assert cp.returncode == 1
        assert "failsafe" in cp.stderr, describe(cp)
        assert cp.stderr.startswith("qedfuse: "), describe(cp)
    log = m.log()
    assert f"{image}: {guest} refused (EIO)" in log, log


@pytest.mark.expect_log(r"image had NEED_CHECK set; repaired on open: ")
def test_repair_on_open_is_a_warning_naming_the_image(tmp_path: Path) -> None:
    image = _create(tmp_path / "dirty.qed", "4M")
    qededit.set_need_check(image, True)
    with mounted(image, tmp_path / "mnt") as m:
        problems = status(m.mnt)["problems"]
        assert any(
            p["level"] == "WARNING" and "repaired on open" in p["message"] for p in problems
        ), problems
    # The open-time repair runs before the subject is set: the engine names no image, but
    # the line is in the log all the same.
    assert "repaired on open" in m.log()


@pytest.mark.parametrize("syslog", [False, True])
def test_detached_daemon_says_where_it_logs(tmp_path: Path, syslog: bool) -> None:
    require_fuse()
    stem = f"where-{os.getpid()}-{tmp_path.name}"
    image = _create(tmp_path / f"{stem}.qed", "4M")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    address = tmp_path / "syslog.sock"
    env = {**os.environ, "QEDFUSE_SYSLOG_SOCKET": os.fspath(address)}
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if syslog:
        receiver.bind(os.fspath(address))
    log_file: str | None = None
    try:
        cp = check_ok(run([QEDFUSE, "mount", image, mnt], env=env, timeout=60))
        pid = daemon_pid(mnt)
        try:
            registry = qedfuse_mounts(os.fspath(mnt))[0].registry_path
            assert registry is not None
            log_file = os.path.join(os.path.dirname(registry), f"{stem}.log")
            answer = status(mnt)
            if syslog:
                where = f"syslog ({address}; journalctl -t qedfuse)"
                assert cp.stderr == f"qedfuse: the daemon (pid {pid}) logs to {where}\n"
                assert answer["log"].startswith(f"syslog ({address}")
            else:
                assert cp.stderr == f"qedfuse: the daemon (pid {pid}) logs to the file {log_file}\n"
                assert answer["log"] == f"the file {log_file}"
                wait_until(lambda: os.path.exists(log_file), 10, "the log file")
                text = Path(log_file).read_text()
                assert f"INFO qedfuse.mount: serving {image} at {mnt} (pid {pid})" in text
        finally:
            check_ok(qedfuse("umount", "--wait", mnt))
        wait_until(lambda: not pid_alive(pid), 30, "daemon exit")
        if not syslog:
            assert "unmounted" in Path(log_file).read_text()
    finally:
        receiver.close()
        if log_file is not None:  # in the shared registry directory: never leave it behind
            with contextlib.suppress(FileNotFoundError):
                os.unlink(log_file)


# ---------------------------------------------------------------------- the records, in-process


@pytest.mark.parametrize("seed", range(6))
async def test_engine_records_count_exactly(tmp_path: Path, seed: int) -> None:
    """The engine, cache and I/O records against a model: random writes, then a flush."""
    from qedfuse.imagefile import FileImage, io_statistics
    from qedfuse.opening import open_image
    from qedfuse.tables import create_image

    rng = random.Random(seed)
    cs, l2_span = 4096, 1024 * 4096  # table_size=2: one L2 table maps 4 MiB
    path = tmp_path / "e.qed"
    file = FileImage(os.open(path, os.O_RDWR | os.O_CREAT, 0o600), read_only=False)
    await create_image(file, 64 * MiB, cluster_size=cs, table_size=2)
    image = await open_image(file)
    try:
        clusters: set[int] = set()
        written = 0
        for _ in range(rng.randint(1, 40)):
            pos = rng.randrange(0, 64 * MiB - 3 * cs)
            size = rng.randint(1, 3 * cs)
            await image.write(pos, os.urandom(size))  # random bytes: never a zero cluster
            clusters.update(range(pos // cs, (pos + size - 1) // cs + 1))
            written += size
        tables = {c * cs // l2_span for c in clusters}
        eng = image.statistics()
        assert (eng.dirty_l2_tables, eng.dirty_l1_pages) == (len(tables), 1)
        assert eng.clusters_allocated == eng.data_clusters == len(clusters)
        assert eng.l2_tables == len(tables)
        assert eng.need_check_on_disk
        assert eng.failsafe_reason is None
        io = io_statistics(file)
        assert io is not None
        assert io.bytes_written >= written
        await image.flush()
        after = image.statistics()
        assert (after.l2_tables_flushed, after.l1_pages_flushed) == (len(tables), 1)
        assert (after.dirty_l2_tables, after.dirty_l1_pages) == (0, 0)
        assert not after.need_check_on_disk
        assert after.flushes == eng.flushes + 1
        assert after.last_flush_seconds is not None
        assert after.max_flush_seconds >= after.last_flush_seconds > 0
        flushed_io = io_statistics(file)
        assert flushed_io is not None
        assert flushed_io.fdatasyncs >= io.fdatasyncs + 4  # data, L2, L1, header
        cache = image.cache.statistics()
        assert cache.misses == len(tables)  # each new table inserted once
        assert cache.cached_tables == len(tables)
        for record in (after, cache, flushed_io):
            assert json.loads(json.dumps(record.to_json())) == record.to_json()
    finally:
        await image.close()


def test_another_users_mount_is_not_theirs_to_ask(tmp_path: Path) -> None:
    if os.geteuid() != 0:  # stated, and a failure under CI (as a missing tool is)
        reason = "running a command as another user needs root"
        if tools_required():
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    setpriv = require_tool("setpriv")
    nobody = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", QEDFUSE]
    image = _create(tmp_path / "disk.qed", "4M")
    with mounted(image, tmp_path / "mnt") as m:
        path = _socket_of(m.mnt)
        listed = json.loads(check_ok(run([*nobody, "list", "--json"], cwd="/")).stdout)
        assert str(m.mnt) not in [entry["mountpoint"] for entry in listed]
        cp = run([*nobody, "status", "--json", m.mnt], cwd="/")
        assert cp.returncode == 1, describe(cp)
        (entry,) = json.loads(cp.stdout)
        assert entry["state"] == "not accessible", entry
        assert "mounted by uid 0" in entry["error"]
        probe = "import socket,sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])"
        cp = run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
                  sys.executable, "-c", probe, path], cwd="/")  # fmt: skip
        assert cp.returncode != 0
        assert "PermissionError" in cp.stderr, describe(cp)


def test_a_burst_of_clients_while_the_daemon_is_busy(tmp_path: Path) -> None:
    """Connections queue while the daemon can't accept (here: stopped); a client then waits
    within its timeout instead of failing at once with EAGAIN."""
    image = _create(tmp_path / "disk.qed", "4M")
    with mounted(image, tmp_path / "mnt") as m:
        path = _socket_of(m.mnt)
        burst: list[socket.socket] = []
        try:
            with stopped(m.pid):
                for _ in range(64):
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    sock.setblocking(False)
                    burst.append(sock)
                    with contextlib.suppress(BlockingIOError):
                        sock.connect(path)
                resume = threading.Timer(1.0, os.kill, (m.pid, signal.SIGCONT))
                resume.start()
                try:
                    answered = control.request(path, "status", 20)
                finally:
                    resume.join()
        finally:
            for sock in burst:
                sock.close()
        assert answered["ok"] is True
        assert answered["pid"] == m.pid
